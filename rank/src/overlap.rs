//! The gradient all-reduce overlapped with the backward pass (as PyTorch DDP does with
//! gradient accumulation): while the last micro-batch's backward runs, the gradient slices it
//! has finished (top layers first) are gathered into buckets and all-reduced on a
//! communication thread.
//!
//! Each bucket is reduced with [`Communicator::all_reduce_f32_part`], which sums every element
//! in the order of one all-reduce over the whole buffer: the reduced gradient is bitwise
//! identical to the unbucketed all-reduce at any world size and any bucket size.
//!
//! The local gradient buffer is never modified here: buckets are copies. The caller keeps the
//! local (pre-reduction) gradient for the noise-scale estimator and the NaN check and takes the
//! reduced buffer afterwards.

use std::sync::mpsc;

use tessera_collectives::{CommError, Communicator, ReduceOp};

/// Collects the gradient slices reported final into buckets and hands full buckets to the
/// communication thread (see [`all_reduce_overlapped`]).
pub struct Buckets {
    tx: Option<mpsc::Sender<(usize, Vec<f32>)>>,
    total: usize,
    bucket_elems: usize,
    /// The bucket being filled: contiguous pieces covering `lo..hi`.
    pieces: Vec<(usize, Vec<f32>)>,
    lo: usize,
    hi: usize,
    /// Ranges handed to the communication thread, to send the rest at [`Buckets::finish`].
    sent: Vec<(usize, usize)>,
}

impl Buckets {
    /// Reports `grads` (elements `offset..offset + grads.len()` of the buffer) final. The slice
    /// holding element 0 is kept back until [`Buckets::finish`], which reads it then (fault
    /// injection poisons element 0 after the backward).
    pub fn ready(&mut self, offset: usize, grads: &[f32]) {
        let end = offset + grads.len();
        if grads.is_empty() || offset == 0 || end > self.total {
            return;
        }
        let adjacent = !self.pieces.is_empty() && (end == self.lo || offset == self.hi);
        if !adjacent {
            self.flush();
            self.lo = offset;
            self.hi = end;
        } else {
            self.lo = self.lo.min(offset);
            self.hi = self.hi.max(end);
        }
        self.pieces.push((offset, grads.to_vec()));
        if self.hi - self.lo >= self.bucket_elems {
            self.flush();
        }
    }

    /// Sends the bucket being filled.
    fn flush(&mut self) {
        if self.pieces.is_empty() {
            return;
        }
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.sort_by_key(|p| p.0);
        let mut bucket = Vec::with_capacity(self.hi - self.lo);
        for (_, p) in pieces {
            bucket.extend_from_slice(&p);
        }
        self.send(self.lo, bucket);
    }

    fn send(&mut self, offset: usize, bucket: Vec<f32>) {
        self.sent.push((offset, offset + bucket.len()));
        if let Some(tx) = &self.tx {
            // A closed channel means the communication thread failed: its error is returned.
            let _ = tx.send((offset, bucket));
        }
    }

    /// Sends everything not sent yet, read from `grads` (the whole local buffer, final), in
    /// ascending order, then closes the queue.
    pub fn finish(&mut self, grads: &[f32]) {
        self.flush();
        let mut sent = std::mem::take(&mut self.sent);
        sent.sort_unstable();
        let mut at = 0;
        let mut gaps = Vec::new();
        for (a, b) in sent {
            if a > at {
                gaps.push((at, a));
            }
            at = at.max(b);
        }
        if at < self.total {
            gaps.push((at, self.total));
        }
        for (a, b) in gaps {
            for s in (a..b).step_by(self.bucket_elems) {
                let e = (s + self.bucket_elems).min(b);
                self.send(s, grads[s..e].to_vec());
            }
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
    let mut buckets = Buckets {
        tx: Some(tx),
        total,
        bucket_elems: (bucket_bytes / 4).max(1),
        pieces: Vec::new(),
        lo: 0,
        hi: 0,
        sent: Vec::new(),
    };
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

    /// Forgetting `finish` is an error naming it, not a hang.
    #[test]
    fn missing_finish_is_an_error() {
        let mut c = ThreadComm::group(1).pop().expect("one rank");
        let e = all_reduce_overlapped(&mut c, 10, 16, |b| b.ready(4, &[1.0; 6]))
            .expect_err("not covered");
        assert!(e.to_string().contains("Buckets::finish"), "{e}");
    }
}
