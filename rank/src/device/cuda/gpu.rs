//! A CUDA context with every kernel of [`super::nvrtc::SOURCES`] compiled for its device and
//! loaded, plus typed launchers for the fused CLIP loss.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, result as dr, sys,
};

use super::CudaError;
use super::kcache::{KernelCache, Origin};
use super::libs::{Lib, require};
use super::nvrtc::{Defines, SOURCES, compile_defined};

/// One GPU with the kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `sm_XY` the kernels were compiled for.
    pub arch: String,
    /// Device name as the driver reports it.
    pub name: String,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Milliseconds that compiling (or reading from the kernel cache) and loading all sources
    /// took.
    pub compile_ms: f64,
    /// How many sources came from the kernel cache ([`super::kcache`]).
    pub cached: usize,
    /// The kernel knobs' values the sources were compiled with.
    pub defines: Defines,
    /// Backward blocks in one wave per backward kernel (`clip_bwd*`, `clip_bwd_pair*`): the
    /// multiprocessors × the kernel's resident blocks with its dynamic shared memory, asked of
    /// the driver once here (see [`backward_wave`]).
    bwd_waves: HashMap<String, usize>,
}

pub(crate) fn drv<T>(
    what: &str,
    r: Result<T, cudarc::driver::DriverError>,
) -> Result<T, CudaError> {
    r.map_err(|e| CudaError::driver(what, e))
}

/// A GPU UUID's 16 bytes the way nvidia-smi prints them.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
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

    /// The GPU a rank uses: local rank `local_rank` of its node, among the `gpus` it sees.
    /// Ranks that each see their own GPU (slurm's `--gpus-per-task=1`, where every task's GPU
    /// is its device 0) use device 0; ranks that see all the node's GPUs use one each, and more
    /// ranks than GPUs share them round-robin.
    pub fn ordinal_for(local_rank: usize, gpus: usize) -> usize {
        local_rank % gpus.max(1)
    }

    /// The driver's UUID of GPU `ordinal` (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as
    /// nvidia-smi prints it): the same GPU has the same UUID in every process, whatever
    /// `CUDA_VISIBLE_DEVICES` numbers it.
    pub fn uuid(ordinal: usize) -> Result<String, CudaError> {
        let n = Gpu::count()?;
        if ordinal >= n {
            return Err(CudaError::Invalid(format!(
                "GPU {ordinal} requested but the driver reports {n} GPU(s)"
            )));
        }
        let dev = drv("cuDeviceGet", cudarc::driver::result::device::get(ordinal as i32))?;
        let id = drv("cuDeviceGetUuid", cudarc::driver::result::device::get_uuid(dev))?;
        Ok(format_uuid(&id.bytes.map(|b| b as u8)))
    }

    /// Opens device `ordinal`, compiles every kernel source for its architecture and loads it.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        Gpu::open_with(ordinal, &Defines::default())
    }

    /// [`Gpu::open`] with the kernel knobs `defs` (see [`Defines`]): for timing their values.
    pub fn open_with(ordinal: usize, defs: &Defines) -> Result<Gpu, CudaError> {
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
        let cache = KernelCache::from_env();
        let mut funcs = HashMap::new();
        let mut cached = 0;
        for src in SOURCES {
            let (c, origin) = cache.compile(src, &arch, defs)?;
            let load = |cubin: Vec<u8>| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin));
            let module = match (load(c.cubin), origin) {
                (Ok(m), _) => m,
                // An entry the driver refuses: dropped, and the source compiled afresh.
                (Err(_), Origin::Hit) => {
                    cache.forget(src, &arch, defs);
                    let c = compile_defined(src, &arch, defs)?;
                    drv(&format!("load module {}", src.name), load(c.cubin))?
                }
                (Err(e), _) => {
                    return Err(CudaError::driver(format!("load module {}", src.name), e));
                }
            };
            cached += usize::from(origin == Origin::Hit);
            for k in src.kernels {
                let f = drv(&format!("load kernel {k}"), module.load_function(k))?;
                funcs.insert(*k, f);
            }
        }
        // Static and dynamic shared memory above 48 KiB needs the kernel's consent.
        for p in Precision::ALL {
            let dynamic = bwd_shared_bytes(p, defs);
            if dynamic == 0 {
                continue;
            }
            for k in [p.kernels().1, p.bwd_pair()] {
                let f = funcs.get(k.as_str()).expect("clip_loss.cu's kernels are loaded");
                drv(
                    &format!("{k}: allow {dynamic} bytes of dynamic shared memory"),
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        dynamic as i32,
                    ),
                )?;
            }
        }
        let sms = sm_count(&ctx)?;
        drv("bind context", ctx.bind_to_thread())?;
        let mut bwd_waves = HashMap::new();
        for p in Precision::ALL {
            let shared = bwd_shared_bytes(p, defs) as usize;
            for k in [p.kernels().1, p.bwd_pair()] {
                let f = funcs.get(k.as_str()).expect("clip_loss.cu's kernels are loaded");
                let occ = drv(
                    &format!("occupancy of {k}"),
                    f.occupancy_max_active_blocks_per_multiprocessor(256, shared, None),
                )?;
                bwd_waves.insert(k, sms * occ.max(1) as usize);
            }
        }
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let defines = defs.clone();
        Ok(Gpu { ctx, stream, arch, name, funcs, compile_ms, cached, defines, bwd_waves })
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

    /// Device → host copy (synchronises the stream: a copy into pageable memory returns when
    /// done, but the wait makes it explicit).
    pub fn download<T: cudarc::driver::DeviceRepr>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        let v = drv("copy to host", self.stream.clone_dtoh(s))?;
        self.sync()?;
        Ok(v)
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

/// The device address of `bytes` when they lie inside one CUDA managed allocation (which NCCL
/// can read and write in place; `CudaDevice` allocates a model's buffers so), None for
/// anything else (host memory is staged). Asks the driver, so it needs no context of ours.
///
/// Also the test of whether a slice is a [`CudaDevice`](super::device::CudaDevice)'s buffer
/// that device-side copies can read or write where it is.
pub(crate) fn managed_range(bytes: &[u8]) -> Option<sys::CUdeviceptr> {
    if bytes.is_empty() {
        return None;
    }
    let p = bytes.as_ptr() as sys::CUdeviceptr;
    let attr = |a: sys::CUpointer_attribute, out: *mut std::ffi::c_void| {
        // SAFETY: `out` points to a value of the attribute's type (unsigned int for
        // IS_MANAGED, CUdeviceptr for RANGE_START_ADDR, size_t for RANGE_SIZE); the driver
        // only reads the address `p`, and returns an error for memory it does not know.
        unsafe { sys::cuPointerGetAttribute(out, a, p) == sys::CUresult::CUDA_SUCCESS }
    };
    let mut managed: u32 = 0;
    let mut start: sys::CUdeviceptr = 0;
    let mut size: usize = 0;
    let known = attr(
        sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
        (&mut managed as *mut u32).cast(),
    ) && managed != 0
        && attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            (&mut start as *mut sys::CUdeviceptr).cast(),
        )
        && attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            (&mut size as *mut usize).cast(),
        );
    let end = p.checked_add(bytes.len() as sys::CUdeviceptr)?;
    (known && start <= p && end <= start.saturating_add(size as sys::CUdeviceptr)).then_some(p)
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossMode {
    /// No atomics: dI and dT by two passes (one launch), each recomputing the logits (bitwise
    /// repeatable).
    #[default]
    Deterministic,
    /// One backward kernel recomputing the logits once; dT by atomicAdd.
    Fast,
}

impl LossMode {
    /// Both modes.
    pub const ALL: [LossMode; 2] = [LossMode::Deterministic, LossMode::Fast];

    /// The name in configs (`run.cuda_loss_mode`): `deterministic` or `fast`.
    pub fn name(self) -> &'static str {
        match self {
            LossMode::Deterministic => "deterministic",
            LossMode::Fast => "fast",
        }
    }

    /// Parses a [`LossMode::name`].
    pub fn parse(s: &str) -> Option<LossMode> {
        LossMode::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The names of [`LossMode::ALL`], comma-separated (for help and error messages).
    pub fn names() -> String {
        LossMode::ALL.map(LossMode::name).join(", ")
    }
}

/// How the fused loss computes its logit tiles and the backward's gradient products (`G·T`,
/// `Gᵀ·I`). Statistics, G and accumulators are fp32, inputs and outputs fp32, in every case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// fp32 FMA (SIMT), logits and products.
    #[default]
    Fp32,
    /// 3xTF32 tensor cores (hi/lo split), logits and products: close to fp32 accuracy.
    Tf32x3,
    /// TF32 tensor cores (10-bit mantissa inputs), logits and products.
    Tf32,
    /// BF16 tensor cores on bf16 copies of the features (7-bit mantissa inputs), logits and
    /// products (G rounded to bf16 for the products); fp32 accumulators, statistics and
    /// outputs.
    Bf16,
}

impl Precision {
    /// All precisions.
    pub const ALL: [Precision; 4] =
        [Precision::Fp32, Precision::Tf32x3, Precision::Tf32, Precision::Bf16];

    /// Kernel-name suffix and the name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32x3 => "tf32x3",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Parses a [`Precision::name`]: `fp32`, `tf32x3`, `tf32` or `bf16`.
    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The names of [`Precision::ALL`], comma-separated (for help and error messages).
    pub fn names() -> String {
        Precision::ALL.map(Precision::name).join(", ")
    }

    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Precision::Fp32 => "",
            Precision::Tf32x3 => "_tf32x3",
            Precision::Tf32 => "_tf32",
            Precision::Bf16 => "_bf16",
        }
    }

    /// The forward and backward kernels of this precision (in clip_loss.cu).
    fn kernels(self) -> (String, String) {
        (format!("clip_fwd{}", self.suffix()), format!("clip_bwd{}", self.suffix()))
    }

    /// Deterministic mode's backward: both passes in one launch (grid y = 2).
    pub(crate) fn bwd_pair(self) -> String {
        format!("clip_bwd_pair{}", self.suffix())
    }
}

/// Dynamic shared memory of the backward kernels of `precision` (`clip_bwd*`, `clip_bwd_pair*`)
/// compiled with the knobs `defs`: the G panel when `CLIP_BWD_PANEL` is above 1 (bf16: its
/// bf16 copy, 64 rows of 64 × panel + 8 bf16; the others: 64 rows of 64 × panel + 4 floats),
/// else none (all static).
pub fn bwd_shared_bytes(precision: Precision, defs: &Defines) -> u32 {
    let panel = defs.value("CLIP_BWD_PANEL") as u32;
    if panel <= 1 {
        return 0;
    }
    match precision {
        Precision::Bf16 => LOSS_TILE as u32 * (64 * panel + 8) * 2,
        _ => LOSS_TILE as u32 * (64 * panel + 4) * 4,
    }
}

/// The backward launch (`clip_bwd*` or `clip_bwd_pair*`) of `br` rows against `bc` columns:
/// its grid and the buffers its column splits need. Planned by [`plan_bwd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdPlan {
    /// Row tiles (deterministic mode: the longer pass's), passes (1 fast, 2 deterministic) and
    /// column splits (grid z): each split takes `⌈tiles / splits⌉` consecutive column tiles.
    pub grid: (u32, u32, u32),
    /// Values of `dt_part` the launch writes: `⌈br/64⌉ × splits`, summed by the host.
    pub dt_parts: usize,
    /// Deterministic mode: how many splits' shares to fold into dA and into dB afterwards
    /// (`clip_fold_splits`; the splits past a pass's last column tile have none). 0 and 0 in
    /// fast mode, whose splits add into dA and dB atomically.
    pub folds: (usize, usize),
    /// Floats of the deterministic shares' buffer (`parts`): `(splits − 1) · (br + bc) · d`; 0
    /// when the launch takes a null pointer.
    pub parts_len: usize,
}

impl BwdPlan {
    pub fn splits(&self) -> usize {
        self.grid.2 as usize
    }
}

/// Plans the backward of `br × bc` logits at dimension `d` for `wave` resident blocks (the
/// GPU's multiprocessors × the kernel's blocks each, [`backward_wave`]). Grids of fewer row
/// tiles than the wave are split along the columns (grid z) until they fill it, at most one
/// split per column tile; without that, the batch of a ring step (a few thousand rows) or a
/// small training batch leaves most multiprocessors idle. `splits`: that number instead (for
/// timing and tests; brought into 1 ..= column tiles the same way).
pub fn plan_bwd(
    mode: LossMode,
    br: usize,
    bc: usize,
    d: usize,
    wave: usize,
    splits: Option<usize>,
) -> BwdPlan {
    let (rt, ct) = (br.div_ceil(LOSS_TILE), bc.div_ceil(LOSS_TILE));
    let (gx, gy, n_c) = match mode {
        LossMode::Fast => (rt, 1, ct),
        LossMode::Deterministic => (rt.max(ct), 2, rt.max(ct)),
    };
    let want = splits.unwrap_or(wave / (gx * gy).max(1)).clamp(1, n_c.max(1));
    // Evened so that every split of the n_c tiles has some: ⌈n_c / ⌈n_c / want⌉⌉.
    let s = n_c.max(1).div_ceil(n_c.max(1).div_ceil(want));
    let used = |n: usize| if n == 0 { 0 } else { n.div_ceil(n.div_ceil(s)) };
    let (folds, parts_len) = match mode {
        LossMode::Deterministic if s > 1 => {
            ((used(ct).max(1) - 1, used(rt).max(1) - 1), (s - 1) * (br + bc) * d)
        }
        _ => ((0, 0), 0),
    };
    BwdPlan { grid: (gx.max(1) as u32, gy as u32, s as u32), dt_parts: rt * s, folds, parts_len }
}

/// Backward blocks in one wave on `gpu`: multiprocessors × resident blocks of the backward
/// kernel `kernel` with its dynamic shared memory ([`bwd_shared_bytes`]), as `Gpu::open_with`
/// found them (no driver call here: training asks every step).
pub fn backward_wave(gpu: &Gpu, kernel: &str) -> Result<usize, CudaError> {
    gpu.bwd_waves.get(kernel).copied().ok_or_else(|| {
        CudaError::Invalid(format!("{kernel} is not a backward kernel of the fused loss"))
    })
}

/// Deterministic mode's column splits, after the backward of `plan`: adds the splits' shares
/// in `parts` into dA (its first `n_a` values: rows × d) and dB (`n_b`: columns × d), each in
/// split order (`clip_fold_splits`). The swapped pass's shares follow the first pass's
/// `(splits − 1) · n_a` floats. Nothing to do without shares.
pub(crate) fn fold_bwd_shares(
    gpu: &Gpu,
    plan: &BwdPlan,
    parts: Option<&CudaSlice<f32>>,
    d_a: &mut CudaSlice<f32>,
    n_a: usize,
    d_b: &mut CudaSlice<f32>,
    n_b: usize,
) -> Result<(), CudaError> {
    let Some(parts) = parts.filter(|_| plan.parts_len > 0) else { return Ok(()) };
    let off_b = (plan.splits() - 1) * n_a;
    for (dst, off, n, n_parts) in [(d_a, 0, n_a, plan.folds.0), (d_b, off_b, n_b, plan.folds.1)] {
        if n_parts == 0 || n == 0 {
            continue;
        }
        if dst.len() < n || parts.len() < off + n_parts * n {
            return Err(CudaError::Invalid(
                "clip_fold_splits: buffers shorter than planned".into(),
            ));
        }
        let (n64, np) = (n as i64, n_parts as i32);
        let shares = parts.slice(off..off + n_parts * n);
        let mut l = gpu.stream.launch_builder(gpu.func("clip_fold_splits")?);
        l.arg(dst).arg(&shares).arg(&n64).arg(&np);
        // SAFETY: matches clip_fold_splits; dst holds at least n values, the shares
        // n_parts · n (both checked above).
        drv("launch clip_fold_splits", unsafe { l.launch(elem_cfg(n)) })?;
    }
    Ok(())
}

/// Result of [`clip_loss`], copied to the host.
#[derive(Clone, Debug)]
pub struct GpuLossOut {
    pub loss: f64,
    pub d_img: Vec<f32>,
    pub d_txt: Vec<f32>,
    pub d_t: f64,
}

/// Row stride of the bf16 feature copies: `d` rounded up to a multiple of this (and the rows
/// to a multiple of [`LOSS_TILE`]), zero-padded, so that every 16-byte load of the bf16
/// kernels is aligned and in bounds without a test. `BF16_PAD` must be a multiple of the bf16
/// stage (`KB` = 32 in clip_loss.cu) and of the backward's 64-wide feature chunks.
pub const BF16_PAD: usize = 64;

/// Shape `(rows, row stride)` of the zero-padded bf16 copy of a `b × d` feature matrix.
pub fn bf16_layout(b: usize, d: usize) -> (usize, usize) {
    (b.div_ceil(LOSS_TILE) * LOSS_TILE, d.div_ceil(BF16_PAD) * BF16_PAD)
}

/// Device bytes of the buffers [`LossBuffers`] holds for batch `b`, dimension `d` and the
/// forward grid `chunks × splits`; `bf16`: with the bf16 feature copies of [`Precision::Bf16`].
pub fn loss_workspace_bytes(b: usize, d: usize, chunks: usize, splits: usize, bf16: bool) -> usize {
    let n_t = b.div_ceil(LOSS_TILE);
    // f32: row and column partials (m, z), pos, ℓ and κ as hi + lo, dI and dT.
    let f32s = 2 * (chunks + splits) * b + 5 * b + 2 * b * d;
    // f64: the loss terms, the loss, the backward's ∂L/∂t partials and ∂L/∂t.
    let f64s = b + 2 + n_t;
    let bf16s = if bf16 {
        let (rows, ld) = bf16_layout(b, d);
        2 * rows * ld
    } else {
        0
    };
    4 * f32s + 8 * f64s + 2 * bf16s
}

/// The bf16 copies of the image and text features ([`bf16_layout`]), written by `clip_to_bf16`
/// at the start of every bf16 call.
struct Bf16Features {
    img: CudaSlice<u16>,
    txt: CudaSlice<u16>,
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
    /// The backward's ∂L/∂t partials, one per row tile and column split (grown as needed).
    dt_part: CudaSlice<f64>,
    dt: CudaSlice<f64>,
    /// Deterministic mode's column splits' shares of dI and dT ([`BwdPlan::parts_len`]),
    /// made by the first call that splits.
    parts: Option<CudaSlice<f32>>,
    /// Column splits of the backward: `None` plans them ([`plan_bwd`]), `Some(n)` asks for n.
    pub bwd_splits: Option<usize>,
    /// The plan of the last call's backward.
    pub last_bwd: Option<BwdPlan>,
    pub d_img: CudaSlice<f32>,
    pub d_txt: CudaSlice<f32>,
    /// Allocated by the first [`Precision::Bf16`] call, so the other precisions do not pay
    /// for them.
    bf16: Option<Bf16Features>,
}

impl LossBuffers {
    /// Buffers for batch `b`, dimension `d`. The forward grid (row chunks × column splits) is
    /// about one wave of resident blocks (see [`plan_fwd_grid`]), so the column and row
    /// partials take `(chunks + splits) · b · 8` bytes: linear in `b`.
    pub fn new(gpu: &Gpu, b: usize, d: usize) -> Result<LossBuffers, CudaError> {
        if b == 0 || d == 0 {
            return Err(CudaError::Invalid(format!("fused loss needs b, d > 0 (got {b}, {d})")));
        }
        let n_t = b.div_ceil(LOSS_TILE);
        let plan = plan_fwd_grid(n_t, forward_wave(gpu)?);
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
            parts: None,
            bwd_splits: None,
            last_bwd: None,
            d_img: gpu.zeros(b * d)?,
            d_txt: gpu.zeros(b * d)?,
            bf16: None,
        })
    }

    /// Device bytes held (the bf16 feature copies included once a bf16 call made them, and
    /// the backward's column splits' buffers once a call split).
    pub fn bytes(&self) -> usize {
        let n_t = self.b.div_ceil(LOSS_TILE);
        loss_workspace_bytes(self.b, self.d, self.chunks, self.splits, self.bf16.is_some())
            + 8 * (self.dt_part.len() - n_t)
            + 4 * self.parts.as_ref().map_or(0, |p| p.len())
    }
}

/// Forward blocks in one wave on `gpu`: multiprocessors × resident blocks of the forward
/// kernels (the least over the precisions, so a grid never spills into a second, mostly idle
/// wave).
pub fn forward_wave(gpu: &Gpu) -> Result<usize, CudaError> {
    let sms = sm_count(&gpu.ctx)?;
    // Resident blocks per multiprocessor: the least over the forward's precisions, so the
    // grid never spills into a second, mostly idle wave.
    drv("bind context", gpu.ctx.bind_to_thread())?;
    let mut per_sm = u32::MAX;
    for p in Precision::ALL {
        let occ = drv(
            "occupancy of the fused-loss forward",
            gpu.func(&p.kernels().0)?.occupancy_max_active_blocks_per_multiprocessor(256, 0, None),
        )?;
        per_sm = per_sm.min(occ);
    }
    Ok(sms * (per_sm.max(1) as usize))
}

/// The multiprocessors of the device of `ctx` (at least 1).
fn sm_count(ctx: &CudaContext) -> Result<usize, CudaError> {
    let n = drv(
        "multiprocessor count",
        ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        ),
    )?;
    Ok(n.max(1) as usize)
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
    plan_fwd_grid_rect(n_t, n_t, target)
}

/// [`plan_fwd_grid`] for `n_r` row tiles and `n_c` column tiles (a block of the ring).
pub fn plan_fwd_grid_rect(n_r: usize, n_c: usize, target: usize) -> FwdGrid {
    let (n_r, n_c) = (n_r.max(1), n_c.max(1));
    let target = target.max(1);
    let want_splits = target.isqrt().clamp(1, n_c);
    let tiles_per_split = n_c.div_ceil(want_splits);
    let splits = n_c.div_ceil(tiles_per_split);
    let want_chunks = (target / splits).clamp(1, n_r);
    let tiles_per_chunk = n_r.div_ceil(want_chunks);
    let chunks = n_r.div_ceil(tiles_per_chunk);
    FwdGrid { chunks, tiles_per_chunk, splits, tiles_per_split }
}

/// Queues the fused CLIP loss (forward + backward) on `gpu.stream` for `img`, `txt`
/// (`b × d`, row-major, on the device) with logit scale `scale`; results stay in `bufs`
/// (`d_img`, `d_txt`, and the scalars read by [`read_scalars`]). `mid`, when given, is recorded
/// on the stream between the forward (the bf16 copies, the tile kernels, the LSE merge and the
/// loss's sum) and the backward (zeroing the gradients, the backward kernels, the sum of
/// dL/dt): for timing the two apart.
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_launch(
    gpu: &Gpu,
    bufs: &mut LossBuffers,
    img: &CudaSlice<f32>,
    txt: &CudaSlice<f32>,
    scale: f32,
    mode: LossMode,
    precision: Precision,
    mid: Option<&cudarc::driver::CudaEvent>,
) -> Result<(), CudaError> {
    let (b, d) = (bufs.b as i64, bufs.d as i64);
    if img.len() < bufs.b * bufs.d || txt.len() < bufs.b * bufs.d {
        return Err(CudaError::Invalid("fused loss: feature buffers shorter than b × d".into()));
    }
    let s = &gpu.stream;
    let (rows_bf16, ld_bf16) = bf16_layout(bufs.b, bufs.d);
    if precision == Precision::Bf16 {
        if bufs.bf16.is_none() {
            bufs.bf16 = Some(Bf16Features {
                img: gpu.zeros(rows_bf16 * ld_bf16)?,
                txt: gpu.zeros(rows_bf16 * ld_bf16)?,
            });
        }
        let h = bufs.bf16.as_mut().expect("set above");
        let (rows64, ld64) = (rows_bf16 as i64, ld_bf16 as i64);
        let cfg = LaunchConfig {
            grid_dim: (rows_bf16.clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = s.launch_builder(gpu.func("clip_to_bf16")?);
        l.arg(img).arg(txt).arg(&b).arg(&d).arg(&rows64).arg(&ld64);
        l.arg(&mut h.img).arg(&mut h.txt);
        // SAFETY: matches clip_to_bf16; img/txt hold b·d values (checked above), the copies
        // rows_bf16 · ld_bf16 (bf16_layout), which is what the kernel writes.
        drv("launch clip_to_bf16", unsafe { l.launch(cfg) })?;
    }
    // The features as the kernels of `precision` read them, and their row stride.
    let (feats, ld) = match (&bufs.bf16, precision) {
        (Some(h), Precision::Bf16) => (Some((&h.img, &h.txt)), ld_bf16 as i64),
        _ => (None, d),
    };
    let (fwd, bwd) = precision.kernels();
    let tile = LaunchConfig {
        grid_dim: (bufs.chunks as u32, bufs.splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let tpc = bufs.tiles_per_chunk as i32;
    let tps = bufs.tiles_per_split as i32;
    let mut l = s.launch_builder(gpu.func(&fwd)?);
    match feats {
        Some((hi, ht)) => l.arg(hi).arg(ht),
        None => l.arg(img).arg(txt),
    };
    // The whole batch: B rows against B columns, positives on the diagonal. clip_fwd_bf16
    // takes the copies' row stride in place of d.
    let diag = 0i64;
    l.arg(&b).arg(&b).arg(&ld).arg(&scale).arg(&diag).arg(&tpc).arg(&tps);
    l.arg(&mut bufs.row_m).arg(&mut bufs.row_z).arg(&mut bufs.col_m).arg(&mut bufs.col_z);
    l.arg(&mut bufs.pos);
    // SAFETY: argument list matches clip_fwd*'s signature; buffers hold splits·b, chunks·b and
    // b values as the kernel indexes them (grid chunks × splits, see plan_fwd_grid); the bf16
    // copies hold the padded layout the bf16 kernel reads.
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
    if let Some(e) = mid {
        drv("record", e.record(s))?;
    }

    drv("zero dI", s.memset_zeros(&mut bufs.d_img))?;
    drv("zero dT", s.memset_zeros(&mut bufs.d_txt))?;
    let inv2b = (1.0 / (2.0 * bufs.b as f64)) as f32;
    // Fast mode: one pass, dT by atomicAdd. Deterministic mode: the pass and its swap (T, I) ->
    // dT in one launch of the paired kernel (grid y = 2), with d_txt as the swapped pass's dA.
    // Both split the columns (grid z) when the row tiles alone are less than a wave.
    let bwd = match mode {
        LossMode::Fast => bwd,
        LossMode::Deterministic => precision.bwd_pair(),
    };
    let shared = bwd_shared_bytes(precision, &gpu.defines);
    let wave = backward_wave(gpu, &bwd)?;
    let plan = plan_bwd(mode, bufs.b, bufs.b, bufs.d, wave, bufs.bwd_splits);
    if bufs.dt_part.len() < plan.dt_parts {
        bufs.dt_part = gpu.zeros(plan.dt_parts)?;
    }
    if plan.parts_len > bufs.parts.as_ref().map_or(0, |p| p.len()) {
        bufs.parts = None;
        bufs.parts = Some(gpu.zeros(plan.parts_len)?);
    }
    bufs.last_bwd = Some(plan);
    let rows =
        LaunchConfig { grid_dim: plan.grid, block_dim: (256, 1, 1), shared_mem_bytes: shared };
    let null_parts = 0u64;
    let mut l = s.launch_builder(gpu.func(&bwd)?);
    match feats {
        Some((hi, ht)) => l.arg(hi).arg(ht).arg(&b).arg(&b).arg(&d).arg(&ld),
        None => l.arg(img).arg(txt).arg(&b).arg(&b).arg(&d),
    };
    l.arg(&scale).arg(&inv2b);
    l.arg(&bufs.lse_hi).arg(&bufs.lse_lo).arg(&bufs.kap_hi).arg(&bufs.kap_lo).arg(&diag);
    l.arg(&mut bufs.d_img).arg(&mut bufs.d_txt).arg(&mut bufs.dt_part);
    match (&mut bufs.parts, plan.parts_len) {
        (Some(p), n) if n > 0 => l.arg(p),
        _ => l.arg(&null_parts),
    };
    // SAFETY: matches clip_bwd* and clip_bwd_pair* (the bf16 ones have the copies' row stride
    // after d); dA/dB hold b·d values, dt_part plan.dt_parts (grown above), parts
    // plan.parts_len (grown above) or null where the plan has no shares.
    drv("launch clip_bwd", unsafe { l.launch(rows) })?;
    let n = bufs.b * bufs.d;
    fold_bwd_shares(gpu, &plan, bufs.parts.as_ref(), &mut bufs.d_img, n, &mut bufs.d_txt, n)?;
    let n_parts = plan.dt_parts as i64;
    let f = gpu.func("sum_f64")?;
    let mut l = s.launch_builder(f);
    l.arg(&bufs.dt_part).arg(&n_parts).arg(&mut bufs.dt);
    // SAFETY: matches sum_f64; dt_part has at least plan.dt_parts values.
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
    /// The backward's column splits: None as planned ([`plan_bwd`]), or this many.
    pub bwd_splits: Option<usize>,
    bufs: Option<LossBuffers>,
    /// The features' device copies, kept like the buffers (a training step has the same size
    /// every time).
    feats: Option<FeatCopies>,
}

/// The image and text features' device copies of [`FusedClipLoss`].
type FeatCopies = (CudaSlice<f32>, CudaSlice<f32>);

impl FusedClipLoss {
    /// The loss buffers and the features' device copies for `b × d`, reallocated only when the
    /// size changes (the old size freed first); the buffers take this loss's `bwd_splits`.
    fn sized(
        &mut self,
        gpu: &Gpu,
        b: usize,
        d: usize,
    ) -> Result<(&mut LossBuffers, &mut FeatCopies), CudaError> {
        if self.bufs.as_ref().is_none_or(|x| x.b != b || x.d != d) {
            (self.bufs, self.feats) = (None, None);
            self.bufs = Some(LossBuffers::new(gpu, b, d)?);
            self.feats = Some((gpu.zeros(b * d)?, gpu.zeros(b * d)?));
        }
        match (self.bufs.as_mut(), self.feats.as_mut()) {
            (Some(bufs), Some(feats)) => {
                bufs.bwd_splits = self.bwd_splits;
                Ok((bufs, feats))
            }
            _ => unreachable!("both set above"),
        }
    }

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
        let (bufs, (di, dt)) = self.sized(gpu, b, d)?;
        drv("copy to device", gpu.stream.memcpy_htod(img, di))?;
        drv("copy to device", gpu.stream.memcpy_htod(txt, dt))?;
        clip_loss_launch(gpu, bufs, di, dt, scale, mode, precision, None)?;
        let (loss, d_t) = read_scalars(gpu, bufs)?;
        Ok(GpuLossOut {
            loss,
            d_img: gpu.download(&bufs.d_img)?,
            d_txt: gpu.download(&bufs.d_txt)?,
            d_t,
        })
    }

    /// [`FusedClipLoss::run`] on features in managed memory (a `CudaDevice` model's buffers,
    /// whose writes may still be queued on `gpu.stream`), writing ∂L/∂I and ∂L/∂T into managed
    /// buffers `d_img` and `d_txt` (b × d each): every copy is device to device, in the
    /// stream's order, none through the host. Returns `(loss, ∂L/∂t)` once the stream is done.
    #[allow(clippy::too_many_arguments)]
    pub fn run_managed(
        &mut self,
        gpu: &Gpu,
        img: &[f32],
        txt: &[f32],
        b: usize,
        d: usize,
        scale: f32,
        mode: LossMode,
        precision: Precision,
        d_img: &mut [f32],
        d_txt: &mut [f32],
    ) -> Result<(f64, f64), CudaError> {
        let n = b * d;
        let lens = [img.len(), txt.len(), d_img.len(), d_txt.len()];
        if lens.iter().any(|&l| l != n) {
            return Err(CudaError::Invalid(format!(
                "fused loss: features and gradients must be b × d = {b} × {d} (got {lens:?})"
            )));
        }
        let addr = |s: &[f32]| {
            managed_range(f32_bytes(s)).ok_or_else(|| {
                CudaError::Invalid(
                    "fused loss on managed memory: a buffer is not in CUDA managed memory (use \
                     FusedClipLoss::run for host slices)"
                        .into(),
                )
            })
        };
        let (src_i, src_t, out_i, out_t) = (addr(img)?, addr(txt)?, addr(d_img)?, addr(d_txt)?);
        let (bufs, (di, dt)) = self.sized(gpu, b, d)?;
        let cu = gpu.stream.cu_stream();
        for (dst, src) in [(&mut *di, src_i), (&mut *dt, src_t)] {
            let (p, _g) = dst.device_ptr_mut(&gpu.stream);
            // SAFETY: `src` addresses n managed floats (checked above) that the stream's queued
            // work finishes writing before this copy runs; `dst` holds n floats.
            drv("copy the features", unsafe { dr::memcpy_dtod_async(p, src, n * 4, cu) })?;
        }
        clip_loss_launch(gpu, bufs, di, dt, scale, mode, precision, None)?;
        for (dst, src) in [(out_i, &bufs.d_img), (out_t, &bufs.d_txt)] {
            let (p, _g) = src.device_ptr(&gpu.stream);
            // SAFETY: `dst` addresses n managed floats (checked above), borrowed exclusively
            // by the caller until this returns, after the stream is done (read_scalars waits).
            drv("copy the gradient", unsafe { dr::memcpy_dtod_async(dst, p, n * 4, cu) })?;
        }
        read_scalars(gpu, bufs)
    }
}

/// The bytes of `v` (for the driver's pointer queries and byte-wise staging).
pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes; the slice covers exactly v's memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_uuids_print_like_nvidia_smi_and_ranks_pick_gpus_round_robin() {
        let b: [u8; 16] = std::array::from_fn(|i| (i as u8) * 17);
        assert_eq!(format_uuid(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
        // All GPUs visible: one each; one GPU per task: device 0; more ranks than GPUs: shared.
        assert_eq!((0..4).map(|r| Gpu::ordinal_for(r, 8)).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!((0..4).map(|r| Gpu::ordinal_for(r, 1)).collect::<Vec<_>>(), [0, 0, 0, 0]);
        assert_eq!((0..4).map(|r| Gpu::ordinal_for(r, 3)).collect::<Vec<_>>(), [0, 1, 2, 0]);
        assert_eq!(Gpu::ordinal_for(5, 0), 0);
    }

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

    #[test]
    fn precision_names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(Precision::parse(p.name()), Some(p), "{p:?}");
        }
        assert_eq!(Precision::parse("bf16"), Some(Precision::Bf16));
        assert_eq!(Precision::Bf16.kernels(), ("clip_fwd_bf16".into(), "clip_bwd_bf16".into()));
        assert_eq!(Precision::Fp32.kernels(), ("clip_fwd".into(), "clip_bwd".into()));
        for bad in ["", "BF16", "fp16", "bf16 ", "tf32x"] {
            assert_eq!(Precision::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Precision::names(), "fp32, tf32x3, tf32, bf16");
        assert_eq!(Precision::default(), Precision::Fp32);
    }

    #[test]
    fn loss_mode_names_round_trip() {
        for m in LossMode::ALL {
            assert_eq!(LossMode::parse(m.name()), Some(m), "{m:?}");
        }
        assert_eq!(LossMode::parse("deterministic"), Some(LossMode::Deterministic));
        assert_eq!(LossMode::parse("fast"), Some(LossMode::Fast));
        for bad in ["", "det", "Fast", "both", "fast "] {
            assert_eq!(LossMode::parse(bad), None, "{bad:?}");
        }
        assert_eq!(LossMode::names(), "deterministic, fast");
        assert_eq!(LossMode::default(), LossMode::Deterministic);
    }

    /// Gpu::open loads exactly the kernels SOURCES lists, so a precision whose kernels are
    /// missing there fails only on a GPU: check the names here.
    #[test]
    fn every_precision_has_its_kernels_listed() {
        let clip = super::super::nvrtc::SOURCES
            .iter()
            .find(|s| s.name == "clip_loss.cu")
            .expect("clip_loss.cu in SOURCES");
        let (fwd, bwd): (Vec<String>, Vec<String>) =
            Precision::ALL.into_iter().map(Precision::kernels).unzip();
        let pairs: Vec<String> = Precision::ALL.into_iter().map(Precision::bwd_pair).collect();
        for k in fwd.iter().chain(&bwd).chain(&pairs).map(String::as_str).chain(["clip_to_bf16"]) {
            assert!(clip.kernels.contains(&k), "{k} missing from SOURCES: {:?}", clip.kernels);
            assert!(clip.src.contains(&format!(" {k}(")), "{k} not defined in clip_loss.cu");
        }
    }

    /// The bf16 kernels load without bounds tests: 16-byte pieces of each 32-wide k stage and
    /// each 64-wide chunk of the backward, rows up to the last tile. The copies must cover all
    /// of that, and no more than one tile / chunk of padding.
    #[test]
    fn bf16_copies_cover_every_tile_and_chunk() {
        for b in [1usize, 2, 61, 63, 64, 65, 333, 1000, 3000, 65536] {
            for d in [1usize, 5, 8, 63, 64, 65, 77, 129, 512, 768] {
                let (rows, ld) = bf16_layout(b, d);
                let ctx = format!("b {b}, d {d}: rows {rows}, ld {ld}");
                assert_eq!(rows, b.div_ceil(LOSS_TILE) * LOSS_TILE, "{ctx}");
                assert!(ld >= d && ld < d + BF16_PAD, "{ctx}");
                assert_eq!(ld % 64, 0, "{ctx}");
                // The last 64-wide chunk of the backward (dc < d) and the last k stage.
                let last_chunk = (d - 1) / 64 * 64;
                assert!(last_chunk + 64 <= ld, "{ctx}");
            }
        }
        assert_eq!(bf16_layout(1000, 129), (1024, 192));
        assert_eq!(bf16_layout(64, 512), (64, 512));
    }

    #[test]
    fn workspace_counts_every_buffer() {
        // b = 1000, d = 129, 3 chunks, 2 splits: f32 partials 2·5·1000, pos/ℓ/κ 5·1000, dI and
        // dT 2·129,000; f64 terms 1000, loss and dt 2, dt partials 16.
        let base = 4 * (10_000 + 5_000 + 258_000) + 8 * (1_000 + 2 + 16);
        assert_eq!(loss_workspace_bytes(1000, 129, 3, 2, false), base);
        // bf16 copies: two of 1024 × 192, 2 bytes each.
        assert_eq!(loss_workspace_bytes(1000, 129, 3, 2, true), base + 2 * 2 * 1024 * 192);
        assert_eq!(
            loss_workspace_bytes(64, 512, 1, 1, true) - loss_workspace_bytes(64, 512, 1, 1, false),
            4 * 64 * 512
        );
    }

    /// A ring block's grid: within the tiles of each side, at most one wave, every tile in
    /// some chunk and split, and the square planner unchanged.
    #[test]
    fn rectangular_grids_cover_their_tiles() {
        for (n_r, n_c, target) in
            [(1, 40, 132), (40, 1, 132), (157, 3, 528), (5, 2000, 64), (0, 0, 8)]
        {
            let g = plan_fwd_grid_rect(n_r, n_c, target);
            assert!(g.chunks <= n_r.max(1) && g.splits <= n_c.max(1), "{g:?}");
            assert!(g.chunks * g.splits <= target.max(1), "{g:?}");
            assert!(g.chunks * g.tiles_per_chunk >= n_r && g.splits * g.tiles_per_split >= n_c);
            assert!((g.chunks - 1) * g.tiles_per_chunk < n_r.max(1), "no empty chunk: {g:?}");
            assert!((g.splits - 1) * g.tiles_per_split < n_c.max(1), "no empty split: {g:?}");
        }
        assert_eq!(plan_fwd_grid(300, 528), plan_fwd_grid_rect(300, 300, 528));
    }

    /// The backward's column splits: none once the row tiles fill the wave (the large batches
    /// as measured); otherwise as many as fill it, at most one per column tile, none of them
    /// empty for the planned columns; deterministic mode's shares and folds counted per pass
    /// (the shorter pass of a rectangular block has splits without tiles: not folded).
    #[test]
    fn backward_splits_fill_the_wave_and_count_their_buffers() {
        use LossMode::{Deterministic as Det, Fast};
        // H200: 132 multiprocessors x 2 blocks.
        let wave = 264;
        for mode in LossMode::ALL {
            for b in [16_384usize, 65_536, 262_144] {
                let p = plan_bwd(mode, b, b, 512, wave, None);
                assert_eq!((p.splits(), p.parts_len, p.folds), (1, 0, (0, 0)), "{mode:?} {b}");
                assert_eq!(p.dt_parts, b.div_ceil(64));
            }
        }
        // B = 4096: 64 row tiles; fast 4 splits of 16 tiles, deterministic (2 passes) 2 of 32.
        let p = plan_bwd(Fast, 4096, 4096, 768, wave, None);
        assert_eq!(p, BwdPlan { grid: (64, 1, 4), dt_parts: 256, folds: (0, 0), parts_len: 0 });
        let p = plan_bwd(Det, 4096, 4096, 768, wave, None);
        let want =
            BwdPlan { grid: (64, 2, 2), dt_parts: 128, folds: (1, 1), parts_len: 8192 * 768 };
        assert_eq!(p, want);
        // The default job's batch, 512: 8 tiles, one split per column tile.
        assert_eq!(plan_bwd(Fast, 512, 512, 64, wave, None).grid, (8, 1, 8));
        assert_eq!(plan_bwd(Det, 512, 512, 64, wave, None).grid, (8, 2, 8));
        for mode in LossMode::ALL {
            for (br, bc) in
                [(1usize, 1usize), (130, 130), (150, 70), (70, 150), (3000, 5000), (0, 64)]
            {
                for wave in [1usize, 4, 64, 264, 1000] {
                    let p = plan_bwd(mode, br, bc, 40, wave, None);
                    let (rt, ct) = (br.div_ceil(64), bc.div_ceil(64));
                    let n_c = if mode == Fast { ct } else { rt.max(ct) };
                    let (s, per) = (p.splits(), n_c.max(1).div_ceil(p.splits()));
                    let ctx = format!("{mode:?} {br}x{bc} wave {wave}: {p:?}");
                    assert!(s >= 1 && s <= n_c.max(1), "{ctx}");
                    assert!((s - 1) * per < n_c.max(1), "an empty split: {ctx}");
                    let blocks = (p.grid.0 * p.grid.1) as usize;
                    assert!(s == 1 || blocks * s <= wave, "past a wave: {ctx}");
                    assert_eq!(p.dt_parts, rt * s, "{ctx}");
                    if mode == Fast || s == 1 {
                        assert_eq!((p.folds, p.parts_len), ((0, 0), 0), "{ctx}");
                    } else {
                        let used = |n: usize| if n == 0 { 0 } else { n.div_ceil(n.div_ceil(s)) };
                        assert_eq!(p.folds, (used(ct) - 1, used(rt).max(1) - 1), "{ctx}");
                        assert_eq!(p.parts_len, (s - 1) * (br + bc) * 40, "{ctx}");
                    }
                }
            }
        }
        // Asked for: evened the same way, within 1 ..= column tiles.
        assert_eq!(plan_bwd(Fast, 260, 260, 8, 0, Some(4)).splits(), 3);
        assert_eq!(plan_bwd(Fast, 260, 260, 8, 0, Some(99)).splits(), 5);
        assert_eq!(plan_bwd(Det, 260, 260, 8, 0, Some(0)).splits(), 1);
        assert_eq!(plan_bwd(Det, 150, 70, 8, 0, Some(3)).folds, (1, 2));
    }
}
