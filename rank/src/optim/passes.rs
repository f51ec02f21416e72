//! The element passes of one optimizer step, as the device runs them.
//!
//! [`Optimizer::step_on`](super::Optimizer::step_on) splits a step into host work (the
//! clipping factor, the trust ratios, the statistics: a few scalars per tensor) and three
//! passes over the flat buffers, each a batch of jobs, one per tensor, that a device runs as it
//! likes: [`Device::optim_reduce`](crate::device::Device::optim_reduce) (the sums the ratios
//! need), [`Device::optim_momentum`](crate::device::Device::optim_momentum) (the fused
//! momentum update of SGD, LARS and TVLARS) and
//! [`Device::optim_lamb`](crate::device::Device::optim_lamb) (LAMB's moments, then its update
//! at the rate the host picks from the sums). The CPU runs each job with the engine's kernels
//! (eight f64 lanes in a fixed order); a GPU runs a batch as one kernel launch over all its
//! jobs, and waits for its stream only where the host needs sums back.

/// One tensor's range of the flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn range(self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The sums one tensor needs: ‖w‖², ‖g‖², ⟨g, w⟩ over its span of the parameters `w` and the
/// gradient `g`. Sums not asked for are returned as 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReduceJob {
    pub span: Span,
    pub ww: bool,
    pub gg: bool,
    pub gw: bool,
}

/// What a [`ReduceJob`] returns, in f64.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    pub ww: f64,
    pub gg: f64,
    pub gw: f64,
}

/// Constants of the fused momentum update: d = s·g + wd·w; v ← m·v + a·d; Δ = v (or a·d + m·v
/// with Nesterov); w ← w − b·Δ. Classic momentum is a = lr·r, b = 1; PyTorch's is a = r, b = lr.
/// Every product and sum is one rounded f64 operation in this order (no fused multiply-add),
/// and w and v are rounded to f32 once at the end, so every device computes the same bits from
/// the same constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Momentum {
    pub s: f64,
    pub wd: f64,
    pub m: f64,
    pub a: f64,
    pub b: f64,
}

/// The momentum update of one tensor; with `norm` the pass also returns ‖w‖² of the new w
/// (the next step's ‖w‖ under LARS and TVLARS).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MomentumJob {
    pub span: Span,
    pub k: Momentum,
    pub nesterov: bool,
    pub norm: bool,
}

/// LAMB constants of one step. The moments and the direction are f32 arithmetic (one rounded
/// operation each, no fused multiply-add): g' = s·g; m ← β₁·m + (1 − β₁)·g';
/// v ← β₂·v + ((1 − β₂)·g')·g'; u = (m·c1)/(√(v·c2) + ε) + wd·w. The update w ← w − rate·u is f64.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambStep {
    pub s: f64,
    pub wd: f64,
    pub b1: f64,
    pub b2: f64,
    /// 1/(1 − β₁ᵗ), 1/(1 − β₂ᵗ) (1 without bias correction).
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
}

/// LAMB on one tensor: the moments and the direction u, then w ← w − rate·u with the rate the
/// host returns for (‖u‖², ‖w‖²).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambJob {
    pub span: Span,
    pub k: LambStep,
}

/// Checks that every job lies inside buffers of `len` values (a bug of the caller otherwise).
pub(crate) fn check_spans(what: &str, len: usize, spans: impl Iterator<Item = Span>) {
    for s in spans {
        assert!(
            s.offset.checked_add(s.len).is_some_and(|end| end <= len),
            "{what}: job {}..+{} outside buffers of {len} values",
            s.offset,
            s.len
        );
    }
}
