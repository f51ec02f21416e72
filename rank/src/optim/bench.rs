//! A micro-benchmark of one optimizer step against a memcpy-like bound measured alongside it.
//!
//! The step and the copy are timed in turn, one run of each at a time, and each keeps its
//! fastest run: on a shared machine the fastest run is the one least disturbed by other work,
//! and timing the two in turn exposes both to the same conditions.

use std::hint::black_box;
use std::time::Instant;

use serde::Serialize;

use super::config::{Family, OptimConfig};
use super::{OptimError, Optimizer, TensorGroup};

/// Timing of [`bench_step`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchResult {
    pub name: String,
    pub n_params: usize,
    /// The fastest of the timed steps.
    pub seconds_per_step: f64,
    /// How many steps (and as many copies) were timed.
    pub runs: u32,
    /// Bytes a fused step must move at least: one read of params, grads and state and one
    /// write of params and state (20 B per parameter with momentum, 28 B for LAMB).
    pub bytes_moved: u64,
    /// bytes_moved / seconds_per_step, in GB/s (1e9 bytes).
    pub gbps: f64,
    /// Copying a buffer of bytes_moved / 2 bytes into another (bytes_moved of traffic), GB/s,
    /// from the fastest of as many copies.
    pub memcpy_gbps: f64,
}

fn seconds(f: &mut impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

/// Runs `a` and `b` in turn (after one warm-up run each) until at least 5 runs of each and
/// `min_seconds` have passed; returns the fastest run of each and the number of runs.
fn time_pair(mut a: impl FnMut(), mut b: impl FnMut(), min_seconds: f64) -> (f64, f64, u32) {
    a();
    b();
    let t0 = Instant::now();
    let (mut best_a, mut best_b, mut n) = (f64::INFINITY, f64::INFINITY, 0u32);
    while n < 5 || t0.elapsed().as_secs_f64() < min_seconds {
        best_a = best_a.min(seconds(&mut a));
        best_b = best_b.min(seconds(&mut b));
        n += 1;
    }
    (best_a, best_b, n)
}

/// Times one step of optimizer `name` (default settings, weight decay 1e-4) on `n_params`
/// parameters cut into 2-D tensors of at most 2^20 values, and a plain copy of the same
/// traffic. Single-threaded, like the step itself.
pub fn bench_step(n_params: usize, name: &str) -> Result<BenchResult, OptimError> {
    let cfg = OptimConfig { name: name.into(), weight_decay: Some(1e-4), ..OptimConfig::default() };
    let family = cfg.settings().map_err(OptimError::Config)?.family;
    const TENSOR: usize = 1 << 20;
    let groups: Vec<TensorGroup> = (0..n_params.div_ceil(TENSOR))
        .map(|i| {
            let len = TENSOR.min(n_params - i * TENSOR);
            TensorGroup::from_shape(format!("w{i}"), i * TENSOR, len, &[len, 1], true)
        })
        .collect();
    let mut opt = Optimizer::new(&cfg, groups)?;
    let mut rng = crate::rng::Rng::new(7);
    let mut params: Vec<f32> = (0..n_params).map(|_| rng.normal() as f32 * 0.05).collect();
    let grads: Vec<f32> = (0..n_params).map(|_| rng.normal() as f32 * 1e-3).collect();
    let per_param: u64 = if family == Family::Lamb { 28 } else { 20 };
    let bytes_moved = per_param * n_params as u64;
    let half = (bytes_moved / 2 / 4) as usize;
    let src: Vec<f32> = vec![1.0; half];
    let mut dst: Vec<f32> = vec![0.0; half];
    let mut step = 0u64;
    let (seconds_per_step, copy, runs) = time_pair(
        || {
            black_box(opt.step(&mut params, &grads, 1e-3, step));
            step += 1;
        },
        || {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        },
        1.0,
    );
    Ok(BenchResult {
        name: name.into(),
        n_params,
        seconds_per_step,
        runs,
        bytes_moved,
        gbps: bytes_moved as f64 / seconds_per_step / 1e9,
        memcpy_gbps: bytes_moved as f64 / copy / 1e9,
    })
}
