//! Opt-in adaptive global batch: follow the measured noise scale (the critical batch size is
//! about B_simple, McCandlish et al.), clamped, rounded to what the ranks can split, changed at
//! most every `every` steps and only for a change worth making, with the learning rate rescaled
//! by a selectable rule. Pure bookkeeping: the training loop asks it for the batch and the
//! learning-rate factor, and saves [`BatchSchedule`] with its checkpoints.

use serde::{Deserialize, Serialize};

/// How the learning rate follows the batch (B₀: the configured batch, whose learning rate is
/// the configured one).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LrRule {
    /// McCandlish's ε(B) = ε_max/(1 + B_noise/B), i.e. ε(B)/ε(B₀) = (1 + φ/B₀)/(1 + φ/B) with
    /// φ the measured B_simple (AdaScale's gain, as in AdaptDL/Pollux).
    Noise,
    /// ε ∝ B.
    Linear,
    /// ε ∝ √B.
    Sqrt,
}

/// The `[gns.adaptive]` table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveBatchConfig {
    /// Let the global batch follow the measured B_simple (off: the batch stays `batch.global`).
    pub enabled: bool,
    /// Smallest global batch (0: `batch.global`).
    pub min: usize,
    /// Largest global batch (0: 64 × the smallest, at most the training set).
    pub max: usize,
    /// Change the batch at most every this many steps.
    pub every: u64,
    /// No change before this step (the noise-scale averages need time to settle).
    pub start_step: u64,
    /// Change only when the target differs from the current batch by more than this fraction.
    pub min_change: f64,
    /// The learning-rate rule.
    pub lr_rule: LrRule,
}

impl Default for AdaptiveBatchConfig {
    fn default() -> Self {
        AdaptiveBatchConfig {
            enabled: false,
            min: 0,
            max: 0,
            every: 100,
            start_step: 100,
            min_change: 0.1,
            lr_rule: LrRule::Noise,
        }
    }
}

impl AdaptiveBatchConfig {
    /// Whether this is the default (off) table; it is then left out of the resolved config, so
    /// that runs without an adaptive batch keep their resume hash.
    pub fn is_default(&self) -> bool {
        *self == AdaptiveBatchConfig::default()
    }

    /// Checks the values that do not depend on the run (the batch range is checked against the
    /// world size by [`BatchController::new`]).
    pub fn validate(&self) -> Result<(), AdaptiveError> {
        if self.every == 0 {
            return Err(AdaptiveError::ZeroEvery);
        }
        if !(self.min_change.is_finite() && self.min_change >= 0.0) {
            return Err(AdaptiveError::BadMinChange(self.min_change));
        }
        if self.min > 0 && self.max > 0 && self.min > self.max {
            return Err(AdaptiveError::MinAboveMax { min: self.min, max: self.max });
        }
        Ok(())
    }
}

/// What is wrong with an adaptive-batch setting.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdaptiveError {
    #[error(
        "gns.adaptive: min = {min} and max = {max} leave no batch that {world} ranks can split \
         (a multiple of {world} between them); widen the range"
    )]
    EmptyRange { min: usize, max: usize, world: usize },
    #[error("gns.adaptive.every = 0: use 1 or more steps between changes")]
    ZeroEvery,
    #[error("gns.adaptive.min_change = {0} must be a finite number >= 0, e.g. 0.1")]
    BadMinChange(f64),
    #[error("gns.adaptive: the base batch is 0; set batch.global")]
    ZeroBase,
    #[error("gns.adaptive.min = {min} is above gns.adaptive.max = {max}; swap them")]
    MinAboveMax { min: usize, max: usize },
    #[error(
        "gns.adaptive.max = {max} is larger than the training data ({rows} examples); lower it \
         (0 picks 64 x the smallest batch, capped at the data)"
    )]
    MaxOverData { max: usize, rows: usize },
    #[error(
        "gns.adaptive: the smallest batch {min} is larger than the training data ({rows} \
         examples); lower gns.adaptive.min (or batch.global)"
    )]
    MinOverData { min: usize, rows: usize },
}

/// One change of the global batch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BatchChange {
    /// The first step (0-based) that runs with `batch`.
    pub step: u64,
    pub batch: usize,
    /// The smoothed B_simple that led to it.
    pub b_simple: f64,
    /// Learning-rate factor relative to the configured learning rate.
    pub lr_factor: f64,
}

/// The batch schedule so far: logged, and saved with checkpoints so that a resumed run continues
/// it (restore with [`BatchController::resume`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchSchedule {
    pub changes: Vec<BatchChange>,
}

/// Decides the global batch step by step.
#[derive(Clone, Debug)]
pub struct BatchController {
    cfg: AdaptiveBatchConfig,
    base: usize,
    world: usize,
    min: usize,
    max: usize,
    /// The batch before any change.
    initial: usize,
    current: usize,
    lr_factor: f64,
    last_change: Option<u64>,
    schedule: BatchSchedule,
}

impl BatchController {
    /// `base`: the configured global batch B₀ (its learning rate is the configured one);
    /// `world`: the ranks, whose multiples the batch is rounded to.
    pub fn new(
        cfg: &AdaptiveBatchConfig,
        base: usize,
        world: usize,
    ) -> Result<BatchController, AdaptiveError> {
        if base == 0 {
            return Err(AdaptiveError::ZeroBase);
        }
        cfg.validate()?;
        let world = world.max(1);
        let min_raw = if cfg.min == 0 { base } else { cfg.min };
        let max_raw = if cfg.max == 0 { min_raw.saturating_mul(64) } else { cfg.max };
        let min = min_raw.div_ceil(world) * world;
        let max = max_raw / world * world;
        if min == 0 || min > max {
            return Err(AdaptiveError::EmptyRange { min: min_raw, max: max_raw, world });
        }
        let current = base.clamp(min, max).div_ceil(world) * world;
        let current = current.min(max);
        Ok(BatchController {
            cfg: cfg.clone(),
            base,
            world,
            min,
            max,
            initial: current,
            current,
            lr_factor: lr_factor(cfg.lr_rule, base, current, None),
            last_change: None,
            schedule: BatchSchedule::default(),
        })
    }

    /// Caps the range at a training set of `rows` examples (every batch must fit in one
    /// permutation of the data): an explicit `max` above it is an error, the default `max` is
    /// lowered to it (rounded down to a multiple of the world size).
    pub fn fit_data(mut self, rows: usize) -> Result<BatchController, AdaptiveError> {
        if self.cfg.max > rows {
            return Err(AdaptiveError::MaxOverData { max: self.cfg.max, rows });
        }
        let cap = rows / self.world * self.world;
        if self.max > cap {
            if cap < self.min {
                return Err(AdaptiveError::MinOverData { min: self.min, rows });
            }
            self.max = cap;
            self.current = self.current.min(cap);
            self.initial = self.current;
            self.lr_factor = lr_factor(self.cfg.lr_rule, self.base, self.current, None);
        }
        Ok(self)
    }

    /// The smallest and largest batch it may choose.
    pub fn range(&self) -> (usize, usize) {
        (self.min, self.max)
    }

    /// The global batch before any change (`batch.global` rounded into the range).
    pub fn initial(&self) -> usize {
        self.initial
    }

    /// `(first step, batch)` of every stretch of the schedule so far, oldest first.
    fn segments(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        std::iter::once((0, self.initial))
            .chain(self.schedule.changes.iter().map(|c| (c.step, c.batch)))
    }

    /// The global batch of step `step` (0-based) under the schedule so far.
    pub fn batch_at(&self, step: u64) -> usize {
        self.segments().take_while(|&(s, _)| s <= step).last().map_or(self.initial, |(_, b)| b)
    }

    /// Examples in steps `0..step` under the schedule so far.
    pub fn examples_before(&self, step: u64) -> u64 {
        let segs: Vec<(u64, usize)> = self.segments().collect();
        let mut total = 0u64;
        for (i, &(start, b)) in segs.iter().enumerate() {
            let end = segs.get(i + 1).map_or(step, |n| n.0.min(step));
            total += end.saturating_sub(start) * b as u64;
        }
        total
    }

    /// Where the global batch of step `step` starts in a data set of `rows` examples: the epoch
    /// (whose seeded permutation to read) and the first row; the batch is rows
    /// `[row, row + batch_at(step))` of it. The steps before consume the permutation in order,
    /// and a batch that does not fit in what is left of an epoch starts the next one (the tail
    /// is dropped), so with a constant batch this is `DistributedSampler`'s step-based position.
    /// A pure function of the schedule: a resumed run finds the same position. Every batch must
    /// be at most `rows` ([`BatchController::fit_data`]).
    pub fn sampler_position(&self, step: u64, rows: usize) -> (u64, usize) {
        let segs: Vec<(u64, usize)> = self.segments().collect();
        let (mut epoch, mut row) = (0u64, 0usize);
        for (i, &(start, b)) in segs.iter().enumerate() {
            if start >= step {
                break;
            }
            let end = segs.get(i + 1).map_or(step, |n| n.0.min(step));
            advance(&mut epoch, &mut row, rows, b, end - start);
        }
        let b = self.batch_at(step);
        if row + b > rows {
            epoch += 1;
            row = 0;
        }
        (epoch, row)
    }

    /// Continues a saved schedule (after a checkpoint resume).
    pub fn resume(&mut self, schedule: BatchSchedule) {
        if let Some(last) = schedule.changes.last() {
            self.current = last.batch;
            self.lr_factor = last.lr_factor;
            self.last_change = Some(last.step);
        }
        self.schedule = schedule;
    }

    /// The global batch of the next step.
    pub fn batch(&self) -> usize {
        self.current
    }

    /// The learning-rate factor (multiply the scheduled learning rate by it).
    pub fn lr_factor(&self) -> f64 {
        self.lr_factor
    }

    pub fn schedule(&self) -> &BatchSchedule {
        &self.schedule
    }

    /// The batch the noise scale asks for: B_simple, clamped to [min, max] and rounded to the
    /// nearest multiple of the world size.
    pub fn target(&self, b_simple: f64) -> usize {
        let t = b_simple.clamp(self.min as f64, self.max as f64);
        let r = ((t / self.world as f64).round() as usize).max(1) * self.world;
        r.clamp(self.min, self.max)
    }

    /// After step `step` (0-based) finished with the smoothed noise scale `b_simple`: decides
    /// the batch of step `step + 1`. Returns the change, if any (identical on every rank, since
    /// the reported B_simple is).
    pub fn after_step(&mut self, step: u64, b_simple: Option<f64>) -> Option<BatchChange> {
        if !self.cfg.enabled {
            return None;
        }
        let phi = b_simple.filter(|b| b.is_finite() && *b > 0.0)?;
        let next = step + 1;
        if next < self.cfg.start_step {
            return None;
        }
        if let Some(last) = self.last_change
            && next < last + self.cfg.every
        {
            return None;
        }
        let target = self.target(phi);
        let rel = (target as f64 / self.current as f64 - 1.0).abs();
        if target == self.current || rel <= self.cfg.min_change {
            return None;
        }
        self.current = target;
        self.lr_factor = lr_factor(self.cfg.lr_rule, self.base, target, Some(phi));
        self.last_change = Some(next);
        let change =
            BatchChange { step: next, batch: target, b_simple: phi, lr_factor: self.lr_factor };
        self.schedule.changes.push(change.clone());
        Some(change)
    }
}

/// Moves a sampler position `(epoch, row)` (the row after the last one taken) over `count`
/// steps of `b` rows each in a data set of `rows` (`1 <= b <= rows`).
fn advance(epoch: &mut u64, row: &mut usize, rows: usize, b: usize, count: u64) {
    if count == 0 || b == 0 || b > rows {
        return;
    }
    if *row + b > rows {
        *epoch += 1;
        *row = 0;
    }
    let fit = ((rows - *row) / b) as u64;
    if count <= fit {
        *row += count as usize * b;
        return;
    }
    // The steps after `fit` start new epochs of `rows / b` steps each.
    let rest = count - fit;
    let per_epoch = (rows / b) as u64;
    *epoch += 1 + (rest - 1) / per_epoch;
    *row = ((rest - 1) % per_epoch + 1) as usize * b;
}

/// ε(batch)/ε(base) under `rule`; `phi` is the noise scale (the Noise rule without one: 1).
pub fn lr_factor(rule: LrRule, base: usize, batch: usize, phi: Option<f64>) -> f64 {
    let ratio = batch as f64 / base as f64;
    match rule {
        LrRule::Linear => ratio,
        LrRule::Sqrt => ratio.sqrt(),
        LrRule::Noise => match phi {
            Some(phi) => (1.0 + phi / base as f64) / (1.0 + phi / batch as f64),
            None => 1.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> AdaptiveBatchConfig {
        AdaptiveBatchConfig {
            enabled: true,
            min: 64,
            max: 4096,
            every: 10,
            start_step: 5,
            min_change: 0.1,
            lr_rule: LrRule::Noise,
        }
    }

    #[test]
    fn follows_the_noise_scale_clamped_rounded_and_rate_limited() {
        let mut c = BatchController::new(&on(), 128, 6).unwrap();
        assert_eq!(c.batch(), 132, "128 rounded up to a multiple of 6");
        assert_eq!(c.after_step(2, Some(1000.0)), None, "before start_step");
        let ch = c.after_step(4, Some(1000.0)).unwrap();
        assert_eq!((ch.step, ch.batch), (5, 1002));
        assert_eq!(c.batch() % 6, 0);
        assert_eq!(c.after_step(10, Some(3000.0)), None, "within `every` steps of the change");
        assert_eq!(c.after_step(14, Some(1050.0)), None, "a change under min_change");
        let ch = c.after_step(14, Some(1e9)).unwrap();
        assert_eq!(ch.batch, 4092, "clamped to max, rounded down to a multiple of 6");
        let ch = c.after_step(30, Some(1.0)).unwrap();
        assert_eq!(ch.batch, 66, "clamped to min, rounded up");
        assert_eq!(c.after_step(50, None), None);
        assert_eq!(c.after_step(50, Some(f64::NAN)), None);
        assert_eq!(c.schedule().changes.len(), 3);
    }

    #[test]
    fn learning_rate_rules() {
        assert_eq!(lr_factor(LrRule::Linear, 100, 400, None), 4.0);
        assert_eq!(lr_factor(LrRule::Sqrt, 100, 400, None), 2.0);
        // McCandlish: ε(B) = ε_max/(1 + φ/B); with φ = 100: ε(100) = ε_max/2, ε(400) = 0.8 ε_max.
        assert!((lr_factor(LrRule::Noise, 100, 400, Some(100.0)) - 1.6).abs() < 1e-12);
        assert_eq!(lr_factor(LrRule::Noise, 100, 100, Some(37.0)), 1.0);
        let mut c = BatchController::new(&on(), 128, 1).unwrap();
        let ch = c.after_step(9, Some(512.0)).unwrap();
        assert!((ch.lr_factor - (1.0 + 512.0 / 128.0) / 2.0).abs() < 1e-12);
        assert_eq!(c.lr_factor(), ch.lr_factor);
    }

    #[test]
    fn disabled_never_changes_and_schedule_survives_resume() {
        let mut off = BatchController::new(&AdaptiveBatchConfig::default(), 256, 4).unwrap();
        assert_eq!(off.after_step(1000, Some(10_000.0)), None);
        assert_eq!(off.batch(), 256);

        let mut a = BatchController::new(&on(), 128, 2).unwrap();
        a.after_step(9, Some(700.0)).unwrap();
        let saved: BatchSchedule =
            serde_json::from_str(&serde_json::to_string(a.schedule()).unwrap()).unwrap();
        let mut b = BatchController::new(&on(), 128, 2).unwrap();
        b.resume(saved);
        assert_eq!((b.batch(), b.lr_factor()), (a.batch(), a.lr_factor()));
        // The rate limit continues from the saved change.
        assert_eq!(b.after_step(12, Some(3000.0)), None);
        assert_eq!(a.after_step(19, Some(3000.0)), b.after_step(19, Some(3000.0)));
    }

    /// The position by brute force: one step at a time.
    fn walk(c: &BatchController, step: u64, rows: usize) -> (u64, usize) {
        let (mut epoch, mut row) = (0u64, 0usize);
        for s in 0..=step {
            let b = c.batch_at(s);
            if row + b > rows {
                epoch += 1;
                row = 0;
            }
            if s == step {
                return (epoch, row);
            }
            row += b;
        }
        unreachable!()
    }

    #[test]
    fn sampler_position_follows_the_schedule_and_matches_the_fixed_sampler() {
        use crate::data::DistributedSampler;
        let rows = 1000;
        // No change: the fixed-batch sampler's step-based position.
        let fixed = BatchController::new(&on(), 96, 4).unwrap();
        let sampler = DistributedSampler::try_new(rows, 1, 0, 7, true).unwrap();
        for step in 0..40 {
            let (epoch, row) = fixed.sampler_position(step, rows);
            let want = sampler.try_global_batch_indices(step, 96).unwrap();
            assert_eq!(sampler.permutation(epoch)[row..row + 96], want[..], "step {step}");
        }
        // With changes, against a step-by-step walk; examples_before against a sum.
        let mut c = BatchController::new(&on(), 96, 4).unwrap();
        c.after_step(6, Some(400.0)).unwrap();
        c.after_step(30, Some(150.0)).unwrap();
        c.after_step(45, Some(900.0)).unwrap();
        assert_eq!(c.batch_at(6), 96);
        assert_eq!(c.batch_at(7), 400);
        assert_eq!(c.batch_at(46), 900);
        for step in 0..120 {
            assert_eq!(c.sampler_position(step, rows), walk(&c, step, rows), "step {step}");
            let sum: u64 = (0..step).map(|s| c.batch_at(s) as u64).sum();
            assert_eq!(c.examples_before(step), sum, "step {step}");
        }
    }

    #[test]
    fn the_range_fits_the_data() {
        let c = BatchController::new(&AdaptiveBatchConfig { max: 0, ..on() }, 64, 3).unwrap();
        let c = c.fit_data(1000).unwrap();
        assert_eq!(c.range(), (66, 999));
        assert_eq!(c.target(5000.0), 999);
        let c = BatchController::new(&on(), 64, 1).unwrap();
        assert_eq!(
            c.fit_data(1000).unwrap_err(),
            AdaptiveError::MaxOverData { max: 4096, rows: 1000 }
        );
        let small = AdaptiveBatchConfig { min: 0, max: 0, ..on() };
        let c = BatchController::new(&small, 600, 1).unwrap();
        assert_eq!(
            c.fit_data(500).unwrap_err(),
            AdaptiveError::MinOverData { min: 600, rows: 500 }
        );
    }

    #[test]
    fn bad_settings_are_errors() {
        let e = BatchController::new(&AdaptiveBatchConfig { min: 10, max: 11, ..on() }, 10, 4);
        assert_eq!(e.unwrap_err(), AdaptiveError::EmptyRange { min: 10, max: 11, world: 4 });
        assert!(BatchController::new(&AdaptiveBatchConfig { every: 0, ..on() }, 10, 1).is_err());
        let bad = AdaptiveBatchConfig { min_change: -1.0, ..on() };
        assert!(BatchController::new(&bad, 10, 1).is_err());
        assert_eq!(BatchController::new(&on(), 0, 1).unwrap_err(), AdaptiveError::ZeroBase);
        let bad = AdaptiveBatchConfig { min: 100, max: 50, ..on() };
        assert_eq!(bad.validate().unwrap_err(), AdaptiveError::MinAboveMax { min: 100, max: 50 });
        let c: AdaptiveBatchConfig = toml::from_str("enabled = true\nlr_rule = \"sqrt\"").unwrap();
        assert_eq!(c.lr_rule, LrRule::Sqrt);
        assert!(toml::from_str::<AdaptiveBatchConfig>("lr_rule = \"cubic\"").is_err());
    }
}
