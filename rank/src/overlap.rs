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
/// reports its slices final: only the elements inside `spans` (the trainable tensors' ranges; a
/// frozen tower's zeros are not sent, as DDP leaves parameters without `requires_grad` out of
/// its buckets). Adjacent slices are gathered into one bucket until it holds `bucket_elems`
/// elements (or a slice that does not touch it arrives), and [`BucketPlan::finish`] covers the
/// rest of the spans in ascending buckets. Every element of a span is in exactly one bucket, and
/// no other element is in any. The slice holding element 0 is left to `finish` (fault
/// injection poisons element 0 after the backward). Shared by the host buckets ([`Buckets`])
/// and the GPU's (NCCL on the communication stream).
#[derive(Clone, Debug)]
pub struct BucketPlan {
    total: usize,
    /// The ranges to reduce: ascending, disjoint, non-empty, inside `0..total`.
    spans: Vec<Range<usize>>,
    bucket_elems: usize,
    /// The bucket being filled.
    open: Option<Range<usize>>,
    /// Buckets handed out so far.
    sent: Vec<Range<usize>>,
}

impl BucketPlan {
    /// A plan for the elements in `spans` of a buffer of `total` f32 values (`[0..total]` for
    /// all of it), in buckets of `bucket_bytes` (at least one element). The spans are clipped
    /// to the buffer, sorted and merged where they touch or overlap.
    pub fn new(total: usize, spans: &[Range<usize>], bucket_bytes: usize) -> Self {
        let mut sorted: Vec<Range<usize>> = spans
            .iter()
            .map(|r| r.start.min(total)..r.end.min(total))
            .filter(|r| !r.is_empty())
            .collect();
        sorted.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        BucketPlan {
            total,
            spans: merged,
            bucket_elems: (bucket_bytes / 4).max(1),
            open: None,
            sent: Vec::new(),
        }
    }

    /// The ranges reduced (the plan's spans, normalized).
    pub fn spans(&self) -> &[Range<usize>] {
        &self.spans
    }

    /// How many elements the buckets cover in all.
    pub fn reduced_len(&self) -> usize {
        self.spans.iter().map(|r| r.len()).sum()
    }

    /// The parts of elements `offset..offset + len` that `ready` takes: those inside a span,
    /// unless the slice holds element 0 or runs past the end (then none).
    pub fn inside(&self, offset: usize, len: usize) -> Vec<Range<usize>> {
        let end = offset.saturating_add(len);
        if len == 0 || offset == 0 || end > self.total {
            return Vec::new();
        }
        self.spans
            .iter()
            .map(|s| s.start.max(offset)..s.end.min(end))
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// Reports elements `offset..offset + len` final; returns the buckets complete now, in the
    /// order to reduce them.
    pub fn ready(&mut self, offset: usize, len: usize) -> Vec<Range<usize>> {
        let pieces = self.inside(offset, len);
        self.ready_pieces(&pieces)
    }

    /// [`BucketPlan::ready`] of a slice whose [`BucketPlan::inside`] the caller has already
    /// computed (`pieces`).
    pub fn ready_pieces(&mut self, pieces: &[Range<usize>]) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        for piece in pieces {
            self.take_piece(piece.clone(), &mut out);
        }
        out
    }

    fn take_piece(&mut self, piece: Range<usize>, out: &mut Vec<Range<usize>>) {
        match self.open.take() {
            Some(r) if piece.end == r.start || piece.start == r.end => {
                self.open = Some(r.start.min(piece.start)..r.end.max(piece.end));
            }
            other => {
                out.extend(other.map(|r| self.hand_out(r)));
                self.open = Some(piece);
            }
        }
        if self.open.as_ref().is_some_and(|r| r.len() >= self.bucket_elems) {
            let r = self.open.take().expect("checked just above");
            out.push(self.hand_out(r));
        }
    }

    fn hand_out(&mut self, r: Range<usize>) -> Range<usize> {
        self.sent.push(r.clone());
        r
    }

    /// The buckets left: the one being filled, then every element of the spans not handed out
    /// yet, in ascending buckets of at most `bucket_elems`. The plan is empty afterwards.
    pub fn finish(&mut self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        if let Some(r) = self.open.take() {
            out.push(self.hand_out(r));
        }
        let mut sent = std::mem::take(&mut self.sent);
        sent.sort_unstable_by_key(|r| r.start);
        let mut gaps = Vec::new();
        let mut sent = sent.into_iter().peekable();
        for span in &self.spans {
            // Every bucket lies inside one span.
            let mut at = span.start;
            while let Some(r) = sent.next_if(|r| r.start < span.end) {
                if r.start > at {
                    gaps.push(at..r.start);
                }
                at = at.max(r.end);
            }
            if at < span.end {
                gaps.push(at..span.end);
            }
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
        let inside = self.plan.inside(offset, grads.len());
        for r in &inside {
            self.pieces.push((r.start, grads[r.start - offset..r.end - offset].to_vec()));
        }
        let due = self.plan.ready_pieces(&inside);
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
/// [`Buckets::finish`] on the whole local buffer of `total` elements. Only the elements in
/// `spans` are reduced (see [`BucketPlan`]). Returns `work`'s result and the reduced buffer:
/// inside the spans bitwise equal to `all_reduce_f32` of the final local buffer, zero outside.
///
/// Collective: every rank must report the same slices in the same order (they come from the
/// model's layer order) with the same `spans` and `bucket_bytes`.
pub fn all_reduce_overlapped<R>(
    comm: &mut dyn Communicator,
    total: usize,
    spans: &[Range<usize>],
    bucket_bytes: usize,
    work: impl FnOnce(&mut Buckets) -> R,
) -> Result<(R, Vec<f32>), CommError> {
    let (tx, rx) = mpsc::channel::<(usize, Vec<f32>)>();
    let plan = BucketPlan::new(total, spans, bucket_bytes);
    let want = plan.reduced_len();
    let mut buckets = Buckets { tx: Some(tx), plan, pieces: Vec::new() };
    let (out, reduced) = std::thread::scope(|s| {
        let h = s.spawn(move || -> Result<Vec<f32>, CommError> {
            let mut reduced = vec![0.0f32; total];
            let mut covered = 0usize;
            for (offset, mut v) in rx {
                comm.all_reduce_f32_part(&mut v, offset, total, ReduceOp::Sum)?;
                reduced[offset..offset + v.len()].copy_from_slice(&v);
                covered += v.len();
            }
            if covered != want {
                return Err(CommError::InvalidArgument {
                    op: "all_reduce_overlapped",
                    detail: format!(
                        "the buckets covered {covered} of the {want} gradient values to reduce: \
                         the backward must end with Buckets::finish on the whole buffer"
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
            let outs = ThreadComm::run_group(3, |r, c| {
                let mut local: Vec<f32> = (0..total).map(|i| val(r, i)).collect();
                let whole = 0..total;
                let ((), got) = all_reduce_overlapped(
                    c,
                    total,
                    std::slice::from_ref(&whole),
                    bucket_bytes,
                    |b| {
                        for &(a, e) in &ranges {
                            b.ready(a, &local[a..e]);
                        }
                        // Changed after its report: element 0 is read at finish.
                        local[0] = 5.0;
                        b.finish(&local);
                    },
                )
                .expect("overlapped");
                let mut want = local.clone();
                c.all_reduce_f32(&mut want, ReduceOp::Sum).expect("all_reduce");
                (got, want)
            });
            for (got, want) in &outs {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(want), "bucket {bucket_bytes} bytes");
                assert_eq!(got[0], 15.0);
            }
        }
    }

    /// How many of the (non-empty) `buckets` hold each of `total` elements.
    fn times_covered<'a>(total: usize, buckets: impl Iterator<Item = &'a Range<usize>>) -> Vec<u8> {
        let mut seen = vec![0u8; total];
        for r in buckets {
            assert!(!r.is_empty(), "an empty bucket");
            for i in r.clone() {
                seen[i] += 1;
            }
        }
        seen
    }

    /// Every element lands in exactly one bucket, no bucket outgrows the limit unless one slice
    /// alone does, the slice at element 0 waits for `finish`, and buckets fill in report order.
    #[test]
    fn plan_covers_every_element_once() {
        let total = 1_000;
        // A tower's units from the top, then a second tower, then a slice out of range.
        let reports = [(900usize, 100usize), (850, 50), (840, 10), (0, 10), (10, 300), (310, 530)];
        for bucket_bytes in [4usize, 200, 400, 4_000, 1 << 20] {
            let mut plan = BucketPlan::new(total, std::slice::from_ref(&(0..total)), bucket_bytes);
            let elems = (bucket_bytes / 4).max(1);
            let mut during = Vec::new();
            for &(o, n) in &reports {
                during.extend(plan.ready(o, n));
            }
            assert!(plan.ready(990, 20).is_empty(), "a slice past the end is ignored");
            assert!(during.iter().all(|r| r.start > 0), "element 0 waits: {during:?}");
            let rest = plan.finish();
            let seen = times_covered(total, during.iter().chain(&rest));
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

    /// Spans leave frozen ranges out (element 0's among them, and a gap between two spans):
    /// slices across a span's edge are cut at it, a slice wholly outside is ignored, every
    /// element of a span is in exactly one bucket inside that span, and none outside is in any.
    #[test]
    fn plan_over_spans_covers_the_spans_only() {
        let total = 1_000;
        let spans = [600..1_000, 100..300, 290..320, 550..600];
        // Normalized: sorted, overlapping and touching spans merged.
        let want_spans = [100..320, 550..1_000];
        let reports = [(900usize, 100usize), (500, 400), (330, 100), (250, 150), (1, 99), (0, 50)];
        for bucket_bytes in [4usize, 200, 800, 1 << 20] {
            let mut plan = BucketPlan::new(total, &spans, bucket_bytes);
            assert_eq!(plan.spans(), &want_spans[..]);
            assert_eq!(plan.reduced_len(), 220 + 450);
            assert_eq!(plan.inside(330, 100), Vec::<Range<usize>>::new(), "wholly frozen");
            assert_eq!(plan.inside(250, 350), vec![250..320, 550..600], "cut at the edges");
            let mut during = Vec::new();
            for &(o, n) in &reports {
                during.extend(plan.ready(o, n));
            }
            let rest = plan.finish();
            for r in during.iter().chain(&rest) {
                assert!(
                    want_spans.iter().any(|s| s.start <= r.start && r.end <= s.end),
                    "bucket {r:?} leaves its span at {bucket_bytes}"
                );
            }
            let seen = times_covered(total, during.iter().chain(&rest));
            for (i, &c) in seen.iter().enumerate() {
                let reduced = want_spans.iter().any(|s| s.contains(&i));
                assert_eq!(c, u8::from(reduced), "element {i} at {bucket_bytes}");
            }
            if bucket_bytes == 1 << 20 {
                // 900..1000 and 550..900 join (500..550 is frozen); 250..320 is not adjacent.
                assert_eq!(during, vec![550..1_000]);
                assert_eq!(rest, vec![250..320, 100..250]);
            }
        }
    }

    /// With spans, the buckets reduce bitwise what the whole-buffer all-reduce gives inside
    /// them, and leave the rest zero however large the frozen ranges' local values are: they
    /// are never sent.
    #[test]
    fn buckets_over_spans_reduce_the_spans_only() {
        let total = 600;
        let spans = [1..200, 260..590];
        for bucket_bytes in [4usize, 256, 1 << 20] {
            let outs = ThreadComm::run_group(3, |r, c| {
                let local: Vec<f32> = (0..total).map(|i| val(r, i)).collect();
                let ((), got) = all_reduce_overlapped(c, total, &spans, bucket_bytes, |b| {
                    for a in (0..total).step_by(50).rev() {
                        b.ready(a, &local[a..a + 50]);
                    }
                    b.finish(&local);
                })
                .expect("overlapped");
                let mut want = local.clone();
                c.all_reduce_f32(&mut want, ReduceOp::Sum).expect("all_reduce");
                (got, want)
            });
            for (got, want) in &outs {
                for i in 0..total {
                    let expect = if spans.iter().any(|s| s.contains(&i)) { want[i] } else { 0.0 };
                    assert_eq!(got[i].to_bits(), expect.to_bits(), "{i} at {bucket_bytes}");
                }
            }
        }
    }

    /// Forgetting `finish` is an error naming it, not a hang.
    #[test]
    fn missing_finish_is_an_error() {
        let mut c = ThreadComm::group(1).pop().expect("one rank");
        let e = all_reduce_overlapped(&mut c, 10, std::slice::from_ref(&(0..10)), 16, |b| {
            b.ready(4, &[1.0; 6])
        })
        .expect_err("not covered");
        assert!(e.to_string().contains("Buckets::finish"), "{e}");
    }
}
