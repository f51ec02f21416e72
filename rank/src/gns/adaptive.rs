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
    /// Largest global batch (0: 64 × the smallest).
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
        if cfg.every == 0 {
            return Err(AdaptiveError::ZeroEvery);
        }
        if !(cfg.min_change.is_finite() && cfg.min_change >= 0.0) {
            return Err(AdaptiveError::BadMinChange(cfg.min_change));
        }
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
            current,
            lr_factor: lr_factor(cfg.lr_rule, base, current, None),
            last_change: None,
            schedule: BatchSchedule::default(),
        })
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

    #[test]
    fn bad_settings_are_errors() {
        let e = BatchController::new(&AdaptiveBatchConfig { min: 10, max: 11, ..on() }, 10, 4);
        assert_eq!(e.unwrap_err(), AdaptiveError::EmptyRange { min: 10, max: 11, world: 4 });
        assert!(BatchController::new(&AdaptiveBatchConfig { every: 0, ..on() }, 10, 1).is_err());
        let bad = AdaptiveBatchConfig { min_change: -1.0, ..on() };
        assert!(BatchController::new(&bad, 10, 1).is_err());
        assert_eq!(BatchController::new(&on(), 0, 1).unwrap_err(), AdaptiveError::ZeroBase);
        let c: AdaptiveBatchConfig = toml::from_str("enabled = true\nlr_rule = \"sqrt\"").unwrap();
        assert_eq!(c.lr_rule, LrRule::Sqrt);
        assert!(toml::from_str::<AdaptiveBatchConfig>("lr_rule = \"cubic\"").is_err());
    }
}
