//! Data-parallel training with real rank processes: the default job learns, N ranks equal one
//! rank with the whole batch, and bad input is a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{read_f32, run, run_command, summary, tessera};

const LIMIT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn out_dir_arg(dir: &Path) -> String {
    format!("run.out_dir={:?}", dir.display().to_string())
}

fn train(nproc: usize, config: Option<&Path>, sets: &[&str], out: &Path) -> common::Finished {
    let f = run(run_command(nproc, config, sets, &[], out), LIMIT);
    assert!(f.status.success(), "tessera run --nproc {nproc} failed\n{}", f.all_output());
    f
}

/// max |a − b| / max |b|: the relative distance of two parameter vectors.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

#[test]
fn two_ranks_learn_the_synthetic_task_and_report_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let f = train(2, None, &["run.steps=80", "run.eval_every=40"], dir.path());
    let s = summary(&f);
    for key in ["steps", "loss", "recall@1", "recall@5", "samples_per_s"] {
        assert!(s.get(key).is_some(), "summary lacks {key}: {s}");
    }
    assert_eq!(s["steps"], 80);
    assert_eq!(s["world"], 2);
    let r1 = s["recall@1"].as_f64().unwrap();
    let chance = s["chance@1"].as_f64().unwrap();
    assert!(r1 > 20.0 * chance, "recall@1 {r1} is not well above chance {chance}");
    // Output files: metrics, the resolved config, the parameters.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 3, "{metrics}");
    assert!(dir.path().join("config.toml").exists());
    assert!(f.stderr.contains("[rank 1]") || f.stderr.contains("[rank 0]"), "no prefixed output");
}

fn equivalence(config: Option<&Path>, sets: &[&str], worlds: &[usize]) {
    let mut common_sets = vec!["run.steps=10", "run.eval_every=0"];
    common_sets.extend_from_slice(sets);
    let one = tempfile::tempdir().unwrap();
    train(1, config, &common_sets, one.path());
    let reference = read_f32(&one.path().join("params.f32"));
    // The parameters must have moved well beyond the tolerance, or equality proves nothing.
    let frozen = tempfile::tempdir().unwrap();
    let mut frozen_sets = common_sets.clone();
    frozen_sets.push("optim.lr=0.0");
    train(1, config, &frozen_sets, frozen.path());
    let moved = rel_diff(&read_f32(&frozen.path().join("params.f32")), &reference);
    assert!(moved > 1e-3, "10 steps moved the parameters by only {moved:e}");
    for &n in worlds {
        let many = tempfile::tempdir().unwrap();
        train(n, config, &common_sets, many.path());
        let params = read_f32(&many.path().join("params.f32"));
        let d = rel_diff(&params, &reference);
        assert!(d <= 1e-5, "{n} ranks vs 1 rank: relative parameter difference {d:e}");
    }
}

#[test]
fn dual_encoder_on_n_ranks_equals_one_rank_with_the_whole_batch() {
    // 64 rows: 4 ranks × 16 (even) and 3 ranks × 21/21/22 (uneven).
    equivalence(None, &["batch.global=64"], &[4, 3]);
}

#[test]
fn classifier_on_n_ranks_equals_one_rank_with_the_whole_batch() {
    let cfg = repo().join("examples/digits-classifier.toml");
    equivalence(Some(&cfg), &["batch.global=96"], &[4]);
}

#[test]
fn digits_contrastive_example_runs() {
    let cfg = repo().join("examples/digits-contrastive.toml");
    let dir = tempfile::tempdir().unwrap();
    let f = train(2, Some(&cfg), &["run.eval_every=0"], dir.path());
    let s = summary(&f);
    // Retrieval between two held-out augmentations of each test image (chance 1/297); the
    // k-NN probe is reported, but even random features of these digits score well on it.
    let r1 = s["recall@1"].as_f64().unwrap();
    assert!(r1 > 0.1, "recall@1 {r1}: {s}");
    assert!(s["knn_accuracy"].as_f64().unwrap() > 0.8, "{s}");
}

#[test]
fn a_config_typo_is_named_before_any_rank_starts() {
    let mut cmd = tessera();
    cmd.args(["run", "--nproc", "2", "--set", "optim.lrr=0.1"]);
    let f = run(cmd, LIMIT);
    assert!(!f.status.success());
    assert!(f.stderr.contains("lrr"), "{}", f.all_output());
    assert!(!f.stderr.contains("[rank"), "ranks were started: {}", f.all_output());
}

#[test]
fn shard_dimensions_that_do_not_match_the_model_are_a_clear_error() {
    let cfg = repo().join("examples/digits-classifier.toml");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tessera();
    cmd.args(["run", "--nproc", "1", "--config"]).arg(&cfg).args([
        "--set",
        "model.tower_a.input_dim=63",
        "--set",
        &out_dir_arg(dir.path()),
    ]);
    let f = run(cmd, LIMIT);
    assert!(!f.status.success());
    assert!(f.stderr.contains("model.tower_a.input_dim"), "{}", f.all_output());
}

#[test]
fn synth_shards_inspect_and_train_and_a_truncated_shard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    let mut cmd = tessera();
    cmd.args(["data", "synth", "--n-train", "3000", "--n-eval", "300", "--out"]).arg(&data);
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());

    let mut cmd = tessera();
    cmd.args(["data", "inspect"]).arg(data.join("train.shard"));
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(f.stdout.contains("paired") && f.stdout.contains("3000"), "{}", f.all_output());

    let train_set = format!("data.train={:?}", data.join("train.shard").display().to_string());
    let eval_set = format!("data.eval={:?}", data.join("eval.shard").display().to_string());
    let out = dir.path().join("run");
    let sets = ["data.source=\"shards\"", &train_set, &eval_set, "run.steps=20"];
    let s = summary(&train(2, None, &sets, &out));
    assert_eq!(s["eval_examples"], 300, "{s}");

    // A shard cut short: a clear error naming the file, before any training.
    let bytes = std::fs::read(data.join("train.shard")).unwrap();
    let cut = dir.path().join("cut.shard");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let cut_set = format!("data.train={:?}", cut.display().to_string());
    let mut cmd = tessera();
    cmd.args(["run", "--nproc", "2", "--set", "data.source=\"shards\"", "--set", &cut_set])
        .args(["--set", &out_dir_arg(&out)]);
    let f = run(cmd, LIMIT);
    assert!(!f.status.success());
    assert!(f.stderr.contains("cut.shard") && f.stderr.contains("truncated"), "{}", f.all_output());
}

#[test]
fn large_batch_optimizers_keep_ranks_bitwise_identical() {
    // Training ends with an all-gather of every rank's parameter hash and fails if any differ;
    // each optimizer must also match one rank with the whole batch.
    for name in ["lars", "tvlars-code", "lamb"] {
        let set = format!("optim.name={name:?}");
        let one = tempfile::tempdir().unwrap();
        let three = tempfile::tempdir().unwrap();
        let sets = [set.as_str(), "run.steps=10", "run.eval_every=0", "batch.global=60"];
        let a = summary(&train(1, None, &sets, one.path()));
        let b = summary(&train(3, None, &sets, three.path()));
        assert_eq!(b["world"], 3);
        let d = rel_diff(
            &read_f32(&three.path().join("params.f32")),
            &read_f32(&one.path().join("params.f32")),
        );
        assert!(d <= 1e-5, "{name}: 3 ranks vs 1 rank differ by {d:e} ({a} vs {b})");
    }
}

fn step_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()).filter(|_| v.get("eval").is_none()))
        .collect()
}

#[test]
fn tiled_ring_loss_follows_the_naive_loss_trajectory() {
    let naive = tempfile::tempdir().unwrap();
    let tiled = tempfile::tempdir().unwrap();
    let common = ["run.steps=30", "run.log_every=1", "run.eval_every=0", "batch.global=96"];
    let mut a = common.to_vec();
    a.push("loss.name=\"clip\"");
    let mut b = common.to_vec();
    b.extend(["loss.name=\"clip_tiled\"", "loss.tile_rows=16", "loss.tile_cols=8"]);
    train(3, None, &a, naive.path());
    train(3, None, &b, tiled.path());
    let (la, lb) = (step_losses(naive.path()), step_losses(tiled.path()));
    assert_eq!(la.len(), 30);
    for (k, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "step {}: naive {x} vs tiled {y}", k + 1);
    }
    let d = rel_diff(
        &read_f32(&tiled.path().join("params.f32")),
        &read_f32(&naive.path().join("params.f32")),
    );
    assert!(d <= 1e-4, "parameters after 30 steps differ by {d:e}");
}

#[test]
fn siglip_with_its_learnable_bias_on_n_ranks_equals_one_rank() {
    equivalence(None, &["batch.global=64", "loss.name=\"siglip\"", "optim.lr=0.01"], &[3]);
}

/// Trains 10 steps twice, without and with micro-batches, and compares the parameters.
fn micro_batches_change_nothing(nproc: usize, config: Option<&Path>, sets: &[&str], micro: &str) {
    let whole = tempfile::tempdir().unwrap();
    let split = tempfile::tempdir().unwrap();
    let mut a = vec!["run.steps=10", "run.eval_every=0"];
    a.extend_from_slice(sets);
    let mut b = a.clone();
    b.push(micro);
    train(nproc, config, &a, whole.path());
    let s = summary(&train(nproc, config, &b, split.path()));
    let d = rel_diff(
        &read_f32(&split.path().join("params.f32")),
        &read_f32(&whole.path().join("params.f32")),
    );
    assert!(d <= 1e-5, "{micro}: parameters differ by {d:e} ({s})");
}

#[test]
fn gradcache_replay_in_micro_batches_equals_the_whole_batch() {
    // 64 rows over 2 ranks, micro-batches of 7 (the last one short).
    micro_batches_change_nothing(2, None, &["batch.global=64"], "batch.micro=7");
    let sig = ["batch.global=64", "loss.name=\"siglip\"", "optim.lr=0.01"];
    micro_batches_change_nothing(2, None, &sig, "batch.micro=10");
    let cfg = repo().join("examples/digits-classifier.toml");
    micro_batches_change_nothing(2, Some(&cfg), &["batch.global=96"], "batch.micro=10");
}

#[test]
fn one_rank_measures_the_noise_scale_from_its_micro_batches() {
    let cfg = repo().join("examples/digits-classifier.toml");
    let dir = tempfile::tempdir().unwrap();
    let sets = ["run.steps=60", "batch.global=128", "batch.micro=32", "gns.reduce_every=1"];
    let s = summary(&train(1, Some(&cfg), &sets, dir.path()));
    let b = s["b_simple"].as_f64().unwrap_or_else(|| panic!("no b_simple at world 1: {s}"));
    assert!(b.is_finite() && b > 0.0, "{s}");
    // Without micro-batches one rank has a single group: no estimate, reported as null.
    let dir = tempfile::tempdir().unwrap();
    let s = summary(&train(1, Some(&cfg), &sets[..2], dir.path()));
    assert!(s["b_simple"].is_null(), "{s}");
}

#[test]
fn noise_scale_through_rank_processes_is_within_5_percent_of_the_closed_form() {
    for n in [1usize, 2, 4] {
        let mut cmd = tessera();
        cmd.args(["bench", "gns", "--nproc", &n.to_string(), "--json"]);
        let f = run(cmd, LIMIT);
        assert!(f.status.success(), "{}", f.all_output());
        let rows = common::json_rows(&f);
        assert_eq!(rows.len(), 2, "{}", f.all_output());
        for r in rows {
            let (truth, est) = (r["true_b_simple"].as_f64().unwrap(), r["estimate"].as_f64());
            let est = est.unwrap_or_else(|| panic!("no estimate: {r}"));
            assert!((est / truth - 1.0).abs() < 0.05, "{n} ranks: {r}");
        }
    }
}
