//! The contrastive rings' rounds (CLIP's two passes, SigLIP's one) on a device whose
//! communicator moves the device's own buffers (NCCL send/recv between GPU memory): a block's
//! features, its column LSEs and the accumulators never pass through the host. [`super::ring`]'s `ring_drive` is the host-message twin; both
//! follow the schedule of [`Hop`].
//!
//! # Streams
//! A [`DeviceRing`] has two queues, as a GPU has a compute stream and NCCL's stream. Step `k`
//! on rank `r`, holding block `q`:
//! 1. `exchange`: block `q` (features and extras) and the accumulator of block `q + 1`
//!    (`done`, computed at step `k − 1`) go to rank `r + 1`; block `q − 1` and the accumulator
//!    of block `q` (`incoming`) arrive from rank `r − 1`. Queued after every block work queued
//!    so far, so the buffers it receives into are no longer read and what it sends is final.
//! 2. the block work on block `q` into `partial`, overlapping the exchange: it reads what the
//!    exchange reads, and writes a buffer the exchange does not touch (`partial` last travelled
//!    in the exchange of step `k − 1`, which the block work waited for);
//! 3. `exchange_wait`: the block work queued after it waits for the exchange; the host waits
//!    too, with the communicator's watchdog, so a dead peer fails the call instead of hanging.
//!    It runs even when the block work failed, before the error returns: the hop uses this
//!    call's buffers;
//! 4. `partial ⊕= incoming` (column statistics merged, or `∂L/∂T` added), then the buffers
//!    rotate: `next` becomes `cur`, `partial` becomes `done`.
//!
//! After the last step one more exchange brings each accumulator home.
//!
//! # Messages
//! Three parts per hop in a fixed order (features, extras, accumulator), each as f32 values,
//! parts of no values left out on both sides: every length follows from the sizes, so both
//! sides agree without announcing them. The backward's extras are a block's column LSEs as
//! f32 pairs (`[hi; nb]` then `[lo; nb]`, hi + lo = κ), the split the kernels read.

use super::ring::{Hop, LossError, split_hi_lo};

/// The device side of the CLIP ring (see the module documentation): buffers, the two queues,
/// and the block work of [`super::ClipBlocks`] on device buffers.
pub trait DeviceRing {
    /// A device buffer of f32 values.
    type Buf;

    /// This rank and the number of ranks on the ring.
    fn rank(&self) -> usize;
    fn world(&self) -> usize;

    /// A buffer of at least `len` values (at least one); its contents are unspecified.
    fn alloc(&mut self, len: usize) -> Result<Self::Buf, LossError>;

    /// Values `buf` holds.
    fn capacity(buf: &Self::Buf) -> usize;

    /// Host values into the start of `dst`, queued on the block work's queue.
    fn upload(&mut self, src: &[f32], dst: &mut Self::Buf) -> Result<(), LossError>;

    /// The first `dst.len()` values of `src` to the host, after the block work queued so far
    /// and the last exchange waited for; returns when they are there.
    fn download(&mut self, src: &Self::Buf, dst: &mut [f32]) -> Result<(), LossError>;

    /// Queues one hop: the first `n` values of each `send` part go to rank r+1, each `recv`
    /// part's first `n` values come from rank r−1, parts in order and those of 0 values left
    /// out. Ordered after the block work queued so far.
    fn exchange(
        &mut self,
        send: [(&Self::Buf, usize); 3],
        recv: [(&mut Self::Buf, usize); 3],
    ) -> Result<(), LossError>;

    /// Block work queued from now on waits for the last exchange; returns when it is complete
    /// (an error when it fails or the watchdog's timeout passes).
    fn exchange_wait(&mut self) -> Result<(), LossError>;

    /// Forward over the block of `nb` rows in `feat`, first row at global column `col0`, as
    /// [`super::ClipBlocks::fwd_block`]: its column statistics into `cols` (`[m; nb]` then `[z; nb]`).
    fn fwd_block(
        &mut self,
        feat: &Self::Buf,
        nb: usize,
        col0: usize,
        cols: &mut Self::Buf,
    ) -> Result<(), LossError>;

    /// Backward over the block, as [`ClipBlocks::bwd_block`], with its column LSEs `kap` as
    /// f32 pairs (`[hi; nb]` then `[lo; nb]`): its `∂L/∂T` over this rank's rows into
    /// `d_feat` (`nb × d`, overwritten); returns `Σ G∘X` over the block.
    fn bwd_block(
        &mut self,
        feat: &Self::Buf,
        kap: &Self::Buf,
        nb: usize,
        col0: usize,
        d_feat: &mut Self::Buf,
    ) -> Result<f64, LossError>;

    /// SigLIP over the block, as [`super::ClipBlocks::sig_block`]: its `∂L/∂T` over this
    /// rank's rows into `d_feat` (`nb × d`, overwritten); returns `[Σ G∘X, Σ loss terms, Σ G]`
    /// over the block.
    fn sig_block(
        &mut self,
        feat: &Self::Buf,
        nb: usize,
        col0: usize,
        d_feat: &mut Self::Buf,
    ) -> Result<[f64; 3], LossError>;

    /// `partial ← incoming ⊕ partial` for column statistics of `nb` columns (`[m; nb]` then
    /// `[z; nb]`, online log-sum-exp merge, `incoming` first).
    fn merge_cols(
        &mut self,
        partial: &mut Self::Buf,
        incoming: &Self::Buf,
        nb: usize,
    ) -> Result<(), LossError>;

    /// `partial[..n] += incoming[..n]`.
    fn add(
        &mut self,
        partial: &mut Self::Buf,
        incoming: &Self::Buf,
        n: usize,
    ) -> Result<(), LossError>;
}

/// The buffers of the rounds of one call, grown to the largest chunk and kept across rounds:
/// the block in hand and the one arriving (features, extras) and three accumulators.
pub struct DeviceSlots<B> {
    feat: [Option<B>; 2],
    extra: [Option<B>; 2],
    acc: [Option<B>; 3],
}

impl<B> Default for DeviceSlots<B> {
    fn default() -> Self {
        DeviceSlots { feat: [None, None], extra: [None, None], acc: [None, None, None] }
    }
}

impl<B> DeviceSlots<B> {
    /// Values held over all slots (`capacity` as [`DeviceRing::capacity`]).
    pub fn values(&self, capacity: impl Fn(&B) -> usize) -> usize {
        self.feat.iter().chain(&self.extra).chain(&self.acc).flatten().map(capacity).sum()
    }
}

fn ensure<R: DeviceRing + ?Sized>(
    ring: &mut R,
    slot: &mut Option<R::Buf>,
    len: usize,
) -> Result<(), LossError> {
    if slot.as_ref().is_none_or(|b| R::capacity(b) < len.max(1)) {
        *slot = None;
        *slot = Some(ring.alloc(len.max(1))?);
    }
    Ok(())
}

/// Which pass a trip is for: what rides with the blocks and how accumulators combine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    /// Column statistics (2 per row), merged.
    Fwd,
    /// Column LSEs as f32 pairs (2 per row) ride along; `∂L/∂T` (d per row), added.
    Bwd,
    /// SigLIP: nothing rides along; `∂L/∂T` (d per row), added.
    Sig,
}

/// One trip of blocks around the ring on the device (see the module documentation); returns
/// this rank's block's final accumulator on the host and adds the block work's returns into
/// `sum` in block order (the backward's into `sum[0]`).
#[allow(clippy::too_many_arguments)]
fn drive<R: DeviceRing + ?Sized>(
    ring: &mut R,
    slots: &mut DeviceSlots<R::Buf>,
    pass: Pass,
    sizes: &[usize],
    col0: &[usize],
    d: usize,
    own_feat: &[f32],
    own_extra: &[f32],
    sum: &mut [f64; 3],
) -> Result<Vec<f32>, LossError> {
    let (n, r) = (sizes.len(), ring.rank());
    if n != ring.world() || r >= n || col0.len() != n {
        return Err(LossError::Invalid(format!(
            "device ring: {} sizes and {} first columns for rank {r} of {} ranks",
            n,
            col0.len(),
            ring.world()
        )));
    }
    // Extras per row: the backward's column LSE pairs; nothing rides with the other passes
    // (their extras slots hold one value, as the exchange names them with no values).
    let epr = if pass == Pass::Bwd { 2 } else { 0 };
    let apr = match pass {
        Pass::Fwd => 2,
        Pass::Bwd | Pass::Sig => d,
    };
    if own_feat.len() != sizes[r] * d || own_extra.len() != sizes[r] * epr {
        return Err(LossError::Invalid(format!(
            "device ring: rank {r}'s block has {} features and {} extras for {} rows of {d}",
            own_feat.len(),
            own_extra.len(),
            sizes[r]
        )));
    }
    let most = sizes.iter().copied().max().unwrap_or(0);
    let DeviceSlots { feat, extra, acc } = slots;
    for s in feat.iter_mut() {
        ensure(ring, s, most * d)?;
    }
    for s in extra.iter_mut() {
        ensure(ring, s, most * epr)?;
    }
    for s in acc.iter_mut() {
        ensure(ring, s, most * apr)?;
    }
    let (f0, f1) = feat.split_at_mut(1);
    let (mut cur_f, mut next_f) = (slot(&mut f0[0])?, slot(&mut f1[0])?);
    let (x0, x1) = extra.split_at_mut(1);
    let (mut cur_x, mut next_x) = (slot(&mut x0[0])?, slot(&mut x1[0])?);
    let (a0, rest) = acc.split_at_mut(1);
    let (a1, a2) = rest.split_at_mut(1);
    let (mut done, mut partial, incoming) =
        (slot(&mut a0[0])?, slot(&mut a1[0])?, slot(&mut a2[0])?);
    ring.upload(own_feat, cur_f)?;
    if epr > 0 {
        ring.upload(own_extra, cur_x)?;
    }
    let xs = |rows: usize| rows * epr;
    for k in 0..n {
        let q = (r + n - k) % n;
        let bq = sizes[q];
        if n > 1 {
            let h = Hop::at(sizes, r, k);
            ring.exchange(
                [(&*cur_f, h.feat_out * d), (&*cur_x, xs(h.feat_out)), (&*done, h.acc_out * apr)],
                [
                    (&mut *next_f, h.feat_in * d),
                    (&mut *next_x, xs(h.feat_in)),
                    (&mut *incoming, h.acc_in * apr),
                ],
            )?;
        }
        let worked = match pass {
            Pass::Fwd => ring.fwd_block(cur_f, bq, col0[q], partial),
            Pass::Bwd => ring.bwd_block(cur_f, cur_x, bq, col0[q], partial).map(|s| sum[0] += s),
            Pass::Sig => ring.sig_block(cur_f, bq, col0[q], partial).map(|s| {
                for k in 0..3 {
                    sum[k] += s[k];
                }
            }),
        };
        if n > 1 {
            // Even when the block work failed: the hop runs on this call's buffers, which must
            // not be freed under it (the peers finish their side; the watchdog bounds it).
            let waited = ring.exchange_wait();
            worked?;
            waited?;
            if k > 0 && bq > 0 {
                match pass {
                    Pass::Fwd => ring.merge_cols(partial, incoming, bq)?,
                    Pass::Bwd | Pass::Sig => ring.add(partial, incoming, bq * d)?,
                }
            }
            std::mem::swap(&mut cur_f, &mut next_f);
            std::mem::swap(&mut cur_x, &mut next_x);
        } else {
            worked?;
        }
        std::mem::swap(&mut done, &mut partial);
    }
    let mut out = vec![0.0f32; sizes[r] * apr];
    if n == 1 {
        ring.download(done, &mut out)?;
        return Ok(out);
    }
    // Block r+1's accumulator sits here: one more hop takes it home, and ours arrives.
    let h = Hop::home(sizes, r);
    ring.exchange(
        [(&*cur_f, 0), (&*cur_x, 0), (&*done, h.acc_out * apr)],
        [(&mut *next_f, 0), (&mut *next_x, 0), (&mut *incoming, h.acc_in * apr)],
    )?;
    ring.exchange_wait()?;
    ring.download(incoming, &mut out)?;
    Ok(out)
}

fn slot<B>(s: &mut Option<B>) -> Result<&mut B, LossError> {
    s.as_mut().ok_or_else(|| LossError::Invalid("device ring: a slot was not allocated".into()))
}

/// [`super::ClipBlocks::fwd_round`] on the device ring: returns this rank's chunk's column statistics
/// (host) and the round's device bytes in flight.
pub fn device_fwd_round<R: DeviceRing + ?Sized>(
    ring: &mut R,
    slots: &mut DeviceSlots<R::Buf>,
    lens: &[usize],
    col0: &[usize],
    d: usize,
    own: &[f32],
) -> Result<(Vec<f32>, usize), LossError> {
    let cols = drive(ring, slots, Pass::Fwd, lens, col0, d, own, &[], &mut [0.0; 3])?;
    Ok((cols, 4 * slots.values(|b| R::capacity(b))))
}

/// [`super::ClipBlocks::bwd_round`] on the device ring: this rank's chunk's `∂L/∂T` (host), its share
/// of `∂L/∂t` over the round, and the round's device bytes in flight.
#[allow(clippy::too_many_arguments)]
pub fn device_bwd_round<R: DeviceRing + ?Sized>(
    ring: &mut R,
    slots: &mut DeviceSlots<R::Buf>,
    lens: &[usize],
    col0: &[usize],
    d: usize,
    own: &[f32],
    kap: &[f64],
) -> Result<(Vec<f32>, f64, usize), LossError> {
    let (hi, lo): (Vec<f32>, Vec<f32>) = kap.iter().map(|&k| split_hi_lo(k)).unzip();
    let mut extra = hi;
    extra.extend_from_slice(&lo);
    let mut sums = [0.0; 3];
    let d_chunk = drive(ring, slots, Pass::Bwd, lens, col0, d, own, &extra, &mut sums)?;
    Ok((d_chunk, sums[0], 4 * slots.values(|b| R::capacity(b))))
}

/// [`super::ClipBlocks::sig_round`] on the device ring: adds the round's block sums into
/// `sums` in block order; returns this rank's chunk's `∂L/∂T` (host) and the round's device
/// bytes in flight.
pub fn device_sig_round<R: DeviceRing + ?Sized>(
    ring: &mut R,
    slots: &mut DeviceSlots<R::Buf>,
    lens: &[usize],
    col0: &[usize],
    d: usize,
    own: &[f32],
    sums: &mut [f64; 3],
) -> Result<(Vec<f32>, usize), LossError> {
    let d_chunk = drive(ring, slots, Pass::Sig, lens, col0, d, own, &[], sums)?;
    Ok((d_chunk, 4 * slots.values(|b| R::capacity(b))))
}
