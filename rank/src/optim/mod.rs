//! Optimizers over the flat parameter buffer, and learning-rate schedules.
//!
//! Every optimizer consumes the all-reduced gradient, so parameters stay bitwise identical on
//! every rank. This module holds SGD with momentum (and Nesterov); the large-batch optimizers
//! (LARS, TVLARS, LAMB) come with their own issue and build on the same per-tensor groups.

pub mod schedule;
pub mod sgd;

pub use schedule::Schedule;
pub use sgd::Sgd;

/// One parameter tensor as the optimizer sees it: a slice of the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorGroup {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    /// Weight decay applies (by default: tensors with two or more dimensions).
    pub decay: bool,
    /// False for frozen tensors (a LiT-locked tower): never updated.
    pub trainable: bool,
}
