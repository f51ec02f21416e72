//! The model on a device whose buffers are not `Vec`s: the contract a GPU needs, checked on
//! the CPU with [`Tracked`] (crate::device::tracked).

use super::*;
use crate::device::CpuDevice;
use crate::device::tracked::Tracked;
use crate::optim::{Optimizer, cases};

fn inputs(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}[{i}]: {x} vs {y}");
    }
}

/// Two training steps of `cfg` on [`Tracked`] and on the CPU device: bitwise the same
/// features and gradients; only the host inputs of each step (2 views, 2 feature gradients)
/// are kernel arguments outside the device's buffers; nothing is dirty when a method returns or
/// when a layer's gradient is reported.
fn contrastive_on_tracked(cfg: &ModelConfig, batch: usize) {
    let cpu = CpuDevice::new(1);
    let dev = Tracked::new();
    let mut host = Model::new(cfg, 9).unwrap();
    let mut on_dev = host.clone().into_device(&dev);
    same_bits("params", on_dev.params(), host.params());
    let xa = inputs(1, batch * cfg.tower_a.input_dim);
    let b_dim =
        if cfg.kind == ModelKind::Dual { cfg.tower_b.input_dim } else { cfg.tower_a.input_dim };
    let xb = inputs(2, batch * b_dim);
    let d = cfg.tower_a.output_dim;
    let (ga, gb) = (inputs(3, batch * d), inputs(4, batch * d));
    let frozen_b = !host.tower_b().trains();
    let mut layers = Vec::new();
    for step in 0..2 {
        host.zero_grads();
        on_dev.zero_grads();
        let (fa, fb) = host.forward_pair(&cpu, &xa, &xb, batch);
        host.backward_pair(&cpu, &ga, &gb);

        let foreign0 = dev.foreign();
        let (da, db) = on_dev.forward_pair(&dev, &xa, &xb, batch);
        assert_eq!(dev.dirty(), 0, "step {step}: forward_pair returned with kernels pending");
        let mut reported = Vec::new();
        on_dev.backward_pair_with(&dev, &ga, &gb, &mut |o, g| {
            assert_eq!(dev.dirty(), 0, "a layer's gradient was reported with kernels pending");
            reported.push(o..o + g.len());
        });
        assert!(!reported.is_empty());
        layers = reported;
        assert_eq!(dev.dirty(), 0, "step {step}: backward_pair returned with kernels pending");
        // The views are uploaded once each; each trained tower reads its feature gradient.
        let want = 2 + if frozen_b { 1 } else { 2 };
        assert_eq!(dev.foreign() - foreign0, want, "step {step}: kernel arguments in host memory");
        same_bits("features a", &da, &fa);
        same_bits("features b", &db, &fb);
        same_bits("gradients", on_dev.grads(), host.grads());
    }
    // With no consumer of the layers' gradients the backward only queues kernels and waits
    // once, at its end (a GPU's host does not stall per layer).
    host.zero_grads();
    on_dev.zero_grads();
    host.forward_pair(&cpu, &xa, &xb, batch);
    host.backward_pair(&cpu, &ga, &gb);
    on_dev.forward_pair(&dev, &xa, &xb, batch);
    let syncs0 = dev.ledger().syncs;
    on_dev.backward_pair(&dev, &ga, &gb);
    assert_eq!(dev.ledger().syncs - syncs0, 1, "backward_pair waited per layer");
    assert_eq!(dev.dirty(), 0, "backward_pair returned with kernels pending");
    same_bits("gradients (no reports)", on_dev.grads(), host.grads());
    // Reports without waiting: the same layers in the same order, and still one wait at the
    // end (the consumer orders itself after the device's stream).
    on_dev.zero_grads();
    on_dev.forward_pair(&dev, &xa, &xb, batch);
    let syncs0 = dev.ledger().syncs;
    let (mut queued, mut pending) = (Vec::new(), 0);
    on_dev.backward_pair_queued(&dev, &ga, &gb, &mut |o, g| {
        queued.push(o..o + g.len());
        pending += usize::from(dev.dirty() > 0);
    });
    assert_eq!(dev.ledger().syncs - syncs0, 1, "backward_pair_queued waited per layer");
    assert_eq!(pending, queued.len(), "a layer was reported after a wait");
    assert_eq!(queued, layers, "the layers reported without waiting");
    assert_eq!(dev.dirty(), 0, "backward_pair_queued returned with kernels pending");
    same_bits("gradients (queued reports)", on_dev.grads(), host.grads());
    // Inference uploads its input and reads nothing stale.
    let foreign0 = dev.foreign();
    same_bits("embed_a", &on_dev.embed_a(&dev, &xa, batch), &host.embed_a(&cpu, &xa, batch));
    same_bits("embed_b", &on_dev.embed_b(&dev, &xb, batch), &host.embed_b(&cpu, &xb, batch));
    assert_eq!(dev.foreign() - foreign0, 2);
    assert_eq!(dev.dirty(), 0);
    drop(on_dev);
    assert!(dev.ledger().live.is_empty(), "the model's device buffers outlived it");
}

fn tower(depth: usize, norm: Norm, activation: Activation, residual: bool) -> TowerConfig {
    TowerConfig { input_dim: 7, width: 12, depth, output_dim: 5, norm, activation, residual }
}

#[test]
fn dual_encoder_runs_in_device_buffers() {
    let cfg = ModelConfig {
        tower_a: tower(2, Norm::LayerNorm, Activation::Gelu, true),
        tower_b: tower(1, Norm::None, Activation::Relu, false),
        ..ModelConfig::default()
    };
    contrastive_on_tracked(&cfg, 6);
}

#[test]
fn lit_with_a_frozen_tower_runs_in_device_buffers() {
    let cfg = ModelConfig {
        tower_a: tower(1, Norm::LayerNorm, Activation::Gelu, true),
        tower_b: tower(0, Norm::LayerNorm, Activation::Gelu, true),
        freeze_b: true,
        ..ModelConfig::default()
    };
    contrastive_on_tracked(&cfg, 5);
}

#[test]
fn shared_tower_runs_in_device_buffers() {
    let cfg = ModelConfig {
        kind: ModelKind::Shared,
        tower_a: tower(2, Norm::LayerNorm, Activation::Relu, true),
        ..ModelConfig::default()
    };
    contrastive_on_tracked(&cfg, 4);
}

#[test]
fn classifier_runs_in_device_buffers() {
    let cfg = ModelConfig {
        kind: ModelKind::Classifier,
        tower_a: tower(2, Norm::LayerNorm, Activation::Gelu, true),
        ..ModelConfig::default()
    };
    let (cpu, dev) = (CpuDevice::new(1), Tracked::new());
    let mut host = Model::new(&cfg, 2).unwrap();
    let mut on_dev = host.clone().into_device(&dev);
    let batch = 6;
    let x = inputs(5, batch * 7);
    let g = inputs(6, batch * 5);
    let foreign0 = dev.foreign();
    let y = on_dev.forward_logits(&dev, &x, batch);
    assert_eq!(dev.dirty(), 0);
    let syncs0 = dev.ledger().syncs;
    on_dev.backward_logits(&dev, &g);
    assert_eq!(dev.ledger().syncs - syncs0, 1, "backward_logits waits once, at its end");
    assert_eq!(dev.dirty(), 0);
    assert_eq!(dev.foreign() - foreign0, 2, "the input and the logits' gradient");
    same_bits("logits", &y, &host.forward_logits(&cpu, &x, batch));
    host.backward_logits(&cpu, &g);
    same_bits("gradients", on_dev.grads(), host.grads());
    same_bits("predict", &on_dev.predict(&dev, &x, batch), &y);
    assert_eq!(dev.dirty(), 0);
}

/// Every optimizer variant with its state in [`Tracked`] buffers and its passes run through the
/// device: bitwise the host optimizer's parameters, state and statistics over five steps (with
/// a restore from the host optimizer's state in between), no argument outside the device's
/// buffers, nothing pending when a step returns, and no buffer outliving the optimizer.
#[test]
fn optimizer_runs_in_device_buffers() {
    let groups = cases::model_groups();
    let n = 95;
    for c in cases::variants() {
        let dev = Tracked::new();
        let mut host = Optimizer::new(&c, groups.clone()).unwrap();
        let mut on_dev = Optimizer::new(&c, groups.clone()).unwrap().into_device(&dev);
        let mut p = inputs(21, n);
        let mut p_dev = dev.alloc(n);
        let mut g_dev = dev.alloc(n);
        dev.synchronize();
        p_dev.copy_from_slice(&p);
        for step in 0..5u64 {
            let g = inputs(30 + step, n);
            g_dev.copy_from_slice(&g);
            let lr = 0.1 * (step + 1) as f64;
            let foreign0 = dev.foreign();
            let want = host.step(&mut p, &g, lr, step);
            let got = on_dev.step_on(&dev, &mut p_dev, &g_dev, lr, step);
            let what = format!("{} step {step}", c.name);
            assert_eq!(dev.foreign(), foreign0, "{what}: arguments outside the device");
            assert_eq!(dev.dirty(), 0, "{what}: returned with kernels pending");
            assert_eq!(got, want, "{what}: statistics");
            same_bits(&what, &p_dev, &p);
            same_bits(&what, on_dev.velocity(), host.velocity());
            if step == 2 {
                on_dev.load_state(&host.state_bytes()).unwrap();
                assert_eq!(on_dev.state_bytes(), host.state_bytes(), "{what}: restore");
            }
        }
        drop((on_dev, p_dev, g_dev));
        assert!(dev.ledger().live.is_empty(), "{}: device buffers outlived the optimizer", c.name);
    }
}

/// Partly frozen towers (a frozen input layer, a frozen LayerNorm gain, a frozen block) in
/// device buffers: the spare buffers of frozen γ and β follow the same contract.
#[test]
fn partly_frozen_towers_run_in_device_buffers() {
    let cfg = ModelConfig {
        tower_a: tower(2, Norm::LayerNorm, Activation::Gelu, true),
        tower_b: tower(1, Norm::LayerNorm, Activation::Relu, false),
        freeze: ["a.in", "a.blocks.0.ln.gamma", "a.out.ln.beta", "b.blocks.0"]
            .map(String::from)
            .to_vec(),
        ..ModelConfig::default()
    };
    contrastive_on_tracked(&cfg, 5);
}

/// A training forward keeps the activations of the layers its backward runs only: a linear
/// probe of a depth-2 classifier keeps the head's, and neither the input nor the two blocks'
/// (`batch × (3·width + 2)` values each: the block's input, LayerNorm output, activation, mean
/// and rstd).
#[test]
fn a_linear_probe_keeps_the_heads_activations_only() {
    let (batch, input_dim, width) = (6, 7, 12);
    let kept_bytes = |freeze: &[&str]| {
        let cfg = ModelConfig {
            kind: ModelKind::Classifier,
            tower_a: tower(2, Norm::LayerNorm, Activation::Gelu, true),
            freeze: freeze.iter().map(|s| s.to_string()).collect(),
            ..ModelConfig::default()
        };
        let dev = Tracked::new();
        let mut m = Model::new(&cfg, 2).unwrap().into_device(&dev);
        let before: usize = dev.ledger().live.values().sum();
        m.forward_logits(&dev, &inputs(5, batch * input_dim), batch);
        let after: usize = dev.ledger().live.values().sum();
        after - before
    };
    let full = kept_bytes(&[]);
    let probe = kept_bytes(&["a.in", "a.blocks"]);
    assert_eq!(full - probe, 4 * (batch * input_dim + 2 * batch * (3 * width + 2)));
    assert_eq!(kept_bytes(&["a.in"]), full - 4 * batch * input_dim, "the input only");
}

/// The backward ends at the lowest layer that trains: a classifier of depth 2 runs 7 GEMMs
/// (the input layer's dW; dW and dX of both blocks and the head), a linear probe 2 (the
/// head's dW, and its dX for the head's LayerNorm), or 1 with that LayerNorm frozen too.
#[test]
fn the_backward_stops_below_the_lowest_trainable_layer() {
    let cases: [(&[&str], usize); 5] = [
        (&[], 7),
        (&["a.in"], 6),
        (&["a.in", "a.blocks.0"], 4),
        (&["a.in", "a.blocks"], 2),
        (&["a.in", "a.blocks", "a.out.ln"], 1),
    ];
    for (freeze, want) in cases {
        let cfg = ModelConfig {
            kind: ModelKind::Classifier,
            tower_a: tower(2, Norm::LayerNorm, Activation::Gelu, true),
            freeze: freeze.iter().map(|s| s.to_string()).collect(),
            ..ModelConfig::default()
        };
        let cpu = CpuDevice::new(1);
        let dev = Tracked::new();
        let mut host = Model::new(&cfg, 2).unwrap();
        let mut on_dev = host.clone().into_device(&dev);
        let batch = 6;
        let x = inputs(5, batch * 7);
        let g = inputs(6, batch * 5);
        on_dev.forward_logits(&dev, &x, batch);
        let gemms0 = dev.ledger().gemms;
        on_dev.backward_logits(&dev, &g);
        assert_eq!(dev.ledger().gemms - gemms0, want, "{freeze:?}: GEMMs in the backward");
        assert_eq!(dev.dirty(), 0);
        host.forward_logits(&cpu, &x, batch);
        host.backward_logits(&cpu, &g);
        same_bits("gradients", on_dev.grads(), host.grads());
    }
}
