//! Losses on features and logits, written for data parallelism: each rank computes the
//! gradient for its own rows, scaled so that the SUM over ranks of the parameter gradients is
//! the gradient of the global-batch loss.

mod clip;
mod cross_entropy;

pub use clip::{ClipOut, clip_loss_local, clip_loss_reference_f64};
pub use cross_entropy::{CeOut, cross_entropy};
