//! CUDA foundations: run-time library discovery, NVRTC kernel compilation and a GPU self-test.
//!
//! Everything here builds and type-checks on machines without a GPU or CUDA toolkit: cudarc is
//! compiled with `dynamic-loading`, so the driver (`libcuda.so.1`), NVRTC (`libnvrtc.so.13`),
//! cuBLAS (`libcublas.so.13`) and NCCL (`libnccl.so.2`) are opened only when first used.
//! cudarc panics when a library is missing; every entry point here probes first
//! ([`libs::require`]) and returns a [`CudaError`] naming the library and the fix instead.
//!
//! - [`libs`]: which libraries load, where the pip wheels keep them, and the loader path that
//!   makes them loadable (NCCL ships as `libnccl.so.2`, a name cudarc does not try).
//! - [`nvrtc`]: the `.cu` sources in `kernels/` and their compilation (warnings are errors in
//!   `tessera cuda check-kernels`, which CI runs with the NVRTC of the PyPI wheel).
//! - [`kcache`]: the on-disk cache of compiled kernels that [`gpu::Gpu::open`] reads first.
//! - [`gpu`]: a context with every kernel loaded, and launch helpers.
//! - [`device`]: [`device::CudaDevice`], the `Device` trait on one GPU (managed buffers,
//!   staging of plain slices through a scratch pool, cuBLAS GEMMs).
//! - [`nccl`]: [`nccl::NcclComm`], the NCCL `Communicator` (non-blocking init, its own
//!   stream, pinned staging, a watchdog that aborts on error or timeout) and the all-reduce
//!   bandwidth measurement of `tessera cuda nccl-bench`.
//! - [`ring`]: [`ring::GpuClipBlocks`], the CLIP ring loss's block work on the GPU (the fused
//!   kernels per visiting block), for jobs of several GPU ranks.
//! - [`selftest`]: every kernel vs the CPU device and an f64 reference, cuBLAS, the fused
//!   loss, `CudaDevice` vs `CpuDevice`, NCCL at world size 1 (`tessera cuda selftest`).
//!
//! The bucketed gradient all-reduce ordered by CUDA events is [`nccl::OverlapAllReduce`].

pub mod device;
#[cfg(test)]
pub mod emu;
pub mod gpu;
pub mod kcache;
pub mod libs;
pub mod nccl;
pub mod nvrtc;
pub mod ring;
pub mod selftest;

/// Errors of the CUDA layer. Messages say what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A shared library could not be opened.
    #[error("{lib} not found ({file} could not be loaded): {fix}")]
    LibraryMissing { lib: &'static str, file: &'static str, fix: &'static str },
    /// NVRTC rejected a kernel source (the log is included).
    #[error("NVRTC failed to compile {source_name} for {arch}:\n{log}")]
    Compile { source_name: String, arch: String, log: String },
    /// NVRTC compiled a kernel source but printed warnings (treated as errors by the check).
    #[error("NVRTC compiled {source_name} for {arch} with warnings (warnings are errors):\n{log}")]
    Warnings { source_name: String, arch: String, log: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {what}: {detail}")]
    Driver { what: String, detail: String },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {what}: {detail}")]
    Cublas { what: String, detail: String },
    /// An NCCL call failed.
    #[error("NCCL: {what}: {detail}")]
    Nccl { what: String, detail: String },
    /// Bad arguments or an impossible configuration.
    #[error("cuda: {0}")]
    Invalid(String),
}

impl CudaError {
    pub(crate) fn driver(what: impl Into<String>, e: impl std::fmt::Debug) -> Self {
        CudaError::Driver { what: what.into(), detail: format!("{e:?}") }
    }
}
