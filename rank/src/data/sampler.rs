//! The distributed sampler: every rank draws the same seeded permutation of the data set each
//! epoch and takes its own disjoint part of it.

use std::sync::{Arc, Mutex};

use super::DataError;
use crate::rng::Rng;

/// Seeded, rank-aware sampling of `0..n`.
///
/// Epoch `e` uses the permutation `Rng::stream(seed, e)` shuffles `0..n` to, the same on every
/// rank. Two ways to consume it:
/// * [`Self::epoch_indices`]: the rank's contiguous share of the epoch's permutation;
/// * [`Self::batch_indices`]: step-based, as the training loop uses it. Step `s` takes global
///   batch `s mod steps_per_epoch` of epoch `s / steps_per_epoch` (the tail of each permutation
///   that does not fill a global batch is dropped, so no batch straddles two permutations), and
///   rank r gets rows `[r*b, (r+1)*b)` of that global batch. N ranks with local batch b therefore
///   see exactly the global batch that 1 rank with batch N*b sees.
#[derive(Debug)]
pub struct DistributedSampler {
    n: usize,
    world: usize,
    rank: usize,
    seed: u64,
    drop_last: bool,
    /// The most recent epoch's permutation (steps of one epoch reuse it).
    cache: Mutex<Option<(u64, Arc<Vec<usize>>)>>,
}

impl Clone for DistributedSampler {
    fn clone(&self) -> Self {
        DistributedSampler { cache: Mutex::new(None), ..*self }
    }
}

impl DistributedSampler {
    /// A sampler over `n` rows for `rank` of `world`. With `drop_last`, [`Self::epoch_indices`]
    /// gives each rank `n / world` rows and the remainder is skipped; without it, each rank gets
    /// `ceil(n / world)` rows, the permutation being extended by wrapping around its start (so a
    /// few rows appear twice in that epoch).
    pub fn try_new(
        n: usize,
        world: usize,
        rank: usize,
        seed: u64,
        drop_last: bool,
    ) -> Result<Self, DataError> {
        if n == 0 {
            return Err(DataError::Sampler("the data set is empty".into()));
        }
        if world == 0 || rank >= world {
            return Err(DataError::Sampler(format!(
                "rank {rank} is not in a world of {world} ranks"
            )));
        }
        Ok(DistributedSampler { n, world, rank, seed, drop_last, cache: Mutex::new(None) })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The permutation of `0..n` for `epoch` (identical on every rank).
    pub fn permutation(&self, epoch: u64) -> Arc<Vec<usize>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, p)) = cache.as_ref()
            && *e == epoch
        {
            return Arc::clone(p);
        }
        let mut p: Vec<usize> = (0..self.n).collect();
        Rng::stream(self.seed, epoch).shuffle(&mut p);
        let p = Arc::new(p);
        *cache = Some((epoch, Arc::clone(&p)));
        p
    }

    /// Rows per rank per epoch in [`Self::epoch_indices`].
    pub fn per_rank(&self) -> usize {
        if self.drop_last { self.n / self.world } else { self.n.div_ceil(self.world) }
    }

    /// This rank's share of `epoch`: the contiguous slice `[rank*m, (rank+1)*m)` of the epoch's
    /// permutation, m = [`Self::per_rank`]. Disjoint across ranks (except the wrapped-around
    /// padding when not `drop_last`).
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let perm = self.permutation(epoch);
        let m = self.per_rank();
        (self.rank * m..(self.rank + 1) * m).map(|i| perm[i % self.n]).collect()
    }

    /// Full global batches per epoch at `global_batch` rows each.
    pub fn steps_per_epoch(&self, global_batch: usize) -> Result<usize, DataError> {
        if global_batch == 0 {
            return Err(DataError::Sampler("batch.global is 0; set it to at least 1".into()));
        }
        if global_batch > self.n {
            return Err(DataError::Sampler(format!(
                "batch.global = {global_batch} is larger than the data set ({} rows); lower batch.global or use more data",
                self.n
            )));
        }
        Ok(self.n / global_batch)
    }

    /// The whole global batch of `step` (the same on every rank).
    pub fn try_global_batch_indices(
        &self,
        step: u64,
        global_batch: usize,
    ) -> Result<Vec<usize>, DataError> {
        let spe = self.steps_per_epoch(global_batch)? as u64;
        let (epoch, pos) = (step / spe, (step % spe) as usize);
        let perm = self.permutation(epoch);
        Ok(perm[pos * global_batch..(pos + 1) * global_batch].to_vec())
    }

    /// This rank's rows of the global batch of `step`: `[rank*local_batch, (rank+1)*local_batch)`.
    /// `global_batch` must equal `world * local_batch`.
    pub fn try_batch_indices(
        &self,
        step: u64,
        local_batch: usize,
        global_batch: usize,
    ) -> Result<Vec<usize>, DataError> {
        if local_batch.checked_mul(self.world) != Some(global_batch) {
            return Err(DataError::Sampler(format!(
                "batch.global = {global_batch} is not {} ranks x local batch {local_batch}; make batch.global a multiple of the rank count",
                self.world
            )));
        }
        let offsets: Vec<usize> = (0..=self.world).map(|r| r * local_batch).collect();
        self.try_batch_indices_uneven(step, &offsets)
    }

    /// Like [`Self::batch_indices`] with per-rank batch sizes: `offsets` has `world + 1`
    /// non-decreasing entries starting at 0, rank r gets rows `[offsets[r], offsets[r+1])` of the
    /// global batch of `offsets[world]` rows.
    pub fn try_batch_indices_uneven(
        &self,
        step: u64,
        offsets: &[usize],
    ) -> Result<Vec<usize>, DataError> {
        if offsets.len() != self.world + 1
            || offsets[0] != 0
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(DataError::Sampler(format!(
                "batch offsets {offsets:?} must be {} non-decreasing values starting at 0",
                self.world + 1
            )));
        }
        let global = self.try_global_batch_indices(step, offsets[self.world])?;
        Ok(global[offsets[self.rank]..offsets[self.rank + 1]].to_vec())
    }

    /// [`Self::try_new`] for arguments already known to be valid.
    ///
    /// # Panics
    /// If `n == 0` or `rank >= world`; use [`Self::try_new`] to get an error instead.
    pub fn new(n: usize, world: usize, rank: usize, seed: u64, drop_last: bool) -> Self {
        Self::try_new(n, world, rank, seed, drop_last).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::try_global_batch_indices`].
    ///
    /// # Panics
    /// If `global_batch` is 0 or larger than the data set; check it once with
    /// [`Self::steps_per_epoch`] first.
    pub fn global_batch_indices(&self, step: u64, global_batch: usize) -> Vec<usize> {
        self.try_global_batch_indices(step, global_batch).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::try_batch_indices`]: this rank's rows `[rank*local_batch, (rank+1)*local_batch)`
    /// of the global batch of `step`.
    ///
    /// # Panics
    /// If `global_batch != world * local_batch`, or `global_batch` is 0 or larger than the data
    /// set; check once with [`Self::steps_per_epoch`] (or call the `try_` form).
    pub fn batch_indices(&self, step: u64, local_batch: usize, global_batch: usize) -> Vec<usize> {
        self.try_batch_indices(step, local_batch, global_batch).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::try_batch_indices_uneven`].
    ///
    /// # Panics
    /// On malformed `offsets` or a global batch that does not fit the data set.
    pub fn batch_indices_uneven(&self, step: u64, offsets: &[usize]) -> Vec<usize> {
        self.try_batch_indices_uneven(step, offsets).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Row range [offset, offset + len) of the global batch that `rank` computes: the remainder of
/// an uneven split goes to the lowest ranks.
pub fn local_rows(global: usize, world: usize, rank: usize) -> (usize, usize) {
    let base = global / world;
    let extra = global % world;
    let len = base + usize::from(rank < extra);
    let offset = rank * base + rank.min(extra);
    (offset, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samplers(n: usize, world: usize, drop_last: bool) -> Vec<DistributedSampler> {
        (0..world)
            .map(|r| DistributedSampler::try_new(n, world, r, 42, drop_last).unwrap())
            .collect()
    }

    #[test]
    fn epoch_shares_are_disjoint_and_cover() {
        let n = 103;
        let s = samplers(n, 4, true);
        for epoch in 0..3 {
            let mut all: Vec<usize> = s.iter().flat_map(|x| x.epoch_indices(epoch)).collect();
            assert_eq!(all.len(), 4 * (n / 4));
            all.sort();
            all.dedup();
            assert_eq!(all.len(), 4 * (n / 4), "ranks overlap");
            assert!(all.iter().all(|&i| i < n));
        }
        // Without drop_last, every row is covered and each rank has the same count.
        let s = samplers(n, 4, false);
        let parts: Vec<Vec<usize>> = s.iter().map(|x| x.epoch_indices(1)).collect();
        assert!(parts.iter().all(|p| p.len() == 26));
        let mut all: Vec<usize> = parts.concat();
        all.sort();
        all.dedup();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn deterministic_and_fresh_each_epoch() {
        let a = DistributedSampler::try_new(50, 2, 1, 9, true).unwrap();
        let b = DistributedSampler::try_new(50, 2, 1, 9, true).unwrap();
        assert_eq!(a.epoch_indices(3), b.epoch_indices(3));
        assert_eq!(
            a.clone().try_batch_indices(7, 5, 10).unwrap(),
            b.try_batch_indices(7, 5, 10).unwrap()
        );
        assert_ne!(a.epoch_indices(0), a.epoch_indices(1));
        let c = DistributedSampler::try_new(50, 2, 1, 10, true).unwrap();
        assert_ne!(a.epoch_indices(0), c.epoch_indices(0));
        // The permutation is a permutation.
        let mut p = a.permutation(5).to_vec();
        p.sort();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn n_ranks_see_the_global_batch_of_one_rank() {
        let (n, world, b) = (1000, 4, 24);
        let many = samplers(n, world, true);
        let one = DistributedSampler::try_new(n, 1, 0, 42, true).unwrap();
        // 1000 / 96 = 10 steps per epoch: steps 0..35 cross three epoch boundaries.
        for step in 0..35u64 {
            let joined: Vec<usize> = many
                .iter()
                .flat_map(|s| s.try_batch_indices(step, b, world * b).unwrap())
                .collect();
            assert_eq!(
                joined,
                one.try_batch_indices(step, world * b, world * b).unwrap(),
                "step {step}"
            );
            let mut uniq = joined.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), world * b, "duplicate rows in step {step}");
        }
        // An epoch's steps use each row at most once and only drop the tail.
        let mut seen: Vec<usize> =
            (0..10).flat_map(|s| one.try_global_batch_indices(s, 96).unwrap()).collect();
        assert_eq!(seen.len(), 960);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 960);
        assert_eq!(
            one.try_global_batch_indices(10, 96).unwrap(),
            one.permutation(1)[..96].to_vec()
        );
    }

    #[test]
    fn uneven_batches_join_to_the_same_global_batch() {
        let offsets = [0, 5, 5, 17];
        let parts: Vec<Vec<usize>> = (0..3)
            .map(|r| {
                DistributedSampler::try_new(200, 3, r, 1, true)
                    .unwrap()
                    .try_batch_indices_uneven(4, &offsets)
                    .unwrap()
            })
            .collect();
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![5, 0, 12]);
        let one = DistributedSampler::try_new(200, 1, 0, 1, true).unwrap();
        assert_eq!(parts.concat(), one.try_global_batch_indices(4, 17).unwrap());
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(DistributedSampler::try_new(10, 2, 2, 0, true).is_err());
        assert!(DistributedSampler::try_new(10, 0, 0, 0, true).is_err());
        assert!(DistributedSampler::try_new(0, 1, 0, 0, true).is_err());
        let s = DistributedSampler::try_new(10, 2, 0, 0, true).unwrap();
        let e = s.try_batch_indices(0, 8, 16).unwrap_err().to_string();
        assert!(e.contains("batch.global = 16") && e.contains("larger than the data set"), "{e}");
        assert!(s.try_batch_indices(0, 3, 7).unwrap_err().to_string().contains("multiple"));
        assert!(s.try_batch_indices_uneven(0, &[0, 3]).is_err());
        assert!(s.try_batch_indices_uneven(0, &[0, 3, 2]).is_err());
        assert!(s.try_batch_indices(0, 0, 0).is_err());
    }

    #[test]
    fn infallible_forms_match_and_panic_with_the_message() {
        let s = DistributedSampler::new(100, 2, 1, 3, true);
        assert_eq!(s.batch_indices(5, 10, 20), s.try_batch_indices(5, 10, 20).unwrap());
        assert_eq!(
            s.batch_indices_uneven(5, &[0, 4, 20]),
            s.try_batch_indices_uneven(5, &[0, 4, 20]).unwrap()
        );
        assert_eq!(s.global_batch_indices(5, 20), s.try_global_batch_indices(5, 20).unwrap());
        let e = std::panic::catch_unwind(|| s.batch_indices(0, 100, 200)).unwrap_err();
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("batch.global = 200"), "{msg}");
    }

    #[test]
    fn local_rows_cover_the_batch() {
        for world in 1..6 {
            for global in world..40 {
                let mut next = 0;
                for r in 0..world {
                    let (off, len) = local_rows(global, world, r);
                    assert_eq!(off, next);
                    assert!(len >= global / world && len <= global / world + 1);
                    next += len;
                }
                assert_eq!(next, global);
            }
        }
    }
}
