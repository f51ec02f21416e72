//! The CLIP ring's GPU block work ([`super::super::ring::GpuClipBlocks`]) run by the CPU
//! emulation of clip_loss.cu, inside the ring's own schedule (`clip_loss_ring_with`, ranks as
//! threads), against the CPU ring and the f64 reference of the whole batch.

use std::sync::Arc;

use super::support::{Guarded, NAN_BF16, NAN_F32, NAN_F64, to64};
use super::{Args, EmuModule, block_order, module, module_with, with_block_order};
use crate::device::cuda::gpu::{
    LOSS_TILE, LossMode, Precision, bf16_layout, bwd_shared_bytes, plan_bwd, plan_fwd_grid_rect,
};
use crate::device::cuda::nvrtc::Defines;
use crate::device::cuda::ring::{block_diag, operand_stride};
use crate::device::cuda::selftest::{loss_tols, random_features, rel_err};
use crate::loss::ring::{ClipBlocks, LossError, split_hi_lo};
use crate::loss::{
    RingLossOpts, RingLossOut, clip_loss_reference_f64, clip_loss_ring, clip_loss_ring_with,
    siglip_loss_reference_f64, siglip_loss_ring, siglip_loss_ring_with,
};
use crate::rng::Rng;
use tessera_collectives::threads::ThreadComm;

/// `gpu::elem_cfg`'s block count.
fn elem_blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 8192) as u32
}

/// A device buffer as ring.rs's `ensure` leaves it: at least one value, its contents whatever
/// an earlier block left (here: poison, so that reading them shows).
fn stale<T: Copy>(len: usize, poison: T) -> Guarded<T> {
    Guarded::new(len.max(1), poison, poison)
}

/// `GpuClipBlocks` with the emulated kernels on guarded host buffers: every launch of ring.rs
/// in its order, with its grids, argument lists and buffer sizes; the per-block buffers are
/// fresh (poisoned) for every block instead of grown and reused, so a kernel that reads what it
/// did not write this block reads NaN. `wave`: the forward's and the backward's block budget
/// (`forward_wave` and `backward_wave` on a GPU), small so that blocks of the ring are split
/// into several chunks and splits.
struct EmuClipBlocks {
    m: Arc<EmuModule>,
    mode: LossMode,
    precision: Precision,
    wave: usize,
    rows: usize,
    d: usize,
    scale: f32,
    inv2b: f32,
    /// SigLIP: the logit bias and 1/B.
    bias: f32,
    inv_b: f32,
    row0: i64,
    first: bool,
    img: Guarded<f32>,
    img_h: Guarded<u16>,
    run_m: Guarded<f64>,
    run_z: Guarded<f64>,
    pos: Guarded<f32>,
    la_hi: Guarded<f32>,
    la_lo: Guarded<f32>,
    d_img: Guarded<f32>,
    /// Dynamic shared memory of the backward launches (`gpu::bwd_shared_bytes` of the knobs
    /// `m` was built with).
    bwd_shared: u32,
}

fn wrote_outside(what: &str) -> LossError {
    LossError::Invalid(format!("emulated ring: {what} wrote outside its buffers"))
}

impl EmuClipBlocks {
    fn new(
        m: Arc<EmuModule>,
        mode: LossMode,
        precision: Precision,
        wave: usize,
        bwd_shared: u32,
    ) -> Self {
        EmuClipBlocks {
            bwd_shared,
            m,
            mode,
            precision,
            wave,
            rows: 0,
            d: 0,
            scale: 1.0,
            inv2b: 0.0,
            bias: 0.0,
            inv_b: 0.0,
            row0: 0,
            first: true,
            img: stale(0, NAN_F32),
            img_h: stale(0, NAN_BF16),
            run_m: stale(0, NAN_F64),
            run_z: stale(0, NAN_F64),
            pos: stale(0, NAN_F32),
            la_hi: stale(0, NAN_F32),
            la_lo: stale(0, NAN_F32),
            d_img: stale(0, NAN_F32),
        }
    }

    fn bf16(&self) -> bool {
        self.precision == Precision::Bf16
    }

    fn launch(&self, name: &str, grid: (u32, u32), args: &mut Args) {
        self.launch_shared(name, (grid.0, grid.1, 1), 0, args)
    }

    fn launch_shared(&self, name: &str, grid: (u32, u32, u32), shared: u32, args: &mut Args) {
        // SAFETY: every call below passes the kernel's parameter list as ring.rs does, with
        // buffers at least as large as ring.rs allocates them (plus guards), and its dynamic
        // shared memory.
        unsafe { self.m.launch(name, grid, (256, 1, 1), shared, args) }
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// ring.rs's `to_bf16`: the padded bf16 copy of the `n × d` values of `src`, written by
    /// `clip_to_bf16` with its second operand null.
    fn to_bf16(&self, src: &Guarded<f32>, n: usize) -> Guarded<u16> {
        let (rows_p, ld) = bf16_layout(n, self.d);
        let mut dst = stale(rows_p * ld, NAN_BF16);
        if rows_p == 0 {
            return dst;
        }
        let (n64, d64, rows64, ld64) = (n as i64, self.d as i64, rows_p as i64, ld as i64);
        let mut a = Args::new();
        a.buf(src.get()).null().i64(n64).i64(d64).i64(rows64).i64(ld64);
        a.buf_mut(dst.get_mut()).null();
        self.launch("clip_to_bf16", (rows_p.clamp(1, 65535) as u32, 1), &mut a);
        dst
    }

    /// `GpuClipBlocks::fwd`.
    fn fwd(&mut self, feat: &[f32], col0: usize, cols: &mut [f32]) -> Result<(), LossError> {
        let d = self.d;
        let nb = feat.len() / d;
        if nb == 0 {
            return Ok(());
        }
        let (br, bc) = (self.rows as i64, nb as i64);
        let diag = block_diag(self.row0, self.rows, col0, nb);
        let grid =
            plan_fwd_grid_rect(self.rows.div_ceil(LOSS_TILE), nb.div_ceil(LOSS_TILE), self.wave);
        let (bf16, ld) = (self.bf16(), operand_stride(self.precision, d) as i64);
        let feat_d = Guarded::from(feat, NAN_F32);
        let mut row_m = stale(grid.splits * self.rows, NAN_F32);
        let mut row_z = stale(grid.splits * self.rows, NAN_F32);
        let mut col_m = stale(grid.chunks * nb, NAN_F32);
        let mut col_z = stale(grid.chunks * nb, NAN_F32);
        let mut cols_d = stale(2 * nb, NAN_F32);
        let feat_h = if bf16 { self.to_bf16(&feat_d, nb) } else { stale(0, NAN_BF16) };
        let (tpc, tps) = (grid.tiles_per_chunk as i32, grid.tiles_per_split as i32);
        let mut a = Args::new();
        if bf16 {
            a.buf(self.img_h.get()).buf(feat_h.get());
        } else {
            a.buf(self.img.get()).buf(feat_d.get());
        }
        a.i64(br).i64(bc).i64(ld).f32(self.scale);
        a.i64(diag).i32(tpc).i32(tps);
        a.buf_mut(row_m.get_mut()).buf_mut(row_z.get_mut()).buf_mut(col_m.get_mut());
        a.buf_mut(col_z.get_mut()).buf_mut(self.pos.get_mut());
        let fwd = format!("clip_fwd{}", self.precision.suffix());
        self.launch(&fwd, (grid.chunks as u32, grid.splits as u32), &mut a);
        if self.rows > 0 {
            let (splits, first) = (grid.splits as i32, i32::from(self.first));
            let mut a = Args::new();
            a.buf(row_m.get()).buf(row_z.get()).i32(splits).i64(br).i32(first);
            a.buf_mut(self.run_m.get_mut()).buf_mut(self.run_z.get_mut());
            self.launch("clip_fold_rows", (elem_blocks(self.rows), 1), &mut a);
            self.first = false;
        }
        let chunks = grid.chunks as i32;
        let mut a = Args::new();
        a.buf(col_m.get()).buf(col_z.get()).i32(chunks).i64(bc).buf_mut(cols_d.get_mut());
        self.launch("clip_fold_cols", (elem_blocks(nb), 1), &mut a);
        cols.copy_from_slice(&cols_d.get()[..2 * nb]);
        let ok = [&feat_d, &row_m, &row_z, &col_m, &col_z, &cols_d].iter().all(|g| g.intact())
            && feat_h.intact()
            && self.held_intact();
        if !ok {
            return Err(wrote_outside(&format!("{fwd} / clip_fold_rows / clip_fold_cols")));
        }
        Ok(())
    }

    /// `GpuClipBlocks::bwd` (`kap` Some: CLIP) and `sig_block` (None: SigLIP), through its
    /// `grad_queue`.
    fn bwd(
        &mut self,
        feat: &[f32],
        kap: Option<&[f64]>,
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<[f64; 3], LossError> {
        let d = self.d;
        let nb = feat.len() / d;
        if nb == 0 {
            return Ok([0.0; 3]);
        }
        let sig = kap.is_none();
        let nv = if sig { 3 } else { 1 };
        let kap = kap.unwrap_or(&[]);
        let (br, bc, d64) = (self.rows as i64, nb as i64, d as i64);
        let (bf16, ld) = (self.bf16(), operand_stride(self.precision, d) as i64);
        let diag = block_diag(self.row0, self.rows, col0, nb);
        let (kh, kl): (Vec<f32>, Vec<f32>) = kap.iter().map(|&k| split_hi_lo(k)).unzip();
        let feat_d = Guarded::from(feat, NAN_F32);
        let feat_h = if bf16 { self.to_bf16(&feat_d, nb) } else { stale(0, NAN_BF16) };
        let (lb_hi, lb_lo) = (Guarded::from(&kh, NAN_F32), Guarded::from(&kl, NAN_F32));
        // Zeroed by ring.rs (memset) before the kernels add into it.
        let mut d_feat_d = Guarded::new(nb * d, 0.0f32, NAN_F32);
        let plan = plan_bwd(self.mode, self.rows, nb, d, self.wave, None);
        let mut dt_part = stale(nv * plan.dt_parts, NAN_F64);
        let mut parts = stale(plan.parts_len, NAN_F32);
        // ring.rs: fast mode one clip_bwd* pass (the block's dT by atomicAdd), deterministic
        // mode clip_bwd_pair* (both passes, grid y = 2, over the longer pass's row tiles);
        // columns split in grid z as planned.
        let loss = if sig { "siglip" } else { "clip" };
        let bwd = match self.mode {
            LossMode::Fast => format!("{loss}_bwd{}", self.precision.suffix()),
            LossMode::Deterministic => format!("{loss}_bwd_pair{}", self.precision.suffix()),
        };
        let mut sums = [0.0f64; 3];
        if self.rows > 0 {
            let mut a = Args::new();
            if bf16 {
                a.buf(self.img_h.get()).buf(feat_h.get()).i64(br).i64(bc).i64(d64).i64(ld);
            } else {
                a.buf(self.img.get()).buf(feat_d.get()).i64(br).i64(bc).i64(d64);
            }
            if sig {
                a.f32(self.scale).f32(self.bias).f32(self.inv_b);
            } else {
                a.f32(self.scale).f32(self.inv2b);
                a.buf(self.la_hi.get()).buf(self.la_lo.get()).buf(lb_hi.get()).buf(lb_lo.get());
            }
            a.i64(diag).buf_mut(self.d_img.get_mut()).buf_mut(d_feat_d.get_mut());
            a.buf_mut(dt_part.get_mut());
            if plan.parts_len > 0 {
                a.buf_mut(parts.get_mut());
            } else {
                a.null();
            }
            self.launch_shared(&bwd, plan.grid, self.bwd_shared, &mut a);
            // gpu::fold_splits: the swapped pass's shares after the first's.
            let (rows_n, cols_n) = (self.rows * d, nb * d);
            let off_b = (plan.splits() - 1) * rows_n;
            if plan.folds.0 > 0 {
                let mut a = Args::new();
                a.buf_mut(self.d_img.get_mut()).buf(parts.get()).i64(rows_n as i64);
                a.i32(plan.folds.0 as i32);
                self.launch("clip_fold_splits", (elem_blocks(rows_n), 1), &mut a);
            }
            if plan.folds.1 > 0 {
                let mut a = Args::new();
                a.buf_mut(d_feat_d.get_mut()).buf(&parts.get()[off_b..]).i64(cols_n as i64);
                a.i32(plan.folds.1 as i32);
                self.launch("clip_fold_splits", (elem_blocks(cols_n), 1), &mut a);
            }
            let parts = &dt_part.get()[..nv * plan.dt_parts];
            for (k, sum) in sums.iter_mut().enumerate().take(nv) {
                *sum = parts.iter().skip(k).step_by(nv).sum();
            }
        }
        d_feat.copy_from_slice(&d_feat_d.get()[..nb * d]);
        let ok = [&feat_d, &lb_hi, &lb_lo, &d_feat_d].iter().all(|g| g.intact())
            && feat_h.intact()
            && dt_part.intact()
            && parts.intact()
            && self.held_intact();
        if !ok {
            return Err(wrote_outside(&bwd));
        }
        Ok(sums)
    }

    /// Whether the buffers held for the call kept their guards.
    fn held_intact(&self) -> bool {
        [&self.img, &self.pos, &self.la_hi, &self.la_lo, &self.d_img].iter().all(|g| g.intact())
            && self.img_h.intact()
            && self.run_m.intact()
            && self.run_z.intact()
    }
}

/// ring.rs's `impl ClipBlocks for GpuClipBlocks`, step for step.
impl ClipBlocks for EmuClipBlocks {
    fn begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        scale: f32,
        big_b: usize,
    ) -> Result<(), LossError> {
        let rows = img.len() / d;
        let row0 = pos.first().copied().unwrap_or(0);
        if pos.iter().enumerate().any(|(i, &p)| p != row0 + i) {
            return Err(LossError::Invalid("diagonal positives only".into()));
        }
        (self.rows, self.d, self.scale, self.row0) = (rows, d, scale, row0 as i64);
        self.inv2b = (1.0 / (2.0 * big_b as f64)) as f32;
        self.first = true;
        // ring.rs's `ensure`: at least one value (the kernels take the buffer without rows).
        self.img = if img.is_empty() { stale(0, NAN_F32) } else { Guarded::from(img, NAN_F32) };
        self.run_m = stale(rows, NAN_F64);
        self.run_z = stale(rows, NAN_F64);
        self.pos = stale(rows, NAN_F32);
        self.la_hi = stale(rows, NAN_F32);
        self.la_lo = stale(rows, NAN_F32);
        self.d_img = stale(rows * d, NAN_F32);
        if self.bf16() {
            self.img_h = self.to_bf16(&self.img, rows);
        }
        Ok(())
    }

    fn fwd_block(&mut self, feat: &[f32], col0: usize, cols: &mut [f32]) -> Result<(), LossError> {
        self.fwd(feat, col0, cols)
    }

    fn fwd_end(&mut self) -> Result<(Vec<f64>, f64), LossError> {
        let rows = self.rows;
        if rows == 0 {
            return Ok((Vec::new(), 0.0));
        }
        let (m, z, p) = (self.run_m.get(), self.run_z.get(), self.pos.get());
        let lse = m[..rows].iter().zip(&z[..rows]).map(|(&m, &z)| m + z.ln()).collect();
        Ok((lse, p[..rows].iter().map(|&x| x as f64).sum()))
    }

    fn bwd_begin(&mut self, lse: &[f64]) -> Result<(), LossError> {
        let rows = self.rows;
        for (i, &v) in lse.iter().enumerate().take(rows) {
            (self.la_hi.get_mut()[i], self.la_lo.get_mut()[i]) = split_hi_lo(v);
        }
        self.d_img.get_mut().fill(0.0);
        Ok(())
    }

    fn bwd_block(
        &mut self,
        feat: &[f32],
        kap: &[f64],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<f64, LossError> {
        Ok(self.bwd(feat, Some(kap), col0, d_feat)?[0])
    }

    fn bwd_end(&mut self) -> Result<Vec<f32>, LossError> {
        Ok(self.d_img.get()[..self.rows * self.d].to_vec())
    }

    fn held_bytes(&self) -> usize {
        0
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
        self.begin(img, pos, d, scale, big_b)?;
        (self.bias, self.inv_b) = (bias, (1.0 / big_b as f64) as f32);
        self.d_img.get_mut().fill(0.0);
        Ok(())
    }

    fn sig_block(
        &mut self,
        feat: &[f32],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<[f64; 3], LossError> {
        self.bwd(feat, None, col0, d_feat)
    }
}

/// The emulated blocks of a ring run: module, mode, precision, forward wave, and the backward's
/// dynamic shared memory.
pub(super) type EmuOps<'a> = (&'a Arc<EmuModule>, LossMode, Precision, usize, u32);

/// One ring run over `world = sizes.len()` ranks as threads: the CPU ring (`ops` None) or the
/// emulated GPU blocks, one [`RingLossOut`] per rank in rank order. CLIP, or SigLIP with the
/// logit bias `bias`.
pub(super) fn run_ring(
    feats: &[(Vec<f32>, Vec<f32>)],
    d: usize,
    (scale, bias): (f32, Option<f32>),
    chunk_rows: usize,
    ops: Option<EmuOps>,
) -> Result<Vec<RingLossOut>, String> {
    let opts = RingLossOpts { chunk_rows, ..RingLossOpts::default() };
    // The rank threads launch in the caller's block order.
    let order = block_order();
    std::thread::scope(|s| {
        let hs: Vec<_> = ThreadComm::group(feats.len())
            .into_iter()
            .zip(feats)
            .map(|(mut c, (img, txt))| {
                let opts = &opts;
                s.spawn(move || -> Result<RingLossOut, String> {
                    let b = img.len() / d;
                    let c = &mut c;
                    let r = with_block_order(order, || match (ops, bias) {
                        (None, None) => clip_loss_ring(c, img, txt, b, d, scale, opts),
                        (None, Some(bias)) => {
                            siglip_loss_ring(c, img, txt, b, d, scale, bias, opts)
                        }
                        (Some((m, mode, prec, wave, shared)), _) => {
                            let mut ops = EmuClipBlocks::new(m.clone(), mode, prec, wave, shared);
                            let k = &mut ops;
                            match bias {
                                None => clip_loss_ring_with(
                                    c, k, chunk_rows, None, img, txt, b, d, scale, None,
                                ),
                                Some(bias) => siglip_loss_ring_with(
                                    c, k, chunk_rows, None, img, txt, b, d, scale, bias, None,
                                ),
                            }
                        }
                    });
                    r.map_err(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into()))).collect()
    })
}

/// selftest.rs's `ring_errs`: `(quantity, vs the CPU ring, vs the f64 reference)` for the loss
/// (the worst rank's), dI and dT (the ranks' rows concatenated) and dt (the ranks' shares
/// summed).
fn ring_errs(
    got: &[RingLossOut],
    cpu: &[RingLossOut],
    reference: &(f64, Vec<f64>, Vec<f64>, f64),
) -> [(&'static str, f64, f64); 4] {
    let (lr, dir, dtr, dtr_t) = reference;
    let worst = |want: f64| got.iter().map(|g| rel_err(&[g.loss], &[want])).fold(0.0, f64::max);
    let rows = |o: &[RingLossOut], dt: bool| -> Vec<f32> {
        o.iter()
            .flat_map(|r| if dt { &r.d_txt_local } else { &r.d_img_local }.iter().copied())
            .collect()
    };
    let dt_sum = |o: &[RingLossOut]| o.iter().map(|r| r.d_t_partial as f64).sum::<f64>();
    let (gi, gt, g_dt) = (rows(got, false), rows(got, true), dt_sum(got));
    let (ci, ct, c_dt) = (rows(cpu, false), rows(cpu, true), dt_sum(cpu));
    [
        ("loss", worst(cpu[0].loss as f64), worst(*lr)),
        ("dI", rel_err(&gi, &ci), rel_err(&gi, dir)),
        ("dT", rel_err(&gt, &ct), rel_err(&gt, dtr)),
        ("dt", rel_err(&[g_dt], &[c_dt]), rel_err(&[g_dt], &[*dtr_t])),
    ]
}

/// The ring with its blocks on the emulated kernels, as `GpuClipBlocks` launches them (see
/// [`EmuClipBlocks`]), against the CPU ring (`clip_loss_ring`, same world and chunks) and the
/// f64 reference of the whole batch, with `selftest::loss_tols`. World sizes 1, 2 and 4 with
/// unequal rows per rank (one rank without rows: its forward runs on an empty chunk, its
/// backward launches nothing), chunks of 80 or 40 rows (several rounds, a short last chunk, a
/// rank whose last chunk is empty), so blocks whose positives lie entirely, partly and not at
/// all (NO_DIAG) in them, rectangular blocks of one to three 64-row tiles split over several
/// forward chunks and splits, and d below, across and above a 64-wide chunk. fp32 runs every
/// world in both modes; the tensor-core precisions, whose emulated launches cost far more
/// (every mma is two warp barriers; the bf16 copy is a block per padded row), run on the
/// smaller worlds: TF32 deterministic on two ranks, and on one rank of two rectangular blocks
/// (70 rows against 40 and 30 columns, diagonal offsets 0 and -40) 3xTF32 deterministic, TF32
/// fast and BF16 deterministic (its swapped launch takes the copies' stride after d).
///
/// Sensitivity, tried by hand (each mutation then reverted): with the deterministic dT pass
/// given `diag` instead of the swapped `-diag` (when the two passes were separate launches, and
/// again in `clip_bwd_pair_impl` since they are one), the first case fails at once (fp32
/// deterministic, world [150]: dT 0.60 vs the CPU ring, tolerance 1e-4); with the bf16 swapped
/// launch given d instead of the copies' stride `ld` (separate launches), the bf16 case failed
/// (dT 1.38, tolerance 5e-2).
#[test]
fn ring_blocks_match_the_cpu_ring_and_the_f64_reference() {
    use LossMode::{Deterministic as Det, Fast};
    use Precision::{Bf16, Fp32, Tf32, Tf32x3};
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let cases: [Case; 4] = [
        (&[150], 40, 80, &[(Det, Fp32), (Fast, Fp32)]),
        (&[90, 57], 67, 80, &[(Det, Fp32), (Fast, Fp32), (Det, Tf32)]),
        (&[40, 0, 70, 33], 72, 80, &[(Det, Fp32), (Fast, Fp32)]),
        (&[70], 40, 40, &[(Det, Tf32x3), (Fast, Tf32), (Det, Bf16)]),
    ];
    check_against_cpu_ring(&m, 17, 4, &cases);
}

/// Rows per rank, d, chunk rows, and the (mode, precision) runs of a ring case.
type Case<'a> = (&'a [usize], usize, usize, &'a [(LossMode, Precision)]);

/// Each case's ring with the emulated blocks (`wave`: their block budget; scale 20, features
/// drawn from `seed`) against the CPU ring and the f64 reference, with `selftest::loss_tols`.
fn check_against_cpu_ring(m: &Arc<EmuModule>, seed: u64, wave: usize, cases: &[Case]) {
    let mut rng = Rng::new(seed);
    let scale = 20.0f32;
    for &(sizes, d, chunk_rows, runs) in cases {
        let feats: Vec<(Vec<f32>, Vec<f32>)> = sizes
            .iter()
            .map(|&b| (random_features(&mut rng, b, d), random_features(&mut rng, b, d)))
            .collect();
        let cpu = run_ring(&feats, d, (scale, None), chunk_rows, None).expect("the CPU ring");
        let all_img: Vec<f64> = feats.iter().flat_map(|(i, _)| to64(i)).collect();
        let all_txt: Vec<f64> = feats.iter().flat_map(|(_, t)| to64(t)).collect();
        let big_b = sizes.iter().sum::<usize>();
        let reference = clip_loss_reference_f64(&all_img, &all_txt, big_b, d, scale as f64);
        for &(mode, prec) in runs {
            let t = std::time::Instant::now();
            let tag =
                format!("rows {sizes:?} d={d} chunk {chunk_rows} {} {}", prec.name(), mode.name());
            let got =
                run_ring(&feats, d, (scale, None), chunk_rows, Some((m, mode, prec, wave, 0)))
                    .unwrap_or_else(|e| panic!("{tag}: {e}"));
            assert_eq!(got.len(), sizes.len());
            for (g, &b) in got.iter().zip(sizes) {
                assert_eq!((g.d_img_local.len(), g.d_txt_local.len()), (b * d, b * d), "{tag}");
            }
            let errs = ring_errs(&got, &cpu, &reference);
            eprintln!("{tag}: {errs:?} ({:.1?})", t.elapsed());
            let (tol_loss, tol_grad) = loss_tols(prec, scale);
            for (what, e_cpu, e_ref) in errs {
                let tol = if what == "loss" { tol_loss } else { tol_grad };
                assert!(e_cpu <= tol, "{tag} {what}: {e_cpu:.3e} vs the CPU ring > {tol}");
                assert!(e_ref <= tol, "{tag} {what}: {e_ref:.3e} vs the reference > {tol}");
            }
        }
    }
}

/// SigLIP's one pass with its blocks on the emulated `siglip_bwd*` kernels, as
/// `GpuClipBlocks::sig_block` launches them, against the CPU SigLIP ring (same world and
/// chunks) and the f64 reference of the whole batch: the loss, dI, dT and the ranks' shares of
/// ∂L/∂t and ∂L/∂β summed, with `selftest::loss_tols`. Blocks with the positives entirely,
/// partly and not at all in them, an empty rank, several chunk rounds; fp32 in both modes, TF32
/// fast and 3xTF32 and BF16 deterministic (the copies' stride after d).
///
/// Sensitivity, tried by hand (each mutation then reverted): the positive's `g -= inv2b` left
/// out of the kernel fails the first case at once (fp32 deterministic, world [150]: dI 0.49 vs
/// the CPU ring, tolerance 1e-4); the swapped pass given `diag` for `-diag` fails it too (dT
/// 0.33).
#[test]
fn siglip_ring_blocks_match_the_cpu_ring_and_the_f64_reference() {
    use LossMode::{Deterministic as Det, Fast};
    use Precision::{Bf16, Fp32, Tf32, Tf32x3};
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let cases: [Case; 3] = [
        (&[150], 40, 80, &[(Det, Fp32), (Fast, Fp32)]),
        (&[90, 0, 57], 67, 40, &[(Det, Fp32), (Fast, Tf32)]),
        (&[70], 40, 40, &[(Det, Tf32x3), (Det, Bf16)]),
    ];
    let mut rng = Rng::new(29);
    let (scale, bias) = (10.0f32, -4.0f32);
    for &(sizes, d, chunk_rows, runs) in &cases {
        let feats: Vec<(Vec<f32>, Vec<f32>)> = sizes
            .iter()
            .map(|&b| (random_features(&mut rng, b, d), random_features(&mut rng, b, d)))
            .collect();
        let sl = (scale, Some(bias));
        let cpu = run_ring(&feats, d, sl, chunk_rows, None).expect("the CPU ring");
        let all_img: Vec<f64> = feats.iter().flat_map(|(i, _)| to64(i)).collect();
        let all_txt: Vec<f64> = feats.iter().flat_map(|(_, t)| to64(t)).collect();
        let big_b = sizes.iter().sum::<usize>();
        let (l, di, dtx, dt, db) =
            siglip_loss_reference_f64(&all_img, &all_txt, big_b, d, scale as f64, bias as f64);
        let db_sum = |o: &[RingLossOut]| {
            o.iter().map(|r| r.d_bias_partial.expect("SigLIP's dbias") as f64).sum::<f64>()
        };
        for &(mode, prec) in runs {
            let tag = format!(
                "siglip rows {sizes:?} d={d} chunk {chunk_rows} {} {}",
                prec.name(),
                mode.name()
            );
            let got = run_ring(&feats, d, sl, chunk_rows, Some((&m, mode, prec, 4, 0)))
                .unwrap_or_else(|e| panic!("{tag}: {e}"));
            let reference = (l, di.clone(), dtx.clone(), dt);
            let mut errs = ring_errs(&got, &cpu, &reference).to_vec();
            let g_db = db_sum(&got);
            errs.push(("dbias", rel_err(&[g_db], &[db_sum(&cpu)]), rel_err(&[g_db], &[db])));
            eprintln!("{tag}: {errs:?}");
            let (tol_loss, tol_grad) = loss_tols(prec, scale);
            for (what, e_cpu, e_ref) in errs {
                let tol = if what == "loss" { tol_loss } else { tol_grad };
                assert!(e_cpu <= tol, "{tag} {what}: {e_cpu:.3e} vs the CPU ring > {tol}");
                assert!(e_ref <= tol, "{tag} {what}: {e_ref:.3e} vs the reference > {tol}");
            }
        }
    }
}

/// The ring's blocks with the backward's G panels of 2 tiles (`CLIP_BWD_PANEL=2`), every
/// precision: one rank of 150 rows in chunks of 80, so rectangular blocks of two column tiles
/// (80 and 70 columns) whose positives lie at diagonal offsets 0 and -80, both modes: bitwise the
/// single-tile kernels' ring, and within tolerance of the CPU ring.
#[test]
fn ring_blocks_with_backward_panels_give_the_single_tile_results_bitwise() {
    let defs = Defines::parse(&["CLIP_BWD_PANEL=2"]).unwrap();
    let one = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let two = module_with("clip_loss.cu", &defs).unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(23);
    let (b, d, scale, chunk) = (150usize, 40usize, 20.0f32, 80usize);
    let feats = vec![(random_features(&mut rng, b, d), random_features(&mut rng, b, d))];
    let cpu = run_ring(&feats, d, (scale, None), chunk, None).expect("the CPU ring");
    for prec in Precision::ALL {
        let shared = bwd_shared_bytes(prec, &defs);
        let (_, tol_grad) = loss_tols(prec, scale);
        for mode in LossMode::ALL {
            let what = format!("{} {}", prec.name(), mode.name());
            let run = |m, shared| {
                run_ring(&feats, d, (scale, None), chunk, Some((m, mode, prec, 4, shared)))
                    .unwrap_or_else(|e| panic!("{what}: {e}"))
            };
            let (p, s) = (run(&two, shared), run(&one, 0));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&p[0].d_img_local) == bits(&s[0].d_img_local), "{what}: dI");
            assert!(bits(&p[0].d_txt_local) == bits(&s[0].d_txt_local), "{what}: dT");
            assert_eq!(p[0].d_t_partial.to_bits(), s[0].d_t_partial.to_bits(), "{what}");
            let e = rel_err(&p[0].d_txt_local, &to64(&cpu[0].d_txt_local));
            assert!(e <= tol_grad, "{what}: dT {e:.3e} vs the CPU ring");
        }
    }
}

/// The ring's blocks with the backward's columns split (a wave of 64 blocks, as a small ring
/// step on a GPU has): one rank of 150 rows in chunks of 70, so rectangular blocks of three row
/// tiles against two column tiles, where deterministic mode's three splits leave the first pass
/// a split without tiles (not folded) and fast mode adds dI atomically from two; and two ranks
/// of 90 and 57 rows. fp32 and bf16, both modes, against the CPU ring and the f64 reference.
/// Sensitivity, tried by hand: with the block's dT folded over the first pass's count of shares
/// (1, not 2), fp32 deterministic dT is off by 0.38 from the CPU ring.
#[test]
fn ring_blocks_with_backward_column_splits_match_the_cpu_ring() {
    use LossMode::{Deterministic as Det, Fast};
    use Precision::{Bf16, Fp32};
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let wave = 64;
    let det = plan_bwd(Det, 150, 70, 40, wave, None);
    assert_eq!((det.splits(), det.folds), (3, (1, 2)), "the case below splits as described");
    assert_eq!(plan_bwd(Fast, 150, 70, 40, wave, None).splits(), 2);
    let runs: &[(LossMode, Precision)] = &[(Det, Fp32), (Fast, Fp32), (Det, Bf16), (Fast, Bf16)];
    check_against_cpu_ring(&m, 31, wave, &[(&[150], 40, 70, runs), (&[90, 57], 67, 80, runs)]);
}

/// The ring's blocks in deterministic mode give the same bits whatever order their launches run
/// their blocks in (a GPU keeps none): two ranks of 150 and 57 rows in chunks of 40, so
/// rectangular blocks with and without a positive, forward grids of several chunks and splits
/// and backward column splits (a wave of 64) with both passes' shares folded; fp32, TF32 and
/// bf16, against the in-order run, under two permuted orders. Sensitivity, tried by hand:
/// deterministic mode's splits adding into dA atomically (no shares, no fold) fail it.
#[test]
fn ring_blocks_in_deterministic_mode_give_the_same_bits_whatever_the_block_order() {
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(37);
    let (d, scale, chunk, wave) = (67usize, 20.0f32, 40usize, 64usize);
    // (Three splits: with two, each element would get two additions onto zero, the same in
    // either order whatever the kernel did.)
    assert_eq!(plan_bwd(LossMode::Deterministic, 40, 150, d, wave, None).splits(), 3);
    let feats: Vec<_> = [150usize, 57]
        .iter()
        .map(|&b| (random_features(&mut rng, b, d), random_features(&mut rng, b, d)))
        .collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for prec in [Precision::Fp32, Precision::Tf32, Precision::Bf16] {
        let ops = Some((&m, LossMode::Deterministic, prec, wave, 0));
        let run =
            || run_ring(&feats, d, (scale, None), chunk, ops).unwrap_or_else(|e| panic!("{e}"));
        let base = run();
        for seed in [1, 2] {
            let got = with_block_order(seed, run);
            for (r, (g, w)) in got.iter().zip(&base).enumerate() {
                let what = format!("{} rank {r}, block order {seed}", prec.name());
                assert_eq!(g.loss.to_bits(), w.loss.to_bits(), "{what}: loss");
                assert!(bits(&g.d_img_local) == bits(&w.d_img_local), "{what}: dI");
                assert!(bits(&g.d_txt_local) == bits(&w.d_txt_local), "{what}: dT");
                assert_eq!(g.d_t_partial.to_bits(), w.d_t_partial.to_bits(), "{what}: dt");
            }
        }
    }
}

/// `clip_merge_cols` (the device ring's merge of column statistics, rank/src/loss/ring_device.rs)
/// against the f64 log-sum-exp of both partials and against the CPU ring's merge: empty
/// partials on either side (m = −∞, z = 0), far-apart maxima, and more columns than the launch
/// has threads (the grid-stride loop).
#[test]
fn device_ring_column_merge_matches_the_f64_merge_and_the_cpu_ring() {
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(31);
    for n in [1usize, 7, 300, 1100] {
        let mut stats = |empty_every: usize| -> Vec<f32> {
            let mut v = vec![0.0f32; 2 * n];
            for j in 0..n {
                if empty_every > 0 && j % empty_every == 0 {
                    (v[j], v[n + j]) = (f32::NEG_INFINITY, 0.0);
                } else {
                    v[j] = (rng.normal() * 30.0) as f32;
                    v[n + j] = 1.0 + (rng.uniform() * 50.0) as f32;
                }
            }
            v
        };
        let (part0, inc) = (stats(3), stats(5));
        let mut part = Guarded::from(&part0, NAN_F32);
        let incoming = Guarded::from(&inc, NAN_F32);
        let mut a = Args::new();
        a.buf_mut(part.get_mut()).buf(incoming.get()).i64(n as i64);
        // Two blocks of 256 threads: fewer threads than columns at n = 1100.
        // SAFETY: clip_merge_cols(float* part, const float* inc, i64 n), both 2·n values.
        unsafe { m.launch("clip_merge_cols", (2, 1, 1), (256, 1, 1), 0, &mut a) }
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(part.intact() && incoming.intact(), "n {n}: wrote outside its buffers");
        let got = part.get();
        let mut cpu = part0.clone();
        crate::loss::ring::merge_into(&mut cpu, &inc);
        for j in 0..n {
            let lse = |m: f32, z: f32| {
                if z == 0.0 { f64::NEG_INFINITY } else { m as f64 + (z as f64).ln() }
            };
            let (l1, l2) = (lse(inc[j], inc[n + j]), lse(part0[j], part0[n + j]));
            let want = if l1 == f64::NEG_INFINITY && l2 == f64::NEG_INFINITY {
                f64::NEG_INFINITY
            } else {
                let mx = l1.max(l2);
                mx + ((l1 - mx).exp() + (l2 - mx).exp()).ln()
            };
            let g = lse(got[j], got[n + j]);
            let c = lse(cpu[j], cpu[n + j]);
            if want == f64::NEG_INFINITY {
                assert_eq!((got[j], got[n + j]), (f32::NEG_INFINITY, 0.0), "n {n} col {j}");
                continue;
            }
            assert!((g - want).abs() <= 1e-6 * want.abs().max(1.0), "n {n} col {j}: {g} vs {want}");
            assert!((c - want).abs() <= 1e-5 * want.abs().max(1.0), "n {n} col {j}: CPU {c}");
            assert!(got[n + j] >= 1.0 - 1e-6, "n {n} col {j}: z {} is below exp(0)", got[n + j]);
        }
    }
}
