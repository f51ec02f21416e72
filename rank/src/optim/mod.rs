//! Optimizers over the flat parameter buffer, and learning-rate schedules.
//!
//! Every optimizer consumes the all-reduced gradient, so parameters stay bitwise identical on
//! every rank. One per-tensor trust-ratio engine ([`Optimizer`]) serves SGD with momentum (and
//! Nesterov), LARS, TVLARS and LAMB; its options and defaults are in [`OptimConfig`] and
//! docs/OPTIMIZERS.md. [`Sgd`] is the earlier stand-alone SGD, kept for callers that use it.

pub mod bench;
pub mod cases;
pub mod config;
pub mod engine;
pub mod passes;
pub mod schedule;
pub mod sgd;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use bench::{BenchResult, bench_step};
pub use config::OptimConfig;
pub use engine::{GroupStat, OptimError, Optimizer, StatsSummary, StepStats};
pub use schedule::Schedule;
pub use sgd::Sgd;

/// One parameter tensor as the optimizer sees it: a slice of the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorGroup {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    /// Number of dimensions of the tensor (0 for a scalar such as the logit scale).
    pub ndim: usize,
    /// Weight decay applies (by default: tensors with two or more dimensions).
    pub decay: bool,
    /// The trust ratio applies under LARS, TVLARS and LAMB (by default: tensors with two or
    /// more dimensions); otherwise the tensor takes the plain momentum / Adam update.
    pub adapt: bool,
    /// False for frozen tensors (a LiT-locked tower): never updated.
    pub trainable: bool,
    /// Multiplies the step's learning rate for this tensor (`optim.lr_scale`; default 1), as
    /// a PyTorch parameter group's own `lr` does.
    pub lr_scale: f64,
}

impl TensorGroup {
    /// A tensor of `shape` with the default exclusion rule: ndim ≤ 1 (biases, LayerNorm γ/β,
    /// the logit scale) gets neither weight decay nor the trust ratio.
    pub fn from_shape(
        name: impl Into<String>,
        offset: usize,
        len: usize,
        shape: &[usize],
        trainable: bool,
    ) -> TensorGroup {
        let big = shape.len() >= 2;
        TensorGroup {
            name: name.into(),
            offset,
            len,
            ndim: shape.len(),
            decay: big,
            adapt: big,
            trainable,
            lr_scale: 1.0,
        }
    }
}
