//! Optimizer settings and tensor layouts that exercise every branch of the engine: the unit
//! tests run them against the f64 reference, and the device checks (the CPU's tracked device,
//! `tessera cuda selftest`) run them on a device against the host optimizer.

use super::TensorGroup;
use super::config::OptimConfig;

fn cfg(name: &str) -> OptimConfig {
    OptimConfig { name: name.into(), ..OptimConfig::default() }
}

/// Seven tensors over 95 values: weights, biases, a frozen tensor, a LayerNorm gain, the logit
/// scale and a long one; decay and the trust ratio by the default rule; two tensors with a
/// learning-rate factor (`optim.lr_scale`), an adapted one and one without a trust ratio.
pub fn model_groups() -> Vec<TensorGroup> {
    let scaled = |lr_scale: f64, g: TensorGroup| TensorGroup { lr_scale, ..g };
    vec![
        TensorGroup::from_shape("in.weight", 0, 20, &[4, 5], true),
        scaled(0.5, TensorGroup::from_shape("in.bias", 20, 5, &[5], true)),
        TensorGroup::from_shape("frozen.weight", 25, 4, &[2, 2], false),
        TensorGroup::from_shape("ln.gamma", 29, 7, &[7], true),
        scaled(3.0, TensorGroup::from_shape("out.weight", 36, 21, &[3, 7], true)),
        TensorGroup::from_shape("logit_scale", 57, 1, &[], true),
        TensorGroup::from_shape("big.weight", 58, 37, &[37, 1], true),
    ]
}

/// SGD (plain, Nesterov, classic), LARS (larc/combined forms, LARC clip, apex zero norm),
/// TVLARS (code and paper forms), LAMB (bias correction off, clamp), gradient clipping and
/// excluded-tensor scales.
pub fn variants() -> Vec<OptimConfig> {
    let big = |c: OptimConfig| OptimConfig { trust_coefficient: 0.05, lr: 1.0, ..c };
    vec![
        OptimConfig { weight_decay: Some(0.01), ..cfg("sgd") },
        OptimConfig { nesterov: true, weight_decay: Some(0.01), ..cfg("sgd") },
        OptimConfig { momentum_form: Some("classic".into()), nesterov: true, ..cfg("sgd") },
        big(OptimConfig { weight_decay: Some(0.01), eps: Some(1e-9), ..cfg("lars") }),
        big(OptimConfig { ratio_form: Some("combined".into()), nesterov: true, ..cfg("lars") }),
        big(OptimConfig { momentum_form: Some("pytorch".into()), larc_clip: true, ..cfg("lars") }),
        big(OptimConfig { zero_norm: "apex".into(), weight_decay: Some(0.02), ..cfg("lars") }),
        big(cfg("tvlars-code")),
        big(OptimConfig {
            tvlars_alpha: Some(1.0),
            tvlars_lambda: 0.05,
            tvlars_delay: Some(30.0),
            tvlars_min: Some(0.01),
            ratio_form: Some("larc".into()),
            momentum_form: Some("classic".into()),
            ..cfg("tvlars")
        }),
        OptimConfig { lr: 0.01, ..cfg("lamb") },
        OptimConfig { lr: 0.01, bias_correction: false, lamb_clamp: Some(1.5), ..cfg("lamb") },
        OptimConfig { lr: 0.01, grad_clip_norm: Some(1.0), ..cfg("lamb") },
        OptimConfig { grad_clip_norm: Some(0.5), weight_decay: Some(1e-3), ..big(cfg("lars")) },
        big(OptimConfig { excluded_lr_scale: 0.1, ..cfg("tvlars-code") }),
        big(OptimConfig { excluded_lr_scale: 0.25, weight_decay: Some(1e-3), ..cfg("lars") }),
        OptimConfig { lr: 0.01, excluded_lr_scale: 0.5, ..cfg("lamb") },
    ]
}
