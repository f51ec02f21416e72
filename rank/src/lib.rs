//! One Tessera rank: device kernels, models, losses, data and the training loop.

pub mod atomic_file;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod fault;
pub mod gns;
pub mod loss;
pub mod model;
pub mod optim;
pub mod overlap;
pub mod rng;
pub mod train;
