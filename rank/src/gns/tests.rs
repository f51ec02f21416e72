use tessera_collectives::threads::ThreadComm;
use tessera_collectives::{Communicator, ReduceOp};

use super::cost::measure_cost;
use super::problems::{FrozenProblem, MeanEstimation, Regression, run_frozen_threads};
use super::*;

fn cfg(decay: f64) -> GnsConfig {
    GnsConfig { ema_decay: decay, reduce_every: 1, ..GnsConfig::default() }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

fn sq(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum()
}

/// Runs one step on `world` thread ranks; rank r observes `samples[r]` (a list of
/// (gradient-mean vector G_k, b_k) micro-batches) and the report of rank 0 is returned.
fn one_step(samples: &[Vec<(Vec<f64>, usize)>], groups: &[(usize, usize)]) -> GnsReport {
    let b_global: usize = samples.iter().flatten().map(|s| s.1).sum();
    let reports = ThreadComm::run_group(samples.len(), |rank, comm| {
        let mine = &samples[rank];
        let mut est = GnsEstimator::new(&cfg(0.0), groups).unwrap();
        let d = mine[0].0.len();
        let mut buf = vec![0.0f32; d];
        for (g, b) in mine {
            // The partial contribution (b/B)·G_k, accumulated as the loop does.
            for (o, v) in buf.iter_mut().zip(g) {
                *o += (*v * *b as f64 / b_global as f64) as f32;
            }
            if mine.len() == 1 {
                est.observe_local(&buf, *b, b_global).unwrap();
            } else {
                est.observe_accumulated(&buf, *b, b_global).unwrap();
            }
        }
        comm.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
        let mut r = est.finish_step(comm, &buf, b_global).unwrap();
        assert_eq!(r.len(), 1, "reduce_every = 1: one report per step");
        r.pop().unwrap()
    });
    for r in &reports {
        assert_eq!(r, &reports[0], "every rank must report the same figures");
    }
    reports[0].clone()
}

/// 𝒮 and 𝒢 straight from ALGORITHMS.md §5, in f64.
fn direct(samples: &[(Vec<f64>, usize)], lo: usize, hi: usize) -> (f64, f64) {
    let n: usize = samples.iter().map(|s| s.1).sum();
    let k = samples.len() as f64;
    let mut mean = vec![0.0; hi - lo];
    for (g, b) in samples {
        for (m, v) in mean.iter_mut().zip(&g[lo..hi]) {
            *m += v * *b as f64 / n as f64;
        }
    }
    let weighted: f64 = samples.iter().map(|(g, b)| *b as f64 * sq(&g[lo..hi])).sum();
    let s = (weighted - n as f64 * sq(&mean)) / (k - 1.0);
    (s, sq(&mean) - s / n as f64)
}

fn uneven_samples() -> Vec<(Vec<f64>, usize)> {
    vec![
        (vec![1.0, -2.0, 0.5, 3.0, 0.25], 2),
        (vec![0.5, -1.0, 1.5, 2.0, -0.75], 3),
        (vec![2.0, 0.0, -0.5, 1.0, 1.25], 5),
    ]
}

#[test]
fn general_form_with_uneven_ranks_matches_the_formula() {
    let samples = uneven_samples();
    let groups = [(0, 2), (2, 3)];
    let per_rank: Vec<Vec<(Vec<f64>, usize)>> = samples.iter().map(|s| vec![s.clone()]).collect();
    let r = one_step(&per_rank, &groups);
    let (s, g) = direct(&samples, 0, 5);
    assert_eq!((r.samples, r.examples), (3, 10));
    assert!(close(r.trace_sigma.unwrap(), s, 1e-5), "{:?} vs {s}", r.trace_sigma);
    assert!(close(r.grad_sq.unwrap(), g, 1e-5), "{:?} vs {g}", r.grad_sq);
    // Decay 0: the smoothed values are this step's.
    assert!(close(r.b_simple.unwrap(), s / g, 1e-5));
    assert_eq!(r.b_simple, r.b_simple_raw);
    for (i, &(o, l)) in groups.iter().enumerate() {
        let (sg, gg) = direct(&samples, o, o + l);
        let got = r.group_b_simple[i];
        if gg > 0.0 {
            assert!(close(got.unwrap(), sg / gg, 1e-4), "group {i}: {got:?} vs {}", sg / gg);
        } else {
            assert_eq!(got, None, "group {i} has 𝒢 = {gg} <= 0");
        }
    }
}

#[test]
fn micro_batches_on_one_rank_equal_ranks() {
    let samples = uneven_samples();
    let groups = [(0, 2), (2, 3)];
    let ranks: Vec<Vec<(Vec<f64>, usize)>> = samples.iter().map(|s| vec![s.clone()]).collect();
    let by_ranks = one_step(&ranks, &groups);
    let by_micro = one_step(std::slice::from_ref(&samples), &groups);
    // Two ranks with 1 and 2 micro-batches: K = 3 again.
    let mixed = one_step(&[vec![samples[0].clone()], samples[1..].to_vec()], &groups);
    for r in [&by_micro, &mixed] {
        assert_eq!(r.samples, 3);
        assert!(close(r.trace_sigma.unwrap(), by_ranks.trace_sigma.unwrap(), 1e-5));
        assert!(close(r.grad_sq.unwrap(), by_ranks.grad_sq.unwrap(), 1e-5));
    }
}

#[test]
fn equal_batches_reduce_to_the_two_batch_form() {
    let a = vec![1.0, 2.0, -1.0];
    let b = vec![0.0, 1.0, 0.5];
    let r = one_step(&[vec![(a.clone(), 4)], vec![(b.clone(), 4)]], &[(0, 3)]);
    let (b_small, b_big) = (4.0, 8.0);
    let small = (sq(&a) + sq(&b)) / 2.0;
    let big = sq(&a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect::<Vec<_>>());
    let s = (small - big) / (1.0 / b_small - 1.0 / b_big);
    let g = (b_big * big - b_small * small) / (b_big - b_small);
    assert!(close(r.trace_sigma.unwrap(), s, 1e-5), "{:?} vs {s}", r.trace_sigma);
    assert!(close(r.grad_sq.unwrap(), g, 1e-5), "{:?} vs {g}", r.grad_sq);
}

#[test]
fn per_group_figures_sum_to_the_total() {
    let samples = uneven_samples();
    let ranks: Vec<Vec<(Vec<f64>, usize)>> = samples.iter().map(|s| vec![s.clone()]).collect();
    let whole = one_step(&ranks, &[(0, 2), (2, 3)]);
    let first = one_step(&ranks, &[(0, 2)]);
    let second = one_step(&ranks, &[(2, 3)]);
    let s = first.trace_sigma.unwrap() + second.trace_sigma.unwrap();
    let g = first.grad_sq.unwrap() + second.grad_sq.unwrap();
    assert!(close(whole.trace_sigma.unwrap(), s, 1e-9));
    assert!(close(whole.grad_sq.unwrap(), g, 1e-9));
    // A group range that leaves coordinates out leaves them out of the totals.
    let all = one_step(&ranks, &[(0, 5)]);
    assert!(!close(all.trace_sigma.unwrap(), first.trace_sigma.unwrap(), 1e-3));
}

#[test]
fn ema_is_bias_corrected_and_skips_steps_without_an_estimate() {
    let mut est = GnsEstimator::new(&cfg(0.9), &[(0, 1)]).unwrap();
    // K = 2, n = 4, |Ḡ|² = 1: 𝒮 = Σb|G_k|² − 4, 𝒢 = 1 − 𝒮/4.
    let stats = |w: f64| GlobalStats { samples: 2, examples: 4, weighted_sq: vec![w] };
    let r1 = est.update(&stats(6.0), &[1.0], 4).unwrap();
    assert_eq!(r1.trace_sigma, Some(2.0));
    assert_eq!(r1.grad_sq, Some(0.5));
    assert_eq!(r1.trace_sigma_ema, Some(2.0), "the first smoothed value is the raw one");
    assert_eq!(r1.b_simple, Some(4.0));
    let r2 = est.update(&stats(8.0), &[1.0], 4).unwrap();
    assert_eq!(r2.trace_sigma, Some(4.0));
    let want_s = (0.9 * 0.1 * 2.0 + 0.1 * 4.0) / (1.0 - 0.81);
    let want_g = (0.9 * 0.1 * 0.5 + 0.1 * 0.0) / (1.0 - 0.81);
    assert!(close(r2.trace_sigma_ema.unwrap(), want_s, 1e-12));
    assert!(close(r2.grad_sq_ema.unwrap(), want_g, 1e-12));
    assert!(close(r2.b_simple.unwrap(), want_s / want_g, 1e-12));
    assert_eq!(r2.b_simple_raw, None, "𝒢 = 0 gives no raw ratio");
    // K = 1: no estimate this step, the averages stay.
    let r3 = est
        .update(&GlobalStats { samples: 1, examples: 4, weighted_sq: vec![4.0] }, &[1.0], 4)
        .unwrap();
    assert_eq!((r3.trace_sigma, r3.grad_sq, r3.b_simple_raw), (None, None, None));
    assert_eq!(r3.b_simple, r2.b_simple);
    assert_eq!(r3.step, 3);
    assert_eq!(est.b_simple(), r2.b_simple);
}

#[test]
fn one_rank_without_micro_batches_reports_no_estimate() {
    let r = one_step(&[vec![(vec![1.0, 2.0], 8)]], &[(0, 2)]);
    assert_eq!(r.samples, 1);
    assert_eq!((r.trace_sigma, r.b_simple), (None, None));
}

#[test]
fn bad_inputs_are_errors_that_say_what_to_do() {
    let bad = GnsConfig { ema_decay: 1.0, ..GnsConfig::default() };
    let e = GnsEstimator::new(&bad, &[(0, 1)]).unwrap_err();
    assert!(matches!(e, GnsError::BadDecay { .. }) && e.to_string().contains("gns.ema_decay"));
    assert!(matches!(
        GnsEstimator::new(&GnsConfig::default(), &[]).unwrap_err(),
        GnsError::NoGroups
    ));

    let mut est = GnsEstimator::new(&GnsConfig::default(), &[(0, 4), (4, 4)]).unwrap();
    let e = est.observe_local(&[0.0; 6], 2, 8).unwrap_err();
    assert!(matches!(e, GnsError::GroupOutOfBounds { group: 1, end: 8, buf_len: 6, .. }), "{e}");
    assert!(matches!(est.observe_local(&[0.0; 8], 0, 8), Err(GnsError::BadBatch { .. })));
    assert!(matches!(est.observe_local(&[0.0; 8], 9, 8), Err(GnsError::BadBatch { .. })));
    est.observe_accumulated(&[0.0; 8], 2, 8).unwrap();
    assert!(matches!(est.observe_local(&[0.0; 8], 2, 8), Err(GnsError::MixedObserve)));
    assert!(matches!(
        est.observe_accumulated(&[0.0; 9], 2, 8),
        Err(GnsError::BufferLength { got: 9, expected: 8, .. })
    ));
    est.reset_step();
    est.observe_local(&[0.0; 8], 2, 8).unwrap();
    assert!(matches!(est.observe_accumulated(&[0.0; 8], 2, 8), Err(GnsError::MixedObserve)));

    // The ranks must observe the whole global batch.
    let mut est = GnsEstimator::new(&cfg(0.5), &[(0, 4), (4, 4)]).unwrap();
    est.observe_local(&[0.0; 8], 2, 8).unwrap();
    let mut comms = ThreadComm::group(1);
    let e = est.finish_step(&mut comms[0], &[0.0; 8], 8).unwrap_err();
    assert!(matches!(e, GnsError::BatchMismatch { observed: 2, b_global: 8 }), "{e}");
    // The failed step was forgotten: the next one starts clean.
    assert_eq!(est.local_stats().samples, 0);
}

#[test]
fn config_parses_as_a_table_and_rejects_unknown_keys() {
    #[derive(serde::Deserialize)]
    struct Outer {
        #[serde(default)]
        gns: GnsConfig,
    }
    let c: Outer = toml::from_str("[gns]\nema_decay = 0.95\n").unwrap();
    assert_eq!(c.gns, GnsConfig { ema_decay: 0.95, ..GnsConfig::default() });
    assert!(c.gns.enabled && c.gns.per_group);
    let c: Outer = toml::from_str("").unwrap();
    assert_eq!(c.gns, GnsConfig::default());
    assert!(toml::from_str::<Outer>("[gns]\ndecay = 0.9\n").is_err());
    // `[gns.adaptive]` is a table of its own, strict about its keys, and left out of the
    // resolved config while it is the default (runs without it keep their resume hash).
    let c: Outer = toml::from_str("[gns.adaptive]\nenabled = true\nevery = 5\n").unwrap();
    assert!(c.gns.adaptive.enabled);
    assert_eq!(c.gns.adaptive.every, 5);
    assert!(toml::from_str::<Outer>("[gns.adaptive]\nenable = true\n").is_err());
    assert!(toml::to_string(&GnsConfig::default()).unwrap().find("adaptive").is_none());
    assert!(toml::to_string(&c.gns).unwrap().contains("[adaptive]"));
    let off = GnsConfig { enabled: false, ..c.gns.clone() }.validate().unwrap_err();
    assert!(off.to_string().contains("gns.enabled = true"), "{off}");
    let zero = GnsConfig {
        adaptive: crate::gns::AdaptiveBatchConfig { every: 0, ..c.gns.adaptive.clone() },
        ..c.gns
    };
    assert!(zero.validate().unwrap_err().to_string().contains("gns.adaptive.every"));
    assert!(GnsConfig { ema_decay: -0.1, ..GnsConfig::default() }.validate().is_err());
    let e = GnsConfig { reduce_every: 0, ..GnsConfig::default() }.validate().unwrap_err();
    assert!(e.to_string().contains("gns.reduce_every"), "{e}");
}

#[test]
fn report_serialises_for_the_metrics_line() {
    let r = one_step(&[vec![(vec![1.0, 2.0], 3)], vec![(vec![1.5, 1.0], 5)]], &[(0, 1), (1, 1)]);
    let v = serde_json::to_value(&r).unwrap();
    for key in ["trace_sigma", "grad_sq", "b_simple_raw", "b_simple", "group_b_simple"] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    let mut est =
        GnsEstimator::new(&GnsConfig { per_group: false, ..cfg(0.5) }, &[(0, 2)]).unwrap();
    let r =
        est.update(&GlobalStats { samples: 1, examples: 2, weighted_sq: vec![1.0] }, &[0.0; 2], 2);
    let v = serde_json::to_value(r.unwrap()).unwrap();
    assert!(v["b_simple"].is_null() && v.get("group_b_simple").is_none(), "{v}");
}

// ---- closed-form problems ----

#[test]
fn closed_forms_agree_with_the_textbook_formulas() {
    for (d, sigma, e) in [(100, 1.0, 1.0), (30, 0.5, 1.0), (7, 2.0, 0.3)] {
        let p = Regression::isotropic(d, sigma, e);
        let want = Regression::isotropic_b_simple(d, sigma, e);
        assert!(close(p.true_b_simple(), want, 1e-12), "{} vs {want}", p.true_b_simple());
        assert!(close(p.b_noise(), want, 1e-12), "Λ = I: B_noise = B_simple");
    }
    let m = MeanEstimation { d: 100, sigma: 1.0, dist: 1.0 };
    assert!(close(m.true_b_simple(), 100.0, 1e-12));
    assert!(close(m.true_group_b_simple(10, 30), 100.0, 1e-12));
}

fn anisotropic() -> Regression {
    let d = 50;
    let lambda: Vec<f64> = (0..d).map(|i| 0.1 + 2.9 * i as f64 / (d - 1) as f64).collect();
    let e: Vec<f64> = (0..d).map(|i| if i % 3 == 0 { 0.3 } else { -0.1 }).collect();
    Regression { lambda, e, sigma: 0.5 }
}

#[test]
fn anisotropic_b_noise_differs_from_b_simple_and_matches_sampled_moments() {
    let p = anisotropic();
    let d = p.dim();
    // Per-example moments by sampling: tr Σ = E|g|² − |G|², tr(ΛΣ) = E[gᵀΛg] − GᵀΛG.
    let mut rng = crate::rng::Rng::new(7);
    let draws = 100_000;
    let (mut e_g2, mut e_glg) = (0.0, 0.0);
    let mut g = vec![0.0f32; d];
    for _ in 0..draws {
        g.fill(0.0);
        p.add_grad_sum(&mut rng, 1, 1.0, &mut g);
        e_g2 += g.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        e_glg +=
            g.iter().zip(&p.lambda).map(|(&v, l)| l * f64::from(v) * f64::from(v)).sum::<f64>();
    }
    let (e_g2, e_glg) = (e_g2 / draws as f64, e_glg / draws as f64);
    let big_g: Vec<f64> = p.lambda.iter().zip(&p.e).map(|(l, e)| l * e).collect();
    let g_lg: f64 = big_g.iter().zip(&p.lambda).map(|(g, l)| l * g * g).sum();
    let b_simple_mc = (e_g2 - sq(&big_g)) / sq(&big_g);
    let b_noise_mc = (e_glg - g_lg) / g_lg;
    assert!(close(b_simple_mc, p.true_b_simple(), 0.03), "{b_simple_mc} vs {}", p.true_b_simple());
    assert!(close(b_noise_mc, p.b_noise(), 0.03), "{b_noise_mc} vs {}", p.b_noise());
    assert!(
        p.b_noise() < 0.9 * p.true_b_simple(),
        "with Λ = linspace(0.1, 3) the Hessian-weighted B_noise ({}) is well below B_simple ({})",
        p.b_noise(),
        p.true_b_simple()
    );
}

// ---- the estimator against closed form, ranks as threads ----

/// Local batches summing to `n` over `world` ranks, deliberately uneven.
fn uneven(n: usize, world: usize) -> Vec<usize> {
    let mut v = vec![n / world; world];
    for (r, b) in v.iter_mut().enumerate() {
        let shift = (r / 2 + 1) % 4;
        if r % 2 == 0 { *b += shift } else { *b -= shift }
    }
    if world % 2 == 1 {
        v[world - 1] = n - v[..world - 1].iter().sum::<usize>();
    }
    assert_eq!(v.iter().sum::<usize>(), n);
    v
}

fn ema_of(values: impl Iterator<Item = f64>, decay: f64) -> f64 {
    let (mut m, mut w) = (0.0, 0.0);
    for x in values {
        m = decay * m + (1.0 - decay) * x;
        w = decay * w + (1.0 - decay);
    }
    m / w
}

/// Measures `p` at world sizes 1 (5 uneven micro-batches), 2, 4 and 8 (uneven local batches,
/// n = 128), checks the smoothed B_simple (total and per group) within `tol` of the truth, and
/// that deliberately wrong estimators computed from the same steps are outside it.
fn validate(p: &dyn FrozenProblem, seed: u64) {
    let decay = 0.999;
    let steps = 6000;
    let n = 128;
    let d = p.dim();
    let groups = [(0, d / 3), (d / 3, d - d / 3)];
    let truth = p.true_b_simple();
    let tol = 0.05;
    for world in [1, 2, 4, 8] {
        let (local, micro) = if world == 1 { (vec![n], 5) } else { (uneven(n, world), 1) };
        let r = run_frozen_threads(p, &local, micro, steps, &groups, &cfg(decay), seed).unwrap();
        let last = r.last().unwrap();
        let k = last.samples as f64;
        assert_eq!(last.samples, world * micro);
        let est = last.b_simple.unwrap();
        eprintln!(
            "world {world}: B_simple {est:.3} (truth {truth:.3}, {:+.2}%)",
            100.0 * (est / truth - 1.0)
        );
        assert!(close(est, truth, tol), "world {world}: B_simple {est} vs true {truth}");
        for (i, &(o, l)) in groups.iter().enumerate() {
            let (got, want) = (last.group_b_simple[i].unwrap(), p.true_group_b_simple(o, l));
            assert!(close(got, want, 2.0 * tol), "world {world} group {i}: {got} vs {want}");
        }

        let s: Vec<f64> = r.iter().map(|x| x.trace_sigma.unwrap()).collect();
        let g: Vec<f64> = r.iter().map(|x| x.grad_sq.unwrap()).collect();
        // Our own EMA over the raw values reproduces the estimator's.
        let ours = ema_of(s.iter().copied(), decay) / ema_of(g.iter().copied(), decay);
        assert!(close(ours, est, 1e-9));
        // Wrong 1: |Ḡ|² taken for |G|² (no small-batch correction).
        let big: Vec<f64> = s.iter().zip(&g).map(|(s, g)| g + s / n as f64).collect();
        let wrong = ema_of(s.iter().copied(), decay) / ema_of(big.iter().copied(), decay);
        assert!(!close(wrong, truth, tol), "world {world}: uncorrected |Ḡ|² gives {wrong}");
        // Wrong 2: dividing by K instead of K − 1.
        let s_k: Vec<f64> = s.iter().map(|s| s * (k - 1.0) / k).collect();
        let g_k: Vec<f64> = big.iter().zip(&s_k).map(|(b, s)| b - s / n as f64).collect();
        let wrong = ema_of(s_k.into_iter(), decay) / ema_of(g_k.into_iter(), decay);
        assert!(!close(wrong, truth, tol), "world {world}: 1/K instead of 1/(K−1) gives {wrong}");
    }
}

#[test]
fn mean_estimation_b_simple_within_5_percent_at_worlds_1_2_4_8() {
    let p = MeanEstimation { d: 100, sigma: 1.0, dist: 1.0 };
    assert!(close(p.true_b_simple(), 100.0, 1e-12));
    validate(&p, 11);
}

#[test]
fn linear_regression_b_simple_within_5_percent_at_worlds_1_2_4_8() {
    let p = Regression::isotropic(30, 0.5, 1.0);
    assert!(close(p.true_b_simple(), 38.5, 1e-12));
    validate(&p, 12);
}

#[test]
fn anisotropic_regression_measures_b_simple_not_b_noise() {
    let p = anisotropic();
    let r = run_frozen_threads(&p, &uneven(128, 4), 1, 4000, &[(0, 50)], &cfg(0.998), 13).unwrap();
    let est = r.last().unwrap().b_simple.unwrap();
    assert!(close(est, p.true_b_simple(), 0.05), "{est} vs B_simple {}", p.true_b_simple());
    assert!(!close(est, p.b_noise(), 0.05), "{est} is close to B_noise {}", p.b_noise());
}

#[test]
fn averaging_per_step_ratios_is_wrong_at_small_batches() {
    // n = 32 ≪ B_simple = 100: 𝒢 is often negative and the mean of per-step ratios is far off,
    // while the ratio of the averages is right.
    let p = MeanEstimation { d: 100, sigma: 1.0, dist: 1.0 };
    let r = run_frozen_threads(&p, &[16, 16], 1, 6000, &[(0, 100)], &cfg(0.999), 14).unwrap();
    let truth = p.true_b_simple();
    let negative = r.iter().filter(|x| x.grad_sq.unwrap() < 0.0).count();
    assert!(negative > r.len() / 20, "only {negative} negative 𝒢 of {}", r.len());
    let ratios: Vec<f64> = r.iter().map(|x| x.trace_sigma.unwrap() / x.grad_sq.unwrap()).collect();
    let mean_ratio = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let smoothed_ratio = ema_of(ratios.iter().copied(), 0.999);
    for wrong in [mean_ratio, smoothed_ratio] {
        assert!(!close(wrong, truth, 0.05), "averaged ratios gave {wrong}, truth {truth}");
    }
    let est = r.last().unwrap().b_simple.unwrap();
    assert!(close(est, truth, 0.10), "ratio of averages {est} vs {truth}");
}

#[test]
fn cost_measurement_runs_on_every_rank() {
    let params = 1 << 18;
    let groups: Vec<(usize, usize)> = (0..8).map(|i| (i * params / 8, params / 8)).collect();
    let costs = ThreadComm::run_group(2, |_, c| measure_cost(c, params, &groups, 5, 20).unwrap());
    let c = &costs[0];
    eprintln!("{c:?}");
    assert_eq!((c.params, c.groups, c.reduce_every, c.iters), (params, 8, 5, 20));
    assert!(c.observe_s > 0.0 && c.finish_s > 0.0 && c.all_reduce_s > 0.0);
    assert!(c.overhead_vs_all_reduce.is_finite());
}

#[test]
fn statistics_can_ride_on_the_loss_all_reduce() {
    let samples = uneven_samples();
    let groups = [(0, 2), (2, 3)];
    let ranks: Vec<Vec<(Vec<f64>, usize)>> = samples.iter().map(|s| vec![s.clone()]).collect();
    let want = one_step(&ranks, &groups);
    let got = ThreadComm::run_group(3, |rank, comm| {
        let (g, b) = &samples[rank];
        let mut est = GnsEstimator::new(&cfg(0.0), &groups).unwrap();
        let mut buf: Vec<f32> = g.iter().map(|v| (v * *b as f64 / 10.0) as f32).collect();
        est.observe_local(&buf, *b, 10).unwrap();
        // [loss_partial, gns statistics...] in one f64 all-reduce.
        let mut s = vec![0.25];
        s.extend(est.local_stats().to_f64s());
        comm.all_reduce_f64(&mut s, ReduceOp::Sum).unwrap();
        assert_eq!(s[0], 0.75);
        comm.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap();
        let global = GlobalStats::from_f64s(&s[1..]).unwrap();
        est.update(&global, &buf, 10).unwrap()
    });
    assert_eq!(got[0], want);
    assert_eq!(GlobalStats::from_f64s(&[1.0]), None);
}

#[test]
fn batched_reduction_gives_the_same_reports_late() {
    let p = MeanEstimation { d: 12, sigma: 1.0, dist: 0.5 };
    let groups = [(0, 5), (5, 7)];
    let every = run_frozen_threads(&p, &[5, 3, 4], 2, 20, &groups, &cfg(0.9), 3).unwrap();
    let batched_cfg = GnsConfig { reduce_every: 7, ..cfg(0.9) };
    let batched = run_frozen_threads(&p, &[5, 3, 4], 2, 20, &groups, &batched_cfg, 3).unwrap();
    assert_eq!(every.len(), 20);
    assert_eq!(batched, every);

    // Reports come out every 7 steps; update() refuses to run past pending steps.
    let mut est = GnsEstimator::new(&batched_cfg, &[(0, 2)]).unwrap();
    let mut comms = ThreadComm::group(1);
    for step in 1..=7 {
        est.observe_accumulated(&[0.5, 0.25], 1, 2).unwrap();
        est.observe_accumulated(&[1.0, 0.0], 1, 2).unwrap();
        let r = est.finish_step(&mut comms[0], &[1.0, 0.0], 2).unwrap();
        assert_eq!(r.len(), if step == 7 { 7 } else { 0 }, "step {step}");
        assert_eq!(est.pending_steps(), step % 7);
    }
    est.observe_local(&[1.0, 0.0], 2, 2).unwrap();
    est.finish_step(&mut comms[0], &[1.0, 0.0], 2).unwrap();
    let stats = GlobalStats { samples: 2, examples: 2, weighted_sq: vec![1.0] };
    assert!(matches!(est.update(&stats, &[1.0, 0.0], 2), Err(GnsError::Pending { steps: 1 })));
    assert_eq!(est.flush(&mut comms[0]).unwrap().len(), 1);
    assert_eq!(est.flush(&mut comms[0]).unwrap().len(), 0);
}
