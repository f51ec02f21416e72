//! The gradient all-reduce overlapped with the backward pass (as PyTorch DDP does with
//! gradient accumulation): while the last micro-batch's backward runs, the gradient slices it
//! has finished (top layers first) are gathered into buckets and all-reduced on a
//! communication thread.
//!
//! Each bucket is reduced with [`Communicator::all_reduce_f32_part`], which sums every element
//! in the order of one all-reduce over the whole buffer: with the TCP ring and the thread
//! communicator the reduced gradient is bitwise identical to the unbucketed all-reduce at any
//! world size and any bucket size. NCCL's all-reduce picks its own order per call, so over
//! NCCL (the trait's default `all_reduce_f32_part`) that holds only up to two ranks.
//!
//! The local gradient buffer is never modified here: buckets are copies. The caller keeps the
//! local (pre-reduction) gradient for the noise-scale estimator and the NaN check and takes the
//! reduced buffer afterwards.

use std::ops::Range;
use std::sync::mpsc;

use tessera_collectives::{CommError, Communicator, ReduceOp};

/// Which parts of a flat gradient of `total` elements to all-reduce, and when, as a backward
/// reports its slices final: adjacent slices are gathered into one bucket until it holds
/// `bucket_elems` elements (or a slice that does not touch it arrives), and
/// [`BucketPlan::finish`] covers the rest in ascending buckets. Every element is in exactly one
/// bucket. The slice holding element 0 is left to `finish` (fault injection poisons element 0
/// after the backward). Shared by the host buckets ([`Buckets`]) and the GPU's (NCCL on the
/// communication stream).
#[derive(Clone, Debug)]
pub struct BucketPlan {
    total: usize,
    bucket_elems: usize,
    /// The bucket being filled.
    open: Option<Range<usize>>,
    /// Buckets handed out so far.
    sent: Vec<Range<usize>>,
}

impl BucketPlan {
    /// A plan for a buffer of `total` f32 values in buckets of `bucket_bytes` (at least one
    /// element).
    pub fn new(total: usize, bucket_bytes: usize) -> Self {
        BucketPlan { total, bucket_elems: (bucket_bytes / 4).max(1), open: None, sent: Vec::new() }
    }

    /// Reports elements `offset..offset + len` final; returns the buckets complete now, in the
    /// order to reduce them.
    pub fn ready(&mut self, offset: usize, len: usize) -> Vec<Range<usize>> {
        let end = offset + len;
        let mut out = Vec::new();
        if len == 0 || offset == 0 || end > self.total {
            return out;
        }
        match self.open.take() {
            Some(r) if end == r.start || offset == r.end => {
                self.open = Some(r.start.min(offset)..r.end.max(end));
            }
            other => {
                out.extend(other.map(|r| self.hand_out(r)));
                self.open = Some(offset..end);
            }
        }
        if self.open.as_ref().is_some_and(|r| r.len() >= self.bucket_elems) {
            let r = self.open.take().expect("checked just above");
            out.push(self.hand_out(r));
        }
        out
    }

    fn hand_out(&mut self, r: Range<usize>) -> Range<usize> {
        self.sent.push(r.clone());
        r
    }

    /// The buckets left: the one being filled, then every element not handed out yet, in
    /// ascending buckets of at most `bucket_elems`. The plan is empty afterwards.
    pub fn finish(&mut self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        if let Some(r) = self.open.take() {
            out.push(self.hand_out(r));
        }
        let mut sent = std::mem::take(&mut self.sent);
        sent.sort_unstable_by_key(|r| r.start);
        let mut at = 0;
        let mut gaps = Vec::new();
        for r in sent {
            if r.start > at {
                gaps.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < self.total {
            gaps.push(at..self.total);
        }
        for g in gaps {
            for s in g.clone().step_by(self.bucket_elems) {
                out.push(s..(s + self.bucket_elems).min(g.end));
            }
        }
        out
    }
}

/// Collects the gradient slices reported final into buckets and hands full buckets to the
/// communication thread (see [`all_reduce_overlapped`]).
pub struct Buckets {
    tx: Option<mpsc::Sender<(usize, Vec<f32>)>>,
    plan: BucketPlan,
    /// Copies of the slices reported and not sent yet.
    pieces: Vec<(usize, Vec<f32>)>,
}

impl Buckets {
    /// Reports `grads` (elements `offset..offset + grads.len()` of the buffer) final. The slice
    /// holding element 0 is kept back until [`Buckets::finish`], which reads it then (fault
    /// injection poisons element 0 after the backward).
    pub fn ready(&mut self, offset: usize, grads: &[f32]) {
        let due = self.plan.ready(offset, grads.len());
        if offset > 0 && offset + grads.len() <= self.plan.total && !grads.is_empty() {
            self.pieces.push((offset, grads.to_vec()));
        }
        for r in due {
            let (mut inside, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.pieces).into_iter().partition(|p| r.contains(&p.0));
            self.pieces = rest;
            inside.sort_by_key(|p| p.0);
            let mut bucket = Vec::with_capacity(r.len());
            for (_, p) in inside {
                bucket.extend_from_slice(&p);
            }
            debug_assert_eq!(bucket.len(), r.len(), "the pieces of bucket {r:?}");
            self.send(r.start, bucket);
        }
    }

    fn send(&mut self, offset: usize, bucket: Vec<f32>) {
        if let Some(tx) = &self.tx {
            // A closed channel means the communication thread failed: its error is returned.
            let _ = tx.send((offset, bucket));
        }
    }

    /// Sends everything not sent yet, read from `grads` (the whole local buffer, final), in
    /// ascending order, then closes the queue.
    pub fn finish(&mut self, grads: &[f32]) {
        self.pieces.clear();
        for r in self.plan.finish() {
            self.send(r.start, grads[r].to_vec());
        }
        self.tx = None;
    }
}

/// Runs `work` on this thread while a communication thread all-reduces (sum) the gradient
/// buckets that `work` reports through [`Buckets::ready`]; `work` must end with
/// [`Buckets::finish`] on the whole local buffer of `total` elements. Returns `work`'s result
/// and the reduced buffer, bitwise equal to `all_reduce_f32` of the final local buffer.
///
/// Collective: every rank must report the same slices in the same order (they come from the
/// model's layer order) with the same `bucket_bytes`.
pub fn all_reduce_overlapped<R>(
    comm: &mut dyn Communicator,
    total: usize,
    bucket_bytes: usize,
    work: impl FnOnce(&mut Buckets) -> R,
) -> Result<(R, Vec<f32>), CommError> {
    let (tx, rx) = mpsc::channel::<(usize, Vec<f32>)>();
    let mut buckets =
        Buckets { tx: Some(tx), plan: BucketPlan::new(total, bucket_bytes), pieces: Vec::new() };
    let (out, reduced) = std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<Vec<f32>, CommError> {
            let mut reduced = vec![0.0f32; total];
            let mut covered = 0usize;
            for (offset, mut v) in rx {
                comm.all_reduce_f32_part(&mut v, offset, total, ReduceOp::Sum)?;
                reduced[offset..offset + v.len()].copy_from_slice(&v);
                covered += v.len();
            }
            if covered != total {
                return Err(CommError::InvalidArgument {
                    op: "all_reduce_overlapped",
                    detail: format!(
                        "the buckets covered {covered} of {total} gradient values: the backward \
                         must end with Buckets::finish on the whole buffer"
                    ),
                });
            }
            Ok(reduced)
        });
        let out = work(&mut buckets);
        // Closes the queue even when `work` forgot `finish` (then the check above fails).
        buckets.tx = None;
        (out, h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    Ok((out, reduced?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_collectives::threads::ThreadComm;

    fn val(rank: usize, i: usize) -> f32 {
        ((rank * 7919 + i * 104_729) % 10_007) as f32 * 0.013 - 60.0
    }

    /// Slices reported out of order, adjacent and not, element 0 held back and read at the
    /// end, tiny and large buckets: the reduced buffer equals the plain all-reduce bitwise.
    #[test]
    fn buckets_equal_the_plain_all_reduce() {
        let total = 1_000;
        let ranges = [(700usize, 1_000usize), (400, 700), (10, 400), (0, 10)];
        for bucket_bytes in [4usize, 40, 1_200, 1 << 20] {
            let outs: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
                let hs: Vec<_> = ThreadComm::group(3)
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut c)| {
                        s.spawn(move || {
                            let mut local: Vec<f32> = (0..total).map(|i| val(r, i)).collect();
                            let ((), got) =
                                all_reduce_overlapped(&mut c, total, bucket_bytes, |b| {
                                    for &(a, e) in &ranges {
                                        b.ready(a, &local[a..e]);
                                    }
                                    // Changed after its report: element 0 is read at finish.
                                    local[0] = 5.0;
                                    b.finish(&local);
                                })
                                .expect("overlapped");
                            let mut want = local.clone();
                            c.all_reduce_f32(&mut want, ReduceOp::Sum).expect("all_reduce");
                            (got, want)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("rank")).collect()
            });
            for (got, want) in &outs {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(want), "bucket {bucket_bytes} bytes");
                assert_eq!(got[0], 15.0);
            }
        }
    }

    /// Every element lands in exactly one bucket, no bucket outgrows the limit unless one slice
    /// alone does, the slice at element 0 waits for `finish`, and buckets fill in report order.
    #[test]
    fn plan_covers_every_element_once() {
        let total = 1_000;
        // A tower's units from the top, then a second tower, then a slice out of range.
        let reports = [(900usize, 100usize), (850, 50), (840, 10), (0, 10), (10, 300), (310, 530)];
        for bucket_bytes in [4usize, 200, 400, 4_000, 1 << 20] {
            let mut plan = BucketPlan::new(total, bucket_bytes);
            let elems = (bucket_bytes / 4).max(1);
            let mut during = Vec::new();
            for &(o, n) in &reports {
                during.extend(plan.ready(o, n));
            }
            assert!(plan.ready(990, 20).is_empty(), "a slice past the end is ignored");
            assert!(during.iter().all(|r| r.start > 0), "element 0 waits: {during:?}");
            let rest = plan.finish();
            let mut seen = vec![0u8; total];
            for r in during.iter().chain(&rest) {
                assert!(!r.is_empty());
                for i in r.clone() {
                    seen[i] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "bucket {bucket_bytes}: {during:?} {rest:?}");
            let largest = reports.iter().map(|r| r.1).max().unwrap_or(0);
            for r in during.iter().chain(&rest) {
                // A bucket closes at the slice that takes it to the limit.
                assert!(r.len() < elems + largest, "{r:?} at {bucket_bytes}");
            }
            if bucket_bytes == 400 {
                // 100 elements: the top slice fills one alone; 850..900 and 840..850 join and
                // leave when 10..310, not adjacent, arrives (and fills its own); 0..10 waits.
                assert_eq!(during, vec![900..1_000, 840..900, 10..310, 310..840]);
                assert_eq!(rest, vec![0..10]);
            }
            if bucket_bytes == 1 << 20 {
                // One bucket never fills: the adjacent slices travel together, the rest at the
                // end.
                assert_eq!(during, vec![840..1_000]);
                assert_eq!(rest, vec![10..840, 0..10]);
            }
        }
    }

    /// Forgetting `finish` is an error naming it, not a hang.
    #[test]
    fn missing_finish_is_an_error() {
        let mut c = ThreadComm::group(1).pop().expect("one rank");
        let e = all_reduce_overlapped(&mut c, 10, 16, |b| b.ready(4, &[1.0; 6]))
            .expect_err("not covered");
        assert!(e.to_string().contains("Buckets::finish"), "{e}");
    }
}
