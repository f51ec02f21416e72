//! Losses on features and logits, written for data parallelism: each rank computes the
//! gradient for its own rows, scaled so that the SUM over ranks of the parameter gradients is
//! the gradient of the global-batch loss.

pub mod bench;
mod clip;
mod cross_entropy;
pub mod loss_config;
pub mod ring;
pub mod ring_device;
#[cfg(test)]
mod ring_device_tests;
#[cfg(test)]
mod ring_tests;
mod siglip;

pub use bench::{BenchedLoss, LossBench, LossImpl, bench_loss};
pub use clip::{ClipOut, clip_loss_local, clip_loss_reference_f64};
pub use cross_entropy::{CeOut, cross_entropy};
pub use loss_config::{LossConfig, LossKind};
pub use ring::{
    AUTO_CHUNK_BYTES, ClipBlocks, LossError, LossProgress, RingLossOpts, RingLossOut,
    RingLossWorkspace, clip_loss_ring, clip_loss_ring_with, clip_loss_ring_ws,
    clip_loss_ring_ws_owned, siglip_loss_reference_f64, siglip_loss_ring, siglip_loss_ring_with,
    siglip_loss_ring_ws, siglip_loss_ring_ws_owned,
};
pub use siglip::{SiglipOut, siglip_loss_local};
