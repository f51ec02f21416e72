//! The CLIP ring loss with GPU tile work: [`GpuClipBlocks`] runs the blocks of the ring
//! schedule (rank/src/loss/ring.rs, [`ClipBlocks`]) with the fused kernels of `clip_loss.cu`,
//! so a job of several GPU ranks computes the loss as Inf-CL does: a ring across ranks, a grid
//! of 64 × 64 tiles inside a rank, the online log-sum-exp fused into each tile.
//!
//! SigLIP runs on the same blocks (`sig_begin`, `sig_block`, `sig_round`): one pass of the
//! ring, each block through `siglip_bwd*`, the backward kernels with the sigmoid's G
//! (`clip_bwd_impl`'s SIG), which also return the block's loss terms and `Σ G` (∂L/∂β). No
//! statistics travel: only the blocks and their `∂L/∂T`.
//!
//! This rank's image features stay on the GPU for the call; each visiting text block is
//! uploaded once per pass, and what travels on the ring (a block's column statistics, its
//! `∂L/∂T`) is downloaded to the host, as the ring's messages are host bytes. The row
//! statistics are folded into a running (max, sum) in f64 after every block, so the scratch is
//! `(chunks + splits) × block` partials whatever the number of ranks.
//!
//! Positives must be the diagonal (row `i` of rank `r` pairs with text `i` of rank `r`), which
//! is what training uses; the kernels take a block's diagonal as an offset.
//!
//! [`Precision::Bf16`]: the features still arrive and the gradients still leave in fp32.
//! `clip_to_bf16` writes a zero-padded bf16 copy ([`bf16_layout`]) of the image features once
//! per call (in `begin`) and of each visiting block after its upload (forward and backward
//! pass alike), and `clip_fwd_bf16` / `clip_bwd_bf16` read those copies with the same
//! (`BR`, `BC`, diag) block arguments as the fp32 kernels; the statistics, `G` and the
//! gradient accumulators are fp32 (f64 where the fp32 ring's are), as in the single-GPU path.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use tessera_collectives::Communicator;

use super::CudaError;
use super::gpu::{
    Gpu, LOSS_TILE, LossMode, Precision, bf16_layout, drv, elem_cfg, plan_fwd_grid_rect,
};
use super::nccl::NcclComm;
use crate::loss::ring::{
    ClipBlocks, LossError, host_bwd_round, host_fwd_round, host_sig_round, split_hi_lo,
};
use crate::loss::ring_device::{
    DeviceRing, DeviceSlots, device_bwd_round, device_fwd_round, device_sig_round,
};

/// The kernels' "no positive in this block" diagonal offset.
pub(super) const NO_DIAG: i64 = i64::MIN;

fn gpu_err(e: CudaError) -> LossError {
    LossError::Invalid(format!(
        "the GPU ring loss failed: {e} (run.cuda_loss = \"host\" computes the loss on the CPU)"
    ))
}

/// Grows `buf` to hold `len` values (contents not kept).
fn ensure<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    buf: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<(), CudaError> {
    if buf.as_ref().is_none_or(|b| b.len() < len.max(1)) {
        *buf = Some(gpu.zeros::<T>(len.max(1))?);
    }
    Ok(())
}

/// Device buffers of one call, grown to the largest block seen.
#[derive(Default)]
struct Bufs {
    img: Option<CudaSlice<f32>>,
    feat: Option<CudaSlice<f32>>,
    row_m: Option<CudaSlice<f32>>,
    row_z: Option<CudaSlice<f32>>,
    col_m: Option<CudaSlice<f32>>,
    col_z: Option<CudaSlice<f32>>,
    run_m: Option<CudaSlice<f64>>,
    run_z: Option<CudaSlice<f64>>,
    pos: Option<CudaSlice<f32>>,
    cols: Option<CudaSlice<f32>>,
    la_hi: Option<CudaSlice<f32>>,
    la_lo: Option<CudaSlice<f32>>,
    lb_hi: Option<CudaSlice<f32>>,
    lb_lo: Option<CudaSlice<f32>>,
    d_img: Option<CudaSlice<f32>>,
    d_feat: Option<CudaSlice<f32>>,
    dt_part: Option<CudaSlice<f64>>,
    /// Deterministic mode's column splits' shares of the block's dI and dT
    /// ([`super::gpu::BwdPlan::parts_len`]).
    parts: Option<CudaSlice<f32>>,
    /// [`Precision::Bf16`]: the padded bf16 copies ([`bf16_layout`]) of `img` and of the
    /// visiting block (`feat`).
    img_h: Option<CudaSlice<u16>>,
    feat_h: Option<CudaSlice<u16>>,
}

/// [`ClipBlocks`] on one GPU (see the module documentation).
pub struct GpuClipBlocks<'g> {
    gpu: &'g Gpu,
    mode: LossMode,
    precision: Precision,
    /// Forward blocks in one wave (multiprocessors × resident blocks).
    wave: usize,
    rows: usize,
    d: usize,
    scale: f32,
    inv2b: f32,
    /// SigLIP: the logit bias and 1/B.
    bias: f32,
    inv_b: f32,
    /// Global column of row 0's positive (rows pair with consecutive columns).
    row0: i64,
    /// No block folded into the running row statistics yet.
    first: bool,
    bufs: Bufs,
    /// How the rounds move the blocks between ranks.
    travel: BlockTravel,
    ring_slots: DeviceSlots<CudaSlice<f32>>,
}

macro_rules! buf {
    ($b:expr) => {
        $b.as_ref().expect("allocated by begin or before the launch")
    };
}
macro_rules! buf_mut {
    ($b:expr) => {
        $b.as_mut().expect("allocated by begin or before the launch")
    };
}

impl<'g> GpuClipBlocks<'g> {
    /// Blocks for every [`LossMode`] and [`Precision`].
    pub fn new(gpu: &'g Gpu, mode: LossMode, precision: Precision) -> Result<Self, CudaError> {
        let wave = super::gpu::forward_wave(gpu)?;
        Ok(GpuClipBlocks {
            gpu,
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
            bufs: Bufs::default(),
            travel: BlockTravel::DeviceOverNccl,
            ring_slots: DeviceSlots::default(),
        })
    }

    /// How the rounds move the blocks ([`BlockTravel::DeviceOverNccl`] by default).
    pub fn with_travel(mut self, travel: BlockTravel) -> Self {
        self.travel = travel;
        self
    }

    /// Fast mode: one pass, the block's dT by atomicAdd. Deterministic mode: the pass and its
    /// swap (the block's rows against this rank's rows -> the block's dT) in one launch of the
    /// paired kernel (grid y = 2).
    /// The SigLIP versions (`siglip_bwd*`) where `sig`.
    fn bwd_kernel(mode: LossMode, precision: Precision, sig: bool) -> String {
        if sig {
            return siglip_kernel(mode, precision);
        }
        match mode {
            LossMode::Fast => format!("clip_bwd{}", precision.suffix()),
            LossMode::Deterministic => precision.bwd_pair(),
        }
    }

    /// Device bytes held now.
    pub fn device_bytes(&self) -> usize {
        let b = &self.bufs;
        let f32s = [
            &b.img, &b.feat, &b.row_m, &b.row_z, &b.col_m, &b.col_z, &b.pos, &b.cols, &b.la_hi,
            &b.la_lo, &b.lb_hi, &b.lb_lo, &b.d_img, &b.d_feat, &b.parts,
        ];
        let f64s = [&b.run_m, &b.run_z, &b.dt_part];
        let u16s = [&b.img_h, &b.feat_h];
        f32s.iter().map(|x| x.as_ref().map_or(0, |s| 4 * s.len())).sum::<usize>()
            + f64s.iter().map(|x| x.as_ref().map_or(0, |s| 8 * s.len())).sum::<usize>()
            + u16s.iter().map(|x| x.as_ref().map_or(0, |s| 2 * s.len())).sum::<usize>()
            + 4 * self.ring_slots.values(|s| s.len())
    }

    /// How this call's rounds move the blocks over `comm`: `None` for host messages.
    fn link<'c>(&self, comm: &'c mut dyn Communicator) -> Option<Link<'c>> {
        let over_nccl = comm.world() > 1
            && comm.as_any_mut().is_some_and(|a| a.downcast_mut::<NcclComm>().is_some());
        match self.travel {
            BlockTravel::Host => None,
            BlockTravel::DeviceOverNccl | BlockTravel::Device if over_nccl => {
                comm.as_any_mut().and_then(|a| a.downcast_mut::<NcclComm>()).map(Link::Nccl)
            }
            BlockTravel::DeviceOverNccl => None,
            BlockTravel::Device => Some(Link::Staged(comm)),
        }
    }

    /// Runs `round` on the device ring over `comm` with this call's slots, where the blocks
    /// travel that way ([`Self::link`]); `None` where they travel as host messages.
    fn device_round<T>(
        &mut self,
        comm: &mut dyn Communicator,
        round: impl FnOnce(
            &mut GpuRing<'_, 'g>,
            &mut DeviceSlots<CudaSlice<f32>>,
        ) -> Result<T, LossError>,
    ) -> Option<Result<T, LossError>> {
        let link = self.link(comm)?;
        let mut slots = std::mem::take(&mut self.ring_slots);
        let r = round(&mut GpuRing { link, blocks: self }, &mut slots);
        self.ring_slots = slots;
        Some(r)
    }

    fn bf16(&self) -> bool {
        self.precision == Precision::Bf16
    }

    fn diag(&self, col0: usize, nb: usize) -> i64 {
        block_diag(self.row0, self.rows, col0, nb)
    }

    fn fwd(&mut self, feat: &[f32], col0: usize, cols: &mut [f32]) -> Result<(), CudaError> {
        let (gpu, d) = (self.gpu, self.d);
        let nb = feat.len() / d;
        if nb == 0 {
            return Ok(()); // an empty chunk: nothing to fold, no columns
        }
        let b = &mut self.bufs;
        ensure(gpu, &mut b.feat, nb * d)?;
        ensure(gpu, &mut b.cols, 2 * nb)?;
        let s = &gpu.stream;
        drv("upload a ring block", s.memcpy_htod(feat, &mut buf_mut!(b.feat).slice_mut(..nb * d)))?;
        self.fwd_queue(None, nb, col0, None)?;
        let b = &self.bufs;
        drv("download column statistics", s.memcpy_dtoh(&buf!(b.cols).slice(..2 * nb), cols))?;
        gpu.sync()
    }

    /// Queues the forward over the block of `nb` rows whose features are `feat` on the device
    /// (`None`: the upload buffer), its column statistics (`[m; nb]` then `[z; nb]`) into `out`
    /// (`None`: the download buffer), on the compute stream; waits for nothing.
    fn fwd_queue(
        &mut self,
        feat: Option<&CudaSlice<f32>>,
        nb: usize,
        col0: usize,
        out: Option<&mut CudaSlice<f32>>,
    ) -> Result<(), CudaError> {
        let (gpu, d) = (self.gpu, self.d);
        if nb == 0 {
            return Ok(());
        }
        let (br, bc) = (self.rows as i64, nb as i64);
        let diag = self.diag(col0, nb);
        let grid =
            plan_fwd_grid_rect(self.rows.div_ceil(LOSS_TILE), nb.div_ceil(LOSS_TILE), self.wave);
        let (bf16, ld) = (self.bf16(), operand_stride(self.precision, d) as i64);
        let b = &mut self.bufs;
        ensure(gpu, &mut b.row_m, grid.splits * self.rows)?;
        ensure(gpu, &mut b.row_z, grid.splits * self.rows)?;
        ensure(gpu, &mut b.col_m, grid.chunks * nb)?;
        ensure(gpu, &mut b.col_z, grid.chunks * nb)?;
        let feat_d: &CudaSlice<f32> = match feat {
            Some(f) => f,
            None => buf!(b.feat),
        };
        let cols_d: &mut CudaSlice<f32> = match out {
            Some(o) => o,
            None => buf_mut!(b.cols),
        };
        if feat_d.len() < nb * d || cols_d.len() < 2 * nb {
            return Err(CudaError::Invalid(format!(
                "ring forward: {} feature and {} statistic values on the device for a block \
                 of {nb} × {d}",
                feat_d.len(),
                cols_d.len()
            )));
        }
        let s = &gpu.stream;
        if bf16 {
            to_bf16(gpu, feat_d, nb, d, &mut b.feat_h)?;
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.chunks as u32, grid.splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (tpc, tps) = (grid.tiles_per_chunk as i32, grid.tiles_per_split as i32);
        let f = gpu.func(&format!("clip_fwd{}", self.precision.suffix()))?;
        let mut l = s.launch_builder(f);
        if bf16 {
            l.arg(buf!(b.img_h)).arg(buf!(b.feat_h))
        } else {
            l.arg(buf!(b.img)).arg(feat_d)
        };
        // The row stride: d, or that of the bf16 copies (clip_fwd_bf16 takes it in place of d).
        l.arg(&br).arg(&bc).arg(&ld).arg(&self.scale);
        l.arg(&diag).arg(&tpc).arg(&tps);
        l.arg(buf_mut!(b.row_m)).arg(buf_mut!(b.row_z)).arg(buf_mut!(b.col_m));
        l.arg(buf_mut!(b.col_z)).arg(buf_mut!(b.pos));
        // SAFETY: matches clip_fwd*'s signature; img holds rows·d, feat nb·d values (checked
        // above; bf16: the copies hold bf16_layout(rows, d) and bf16_layout(nb, d), written by
        // to_bf16), the row partials splits·rows, the column partials chunks·nb, pos rows
        // (ensured above).
        drv("launch clip_fwd (ring block)", unsafe { l.launch(cfg) })?;
        if self.rows > 0 {
            let (splits, first) = (grid.splits as i32, i32::from(self.first));
            let f = gpu.func("clip_fold_rows")?;
            let mut l = s.launch_builder(f);
            l.arg(buf!(b.row_m)).arg(buf!(b.row_z)).arg(&splits).arg(&br).arg(&first);
            l.arg(buf_mut!(b.run_m)).arg(buf_mut!(b.run_z));
            // SAFETY: matches clip_fold_rows; partials splits·rows, running stats rows.
            drv("launch clip_fold_rows", unsafe { l.launch(elem_cfg(self.rows)) })?;
            self.first = false;
        }
        {
            let chunks = grid.chunks as i32;
            let f = gpu.func("clip_fold_cols")?;
            let mut l = s.launch_builder(f);
            l.arg(buf!(b.col_m)).arg(buf!(b.col_z)).arg(&chunks).arg(&bc).arg(cols_d);
            // SAFETY: matches clip_fold_cols; partials chunks·nb, output ≥ 2·nb (checked).
            drv("launch clip_fold_cols", unsafe { l.launch(elem_cfg(nb)) })?;
        }
        Ok(())
    }

    /// What both losses' calls begin with: checks the positives, keeps the sizes, uploads this
    /// rank's image features (and their bf16 copy) and sizes `∂L/∂I`.
    fn load_rows(
        &mut self,
        img: &[f32],
        pos: &[usize],
        d: usize,
        scale: f32,
    ) -> Result<(), LossError> {
        let rows = img.len() / d;
        let row0 = pos.first().copied().unwrap_or(0);
        if pos.iter().enumerate().any(|(i, &p)| p != row0 + i) {
            return Err(LossError::Invalid(
                "the GPU ring loss takes the diagonal positives only (row i pairs with text i); \
                 use run.cuda_loss = \"host\" for other positives"
                    .into(),
            ));
        }
        (self.rows, self.d, self.scale, self.row0) = (rows, d, scale, row0 as i64);
        let (gpu, bf16) = (self.gpu, self.bf16());
        let b = &mut self.bufs;
        let r = (|| {
            ensure(gpu, &mut b.img, rows * d)?;
            ensure(gpu, &mut b.d_img, rows * d)?;
            let s = &gpu.stream;
            drv(
                "upload image features",
                s.memcpy_htod(img, &mut buf_mut!(b.img).slice_mut(..rows * d)),
            )?;
            if bf16 {
                // Allocated (at least one value) even without rows: the kernels take it.
                to_bf16(gpu, buf!(b.img), rows, d, &mut b.img_h)?;
            }
            Ok(())
        })();
        r.map_err(gpu_err)
    }

    /// A block's backward as host messages, for either loss: uploads the block's features (and
    /// CLIP's column LSEs `kap`; `None`: SigLIP), queues [`Self::grad_queue`], downloads the
    /// block's `∂L/∂T` into `d_feat`. Returns the block's sums as `grad_queue` does.
    fn grad_block(
        &mut self,
        feat: &[f32],
        kap: Option<&[f64]>,
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<[f64; 3], CudaError> {
        let (gpu, d) = (self.gpu, self.d);
        let nb = feat.len() / d;
        if nb == 0 {
            return Ok([0.0; 3]);
        }
        let b = &mut self.bufs;
        ensure(gpu, &mut b.feat, nb * d)?;
        ensure(gpu, &mut b.d_feat, nb * d)?;
        let s = &gpu.stream;
        drv("upload a ring block", s.memcpy_htod(feat, &mut buf_mut!(b.feat).slice_mut(..nb * d)))?;
        let loss = match kap {
            Some(kap) => {
                ensure(gpu, &mut b.lb_hi, nb)?;
                ensure(gpu, &mut b.lb_lo, nb)?;
                let (kh, kl): (Vec<f32>, Vec<f32>) = kap.iter().map(|&k| split_hi_lo(k)).unzip();
                let (hi, lo) = (buf_mut!(b.lb_hi), buf_mut!(b.lb_lo));
                drv("upload column LSEs", s.memcpy_htod(&kh, &mut hi.slice_mut(..nb)))?;
                drv("upload column LSEs", s.memcpy_htod(&kl, &mut lo.slice_mut(..nb)))?;
                Pairwise::Softmax(None)
            }
            None => Pairwise::Sigmoid,
        };
        let sums = self.grad_queue(loss, None, nb, col0, None)?;
        let b = &self.bufs;
        drv("download the block's dT", s.memcpy_dtoh(&buf!(b.d_feat).slice(..nb * d), d_feat))?;
        gpu.sync()?;
        Ok(sums)
    }

    /// Queues the backward over the block of `nb` rows whose features are `feat` on the device
    /// (`None`: the upload buffer) and whose column LSEs are `kap` (`[hi; nb]` then `[lo; nb]`;
    /// `None`: the upload buffers), its `∂L/∂T` into `out` (`None`: the download buffer), on
    /// the compute stream. Returns `Σ G∘X` over the block: the one wait, for its partials.
    fn bwd_queue(
        &mut self,
        feat: Option<&CudaSlice<f32>>,
        kap: Option<&CudaSlice<f32>>,
        nb: usize,
        col0: usize,
        out: Option<&mut CudaSlice<f32>>,
    ) -> Result<f64, CudaError> {
        Ok(self.grad_queue(Pairwise::Softmax(kap), feat, nb, col0, out)?[0])
    }

    /// SigLIP's work on the block of `nb` rows in `feat` (first row at global column `col0`)
    /// against the rows of `sig_begin`, its `∂L/∂T` into `out`, on the compute stream: the
    /// kernels alone, for timing (`tessera cuda bench-loss --loss siglip`). Returns the block's
    /// `[Σ G∘X, Σ loss terms, Σ G]`.
    pub fn sig_queue(
        &mut self,
        feat: &CudaSlice<f32>,
        nb: usize,
        col0: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<[f64; 3], CudaError> {
        self.grad_queue(Pairwise::Sigmoid, Some(feat), nb, col0, Some(out))
    }

    /// [`Self::bwd_queue`] for either loss: SigLIP's block (`Pairwise::Sigmoid`) returns
    /// `[Σ G∘X, Σ loss terms, Σ G]`, CLIP's `[Σ G∘X, 0, 0]`.
    fn grad_queue(
        &mut self,
        loss: Pairwise<'_>,
        feat: Option<&CudaSlice<f32>>,
        nb: usize,
        col0: usize,
        out: Option<&mut CudaSlice<f32>>,
    ) -> Result<[f64; 3], CudaError> {
        let (gpu, d) = (self.gpu, self.d);
        if nb == 0 {
            return Ok([0.0; 3]);
        }
        let sig = matches!(loss, Pairwise::Sigmoid);
        // Values per block of the partial sums (clip_bwd_impl).
        let nv = if sig { 3 } else { 1 };
        let (br, bc, d64) = (self.rows as i64, nb as i64, d as i64);
        let (bf16, ld) = (self.bf16(), operand_stride(self.precision, d) as i64);
        let diag = self.diag(col0, nb);
        let b = &mut self.bufs;
        let kernel = Self::bwd_kernel(self.mode, self.precision, sig);
        let bwd_wave = super::gpu::backward_wave(gpu, &kernel)?;
        let plan = super::gpu::plan_bwd(self.mode, self.rows, nb, d, bwd_wave, None);
        ensure(gpu, &mut b.dt_part, nv * plan.dt_parts)?;
        if plan.parts_len > 0 {
            ensure(gpu, &mut b.parts, plan.parts_len)?;
        }
        let feat_d: &CudaSlice<f32> = match feat {
            Some(f) => f,
            None => buf!(b.feat),
        };
        let lb = match loss {
            Pairwise::Sigmoid => None,
            Pairwise::Softmax(Some(k)) if k.len() >= 2 * nb => {
                Some((k.slice(..nb), k.slice(nb..2 * nb)))
            }
            Pairwise::Softmax(Some(k)) => {
                return Err(CudaError::Invalid(format!(
                    "ring backward: {} column LSE values on the device for {nb} columns",
                    k.len()
                )));
            }
            Pairwise::Softmax(None) => Some((buf!(b.lb_hi).slice(..nb), buf!(b.lb_lo).slice(..nb))),
        };
        let d_feat: &mut CudaSlice<f32> = match out {
            Some(o) => o,
            None => buf_mut!(b.d_feat),
        };
        if feat_d.len() < nb * d || d_feat.len() < nb * d {
            return Err(CudaError::Invalid(format!(
                "ring backward: {} feature and {} gradient values on the device for a block \
                 of {nb} × {d}",
                feat_d.len(),
                d_feat.len()
            )));
        }
        let s = &gpu.stream;
        if bf16 {
            to_bf16(gpu, feat_d, nb, d, &mut b.feat_h)?;
        }
        drv("zero the block's dT", s.memset_zeros(&mut d_feat.slice_mut(..nb * d)))?;
        // Self::bwd_kernel; in deterministic mode d_feat takes the swapped pass's dA (the
        // paired kernel's grid covers the longer pass's row tiles). Columns split as planned.
        let f = gpu.func(&kernel)?;
        let mut sums = [0.0f64; 3];
        if self.rows > 0 {
            let cfg = LaunchConfig {
                grid_dim: plan.grid,
                block_dim: (256, 1, 1),
                shared_mem_bytes: super::gpu::bwd_shared_bytes(self.precision, &gpu.defines),
            };
            let null_parts = 0u64;
            let mut l = s.launch_builder(f);
            if bf16 {
                // The bf16 kernels take the copies' row stride after d.
                l.arg(buf!(b.img_h)).arg(buf!(b.feat_h)).arg(&br).arg(&bc).arg(&d64).arg(&ld)
            } else {
                l.arg(buf!(b.img)).arg(feat_d).arg(&br).arg(&bc).arg(&d64)
            };
            match &lb {
                Some((lb_hi, lb_lo)) => {
                    l.arg(&self.scale).arg(&self.inv2b);
                    l.arg(buf!(b.la_hi)).arg(buf!(b.la_lo)).arg(lb_hi).arg(lb_lo);
                }
                None => {
                    l.arg(&self.scale).arg(&self.bias).arg(&self.inv_b);
                }
            }
            l.arg(&diag).arg(buf_mut!(b.d_img)).arg(&mut *d_feat).arg(buf_mut!(b.dt_part));
            if plan.parts_len > 0 {
                l.arg(buf_mut!(b.parts));
            } else {
                l.arg(&null_parts);
            }
            // SAFETY: matches clip_bwd* and clip_bwd_pair* (siglip_bwd*: scale, bias, inv_b in
            // place of scale, inv2b and the four LSE pointers); A = img (rows·d), Bm = feat
            // (nb·d, checked above) (bf16: their copies, bf16_layout(rows, d) and
            // bf16_layout(nb, d) with row stride ld), row LSEs rows, column LSEs nb, dA rows·d,
            // dB ≥ nb·d (checked), dt_part nv · plan.dt_parts (written by the first pass's
            // blocks only), parts plan.parts_len or null where the plan has none; the paired
            // kernel's blocks past a pass's tiles return at once.
            drv(&format!("launch {kernel} (ring block)"), unsafe { l.launch(cfg) })?;
            let d_img = buf_mut!(b.d_img);
            let n_a = self.rows * d;
            super::gpu::fold_bwd_shares(gpu, &plan, b.parts.as_ref(), d_img, n_a, d_feat, nb * d)?;
            let n = nv * plan.dt_parts;
            let mut host = vec![0.0f64; n];
            drv("download dt partials", s.memcpy_dtoh(&buf!(b.dt_part).slice(..n), &mut host))?;
            for (k, sum) in sums.iter_mut().enumerate().take(nv) {
                *sum = host.iter().skip(k).step_by(nv).sum();
            }
        }
        Ok(sums)
    }
}

/// SigLIP's block kernel in `mode` and `precision`: fast mode's single pass (`siglip_bwd*`,
/// the block's dT by atomicAdd) or deterministic mode's pair (`siglip_bwd_pair*`).
pub(super) fn siglip_kernel(mode: LossMode, precision: Precision) -> String {
    match mode {
        LossMode::Fast => format!("siglip_bwd{}", precision.suffix()),
        LossMode::Deterministic => format!("siglip_bwd_pair{}", precision.suffix()),
    }
}

/// Which loss a block's gradient kernel computes.
enum Pairwise<'k> {
    /// CLIP's softmax, with the block's column LSEs on the device (`None`: the upload buffers).
    Softmax(Option<&'k CudaSlice<f32>>),
    /// SigLIP's sigmoid (the bias and 1/B of `sig_begin`).
    Sigmoid,
}

/// The diagonal offset of a block of `nb` columns starting at global column `col0`, for `rows`
/// rows whose positives are the consecutive columns from `row0`: row `r`'s positive is the
/// block's column `r + diag`, or NO_DIAG when none of them lies in the block.
pub(super) fn block_diag(row0: i64, rows: usize, col0: usize, nb: usize) -> i64 {
    let diag = row0 - col0 as i64;
    let (first, last) = (diag, diag + rows as i64 - 1);
    if rows == 0 || nb == 0 || last < 0 || first >= nb as i64 { NO_DIAG } else { diag }
}

/// The row stride the kernels of `precision` read the features with: `d` for the fp32
/// operands, that of the padded bf16 copies ([`bf16_layout`]) for [`Precision::Bf16`].
pub(super) fn operand_stride(precision: Precision, d: usize) -> usize {
    match precision {
        Precision::Bf16 => bf16_layout(0, d).1,
        Precision::Fp32 | Precision::Tf32 | Precision::Tf32x3 => d,
    }
}

/// Launch shape of `clip_to_bf16` for a copy of `rows_p` (padded) rows: a block per row, at
/// most 65,535 blocks striding over the rest.
fn to_bf16_cfg(rows_p: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows_p.clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Queues `clip_to_bf16` for one matrix: the `n × d` fp32 values at the start of `src` into
/// `dst`, grown to the padded bf16 layout of `n` rows ([`bf16_layout`]; padding zeroed). The
/// kernel's second operand (the single-GPU loss's text features) is null.
fn to_bf16(
    gpu: &Gpu,
    src: &CudaSlice<f32>,
    n: usize,
    d: usize,
    dst: &mut Option<CudaSlice<u16>>,
) -> Result<(), CudaError> {
    let (rows_p, ld) = bf16_layout(n, d);
    ensure(gpu, dst, rows_p * ld)?;
    if rows_p == 0 {
        return Ok(());
    }
    if src.len() < n * d {
        return Err(CudaError::Invalid(format!(
            "ring bf16 copy: {} values on the device for {n} × {d}",
            src.len()
        )));
    }
    let (n64, d64, rows64, ld64) = (n as i64, d as i64, rows_p as i64, ld as i64);
    let null = 0u64;
    let mut l = gpu.stream.launch_builder(gpu.func("clip_to_bf16")?);
    l.arg(src).arg(&null).arg(&n64).arg(&d64).arg(&rows64).arg(&ld64);
    l.arg(buf_mut!(dst)).arg(&null);
    // SAFETY: matches clip_to_bf16 (txt and txt_h null: one matrix); src holds n·d values
    // (checked above), dst rows_p · ld (ensured above), which is what the kernel writes.
    drv("launch clip_to_bf16 (ring)", unsafe { l.launch(to_bf16_cfg(rows_p)) })?;
    Ok(())
}

impl ClipBlocks for GpuClipBlocks<'_> {
    fn begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        scale: f32,
        big_b: usize,
    ) -> Result<(), LossError> {
        self.load_rows(img, &pos, d, scale)?;
        self.inv2b = (1.0 / (2.0 * big_b as f64)) as f32;
        self.first = true;
        let (gpu, rows) = (self.gpu, self.rows);
        let b = &mut self.bufs;
        // CLIP's row state: the running statistics, the positives' logits, the row LSEs.
        let r = (|| {
            for buf in [&mut b.pos, &mut b.la_hi, &mut b.la_lo] {
                ensure(gpu, buf, rows)?;
            }
            ensure(gpu, &mut b.run_m, rows)?;
            ensure(gpu, &mut b.run_z, rows)
        })();
        r.map_err(gpu_err)
    }

    fn fwd_block(&mut self, feat: &[f32], col0: usize, cols: &mut [f32]) -> Result<(), LossError> {
        self.fwd(feat, col0, cols).map_err(gpu_err)
    }

    fn fwd_end(&mut self) -> Result<(Vec<f64>, f64), LossError> {
        let rows = self.rows;
        if rows == 0 {
            return Ok((Vec::new(), 0.0));
        }
        let r = (|| {
            let s = &self.gpu.stream;
            let b = &self.bufs;
            let (mut m, mut z, mut p) =
                (vec![0.0f64; rows], vec![0.0f64; rows], vec![0.0f32; rows]);
            drv("download row statistics", s.memcpy_dtoh(&buf!(b.run_m).slice(..rows), &mut m))?;
            drv("download row statistics", s.memcpy_dtoh(&buf!(b.run_z).slice(..rows), &mut z))?;
            drv("download positive logits", s.memcpy_dtoh(&buf!(b.pos).slice(..rows), &mut p))?;
            self.gpu.sync()?;
            let lse = m.iter().zip(&z).map(|(&m, &z)| m + z.ln()).collect();
            Ok((lse, p.iter().map(|&x| x as f64).sum()))
        })();
        r.map_err(gpu_err)
    }

    fn bwd_begin(&mut self, lse: &[f64]) -> Result<(), LossError> {
        let rows = self.rows;
        let (lh, ll): (Vec<f32>, Vec<f32>) = lse.iter().map(|&v| split_hi_lo(v)).unzip();
        let b = &mut self.bufs;
        let s = &self.gpu.stream;
        let r = (|| {
            if rows > 0 {
                drv(
                    "upload row LSEs",
                    s.memcpy_htod(&lh, &mut buf_mut!(b.la_hi).slice_mut(..rows)),
                )?;
                drv(
                    "upload row LSEs",
                    s.memcpy_htod(&ll, &mut buf_mut!(b.la_lo).slice_mut(..rows)),
                )?;
            }
            drv("zero dI", s.memset_zeros(buf_mut!(b.d_img)))
        })();
        r.map_err(gpu_err)
    }

    fn bwd_block(
        &mut self,
        feat: &[f32],
        kap: &[f64],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<f64, LossError> {
        Ok(self.grad_block(feat, Some(kap), col0, d_feat).map_err(gpu_err)?[0])
    }

    fn bwd_end(&mut self) -> Result<Vec<f32>, LossError> {
        let n = self.rows * self.d;
        let mut out = vec![0.0f32; n];
        let r = (|| {
            if n > 0 {
                let s = &self.gpu.stream;
                drv("download dI", s.memcpy_dtoh(&buf!(self.bufs.d_img).slice(..n), &mut out))?;
                self.gpu.sync()?;
            }
            Ok(())
        })();
        r.map_err(gpu_err)?;
        Ok(out)
    }

    fn held_bytes(&self) -> usize {
        // Host memory: the per-block staging vectors only; the device's is device_bytes().
        0
    }

    fn fwd_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
    ) -> Result<(Vec<f32>, usize), LossError> {
        let on_device = |ring: &mut GpuRing<'_, '_>, slots: &mut _| {
            device_fwd_round(ring, slots, lens, col0, d, own)
        };
        match self.device_round(comm, on_device) {
            Some(r) => r,
            None => host_fwd_round(self, comm, lens, col0, d, own),
        }
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
        let on_device = |ring: &mut GpuRing<'_, '_>, slots: &mut _| {
            device_bwd_round(ring, slots, lens, col0, d, own, kap)
        };
        match self.device_round(comm, on_device) {
            Some(r) => r,
            None => host_bwd_round(self, comm, lens, col0, d, own, kap),
        }
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
        self.load_rows(img, &pos, d, scale)?;
        (self.bias, self.inv_b) = (bias, (1.0 / big_b as f64) as f32);
        let r = drv("zero dI", self.gpu.stream.memset_zeros(buf_mut!(self.bufs.d_img)));
        r.map_err(gpu_err)
    }

    fn sig_block(
        &mut self,
        feat: &[f32],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<[f64; 3], LossError> {
        self.grad_block(feat, None, col0, d_feat).map_err(gpu_err)
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
        let on_device = |ring: &mut GpuRing<'_, '_>, slots: &mut _| {
            device_sig_round(ring, slots, lens, col0, d, own, &mut *sums)
        };
        match self.device_round(comm, on_device) {
            Some(r) => r,
            None => host_sig_round(self, comm, lens, col0, d, own, sums),
        }
    }
}

/// How the CLIP ring's rounds move the blocks between GPU ranks (`run.cuda_ring`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockTravel {
    /// Host messages through the communicator (`run.cuda_ring = "host"`): each hop downloads
    /// what it sends and the next block work uploads what arrived.
    Host,
    /// The blocks' device buffers ([`crate::loss::ring_device`]) where the communicator is
    /// NCCL with several ranks (NCCL send/recv on its stream, overlapping the block work);
    /// host messages otherwise (`run.cuda_ring = "device"`, the default).
    DeviceOverNccl,
    /// The device ring whatever the communicator: over one that is not NCCL each hop is staged
    /// through the host, in order, without overlap (the self-test's ranks sharing one GPU,
    /// which NCCL refuses).
    Device,
}

/// The transport of a [`GpuRing`].
enum Link<'c> {
    /// NCCL send/recv between device buffers on NCCL's stream.
    Nccl(&'c mut NcclComm),
    /// Any communicator: download, sized shift, upload, when the hop is queued.
    Staged(&'c mut dyn Communicator),
}

/// The device ring ([`crate::loss::ring_device`]) of [`GpuClipBlocks`]: the block work on the
/// GPU's compute stream, the hops through [`Link`]. Over NCCL they are send/recv groups on the
/// communicator's stream between the blocks' own device buffers, the streams ordered by joins.
struct GpuRing<'a, 'g> {
    link: Link<'a>,
    blocks: &'a mut GpuClipBlocks<'g>,
}

impl DeviceRing for GpuRing<'_, '_> {
    type Buf = CudaSlice<f32>;

    fn rank(&self) -> usize {
        match &self.link {
            Link::Nccl(c) => c.rank(),
            Link::Staged(c) => c.rank(),
        }
    }

    fn world(&self) -> usize {
        match &self.link {
            Link::Nccl(c) => c.world(),
            Link::Staged(c) => c.world(),
        }
    }

    fn alloc(&mut self, len: usize) -> Result<CudaSlice<f32>, LossError> {
        self.blocks.gpu.zeros::<f32>(len.max(1)).map_err(gpu_err)
    }

    fn capacity(buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn upload(&mut self, src: &[f32], dst: &mut CudaSlice<f32>) -> Result<(), LossError> {
        let s = &self.blocks.gpu.stream;
        let r = drv("upload a ring block", s.memcpy_htod(src, &mut dst.slice_mut(..src.len())));
        r.map_err(gpu_err)
    }

    fn download(&mut self, src: &CudaSlice<f32>, dst: &mut [f32]) -> Result<(), LossError> {
        let gpu = self.blocks.gpu;
        let r = drv(
            "download a ring accumulator",
            gpu.stream.memcpy_dtoh(&src.slice(..dst.len()), dst),
        );
        r.and_then(|()| gpu.sync()).map_err(gpu_err)
    }

    fn exchange(
        &mut self,
        send: [(&CudaSlice<f32>, usize); 3],
        recv: [(&mut CudaSlice<f32>, usize); 3],
    ) -> Result<(), LossError> {
        let mut recv = recv;
        let gpu = self.blocks.gpu;
        match &mut self.link {
            Link::Nccl(c) => {
                let compute = gpu.stream.clone();
                c.ring_exchange_f32_device_enqueue(&send, &mut recv, Some(&compute))?;
                Ok(())
            }
            Link::Staged(c) => {
                // After the block work queued so far (the exchange's place in the order).
                let mut msg = Vec::new();
                let mut host = Vec::new();
                for (b, n) in send.into_iter().filter(|(_, n)| *n > 0) {
                    host.resize(n, 0.0f32);
                    let r = drv(
                        "download a ring part",
                        gpu.stream.memcpy_dtoh(&b.slice(..n), &mut host[..]),
                    );
                    r.and_then(|()| gpu.sync()).map_err(gpu_err)?;
                    msg.extend(host.iter().flat_map(|v| v.to_le_bytes()));
                }
                let want = 4 * recv.iter().map(|(_, n)| n).sum::<usize>();
                let mut got = Vec::new();
                c.ring_shift_bytes_sized(&msg, &mut got, want)?;
                let mut at = 0;
                for (b, n) in recv.iter_mut().filter(|(_, n)| *n > 0) {
                    let vals: Vec<f32> = got[at..at + 4 * *n]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    at += 4 * *n;
                    let r = drv(
                        "upload a ring part",
                        gpu.stream.memcpy_htod(&vals, &mut b.slice_mut(..*n)),
                    );
                    r.map_err(gpu_err)?;
                }
                Ok(())
            }
        }
    }

    fn exchange_wait(&mut self) -> Result<(), LossError> {
        match &mut self.link {
            Link::Nccl(c) => {
                // The host waits with the watchdog; the compute stream then orders its next
                // work after the hop (complete, so the join costs the GPU nothing).
                c.wait()?;
                let r = drv(
                    "order the compute stream after the ring hop",
                    self.blocks.gpu.stream.join(c.stream()),
                );
                r.map_err(gpu_err)
            }
            // Done when queued, in the compute stream's order.
            Link::Staged(_) => Ok(()),
        }
    }

    fn fwd_block(
        &mut self,
        feat: &CudaSlice<f32>,
        nb: usize,
        col0: usize,
        cols: &mut CudaSlice<f32>,
    ) -> Result<(), LossError> {
        self.blocks.fwd_queue(Some(feat), nb, col0, Some(cols)).map_err(gpu_err)
    }

    fn bwd_block(
        &mut self,
        feat: &CudaSlice<f32>,
        kap: &CudaSlice<f32>,
        nb: usize,
        col0: usize,
        d_feat: &mut CudaSlice<f32>,
    ) -> Result<f64, LossError> {
        self.blocks.bwd_queue(Some(feat), Some(kap), nb, col0, Some(d_feat)).map_err(gpu_err)
    }

    fn sig_block(
        &mut self,
        feat: &CudaSlice<f32>,
        nb: usize,
        col0: usize,
        d_feat: &mut CudaSlice<f32>,
    ) -> Result<[f64; 3], LossError> {
        let b = &mut *self.blocks;
        b.grad_queue(Pairwise::Sigmoid, Some(feat), nb, col0, Some(d_feat)).map_err(gpu_err)
    }

    fn merge_cols(
        &mut self,
        partial: &mut CudaSlice<f32>,
        incoming: &CudaSlice<f32>,
        nb: usize,
    ) -> Result<(), LossError> {
        // clip_merge_cols(float* part, const float* inc, i64 n): 2·n values each.
        combine(self.blocks.gpu, "clip_merge_cols", partial, incoming, nb, 2 * nb)
    }

    fn add(
        &mut self,
        partial: &mut CudaSlice<f32>,
        incoming: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), LossError> {
        // add_inplace(float* y, const float* x, i64 n): n values each.
        combine(self.blocks.gpu, "add_inplace", partial, incoming, n, n)
    }
}

/// Launches `kernel(float* partial, const float* incoming, i64 n)`, an elementwise combine of
/// an incoming ring accumulator into this rank's, which reads and writes `len` values of each.
fn combine(
    gpu: &Gpu,
    kernel: &str,
    partial: &mut CudaSlice<f32>,
    incoming: &CudaSlice<f32>,
    n: usize,
    len: usize,
) -> Result<(), LossError> {
    if partial.len() < len || incoming.len() < len {
        return Err(gpu_err(CudaError::Invalid(format!(
            "ring {kernel}: {} and {} values on the device where it reads {len}",
            partial.len(),
            incoming.len()
        ))));
    }
    let n64 = n as i64;
    let r = (|| {
        let mut l = gpu.stream.launch_builder(gpu.func(kernel)?);
        l.arg(&mut *partial).arg(incoming).arg(&n64);
        // SAFETY: `kernel` is clip_merge_cols or add_inplace, both (float*, const float*, i64),
        // reading and writing `len` values of each buffer (checked above).
        drv(&format!("launch {kernel} (ring)"), unsafe { l.launch(elem_cfg(n)) })?;
        Ok(())
    })();
    r.map_err(gpu_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The positives of rows 100..150 (columns 100..150) against blocks around them: the offset
    /// where some lie in the block, NO_DIAG where none does.
    #[test]
    fn block_diagonal_offsets() {
        let at = |col0, nb| block_diag(100, 50, col0, nb);
        assert_eq!(at(100, 50), 0);
        assert_eq!(at(120, 20), -20, "rows 20..40 pair with columns 0..20");
        assert_eq!(at(90, 20), 10, "row 0 pairs with column 10");
        assert_eq!(at(149, 7), -49, "only the last row's positive is in the block");
        assert_eq!(at(150, 10), NO_DIAG, "every positive lies before the block");
        assert_eq!(at(40, 60), NO_DIAG, "every positive lies after the block");
        assert_eq!(at(100, 0), NO_DIAG);
        assert_eq!(block_diag(0, 0, 0, 10), NO_DIAG);
        // Every row's positive column, recovered from the offsets of the blocks of a ring.
        let mut seen = [0; 50];
        for (col0, nb) in [(0, 96), (96, 9), (105, 30), (135, 96)] {
            let dg = at(col0, nb);
            for (r, s) in seen.iter_mut().enumerate() {
                if dg != NO_DIAG && (0..nb as i64).contains(&(r as i64 + dg)) {
                    assert_eq!(col0 as i64 + r as i64 + dg, 100 + r as i64);
                    *s += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "each row's positive in exactly one block");
    }

    /// The fp32 precisions read the features with stride d; bf16 reads its copies with their
    /// padded stride. For the ring's operands (this rank's rows, blocks of any size) the bf16
    /// kernels' unconditional reads — every 64-row tile of the forward grid and of the
    /// backward's grid, each 16-byte piece of a row up to the stride — stay inside the copy
    /// `to_bf16` writes, and its launch covers the copy's rows.
    #[test]
    fn bf16_operands_cover_every_read_of_a_ring_block() {
        use super::super::gpu::BF16_PAD;
        for d in [1usize, 5, 8, 63, 64, 65, 67, 129, 512, 768] {
            for p in [Precision::Fp32, Precision::Tf32, Precision::Tf32x3] {
                assert_eq!(operand_stride(p, d), d, "{p:?}");
            }
            let ld = operand_stride(Precision::Bf16, d);
            assert!(ld >= d && ld < d + BF16_PAD && ld.is_multiple_of(BF16_PAD), "d {d}: ld {ld}");
            for n in [1usize, 9, 63, 64, 65, 96, 130, 157, 301, 4097] {
                let (rows_p, ld_n) = bf16_layout(n, d);
                assert_eq!(ld_n, ld, "one stride for every block of a call");
                let len = rows_p * ld;
                for target in [1usize, 132, 528] {
                    // This rank's rows against the block, and the block against the rows.
                    let g = plan_fwd_grid_rect(n.div_ceil(LOSS_TILE), 3, target);
                    let last_tile = (g.chunks * g.tiles_per_chunk).min(n.div_ceil(LOSS_TILE)) - 1;
                    assert!((last_tile + 1) * LOSS_TILE * ld <= len, "n {n} d {d}: {g:?}");
                    let g = plan_fwd_grid_rect(3, n.div_ceil(LOSS_TILE), target);
                    let last_tile = (g.splits * g.tiles_per_split).min(n.div_ceil(LOSS_TILE)) - 1;
                    assert!((last_tile + 1) * LOSS_TILE * ld <= len, "n {n} d {d}: {g:?}");
                }
                // The backward: one block per 64-row tile of A, chunks of 64 columns of Bm.
                assert!(n.div_ceil(LOSS_TILE) * LOSS_TILE * ld <= len);
                assert!(((d - 1) / 64 + 1) * 64 <= ld, "the last 64-wide chunk of a row");
                assert!(len < (n + LOSS_TILE) * (d + BF16_PAD), "at most a tile and a pad more");
                let cfg = to_bf16_cfg(rows_p);
                assert!(cfg.grid_dim.0 >= 1 && cfg.grid_dim.0 as usize <= rows_p.min(65535));
                assert_eq!(cfg.block_dim, (256, 1, 1));
            }
        }
        assert_eq!(operand_stride(Precision::Bf16, 67), 128);
        assert_eq!(bf16_layout(157, 67), (192, 128));
    }
}
