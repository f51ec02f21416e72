//! The engine against the hand-computed steps of ALGORITHMS.md §6 and against the f64
//! reference over many random steps.

use super::config::{OptimConfig, Phi};
use super::reference::Reference;
use super::schedule::{Schedule, ScheduleKind};
use super::*;

fn cfg(name: &str) -> OptimConfig {
    OptimConfig { name: name.into(), ..OptimConfig::default() }
}

/// A 2-D tensor w = [3, 4] (shape [2, 1]).
fn w34() -> Vec<TensorGroup> {
    vec![TensorGroup::from_shape("w", 0, 2, &[2, 1], true)]
}

/// One step from zero state: returns (new w, ratio of group 0).
fn one_step(c: &OptimConfig, w: [f32; 2], g: [f32; 2], lr: f64) -> ([f64; 2], f64) {
    let mut opt = Optimizer::new(c, w34()).unwrap();
    let mut p = w.to_vec();
    let stats = opt.step(&mut p, &g, lr, 0);
    ([p[0] as f64, p[1] as f64], stats.groups[0].ratio)
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

/// Within the precision of f32 inputs (0.6f32 is not 0.6).
fn rclose(got: f64, want: f64) -> bool {
    (got - want).abs() <= 2e-7 * want.abs()
}

fn lars(form: &str, beta: f64) -> OptimConfig {
    OptimConfig {
        momentum: 0.0,
        weight_decay: Some(beta),
        ratio_form: Some(form.into()),
        eps: Some(0.0),
        ..cfg("lars")
    }
}

#[test]
fn t2_gradient_parallel_to_weights() {
    for form in ["larc", "combined"] {
        let (w, r) = one_step(&lars(form, 0.01), [3.0, 4.0], [0.6, 0.8], 1.0);
        assert!(rclose(r, 0.00476190476), "{form}: r = {r}");
        assert!(close(3.0 - w[0], 0.003, 3e-7) && close(4.0 - w[1], 0.004, 3e-7), "{form}: {w:?}");
    }
}

#[test]
fn t3_gradient_orthogonal_to_weights() {
    for (form, want_r, want) in [
        ("larc", 0.00333333333, [0.00366666667, -0.00066666667]),
        ("combined", 0.00447213595, [0.00491934955, -0.00089442719]),
    ] {
        let (w, r) = one_step(&lars(form, 0.1), [3.0, 4.0], [0.8, -0.6], 1.0);
        assert!(rclose(r, want_r), "{form}: r = {r}");
        assert!(close(3.0 - w[0], want[0], 3e-7), "{form}: {w:?}");
        assert!(close(4.0 - w[1], want[1], 3e-7), "{form}: {w:?}");
    }
}

#[test]
fn t4_zero_norms() {
    for form in ["larc", "combined"] {
        let (w, r) = one_step(&lars(form, 0.1), [0.0, 0.0], [1.0, 2.0], 0.1);
        assert_eq!(r, 1.0, "{form}");
        assert!(close(w[0], -0.1, 1e-7) && close(w[1], -0.2, 1e-7), "{form}: {w:?}");
    }
    let (w, r) = one_step(&lars("larc", 0.01), [3.0, 4.0], [0.0, 0.0], 0.1);
    assert_eq!(r, 1.0);
    assert!(close(w[0], 2.997, 3e-7) && close(w[1], 3.996, 3e-7), "{w:?}");
    let (w, r) = one_step(&lars("combined", 0.01), [3.0, 4.0], [0.0, 0.0], 0.1);
    assert!(close(r, 0.1, 1e-12), "η/β = 0.1, got {r}");
    assert!(close(w[0], 2.9997, 3e-7) && close(w[1], 3.9996, 3e-7), "{w:?}");
    // Apex's rule: the tensor is skipped, its decay dropped, so a zero gradient moves nothing.
    let apex = OptimConfig { zero_norm: "apex".into(), ..lars("larc", 0.01) };
    let (w, r) = one_step(&apex, [3.0, 4.0], [0.0, 0.0], 0.1);
    assert_eq!((w, r), ([3.0, 4.0], 1.0));
}

#[test]
fn zero_weights_and_gradients_move_nothing_and_stay_finite() {
    for name in ["sgd", "lars", "tvlars", "tvlars-code", "lamb"] {
        let mut opt = Optimizer::new(&cfg(name), w34()).unwrap();
        let mut p = vec![0.0f32; 2];
        for step in 0..3 {
            let stats = opt.step(&mut p, &[0.0, 0.0], 0.5, step);
            assert!(stats.groups[0].ratio.is_finite(), "{name}");
        }
        assert_eq!(p, [0.0, 0.0], "{name}");
        assert!(opt.velocity().iter().all(|v| *v == 0.0), "{name}");
    }
}

/// T6: a constant update direction of size 0.005, m = 0.9, lr 1 then 0.5.
#[test]
fn t6_momentum_placement() {
    for (form, want) in [("classic", [0.005, 0.0070]), ("pytorch", [0.005, 0.00475])] {
        let c = OptimConfig { momentum_form: Some(form.into()), ..cfg("sgd") };
        let mut opt = Optimizer::new(&c, w34()).unwrap();
        let mut p = vec![3.0f32, 4.0];
        let g = [0.003f32, 0.004];
        for (step, lr) in [1.0, 0.5].into_iter().enumerate() {
            let before = [p[0] as f64, p[1] as f64];
            opt.step(&mut p, &g, lr, step as u64);
            let moved =
                ((before[0] - p[0] as f64).powi(2) + (before[1] - p[1] as f64).powi(2)).sqrt();
            assert!(close(moved, want[step], 2e-7), "{form} step {step}: {moved}");
        }
    }
}

/// T8: LAMB's first step, w = [3, 4], g = [0.5, −2], λ = 0.01, lr 0.01.
#[test]
fn t8_lamb_first_step() {
    for (bc, want) in [(true, [-0.03657635, 0.03409063]), (false, [-0.03574426, 0.03496209])] {
        let c = OptimConfig { bias_correction: bc, ..cfg("lamb") };
        let (w, _) = one_step(&c, [3.0, 4.0], [0.5, -2.0], 0.01);
        assert!(
            close(w[0] - 3.0, want[0], 5e-7) && close(w[1] - 4.0, want[1], 5e-7),
            "{bc}: {w:?}"
        );
    }
    // The clamp bounds φ(‖w‖) = min(‖w‖, c): ‖w‖ = 5 clamped to 2.5 halves the step.
    let c = OptimConfig { lamb_clamp: Some(2.5), ..cfg("lamb") };
    let (w, _) = one_step(&c, [3.0, 4.0], [0.5, -2.0], 0.01);
    assert!(close(w[0] - 3.0, -0.03657635 / 2.0, 5e-7), "{w:?}");
}

/// T9: φ in the code form and in a paper-like form.
#[test]
fn t9_tvlars_phi() {
    let code = cfg("tvlars-code").settings().unwrap().phi.unwrap();
    for (t, want) in [(1.0, 0.90826480), (1000.0, 0.35482612), (5000.0, 0.00673341)] {
        assert!(close(code.at(t), want, 5e-9), "φ({t}) = {}", code.at(t));
    }
    let paper = Phi { alpha: 1.0, lambda: 0.5, delay: 10.0, min: 0.01 };
    for (t, want) in
        [(0.0, 1.00330715), (5.0, 0.93414182), (10.0, 0.51), (15.0, 0.08585818), (20.0, 0.01669285)]
    {
        assert!(close(paper.at(t), want, 5e-9), "φ({t}) = {}", paper.at(t));
    }
    // In the engine: step 999 is t = 1000, ratio η·φ(1000)·‖w‖/‖g + βw‖ (g ∥ w here).
    let (_, r) = one_step_at(&cfg("tvlars-code"), 999);
    let want = 1e-3 * 0.35482612 * 5.0 / (1.0 + 5e-4 * 5.0);
    assert!(close(r, want, 1e-10), "{r} vs {want}");
}

fn one_step_at(c: &OptimConfig, step: u64) -> ([f32; 2], f64) {
    let mut opt = Optimizer::new(c, w34()).unwrap();
    let mut p = vec![3.0f32, 4.0];
    let stats = opt.step(&mut p, &[0.6, 0.8], 1.0, step);
    ([p[0], p[1]], stats.groups[0].ratio)
}

/// tvlars-code clamps both norms to ≤ 10: ‖w‖ = 50 counts as 10.
#[test]
fn tvlars_code_clamps_norms() {
    let mut opt = Optimizer::new(&cfg("tvlars-code"), w34()).unwrap();
    let mut p = vec![30.0f32, 40.0];
    let stats = opt.step(&mut p, &[0.6, 0.8], 1.0, 0);
    let phi1 = 0.90826480;
    let want = 1e-3 * phi1 * 10.0 / (1.0 + 5e-4 * 50.0);
    assert!(close(stats.groups[0].ratio, want, 1e-9), "{} vs {want}", stats.groups[0].ratio);
    let c = OptimConfig { tvlars_lambda: 1e-3, ..cfg("tvlars") };
    let mut opt = Optimizer::new(&c, w34()).unwrap();
    let mut p = vec![30.0f32, 40.0];
    let stats = opt.step(&mut p, &[0.6, 0.8], 1.0, 0);
    let want = 1e-3 * phi1 * 50.0 / (1.0 + 5e-4 * 50.0);
    assert!(close(stats.groups[0].ratio, want, 1e-9), "{} vs {want}", stats.groups[0].ratio);
}

#[test]
fn larc_clip_caps_the_effective_rate_at_lr() {
    let c = OptimConfig { larc_clip: true, ..lars("larc", 0.01) };
    // Local rate 0.00476 > lr 0.001: the effective rate is lr, ratio 1.
    let (w, r) = one_step(&c, [3.0, 4.0], [0.6, 0.8], 0.001);
    assert_eq!(r, 1.0);
    assert!(close(3.0 - w[0], 0.001 * 0.63, 3e-7), "{w:?}");
    // Local rate < lr 1: the effective rate is the local rate.
    let (w, r) = one_step(&c, [3.0, 4.0], [0.6, 0.8], 1.0);
    assert!(rclose(r, 0.00476190476), "{r}");
    assert!(close(3.0 - w[0], 0.003, 3e-7), "{w:?}");
}

/// T11 and the exclusion rule: a 1-D tensor moves by exactly −lr·g under LARS and TVLARS.
#[test]
fn t11_excluded_tensors_take_plain_sgd() {
    let shape_rule = [(vec![], false), (vec![7], false), (vec![3, 4], true), (vec![2, 3, 4], true)];
    for (shape, big) in shape_rule {
        let g = TensorGroup::from_shape("x", 0, 1, &shape, true);
        assert_eq!((g.decay, g.adapt, g.ndim), (big, big, shape.len()));
    }
    for name in ["lars", "tvlars", "tvlars-code"] {
        let c = OptimConfig { weight_decay: Some(0.1), ..cfg(name) };
        let groups = vec![
            TensorGroup::from_shape("w", 0, 2, &[2, 1], true),
            TensorGroup::from_shape("b", 2, 3, &[3], true),
        ];
        let mut opt = Optimizer::new(&c, groups).unwrap();
        let mut p = vec![3.0f32, 4.0, 0.5, -1.5, 2.0];
        let g = [0.6f32, 0.8, 0.25, -0.125, 3.0];
        let lr = 0.3;
        let stats = opt.step(&mut p, &g, lr, 0);
        for i in 2..5 {
            assert_eq!(
                p[i],
                ([0.5f32, -1.5, 2.0][i - 2] as f64 - lr * g[i] as f64) as f32,
                "{name}"
            );
        }
        assert_eq!(stats.groups[1], GroupStat { ratio: 1.0, lr, adapted: false, trainable: true });
        assert!(stats.groups[0].adapted && stats.groups[0].ratio < 0.01, "{name}");
    }
}

/// The two flags are independent: decay without adaptation, adaptation without decay.
#[test]
fn decay_and_adapt_flags_are_independent() {
    let c = lars("larc", 0.1);
    let decay_only =
        TensorGroup { adapt: false, ..TensorGroup::from_shape("w", 0, 2, &[2, 1], true) };
    let mut opt = Optimizer::new(&c, vec![decay_only]).unwrap();
    let mut p = vec![3.0f32, 4.0];
    opt.step(&mut p, &[0.8, -0.6], 0.5, 0);
    assert!(close(p[0] as f64, 3.0 - 0.5 * (0.8 + 0.3), 3e-7), "{p:?}");
    let adapt_only =
        TensorGroup { decay: false, ..TensorGroup::from_shape("w", 0, 2, &[2, 1], true) };
    let mut opt = Optimizer::new(&c, vec![adapt_only]).unwrap();
    let mut p = vec![3.0f32, 4.0];
    let stats = opt.step(&mut p, &[0.8, -0.6], 1.0, 0);
    assert!(rclose(stats.groups[0].ratio, 0.005), "η‖w‖/‖g‖ with β = 0");
}

#[test]
fn frozen_tensors_do_not_move() {
    for name in ["sgd", "lars", "tvlars", "lamb"] {
        let groups = vec![
            TensorGroup::from_shape("frozen", 0, 2, &[2, 1], false),
            TensorGroup::from_shape("w", 2, 2, &[2, 1], true),
        ];
        let mut opt = Optimizer::new(&cfg(name), groups).unwrap();
        let mut p = vec![1.0f32, 2.0, 3.0, 4.0];
        let stats = opt.step(&mut p, &[1.0; 4], 0.1, 0);
        assert_eq!(&p[..2], &[1.0, 2.0], "{name}");
        assert_ne!(&p[2..], &[3.0, 4.0], "{name}");
        assert!(!stats.groups[0].trainable);
    }
}

#[test]
fn overlapping_groups_are_rejected() {
    let groups = vec![
        TensorGroup::from_shape("a.weight", 0, 4, &[2, 2], true),
        TensorGroup::from_shape("a.bias", 3, 2, &[2], true),
    ];
    let err = Optimizer::new(&cfg("lars"), groups).unwrap_err().to_string();
    assert!(err.contains("a.weight") && err.contains("overlap"), "{err}");
    let err = Optimizer::new(&cfg("adamw"), w34()).unwrap_err().to_string();
    assert!(err.contains("optim.name"), "{err}");
}

use super::cases::{model_groups, variants};

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Every optimizer against the f64 reference over 100 random steps under a warm-up + cosine
/// schedule: parameters within 1e-6 (relative, per tensor), the distance travelled within 1e-4,
/// ratios within 1e-6.
#[test]
fn matches_f64_reference_over_100_random_steps() {
    let groups = model_groups();
    let n = 95;
    for c in variants() {
        let settings = c.settings().unwrap();
        let mut rng = crate::rng::Rng::new(11);
        let mut p: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let p0 = p.clone();
        let mut reference = Reference::new(settings.clone(), groups.clone(), &p);
        let mut opt = Optimizer::new(&c, groups.clone()).unwrap();
        let sched = c.lr_schedule(100).unwrap();
        let sched = Schedule { warmup_steps: 10, ..sched };
        for step in 0..100 {
            let g: Vec<f32> =
                (0..n).map(|i| (rng.normal() * (0.1 + (i % 5) as f64)) as f32).collect();
            let lr = sched.lr(step);
            let stats = opt.step(&mut p, &g, lr, step);
            let want = reference.step(&g, lr, step);
            for (gi, (s, r)) in stats.groups.iter().zip(&want).enumerate() {
                assert!(
                    close(s.ratio, *r, 1e-6 * r.abs()),
                    "{c:?} step {step} group {gi}: {} vs {r}",
                    s.ratio
                );
            }
        }
        for grp in &groups {
            let r = grp.offset..grp.offset + grp.len;
            let got: Vec<f64> = p[r.clone()].iter().map(|&x| x as f64).collect();
            let want = &reference.w[r.clone()];
            let e = rel(&got, want);
            assert!(e <= 1e-6, "{} {}: relative error {e}", settings.name, grp.name);
            if grp.trainable {
                let d_got: Vec<f64> =
                    got.iter().zip(&p0[r.clone()]).map(|(a, &b)| a - b as f64).collect();
                let d_want: Vec<f64> =
                    want.iter().zip(&p0[r]).map(|(a, &b)| a - b as f64).collect();
                let e = rel(&d_got, &d_want);
                assert!(e <= 1e-4, "{} {}: displacement error {e}", settings.name, grp.name);
            }
        }
    }
}

/// The old stand-alone Sgd and the engine's sgd agree (same convention, default config).
#[test]
fn engine_sgd_matches_the_old_sgd() {
    // The old Sgd has no per-tensor learning rate.
    let groups: Vec<TensorGroup> =
        model_groups().into_iter().map(|g| TensorGroup { lr_scale: 1.0, ..g }).collect();
    let c = OptimConfig { weight_decay: Some(1e-3), ..cfg("sgd") };
    let mut a = Optimizer::new(&c, groups.clone()).unwrap();
    let mut b = Sgd::new(groups, c.momentum, false, 1e-3);
    let mut rng = crate::rng::Rng::new(3);
    let mut pa: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
    let mut pb = pa.clone();
    for step in 0..50 {
        let g: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
        a.step(&mut pa, &g, 0.05, step);
        b.step(&mut pb, &g, 0.05);
    }
    for (x, y) in pa.iter().zip(&pb) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
    }
}

/// Saving after 10 steps and resuming in a fresh optimizer gives bitwise what 20 uninterrupted
/// steps give.
#[test]
fn state_round_trip_equals_uninterrupted() {
    for c in variants() {
        let groups = model_groups();
        let mut rng = crate::rng::Rng::new(21);
        let p0: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
        let grads: Vec<Vec<f32>> =
            (0..20).map(|_| (0..95).map(|_| rng.normal() as f32).collect()).collect();
        let mut a = Optimizer::new(&c, groups.clone()).unwrap();
        let mut pa = p0.clone();
        for (step, g) in grads.iter().enumerate() {
            a.step(&mut pa, g, 0.1, step as u64);
        }
        let mut b = Optimizer::new(&c, groups.clone()).unwrap();
        let mut pb = p0.clone();
        for (step, g) in grads[..10].iter().enumerate() {
            b.step(&mut pb, g, 0.1, step as u64);
        }
        let saved = b.state_bytes();
        drop(b);
        let mut resumed = Optimizer::new(&c, groups.clone()).unwrap();
        resumed.load_state(&saved).unwrap();
        assert_eq!(resumed.steps(), 10);
        for (step, g) in grads.iter().enumerate().skip(10) {
            resumed.step(&mut pb, g, 0.1, step as u64);
        }
        assert_eq!(pa, pb, "{}", c.name);
        assert_eq!(resumed.state_bytes(), a.state_bytes(), "{}", c.name);
    }
}

#[test]
fn bad_state_is_rejected_with_a_reason() {
    let mut lars = Optimizer::new(&cfg("lars"), model_groups()).unwrap();
    let saved = lars.state_bytes();
    let mut lamb = Optimizer::new(&cfg("lamb"), model_groups()).unwrap();
    let err = lamb.load_state(&saved).unwrap_err().to_string();
    assert!(err.contains("\"lars\"") && err.contains("optim.name"), "{err}");
    let err = lars.load_state(&saved[..saved.len() - 3]).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    let mut small = Optimizer::new(&cfg("lars"), w34()).unwrap();
    let err = small.load_state(&saved).unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
    let err = lars.load_state(b"garbage!").unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");
    lars.load_state(&saved).unwrap();
}

#[test]
fn summary_reports_first_last_and_spread_of_adapted_tensors() {
    let groups = model_groups();
    let mut opt = Optimizer::new(&cfg("lars"), groups.clone()).unwrap();
    let mut rng = crate::rng::Rng::new(1);
    let mut p: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
    let g: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
    let stats = opt.step(&mut p, &g, 2.0, 0);
    let s = stats.summary(opt.groups()).unwrap();
    assert_eq!((s.first.as_str(), s.last.as_str()), ("in.weight", "big.weight"));
    let adapted: Vec<f64> = [0, 4, 6].iter().map(|&i| stats.groups[i].ratio).collect();
    assert_eq!(s.ratio_first, adapted[0]);
    let mut sorted = adapted.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!((s.ratio_min, s.ratio_median, s.ratio_max), (sorted[0], sorted[1], sorted[2]));
    // The effective rates: lr × the tensor's lr_scale (out.weight: 3) × its ratio.
    let lrs: Vec<f64> = [0, 4, 6].iter().map(|&i| stats.groups[i].lr).collect();
    for (k, &i) in [0, 4, 6].iter().enumerate() {
        assert_eq!(lrs[k], 2.0 * groups[i].lr_scale * adapted[k], "{}", groups[i].name);
    }
    assert_eq!(groups[4].lr_scale, 3.0);
    assert_eq!(s.lr_max, lrs.iter().copied().fold(0.0, f64::max));
    // Under SGD nothing is adapted: the summary covers every trainable tensor, ratio 1.
    let mut sgd = Optimizer::new(&cfg("sgd"), groups).unwrap();
    let s = sgd.step(&mut p, &g, 0.1, 0).summary(sgd.groups()).unwrap();
    assert_eq!(
        (s.first.as_str(), s.ratio_min, s.ratio_max, s.lr_median),
        ("in.weight", 1.0, 1.0, 0.1)
    );
    let json = serde_json::to_value(&s).unwrap();
    assert!(json.get("ratio_median").is_some());
}

#[test]
fn describe_lists_the_excluded_tensors() {
    let opt = Optimizer::new(&cfg("lars"), model_groups()).unwrap();
    let d = opt.describe();
    assert!(d.contains("in.bias, ln.gamma, logit_scale (they take lr × 1)"), "{d}");
    assert!(d.contains("1 frozen"), "{d}");
}

#[test]
fn poly_schedule_from_config() {
    let c = OptimConfig {
        lr: 10.0,
        warmup_steps: 10,
        schedule: Some("poly".into()),
        min_lr_ratio: 1e-5,
        ..cfg("lars")
    };
    let s = c.lr_schedule(100).unwrap();
    assert_eq!(s.kind, ScheduleKind::Poly { power: 2.0 });
    assert!(close(s.lr(54), 2.55532140, 5e-8));
}

#[test]
fn bench_runs_and_reports_traffic() {
    for name in ["sgd", "lamb"] {
        let b = bench_step(10_000, name).unwrap();
        assert!(b.seconds_per_step > 0.0 && b.gbps > 0.0 && b.memcpy_gbps > 0.0);
        assert!(b.runs >= 5, "{} runs", b.runs);
        assert_eq!(b.bytes_moved, if name == "lamb" { 280_000 } else { 200_000 });
    }
    assert!(bench_step(10, "adamw").is_err());
}

/// Tensors of every length class the kernels treat apart (under 8, not a multiple of 8, longer
/// than one block of the fused norm), plus excluded and frozen ones.
fn long_groups() -> (Vec<TensorGroup>, usize) {
    let shapes: [(usize, &[usize], bool); 6] = [
        (300, &[30, 10], true),
        (5, &[5], true),
        (7, &[7, 1], true),
        (1000, &[8, 125], false),
        (2053, &[2053, 1], true),
        (1, &[], true),
    ];
    let mut off = 0;
    let mut groups = Vec::new();
    for (i, (len, shape, trainable)) in shapes.into_iter().enumerate() {
        groups.push(TensorGroup::from_shape(format!("t{i}"), off, len, shape, trainable));
        off += len;
    }
    (groups, off)
}

/// ‖w‖ kept from the previous step's write gives bitwise the parameters, state and ratios that
/// reading it afresh every step gives (the engine before the cache), and changing parameters
/// behind the optimizer's back is caught by `forget_weight_norms` (and only by it).
#[test]
fn kept_weight_norms_are_bitwise_the_fresh_ones() {
    let (groups, n) = long_groups();
    for c in variants() {
        let mut rng = crate::rng::Rng::new(31);
        let p0: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let mut kept = Optimizer::new(&c, groups.clone()).unwrap();
        let mut fresh = Optimizer::new(&c, groups.clone()).unwrap();
        let (mut pk, mut pf) = (p0.clone(), p0.clone());
        for step in 0..12 {
            let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let lr = 0.2 / (1.0 + step as f64);
            fresh.forget_weight_norms();
            let a = kept.step(&mut pk, &g, lr, step);
            let b = fresh.step(&mut pf, &g, lr, step);
            assert_eq!(a, b, "{} step {step}", c.name);
        }
        assert_eq!(pk, pf, "{}", c.name);
        assert_eq!(kept.state_bytes(), fresh.state_bytes(), "{}", c.name);

        // Shrink an adapted tensor from outside (below the tvlars-code clamp of 10): a stale ‖w‖
        // would change the ratio.
        let settings = c.settings().unwrap();
        let adapts = matches!(settings.family, config::Family::Lars | config::Family::Tvlars);
        pk[..300].iter_mut().for_each(|x| *x *= 0.1);
        let g: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let mut stale = kept.clone();
        let mut ps = pk.clone();
        let mut restored = Optimizer::new(&c, groups.clone()).unwrap();
        restored.load_state(&kept.state_bytes()).unwrap();
        let mut pr = pk.clone();
        kept.forget_weight_norms();
        let a = kept.step(&mut pk, &g, 0.1, 12);
        let r = restored.step(&mut pr, &g, 0.1, 12);
        assert_eq!((&a, &pk), (&r, &pr), "{}", c.name);
        let s = stale.step(&mut ps, &g, 0.1, 12);
        if adapts {
            assert_ne!(s.groups[0].ratio, a.groups[0].ratio, "{}: no norm was kept", c.name);
            assert_ne!(ps, pk, "{}", c.name);
        } else {
            assert_eq!(ps, pk, "{}: nothing is kept outside lars and tvlars", c.name);
        }
    }
}

/// `excluded_lr_scale`: the tensors without a trust ratio (here a 1-D bias and the 0-D logit
/// scale) move by lr·scale·g under LARS and TVLARS, by scale times their Adam step under LAMB;
/// the adapted tensor is untouched by it.
#[test]
fn excluded_lr_scale_multiplies_the_rate_of_excluded_tensors_only() {
    let groups = vec![
        TensorGroup::from_shape("w", 0, 2, &[2, 1], true),
        TensorGroup::from_shape("b", 2, 3, &[3], true),
        TensorGroup::from_shape("logit_scale", 5, 1, &[], true),
    ];
    let p0 = vec![3.0f32, 4.0, 0.5, -1.5, 2.0, 2.6];
    let g = [0.6f32, 0.8, 0.25, -0.125, 3.0, -0.75];
    let lr = 0.3;
    for name in ["lars", "tvlars", "tvlars-code", "lamb"] {
        let run = |scale: f64| {
            let c = OptimConfig { weight_decay: Some(0.1), excluded_lr_scale: scale, ..cfg(name) };
            let mut opt = Optimizer::new(&c, groups.clone()).unwrap();
            let mut p = p0.clone();
            let stats = opt.step(&mut p, &g, lr, 0);
            (p, stats)
        };
        let (p1, s1) = run(1.0);
        let (p, s) = run(0.1);
        assert_eq!(&p[..2], &p1[..2], "{name}: the adapted tensor must not change");
        assert_eq!(s.groups[0], s1.groups[0], "{name}");
        for i in [1, 2] {
            assert_eq!((s.groups[i].ratio, s.groups[i].adapted), (0.1, false), "{name}");
            assert!(close(s.groups[i].lr, 0.1 * lr, 1e-15), "{name}");
        }
        for i in 2..6 {
            let moved = p[i] as f64 - p0[i] as f64;
            let moved1 = p1[i] as f64 - p0[i] as f64;
            assert!(close(moved, 0.1 * moved1, 1e-6 * moved1.abs()), "{name} {i}: {moved}");
            if name != "lamb" {
                // Plain momentum SGD from zero state: exactly lr·scale·g, up to f32 rounding.
                assert!(close(moved, -0.1 * lr * g[i] as f64, 3e-7), "{name} {i}: {moved}");
            }
        }
    }
    // Under SGD nothing is excluded, so the key is refused rather than ignored.
    let c = OptimConfig { excluded_lr_scale: 0.1, ..cfg("sgd") };
    let err = Optimizer::new(&c, groups).unwrap_err().to_string();
    assert!(err.contains("optim.excluded_lr_scale"), "{err}");
}

/// `optim.lr_scale`: a tensor with factor k moves exactly as it would at k × the rate, and
/// every other tensor exactly as without the factor, under every optimizer variant (ratios,
/// clipping and LARC's clip included).
#[test]
fn lr_scale_multiplies_the_rate_of_its_tensor_only() {
    let unscaled: Vec<TensorGroup> =
        model_groups().into_iter().map(|g| TensorGroup { lr_scale: 1.0, ..g }).collect();
    let out = unscaled.iter().position(|g| g.name == "out.weight").unwrap();
    let mut scaled = unscaled.clone();
    scaled[out].lr_scale = 2.0;
    for c in variants() {
        let mut rng = crate::rng::Rng::new(41);
        let p0: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
        let mut a = Optimizer::new(&c, scaled.clone()).unwrap();
        let mut base = Optimizer::new(&c, unscaled.clone()).unwrap();
        let mut double = Optimizer::new(&c, unscaled.clone()).unwrap();
        let (mut pa, mut pb, mut pd) = (p0.clone(), p0.clone(), p0.clone());
        for step in 0..4u64 {
            let g: Vec<f32> = (0..95).map(|_| rng.normal() as f32).collect();
            let lr = 0.05 * (step + 1) as f64;
            let sa = a.step(&mut pa, &g, lr, step);
            base.step(&mut pb, &g, lr, step);
            let sd = double.step(&mut pd, &g, lr * 2.0, step);
            assert_eq!(sa.groups[out], sd.groups[out], "{} step {step}", c.name);
        }
        for (gi, grp) in scaled.iter().enumerate() {
            let r = grp.offset..grp.offset + grp.len;
            let want = if gi == out { &pd[r.clone()] } else { &pb[r.clone()] };
            let same = pa[r].iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{}: {} is not what its rate gives", c.name, grp.name);
        }
        assert_ne!(pa, pb, "{}: the factor changed nothing", c.name);
    }
}
