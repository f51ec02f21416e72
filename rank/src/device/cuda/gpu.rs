//! A CUDA context with every kernel of [`super::nvrtc::SOURCES`] compiled for its device and
//! loaded, plus typed launchers for the fused CLIP loss.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};

use super::CudaError;
use super::libs::{Lib, require};
use super::nvrtc::{SOURCES, compile};

/// One GPU with the kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `sm_XY` the kernels were compiled for.
    pub arch: String,
    /// Device name as the driver reports it.
    pub name: String,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Milliseconds NVRTC took for all sources.
    pub compile_ms: f64,
}

pub(crate) fn drv<T>(
    what: &str,
    r: Result<T, cudarc::driver::DriverError>,
) -> Result<T, CudaError> {
    r.map_err(|e| CudaError::driver(what, e))
}

impl Gpu {
    /// GPUs the driver reports (at least 1), or an error naming the driver and the fix.
    pub fn count() -> Result<usize, CudaError> {
        require(Lib::Driver)?;
        let n = drv("cuDeviceGetCount", CudaContext::device_count())?;
        if n <= 0 {
            return Err(CudaError::Invalid(
                "the CUDA driver loaded but reports no GPU (check nvidia-smi and \
                 CUDA_VISIBLE_DEVICES)"
                    .into(),
            ));
        }
        Ok(n as usize)
    }

    /// Opens device `ordinal`, compiles every kernel source for its architecture and loads it.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let n = Gpu::count()?;
        require(Lib::Nvrtc)?;
        if ordinal >= n {
            return Err(CudaError::Invalid(format!(
                "GPU {ordinal} requested but the driver reports {n} GPU(s)"
            )));
        }
        let ctx = drv("create context", CudaContext::new(ordinal))?;
        let (maj, min) = drv("compute capability", ctx.compute_capability())?;
        let name = drv("device name", ctx.name())?;
        let arch = format!("sm_{maj}{min}");
        let stream = ctx.default_stream();
        let t = std::time::Instant::now();
        let mut funcs = HashMap::new();
        for src in SOURCES {
            let c = compile(src, &arch)?;
            let module = drv(
                &format!("load module {}", src.name),
                ctx.load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin)),
            )?;
            for k in src.kernels {
                let f = drv(&format!("load kernel {k}"), module.load_function(k))?;
                funcs.insert(*k, f);
            }
        }
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(Gpu { ctx, stream, arch, name, funcs, compile_ms })
    }

    /// The loaded kernel `name`.
    pub fn func(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.funcs.get(name).ok_or_else(|| CudaError::Invalid(format!("no kernel named {name}")))
    }

    /// Host → device copy.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        v: &[T],
    ) -> Result<CudaSlice<T>, CudaError> {
        drv("copy to device", self.stream.clone_htod(v))
    }

    /// Device → host copy (synchronises the stream).
    pub fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        drv("copy to host", self.stream.clone_dtoh(s))
    }

    /// A zeroed device buffer.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        drv("allocate", self.stream.alloc_zeros::<T>(len.max(1)))
    }

    /// Waits for the stream.
    pub fn sync(&self) -> Result<(), CudaError> {
        drv("synchronize", self.stream.synchronize())
    }
}

/// Launch shape for grid-stride element kernels.
pub fn elem_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 8192) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Launch shape for one-block-per-row kernels (256 threads, 256 doubles of shared memory).
pub fn row_cfg(rows: usize) -> LaunchConfig {
    let blocks = rows.clamp(1, 65535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 256 * 8 }
}

/// Tile edge of the fused loss kernels (`TM`/`TN` in clip_loss.cu).
pub const LOSS_TILE: usize = 64;

/// Backward mode of the fused loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossMode {
    /// No atomics: dI and dT by two kernels, each recomputing the logits (bitwise repeatable).
    Deterministic,
    /// One backward kernel recomputing the logits once; dT by atomicAdd.
    Fast,
}

/// How the fused loss computes its logit tiles (statistics and gradient products are fp32 FMA
/// in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// fp32 FMA (SIMT).
    Fp32,
    /// 3xTF32 tensor cores (hi/lo split): close to fp32 accuracy.
    Tf32x3,
    /// TF32 tensor cores (10-bit mantissa inputs).
    Tf32,
}

impl Precision {
    /// All precisions.
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Tf32x3, Precision::Tf32];

    /// Kernel-name suffix and the name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32x3 => "tf32x3",
            Precision::Tf32 => "tf32",
        }
    }

    /// Parses `fp32`, `tf32x3` or `tf32`.
    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == s)
    }

    fn suffix(self) -> &'static str {
        match self {
            Precision::Fp32 => "",
            Precision::Tf32x3 => "_tf32x3",
            Precision::Tf32 => "_tf32",
        }
    }
}

/// Result of [`clip_loss`], copied to the host.
#[derive(Clone, Debug)]
pub struct GpuLossOut {
    pub loss: f64,
    pub d_img: Vec<f32>,
    pub d_txt: Vec<f32>,
    pub d_t: f64,
}

/// The device-side buffers of one fused-loss call (kept to time repeated calls).
pub struct LossBuffers {
    pub b: usize,
    pub d: usize,
    /// Forward grid: row chunks (grid x) of `tiles_per_chunk` row tiles each.
    pub chunks: usize,
    pub tiles_per_chunk: usize,
    /// Forward grid: column splits (grid y) of `tiles_per_split` column tiles each.
    pub splits: usize,
    pub tiles_per_split: usize,
    row_m: CudaSlice<f32>,
    row_z: CudaSlice<f32>,
    col_m: CudaSlice<f32>,
    col_z: CudaSlice<f32>,
    pos: CudaSlice<f32>,
    lse_hi: CudaSlice<f32>,
    lse_lo: CudaSlice<f32>,
    kap_hi: CudaSlice<f32>,
    kap_lo: CudaSlice<f32>,
    term: CudaSlice<f64>,
    loss: CudaSlice<f64>,
    dt_part: CudaSlice<f64>,
    dt: CudaSlice<f64>,
    pub d_img: CudaSlice<f32>,
    pub d_txt: CudaSlice<f32>,
}

impl LossBuffers {
    /// Buffers for batch `b`, dimension `d`. The forward grid (row chunks × column splits) is
    /// about one wave of resident blocks (see [`plan_fwd_grid`]), so the column and row
    /// partials take `(chunks + splits) · b · 8` bytes: linear in `b`.
    pub fn new(gpu: &Gpu, b: usize, d: usize) -> Result<LossBuffers, CudaError> {
        if b == 0 || d == 0 {
            return Err(CudaError::Invalid(format!("fused loss needs b, d > 0 (got {b}, {d})")));
        }
        let sms = drv(
            "multiprocessor count",
            gpu.ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            ),
        )?
        .max(1) as usize;
        // Resident blocks per multiprocessor: the least over the forward's precisions, so the
        // grid never spills into a second, mostly idle wave.
        drv("bind context", gpu.ctx.bind_to_thread())?;
        let mut per_sm = u32::MAX;
        for name in ["clip_fwd", "clip_fwd_tf32x3", "clip_fwd_tf32"] {
            let occ = drv(
                "occupancy of the fused-loss forward",
                gpu.func(name)?.occupancy_max_active_blocks_per_multiprocessor(256, 0, None),
            )?;
            per_sm = per_sm.min(occ);
        }
        let n_t = b.div_ceil(LOSS_TILE);
        let plan = plan_fwd_grid(n_t, sms * (per_sm.max(1) as usize));
        Ok(LossBuffers {
            b,
            d,
            chunks: plan.chunks,
            tiles_per_chunk: plan.tiles_per_chunk,
            splits: plan.splits,
            tiles_per_split: plan.tiles_per_split,
            row_m: gpu.zeros(plan.splits * b)?,
            row_z: gpu.zeros(plan.splits * b)?,
            col_m: gpu.zeros(plan.chunks * b)?,
            col_z: gpu.zeros(plan.chunks * b)?,
            pos: gpu.zeros(b)?,
            lse_hi: gpu.zeros(b)?,
            lse_lo: gpu.zeros(b)?,
            kap_hi: gpu.zeros(b)?,
            kap_lo: gpu.zeros(b)?,
            term: gpu.zeros(b)?,
            loss: gpu.zeros(1)?,
            dt_part: gpu.zeros(n_t)?,
            dt: gpu.zeros(1)?,
            d_img: gpu.zeros(b * d)?,
            d_txt: gpu.zeros(b * d)?,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        let n_t = self.b.div_ceil(LOSS_TILE);
        4 * (2 * (self.chunks + self.splits) * self.b + 5 * self.b + 2 * self.b * self.d)
            + 8 * (self.b + 2 + n_t)
    }
}

/// The fused-loss forward grid: `chunks × splits` blocks, chunk `rc` covering row tiles
/// `[rc · tiles_per_chunk, …)` and split `cs` column tiles `[cs · tiles_per_split, …)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdGrid {
    pub chunks: usize,
    pub tiles_per_chunk: usize,
    pub splits: usize,
    pub tiles_per_split: usize,
}

/// Plans the forward grid for `n_t` tiles a side and `target` blocks (one wave: multiprocessors
/// × resident blocks each). Chunks and splits are balanced (about √target each, at most `n_t`)
/// since the scratch is `(chunks + splits) · B` partials; `chunks · splits ≤ max(target, 1)`,
/// and every chunk and split holds at least one tile.
pub fn plan_fwd_grid(n_t: usize, target: usize) -> FwdGrid {
    let n_t = n_t.max(1);
    let target = target.max(1);
    let want_splits = target.isqrt().clamp(1, n_t);
    let tiles_per_split = n_t.div_ceil(want_splits);
    let splits = n_t.div_ceil(tiles_per_split);
    let want_chunks = (target / splits).clamp(1, n_t);
    let tiles_per_chunk = n_t.div_ceil(want_chunks);
    let chunks = n_t.div_ceil(tiles_per_chunk);
    FwdGrid { chunks, tiles_per_chunk, splits, tiles_per_split }
}

/// Queues the fused CLIP loss (forward + backward) on `gpu.stream` for `img`, `txt`
/// (`b × d`, row-major, on the device) with logit scale `scale`; results stay in `bufs`
/// (`d_img`, `d_txt`, and the scalars read by [`read_scalars`]).
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_launch(
    gpu: &Gpu,
    bufs: &mut LossBuffers,
    img: &CudaSlice<f32>,
    txt: &CudaSlice<f32>,
    scale: f32,
    mode: LossMode,
    precision: Precision,
) -> Result<(), CudaError> {
    let (b, d) = (bufs.b as i64, bufs.d as i64);
    let n_t = bufs.b.div_ceil(LOSS_TILE);
    if img.len() < bufs.b * bufs.d || txt.len() < bufs.b * bufs.d {
        return Err(CudaError::Invalid("fused loss: feature buffers shorter than b × d".into()));
    }
    let s = &gpu.stream;
    let tile = LaunchConfig {
        grid_dim: (bufs.chunks as u32, bufs.splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let tpc = bufs.tiles_per_chunk as i32;
    let tps = bufs.tiles_per_split as i32;
    let f = gpu.func(&format!("clip_fwd{}", precision.suffix()))?;
    let mut l = s.launch_builder(f);
    l.arg(img).arg(txt).arg(&b).arg(&d).arg(&scale).arg(&tpc).arg(&tps);
    l.arg(&mut bufs.row_m).arg(&mut bufs.row_z).arg(&mut bufs.col_m).arg(&mut bufs.col_z);
    l.arg(&mut bufs.pos);
    // SAFETY: argument list matches clip_fwd's signature; buffers hold splits·b, chunks·b and
    // b values as the kernel indexes them (grid chunks × splits, see plan_fwd_grid).
    drv("launch clip_fwd", unsafe { l.launch(tile) })?;

    let splits = bufs.splits as i32;
    let chunks = bufs.chunks as i32;
    let f = gpu.func("clip_lse")?;
    let mut l = s.launch_builder(f);
    l.arg(&bufs.row_m).arg(&bufs.row_z).arg(&splits).arg(&bufs.col_m).arg(&bufs.col_z);
    l.arg(&chunks).arg(&bufs.pos).arg(&b);
    l.arg(&mut bufs.lse_hi).arg(&mut bufs.lse_lo).arg(&mut bufs.kap_hi).arg(&mut bufs.kap_lo);
    l.arg(&mut bufs.term);
    // SAFETY: matches clip_lse; all buffers hold at least b values (partials as above).
    drv("launch clip_lse", unsafe { l.launch(elem_cfg(bufs.b)) })?;

    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.func("sum_f64")?;
    let mut l = s.launch_builder(f);
    l.arg(&bufs.term).arg(&b).arg(&mut bufs.loss);
    // SAFETY: matches sum_f64; term has b values, loss 1.
    drv("launch sum_f64 (loss)", unsafe { l.launch(one) })?;

    drv("zero dI", s.memset_zeros(&mut bufs.d_img))?;
    drv("zero dT", s.memset_zeros(&mut bufs.d_txt))?;
    let inv2b = (1.0 / (2.0 * bufs.b as f64)) as f32;
    let null = 0u64;
    let rows =
        LaunchConfig { grid_dim: (n_t as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.func(&format!("clip_bwd{}", precision.suffix()))?;
    {
        let mut l = s.launch_builder(f);
        l.arg(img).arg(txt).arg(&b).arg(&d).arg(&scale).arg(&inv2b);
        l.arg(&bufs.lse_hi).arg(&bufs.lse_lo).arg(&bufs.kap_hi).arg(&bufs.kap_lo);
        l.arg(&mut bufs.d_img);
        match mode {
            LossMode::Fast => l.arg(&mut bufs.d_txt),
            LossMode::Deterministic => l.arg(&null),
        };
        l.arg(&mut bufs.dt_part);
        // SAFETY: matches clip_bwd; dA/dB hold b·d values, dt_part n_t; a null dB is allowed.
        drv("launch clip_bwd (dI)", unsafe { l.launch(rows) })?;
    }
    if mode == LossMode::Deterministic {
        let mut l = s.launch_builder(f);
        l.arg(txt).arg(img).arg(&b).arg(&d).arg(&scale).arg(&inv2b);
        l.arg(&bufs.kap_hi).arg(&bufs.kap_lo).arg(&bufs.lse_hi).arg(&bufs.lse_lo);
        l.arg(&mut bufs.d_txt).arg(&null).arg(&null);
        // SAFETY: as above with the roles of I and T swapped; dB and dt_part null.
        drv("launch clip_bwd (dT)", unsafe { l.launch(rows) })?;
    }
    let n_t64 = n_t as i64;
    let f = gpu.func("sum_f64")?;
    let mut l = s.launch_builder(f);
    l.arg(&bufs.dt_part).arg(&n_t64).arg(&mut bufs.dt);
    // SAFETY: matches sum_f64; dt_part has n_t values.
    drv("launch sum_f64 (dt)", unsafe { l.launch(one) })?;
    Ok(())
}

/// Loss and `∂L/∂t` of the last [`clip_loss_launch`] (synchronises).
pub fn read_scalars(gpu: &Gpu, bufs: &LossBuffers) -> Result<(f64, f64), CudaError> {
    let loss = gpu.download(&bufs.loss)?[0] / (2.0 * bufs.b as f64);
    let dt = gpu.download(&bufs.dt)?[0];
    Ok((loss, dt))
}

/// The fused CLIP loss on host data: uploads, runs [`clip_loss_launch`], downloads.
#[allow(clippy::too_many_arguments)]
pub fn clip_loss(
    gpu: &Gpu,
    img: &[f32],
    txt: &[f32],
    b: usize,
    d: usize,
    scale: f32,
    mode: LossMode,
    precision: Precision,
) -> Result<GpuLossOut, CudaError> {
    FusedClipLoss::default().run(gpu, img, txt, b, d, scale, mode, precision)
}

/// [`clip_loss`] that keeps its device buffers for the next call of the same size (training
/// calls it every step).
#[derive(Default)]
pub struct FusedClipLoss {
    bufs: Option<LossBuffers>,
}

impl FusedClipLoss {
    /// As [`clip_loss`].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        gpu: &Gpu,
        img: &[f32],
        txt: &[f32],
        b: usize,
        d: usize,
        scale: f32,
        mode: LossMode,
        precision: Precision,
    ) -> Result<GpuLossOut, CudaError> {
        if img.len() != b * d || txt.len() != b * d {
            return Err(CudaError::Invalid(format!(
                "fused loss: features must be b × d = {b} × {d} (got {} and {})",
                img.len(),
                txt.len()
            )));
        }
        if self.bufs.as_ref().is_none_or(|x| x.b != b || x.d != d) {
            self.bufs = None; // free the old size first
            self.bufs = Some(LossBuffers::new(gpu, b, d)?);
        }
        let bufs = self.bufs.as_mut().expect("set above");
        let di = gpu.upload(img)?;
        let dt = gpu.upload(txt)?;
        clip_loss_launch(gpu, bufs, &di, &dt, scale, mode, precision)?;
        let (loss, d_t) = read_scalars(gpu, bufs)?;
        Ok(GpuLossOut {
            loss,
            d_img: gpu.download(&bufs.d_img)?,
            d_txt: gpu.download(&bufs.d_txt)?,
            d_t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward grid covers every row and column tile exactly once with no empty chunk or
    /// split (clip_lse merges every partial), stays within one wave, and keeps the scratch
    /// (`chunks + splits` partials per index) independent of the batch once B is large.
    #[test]
    fn fwd_grid_partitions_tiles_and_scratch_is_linear() {
        for n_t in [1usize, 2, 3, 7, 64, 65, 127, 1000, 1024, 4096, 4097] {
            for target in [0usize, 1, 2, 3, 108, 132, 264, 528, 1056, 5000] {
                let g = plan_fwd_grid(n_t, target);
                let ctx = format!("n_t {n_t}, target {target}: {g:?}");
                assert!(g.chunks >= 1 && g.splits >= 1, "{ctx}");
                assert!(g.chunks * g.splits <= target.max(1), "{ctx}");
                // Chunk rc covers [rc·tpc, min((rc+1)·tpc, n_t)): the last one is non-empty
                // and they reach n_t; likewise for splits.
                assert!((g.chunks - 1) * g.tiles_per_chunk < n_t, "{ctx}");
                assert!(g.chunks * g.tiles_per_chunk >= n_t, "{ctx}");
                assert!((g.splits - 1) * g.tiles_per_split < n_t, "{ctx}");
                assert!(g.splits * g.tiles_per_split >= n_t, "{ctx}");
                assert!(g.chunks + g.splits <= 2 * target.max(1).isqrt() + 2, "{ctx}");
            }
        }
        // Same device, growing batch: the partial count per index stops growing.
        let big = plan_fwd_grid(65536 / LOSS_TILE, 528);
        let huge = plan_fwd_grid(262144 / LOSS_TILE, 528);
        assert_eq!(big.chunks + big.splits, huge.chunks + huge.splits);
        assert!(huge.chunks + huge.splits <= 48, "{huge:?}");
    }
}
