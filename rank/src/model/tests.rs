use super::*;
use crate::device::CpuDevice;
use crate::device::reference as r;
use crate::loss::{clip_loss_local, clip_loss_reference_f64, cross_entropy};

fn tower(
    input_dim: usize,
    width: usize,
    depth: usize,
    output_dim: usize,
    norm: Norm,
    act: Activation,
    residual: bool,
) -> TowerConfig {
    TowerConfig { input_dim, width, depth, output_dim, norm, activation: act, residual }
}

/// f64 reference forward of one tower with parameters `p`.
fn ref_tower(t: &Tower, p: &[f64], x: &[f64], batch: usize) -> Vec<f64> {
    let lin = |l: &Linear, h: &[f64]| {
        let mut y = r::matmul(
            h,
            &p[l.w..l.w + l.fan_in * l.fan_out],
            batch,
            l.fan_out,
            l.fan_in,
            false,
            false,
        );
        for row in y.chunks_exact_mut(l.fan_out) {
            for (v, b) in row.iter_mut().zip(&p[l.b..l.b + l.fan_out]) {
                *v += b;
            }
        }
        y
    };
    let unit = |u: &Unit, h: &[f64]| {
        let n = u.lin.fan_in;
        let z = match u.ln {
            Some((g, b)) => r::layernorm(h, &p[g..g + n], &p[b..b + n], batch, n, LN_EPS as f64),
            None => h.to_vec(),
        };
        let a: Vec<f64> = z
            .iter()
            .map(|&v| match t.cfg.activation {
                Activation::Gelu => r::gelu(v),
                Activation::Relu => v.max(0.0),
            })
            .collect();
        lin(&u.lin, &a)
    };
    let mut h = lin(&t.input, x);
    for u in &t.blocks {
        let y = unit(u, &h);
        if t.cfg.residual {
            h.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        } else {
            h = y;
        }
    }
    let y = unit(&t.head, &h);
    if t.normalize { r::l2_normalize(&y, batch, t.cfg.output_dim) } else { y }
}

fn inputs(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Contrastive model: analytic gradient of the CLIP loss (f32 path, split over `split` ranks)
/// vs finite differences of the f64 reference model + f64 reference loss.
fn check_contrastive(cfg: &ModelConfig, batch: usize, split: &[usize]) {
    let dev = CpuDevice::new(1);
    let mut m = Model::new(cfg, 5).unwrap();
    let ta = m.towers[0].clone();
    let tb = m.tower_b().clone();
    let xa = inputs(1, batch * ta.cfg.input_dim);
    let xb = inputs(2, batch * tb.cfg.input_dim);
    let d = m.output_dim();

    // Analytic: every "rank" runs its rows; gradients summed.
    let (fa, fb) = m.forward_pair(&dev, &xa, &xb, batch);
    let mut grads = vec![0.0f32; m.num_params()];
    let mut off = 0;
    for &b in split {
        let mut mr = m.clone();
        mr.zero_grads();
        let ia = ta.cfg.input_dim;
        let ib = tb.cfg.input_dim;
        mr.forward_pair(&dev, &xa[off * ia..(off + b) * ia], &xb[off * ib..(off + b) * ib], b);
        let out = clip_loss_local(&fa, &fb, batch, d, off, b, mr.logit_scale());
        mr.backward_pair(&dev, &out.d_img_local, &out.d_txt_local);
        mr.add_logit_scale_grad(out.d_t_partial);
        grads.iter_mut().zip(mr.grads()).for_each(|(g, v)| *g += v);
        off += b;
    }

    // f64 forward agrees with the f32 one.
    let p64 = r::to64(m.params());
    let (xa64, xb64) = (r::to64(&xa), r::to64(&xb));
    r::assert_close("feat_a", &fa, &ref_tower(&m.towers[0], &p64, &xa64, batch), 1e-5, 1e-4);
    r::assert_close("feat_b", &fb, &ref_tower(&tb, &p64, &xb64, batch), 1e-5, 1e-4);

    let t_off = m.t_offset.unwrap();
    let loss = |p: &[f64]| {
        let a = ref_tower(&m.towers[0], p, &xa64, batch);
        let b = ref_tower(&tb, p, &xb64, batch);
        clip_loss_reference_f64(&a, &b, batch, d, p[t_off].exp()).0
    };
    let fd = r::fd_grad(loss, &p64, 1e-6);
    let fd: Vec<f64> = fd
        .iter()
        .zip(&m.groups_trainable_mask())
        .map(|(&g, &tr)| if tr { g } else { 0.0 })
        .collect();
    r::assert_close("model grad", &grads, &fd, 2e-5, 2e-3);
}

impl Model {
    fn groups_trainable_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.num_params()];
        for g in &self.groups {
            mask[g.offset..g.offset + g.len].fill(g.trainable);
        }
        mask
    }
}

fn dual(a: TowerConfig, b: TowerConfig) -> ModelConfig {
    ModelConfig {
        kind: ModelKind::Dual,
        tower_a: a,
        tower_b: b,
        logit_scale_init: 1.2,
        ..ModelConfig::default()
    }
}

#[test]
fn dual_residual_layernorm_gelu_gradient() {
    let cfg = dual(
        tower(5, 6, 2, 4, Norm::LayerNorm, Activation::Gelu, true),
        tower(3, 7, 1, 4, Norm::LayerNorm, Activation::Gelu, true),
    );
    check_contrastive(&cfg, 5, &[5]);
    check_contrastive(&cfg, 5, &[2, 3]);
}

#[test]
fn dual_plain_relu_no_norm_gradient() {
    let cfg = dual(
        tower(4, 6, 1, 3, Norm::None, Activation::Relu, false),
        tower(4, 5, 0, 3, Norm::None, Activation::Gelu, false),
    );
    check_contrastive(&cfg, 4, &[1, 1, 2]);
}

#[test]
fn shared_tower_gradient() {
    let cfg = ModelConfig {
        kind: ModelKind::Shared,
        tower_a: tower(4, 5, 2, 3, Norm::LayerNorm, Activation::Gelu, true),
        logit_scale_init: 0.7,
        ..ModelConfig::default()
    };
    check_contrastive(&cfg, 4, &[4]);
    check_contrastive(&cfg, 4, &[3, 1]);
}

#[test]
fn frozen_tower_b_gets_no_gradient() {
    let mut cfg = dual(
        tower(4, 5, 1, 3, Norm::LayerNorm, Activation::Gelu, true),
        tower(2, 5, 1, 3, Norm::LayerNorm, Activation::Relu, false),
    );
    cfg.freeze_b = true;
    check_contrastive(&cfg, 4, &[4]);
    let m = Model::new(&cfg, 1).unwrap();
    let groups = m.param_groups();
    assert!(groups.iter().filter(|g| g.name.starts_with("b.")).all(|g| !g.trainable));
    assert!(groups.iter().filter(|g| !g.name.starts_with("b.")).all(|g| g.trainable));
}

#[test]
fn classifier_gradient_and_predict() {
    let cfg = ModelConfig {
        kind: ModelKind::Classifier,
        tower_a: tower(5, 6, 2, 4, Norm::LayerNorm, Activation::Gelu, true),
        num_classes: Some(4),
        ..ModelConfig::default()
    };
    let dev = CpuDevice::new(1);
    let mut m = Model::new(&cfg, 3).unwrap();
    let batch = 6;
    let x = inputs(4, batch * 5);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 4).collect();
    let logits = m.forward_logits(&dev, &x, batch);
    assert_eq!(logits, m.predict(&dev, &x, batch));
    let ce = cross_entropy(&logits, &labels, batch, batch);
    m.backward_logits(&dev, &ce.d_logits);
    let p64 = r::to64(m.params());
    let x64 = r::to64(&x);
    let tower = m.towers[0].clone();
    r::assert_close("logits", &logits, &ref_tower(&tower, &p64, &x64, batch), 1e-5, 1e-4);
    let fd = r::fd_grad(
        |p| r::xent_sum(&ref_tower(&tower, p, &x64, batch), &labels, batch, 4) / batch as f64,
        &p64,
        1e-6,
    );
    r::assert_close("classifier grad", m.grads(), &fd, 2e-5, 2e-3);
    assert_eq!(m.logit_scale(), 1.0);
}

#[test]
fn backward_accumulates() {
    let cfg = dual(
        tower(3, 4, 1, 2, Norm::LayerNorm, Activation::Gelu, true),
        tower(3, 4, 1, 2, Norm::LayerNorm, Activation::Gelu, true),
    );
    let dev = CpuDevice::new(1);
    let mut m = Model::new(&cfg, 1).unwrap();
    let (xa, xb) = (inputs(1, 6), inputs(2, 6));
    let g = inputs(3, 4);
    m.forward_pair(&dev, &xa, &xb, 2);
    m.backward_pair(&dev, &g, &g);
    let once = m.grads().to_vec();
    m.forward_pair(&dev, &xa, &xb, 2);
    m.backward_pair(&dev, &g, &g);
    for (a, b) in m.grads().iter().zip(&once) {
        assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0));
    }
    assert!(once.iter().any(|v| *v != 0.0));
    m.zero_grads();
    assert!(m.grads().iter().all(|v| *v == 0.0));
}

#[test]
fn init_is_deterministic_and_seeded() {
    let cfg = ModelConfig::default();
    let a = Model::new(&cfg, 42).unwrap();
    let b = Model::new(&cfg, 42).unwrap();
    let c = Model::new(&cfg, 43).unwrap();
    assert_eq!(a.params(), b.params());
    assert_ne!(a.params(), c.params());
    assert!((a.logit_scale() - 1.0 / 0.07).abs() < 1e-3);
    // Embeddings are unit vectors and identical between the training and inference paths.
    let dev = CpuDevice::new(2);
    let mut a = a;
    let x = inputs(7, 3 * 32);
    let (fa, fb) = a.forward_pair(&dev, &x, &x, 3);
    assert_eq!(fa, a.embed_a(&dev, &x, 3));
    assert_eq!(fb, a.embed_b(&dev, &x, 3));
    for row in fa.chunks_exact(32) {
        assert!((row.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn groups_cover_the_buffer_exactly_once() {
    for kind in [ModelKind::Dual, ModelKind::Shared, ModelKind::Classifier] {
        for norm in [Norm::LayerNorm, Norm::None] {
            let mut cfg = ModelConfig { kind, ..ModelConfig::default() };
            cfg.tower_a.norm = norm;
            cfg.tower_b = tower(7, 9, 3, cfg.tower_a.output_dim, norm, Activation::Relu, false);
            let m = Model::new(&cfg, 0).unwrap();
            let groups = m.param_groups();
            let mut next = 0;
            for g in &groups {
                assert_eq!(g.offset, next, "{}", g.name);
                assert_eq!(g.len, g.shape.iter().product::<usize>(), "{}", g.name);
                next += g.len;
            }
            assert_eq!(next, m.params().len());
            assert_eq!(m.grads().len(), m.params().len());
            let names: std::collections::HashSet<_> = groups.iter().map(|g| &g.name).collect();
            assert_eq!(names.len(), groups.len());
            let t = groups.iter().filter(|g| g.name == "logit_scale").count();
            assert_eq!(t, usize::from(kind != ModelKind::Classifier));
            assert_eq!(groups.iter().any(|g| g.name.starts_with("b.")), kind == ModelKind::Dual);
            if let Some(g) = groups.iter().find(|g| g.name == "logit_scale") {
                assert!(g.shape.is_empty() && g.len == 1);
            }
        }
    }
}

#[test]
fn logit_scale_clamp_and_grad() {
    let mut m = Model::new(&ModelConfig::default(), 0).unwrap();
    let o = m.t_offset.unwrap();
    m.params_mut()[o] = 10.0;
    m.clamp_logit_scale();
    assert!((m.logit_scale() - 100.0).abs() < 1e-3);
    m.params_mut()[o] = 1.0;
    m.clamp_logit_scale();
    assert_eq!(m.logit_scale_param(), 1.0);
    m.add_logit_scale_grad(0.25);
    m.add_logit_scale_grad(0.5);
    assert_eq!(m.grads()[o], 0.75);
}

#[test]
fn bad_configs_are_clear_errors() {
    let mut cfg = ModelConfig::default();
    cfg.tower_b.output_dim = 7;
    let e = Model::new(&cfg, 0).unwrap_err();
    assert!(matches!(e, ModelError::OutputMismatch { a: 32, b: 7 }), "{e}");
    assert!(e.to_string().contains("tower_b.output_dim = 7"));

    let mut cfg = ModelConfig::default();
    cfg.tower_a.width = 0;
    assert_eq!(
        Model::new(&cfg, 0).unwrap_err(),
        ModelError::ZeroDim { tower: "tower_a", field: "width" }
    );

    let cfg = ModelConfig {
        kind: ModelKind::Classifier,
        num_classes: Some(10),
        ..ModelConfig::default()
    };
    assert!(matches!(Model::new(&cfg, 0), Err(ModelError::ClassMismatch { .. })));

    let cfg = ModelConfig { kind: ModelKind::Shared, freeze_b: true, ..ModelConfig::default() };
    assert!(matches!(Model::new(&cfg, 0), Err(ModelError::FreezeNeedsDual { .. })));

    let cfg = ModelConfig { logit_scale_init: 5.0, ..ModelConfig::default() };
    assert!(matches!(Model::new(&cfg, 0), Err(ModelError::LogitScale { .. })));

    // Shared and classifier ignore tower_b, even an invalid one.
    let mut cfg = ModelConfig { kind: ModelKind::Shared, ..ModelConfig::default() };
    cfg.tower_b.input_dim = 0;
    assert!(Model::new(&cfg, 0).is_ok());
}

#[test]
fn config_from_toml() {
    let cfg: ModelConfig = toml::from_str(
        r#"
        kind = "dual"
        freeze_b = true
        [tower_a]
        input_dim = 16
        width = 64
        depth = 1
        output_dim = 8
        norm = "none"
        activation = "relu"
        residual = false
        [tower_b]
        input_dim = 12
        output_dim = 8
        "#,
    )
    .unwrap();
    assert_eq!(cfg.tower_a.norm, Norm::None);
    assert_eq!(cfg.tower_a.activation, Activation::Relu);
    assert_eq!(cfg.tower_b.width, TowerConfig::default().width);
    assert!((cfg.logit_scale_init - (1.0f32 / 0.07).ln()).abs() < 1e-6);
    assert_eq!(cfg.logit_scale_max, 100.0);
    assert!(Model::new(&cfg, 0).is_ok());
    let err = toml::from_str::<ModelConfig>("kind = \"dual\"\nwidht = 3").unwrap_err();
    assert!(err.to_string().contains("widht"), "{err}");
    let err = toml::from_str::<ModelConfig>("[tower_a]\nnorm = \"batchnorm\"").unwrap_err();
    assert!(err.to_string().contains("batchnorm"), "{err}");
}

fn names_where(m: &Model, trainable: bool) -> Vec<String> {
    m.param_groups().into_iter().filter(|g| g.trainable == trainable).map(|g| g.name).collect()
}

/// `model.freeze` names tensors, or prefixes ending at a dot; `freeze_b` and a frozen logit
/// bias add theirs.
#[test]
fn freeze_marks_the_named_tensors() {
    let mut cfg = dual(
        tower(3, 4, 2, 2, Norm::LayerNorm, Activation::Gelu, true),
        tower(3, 4, 0, 2, Norm::LayerNorm, Activation::Gelu, true),
    );
    cfg.freeze = vec!["a.blocks.1".into(), "b.out.ln.gamma".into(), "logit_scale".into()];
    let frozen = names_where(&Model::new(&cfg, 0).unwrap(), false);
    let want = [
        "a.blocks.1.ln.gamma",
        "a.blocks.1.ln.beta",
        "a.blocks.1.weight",
        "a.blocks.1.bias",
        "b.out.ln.gamma",
        "logit_scale",
    ];
    assert_eq!(frozen, want);
    // "a.blocks.1" is not a prefix of "a.blocks.10": a prefix ends at a dot.
    let mut deep = cfg.clone();
    deep.tower_a.depth = 11;
    let frozen = names_where(&Model::new(&deep, 0).unwrap(), false);
    assert_eq!(frozen, want, "depth 11");

    cfg.freeze = vec!["b".into()];
    let by_name = Model::new(&cfg, 0).unwrap().param_groups();
    cfg.freeze = Vec::new();
    cfg.freeze_b = true;
    assert_eq!(by_name, Model::new(&cfg, 0).unwrap().param_groups(), "\"b\" is freeze_b");
}

/// Each case's frozen tensors get no gradient, and every other tensor bitwise the gradient it
/// gets when nothing is frozen: the backward passes the gradient down through frozen layers
/// while a layer below trains, and stops at the lowest one that does. One case is also checked
/// against finite differences of the f64 reference.
#[test]
fn frozen_tensors_get_no_gradient_and_the_rest_the_whole_models() {
    let full = dual(
        tower(3, 5, 3, 4, Norm::LayerNorm, Activation::Gelu, true),
        tower(2, 5, 2, 4, Norm::None, Activation::Relu, false),
    );
    let all = Model::new(&full, 7).unwrap();
    let weights: Vec<String> = all
        .param_groups()
        .into_iter()
        .filter(|g| g.name.ends_with(".weight"))
        .map(|g| g.name)
        .collect();
    let cases: Vec<Vec<String>> = [
        // a linear probe of tower a (the head and its LayerNorm train)
        vec!["a.in", "a.blocks"],
        // the top block and the head of tower a
        vec!["a.in", "a.blocks.0", "a.blocks.1"],
        // frozen layers between trainable ones, with and without a residual stream
        vec!["a.blocks.1", "b.blocks.0"],
        // single tensors, and a fixed temperature
        vec!["a.out.ln.gamma", "a.in.bias", "b.blocks.1.weight", "logit_scale"],
        // a frozen tower a
        vec!["a"],
    ]
    .into_iter()
    .map(|c| c.into_iter().map(String::from).collect())
    .chain([weights]) // BitFit: only the biases and LayerNorms train
    .collect();

    let dev = CpuDevice::new(1);
    let batch = 4;
    let (xa, xb) = (inputs(1, batch * 3), inputs(2, batch * 2));
    let (ga, gb) = (inputs(3, batch * 4), inputs(4, batch * 4));
    let grads = |m: &mut Model| {
        m.forward_pair(&dev, &xa, &xb, batch);
        m.backward_pair(&dev, &ga, &gb);
        m.add_logit_scale_grad(0.375);
        m.grads().to_vec()
    };
    let want = grads(&mut all.clone());
    for freeze in cases {
        let cfg = ModelConfig { freeze: freeze.clone(), ..full.clone() };
        let mut m = Model::new(&cfg, 7).unwrap();
        assert_eq!(m.params(), all.params(), "{freeze:?}: the initialisation");
        let got = grads(&mut m);
        // GradCache's replay (the forward without features) gives the same gradient.
        m.zero_grads();
        m.forward_for_backward(&dev, &xa, &xb, batch);
        m.backward_pair(&dev, &ga, &gb);
        m.add_logit_scale_grad(0.375);
        assert!(
            m.grads().iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{freeze:?}: the replay's gradient"
        );
        let groups = m.param_groups();
        assert!(groups.iter().any(|g| !g.trainable) && groups.iter().any(|g| g.trainable));
        for g in groups {
            let (got, want) = (&got[g.offset..g.offset + g.len], &want[g.offset..g.offset + g.len]);
            if g.trainable {
                assert!(
                    got.iter().zip(want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{freeze:?}: {} differs from the whole model's gradient",
                    g.name
                );
                assert!(got.iter().any(|v| *v != 0.0), "{freeze:?}: {} has no gradient", g.name);
            } else {
                assert!(got.iter().all(|v| *v == 0.0), "{freeze:?}: frozen {} moved", g.name);
            }
        }
    }
    let probe = ModelConfig { freeze: vec!["a.blocks.1".into(), "b.in".into()], ..full };
    check_contrastive(&probe, 4, &[1, 3]);
}

#[test]
fn freeze_entries_that_name_nothing_are_refused() {
    let base = ModelConfig { kind: ModelKind::Shared, ..ModelConfig::default() };
    let refused = |freeze: &[&str]| {
        let cfg =
            ModelConfig { freeze: freeze.iter().map(|s| s.to_string()).collect(), ..base.clone() };
        let e = Model::new(&cfg, 0).unwrap_err();
        assert!(matches!(e, ModelError::Freeze(_)), "{freeze:?}: {e}");
        let e = e.to_string();
        assert_eq!(cfg.validate().unwrap_err().to_string(), e, "validate() refuses as new()");
        e
    };
    let e = refused(&["a.outer"]);
    assert!(e.contains("\"a.outer\" names no tensor") && e.contains("a.out.weight"), "{e}");
    let e = refused(&["b"]);
    assert!(e.contains("its towers and scalars: a, logit_scale"), "{e}");
    assert!(refused(&["a.blocks."]).contains("prefix ending at a dot"));
    assert!(refused(&["a.in.w"]).contains("a.in.weight"));
    let e = refused(&["a", "logit_scale"]);
    assert!(e.contains("no tensor of this model is left to train"), "{e}");
    // A classifier has no logit scale: a frozen tower a leaves nothing.
    let cfg = ModelConfig {
        kind: ModelKind::Classifier,
        freeze: vec!["a".into()],
        ..ModelConfig::default()
    };
    assert!(Model::new(&cfg, 0).unwrap_err().to_string().contains("left to train"));
    let ok = ModelConfig { freeze: vec!["a.in".into(), "logit_scale".into()], ..base };
    assert_eq!(ok.validate(), Ok(()));
}

/// The parameter count is worked out before the layout is built, equal to the layout's, and a
/// model beyond any rank's memory is refused at once with its true size (no overflow, no
/// hour spent listing a hundred million blocks).
#[test]
fn the_parameter_count_is_checked_before_the_layout_is_built() {
    for (kind, norm, depth, logit_bias) in [
        (ModelKind::Dual, Norm::LayerNorm, 2, None),
        (ModelKind::Dual, Norm::None, 0, Some(-10.0)),
        (ModelKind::Shared, Norm::LayerNorm, 3, None),
        (ModelKind::Classifier, Norm::None, 1, None),
    ] {
        let t = |i, o| tower(i, 6, depth, o, norm, Activation::Gelu, true);
        let cfg = ModelConfig {
            kind,
            tower_a: t(5, 4),
            tower_b: t(7, 4),
            num_classes: None,
            logit_bias_init: logit_bias,
            ..ModelConfig::default()
        };
        let towers = tower_params(&cfg.tower_a)
            + if kind == ModelKind::Dual { tower_params(&cfg.tower_b) } else { 0 };
        let scalars =
            if kind == ModelKind::Classifier { 0 } else { 1 + logit_bias.is_some() as u128 };
        assert_eq!(towers + scalars, Model::new(&cfg, 0).unwrap().num_params() as u128, "{kind:?}");
    }
    let huge = |f: &dyn Fn(&mut TowerConfig)| {
        let mut cfg = ModelConfig::default();
        f(&mut cfg.tower_a);
        let started = std::time::Instant::now();
        let e = cfg.validate().unwrap_err();
        assert!(started.elapsed().as_secs_f64() < 1.0, "the refusal took {:?}", started.elapsed());
        e
    };
    // 10¹⁰ × 10¹⁰ overflows u64: the count is still the true one.
    let e = huge(&|t| t.width = 10_000_000_000);
    assert!(matches!(e, ModelError::TooLarge(n) if n > 100_000_000_000_000_000_000), "{e}");
    let e = huge(&|t| t.depth = 100_000_000).to_string();
    assert!(e.contains("more than one rank can hold") && e.contains("model.tower_a"), "{e}");
    let e = ModelError::OutOfMemory { params: 10_000_000_000, what: "the parameters" };
    assert!(e.to_string().contains("allocating their 40.0 GB (the parameters) failed"), "{e}");
}
