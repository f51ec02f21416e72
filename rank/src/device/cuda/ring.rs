//! The CLIP ring loss with GPU tile work: [`GpuClipBlocks`] runs the blocks of the ring
//! schedule (rank/src/loss/ring.rs, [`ClipBlocks`]) with the fused kernels of `clip_loss.cu`,
//! so a job of several GPU ranks computes the loss as Inf-CL does: a ring across ranks, a grid
//! of 64 × 64 tiles inside a rank, the online log-sum-exp fused into each tile.
//!
//! This rank's image features stay on the GPU for the call; each visiting text block is
//! uploaded once per pass, and what travels on the ring (a block's column statistics, its
//! `∂L/∂T`) is downloaded to the host, as the ring's messages are host bytes. The row
//! statistics are folded into a running (max, sum) in f64 after every block, so the scratch is
//! `(chunks + splits) × block` partials whatever the number of ranks.
//!
//! Positives must be the diagonal (row `i` of rank `r` pairs with text `i` of rank `r`), which
//! is what training uses; the kernels take a block's diagonal as an offset.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::CudaError;
use super::gpu::{Gpu, LOSS_TILE, LossMode, Precision, drv, elem_cfg, plan_fwd_grid_rect};
use crate::loss::ring::{ClipBlocks, LossError};

/// The kernels' "no positive in this block" diagonal offset.
const NO_DIAG: i64 = i64::MIN;

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
    /// Global column of row 0's positive (rows pair with consecutive columns).
    row0: i64,
    /// No block folded into the running row statistics yet.
    first: bool,
    bufs: Bufs,
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
    pub fn new(gpu: &'g Gpu, mode: LossMode, precision: Precision) -> Result<Self, CudaError> {
        if precision == Precision::Bf16 {
            return Err(CudaError::Invalid(
                "the GPU ring loss runs in fp32, tf32 or tf32x3 (bf16 blocks need padded bf16 \
                 copies, not wired yet)"
                    .into(),
            ));
        }
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
            row0: 0,
            first: true,
            bufs: Bufs::default(),
        })
    }

    /// Device bytes held now.
    pub fn device_bytes(&self) -> usize {
        let b = &self.bufs;
        let f32s = [
            &b.img, &b.feat, &b.row_m, &b.row_z, &b.col_m, &b.col_z, &b.pos, &b.cols, &b.la_hi,
            &b.la_lo, &b.lb_hi, &b.lb_lo, &b.d_img, &b.d_feat,
        ];
        let f64s = [&b.run_m, &b.run_z, &b.dt_part];
        f32s.iter().map(|x| x.as_ref().map_or(0, |s| 4 * s.len())).sum::<usize>()
            + f64s.iter().map(|x| x.as_ref().map_or(0, |s| 8 * s.len())).sum::<usize>()
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
        let (br, bc) = (self.rows as i64, nb as i64);
        let diag = self.diag(col0, nb);
        let grid =
            plan_fwd_grid_rect(self.rows.div_ceil(LOSS_TILE), nb.div_ceil(LOSS_TILE), self.wave);
        let b = &mut self.bufs;
        ensure(gpu, &mut b.feat, nb * d)?;
        ensure(gpu, &mut b.row_m, grid.splits * self.rows)?;
        ensure(gpu, &mut b.row_z, grid.splits * self.rows)?;
        ensure(gpu, &mut b.col_m, grid.chunks * nb)?;
        ensure(gpu, &mut b.col_z, grid.chunks * nb)?;
        ensure(gpu, &mut b.cols, 2 * nb)?;
        let s = &gpu.stream;
        drv("upload a ring block", s.memcpy_htod(feat, &mut buf_mut!(b.feat).slice_mut(..nb * d)))?;
        let cfg = LaunchConfig {
            grid_dim: (grid.chunks as u32, grid.splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (d64, tpc, tps) = (d as i64, grid.tiles_per_chunk as i32, grid.tiles_per_split as i32);
        let f = gpu.func(&format!("clip_fwd{}", self.precision.suffix()))?;
        let mut l = s.launch_builder(f);
        l.arg(buf!(b.img)).arg(buf!(b.feat)).arg(&br).arg(&bc).arg(&d64).arg(&self.scale);
        l.arg(&diag).arg(&tpc).arg(&tps);
        l.arg(buf_mut!(b.row_m)).arg(buf_mut!(b.row_z)).arg(buf_mut!(b.col_m));
        l.arg(buf_mut!(b.col_z)).arg(buf_mut!(b.pos));
        // SAFETY: matches clip_fwd's signature; img holds rows·d, feat nb·d values, the row
        // partials splits·rows, the column partials chunks·nb, pos rows (ensured above).
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
            l.arg(buf!(b.col_m)).arg(buf!(b.col_z)).arg(&chunks).arg(&bc).arg(buf_mut!(b.cols));
            // SAFETY: matches clip_fold_cols; partials chunks·nb, output 2·nb.
            drv("launch clip_fold_cols", unsafe { l.launch(elem_cfg(nb)) })?;
        }
        drv("download column statistics", s.memcpy_dtoh(&buf!(b.cols).slice(..2 * nb), cols))?;
        gpu.sync()
    }

    fn bwd(
        &mut self,
        feat: &[f32],
        kap: &[f64],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<f64, CudaError> {
        let (gpu, d) = (self.gpu, self.d);
        let nb = feat.len() / d;
        if nb == 0 {
            return Ok(0.0);
        }
        let (br, bc, d64) = (self.rows as i64, nb as i64, d as i64);
        let diag = self.diag(col0, nb);
        let b = &mut self.bufs;
        ensure(gpu, &mut b.feat, nb * d)?;
        ensure(gpu, &mut b.lb_hi, nb)?;
        ensure(gpu, &mut b.lb_lo, nb)?;
        ensure(gpu, &mut b.d_feat, nb * d)?;
        ensure(gpu, &mut b.dt_part, self.rows.div_ceil(LOSS_TILE))?;
        let (kh, kl): (Vec<f32>, Vec<f32>) = kap.iter().map(|&k| hi_lo(k)).unzip();
        let s = &gpu.stream;
        drv("upload a ring block", s.memcpy_htod(feat, &mut buf_mut!(b.feat).slice_mut(..nb * d)))?;
        drv("upload column LSEs", s.memcpy_htod(&kh, &mut buf_mut!(b.lb_hi).slice_mut(..nb)))?;
        drv("upload column LSEs", s.memcpy_htod(&kl, &mut buf_mut!(b.lb_lo).slice_mut(..nb)))?;
        drv("zero the block's dT", s.memset_zeros(&mut buf_mut!(b.d_feat).slice_mut(..nb * d)))?;
        let f = gpu.func(&format!("clip_bwd{}", self.precision.suffix()))?;
        let null = 0u64;
        let mut dt = 0.0;
        if self.rows > 0 {
            let tiles = |n: usize| LaunchConfig {
                grid_dim: (n.div_ceil(LOSS_TILE) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            {
                let mut l = s.launch_builder(f);
                l.arg(buf!(b.img)).arg(buf!(b.feat)).arg(&br).arg(&bc).arg(&d64);
                l.arg(&self.scale).arg(&self.inv2b);
                l.arg(buf!(b.la_hi)).arg(buf!(b.la_lo)).arg(buf!(b.lb_hi)).arg(buf!(b.lb_lo));
                l.arg(&diag).arg(buf_mut!(b.d_img));
                match self.mode {
                    LossMode::Fast => l.arg(buf_mut!(b.d_feat)),
                    LossMode::Deterministic => l.arg(&null),
                };
                l.arg(buf_mut!(b.dt_part));
                // SAFETY: matches clip_bwd; A = img (rows·d), Bm = feat (nb·d), row LSEs
                // rows, column LSEs nb, dA rows·d, dB nb·d or null, dt_part ⌈rows/64⌉.
                drv("launch clip_bwd (ring dI)", unsafe { l.launch(tiles(self.rows)) })?;
            }
            if self.mode == LossMode::Deterministic {
                // The same G with the roles swapped: Bm's rows against this rank's rows.
                let swapped = if diag == NO_DIAG { NO_DIAG } else { -diag };
                let mut l = s.launch_builder(f);
                l.arg(buf!(b.feat)).arg(buf!(b.img)).arg(&bc).arg(&br).arg(&d64);
                l.arg(&self.scale).arg(&self.inv2b);
                l.arg(buf!(b.lb_hi)).arg(buf!(b.lb_lo)).arg(buf!(b.la_hi)).arg(buf!(b.la_lo));
                l.arg(&swapped).arg(buf_mut!(b.d_feat)).arg(&null).arg(&null);
                // SAFETY: as above with A and Bm swapped; dB and dt_part null.
                drv("launch clip_bwd (ring dT)", unsafe { l.launch(tiles(nb)) })?;
            }
            let parts = self.rows.div_ceil(LOSS_TILE);
            let mut host = vec![0.0f64; parts];
            drv("download dt partials", s.memcpy_dtoh(&buf!(b.dt_part).slice(..parts), &mut host))?;
            dt = host.iter().sum();
        }
        drv("download the block's dT", s.memcpy_dtoh(&buf!(b.d_feat).slice(..nb * d), d_feat))?;
        gpu.sync()?;
        Ok(dt)
    }
}

/// The diagonal offset of a block of `nb` columns starting at global column `col0`, for `rows`
/// rows whose positives are the consecutive columns from `row0`: row `r`'s positive is the
/// block's column `r + diag`, or NO_DIAG when none of them lies in the block.
fn block_diag(row0: i64, rows: usize, col0: usize, nb: usize) -> i64 {
    let diag = row0 - col0 as i64;
    let (first, last) = (diag, diag + rows as i64 - 1);
    if rows == 0 || nb == 0 || last < 0 || first >= nb as i64 { NO_DIAG } else { diag }
}

/// `v` as f32 hi + lo (the CPU ring's split, rank/src/loss/ring.rs).
fn hi_lo(v: f64) -> (f32, f32) {
    let hi = v as f32;
    (hi, (v - hi as f64) as f32)
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
        self.inv2b = (1.0 / (2.0 * big_b as f64)) as f32;
        self.first = true;
        let gpu = self.gpu;
        let b = &mut self.bufs;
        let r = (|| {
            ensure(gpu, &mut b.img, rows * d)?;
            ensure(gpu, &mut b.run_m, rows)?;
            ensure(gpu, &mut b.run_z, rows)?;
            ensure(gpu, &mut b.pos, rows)?;
            ensure(gpu, &mut b.la_hi, rows)?;
            ensure(gpu, &mut b.la_lo, rows)?;
            ensure(gpu, &mut b.d_img, rows * d)?;
            let s = &gpu.stream;
            drv(
                "upload image features",
                s.memcpy_htod(img, &mut buf_mut!(b.img).slice_mut(..rows * d)),
            )
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
        let (lh, ll): (Vec<f32>, Vec<f32>) = lse.iter().map(|&v| hi_lo(v)).unzip();
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
        self.bwd(feat, kap, col0, d_feat).map_err(gpu_err)
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
}
