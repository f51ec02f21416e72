//! Device kernels: the numeric building blocks of models and losses.
//!
//! All tensors are row-major `f32`. A matrix `rows × cols` is a slice of `rows * cols` values.
//!
//! # Design
//!
//! [`Device`] is the kernel interface the model and the losses call; [`CpuDevice`] implements
//! it with the `gemm` crate (AVX-512/AVX2/NEON micro-kernels) and plain loops. Kernels take
//! `&[f32]` / `&mut [f32]` views of memory that the device can address directly, and every
//! buffer a model keeps for a long time (parameters, gradients, activations) is allocated
//! through [`Device::alloc`], whose associated type [`Device::Buf`] dereferences to such a
//! slice. On the CPU `Buf` is a `Vec<f32>`; a CUDA device implements `Buf` over managed
//! (unified) memory, so the same slice-shaped calls pass device-addressable pointers to its
//! kernels, and [`Device::synchronize`] marks the points where the host reads results. This
//! keeps the model code single-sourced and free of lifetimes-of-views plumbing.
//!
//! Length contracts: kernels check the lengths of their arguments against the dimensions they
//! are given and panic with a message naming the kernel and the argument on a mismatch. Those
//! are programming errors inside Tessera (the model validates user input before calling them),
//! and for the GEMM the check is what keeps the raw-pointer call memory-safe.

mod cpu;
pub mod cuda;
#[cfg(test)]
pub(crate) mod reference;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tracked;

pub use cpu::{CpuDevice, fast_exp, sgemm_gflops};

use crate::optim::passes::{LambJob, MomentumJob, ReduceJob, Sums};

/// The epsilon used by [`Device::l2_normalize_fwd`]: norms below it are clamped.
pub const L2_NORM_EPS: f32 = 1e-12;

/// Result of [`Device::softmax_xent`]: loss sum and number of correct arg-max predictions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct XentOut {
    /// Σ over the rows of −log softmax(logits)\[label\] (not divided by anything), in f64.
    pub loss_sum: f64,
    /// Rows whose arg-max logit (first one on ties) equals the label.
    pub correct: usize,
}

/// What a device buffer is: a slice of `f32` on the host side (see the module documentation).
pub trait DeviceBuf:
    std::ops::Deref<Target = [f32]> + std::ops::DerefMut + Send + Sync + std::fmt::Debug
{
}

impl<T> DeviceBuf for T where
    T: std::ops::Deref<Target = [f32]> + std::ops::DerefMut + Send + Sync + std::fmt::Debug
{
}

/// The kernel interface. See the module documentation for the memory model.
pub trait Device: Send + Sync {
    /// A long-lived buffer of `f32` that the device's kernels can address.
    type Buf: DeviceBuf;

    /// Human-readable name, e.g. `cpu(threads=2)`.
    fn name(&self) -> String;

    /// Threads (CPU) the kernels may use.
    fn threads(&self) -> usize;

    /// A buffer of `len` zeros. The zeroing is queued like a kernel: kernels may use the
    /// buffer at once, the host only after [`Device::synchronize`].
    fn alloc(&self, len: usize) -> Self::Buf;

    /// Wait for all queued kernels (no-op on the CPU).
    fn synchronize(&self) {}

    /// The values of `buf` as a host `Vec` (no copy where `Buf` is a `Vec`). Call after
    /// [`Device::synchronize`] when kernels wrote `buf`.
    fn host_vec(&self, buf: Self::Buf) -> Vec<f32> {
        buf.to_vec()
    }

    /// `y = x` (same length), queued like any kernel.
    fn copy(&self, x: &[f32], y: &mut [f32]);

    /// General matrix product, BLAS-style on row-major data:
    /// `C = alpha · op(A) · op(B) + beta · C`, where `op(A)` is `m × k` and `op(B)` is `k × n`.
    /// `A` is stored `m × k` (or `k × m` when `trans_a`), `B` `k × n` (or `n × k` when
    /// `trans_b`), `C` is `m × n`. With `beta == 0` the old contents of `C` are ignored (even
    /// NaN). Forward `Y = X·W` is `(false, false)`, `dX = dY·Wᵀ` is `(false, true)`, and the
    /// accumulating `dW += Xᵀ·dY` is `(true, false)` with `beta = 1`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// `y[r, c] += bias[c]` for every row of the `rows × cols` matrix `y`.
    fn bias_add(&self, y: &mut [f32], bias: &[f32], rows: usize, cols: usize);

    /// `dbias[c] += Σ_r dy[r, c]` (column sums, accumulated).
    fn bias_grad(&self, dy: &[f32], rows: usize, cols: usize, dbias: &mut [f32]);

    /// `y = gelu(x)`, tanh approximation `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    fn gelu_fwd(&self, x: &[f32], y: &mut [f32]);

    /// `dx = dy · gelu'(x)` (overwrites `dx`).
    fn gelu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]);

    /// `y = max(x, 0)`.
    fn relu_fwd(&self, x: &[f32], y: &mut [f32]);

    /// `dx = dy · [x > 0]` (overwrites `dx`).
    fn relu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]);

    /// Row-wise LayerNorm: `y = γ ⊙ (x − μ)·rstd + β`, `rstd = 1/√(var + eps)` with the biased
    /// variance. Writes `y` (`rows × cols`), `mean` and `rstd` (`rows` each, kept for backward).
    #[allow(clippy::too_many_arguments)]
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
    );

    /// LayerNorm backward: overwrites `dx`, accumulates into `dgamma` and `dbeta`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// Residual add: `y += x`.
    fn add_inplace(&self, y: &mut [f32], x: &[f32]);

    /// Row-wise L2 normalisation `y = x / max(‖x‖, L2_NORM_EPS)`; `norms` (`rows`) receives the
    /// clamped norms for backward.
    fn l2_normalize_fwd(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        y: &mut [f32],
        norms: &mut [f32],
    );

    /// L2-normalise backward from the outputs: `dx = (dy − y·⟨y, dy⟩) / ‖x‖` (overwrites `dx`).
    fn l2_normalize_bwd(
        &self,
        y: &[f32],
        norms: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
    );

    /// Softmax cross-entropy over the rows of `logits` (`rows × cols`) with integer labels.
    /// Writes `dlogits = grad_scale · (softmax(logits) − onehot(label))` (overwrites) and
    /// returns the loss sum and the arg-max hit count. Labels must be `< cols`.
    fn softmax_xent(
        &self,
        logits: &[f32],
        labels: &[u32],
        rows: usize,
        cols: usize,
        grad_scale: f32,
        dlogits: &mut [f32],
    ) -> XentOut;

    /// `Σ x²`, accumulated in f64.
    fn sq_norm(&self, x: &[f32]) -> f64;

    /// `y += alpha · x`.
    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]);

    /// `x *= alpha`.
    fn scale(&self, alpha: f32, x: &mut [f32]);

    /// `Σ x²` over each `(offset, len)` group of `x`, in f64, one value per group (the noise
    /// scale's norms). The default sums on the host (after a [`Device::synchronize`]).
    fn sq_norms(&self, x: &[f32], groups: &[(usize, usize)]) -> Vec<f64> {
        self.synchronize();
        crate::gns::host_sq_norms(x, groups)
    }

    /// Whether every value of `x` is finite. The default looks on the host (after a
    /// [`Device::synchronize`]).
    fn all_finite(&self, x: &[f32]) -> bool {
        self.synchronize();
        // An OR of exponent tests (no dependency chain, so it vectorizes).
        const EXP: u32 = 0x7f80_0000;
        !x.iter().fold(false, |bad, v| bad | (v.to_bits() & EXP == EXP))
    }

    /// Optimizer pass (rank/src/optim/passes.rs): the sums each job asks for over its span of
    /// the parameters `w` and the gradient `g`, in job order. The host reads them, so a device
    /// waits for its kernels. The default runs the CPU's kernels on the host's view of the
    /// buffers (after a [`Device::synchronize`]).
    fn optim_reduce(&self, w: &[f32], g: &[f32], jobs: &[ReduceJob]) -> Vec<Sums> {
        self.synchronize();
        crate::optim::engine::host_reduce(w, g, jobs)
    }

    /// Optimizer pass: the fused momentum update of each job's span of `w` and the momentum
    /// `v`; returns, per job, ‖w‖² of its new w where the job asks for it (0 otherwise).
    fn optim_momentum(
        &self,
        w: &mut [f32],
        g: &[f32],
        v: &mut [f32],
        jobs: &[MomentumJob],
    ) -> Vec<f64> {
        self.synchronize();
        crate::optim::engine::host_momentum(w, g, v, jobs)
    }

    /// Optimizer pass: LAMB's moments `m`, `v` and direction `u` of every job, then
    /// `w ← w − rate·u` with `rate(job, ‖u‖², ‖w‖²)` from the host. `u` is scratch of at least
    /// the longest job's length (the host runs a job at a time); a device that runs all jobs
    /// at once may use scratch of its own.
    #[allow(clippy::too_many_arguments)]
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
        self.synchronize();
        crate::optim::engine::host_lamb(w, g, m, v, u, jobs, rate)
    }
}
