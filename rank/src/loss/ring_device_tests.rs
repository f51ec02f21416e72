//! The device ring's schedule ([`super::ring_device`]) with host buffers standing in for a
//! device's: the CPU's tile work behind [`DeviceRing`], thread ranks exchanging the buffers'
//! values. The exchange runs at one of three moments relative to the block work queued after
//! it, the extremes of what two streams allow: entirely before it, sending before and
//! receiving after it, or entirely after it. A schedule that let a block work read a buffer an
//! exchange writes, or an exchange send a buffer a block work writes, gives other values at
//! one of them; every run must equal the host-message ring's.

use std::sync::{Arc, Mutex};

use tessera_collectives::Communicator;
use tessera_collectives::threads::ThreadComm;

use super::ring::{
    ClipBlocks, Hop, LossError, RingLossOpts, RingLossWorkspace, add_into, clip_loss_ring_with,
    clip_loss_ring_ws, merge_into, siglip_loss_ring_with, siglip_loss_ring_ws, with_cpu_blocks,
};
use super::ring_device::{
    DeviceRing, DeviceSlots, device_bwd_round, device_fwd_round, device_sig_round,
};

type Buf = Arc<Mutex<Vec<f32>>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    /// Sent and received when queued (before the block work).
    Early,
    /// Sent when queued, received at the wait (after the block work).
    Mixed,
    /// Sent and received at the wait.
    Late,
}

struct Pending {
    send: Vec<(Buf, usize)>,
    recv: Vec<(Buf, usize)>,
    got: Option<Vec<u8>>,
}

/// What an [`OnDeviceRing`] counts across its rounds.
#[derive(Default)]
struct Counts {
    exchanges: usize,
    blocks: usize,
}

/// [`DeviceRing`] on host buffers over a thread communicator, with the CPU's block work.
/// `fail_at`: the block work with this index (counted over the call) fails instead.
struct HostRing<'a> {
    comm: &'a mut dyn Communicator,
    blocks: &'a mut dyn ClipBlocks,
    d: usize,
    when: When,
    pending: Option<Pending>,
    counts: &'a mut Counts,
    fail_at: Option<usize>,
}

impl Drop for HostRing<'_> {
    fn drop(&mut self) {
        // A device would free the round's buffers now: no hop may still use them.
        if !std::thread::panicking() {
            assert!(self.pending.is_none(), "the round ended with a hop in flight");
        }
    }
}

impl HostRing<'_> {
    /// Counts a block work; an error where it is told to fail.
    fn block(&mut self) -> Result<(), LossError> {
        self.counts.blocks += 1;
        if self.fail_at == Some(self.counts.blocks - 1) {
            return Err(LossError::Invalid("injected block failure".into()));
        }
        Ok(())
    }
}

fn lock(b: &Buf) -> std::sync::MutexGuard<'_, Vec<f32>> {
    b.try_lock().expect("a buffer is used twice at once (the schedule aliased two slots)")
}

impl HostRing<'_> {
    fn send_now(&mut self, p: &mut Pending) -> Result<(), LossError> {
        let mut bytes = Vec::new();
        for (b, n) in &p.send {
            for v in &lock(b)[..*n] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let want = 4 * p.recv.iter().map(|(_, n)| n).sum::<usize>();
        let mut got = Vec::new();
        self.comm.ring_shift_bytes_sized(&bytes, &mut got, want)?;
        self.counts.exchanges += 1;
        p.got = Some(got);
        Ok(())
    }

    fn receive_now(p: &mut Pending) {
        let got = p.got.take().expect("sent before received");
        let mut vals = got.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for (b, n) in &p.recv {
            for v in &mut lock(b)[..*n] {
                *v = vals.next().expect("the message holds every part");
            }
        }
        assert!(vals.next().is_none(), "the message holds only the parts");
    }
}

impl DeviceRing for HostRing<'_> {
    type Buf = Buf;

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world()
    }

    fn alloc(&mut self, len: usize) -> Result<Buf, LossError> {
        // Poisoned: a value read before it was written shows as NaN.
        Ok(Arc::new(Mutex::new(vec![f32::NAN; len.max(1)])))
    }

    fn capacity(buf: &Buf) -> usize {
        lock(buf).len()
    }

    fn upload(&mut self, src: &[f32], dst: &mut Buf) -> Result<(), LossError> {
        lock(dst)[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&mut self, src: &Buf, dst: &mut [f32]) -> Result<(), LossError> {
        assert!(self.pending.is_none(), "download before the exchange was waited for");
        dst.copy_from_slice(&lock(src)[..dst.len()]);
        Ok(())
    }

    fn exchange(
        &mut self,
        send: [(&Buf, usize); 3],
        recv: [(&mut Buf, usize); 3],
    ) -> Result<(), LossError> {
        assert!(self.pending.is_none(), "an exchange queued before the last was waited for");
        for (b, n) in &send {
            assert!(*n <= lock(b).len(), "sends past its buffer");
        }
        for (b, n) in &recv {
            assert!(*n <= lock(b).len(), "receives past its buffer");
        }
        let mut p = Pending {
            send: send.iter().map(|(b, n)| (Arc::clone(b), *n)).collect(),
            recv: recv.iter().map(|(b, n)| (Arc::clone(b), *n)).collect(),
            got: None,
        };
        if self.when != When::Late {
            self.send_now(&mut p)?;
        }
        if self.when == When::Early {
            Self::receive_now(&mut p);
        }
        self.pending = Some(p);
        Ok(())
    }

    fn exchange_wait(&mut self) -> Result<(), LossError> {
        let mut p = self.pending.take().expect("an exchange to wait for");
        if self.when == When::Late {
            self.send_now(&mut p)?;
        }
        if self.when != When::Early {
            Self::receive_now(&mut p);
        }
        Ok(())
    }

    fn fwd_block(
        &mut self,
        feat: &Buf,
        nb: usize,
        col0: usize,
        cols: &mut Buf,
    ) -> Result<(), LossError> {
        self.block()?;
        let f = lock(feat);
        let mut c = lock(cols);
        self.blocks.fwd_block(&f[..nb * self.d], col0, &mut c[..2 * nb])
    }

    fn bwd_block(
        &mut self,
        feat: &Buf,
        kap: &Buf,
        nb: usize,
        col0: usize,
        d_feat: &mut Buf,
    ) -> Result<f64, LossError> {
        self.block()?;
        let (f, k) = (lock(feat), lock(kap));
        let kap: Vec<f64> = (0..nb).map(|j| k[j] as f64 + k[nb + j] as f64).collect();
        let mut g = lock(d_feat);
        self.blocks.bwd_block(&f[..nb * self.d], &kap, col0, &mut g[..nb * self.d])
    }

    fn sig_block(
        &mut self,
        feat: &Buf,
        nb: usize,
        col0: usize,
        d_feat: &mut Buf,
    ) -> Result<[f64; 3], LossError> {
        self.block()?;
        let f = lock(feat);
        let mut g = lock(d_feat);
        self.blocks.sig_block(&f[..nb * self.d], col0, &mut g[..nb * self.d])
    }

    fn merge_cols(
        &mut self,
        partial: &mut Buf,
        incoming: &Buf,
        nb: usize,
    ) -> Result<(), LossError> {
        merge_into(&mut lock(partial)[..2 * nb], &lock(incoming)[..2 * nb]);
        Ok(())
    }

    fn add(&mut self, partial: &mut Buf, incoming: &Buf, n: usize) -> Result<(), LossError> {
        add_into(&mut lock(partial)[..n], &lock(incoming)[..n]);
        Ok(())
    }
}

/// The CPU's blocks with their rounds on the device ring.
struct OnDeviceRing<'a> {
    inner: &'a mut dyn ClipBlocks,
    when: When,
    slots: DeviceSlots<Buf>,
    counts: Counts,
    rounds: usize,
    fail_at: Option<usize>,
}

impl<'a> OnDeviceRing<'a> {
    fn new(inner: &'a mut dyn ClipBlocks, when: When, fail_at: Option<usize>) -> Self {
        OnDeviceRing {
            inner,
            when,
            slots: DeviceSlots::default(),
            counts: Counts::default(),
            rounds: 0,
            fail_at,
        }
    }

    /// Runs one round on the device ring over `comm` with the call's slots.
    fn round<T>(
        &mut self,
        comm: &mut dyn Communicator,
        d: usize,
        f: impl FnOnce(&mut HostRing<'_>, &mut DeviceSlots<Buf>) -> Result<T, LossError>,
    ) -> Result<T, LossError> {
        self.rounds += 1;
        let mut slots = std::mem::take(&mut self.slots);
        let mut ring = HostRing {
            comm,
            blocks: &mut *self.inner,
            d,
            when: self.when,
            pending: None,
            counts: &mut self.counts,
            fail_at: self.fail_at,
        };
        let r = f(&mut ring, &mut slots);
        drop(ring);
        self.slots = slots;
        r
    }
}

impl ClipBlocks for OnDeviceRing<'_> {
    fn begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        scale: f32,
        big_b: usize,
    ) -> Result<(), LossError> {
        self.inner.begin(img, pos, d, scale, big_b)
    }

    fn fwd_block(&mut self, _: &[f32], _: usize, _: &mut [f32]) -> Result<(), LossError> {
        unreachable!("the rounds run on the device ring")
    }

    fn fwd_end(&mut self) -> Result<(Vec<f64>, f64), LossError> {
        self.inner.fwd_end()
    }

    fn bwd_begin(&mut self, lse: &[f64]) -> Result<(), LossError> {
        self.inner.bwd_begin(lse)
    }

    fn bwd_block(
        &mut self,
        _: &[f32],
        _: &[f64],
        _: usize,
        _: &mut [f32],
    ) -> Result<f64, LossError> {
        unreachable!("the rounds run on the device ring")
    }

    fn bwd_end(&mut self) -> Result<Vec<f32>, LossError> {
        self.inner.bwd_end()
    }

    fn held_bytes(&self) -> usize {
        self.inner.held_bytes()
    }

    fn fwd_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
    ) -> Result<(Vec<f32>, usize), LossError> {
        self.round(comm, d, |ring, slots| device_fwd_round(ring, slots, lens, col0, d, own))
    }

    fn bwd_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
        kap: &[f64],
    ) -> Result<(Vec<f32>, f64, usize), LossError> {
        self.round(comm, d, |ring, slots| device_bwd_round(ring, slots, lens, col0, d, own, kap))
    }

    fn sig_begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        scale: f32,
        bias: f32,
        big_b: usize,
    ) -> Result<(), LossError> {
        self.inner.sig_begin(img, pos, d, scale, bias, big_b)
    }

    fn sig_block(&mut self, _: &[f32], _: usize, _: &mut [f32]) -> Result<[f64; 3], LossError> {
        unreachable!("the rounds run on the device ring")
    }

    fn sig_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
        sums: &mut [f64; 3],
    ) -> Result<(Vec<f32>, usize), LossError> {
        self.round(comm, d, |ring, slots| device_sig_round(ring, slots, lens, col0, d, own, sums))
    }
}

fn random_features(seed: u64, n: usize, d: usize) -> Vec<f32> {
    let mut rng = crate::rng::Rng::new(seed);
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    for r in v.chunks_exact_mut(d.max(1)) {
        let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= nrm);
    }
    v
}

/// Every rank's result: loss, ∂L/∂I, ∂L/∂T, its share of ∂L/∂t, and (device ring) the
/// exchanges and rounds it ran; SigLIP: its share of ∂L/∂β.
type RankOut = (f32, Vec<f32>, Vec<f32>, f32, usize, usize, Option<f32>);

/// The CLIP loss (`bias` None) or SigLIP (with that bias) on the host ring (`when` None) or on
/// the device ring, every rank a thread.
fn run(
    split: &[usize],
    d: usize,
    chunk_rows: usize,
    when: Option<When>,
    bias: Option<f32>,
) -> Vec<RankOut> {
    let big_b: usize = split.iter().sum();
    let (img, txt) = (random_features(7, big_b, d), random_features(8, big_b, d));
    let offs: Vec<usize> =
        split.iter().scan(0, |a, &b| Some(std::mem::replace(a, *a + b))).collect();
    let opts = RingLossOpts { tile_rows: 4, tile_cols: 8, threads: 1, chunk_rows };
    let scale = 10.0;
    let f = |r: usize, comm: &mut ThreadComm| -> RankOut {
        let (lo, b) = (offs[r], split[r]);
        let (im, tx) = (&img[lo * d..(lo + b) * d], &txt[lo * d..(lo + b) * d]);
        let mut ws = RingLossWorkspace::new(&opts).expect("workspace");
        let (o, counts) = match (when, bias) {
            (None, None) => (clip_loss_ring_ws(comm, &mut ws, im, tx, b, d, scale, None), (0, 0)),
            (None, Some(bias)) => {
                (siglip_loss_ring_ws(comm, &mut ws, im, tx, b, d, scale, bias, None), (0, 0))
            }
            (Some(when), _) => with_cpu_blocks(&mut ws, im, d, scale, |inner, chunk| {
                let mut ops = OnDeviceRing::new(inner, when, None);
                let o = match bias {
                    None => {
                        clip_loss_ring_with(comm, &mut ops, chunk, None, im, tx, b, d, scale, None)
                    }
                    Some(bias) => siglip_loss_ring_with(
                        comm, &mut ops, chunk, None, im, tx, b, d, scale, bias, None,
                    ),
                };
                (o, (ops.counts.exchanges, ops.rounds))
            }),
        };
        let o = o.expect("the ring loss");
        (o.loss, o.d_img_local, o.d_txt_local, o.d_t_partial, counts.0, counts.1, o.d_bias_partial)
    };
    ThreadComm::run_group(split.len(), f)
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-30f64, |a, &v| a.max(v.abs() as f64));
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).abs()).fold(0.0, f64::max) / scale
}

/// The device ring's rounds give the host ring's loss and gradients on every rank, whichever
/// moment the exchanges run at: odd and empty blocks, several chunk rounds, 1–4 ranks.
#[test]
fn device_ring_equals_the_host_ring_at_every_exchange_moment() {
    // The last: whole blocks, the GPU's default chunk (`RingLossOpts::device_chunk_rows`).
    let whole = RingLossOpts::default().device_chunk_rows();
    assert_eq!(whole, usize::MAX, "whole blocks unless loss.chunk_rows is set");
    let cases: [(&[usize], usize, usize); 7] = [
        (&[9], 5, 4),
        (&[5, 7], 6, 3),
        (&[11, 0, 26], 5, 8),
        (&[3, 3, 3, 3], 4, 64),
        (&[1, 17, 2, 6], 7, 5),
        (&[0, 4], 3, 2),
        (&[37, 50, 3], 6, whole),
    ];
    for (split, d, chunk) in cases {
        let want = run(split, d, chunk, None, None);
        let rounds_per_pass = split.iter().max().copied().unwrap_or(0).div_ceil(chunk).max(1);
        for when in [When::Early, When::Mixed, When::Late] {
            let got = run(split, d, chunk, Some(when), None);
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let at = format!("{split:?} d {d} chunk {chunk} {when:?} rank {r}");
                // The forward's statistics merge as the host ring's do: the loss is the same
                // bits. The backward's column LSEs travel as f32 pairs and are recombined.
                assert_eq!(g.0.to_bits(), w.0.to_bits(), "{at}: loss {} vs {}", g.0, w.0);
                assert!(max_rel(&g.1, &w.1) <= 1e-6, "{at}: dI off by {}", max_rel(&g.1, &w.1));
                assert!(max_rel(&g.2, &w.2) <= 1e-6, "{at}: dT off by {}", max_rel(&g.2, &w.2));
                assert!(
                    (g.3 - w.3).abs() <= 1e-6 * w.3.abs().max(1.0),
                    "{at}: dt {} vs {}",
                    g.3,
                    w.3
                );
                assert_eq!(g.5, 2 * rounds_per_pass, "{at}: rounds");
                // n + 1 hops per trip (one per step, the last carrying only accumulators, and
                // the trip home), none on a single rank.
                let n = split.len();
                let hops = if n > 1 { n + 1 } else { 0 };
                assert_eq!(g.4, 2 * rounds_per_pass * hops, "{at}: exchanges");
            }
        }
    }
}

/// SigLIP's one pass on the device ring gives the host ring's bits on every rank (the same
/// block work, the same additions in the same order), whichever moment the exchanges run at.
#[test]
fn device_ring_siglip_equals_the_host_ring_bitwise() {
    let cases: [(&[usize], usize, usize); 4] =
        [(&[9], 5, 4), (&[5, 7], 6, 3), (&[11, 0, 26], 5, 8), (&[1, 17, 2, 6], 7, 5)];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (split, d, chunk) in cases {
        let want = run(split, d, chunk, None, Some(-3.0));
        let rounds = split.iter().max().copied().unwrap_or(0).div_ceil(chunk).max(1);
        for when in [When::Early, When::Mixed, When::Late] {
            let got = run(split, d, chunk, Some(when), Some(-3.0));
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let at = format!("{split:?} d {d} chunk {chunk} {when:?} rank {r}");
                assert!(w.0.is_finite() && w.0 > 0.0, "{at}: loss {}", w.0);
                assert_eq!(g.0.to_bits(), w.0.to_bits(), "{at}: loss {} vs {}", g.0, w.0);
                assert!(bits(&g.1) == bits(&w.1), "{at}: dI differs");
                assert!(bits(&g.2) == bits(&w.2), "{at}: dT differs");
                assert_eq!(g.3.to_bits(), w.3.to_bits(), "{at}: dt {} vs {}", g.3, w.3);
                assert_eq!(g.6.map(f32::to_bits), w.6.map(f32::to_bits), "{at}: dbias");
                assert_eq!(g.5, rounds, "{at}: one pass of rounds");
                let n = split.len();
                assert_eq!(g.4, rounds * if n > 1 { n + 1 } else { 0 }, "{at}: exchanges");
            }
        }
    }
}

/// What rank r sends on every hop is what rank r+1 expects, part for part.
#[test]
fn hops_pair_each_send_with_the_next_ranks_receive() {
    for sizes in [vec![1usize, 2], vec![3, 0, 5], vec![4, 4, 4, 4], vec![7, 1, 0, 2, 9]] {
        let n = sizes.len();
        for r in 0..n {
            let next = (r + 1) % n;
            for k in 0..n {
                let (a, b) = (Hop::at(&sizes, r, k), Hop::at(&sizes, next, k));
                assert_eq!((a.feat_out, a.acc_out), (b.feat_in, b.acc_in), "{sizes:?} r {r} k {k}");
                let q = (r + n - k) % n;
                assert_eq!(a.feat_out, if k + 1 == n { 0 } else { sizes[q] });
                assert_eq!(a.acc_in, if k == 0 { 0 } else { sizes[q] });
            }
            let (a, b) = (Hop::home(&sizes, r), Hop::home(&sizes, next));
            assert_eq!(a.acc_out, b.acc_in, "{sizes:?} r {r}: home");
            assert_eq!(a.acc_in, sizes[r]);
        }
    }
}

/// A block work that fails with a hop in flight: the round waits for the hop before it returns
/// the error (a device would otherwise free buffers the hop still writes), on every rank, at
/// every exchange moment, in the forward and in the backward.
#[test]
fn device_ring_waits_for_the_hop_in_flight_when_block_work_fails() {
    let (split, d) = ([5usize, 7, 3], 4);
    let big_b: usize = split.iter().sum();
    let (img, txt) = (random_features(3, big_b, d), random_features(4, big_b, d));
    let offs = [0, 5, 12];
    // Blocks 0–2: the forward's steps (0: no accumulator yet), 3–5: the backward's.
    for fail_at in [0usize, 1, 2, 4] {
        for when in [When::Early, When::Mixed, When::Late] {
            let opts = RingLossOpts { tile_rows: 4, tile_cols: 8, threads: 1, chunk_rows: 64 };
            let f = |r: usize, comm: &mut ThreadComm| -> String {
                let (lo, b) = (offs[r], split[r]);
                let (im, tx) = (&img[lo * d..(lo + b) * d], &txt[lo * d..(lo + b) * d]);
                let mut ws = RingLossWorkspace::new(&opts).expect("workspace");
                with_cpu_blocks(&mut ws, im, d, 5.0, |inner, chunk| {
                    let mut ops = OnDeviceRing::new(inner, when, Some(fail_at));
                    match clip_loss_ring_with(comm, &mut ops, chunk, None, im, tx, b, d, 5.0, None)
                    {
                        Ok(_) => "no error".to_string(),
                        Err(e) => e.to_string(),
                    }
                })
            };
            let got = ThreadComm::run_group(split.len(), f);
            for (r, e) in got.iter().enumerate() {
                assert!(
                    e.contains("injected block failure"),
                    "block {fail_at} {when:?} rank {r}: {e}"
                );
            }
        }
    }
}
