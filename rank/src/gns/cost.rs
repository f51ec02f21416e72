//! What the noise-scale bookkeeping costs per step, next to the gradient all-reduce it rides on.

use std::time::Instant;

use serde::Serialize;
use tessera_collectives::{Communicator, ReduceOp};

use super::{GnsConfig, GnsError, GnsEstimator};

/// Mean seconds per step of each part, measured on one rank.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GnsCost {
    pub params: usize,
    pub groups: usize,
    pub reduce_every: u64,
    pub iters: usize,
    /// The gradient all-reduce (sum) of `params` f32 values.
    pub all_reduce_s: f64,
    /// `observe_local`: the local squared norms before the all-reduce.
    pub observe_s: f64,
    /// `finish_step`: the reduced gradient's norms, plus the statistics all-reduce and the
    /// estimates every `reduce_every` steps (amortised).
    pub finish_s: f64,
    /// (observe + finish) / all-reduce.
    pub overhead_vs_all_reduce: f64,
}

/// Times `iters` steps (after `reduce_every` warm-up steps) of the GNS calls around a gradient
/// all-reduce of `params` values split into `groups`. Collective: every rank of `comm` calls it
/// with the same arguments. Compare `observe_s + finish_s` with a real run's step time too.
pub fn measure_cost(
    comm: &mut dyn Communicator,
    params: usize,
    groups: &[(usize, usize)],
    reduce_every: u64,
    iters: usize,
) -> Result<GnsCost, GnsError> {
    let cfg = GnsConfig { reduce_every, ..GnsConfig::default() };
    let mut est = GnsEstimator::new(&cfg, groups)?;
    let world = comm.world();
    let b_local = 8;
    let b_global = b_local * world;
    let mut grads: Vec<f32> =
        (0..params).map(|i| ((i * 7 + comm.rank() * 13) % 17) as f32 * 1e-3 - 8e-3).collect();
    let fresh = grads.clone();
    let (mut t_ar, mut t_obs, mut t_fin) = (0.0f64, 0.0f64, 0.0f64);
    let warm = reduce_every as usize;
    for it in 0..iters + warm {
        grads.copy_from_slice(&fresh);
        let t0 = Instant::now();
        est.observe_local(&grads, b_local, b_global)?;
        let t1 = Instant::now();
        comm.all_reduce_f32(&mut grads, ReduceOp::Sum)?;
        let t2 = Instant::now();
        est.finish_step(comm, &grads, b_global)?;
        let t3 = Instant::now();
        if it >= warm {
            t_obs += (t1 - t0).as_secs_f64();
            t_ar += (t2 - t1).as_secs_f64();
            t_fin += (t3 - t2).as_secs_f64();
        }
    }
    est.flush(comm)?;
    let n = iters.max(1) as f64;
    let (all_reduce_s, observe_s, finish_s) = (t_ar / n, t_obs / n, t_fin / n);
    Ok(GnsCost {
        params,
        groups: groups.len(),
        reduce_every,
        iters,
        all_reduce_s,
        observe_s,
        finish_s,
        overhead_vs_all_reduce: (observe_s + finish_s) / all_reduce_s.max(1e-12),
    })
}
