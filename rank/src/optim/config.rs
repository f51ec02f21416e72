//! The `[optim]` table: which optimizer, its hyper-parameters and the learning-rate schedule.
//!
//! Keys whose sensible default depends on the optimizer (`weight_decay`, `eps`, `ratio_form`,
//! `momentum_form`, `schedule`, the TVLARS knobs) are optional: left out, they take the
//! optimizer's own default (see docs/OPTIMIZERS.md); [`OptimConfig::resolved`] fills them in so
//! the saved configuration shows every effective value. The `tvlars-code` preset pins what the
//! authors' released code pins; setting one of those keys to another value is an error that
//! points to the `tvlars` preset.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::schedule::{Schedule, ScheduleKind};

/// The optimizers by family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// SGD with momentum (optionally Nesterov): every ratio is 1.
    Sgd,
    /// Layer-wise adaptive rate scaling (You et al. 2017).
    Lars,
    /// LARS times the time-varying factor φ(t) (the `tvlars` and `tvlars-code` presets).
    Tvlars,
    /// Layer-wise adaptive moments (You et al. 2019).
    Lamb,
}

/// How the LARS local rate divides by the gradient's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RatioForm {
    /// η‖w‖ / (‖g‖ + β‖w‖ + ε): Apex LARC, timm, MLPerf.
    Larc,
    /// η‖w‖ / ‖g + βw‖: SimCLR, Barlow Twins, optax, the TVLARS code.
    Combined,
}

/// Where the learning rate enters the momentum buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MomentumForm {
    /// v ← m·v + γ·r·d; w ← w − v (the LARS paper: the rate is inside the buffer).
    Classic,
    /// v ← m·v + r·d; w ← w − γ·v (PyTorch's SGD).
    Pytorch,
}

/// What the trust ratio is when a norm it divides or multiplies by is zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroNorm {
    /// Ratio 1, weight decay kept (the default).
    One,
    /// Ratio 1 and no weight decay for that tensor on that step (Apex LARC skips the tensor).
    Apex,
}

/// The `[optim]` table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `sgd`, `lars`, `tvlars`, `tvlars-code` or `lamb`.
    pub name: String,
    /// Peak learning rate (after warm-up); TVLARS's constant base rate γ.
    pub lr: f64,
    /// Momentum m (SGD, LARS, TVLARS; LAMB uses `betas`).
    pub momentum: f64,
    pub nesterov: bool,
    /// L2 weight decay β (LAMB: the decoupled λ), only on tensors whose `decay` flag is set.
    /// Default: 0 for sgd and lars, 5e-4 for tvlars and tvlars-code, 0.01 for lamb.
    pub weight_decay: Option<f64>,
    /// Linear warm-up from 0 over this many steps.
    pub warmup_steps: u64,
    /// `cosine` (to `min_lr_ratio`·lr at the last step), `constant`, or `poly` (MLPerf's
    /// polynomial decay to `min_lr_ratio`·lr with power `poly_power`). Default: `constant` for
    /// tvlars and tvlars-code (φ(t) is their schedule), `cosine` otherwise.
    pub schedule: Option<String>,
    pub min_lr_ratio: f64,
    pub poly_power: f64,
    /// η, the LARS/TVLARS trust coefficient.
    pub trust_coefficient: f64,
    /// `larc` or `combined`. Default: `larc` for lars, `combined` for tvlars.
    pub ratio_form: Option<String>,
    /// `classic` or `pytorch`. Default: `classic` for lars, `pytorch` for sgd and tvlars.
    pub momentum_form: Option<String>,
    /// `one` (ratio 1 when a norm is 0) or `apex` (ratio 1 and no decay on that step).
    pub zero_norm: String,
    /// LARC clip mode: effective rate = min(lr, local rate) instead of lr·local rate.
    pub larc_clip: bool,
    /// ε of the `larc` denominator and of LAMB's √v̂ + ε. Default: 0 for lars/tvlars, 1e-6 for
    /// lamb.
    pub eps: Option<f64>,
    /// LAMB's (β₁, β₂).
    pub betas: [f64; 2],
    /// LAMB's bias correction of m and v (off reproduces older versions).
    pub bias_correction: bool,
    /// LAMB: upper clamp of φ(‖w‖) = min(‖w‖, lamb_clamp) (none by default).
    pub lamb_clamp: Option<f64>,
    /// Clip the global gradient norm to this before the step (Apex/NVLAMB use 1.0); none by
    /// default.
    pub grad_clip_norm: Option<f64>,
    /// TVLARS φ(t) = 1/(α + exp(λ·(t − D))) + γ_min with t = step + 1. `tvlars` only; the
    /// defaults are the authors' code: α 0.1, D 0, γ_min 0.
    pub tvlars_alpha: Option<f64>,
    /// λ of φ(t), per step (default 1e-3; λ·total_steps is what transfers between runs).
    pub tvlars_lambda: f64,
    pub tvlars_delay: Option<f64>,
    pub tvlars_min: Option<f64>,
    /// Multiplies the learning rate of the trainable tensors that take no trust ratio
    /// (`adapt = false`: by default every tensor with ndim ≤ 1, the logit scale included) under
    /// lars, tvlars, tvlars-code and lamb. Default 1: they take the base rate, as in SimCLR,
    /// timm, MLPerf and the TVLARS code. LARS base rates are large (the adapted tensors move by
    /// lr·η‖w‖/‖g‖), so a value below 1 keeps such a rate off the excluded tensors.
    pub excluded_lr_scale: f64,
    /// Learning-rate multipliers per tensor, as PyTorch's parameter groups give each group its
    /// own `lr`: keys are tensor names or prefixes ending at a dot (`"a.out"`, `"a.blocks"`),
    /// the longest matching key wins, other tensors take 1. The factor multiplies the scheduled
    /// rate under every optimizer (and on top of `excluded_lr_scale`). Default: none.
    /// Left out of the resolved config when empty, so that configs without it keep their
    /// hashes (and older checkpoints stay resumable).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub lr_scale: BTreeMap<String, f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            name: "sgd".into(),
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: None,
            warmup_steps: 0,
            schedule: None,
            min_lr_ratio: 0.0,
            poly_power: 2.0,
            trust_coefficient: 1e-3,
            ratio_form: None,
            momentum_form: None,
            zero_norm: "one".into(),
            larc_clip: false,
            eps: None,
            betas: [0.9, 0.999],
            bias_correction: true,
            lamb_clamp: None,
            grad_clip_norm: None,
            tvlars_alpha: None,
            tvlars_lambda: 1e-3,
            tvlars_delay: None,
            tvlars_min: None,
            excluded_lr_scale: 1.0,
            lr_scale: BTreeMap::new(),
        }
    }
}

/// TVLARS's time-varying factor φ(t) = 1/(α + exp(λ·(t − D))) + γ_min.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Phi {
    pub alpha: f64,
    pub lambda: f64,
    pub delay: f64,
    pub min: f64,
}

impl Phi {
    pub fn at(&self, t: f64) -> f64 {
        1.0 / (self.alpha + (self.lambda * (t - self.delay)).exp()) + self.min
    }
}

/// Every option of the engine, resolved and checked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// The preset name, as in the config (kept in checkpoints).
    pub name: String,
    pub family: Family,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub trust: f64,
    pub ratio_form: RatioForm,
    pub momentum_form: MomentumForm,
    pub zero_norm: ZeroNorm,
    pub larc_clip: bool,
    pub eps: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub bias_correction: bool,
    pub lamb_clamp: Option<f64>,
    pub grad_clip_norm: Option<f64>,
    /// Both TVLARS norms clamped to at most this (the authors' code: 10).
    pub norm_clamp: Option<f64>,
    pub phi: Option<Phi>,
    /// Learning-rate multiplier of the trainable tensors the trust ratio excludes (their
    /// ratio); 1 unless `optim.excluded_lr_scale` says otherwise.
    pub excluded_lr_scale: f64,
}

const NAMES: &str = "sgd, lars, tvlars, tvlars-code or lamb";

fn finite_nonneg(key: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(format!("optim.{key} = {v} must be a finite number >= 0"))
    }
}

/// `tvlars-code` pins a value: the key may be left out or set to exactly that value.
fn pinned<T: PartialEq + std::fmt::Debug>(key: &str, set: Option<T>, pin: T) -> Result<T, String> {
    match set {
        Some(v) if v != pin => Err(format!(
            "optim.{key} = {v:?} conflicts with optim.name = \"tvlars-code\", which pins it to \
             {pin:?} as the authors' code does; use optim.name = \"tvlars\" to change it"
        )),
        _ => Ok(pin),
    }
}

impl OptimConfig {
    /// The learning-rate factor of the tensor `name`: the value of the longest
    /// `optim.lr_scale` key that is `name` or a prefix of it ending at a dot; 1 when none is.
    pub fn lr_scale_of(&self, name: &str) -> f64 {
        self.lr_scale
            .iter()
            .filter(|(k, _)| crate::model::under(name, k))
            .max_by_key(|(k, _)| k.len())
            .map_or(1.0, |(_, &v)| v)
    }

    /// Each `optim.lr_scale` key must name one of the model's tensors (`names`), or a prefix
    /// of some ending at a dot.
    pub fn check_lr_scale(&self, names: &[String]) -> Result<(), String> {
        for key in self.lr_scale.keys() {
            if !crate::model::names_a_tensor(key, names.iter().map(String::as_str)) {
                return Err(format!(
                    "optim.lr_scale key {key:?} names no tensor of this model; name a tensor, or \
                     a prefix ending at a dot such as \"a.blocks\" (`tessera model` lists the \
                     names: {})",
                    names.join(", ")
                ));
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        self.settings().map(|_| ())
    }

    /// The schedule for a run of `total_steps` optimizer steps.
    pub fn lr_schedule(&self, total_steps: u64) -> Result<Schedule, String> {
        let family = self.family()?;
        let kind = match self.schedule.as_deref() {
            Some("cosine") => ScheduleKind::Cosine,
            Some("constant") => ScheduleKind::Constant,
            Some("poly") => ScheduleKind::Poly { power: self.poly_power },
            None if family == Family::Tvlars => ScheduleKind::Constant,
            None => ScheduleKind::Cosine,
            Some(other) => {
                return Err(format!(
                    "optim.schedule = {other:?} is not known; use cosine, constant or poly"
                ));
            }
        };
        Ok(Schedule {
            peak: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps,
            kind,
            min_ratio: self.min_lr_ratio,
        })
    }

    fn family(&self) -> Result<Family, String> {
        match self.name.as_str() {
            "sgd" => Ok(Family::Sgd),
            "lars" => Ok(Family::Lars),
            "tvlars" | "tvlars-code" => Ok(Family::Tvlars),
            "lamb" => Ok(Family::Lamb),
            other => Err(format!("optim.name = {other:?} is not known; use {NAMES}")),
        }
    }

    /// This config with every optional key set to the value it takes effect with.
    pub fn resolved(&self) -> Result<OptimConfig, String> {
        let s = self.settings()?;
        let sched = self.lr_schedule(1)?;
        let mut out = self.clone();
        out.weight_decay = Some(s.weight_decay);
        out.eps = Some(s.eps);
        out.schedule = Some(
            match sched.kind {
                ScheduleKind::Cosine => "cosine",
                ScheduleKind::Constant => "constant",
                ScheduleKind::Poly { .. } => "poly",
            }
            .into(),
        );
        if s.family != Family::Lamb {
            out.momentum_form = Some(
                match s.momentum_form {
                    MomentumForm::Classic => "classic",
                    MomentumForm::Pytorch => "pytorch",
                }
                .into(),
            );
        }
        if matches!(s.family, Family::Lars | Family::Tvlars) {
            out.ratio_form = Some(
                match s.ratio_form {
                    RatioForm::Larc => "larc",
                    RatioForm::Combined => "combined",
                }
                .into(),
            );
        }
        if let Some(phi) = s.phi {
            out.tvlars_alpha = Some(phi.alpha);
            out.tvlars_delay = Some(phi.delay);
            out.tvlars_min = Some(phi.min);
        }
        Ok(out)
    }

    /// Resolves the optional keys for the chosen optimizer and checks every value; messages
    /// name the key and the fix.
    pub fn settings(&self) -> Result<Settings, String> {
        let family = self.family()?;
        let code = self.name == "tvlars-code";
        finite_nonneg("lr", self.lr)?;
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("optim.momentum = {} must be in [0, 1)", self.momentum));
        }
        if self.nesterov && family == Family::Lamb {
            return Err("optim.nesterov = true does not apply to lamb (it uses optim.betas); \
                        set optim.nesterov = false or use sgd, lars or tvlars"
                .into());
        }
        let default_wd = match family {
            Family::Sgd | Family::Lars => 0.0,
            Family::Tvlars => 5e-4,
            Family::Lamb => 0.01,
        };
        let weight_decay = self.weight_decay.unwrap_or(default_wd);
        finite_nonneg("weight_decay", weight_decay)?;
        self.lr_schedule(1)?;
        finite_nonneg("min_lr_ratio", self.min_lr_ratio)?;
        if self.min_lr_ratio > 1.0 {
            return Err(format!("optim.min_lr_ratio = {} must be at most 1", self.min_lr_ratio));
        }
        if !(self.poly_power.is_finite() && self.poly_power > 0.0) {
            return Err(format!(
                "optim.poly_power = {} must be a finite number > 0",
                self.poly_power
            ));
        }
        finite_nonneg("trust_coefficient", self.trust_coefficient)?;
        let ratio_form = match self.ratio_form.as_deref() {
            None => None,
            Some("larc") => Some(RatioForm::Larc),
            Some("combined") => Some(RatioForm::Combined),
            Some(other) => {
                return Err(format!(
                    "optim.ratio_form = {other:?} is not known; use larc or combined"
                ));
            }
        };
        let momentum_form = match self.momentum_form.as_deref() {
            None => None,
            Some("classic") => Some(MomentumForm::Classic),
            Some("pytorch") => Some(MomentumForm::Pytorch),
            Some(other) => {
                return Err(format!(
                    "optim.momentum_form = {other:?} is not known; use classic or pytorch"
                ));
            }
        };
        let zero_norm = match self.zero_norm.as_str() {
            "one" => ZeroNorm::One,
            "apex" => ZeroNorm::Apex,
            other => {
                return Err(format!("optim.zero_norm = {other:?} is not known; use one or apex"));
            }
        };
        let eps = self.eps.unwrap_or(if family == Family::Lamb { 1e-6 } else { 0.0 });
        finite_nonneg("eps", eps)?;
        if family == Family::Lamb && eps == 0.0 {
            return Err("optim.eps = 0 makes LAMB divide 0 by 0 where a gradient has been 0; \
                        use a small positive value such as 1e-6"
                .into());
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(format!("optim.betas[{i}] = {b} must be in [0, 1)"));
            }
        }
        if let Some(c) = self.lamb_clamp
            && !(c.is_finite() && c > 0.0)
        {
            return Err(format!("optim.lamb_clamp = {c} must be a finite number > 0"));
        }
        if let Some(c) = self.grad_clip_norm
            && !(c.is_finite() && c > 0.0)
        {
            return Err(format!("optim.grad_clip_norm = {c} must be a finite number > 0"));
        }
        finite_nonneg("tvlars_lambda", self.tvlars_lambda)?;
        for (key, v) in [
            ("tvlars_alpha", self.tvlars_alpha),
            ("tvlars_delay", self.tvlars_delay),
            ("tvlars_min", self.tvlars_min),
        ] {
            if let Some(v) = v {
                if !v.is_finite() {
                    return Err(format!("optim.{key} = {v} must be finite"));
                }
                if family != Family::Tvlars {
                    return Err(format!(
                        "optim.{key} only applies to tvlars (optim.name = {:?}); remove it",
                        self.name
                    ));
                }
            }
        }

        let (ratio_form, momentum_form, norm_clamp, phi) = match family {
            Family::Tvlars if code => (
                pinned("ratio_form", ratio_form, RatioForm::Combined)?,
                pinned("momentum_form", momentum_form, MomentumForm::Pytorch)?,
                Some(10.0),
                Some(Phi {
                    alpha: pinned("tvlars_alpha", self.tvlars_alpha, 0.1)?,
                    lambda: self.tvlars_lambda,
                    delay: pinned("tvlars_delay", self.tvlars_delay, 0.0)?,
                    min: pinned("tvlars_min", self.tvlars_min, 0.0)?,
                }),
            ),
            Family::Tvlars => {
                let phi = Phi {
                    alpha: self.tvlars_alpha.unwrap_or(0.1),
                    lambda: self.tvlars_lambda,
                    delay: self.tvlars_delay.unwrap_or(0.0),
                    min: self.tvlars_min.unwrap_or(0.0),
                };
                if !(phi.alpha >= 0.0 && phi.min >= 0.0) {
                    return Err(format!(
                        "optim.tvlars_alpha = {} and optim.tvlars_min = {} must be >= 0",
                        phi.alpha, phi.min
                    ));
                }
                (
                    ratio_form.unwrap_or(RatioForm::Combined),
                    momentum_form.unwrap_or(MomentumForm::Pytorch),
                    None,
                    Some(phi),
                )
            }
            Family::Lars => (
                ratio_form.unwrap_or(RatioForm::Larc),
                momentum_form.unwrap_or(MomentumForm::Classic),
                None,
                None,
            ),
            Family::Sgd | Family::Lamb => {
                if let Some(rf) = &self.ratio_form {
                    return Err(format!(
                        "optim.ratio_form = {rf:?} only applies to lars and tvlars \
                         (optim.name = {:?}); remove it",
                        self.name
                    ));
                }
                if family == Family::Lamb && self.momentum_form.is_some() {
                    return Err("optim.momentum_form does not apply to lamb (it uses \
                                optim.betas); remove it"
                        .into());
                }
                (RatioForm::Larc, momentum_form.unwrap_or(MomentumForm::Pytorch), None, None)
            }
        };
        if self.larc_clip && !matches!(family, Family::Lars | Family::Tvlars) {
            return Err(format!(
                "optim.larc_clip = true only applies to lars and tvlars (optim.name = {:?}); \
                 set it to false",
                self.name
            ));
        }
        finite_nonneg("excluded_lr_scale", self.excluded_lr_scale)?;
        for (key, &v) in &self.lr_scale {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("optim.lr_scale {key:?} = {v} must be a finite number >= 0"));
            }
        }
        if self.excluded_lr_scale != 1.0 && family == Family::Sgd {
            return Err(format!(
                "optim.excluded_lr_scale = {} only applies to lars, tvlars, tvlars-code and \
                 lamb (under sgd no tensor takes a trust ratio, so none is excluded); remove it \
                 or use one of those optimizers",
                self.excluded_lr_scale
            ));
        }
        if self.lamb_clamp.is_some() && family != Family::Lamb {
            return Err(format!(
                "optim.lamb_clamp only applies to lamb (optim.name = {:?}); remove it",
                self.name
            ));
        }
        Ok(Settings {
            name: self.name.clone(),
            family,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay,
            trust: self.trust_coefficient,
            ratio_form,
            momentum_form,
            zero_norm,
            larc_clip: self.larc_clip,
            eps,
            beta1: self.betas[0],
            beta2: self.betas[1],
            bias_correction: self.bias_correction,
            lamb_clamp: self.lamb_clamp,
            grad_clip_norm: self.grad_clip_norm,
            norm_clamp,
            phi,
            excluded_lr_scale: self.excluded_lr_scale,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str) -> OptimConfig {
        OptimConfig { name: name.into(), ..OptimConfig::default() }
    }

    #[test]
    fn defaults_match_the_previous_sgd_config() {
        let c = OptimConfig::default();
        assert_eq!((c.name.as_str(), c.lr, c.momentum, c.nesterov), ("sgd", 0.1, 0.9, false));
        assert_eq!((c.warmup_steps, c.min_lr_ratio), (0, 0.0));
        let s = c.settings().unwrap();
        assert_eq!(s.weight_decay, 0.0);
        assert_eq!(s.momentum_form, MomentumForm::Pytorch);
        assert_eq!(c.lr_schedule(10).unwrap().kind, ScheduleKind::Cosine);
    }

    #[test]
    fn parses_toml_and_rejects_unknown_keys() {
        let c: OptimConfig = toml::from_str(
            "name = \"lars\"\nlr = 4.8\nweight_decay = 1e-6\nratio_form = \"combined\"\n",
        )
        .unwrap();
        let s = c.settings().unwrap();
        assert_eq!(
            (s.family, s.ratio_form, s.weight_decay),
            (Family::Lars, RatioForm::Combined, 1e-6)
        );
        assert_eq!(s.momentum_form, MomentumForm::Classic);
        let err = toml::from_str::<OptimConfig>("trust = 0.01\n").unwrap_err().to_string();
        assert!(err.contains("trust"), "{err}");
    }

    #[test]
    fn messages_name_the_key_and_the_fix() {
        let err = cfg("adamw").validate().unwrap_err();
        assert_eq!(
            err,
            "optim.name = \"adamw\" is not known; use sgd, lars, tvlars, tvlars-code or lamb"
        );
        let mut c = cfg("lars");
        c.ratio_form = Some("both".into());
        assert!(c.validate().unwrap_err().contains("use larc or combined"));
        let mut c = cfg("tvlars-code");
        c.ratio_form = Some("larc".into());
        let err = c.validate().unwrap_err();
        assert!(err.contains("optim.ratio_form") && err.contains("tvlars\""), "{err}");
        let mut c = cfg("sgd");
        c.tvlars_alpha = Some(1.0);
        assert!(c.validate().unwrap_err().contains("optim.tvlars_alpha"));
        let mut c = cfg("lamb");
        c.nesterov = true;
        assert!(c.validate().unwrap_err().contains("optim.nesterov"));
        let mut c = cfg("sgd");
        c.schedule = Some("step".into());
        assert!(c.validate().unwrap_err().contains("use cosine, constant or poly"));
        let mut c = cfg("sgd");
        c.momentum = 1.0;
        assert!(c.validate().unwrap_err().contains("optim.momentum"));
        let mut c = cfg("lamb");
        c.betas = [0.9, 1.5];
        assert!(c.validate().unwrap_err().contains("optim.betas[1]"));
        let mut c = cfg("sgd");
        c.excluded_lr_scale = 0.1;
        let err = c.validate().unwrap_err();
        assert!(err.contains("optim.excluded_lr_scale") && err.contains("remove it"), "{err}");
        let mut c = cfg("lars");
        c.excluded_lr_scale = -1.0;
        assert!(c.validate().unwrap_err().contains("optim.excluded_lr_scale"));
        for name in ["lars", "tvlars", "tvlars-code", "lamb"] {
            let mut c = cfg(name);
            c.excluded_lr_scale = 0.1;
            assert_eq!(c.settings().unwrap().excluded_lr_scale, 0.1, "{name}");
        }
    }

    #[test]
    fn presets_resolve_to_the_documented_values() {
        let s = cfg("tvlars-code").settings().unwrap();
        assert_eq!(s.family, Family::Tvlars);
        assert_eq!((s.ratio_form, s.momentum_form), (RatioForm::Combined, MomentumForm::Pytorch));
        assert_eq!(
            (s.norm_clamp, s.weight_decay, s.momentum, s.trust),
            (Some(10.0), 5e-4, 0.9, 1e-3)
        );
        assert_eq!(s.phi, Some(Phi { alpha: 0.1, lambda: 1e-3, delay: 0.0, min: 0.0 }));
        assert_eq!(cfg("tvlars-code").lr_schedule(5).unwrap().kind, ScheduleKind::Constant);
        let mut c = cfg("tvlars");
        c.tvlars_alpha = Some(1.0);
        c.tvlars_lambda = 0.5;
        c.tvlars_delay = Some(10.0);
        c.tvlars_min = Some(0.01);
        let s = c.settings().unwrap();
        assert_eq!(s.norm_clamp, None);
        assert_eq!(s.phi, Some(Phi { alpha: 1.0, lambda: 0.5, delay: 10.0, min: 0.01 }));
        let s = cfg("lamb").settings().unwrap();
        assert_eq!((s.weight_decay, s.eps, s.beta1, s.beta2), (0.01, 1e-6, 0.9, 0.999));
        // Resolving twice changes nothing, and a resolved tvlars-code config is still valid.
        for name in ["sgd", "lars", "tvlars", "tvlars-code", "lamb"] {
            let r = cfg(name).resolved().unwrap();
            assert_eq!(r.resolved().unwrap(), r, "{name}");
            assert_eq!(r.settings().unwrap(), cfg(name).settings().unwrap(), "{name}");
            let text = toml::to_string(&r).unwrap();
            assert_eq!(toml::from_str::<OptimConfig>(&text).unwrap(), r, "{name}");
        }
    }
}
