//! Gradient noise scale, measured every step from gradients data parallelism already has.
//!
//! After McCandlish et al., "An Empirical Model of Large-Batch Training" (arXiv 1812.06162);
//! the formulas are in ALGORITHMS.md §5. With K small-batch gradients G_k of sizes b_k
//! (n = Σ b_k) whose example-weighted mean is the big-batch gradient Ḡ = Σ (b_k/n)·G_k:
//!
//! ```text
//! tr Σ ≈ 𝒮 = ( Σ_k b_k·|G_k|² − n·|Ḡ|² ) / (K − 1)      |G|² ≈ 𝒢 = |Ḡ|² − 𝒮/n
//! ```
//!
//! Both are unbiased for i.i.d. per-example gradients, for any (uneven) b_k. The small batches
//! are the ranks' local batches and, with gradient accumulation, every micro-batch of every rank
//! (K = ranks × micro-steps); that is the only unbiased choice at world size 1. Σ_k b_k·|G_k|²
//! takes a small f64 all-reduce, batched over `reduce_every` steps; |Ḡ|² is read from the
//! all-reduced gradient. 𝒮 and 𝒢 are smoothed separately (bias-corrected EMA) and divided last:
//! the per-step ratio has no finite mean (𝒢 is often negative).
//!
//! Tessera's gradient buffers hold *partial* contributions to the global-mean gradient: rank r's
//! buffer is (1/B_global)·Σ_{i ∈ r} g_i = (b_r/B_global)·G_r, and the all-reduce *sums* them into
//! Ḡ. [`GnsEstimator`] takes those buffers as they are and rescales internally.
//!
//! Per step, on every rank:
//! 1. [`GnsEstimator::observe_local`] with the rank's partial buffer before the all-reduce (or,
//!    with gradient accumulation, [`GnsEstimator::observe_accumulated`] after each micro-step);
//! 2. the gradient all-reduce (sum);
//! 3. [`GnsEstimator::finish_step`] with the reduced buffer: the reduced gradient's norms;
//!    every `reduce_every` steps one f64 all-reduce of the pending steps' statistics and their
//!    [`GnsReport`]s; [`GnsEstimator::flush`] after the last step.
//!
//! The estimates are per parameter group (per tensor or layer, given as `(offset, len)` ranges
//! of the flat buffer); the totals are the sums over groups.
//!
//! With a contrastive loss the small batches are the ranks' shares of the gradient of the
//! *global* loss (every example is a negative for every other), not independent batches: the
//! estimate is biased there and can be undefined at small global batches ([`contrastive`]
//! measures it against independent batches; docs/EXPERIMENTS.md has the numbers). `[gns.adaptive]`
//! ([`adaptive`]) lets the global batch follow the smoothed B_simple.

pub mod adaptive;
pub mod contrastive;
pub mod cost;
pub mod problems;
#[cfg(test)]
mod tests;

pub use adaptive::{
    AdaptiveBatchConfig, AdaptiveError, BatchChange, BatchController, BatchSchedule,
};
use serde::{Deserialize, Serialize};
use tessera_collectives::{CommError, Communicator, ReduceOp};

/// The `[gns]` table of the run configuration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GnsConfig {
    /// Measure the gradient noise scale every step (costs two norm passes over the gradient and
    /// one all-reduce of a few f64 values).
    pub enabled: bool,
    /// Decay of the exponential moving averages of 𝒮 and 𝒢, in [0, 1); 0 disables smoothing.
    /// The average spans about 1/(1 − decay) steps.
    pub ema_decay: f64,
    /// Also estimate B_simple per parameter group (tensor).
    pub per_group: bool,
    /// Sum the small-batch statistics over ranks every this many steps, in one all-reduce of
    /// (2 + groups) f64 values per step, so that the collective's latency falls on few steps;
    /// the reports of those steps come out together, up to `reduce_every − 1` steps late.
    pub reduce_every: u64,
    /// `[gns.adaptive]`: let the global batch follow the measured noise scale (off by default;
    /// left out of the resolved config while it is the default).
    #[serde(skip_serializing_if = "AdaptiveBatchConfig::is_default")]
    pub adaptive: AdaptiveBatchConfig,
}

impl Default for GnsConfig {
    fn default() -> Self {
        GnsConfig {
            enabled: true,
            ema_decay: 0.99,
            per_group: true,
            reduce_every: 10,
            adaptive: AdaptiveBatchConfig::default(),
        }
    }
}

impl GnsConfig {
    /// Checks the values; the error names the key and the valid range.
    pub fn validate(&self) -> Result<(), GnsError> {
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(GnsError::BadDecay { decay: self.ema_decay });
        }
        if self.reduce_every == 0 {
            return Err(GnsError::BadReduceEvery);
        }
        self.adaptive.validate()?;
        if self.adaptive.enabled && !self.enabled {
            return Err(GnsError::AdaptiveWithoutGns);
        }
        Ok(())
    }
}

/// What went wrong while measuring the noise scale.
#[derive(Debug, thiserror::Error)]
pub enum GnsError {
    #[error("gns.ema_decay = {decay} is outside [0, 1); use e.g. 0.99 (about 100 steps)")]
    BadDecay { decay: f64 },
    #[error("gns.reduce_every = 0: use 1 (every step) or more, e.g. run.log_every")]
    BadReduceEvery,
    #[error(
        "gns: update() was called with {steps} step(s) still pending from finish_step(); call \
         flush() first, or use one of the two per run"
    )]
    Pending { steps: usize },
    #[error("gns: no parameter groups were given; pass at least one (offset, len) range")]
    NoGroups,
    #[error(
        "gns: parameter group {group} covers [{offset}, {end}) but the gradient buffer has \
         {buf_len} values; the group ranges must lie inside the buffer"
    )]
    GroupOutOfBounds { group: usize, offset: usize, end: usize, buf_len: usize },
    #[error(
        "gns: {what} has {got} values but the estimator saw {expected} earlier this step; pass \
         the same gradient buffer every time"
    )]
    BufferLength { what: &'static str, got: usize, expected: usize },
    #[error(
        "gns: a small batch of {b} examples with a global batch of {b_global}: both must be at \
         least 1 and the small batch at most the global batch"
    )]
    BadBatch { b: usize, b_global: usize },
    #[error(
        "gns: the ranks observed {observed} examples this step but the global batch is \
         {b_global}; every example must be observed exactly once (call observe_local once per \
         rank, or observe_accumulated once per micro-batch)"
    )]
    BatchMismatch { observed: usize, b_global: usize },
    #[error(
        "gns: observe_local and observe_accumulated were both called in one step; use \
         observe_local once per rank without gradient accumulation, observe_accumulated once per \
         micro-batch with it"
    )]
    MixedObserve,
    #[error("gns: {0}")]
    Comm(CommError),
    #[error(transparent)]
    Adaptive(#[from] AdaptiveError),
    #[error(
        "gns.adaptive.enabled = true needs the noise scale measured: set gns.enabled = true (or \
         turn gns.adaptive off)"
    )]
    AdaptiveWithoutGns,
}

// Not `#[from]`: that would make the CommError the source too, and `{:#}` would print it twice.
impl From<CommError> for GnsError {
    fn from(e: CommError) -> Self {
        GnsError::Comm(e)
    }
}

/// The all-reduced small-batch statistics of one step.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GlobalStats {
    /// K: the number of small batches over all ranks.
    pub samples: usize,
    /// n: the examples they hold together (the global batch).
    pub examples: usize,
    /// Σ_k b_k·|G_k|² per group (one entry when per-group estimates are off).
    pub weighted_sq: Vec<f64>,
}

/// This rank's small-batch statistics of one step, before the all-reduce.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LocalStats {
    pub samples: usize,
    pub examples: usize,
    pub weighted_sq: Vec<f64>,
}

impl LocalStats {
    /// The values to sum over ranks, `[K, n, weighted_sq...]`, e.g. to append to another f64
    /// all-reduce of the step (the loss) instead of calling [`reduce_local_stats`].
    pub fn to_f64s(&self) -> Vec<f64> {
        let mut v = Vec::with_capacity(2 + self.weighted_sq.len());
        v.push(self.samples as f64);
        v.push(self.examples as f64);
        v.extend_from_slice(&self.weighted_sq);
        v
    }
}

impl GlobalStats {
    /// Reads the summed `[K, n, weighted_sq...]` of [`LocalStats::to_f64s`] (None if shorter
    /// than two values).
    pub fn from_f64s(values: &[f64]) -> Option<GlobalStats> {
        (values.len() >= 2).then(|| GlobalStats {
            samples: values[0].round() as usize,
            examples: values[1].round() as usize,
            weighted_sq: values[2..].to_vec(),
        })
    }
}

/// Sums every rank's [`LocalStats`] with one all-reduce of `2 + weighted_sq.len()` f64 values.
/// Collective: every rank calls it, with the same number of groups.
pub fn reduce_local_stats(
    comm: &mut dyn Communicator,
    local: &LocalStats,
) -> Result<GlobalStats, GnsError> {
    let mut buf = local.to_f64s();
    comm.all_reduce_f64(&mut buf, ReduceOp::Sum)?;
    Ok(GlobalStats::from_f64s(&buf).unwrap_or_default())
}

/// One step's noise-scale figures (identical on every rank), for the metrics line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GnsReport {
    /// Steps this estimator has finished (1 after the first).
    pub step: u64,
    /// K: small batches this step (ranks × micro-batches).
    pub samples: usize,
    /// n: examples in the big batch.
    pub examples: usize,
    /// This step's unbiased estimate 𝒮 of tr Σ (None when K < 2).
    pub trace_sigma: Option<f64>,
    /// This step's unbiased estimate 𝒢 of |G|² (may be negative; None when K < 2).
    pub grad_sq: Option<f64>,
    /// 𝒮/𝒢 of this step alone: noisy, reported for inspection, never averaged.
    pub b_simple_raw: Option<f64>,
    /// Bias-corrected EMA of 𝒮.
    pub trace_sigma_ema: Option<f64>,
    /// Bias-corrected EMA of 𝒢.
    pub grad_sq_ema: Option<f64>,
    /// The smoothed simple noise scale: `trace_sigma_ema / grad_sq_ema` (None while the smoothed
    /// 𝒢 is not positive).
    pub b_simple: Option<f64>,
    /// The smoothed B_simple of every parameter group, in the order of the groups given to
    /// [`GnsEstimator::new`] (empty when per-group estimates are off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_b_simple: Vec<Option<f64>>,
}

/// A bias-corrected exponential moving average.
#[derive(Clone, Debug, Default)]
struct Ema {
    value: f64,
    weight: f64,
}

impl Ema {
    fn update(&mut self, decay: f64, x: f64) {
        self.value = decay * self.value + (1.0 - decay) * x;
        self.weight = decay * self.weight + (1.0 - decay);
    }

    fn get(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.value / self.weight)
    }
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 && n.is_finite() && d.is_finite() => Some(n / d),
        _ => None,
    }
}

/// Squared norms of `(offset, len)` groups of a buffer, one per group, in group order.
pub type GroupNorms<'a> = dyn Fn(&[f32], &[(usize, usize)]) -> Vec<f64> + 'a;

/// [`sq_norm`] of each group, on the host.
pub fn host_sq_norms(buf: &[f32], groups: &[(usize, usize)]) -> Vec<f64> {
    groups.iter().map(|&(o, l)| sq_norm(&buf[o..o + l])).collect()
}

/// Squared Euclidean norm, accumulated in f64 (eight lanes, so that it vectorises).
pub fn sq_norm(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = f64::from(v);
            *a += v * v;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in rest {
        s += f64::from(v) * f64::from(v);
    }
    s
}

/// Squared norm of `cur − prev`, then `prev = cur` (f64 accumulation).
fn sq_norm_delta_and_copy(cur: &[f32], prev: &mut [f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut cc = cur.chunks_exact(8);
    let mut pc = prev.chunks_exact_mut(8);
    for (c, p) in (&mut cc).zip(&mut pc) {
        for ((a, &v), w) in acc.iter_mut().zip(c).zip(p.iter_mut()) {
            let d = f64::from(v) - f64::from(*w);
            *a += d * d;
            *w = v;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (&v, w) in cc.remainder().iter().zip(pc.into_remainder()) {
        let d = f64::from(v) - f64::from(*w);
        s += d * d;
        *w = v;
    }
    s
}

/// What a [`GnsEstimator`] carries from one step to the next, for checkpoints: the smoothed
/// averages, the step count and the latest report. Statistics still pending a reduction are
/// per rank and not part of it: [`GnsEstimator::flush`] before exporting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GnsState {
    pub steps: u64,
    /// `(value, weight)` of the bias-corrected EMA of 𝒮 per slot (the total, then the groups
    /// when per-group estimates are on).
    pub ema_s: Vec<(f64, f64)>,
    /// The same for 𝒢.
    pub ema_g: Vec<(f64, f64)>,
    pub last: Option<GnsReport>,
}

/// Measures the gradient noise scale step by step; one per rank.
#[derive(Clone, Debug)]
pub struct GnsEstimator {
    decay: f64,
    per_group: bool,
    groups: Vec<(usize, usize)>,
    /// Buffer length seen this step (0: none yet).
    buf_len: usize,
    local: LocalStats,
    /// The accumulated buffer at the previous `observe_accumulated` call of this step.
    snapshot: Vec<f32>,
    accumulated: bool,
    /// Index 0: the total; 1..: the groups (when per-group estimates are on).
    ema_s: Vec<Ema>,
    ema_g: Vec<Ema>,
    steps: u64,
    last: Option<GnsReport>,
    reduce_every: u64,
    pending: Vec<Pending>,
}

/// A finished step whose small-batch statistics are not yet summed over ranks.
#[derive(Clone, Debug)]
struct Pending {
    local: LocalStats,
    big_sq: Vec<f64>,
    b_global: usize,
}

impl GnsEstimator {
    /// An estimator over the parameter groups `groups` (`(offset, len)` ranges of the flat
    /// gradient buffer; they should not overlap; the totals are sums over them).
    pub fn new(cfg: &GnsConfig, groups: &[(usize, usize)]) -> Result<Self, GnsError> {
        cfg.validate()?;
        if groups.is_empty() {
            return Err(GnsError::NoGroups);
        }
        let slots = if cfg.per_group { 1 + groups.len() } else { 1 };
        Ok(GnsEstimator {
            decay: cfg.ema_decay,
            per_group: cfg.per_group,
            groups: groups.to_vec(),
            buf_len: 0,
            local: LocalStats::default(),
            snapshot: Vec::new(),
            accumulated: false,
            ema_s: vec![Ema::default(); slots],
            ema_g: vec![Ema::default(); slots],
            steps: 0,
            last: None,
            reduce_every: cfg.reduce_every,
            pending: Vec::new(),
        })
    }

    /// The parameter groups, as given.
    pub fn groups(&self) -> &[(usize, usize)] {
        &self.groups
    }

    /// Number of statistics slots: 1 (total) or the number of groups.
    fn stat_len(&self) -> usize {
        if self.per_group { self.groups.len() } else { 1 }
    }

    fn check_buffer(&mut self, what: &'static str, len: usize) -> Result<(), GnsError> {
        if self.buf_len != 0 && self.buf_len != len {
            return Err(GnsError::BufferLength { what, got: len, expected: self.buf_len });
        }
        for (group, &(offset, glen)) in self.groups.iter().enumerate() {
            let end = offset.saturating_add(glen);
            if end > len {
                return Err(GnsError::GroupOutOfBounds { group, offset, end, buf_len: len });
            }
        }
        self.buf_len = len;
        Ok(())
    }

    fn check_batch(b: usize, b_global: usize) -> Result<(), GnsError> {
        if b == 0 || b_global == 0 || b > b_global {
            return Err(GnsError::BadBatch { b, b_global });
        }
        Ok(())
    }

    fn add_sample(&mut self, sq: &[f64], b: usize, b_global: usize) {
        // |partial|² = (b/B)²·|G_k|², so b·|G_k|² = |partial|²·B²/b.
        let scale = (b_global as f64) * (b_global as f64) / b as f64;
        if self.local.weighted_sq.len() != sq.len() {
            self.local.weighted_sq = vec![0.0; sq.len()];
        }
        for (acc, &s) in self.local.weighted_sq.iter_mut().zip(sq) {
            *acc += s * scale;
        }
        self.local.samples += 1;
        self.local.examples += b;
    }

    /// Records one small batch of this rank: `partial` holds that batch's contribution to the
    /// global-mean gradient, (1/b_global)·Σ_{i in batch} g_i, before the all-reduce and before
    /// clipping; `b` is its number of examples. Without gradient accumulation, call it once per
    /// step with the rank's gradient buffer and local batch size.
    pub fn observe_local(
        &mut self,
        partial: &[f32],
        b: usize,
        b_global: usize,
    ) -> Result<(), GnsError> {
        self.observe_local_with(partial, b, b_global, &host_sq_norms)
    }

    /// [`GnsEstimator::observe_local`] with the groups' squared norms taken by `norms` (one
    /// value per `(offset, len)` group, as [`crate::device::Device::sq_norms`] returns them),
    /// so a GPU sums its own buffer instead of the host reading it.
    pub fn observe_local_with(
        &mut self,
        partial: &[f32],
        b: usize,
        b_global: usize,
        norms: &GroupNorms<'_>,
    ) -> Result<(), GnsError> {
        Self::check_batch(b, b_global)?;
        if self.accumulated {
            return Err(GnsError::MixedObserve);
        }
        self.check_buffer("the partial gradient", partial.len())?;
        let sq = self.fold_groups(norms(partial, &self.groups));
        self.add_sample(&sq, b, b_global);
        Ok(())
    }

    /// Per-group squared norms as this estimator keeps them: each group, or their sum.
    fn fold_groups(&self, sq: Vec<f64>) -> Vec<f64> {
        if self.per_group { sq } else { vec![sq.iter().sum()] }
    }

    /// Records one micro-batch under gradient accumulation: call it after each micro-step's
    /// backward pass with the accumulating buffer (zeroed at the start of the step), holding
    /// (1/b_global)·Σ of every example seen so far this step; the micro-batch's own contribution
    /// is the change since the previous call (the estimator keeps a copy of the buffer).
    pub fn observe_accumulated(
        &mut self,
        accumulated: &[f32],
        b_micro: usize,
        b_global: usize,
    ) -> Result<(), GnsError> {
        Self::check_batch(b_micro, b_global)?;
        if !self.accumulated && self.local.samples > 0 {
            return Err(GnsError::MixedObserve);
        }
        self.check_buffer("the accumulated gradient", accumulated.len())?;
        if !self.accumulated {
            self.snapshot.clear();
            self.snapshot.resize(accumulated.len(), 0.0);
            self.accumulated = true;
        }
        let mut sq = vec![0.0f64; self.stat_len()];
        for (i, &(o, l)) in self.groups.iter().enumerate() {
            let s = sq_norm_delta_and_copy(&accumulated[o..o + l], &mut self.snapshot[o..o + l]);
            sq[if self.per_group { i } else { 0 }] += s;
        }
        self.add_sample(&sq, b_micro, b_global);
        Ok(())
    }

    /// This rank's statistics of the current step (what [`reduce_local_stats`] sums).
    pub fn local_stats(&self) -> LocalStats {
        let mut s = self.local.clone();
        if s.weighted_sq.is_empty() {
            s.weighted_sq = vec![0.0; self.stat_len()];
        }
        s
    }

    /// Ends the step (collective: every rank calls it once per step, after the gradient
    /// all-reduce). Takes the norms of `reduced`, the summed (global-mean) gradient, now; the
    /// small-batch statistics are summed over ranks every `gns.reduce_every` steps in one f64
    /// all-reduce, and then the reports of those steps are returned, oldest first (an empty
    /// vector on the steps in between). Call [`GnsEstimator::flush`] after the last step.
    pub fn finish_step(
        &mut self,
        comm: &mut dyn Communicator,
        reduced: &[f32],
        b_global: usize,
    ) -> Result<Vec<GnsReport>, GnsError> {
        self.finish_step_with(comm, reduced, b_global, &host_sq_norms)
    }

    /// [`GnsEstimator::finish_step`] with the reduced gradient's group norms taken by `norms`
    /// (see [`GnsEstimator::observe_local_with`]).
    pub fn finish_step_with(
        &mut self,
        comm: &mut dyn Communicator,
        reduced: &[f32],
        b_global: usize,
        norms: &GroupNorms<'_>,
    ) -> Result<Vec<GnsReport>, GnsError> {
        let local = self.local_stats();
        self.reset_step();
        let big_sq = self.big_norms(reduced, norms)?;
        self.pending.push(Pending { local, big_sq, b_global });
        if self.pending.len() as u64 >= self.reduce_every {
            self.flush(comm)
        } else {
            Ok(Vec::new())
        }
    }

    /// Sums the statistics of the steps still pending over ranks and returns their reports
    /// (collective when any step is pending; every rank has the same number pending).
    pub fn flush(&mut self, comm: &mut dyn Communicator) -> Result<Vec<GnsReport>, GnsError> {
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let chunk = 2 + self.stat_len();
        let mut buf: Vec<f64> = pending.iter().flat_map(|p| p.local.to_f64s()).collect();
        comm.all_reduce_f64(&mut buf, ReduceOp::Sum)?;
        let mut reports = Vec::with_capacity(pending.len());
        for (p, values) in pending.iter().zip(buf.chunks_exact(chunk)) {
            let global = GlobalStats::from_f64s(values).unwrap_or_default();
            reports.push(self.estimate(&global, &p.big_sq, p.b_global)?);
        }
        Ok(reports)
    }

    /// Steps whose statistics wait for the next reduction.
    pub fn pending_steps(&self) -> usize {
        self.pending.len()
    }

    /// Forgets what was observed in the current step (e.g. after a skipped step).
    pub fn reset_step(&mut self) {
        self.local = LocalStats::default();
        self.accumulated = false;
        self.buf_len = 0;
    }

    /// Ends the step from statistics already summed over ranks (e.g. [`LocalStats::to_f64s`]
    /// appended to the loss all-reduce, then [`GlobalStats::from_f64s`]), instead of
    /// [`GnsEstimator::finish_step`]: the report of this step, at once.
    pub fn update(
        &mut self,
        global: &GlobalStats,
        reduced: &[f32],
        b_global: usize,
    ) -> Result<GnsReport, GnsError> {
        self.reset_step();
        if !self.pending.is_empty() {
            return Err(GnsError::Pending { steps: self.pending.len() });
        }
        let big_sq = self.big_norms(reduced, &host_sq_norms)?;
        self.estimate(global, &big_sq, b_global)
    }

    /// Per-slot squared norms of the reduced gradient.
    fn big_norms(&mut self, reduced: &[f32], norms: &GroupNorms<'_>) -> Result<Vec<f64>, GnsError> {
        self.check_buffer("the reduced gradient", reduced.len())?;
        self.buf_len = 0;
        Ok(self.fold_groups(norms(reduced, &self.groups)))
    }

    /// The estimates of one step from its reduced statistics and the reduced gradient's norms.
    fn estimate(
        &mut self,
        global: &GlobalStats,
        big_sq: &[f64],
        b_global: usize,
    ) -> Result<GnsReport, GnsError> {
        if global.examples != b_global {
            return Err(GnsError::BatchMismatch { observed: global.examples, b_global });
        }
        let stat_len = self.stat_len();
        if global.weighted_sq.len() != stat_len {
            return Err(GnsError::BufferLength {
                what: "the reduced statistics",
                got: global.weighted_sq.len(),
                expected: stat_len,
            });
        }
        let k = global.samples;
        let n = global.examples as f64;
        // Per slot (group, or the one total): 𝒮 and 𝒢.
        let per: Option<Vec<(f64, f64)>> = (k >= 2).then(|| {
            global
                .weighted_sq
                .iter()
                .zip(big_sq)
                .map(|(&w, &g2)| {
                    let s = (w - n * g2) / (k - 1) as f64;
                    (s, g2 - s / n)
                })
                .collect()
        });
        self.steps += 1;
        let (trace_sigma, grad_sq) = match &per {
            Some(v) => {
                (Some(v.iter().map(|p| p.0).sum::<f64>()), Some(v.iter().map(|p| p.1).sum::<f64>()))
            }
            None => (None, None),
        };
        if let (Some(s), Some(g), Some(v)) = (trace_sigma, grad_sq, &per)
            && s.is_finite()
            && g.is_finite()
        {
            let d = self.decay;
            self.ema_s[0].update(d, s);
            self.ema_g[0].update(d, g);
            if self.per_group {
                for (i, &(s, g)) in v.iter().enumerate() {
                    self.ema_s[1 + i].update(d, s);
                    self.ema_g[1 + i].update(d, g);
                }
            }
        }
        let trace_sigma_ema = self.ema_s[0].get();
        let grad_sq_ema = self.ema_g[0].get();
        let group_b_simple = if self.per_group {
            (1..self.ema_s.len()).map(|i| ratio(self.ema_s[i].get(), self.ema_g[i].get())).collect()
        } else {
            Vec::new()
        };
        let report = GnsReport {
            step: self.steps,
            samples: k,
            examples: global.examples,
            trace_sigma,
            grad_sq,
            b_simple_raw: ratio(trace_sigma, grad_sq),
            trace_sigma_ema,
            grad_sq_ema,
            b_simple: ratio(trace_sigma_ema, grad_sq_ema),
            group_b_simple,
        };
        self.last = Some(report.clone());
        Ok(report)
    }

    /// The latest smoothed B_simple (for the run summary).
    pub fn b_simple(&self) -> Option<f64> {
        self.last.as_ref().and_then(|r| r.b_simple)
    }

    /// The latest report.
    pub fn last_report(&self) -> Option<&GnsReport> {
        self.last.as_ref()
    }

    /// The state to checkpoint (call [`GnsEstimator::flush`] first: pending steps are left out).
    pub fn export_state(&self) -> GnsState {
        let pairs = |v: &[Ema]| v.iter().map(|e| (e.value, e.weight)).collect();
        GnsState {
            steps: self.steps,
            ema_s: pairs(&self.ema_s),
            ema_g: pairs(&self.ema_g),
            last: self.last.clone(),
        }
    }

    /// Restores [`GnsEstimator::export_state`]'s output into an estimator built with the same
    /// groups and `per_group` setting; forgets anything pending. The error says what differs.
    pub fn import_state(&mut self, state: &GnsState) -> Result<(), String> {
        let slots = self.ema_s.len();
        if state.ema_s.len() != slots || state.ema_g.len() != slots {
            return Err(format!(
                "the saved noise-scale averages have {} and {} slots but this run has {slots} \
                 (gns.per_group or the model's tensors differ)",
                state.ema_s.len(),
                state.ema_g.len()
            ));
        }
        let emas =
            |v: &[(f64, f64)]| v.iter().map(|&(value, weight)| Ema { value, weight }).collect();
        self.ema_s = emas(&state.ema_s);
        self.ema_g = emas(&state.ema_g);
        self.steps = state.steps;
        self.last = state.last.clone();
        self.pending.clear();
        self.reset_step();
        Ok(())
    }
}
