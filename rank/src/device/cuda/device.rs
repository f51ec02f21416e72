//! [`CudaDevice`]: the [`Device`] trait on one GPU.
//!
//! # Memory
//!
//! [`Device::alloc`] returns a [`ManagedBuf`]: `cuMemAllocManaged` memory (attached globally)
//! that the host reads and writes through `Deref`/`DerefMut` like a `Vec<f32>` and the kernels
//! address by the same pointer (unified addressing). The device keeps a registry of its managed
//! allocations; a kernel argument that lies entirely inside one (the whole buffer or any
//! sub-slice) is passed to the kernel by pointer. Any other slice — a plain `Vec<f32>` of the
//! model code, or memory of another device — is *staged*: copied into a pooled device buffer
//! before the kernel, and for outputs copied back after it. Staging is correct for every slice
//! and costs a copy each way; long-lived buffers should come from [`Device::alloc`].
//!
//! # Ordering
//!
//! Work runs in order on the GPU's stream. A call whose arguments are all managed only queues
//! work and returns; a call that stages an output, and the calls that return values
//! ([`Device::softmax_xent`], [`Device::sq_norm`]), wait for the stream before returning, so
//! plain slices hold their results at return. Managed results are read by the host only after
//! [`Device::synchronize`], and the host writes a managed buffer only when no queued kernel
//! still uses it (after `synchronize`, or before the kernels that read it are queued; a new
//! buffer's zeroing is such queued work). The
//! device requires concurrent managed access (Linux, Pascal or newer), so host access to other
//! managed buffers while kernels run is permitted; [`CudaDevice::open`] refuses GPUs without it.
//!
//! # Failures
//!
//! [`CudaDevice::open`] does every fallible set-up (libraries, context, kernels, cuBLAS) and
//! returns a [`CudaError`]. The trait's methods cannot return errors: a failed launch, copy or
//! allocation afterwards panics with a message naming the kernel (or the operation) and the
//! CUDA error. That is a device fault (a lost GPU, out of memory, a context poisoned by an
//! earlier fault), not bad input. Length mismatches panic like [`crate::device::CpuDevice`]'s.
//! [`CudaDevice::try_alloc`] is the fallible allocation for callers that can handle a full GPU.

use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg, result as dr, sys as ds};

use super::CudaError;
use super::gpu::{Gpu, drv, elem_cfg, row_cfg};
use super::libs::{Lib, require};
use super::nvrtc::Defines;
use crate::device::{Device, L2_NORM_EPS, XentOut};
use crate::optim::passes::{LambJob, MomentumJob, ReduceJob, Span, Sums, check_spans};

/// How cuBLAS computes the GEMMs; inputs, outputs and accumulation are f32 in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmMath {
    /// Plain fp32 (no tensor cores): tracks the CPU device.
    #[default]
    Fp32,
    /// TF32 tensor cores (inputs rounded to 10-bit mantissas).
    Tf32,
    /// BF16 tensor cores (inputs rounded to 7-bit mantissas), fp32 accumulation.
    Bf16,
}

impl GemmMath {
    /// All modes.
    pub const ALL: [GemmMath; 3] = [GemmMath::Fp32, GemmMath::Tf32, GemmMath::Bf16];

    /// `fp32`, `tf32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            GemmMath::Fp32 => "fp32",
            GemmMath::Tf32 => "tf32",
            GemmMath::Bf16 => "bf16",
        }
    }

    /// Parses [`GemmMath::name`].
    pub fn parse(s: &str) -> Option<GemmMath> {
        GemmMath::ALL.into_iter().find(|m| m.name() == s)
    }

    fn compute_type(self) -> cudarc::cublas::sys::cublasComputeType_t {
        use cudarc::cublas::sys::cublasComputeType_t as C;
        match self {
            GemmMath::Fp32 => C::CUBLAS_COMPUTE_32F,
            GemmMath::Tf32 => C::CUBLAS_COMPUTE_32F_FAST_TF32,
            GemmMath::Bf16 => C::CUBLAS_COMPUTE_32F_FAST_16BF,
        }
    }
}

/// Options of [`CudaDevice::open`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaDeviceOpts {
    /// GEMM arithmetic (default fp32).
    pub gemm_math: GemmMath,
}

/// Row-major `C = alpha·op(A)·op(B) + beta·C` through cuBLAS's column-major `cublasGemmEx` on
/// f32 data: row-major `C` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so A and B swap places and
/// keep their flags. `a`, `b`, `c` are device addresses; `m`, `n`, `k` must be positive.
///
/// # Safety
/// `handle` is a live cuBLAS handle of the current context; `a` holds `m·k`, `b` `k·n` and `c`
/// `m·n` floats (stored as the flags say), all addressable by the device, `c` not aliasing
/// `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_row_major_raw(
    handle: cudarc::cublas::sys::cublasHandle_t,
    math: GemmMath,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
) -> Result<(), CudaError> {
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    use cudarc::cublas::sys::{cublasGemmAlgo_t, cudaDataType_t::CUDA_R_32F};
    let dim = |v: usize| {
        i32::try_from(v)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| CudaError::Invalid(format!("gemm dimension {v} is not in 1..=i32::MAX")))
    };
    let (mi, ni, ki) = (dim(m)?, dim(n)?, dim(k)?);
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let ldb = if trans_b { ki } else { ni };
    let lda = if trans_a { mi } else { ki };
    // SAFETY: per the caller's contract; alpha and beta are host scalars (the default pointer
    // mode) that outlive the call.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            handle,
            op(trans_b),
            op(trans_a),
            ni,
            mi,
            ki,
            (&alpha) as *const f32 as *const _,
            b as *const _,
            CUDA_R_32F,
            ldb,
            a as *const _,
            CUDA_R_32F,
            lda,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            CUDA_R_32F,
            ni,
            math.compute_type(),
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| CudaError::Cublas { what: format!("gemm {m}x{n}x{k}"), detail: format!("{e:?}") })
}

/// Address ranges of live allocations: start → length in bytes.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    ranges: BTreeMap<usize, usize>,
}

impl Registry {
    pub(crate) fn insert(&mut self, start: usize, bytes: usize) {
        self.ranges.insert(start, bytes);
    }

    pub(crate) fn remove(&mut self, start: usize) {
        self.ranges.remove(&start);
    }

    /// Bytes of all the ranges.
    pub(crate) fn bytes(&self) -> usize {
        self.ranges.values().sum()
    }

    /// The start of the allocation holding all of `[addr, addr + bytes)`, if one does.
    pub(crate) fn containing(&self, addr: usize, bytes: usize) -> Option<usize> {
        let (&start, &len) = self.ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(bytes)?;
        (end <= start.checked_add(len)?).then_some(start)
    }
}

/// What a [`ManagedBuf`] shares with its device.
struct Shared {
    stream: Arc<CudaStream>,
    managed: Mutex<Registry>,
    /// Managed allocations no buffer owns, by size in bytes, kept for reuse (a caching
    /// allocator like PyTorch's: a training step allocates the same activation sizes every
    /// time, and `cuMemAllocManaged`/`cuMemFree` each wait for the GPU). They stay in the
    /// registry.
    cached: Mutex<HashMap<usize, Vec<usize>>>,
    /// Bytes in `cached`.
    cached_bytes: AtomicUsize,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.managed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<usize, Vec<usize>>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees every cached allocation (after the stream finishes: queued kernels may still use
    /// one). Returns false when the context is lost (the memory is then leaked, not freed).
    fn release_cached(&self) -> bool {
        let ctx = self.stream.context();
        if ctx.bind_to_thread().is_err() || self.stream.synchronize().is_err() {
            return false;
        }
        let all = std::mem::take(&mut *self.cache());
        for addr in all.into_values().flatten() {
            self.registry().remove(addr);
            // SAFETY: allocated by cuMemAllocManaged, owned by the cache alone, the stream idle.
            let _ = unsafe { dr::memory_free(addr as ds::CUdeviceptr) };
        }
        self.cached_bytes.store(0, Ordering::Relaxed);
        true
    }

    fn sync(&self, what: &str) {
        if let Err(e) = self.stream.synchronize() {
            fault(what, e);
        }
    }
}

/// `f32` values in managed (unified) memory: a slice on the host, a device pointer for the
/// kernels of the [`CudaDevice`] that allocated it. On drop the allocation goes to the device's
/// cache for reuse (no wait: a reuse is zeroed on the same stream, after the kernels queued
/// before it); the cache is freed with the device or by [`CudaDevice::release_cached`]. Read
/// results only after [`Device::synchronize`] (see the module documentation).
pub struct ManagedBuf {
    ptr: NonNull<f32>,
    len: usize,
    shared: Arc<Shared>,
}

// SAFETY: the buffer owns its allocation exclusively (like a `Vec<f32>`); shared access goes
// through `&[f32]` and mutation through `&mut [f32]`, so Rust's borrow rules apply on the host.
// GPU access is ordered by the device's stream as documented.
unsafe impl Send for ManagedBuf {}
// SAFETY: as above; `&ManagedBuf` only gives out `&[f32]`.
unsafe impl Sync for ManagedBuf {}

impl std::ops::Deref for ManagedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `ptr` points to `len` initialised floats (zeroed at allocation) owned by self,
        // or is dangling with `len == 0`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for ManagedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for Deref, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for ManagedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedBuf").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

impl Drop for ManagedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let bytes = self.len * 4;
        self.shared.cache().entry(bytes).or_default().push(self.ptr.as_ptr() as usize);
        self.shared.cached_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last buffer and the device are gone; a lost context leaks rather than frees
        // memory kernels may still use.
        self.release_cached();
    }
}

/// A pooled device buffer (raw `cuMemAlloc` memory; the pool frees it).
struct Scratch {
    ptr: u64,
    bytes: usize,
}

/// Scratch buffers are pooled by size rounded up to this many bytes.
const SCRATCH_ROUND: usize = 256;

/// The [`Device`] trait on one GPU. See the module documentation for memory and ordering.
pub struct CudaDevice {
    blas: Mutex<CudaBlas>,
    shared: Arc<Shared>,
    pool: Mutex<HashMap<usize, Vec<u64>>>,
    scratch_bytes: AtomicUsize,
    staged: AtomicU64,
    opts: CudaDeviceOpts,
    gpu: Gpu,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("name", &self.name()).finish()
    }
}

/// cuBLAS's math mode for `math` (tensor cores allowed only for TF32 and BF16).
fn set_math_mode(blas: &CudaBlas, math: GemmMath) -> Result<(), CudaError> {
    use cudarc::cublas::sys::cublasMath_t::{CUBLAS_DEFAULT_MATH, CUBLAS_TF32_TENSOR_OP_MATH};
    let mode =
        if math == GemmMath::Fp32 { CUBLAS_DEFAULT_MATH } else { CUBLAS_TF32_TENSOR_OP_MATH };
    // SAFETY: a live handle.
    unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
        .result()
        .map_err(|e| CudaError::Cublas { what: "set math mode".into(), detail: format!("{e:?}") })
}

/// Panics for a device fault (see the module documentation).
#[cold]
fn fault(what: &str, e: impl std::fmt::Debug) -> ! {
    panic!(
        "CudaDevice: {what} failed: {e:?} (a CUDA device fault, not bad input: the GPU was lost, \
         ran out of memory, or an earlier kernel failed)"
    )
}

fn check(kernel: &str, arg: &str, got: usize, want: usize) {
    assert!(
        got == want,
        "{kernel}: argument `{arg}` has {got} elements, expected {want} from the given dimensions"
    );
}

/// A kernel argument.
#[derive(Clone, Copy)]
enum Arg {
    /// Device address.
    P(u64),
    I(i64),
    F(f32),
}

fn i(v: usize) -> Arg {
    Arg::I(v as i64)
}

impl CudaDevice {
    /// Opens GPU `ordinal`: context, every kernel compiled and loaded, a cuBLAS handle on the
    /// stream. Fails (never panics) when the driver, NVRTC or cuBLAS is missing, the GPU does
    /// not exist, lacks concurrent managed access, or a kernel does not compile.
    pub fn open(ordinal: usize, opts: CudaDeviceOpts) -> Result<CudaDevice, CudaError> {
        CudaDevice::open_with(ordinal, opts, &Defines::default())
    }

    /// [`CudaDevice::open`] with the kernels compiled with the tuning knobs `defs` (training's
    /// `run.cuda_kernel_defines`).
    pub fn open_with(
        ordinal: usize,
        opts: CudaDeviceOpts,
        defs: &Defines,
    ) -> Result<CudaDevice, CudaError> {
        require(Lib::Driver)?;
        require(Lib::Nvrtc)?;
        require(Lib::Cublas)?;
        CudaDevice::with_gpu(Gpu::open_with(ordinal, defs)?, opts)
    }

    /// A device on an already opened [`Gpu`] (its kernels and stream).
    pub fn with_gpu(gpu: Gpu, opts: CudaDeviceOpts) -> Result<CudaDevice, CudaError> {
        require(Lib::Cublas)?;
        use ds::CUdevice_attribute as A;
        for (attr, what) in [
            (A::CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY, "managed memory"),
            (A::CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS, "concurrent managed access"),
        ] {
            if drv(what, gpu.ctx.attribute(attr))? == 0 {
                return Err(CudaError::Invalid(format!(
                    "GPU {} ({}) does not support {what}, which CudaDevice needs (Linux with a \
                     Pascal or newer GPU has it; Windows/WSL and older GPUs do not)",
                    gpu.ctx.ordinal(),
                    gpu.name
                )));
            }
        }
        drv("bind context", gpu.ctx.bind_to_thread())?;
        let blas = CudaBlas::new(Arc::clone(&gpu.stream)).map_err(|e| CudaError::Cublas {
            what: "create handle".into(),
            detail: format!("{e:?}"),
        })?;
        set_math_mode(&blas, opts.gemm_math)?;
        let shared = Arc::new(Shared {
            stream: Arc::clone(&gpu.stream),
            managed: Mutex::new(Registry::default()),
            cached: Mutex::new(HashMap::new()),
            cached_bytes: AtomicUsize::new(0),
        });
        Ok(CudaDevice {
            blas: Mutex::new(blas),
            shared,
            pool: Mutex::new(HashMap::new()),
            scratch_bytes: AtomicUsize::new(0),
            staged: AtomicU64::new(0),
            opts,
            gpu,
        })
    }

    /// The GPU (context, stream, kernels).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The options in force.
    pub fn opts(&self) -> CudaDeviceOpts {
        self.opts
    }

    /// Switches the GEMM arithmetic for the following calls.
    pub fn set_gemm_math(&mut self, math: GemmMath) -> Result<(), CudaError> {
        drv("bind context", self.gpu.ctx.bind_to_thread())?;
        set_math_mode(self.blas.get_mut().unwrap_or_else(|p| p.into_inner()), math)?;
        self.opts.gemm_math = math;
        Ok(())
    }

    /// A managed buffer of zeros, or the driver's error (e.g. out of memory). The zeroing is
    /// queued on the stream: the host touches the buffer only after [`Device::synchronize`].
    /// A new allocation waits for the GPU anyway; a reused one (see [`ManagedBuf`]) does not.
    pub fn try_alloc(&self, len: usize) -> Result<ManagedBuf, CudaError> {
        let shared = Arc::clone(&self.shared);
        if len == 0 {
            return Ok(ManagedBuf { ptr: NonNull::dangling(), len: 0, shared });
        }
        let bytes = len
            .checked_mul(4)
            .ok_or_else(|| CudaError::Invalid(format!("alloc of {len} floats overflows")))?;
        drv("bind context", self.gpu.ctx.bind_to_thread())?;
        let reuse = self.shared.cache().get_mut(&bytes).and_then(|v| v.pop());
        let p = match reuse {
            Some(addr) => {
                self.shared.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
                addr as ds::CUdeviceptr
            }
            None => {
                let fresh = || {
                    // SAFETY: a plain allocation; it is zeroed below before anyone reads it.
                    unsafe {
                        dr::malloc_managed(bytes, ds::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL)
                    }
                };
                // Out of memory with allocations cached: free them and try once more.
                let p = match fresh() {
                    Err(_) if self.shared.cached_bytes.load(Ordering::Relaxed) > 0 => {
                        self.shared.release_cached();
                        fresh()
                    }
                    r => r,
                };
                let p = drv("cuMemAllocManaged", p)?;
                self.shared.registry().insert(p as usize, bytes);
                p
            }
        };
        let ptr = NonNull::new(p as *mut f32)
            .ok_or_else(|| CudaError::Invalid("cuMemAllocManaged returned null".into()))?;
        let buf = ManagedBuf { ptr, len, shared }; // back to the cache on the error paths below
        // SAFETY: `bytes` bytes at `p` belong to `buf`.
        drv("zero managed buffer", unsafe {
            dr::memset_d8_async(p, 0, bytes, self.shared.stream.cu_stream())
        })?;
        Ok(buf)
    }

    /// Whether all of `s` lies in a managed buffer of this device (kernels then use it in
    /// place).
    pub fn is_managed(&self, s: &[f32]) -> bool {
        self.shared.registry().containing(s.as_ptr() as usize, std::mem::size_of_val(s)).is_some()
    }

    /// Bytes of managed memory this device holds: live buffers and the ones cached for reuse.
    pub fn managed_bytes(&self) -> usize {
        self.shared.registry().bytes()
    }

    /// Device bytes held for reuse by dropped [`ManagedBuf`]s.
    pub fn cached_bytes(&self) -> usize {
        self.shared.cached_bytes.load(Ordering::Relaxed)
    }

    /// Frees the managed allocations kept for reuse (waits for the stream first), as
    /// `torch.cuda.empty_cache()` does.
    pub fn release_cached(&self) {
        self.shared.release_cached();
    }

    /// Slices staged (copied through scratch memory) so far.
    pub fn staged_count(&self) -> u64 {
        self.staged.load(Ordering::Relaxed)
    }

    /// Device bytes held by the scratch pool.
    pub fn scratch_bytes(&self) -> usize {
        self.scratch_bytes.load(Ordering::Relaxed)
    }

    fn take_scratch(&self, bytes: usize) -> Scratch {
        let bytes = bytes.max(1).next_multiple_of(SCRATCH_ROUND);
        let hit = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&bytes)
            .and_then(|v| v.pop());
        let ptr = match hit {
            Some(p) => p,
            None => {
                // SAFETY: a plain device allocation, owned by the pool from here on.
                let p = unsafe { dr::malloc_sync(bytes) }
                    .unwrap_or_else(|e| fault(&format!("scratch allocation of {bytes} B"), e));
                self.scratch_bytes.fetch_add(bytes, Ordering::Relaxed);
                p
            }
        };
        Scratch { ptr, bytes }
    }

    fn give_scratch(&self, s: Scratch) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).entry(s.bytes).or_default().push(s.ptr);
    }

    /// Queues kernel `name`.
    ///
    /// # Safety
    /// `args` match the kernel's parameter list in elements.cu, and every pointer addresses as
    /// many values as the kernel reads or writes for the given sizes.
    unsafe fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) {
        let f = self.gpu.func(name).unwrap_or_else(|e| fault(&format!("kernel {name}"), e));
        let mut l = self.gpu.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(p) => l.arg(p),
                Arg::I(v) => l.arg(v),
                Arg::F(v) => l.arg(v),
            };
        }
        // SAFETY: per this function's contract.
        if let Err(e) = unsafe { l.launch(cfg) } {
            fault(&format!("launch of kernel {name}"), e);
        }
    }

    /// `y = f(x)` by kernel `name(const float* x, float* y, i64 n)`.
    fn map_fwd(&self, name: &str, x: &[f32], y: &mut [f32]) {
        check(name, "y", y.len(), x.len());
        let mut call = Call::new(self);
        let args = [call.input(x), call.output(y), i(x.len())];
        // SAFETY: the kernel's signature is as above; x and y hold n values.
        unsafe { self.elementwise(name, x.len(), &args) };
        call.finish();
    }

    /// `dx = dy · f'(x)` by kernel `name(const float* x, const float* dy, float* dx, i64 n)`.
    fn map_bwd(&self, name: &str, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        check(name, "dy", dy.len(), x.len());
        check(name, "dx", dx.len(), x.len());
        let mut call = Call::new(self);
        let args = [call.input(x), call.input(dy), call.output(dx), i(x.len())];
        // SAFETY: the kernel's signature is as above; x, dy and dx hold n values.
        unsafe { self.elementwise(name, x.len(), &args) };
        call.finish();
    }

    /// An element-wise kernel over `n` values (skipped when `n == 0`).
    ///
    /// # Safety
    /// As [`CudaDevice::launch`].
    unsafe fn elementwise(&self, name: &str, n: usize, args: &[Arg]) {
        if n > 0 {
            // SAFETY: forwarded.
            unsafe { self.launch(name, elem_cfg(n), args) }
        }
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.gpu.ctx.bind_to_thread().is_err() || self.gpu.stream.synchronize().is_err() {
            return; // a lost context: leak rather than free memory kernels may still use
        }
        let pool = std::mem::take(&mut *self.pool.lock().unwrap_or_else(|p| p.into_inner()));
        for p in pool.into_values().flatten() {
            // SAFETY: allocated by take_scratch, freed once, the stream is idle.
            let _ = unsafe { dr::free_sync(p) };
        }
    }
}

/// The arguments of one trait call: managed slices pass through, others are staged in scratch
/// memory and outputs copied back by [`Call::finish`]. Scratch returns to the pool on drop
/// (stream order keeps a later call from overwriting it before this call's kernels ran).
struct Call<'d, 'a> {
    dev: &'d CudaDevice,
    scratch: Vec<Scratch>,
    back: Vec<(u64, &'a mut [f32])>,
    fetched: bool,
}

impl<'d, 'a> Call<'d, 'a> {
    fn new(dev: &'d CudaDevice) -> Self {
        if let Err(e) = dev.gpu.ctx.bind_to_thread() {
            fault("binding the CUDA context", e);
        }
        Call { dev, scratch: Vec::new(), back: Vec::new(), fetched: false }
    }

    fn stream(&self) -> ds::CUstream {
        self.dev.shared.stream.cu_stream()
    }

    /// Scratch memory of `bytes` bytes for this call.
    fn scratch(&mut self, bytes: usize) -> u64 {
        let s = self.dev.take_scratch(bytes);
        let p = s.ptr;
        self.scratch.push(s);
        p
    }

    fn upload<T>(&mut self, s: &[T]) -> u64 {
        let p = self.scratch(std::mem::size_of_val(s));
        // SAFETY: `p` holds at least size_of_val(s) bytes; a pageable source is copied out
        // before the call returns.
        if let Err(e) = unsafe { dr::memcpy_htod_async(p, s, self.stream()) } {
            fault("copy to the GPU (staging)", e);
        }
        p
    }

    /// The slice's own address when the kernel can use it in place (managed, or empty), else
    /// `None` (counted as staged).
    fn in_place(&mut self, s: &[f32]) -> Option<u64> {
        if s.is_empty() {
            return Some(0);
        }
        if self.dev.is_managed(s) {
            return Some(s.as_ptr() as u64);
        }
        self.dev.staged.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// A read-only argument.
    fn in_ptr(&mut self, s: &[f32]) -> u64 {
        self.in_place(s).unwrap_or_else(|| self.upload(s))
    }

    fn input(&mut self, s: &[f32]) -> Arg {
        Arg::P(self.in_ptr(s))
    }

    /// A `u32` array (never managed: always copied).
    fn input_u32(&mut self, s: &[u32]) -> Arg {
        Arg::P(if s.is_empty() { 0 } else { self.upload(s) })
    }

    /// An argument the kernel overwrites without reading.
    fn out_ptr(&mut self, s: &'a mut [f32]) -> u64 {
        self.in_place(s).unwrap_or_else(|| {
            let p = self.scratch(std::mem::size_of_val(s));
            self.back.push((p, s));
            p
        })
    }

    fn output(&mut self, s: &'a mut [f32]) -> Arg {
        Arg::P(self.out_ptr(s))
    }

    /// An argument the kernel reads and writes.
    fn inout_ptr(&mut self, s: &'a mut [f32]) -> u64 {
        self.in_place(s).unwrap_or_else(|| {
            let p = self.upload(s);
            self.back.push((p, s));
            p
        })
    }

    fn inout(&mut self, s: &'a mut [f32]) -> Arg {
        Arg::P(self.inout_ptr(s))
    }

    /// Queues a copy of `src` (device) into `dst`; valid after [`Call::finish`].
    fn fetch<T>(&mut self, dst: &mut [T], src: u64) {
        // SAFETY: `src` holds size_of_val(dst) bytes of scratch written by this call's kernels;
        // the caller reads `dst` only after finish() synchronised the stream.
        if let Err(e) = unsafe { dr::memcpy_dtoh_async(dst, src, self.stream()) } {
            fault("copy from the GPU", e);
        }
        self.fetched = true;
    }

    /// Copies staged outputs back and waits for the stream when anything was copied.
    fn finish(mut self) {
        let back = std::mem::take(&mut self.back);
        let wait = self.fetched || !back.is_empty();
        for (p, dst) in back {
            self.fetch(dst, p);
        }
        if wait {
            self.dev.shared.sync("synchronize after copying results back");
        }
    }
}

impl Drop for Call<'_, '_> {
    fn drop(&mut self) {
        for s in self.scratch.drain(..) {
            self.dev.give_scratch(s);
        }
    }
}

/// Jobs of one optimizer launch: a row of blocks each, and a grid has at most 65,535 rows.
pub(super) const MAX_JOBS: usize = 65_535;

/// The job table of an optimizer pass: (offset, len, flags) per job, as optim.cu reads it.
pub(super) fn job_table(jobs: impl Iterator<Item = (Span, i64)>) -> Vec<i64> {
    jobs.flat_map(|(s, flags)| [s.offset as i64, s.len as i64, flags]).collect()
}

/// Launch shape of an optimizer pass: one row of blocks per job (`grid.y`), as many blocks per
/// row as the longest job fills at 2048 values a block (at most 256; a block past a shorter
/// job's end leaves a zero partial), 256 threads, a double per thread of shared memory.
pub(super) fn optim_cfg(spans: impl Iterator<Item = Span>) -> LaunchConfig {
    let (mut jobs, mut longest) = (0u32, 0usize);
    for s in spans {
        jobs += 1;
        longest = longest.max(s.len);
    }
    let blocks = longest.div_ceil(2048).clamp(1, 256) as u32;
    LaunchConfig { grid_dim: (blocks, jobs, 1), block_dim: (256, 1, 1), shared_mem_bytes: 256 * 8 }
}

/// Launch shape of `sq_norm_partial`: `(blocks, config)`.
pub(super) fn sq_norm_cfg(n: usize) -> (usize, LaunchConfig) {
    let blocks = n.div_ceil(256).clamp(1, 1024);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 256 * 8,
    };
    (blocks, cfg)
}

// The host side of optim.cu's launches, shared with the CPU emulation's tests (emu_kernel_tests.rs)
// so that they check these very encodings.

/// `optim_reduce`'s job table: flags bit 0 ‖w‖², bit 1 ‖g‖², bit 2 ⟨g, w⟩.
pub(super) fn reduce_table(jobs: &[ReduceJob]) -> Vec<i64> {
    job_table(
        jobs.iter()
            .map(|j| (j.span, i64::from(j.ww) | i64::from(j.gg) << 1 | i64::from(j.gw) << 2)),
    )
}

/// The sums of `optim_reduce`'s partials (3 per block, `blocks` per job), in block order.
pub(super) fn reduce_sums(partial: &[f64], blocks: usize) -> Vec<Sums> {
    partial
        .chunks(3 * blocks)
        .map(|p| {
            let sum = |k: usize| p.iter().skip(k).step_by(3).sum::<f64>();
            Sums { ww: sum(0), gg: sum(1), gw: sum(2) }
        })
        .collect()
}

/// `optim_momentum`'s job table (bit 0 Nesterov, bit 1 ‖w‖² of the new w) and its f64
/// constants (s, wd, m, a, b per job).
pub(super) fn momentum_args(jobs: &[MomentumJob]) -> (Vec<i64>, Vec<f64>) {
    let table =
        job_table(jobs.iter().map(|j| (j.span, i64::from(j.nesterov) | i64::from(j.norm) << 1)));
    let consts = jobs.iter().flat_map(|j| [j.k.s, j.k.wd, j.k.m, j.k.a, j.k.b]).collect();
    (table, consts)
}

/// The new ‖w‖² of the jobs that asked for it (0 for the others): `optim_momentum`'s partials
/// (`blocks` per job) summed in block order.
pub(super) fn momentum_norms(partial: &[f64], blocks: usize, jobs: &[MomentumJob]) -> Vec<f64> {
    partial
        .chunks(blocks)
        .zip(jobs)
        .map(|(p, j)| if j.norm { p.iter().sum() } else { 0.0 })
        .collect()
}

/// `optim_lamb_moments`' job table and its f32 constants (9 per job), rounded exactly as the CPU
/// engine rounds them.
pub(super) fn lamb_args(jobs: &[LambJob]) -> (Vec<i64>, Vec<f32>) {
    let table = job_table(jobs.iter().map(|j| (j.span, 0)));
    let consts = jobs
        .iter()
        .flat_map(|j| {
            let k = j.k;
            [k.s, k.b1, 1.0 - k.b1, k.b2, 1.0 - k.b2, k.c1, k.c2, k.eps, k.wd].map(|x| x as f32)
        })
        .collect();
    (table, consts)
}

/// Each job's rate from `optim_lamb_moments`' partials (‖u‖², ‖w‖² per block, `blocks` per job).
pub(super) fn lamb_rates(
    partial: &[f64],
    blocks: usize,
    rate: &mut dyn FnMut(usize, f64, f64) -> f64,
) -> Vec<f64> {
    partial
        .chunks(2 * blocks)
        .enumerate()
        .map(|(j, p)| {
            let uu = p.iter().step_by(2).sum::<f64>();
            let ww = p.iter().skip(1).step_by(2).sum::<f64>();
            rate(j, uu, ww)
        })
        .collect()
}

impl Device for CudaDevice {
    type Buf = ManagedBuf;

    fn name(&self) -> String {
        format!(
            "cuda:{}({}, {}, gemm {})",
            self.gpu.ctx.ordinal(),
            self.gpu.name,
            self.gpu.arch,
            self.opts.gemm_math.name()
        )
    }

    fn threads(&self) -> usize {
        1
    }

    /// Panics when the GPU is out of memory ([`CudaDevice::try_alloc`] returns the error).
    fn alloc(&self, len: usize) -> ManagedBuf {
        self.try_alloc(len).unwrap_or_else(|e| fault(&format!("alloc of {len} floats"), e))
    }

    fn synchronize(&self) {
        self.shared.sync("synchronize");
    }

    fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &mut [f32],
    ) {
        check("gemm", "a", a.len(), m * k);
        check("gemm", "b", b.len(), k * n);
        check("gemm", "c", c.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // op(A)·op(B) is the zero matrix.
            if beta != 0.0 {
                return self.scale(beta, c);
            }
            let bytes = std::mem::size_of_val(c);
            let mut call = Call::new(self);
            let p = call.out_ptr(c);
            // SAFETY: `p` addresses the m·n floats of `c` (in place or staged).
            if let Err(e) = unsafe { dr::memset_d8_async(p, 0, bytes, call.stream()) } {
                fault("gemm (k = 0): zero C", e);
            }
            return call.finish();
        }
        let mut call = Call::new(self);
        let (pa, pb) = (call.in_ptr(a), call.in_ptr(b));
        // cuBLAS does not read C when beta is 0.
        let pc = if beta == 0.0 { call.out_ptr(c) } else { call.inout_ptr(c) };
        let blas = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: lengths checked above; the pointers address them on this device; c is a
        // unique borrow (or its own scratch), so it aliases neither a nor b.
        let r = unsafe {
            gemm_row_major_raw(
                *blas.handle(),
                self.opts.gemm_math,
                trans_a,
                trans_b,
                m,
                n,
                k,
                alpha,
                pa,
                pb,
                beta,
                pc,
            )
        };
        drop(blas);
        if let Err(e) = r {
            fault("cuBLAS gemm", e);
        }
        call.finish();
    }

    fn bias_add(&self, y: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
        check("bias_add", "y", y.len(), rows * cols);
        check("bias_add", "bias", bias.len(), cols);
        if y.is_empty() {
            return;
        }
        let mut call = Call::new(self);
        let args = [call.inout(y), call.input(bias), i(rows), i(cols)];
        // SAFETY: bias_add(float* y, const float* bias, i64 rows, i64 cols); lengths checked.
        unsafe { self.elementwise("bias_add", rows * cols, &args) };
        call.finish();
    }

    fn bias_grad(&self, dy: &[f32], rows: usize, cols: usize, dbias: &mut [f32]) {
        check("bias_grad", "dy", dy.len(), rows * cols);
        check("bias_grad", "dbias", dbias.len(), cols);
        if dy.is_empty() {
            return;
        }
        let mut call = Call::new(self);
        let args = [call.input(dy), i(rows), i(cols), call.inout(dbias)];
        // SAFETY: bias_grad(const float* dy, i64 rows, i64 cols, float* dbias); one thread
        // per column.
        unsafe { self.elementwise("bias_grad", cols, &args) };
        call.finish();
    }

    fn gelu_fwd(&self, x: &[f32], y: &mut [f32]) {
        self.map_fwd("gelu_fwd", x, y);
    }

    fn gelu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        self.map_bwd("gelu_bwd", x, dy, dx);
    }

    fn relu_fwd(&self, x: &[f32], y: &mut [f32]) {
        self.map_fwd("relu_fwd", x, y);
    }

    fn relu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        self.map_bwd("relu_bwd", x, dy, dx);
    }

    fn layernorm_fwd(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        check("layernorm_fwd", "x", x.len(), rows * cols);
        check("layernorm_fwd", "y", y.len(), rows * cols);
        check("layernorm_fwd", "gamma", gamma.len(), cols);
        check("layernorm_fwd", "beta", beta.len(), cols);
        check("layernorm_fwd", "mean", mean.len(), rows);
        check("layernorm_fwd", "rstd", rstd.len(), rows);
        if rows == 0 || cols == 0 {
            return;
        }
        let mut call = Call::new(self);
        let args = [
            call.input(x),
            call.input(gamma),
            call.input(beta),
            i(rows),
            i(cols),
            Arg::F(eps),
            call.output(y),
            call.output(mean),
            call.output(rstd),
        ];
        // SAFETY: layernorm_fwd(x, gamma, beta, rows, cols, eps, y, mean, rstd), one block per
        // row with blockDim doubles of shared memory (row_cfg).
        unsafe { self.launch("layernorm_fwd", row_cfg(rows), &args) };
        call.finish();
    }

    fn layernorm_bwd(
        &self,
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        check("layernorm_bwd", "x", x.len(), rows * cols);
        check("layernorm_bwd", "dy", dy.len(), rows * cols);
        check("layernorm_bwd", "dx", dx.len(), rows * cols);
        check("layernorm_bwd", "gamma", gamma.len(), cols);
        check("layernorm_bwd", "dgamma", dgamma.len(), cols);
        check("layernorm_bwd", "dbeta", dbeta.len(), cols);
        check("layernorm_bwd", "mean", mean.len(), rows);
        check("layernorm_bwd", "rstd", rstd.len(), rows);
        if rows == 0 || cols == 0 {
            return;
        }
        let mut call = Call::new(self);
        let (px, pg, pm, pr, pdy) =
            (call.input(x), call.input(gamma), call.input(mean), call.input(rstd), call.input(dy));
        let (r, c) = (i(rows), i(cols));
        let args = [px, pg, pm, pr, pdy, r, c, call.output(dx)];
        // SAFETY: layernorm_bwd_dx(x, gamma, mean, rstd, dy, rows, cols, dx), row_cfg.
        unsafe { self.launch("layernorm_bwd_dx", row_cfg(rows), &args) };
        let args = [px, pm, pr, pdy, r, c, call.inout(dgamma), call.inout(dbeta)];
        // SAFETY: layernorm_bwd_params(x, mean, rstd, dy, rows, cols, dgamma, dbeta); one
        // thread per column.
        unsafe { self.elementwise("layernorm_bwd_params", cols, &args) };
        call.finish();
    }

    fn copy(&self, x: &[f32], y: &mut [f32]) {
        check("copy", "x", x.len(), y.len());
        if x.is_empty() {
            return;
        }
        let bytes = std::mem::size_of_val(x);
        let mut call = Call::new(self);
        let (px, py) = (call.in_ptr(x), call.out_ptr(y));
        // SAFETY: both pointers address `bytes` bytes on this device (in place or staged); `y`
        // is a unique borrow, so the ranges do not overlap.
        if let Err(e) = unsafe { dr::memcpy_dtod_async(py, px, bytes, call.stream()) } {
            fault("copy", e);
        }
        call.finish();
    }

    fn add_inplace(&self, y: &mut [f32], x: &[f32]) {
        check("add_inplace", "x", x.len(), y.len());
        let n = x.len();
        let mut call = Call::new(self);
        let args = [call.inout(y), call.input(x), i(n)];
        // SAFETY: add_inplace(float* y, const float* x, i64 n).
        unsafe { self.elementwise("add_inplace", n, &args) };
        call.finish();
    }

    fn l2_normalize_fwd(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        y: &mut [f32],
        norms: &mut [f32],
    ) {
        check("l2_normalize_fwd", "x", x.len(), rows * cols);
        check("l2_normalize_fwd", "y", y.len(), rows * cols);
        check("l2_normalize_fwd", "norms", norms.len(), rows);
        if rows == 0 || cols == 0 {
            return;
        }
        let mut call = Call::new(self);
        let args = [
            call.input(x),
            i(rows),
            i(cols),
            Arg::F(L2_NORM_EPS),
            call.output(y),
            call.output(norms),
        ];
        // SAFETY: l2_normalize_fwd(x, rows, cols, eps, y, norms), row_cfg.
        unsafe { self.launch("l2_normalize_fwd", row_cfg(rows), &args) };
        call.finish();
    }

    fn l2_normalize_bwd(
        &self,
        y: &[f32],
        norms: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
    ) {
        check("l2_normalize_bwd", "y", y.len(), rows * cols);
        check("l2_normalize_bwd", "dy", dy.len(), rows * cols);
        check("l2_normalize_bwd", "dx", dx.len(), rows * cols);
        check("l2_normalize_bwd", "norms", norms.len(), rows);
        if rows == 0 || cols == 0 {
            return;
        }
        let mut call = Call::new(self);
        let args =
            [call.input(y), call.input(norms), call.input(dy), i(rows), i(cols), call.output(dx)];
        // SAFETY: l2_normalize_bwd(y, norms, dy, rows, cols, dx), row_cfg.
        unsafe { self.launch("l2_normalize_bwd", row_cfg(rows), &args) };
        call.finish();
    }

    fn softmax_xent(
        &self,
        logits: &[f32],
        labels: &[u32],
        rows: usize,
        cols: usize,
        grad_scale: f32,
        dlogits: &mut [f32],
    ) -> XentOut {
        check("softmax_xent", "logits", logits.len(), rows * cols);
        check("softmax_xent", "dlogits", dlogits.len(), rows * cols);
        check("softmax_xent", "labels", labels.len(), rows);
        if rows == 0 || cols == 0 {
            return XentOut { loss_sum: 0.0, correct: 0 };
        }
        for (r, &label) in labels.iter().enumerate() {
            assert!(
                (label as usize) < cols,
                "softmax_xent: label {label} in row {r} is not < {cols} classes"
            );
        }
        let mut row_loss = vec![0.0f64; rows];
        let mut row_hit = vec![0i32; rows];
        let mut call = Call::new(self);
        let (ploss, phit) = (call.scratch(rows * 8), call.scratch(rows * 4));
        let args = [
            call.input(logits),
            call.input_u32(labels),
            i(rows),
            i(cols),
            Arg::F(grad_scale),
            call.output(dlogits),
            Arg::P(ploss),
            Arg::P(phit),
        ];
        // SAFETY: softmax_xent(logits, labels, rows, cols, grad_scale, dlogits, row_loss,
        // row_hit); labels < cols checked; row_cfg's shared memory holds the f32 + i32 scratch.
        unsafe { self.launch("softmax_xent", row_cfg(rows), &args) };
        call.fetch(&mut row_loss, ploss);
        call.fetch(&mut row_hit, phit);
        call.finish();
        XentOut {
            loss_sum: row_loss.iter().sum(),
            correct: row_hit.iter().filter(|&&h| h == 1).count(),
        }
    }

    fn sq_norm(&self, x: &[f32]) -> f64 {
        if x.is_empty() {
            return 0.0;
        }
        let (blocks, cfg) = sq_norm_cfg(x.len());
        let mut partial = vec![0.0f64; blocks];
        let mut call = Call::new(self);
        let pp = call.scratch(blocks * 8);
        let args = [call.input(x), i(x.len()), Arg::P(pp)];
        // SAFETY: sq_norm_partial(const float* x, i64 n, double* partial[gridDim.x]) with
        // blockDim doubles of shared memory.
        unsafe { self.launch("sq_norm_partial", cfg, &args) };
        call.fetch(&mut partial, pp);
        call.finish();
        partial.iter().sum()
    }

    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        check("axpy", "x", x.len(), y.len());
        let n = x.len();
        let mut call = Call::new(self);
        let args = [Arg::F(alpha), call.input(x), call.inout(y), i(n)];
        // SAFETY: axpy(float alpha, const float* x, float* y, i64 n).
        unsafe { self.elementwise("axpy", n, &args) };
        call.finish();
    }

    fn scale(&self, alpha: f32, x: &mut [f32]) {
        let n = x.len();
        let mut call = Call::new(self);
        let args = [Arg::F(alpha), call.inout(x), i(n)];
        // SAFETY: scale(float alpha, float* x, i64 n).
        unsafe { self.elementwise("scale", n, &args) };
        call.finish();
    }

    fn sq_norms(&self, x: &[f32], groups: &[(usize, usize)]) -> Vec<f64> {
        // The optimizer's batched sums: one launch and one wait for all groups.
        let jobs: Vec<ReduceJob> = groups
            .iter()
            .map(|&(offset, len)| ReduceJob {
                span: Span { offset, len },
                ww: false,
                gg: true,
                gw: false,
            })
            .collect();
        self.optim_reduce(x, x, &jobs).into_iter().map(|s| s.gg).collect()
    }

    fn all_finite(&self, x: &[f32]) -> bool {
        // Σ x² in f64 is finite exactly when every x is (f32 squares cannot overflow it).
        self.sq_norm(x).is_finite()
    }

    fn optim_reduce(&self, w: &[f32], g: &[f32], jobs: &[ReduceJob]) -> Vec<Sums> {
        check_spans("optim_reduce", w.len().min(g.len()), jobs.iter().map(|j| j.span));
        if jobs.len() > MAX_JOBS {
            return jobs.chunks(MAX_JOBS).flat_map(|c| self.optim_reduce(w, g, c)).collect();
        }
        if jobs.is_empty() {
            return Vec::new();
        }
        let table = reduce_table(jobs);
        let cfg = optim_cfg(jobs.iter().map(|j| j.span));
        let slots = cfg.grid_dim.0 as usize * jobs.len();
        let mut partial = vec![0.0f64; 3 * slots];
        let mut call = Call::new(self);
        let pp = call.scratch(partial.len() * 8);
        let args = [call.input(w), call.input(g), Arg::P(call.upload(&table)), Arg::P(pp)];
        // SAFETY: optim_reduce(const float* w, const float* g, const i64* jobs[3·jobs],
        // double* partial[3·blocks·jobs]); every span lies inside w and g (checked above).
        unsafe { self.launch("optim_reduce", cfg, &args) };
        call.fetch(&mut partial, pp);
        call.finish();
        reduce_sums(&partial, cfg.grid_dim.0 as usize)
    }

    fn optim_momentum(
        &self,
        w: &mut [f32],
        g: &[f32],
        v: &mut [f32],
        jobs: &[MomentumJob],
    ) -> Vec<f64> {
        check_spans(
            "optim_momentum",
            w.len().min(g.len()).min(v.len()),
            jobs.iter().map(|j| j.span),
        );
        if jobs.len() > MAX_JOBS {
            return jobs.chunks(MAX_JOBS).flat_map(|c| self.optim_momentum(w, g, v, c)).collect();
        }
        if jobs.is_empty() {
            return Vec::new();
        }
        let (table, consts) = momentum_args(jobs);
        let cfg = optim_cfg(jobs.iter().map(|j| j.span));
        let blocks = cfg.grid_dim.0 as usize;
        let mut partial = vec![0.0f64; blocks * jobs.len()];
        let mut call = Call::new(self);
        let pp = call.scratch(partial.len() * 8);
        let args = [
            call.inout(w),
            call.input(g),
            call.inout(v),
            Arg::P(call.upload(&table)),
            Arg::P(call.upload(&consts)),
            Arg::P(pp),
        ];
        // SAFETY: optim_momentum(float* w, const float* g, float* v, const i64* jobs[3·jobs],
        // const double* k[5·jobs], double* partial[blocks·jobs]); spans checked above.
        unsafe { self.launch("optim_momentum", cfg, &args) };
        let norms = jobs.iter().any(|j| j.norm);
        if norms {
            call.fetch(&mut partial, pp);
        }
        call.finish();
        // The host reads the parameters next (checkpoint, logit-scale clamp).
        self.shared.sync("synchronize after the optimizer step");
        momentum_norms(&partial, blocks, jobs)
    }

    fn optim_lamb(
        &self,
        w: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        u: &mut [f32],
        jobs: &[LambJob],
        rate: &mut dyn FnMut(usize, f64, f64) -> f64,
    ) {
        let len = w.len().min(g.len()).min(m.len()).min(v.len());
        check_spans("optim_lamb", len, jobs.iter().map(|j| j.span));
        if jobs.len() > MAX_JOBS {
            for (ci, c) in jobs.chunks(MAX_JOBS).enumerate() {
                self.optim_lamb(w, g, m, v, u, c, &mut |j, uu, ww| rate(ci * MAX_JOBS + j, uu, ww));
            }
            return;
        }
        if jobs.is_empty() {
            return;
        }
        let (table, consts) = lamb_args(jobs);
        let cfg = optim_cfg(jobs.iter().map(|j| j.span));
        let blocks = cfg.grid_dim.0 as usize;
        let mut partial = vec![0.0f64; 2 * blocks * jobs.len()];
        // All jobs run at once, so u needs a value per element (indexed like w): the caller's
        // scratch when it is that long, else the device's (from the cache after the first step).
        let end = jobs.iter().map(|j| j.span.offset + j.span.len).max().unwrap_or(0);
        let mut own = (u.len() < end).then(|| self.alloc(end));
        let u: &mut [f32] = match own.as_mut() {
            Some(b) => b,
            None => u,
        };
        let rates: Vec<f64>;
        {
            let mut call = Call::new(self);
            let pp = call.scratch(partial.len() * 8);
            let args = [
                call.input(w),
                call.input(g),
                call.inout(m),
                call.inout(v),
                call.inout(u),
                Arg::P(call.upload(&table)),
                Arg::P(call.upload(&consts)),
                Arg::P(pp),
            ];
            // SAFETY: optim_lamb_moments(const float* w, const float* g, float* m, float* v,
            // float* u, const i64* jobs[3·jobs], const float* c[9·jobs],
            // double* partial[2·blocks·jobs]); spans checked above against all five buffers.
            unsafe { self.launch("optim_lamb_moments", cfg, &args) };
            call.fetch(&mut partial, pp);
            call.finish();
            rates = lamb_rates(&partial, blocks, rate);
        }
        let mut call = Call::new(self);
        let args = [
            call.inout(w),
            call.input(u),
            Arg::P(call.upload(&table)),
            Arg::P(call.upload(&rates)),
        ];
        let apply = LaunchConfig { shared_mem_bytes: 0, ..cfg };
        // SAFETY: optim_lamb_apply(float* w, const float* u, const i64* jobs[3·jobs],
        // const double* rate[jobs]); spans checked above.
        unsafe { self.launch("optim_lamb_apply", apply, &args) };
        call.finish();
        self.shared.sync("synchronize after the optimizer step");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_finds_the_allocation_holding_a_whole_range() {
        let mut r = Registry::default();
        r.insert(1000, 400);
        r.insert(1400, 100); // adjacent to the first
        r.insert(4000, 8);
        assert_eq!(r.containing(1000, 400), Some(1000), "the whole first buffer");
        assert_eq!(r.containing(1100, 40), Some(1000), "a sub-slice");
        assert_eq!(r.containing(1396, 4), Some(1000), "the last element");
        assert_eq!(r.containing(1400, 100), Some(1400));
        assert_eq!(r.containing(1396, 8), None, "straddles two adjacent buffers");
        assert_eq!(r.containing(996, 8), None, "starts before the first");
        assert_eq!(r.containing(1450, 100), None, "runs past the end");
        assert_eq!(r.containing(2000, 4), None, "in a gap");
        assert_eq!(r.containing(500, 4), None, "below every buffer");
        assert_eq!(r.containing(4004, 4), Some(4000));
        assert_eq!(r.containing(4004, 8), None);
        assert_eq!(r.containing(usize::MAX - 2, 8), None, "address overflow");
        r.remove(1000);
        assert_eq!(r.containing(1100, 40), None, "freed");
        assert_eq!(r.containing(1400, 4), Some(1400));
    }

    #[test]
    fn gemm_math_names_round_trip() {
        for m in GemmMath::ALL {
            assert_eq!(GemmMath::parse(m.name()), Some(m));
        }
        assert_eq!(GemmMath::parse("fp16"), None);
        assert_eq!(CudaDeviceOpts::default().gemm_math, GemmMath::Fp32);
    }

    #[test]
    fn sq_norm_grid_covers_small_and_large_inputs() {
        assert_eq!(sq_norm_cfg(1).0, 1);
        assert_eq!(sq_norm_cfg(257).0, 2);
        let (blocks, cfg) = sq_norm_cfg(1 << 30);
        assert_eq!(blocks, 1024);
        assert_eq!(cfg.grid_dim.0 as usize, blocks);
        assert_eq!(cfg.shared_mem_bytes, 256 * 8, "one double per thread");
    }

    #[test]
    fn open_without_a_driver_is_a_clean_error() {
        if Lib::Driver.present() {
            // A GPU machine: the device opens, allocations are zeroed, registered, and the
            // kernels run in place on them.
            let dev =
                CudaDevice::open(0, CudaDeviceOpts::default()).unwrap_or_else(|e| panic!("{e}"));
            let mut x = dev.alloc(1031);
            dev.synchronize();
            assert!(x.iter().all(|&v| v == 0.0));
            assert!(dev.is_managed(&x) && dev.is_managed(&x[3..10]));
            assert!(!dev.is_managed(&[1.0f32; 4]));
            x.iter_mut().enumerate().for_each(|(j, v)| *v = j as f32);
            dev.scale(2.0, &mut x[1..]);
            dev.synchronize();
            assert_eq!(dev.staged_count(), 0);
            assert!(
                x.iter().enumerate().all(|(j, &v)| v == if j == 0 { 0.0 } else { 2.0 * j as f32 })
            );
            return;
        }
        let e = CudaDevice::open(0, CudaDeviceOpts::default())
            .expect_err("open must fail without a driver")
            .to_string();
        assert!(e.contains("libcuda.so.1") && e.contains("NVIDIA driver"), "{e}");
    }
}
