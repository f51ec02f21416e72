//! Checkpoints through real rank processes: a run stopped after a checkpoint and resumed ends
//! bitwise equal to an uninterrupted one; damaged checkpoints are clear errors that overwrite
//! nothing; `tessera export --safetensors` writes what Python's safetensors library loads.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run, run_command, summary, tessera};
use tessera_rank::checkpoint::{
    CHECKPOINT_HEADER_LEN, checkpoint_file_name, list_checkpoints, load_checkpoint,
};

const LIMIT: Duration = Duration::from_secs(300);

/// The default contrastive job, small: 12 steps of 64 examples, the noise scale measured and
/// reduced every 3 steps (so statistics are pending at the checkpoints), a checkpoint every 4.
const SMALL: &[&str] = &[
    "run.steps=12",
    "batch.global=64",
    "data.synth.n_train=2000",
    "data.synth.n_eval=200",
    "run.eval_every=0",
    "run.log_every=1",
    "gns.reduce_every=3",
    "checkpoint.every=4",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn train(
    nproc: usize,
    config: Option<&Path>,
    sets: &[&str],
    extra: &[&str],
    out: &Path,
) -> serde_json::Value {
    let f = run(run_command(nproc, config, sets, extra, out), LIMIT);
    assert!(f.status.success(), "tessera run --nproc {nproc} {extra:?} failed\n{}", f.all_output());
    summary(&f)
}

/// Runs the job that is expected to fail; returns its stderr.
fn train_fails(nproc: usize, sets: &[&str], extra: &[&str], out: &Path) -> String {
    let f = run(run_command(nproc, None, sets, extra, out), LIMIT);
    assert!(!f.status.success(), "expected a failure\n{}", f.all_output());
    f.stderr
}

fn with(base: &[&'static str], more: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(more).copied().collect()
}

/// Every file of a directory with its contents.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn steps_in(dir: &Path) -> Vec<u64> {
    list_checkpoints(dir).unwrap().into_iter().map(|(s, _)| s).collect()
}

/// The loss lines' steps in a metrics file.
fn loss_steps(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some() && v.get("eval").is_none())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn contrastive_job_on_two_ranks_stopped_and_resumed_ends_bitwise_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, parts) = (dir.path().join("whole"), dir.path().join("parts"));
    let reference = train(2, None, SMALL, &[], &whole);
    assert_eq!(steps_in(&whole.join("checkpoints")), vec![4, 8, 12]);

    let stopped = train(2, None, &with(SMALL, &["checkpoint.stop_after=8"]), &[], &parts);
    assert_eq!(stopped["steps"], 8, "{stopped}");
    assert_eq!(steps_in(&parts.join("checkpoints")), vec![4, 8]);
    assert_ne!(stopped["params_sha256"], reference["params_sha256"]);

    let resumed = train(2, None, SMALL, &["--resume", "auto"], &parts);
    assert_eq!(resumed["steps"], 12, "{resumed}");
    assert_eq!(resumed["params_sha256"], reference["params_sha256"], "{resumed} vs {reference}");
    assert_eq!(resumed["loss"], reference["loss"]);
    assert_eq!(resumed["logit_scale"], reference["logit_scale"]);
    // The noise-scale averages came back too (the estimate is measured: 2 ranks).
    assert!(reference["b_simple"].as_f64().is_some(), "{reference}");
    assert_eq!(resumed["b_simple"], reference["b_simple"]);
    // The metrics file continues where the checkpoint was, once per step.
    assert_eq!(loss_steps(&parts), (1..=12).collect::<Vec<u64>>());
    // The final checkpoint holds the final parameters; the default keeps the last 3.
    assert_eq!(steps_in(&parts.join("checkpoints")), vec![4, 8, 12]);
    let last = load_checkpoint(&parts.join("checkpoints").join(checkpoint_file_name(12))).unwrap();
    assert_eq!(last.params, common::read_f32(&whole.join("params.f32")));
    assert_eq!(last.world, 2);

    // `auto` in a directory without checkpoints starts afresh; keep = 1 keeps only the newest.
    let fresh = dir.path().join("fresh");
    let s = train(2, None, &with(SMALL, &["checkpoint.keep=1"]), &["--resume", "auto"], &fresh);
    assert_eq!(s["params_sha256"], reference["params_sha256"]);
    assert_eq!(steps_in(&fresh.join("checkpoints")), vec![12]);
}

#[test]
fn classifier_with_lamb_or_lars_resumes_bitwise_from_a_file_or_a_run_directory() {
    let cfg = repo().join("examples/digits-classifier.toml");
    let base = [
        "run.steps=9",
        "batch.global=96",
        "run.eval_every=0",
        "checkpoint.every=3",
        "gns.reduce_every=2",
    ];
    // LAMB on 2 ranks; LARS on 1 rank with micro-batches (the noise scale from 4 of them).
    let cases: [(usize, &[&str]); 2] =
        [(2, &["optim.name=\"lamb\""]), (1, &["optim.name=\"lars\"", "batch.micro=24"])];
    for (nproc, extra_sets) in cases {
        let sets: Vec<&str> = base.iter().chain(extra_sets).copied().collect();
        let dir = tempfile::tempdir().unwrap();
        let (whole, parts) = (dir.path().join("whole"), dir.path().join("parts"));
        let reference = train(nproc, Some(&cfg), &sets, &[], &whole);
        let mut stop = sets.clone();
        stop.push("checkpoint.stop_after=6");
        train(nproc, Some(&cfg), &stop, &[], &parts);
        // Resume from step 3 (an explicit file) into a new directory, stop again at 6, then
        // resume that run by its directory.
        let file = parts.join("checkpoints").join(checkpoint_file_name(3));
        let again = dir.path().join("again");
        let file_arg = file.display().to_string();
        let s = train(nproc, Some(&cfg), &stop, &["--resume", &file_arg], &again);
        assert_eq!(s["steps"], 6);
        let again_arg = again.display().to_string();
        let s = train(nproc, Some(&cfg), &sets, &["--resume", &again_arg], &again);
        assert_eq!(s["params_sha256"], reference["params_sha256"], "{extra_sets:?}: {s}");
        assert_eq!(s["b_simple"], reference["b_simple"], "{extra_sets:?}");
        if nproc == 1 {
            assert!(reference["b_simple"].as_f64().is_some(), "{reference}");
        }
        let ck = load_checkpoint(&again.join("checkpoints").join(checkpoint_file_name(9))).unwrap();
        assert_eq!(ck.optimizer_name, extra_sets[0].split('"').nth(1).unwrap());
    }
}

/// Fails, saying how to get them, unless python3 can import safetensors and numpy.
fn require_python_with_safetensors() {
    let probe = Command::new("python3").args(["-c", "import safetensors.numpy, numpy"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import safetensors/numpy ({}): run scripts/ci/setup-python.sh",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 is not runnable ({e}): run scripts/ci/setup-python.sh"),
    }
}

const LOAD_PY: &str = r#"
import json, sys
from safetensors import safe_open
from safetensors.numpy import load_file
tensors = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="np") as f:
    meta = f.metadata()
print(json.dumps({
    "metadata": meta,
    "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                    "hex": v.astype("<f4").tobytes().hex()} for k, v in tensors.items()},
}))
"#;

#[test]
fn exported_safetensors_load_in_python_with_the_checkpoint_values() {
    require_python_with_safetensors();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let sets = with(SMALL, &["run.steps=5", "checkpoint.every=0", "loss.name=\"siglip\""]);
    train(1, None, &sets, &[], &out);
    let ck = load_checkpoint(&out.join("checkpoints").join(checkpoint_file_name(5))).unwrap();

    let st = dir.path().join("model.safetensors");
    let mut cmd = tessera();
    cmd.args(["export", "--safetensors"]).arg(&st).arg("--dir").arg(&out);
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());

    let mut py = Command::new("python3");
    py.args(["-c", LOAD_PY]).arg(&st);
    let f = run(py, LIMIT);
    assert!(f.status.success(), "python could not load the export\n{}", f.all_output());
    let loaded: serde_json::Value = serde_json::from_str(f.stdout.trim()).unwrap();
    let meta = &loaded["metadata"];
    assert_eq!(meta["step"], "5");
    assert_eq!(meta["config_hash"], ck.config_hash.as_str());
    let tensors = loaded["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), ck.tensors.len());
    for t in &ck.tensors {
        let got = &tensors[&t.name];
        assert_eq!(got["dtype"], "float32", "{}", t.name);
        assert_eq!(got["shape"], serde_json::json!(t.shape), "{}", t.name);
        let want: String = ck.params[t.offset as usize..(t.offset + t.len) as usize]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got["hex"].as_str().unwrap(), want, "{} differs", t.name);
    }
    // SigLIP's scale and bias are scalars among them.
    assert_eq!(tensors["logit_scale"]["shape"], serde_json::json!([]));
    assert!(ck.tensors.iter().any(|t| t.name.contains("bias") && t.shape.is_empty()));

    // --checkpoint FILE gives the same bytes; a missing source is a usage error.
    let st2 = dir.path().join("again.safetensors");
    let mut cmd = tessera();
    cmd.args(["export", "--safetensors"]).arg(&st2).arg("--checkpoint");
    cmd.arg(out.join("checkpoints").join(checkpoint_file_name(5)));
    assert!(run(cmd, LIMIT).status.success());
    assert_eq!(std::fs::read(&st).unwrap(), std::fs::read(&st2).unwrap());
    let mut cmd = tessera();
    cmd.args(["export", "--safetensors"]).arg(dir.path().join("x.safetensors"));
    assert!(!run(cmd, LIMIT).status.success());
}

/// Rewrites a safetensors file in float16 (argv 1 → argv 2), as a PyTorch user's half-precision
/// weights would come.
const HALF_PY: &str = r#"
import sys
from safetensors.numpy import load_file, save_file
save_file({k: v.astype("float16") for k, v in load_file(sys.argv[1]).items()}, sys.argv[2])
"#;

/// For every tensor `a.X` of the half-precision file (argv 2): does the LiT run's export (argv 1)
/// hold exactly its value in `b.X`, and did its own `a.X` move away from it?
const LIT_PY: &str = r#"
import json, sys
import numpy as np
from safetensors.numpy import load_file
lit, half = load_file(sys.argv[1]), load_file(sys.argv[2])
towers = [k[2:] for k in half if k.startswith("a.")]
print(json.dumps({
    "tensors": len(towers),
    "b_equal": sum(bool(np.array_equal(lit["b." + k], half["a." + k].astype(np.float32))) for k in towers),
    "a_equal": sum(bool(np.array_equal(lit["a." + k], half["a." + k].astype(np.float32))) for k in towers),
}))
"#;

/// LiT through real rank processes: a pretrained run's tower a, saved by Python in float16,
/// starts tower b of a 2-rank run (`model.init_towers = ["b=a"]`), which `model.freeze_b`
/// keeps exactly; tower a trains from its random start. `tessera model` checks the same load
/// without training, and lists the tensors. A missing file stops every rank.
#[test]
fn lit_starts_a_locked_tower_from_pretrained_weights() {
    require_python_with_safetensors();
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre");
    train(1, None, &with(SMALL, &["checkpoint.every=0"]), &[], &pre);
    let st = dir.path().join("pre.safetensors");
    let mut cmd = tessera();
    cmd.args(["export", "--safetensors"]).arg(&st).arg("--dir").arg(&pre);
    assert!(run(cmd, LIMIT).status.success());
    let half = dir.path().join("half.safetensors");
    let mut py = Command::new("python3");
    py.args(["-c", HALF_PY]).arg(&st).arg(&half);
    let f = run(py, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());

    let init = format!("model.init_from={:?}", half.display().to_string());
    // `tessera model` lists the tensors and checks the load without training.
    let dry_run = |more: &[&str]| {
        let mut cmd = tessera();
        cmd.args(["model", "--json", "--set", &init, "--set", "model.init_towers=[\"b=a\"]"]);
        for m in more {
            cmd.args(["--set", m]);
        }
        run(cmd, LIMIT)
    };
    let f = dry_run(&[]);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(f.stderr.contains("loaded tower b from tower a of"), "{}", f.stderr);
    let lines: Vec<serde_json::Value> =
        f.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (whole, tensors) = lines.split_last().unwrap();
    assert_eq!(whole["tensors"], tensors.len());
    let sum: u64 = tensors.iter().map(|t| t["params"].as_u64().unwrap()).sum();
    assert_eq!(whole["params"], sum);
    assert!(tensors.iter().any(|t| t["name"] == "b.in.weight"), "{}", f.stdout);
    let f = dry_run(&["model.tower_b.width=64"]);
    assert!(!f.status.success(), "{}", f.all_output());
    let want = "its a.in.weight has shape [32, 128] where this model's b.in.weight has [32, 64]";
    assert!(f.stderr.contains(want), "{}", f.stderr);

    let mut sets: Vec<&str> =
        with(SMALL, &["checkpoint.every=0", "model.freeze_b=true", "model.init_towers=[\"b=a\"]"]);
    sets.push(&init);
    let lit = dir.path().join("lit");
    let f = run(run_command(2, None, &sets, &[], &lit), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(f.stderr.contains("model.init_from: loaded tower b from tower a of"), "{}", f.stderr);
    let lit_st = dir.path().join("lit.safetensors");
    let mut cmd = tessera();
    cmd.args(["export", "--safetensors"]).arg(&lit_st).arg("--dir").arg(&lit);
    assert!(run(cmd, LIMIT).status.success());
    let mut py = Command::new("python3");
    py.args(["-c", LIT_PY]).arg(&lit_st).arg(&half);
    let f = run(py, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    let got: serde_json::Value = serde_json::from_str(f.stdout.trim()).unwrap();
    let n = got["tensors"].as_u64().unwrap();
    // The default tower: input, 2 residual blocks and the head, each a LayerNorm and a linear
    // (the input layer a linear only).
    assert!(n >= 10, "{got}");
    assert_eq!(got["b_equal"], n, "tower b is not the pretrained tower a: {got}");
    // Tower a trained from its own random start: its weights are not the file's.
    assert!(got["a_equal"].as_u64().unwrap() < n / 2, "{got}");

    // A file that is not there: both ranks stop, rank 0 naming the file.
    let gone = dir.path().join("gone.safetensors");
    let init = format!("model.init_from={:?}", gone.display().to_string());
    let mut sets: Vec<&str> = with(SMALL, &["checkpoint.every=0"]);
    sets.push(&init);
    let err = train_fails(2, &sets, &[], &dir.path().join("failed"));
    assert!(err.contains("gone.safetensors") && err.contains("cannot read it"), "{err}");
}

/// A short SimCLR run of the digits-contrastive example in `dir`/simclr (2 ranks, 4 steps):
/// its output folder, the digits-classifier example and the `--set` that loads the run's towers.
fn simclr_run(dir: &Path) -> (PathBuf, PathBuf, String) {
    let simclr = dir.join("simclr");
    let contrastive = repo().join("examples/digits-contrastive.toml");
    let short = ["run.steps=4", "batch.global=64", "run.eval_every=0", "checkpoint.every=0"];
    train(2, Some(&contrastive), &short, &[], &simclr);
    let init = format!("model.init_from={:?}", simclr.display().to_string());
    (simclr, repo().join("examples/digits-classifier.toml"), init)
}

/// The tensor rows of `tessera model --json` for `config` with `sets`.
fn model_tensors(config: &Path, sets: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = tessera();
    cmd.arg("model").arg("--json").arg("--config").arg(config);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    let mut listed: Vec<serde_json::Value> =
        f.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    listed.pop().expect("the summary line");
    listed
}

/// The values of tensor `name` in checkpoint `c`.
fn tensor_values(c: &tessera_rank::checkpoint::Checkpoint, name: &str) -> Vec<f32> {
    let t = c.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name}"));
    c.params[t.offset as usize..(t.offset + t.len) as usize].to_vec()
}

/// SimCLR, then a classifier fine-tuned from its tower (real processes, 2 ranks each): the
/// contrastive head (32 wide) does not fit the classifier's (10 classes), and the refusal names
/// `model.init_exclude`; `tessera model` marks the head as not from the file; with the head
/// excluded, every other tensor of tower a starts as the
/// SimCLR run ended (compared after steps at learning rate 0) and the head at its own
/// initialisation.
#[test]
fn a_classifier_starts_from_a_simclr_tower_with_a_new_head() {
    let dir = tempfile::tempdir().unwrap();
    let (simclr, classifier, init) = simclr_run(dir.path());
    let mut sets: Vec<&str> =
        vec!["run.steps=2", "optim.lr=0", "optim.warmup_steps=0", "run.eval_every=0", &init];
    let f = run(run_command(2, Some(&classifier), &sets, &[], &dir.path().join("x")), LIMIT);
    assert!(!f.status.success(), "{}", f.all_output());
    assert!(f.stderr.contains("model.init_exclude = [\"a.out\"] keeps it"), "{}", f.stderr);

    sets.push("model.init_exclude=[\"a.out\"]");
    // `tessera model` says which tensors come from the file.
    for t in model_tensors(&classifier, &[&init, "model.init_exclude=[\"a.out\"]"]) {
        let head = t["name"].as_str().unwrap().starts_with("a.out.");
        assert_eq!(t["from_file"], !head, "{t}");
    }
    let tuned = dir.path().join("tuned");
    let f = run(run_command(2, Some(&classifier), &sets, &[], &tuned), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(f.stderr.contains("kept at their initialisation: a.out)"), "{}", f.stderr);
    let pre = load_checkpoint(&simclr.join("checkpoints").join(checkpoint_file_name(4))).unwrap();
    let got = load_checkpoint(&tuned.join("checkpoints").join(checkpoint_file_name(2))).unwrap();
    let fresh_dir = dir.path().join("fresh");
    sets.retain(|s| !s.starts_with("model.init_"));
    train(2, Some(&classifier), &sets, &[], &fresh_dir);
    let fresh =
        load_checkpoint(&fresh_dir.join("checkpoints").join(checkpoint_file_name(2))).unwrap();
    let mut loaded = 0;
    for t in &got.tensors {
        let want = if t.name.starts_with("a.out.") { &fresh } else { &pre };
        assert_eq!(tensor_values(&got, &t.name), tensor_values(want, &t.name), "{}", t.name);
        loaded += usize::from(!t.name.starts_with("a.out."));
    }
    assert_eq!(loaded, 10, "the input layer and two blocks: {:?}", got.tensors);
}

/// A linear probe (SimCLR's evaluation protocol): a classifier whose tower comes from a SimCLR
/// run and whose `model.freeze` leaves only the new head to train. After training steps at the
/// example's learning rate, every frozen tensor holds the SimCLR run's values and every head
/// tensor has left its initialisation; `tessera model` lists the frozen tensors as not
/// trainable, and a `model.freeze` entry that names no tensor is refused before any rank
/// starts, with the tower's names.
#[test]
fn a_linear_probe_trains_only_the_head_of_a_simclr_tower() {
    let dir = tempfile::tempdir().unwrap();
    let (simclr, classifier, init) = simclr_run(dir.path());
    let probe = ["model.init_exclude=[\"a.out\"]", "model.freeze=[\"a.in\", \"a.blocks\"]"];
    let mut sets = vec!["run.steps=3", "run.eval_every=0", "checkpoint.every=0", &init];

    let typo =
        [&sets[..], &["model.init_exclude=[\"a.out\"]", "model.freeze=[\"a.block\"]"]].concat();
    let f = run(run_command(2, Some(&classifier), &typo, &[], &dir.path().join("x")), LIMIT);
    assert!(!f.status.success(), "{}", f.all_output());
    assert!(
        f.stderr.contains("model.freeze entry \"a.block\" names no tensor")
            && f.stderr.contains("a.blocks.0.weight"),
        "{}",
        f.stderr
    );
    assert!(!f.stderr.contains("panicked") && !f.stderr.contains("rank 1"), "{}", f.stderr);

    sets.extend(probe);
    for t in model_tensors(&classifier, &sets) {
        let head = t["name"].as_str().unwrap().starts_with("a.out.");
        assert_eq!(t["trainable"], head, "{t}");
    }

    let probed = dir.path().join("probed");
    train(2, Some(&classifier), &sets, &[], &probed);
    let pre = load_checkpoint(&simclr.join("checkpoints").join(checkpoint_file_name(4))).unwrap();
    let got = load_checkpoint(&probed.join("checkpoints").join(checkpoint_file_name(3))).unwrap();
    let fresh_dir = dir.path().join("fresh");
    sets.retain(|s| !s.starts_with("model."));
    sets.extend(["run.steps=1", "optim.lr=0", "optim.warmup_steps=0"]);
    train(2, Some(&classifier), &sets, &[], &fresh_dir);
    let fresh =
        load_checkpoint(&fresh_dir.join("checkpoints").join(checkpoint_file_name(1))).unwrap();
    let mut frozen = 0;
    for t in &got.tensors {
        if t.name.starts_with("a.out.") {
            assert!(t.trainable, "{}", t.name);
            assert_ne!(
                tensor_values(&got, &t.name),
                tensor_values(&fresh, &t.name),
                "{} did not train",
                t.name
            );
        } else {
            assert!(!t.trainable, "{}", t.name);
            assert_eq!(
                tensor_values(&got, &t.name),
                tensor_values(&pre, &t.name),
                "{} moved",
                t.name
            );
            frozen += 1;
        }
    }
    assert_eq!(frozen, 10, "the input layer and two blocks: {:?}", got.tensors);
}

#[test]
fn damaged_checkpoints_are_clear_errors_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, parts) = (dir.path().join("whole"), dir.path().join("parts"));
    let reference = train(2, None, SMALL, &[], &whole);
    train(2, None, &with(SMALL, &["checkpoint.stop_after=8"]), &[], &parts);
    let ckdir = parts.join("checkpoints");
    let good = std::fs::read(ckdir.join(checkpoint_file_name(8))).unwrap();

    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"NOTACKPT");
    let mut version = good.clone();
    version[8] = 99;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("flipped.tsr", flipped, "checksum mismatch"),
        ("cut.tsr", good[..good.len() - 100].to_vec(), "truncated"),
        ("magic.tsr", magic, "not a Tessera checkpoint"),
        ("version.tsr", version, "format version 99"),
    ];
    let before = snapshot(&ckdir);
    for (name, bytes, want) in &cases {
        let path = damaged.join(name);
        std::fs::write(&path, bytes).unwrap();
        let path_arg = path.display().to_string();
        // Resuming from it: a clear error naming the file, before any step.
        let err = train_fails(2, SMALL, &["--resume", &path_arg], &parts);
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // Exporting it: the same.
        let mut cmd = tessera();
        cmd.args(["export", "--safetensors"]).arg(dir.path().join("x.safetensors"));
        cmd.arg("--checkpoint").arg(&path);
        let f = run(cmd, LIMIT);
        assert!(!f.status.success() && f.stderr.contains(want), "{name}: {}", f.all_output());
        assert!(!dir.path().join("x.safetensors").exists());
    }
    assert_eq!(snapshot(&ckdir), before, "a failed resume changed the checkpoints");

    // A training config that differs: refused, naming the key, the hashes and the override.
    let err = train_fails(2, &with(SMALL, &["optim.lr=0.3"]), &["--resume", "auto"], &parts);
    assert!(
        err.contains("optim.lr") && err.contains("allow_config_change") && err.contains("hash"),
        "{err}"
    );
    assert_eq!(snapshot(&ckdir), before);

    // All checkpoints damaged: `auto` refuses rather than starting over.
    let all_bad = dir.path().join("all-bad");
    std::fs::create_dir_all(all_bad.join("checkpoints")).unwrap();
    std::fs::write(all_bad.join("checkpoints").join(checkpoint_file_name(8)), &good[..100])
        .unwrap();
    let err = train_fails(2, SMALL, &["--resume", "auto"], &all_bad);
    assert!(err.contains("damaged") && err.contains(&checkpoint_file_name(8)), "{err}");

    // The newest damaged (cut inside its payload): `auto` warns, takes step 4, ends the same.
    let cut = &good[..CHECKPOINT_HEADER_LEN + (good.len() - CHECKPOINT_HEADER_LEN) / 3];
    std::fs::write(ckdir.join(checkpoint_file_name(8)), cut).unwrap();
    let f = run(run_command(2, None, SMALL, &["--resume", "auto"], &parts), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(
        f.stderr.contains("skipped a damaged checkpoint") && f.stderr.contains("at step 4"),
        "{}",
        f.stderr
    );
    assert_eq!(summary(&f)["params_sha256"], reference["params_sha256"]);
}

#[test]
fn allowing_a_config_change_continues_with_the_new_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train(1, None, &with(SMALL, &["checkpoint.stop_after=4"]), &[], &out);
    // Train longer than planned: run.steps changes the schedule, so it must be allowed.
    let longer = with(SMALL, &["run.steps=16"]);
    let err = train_fails(1, &longer, &["--resume", "auto"], &out);
    assert!(err.contains("run.steps (12 → 16)"), "{err}");
    let f = run(
        run_command(
            1,
            None,
            &with(&longer, &["checkpoint.allow_config_change=true"]),
            &["--resume", "auto"],
            &out,
        ),
        LIMIT,
    );
    assert!(f.status.success(), "{}", f.all_output());
    assert_eq!(summary(&f)["steps"], 16);
    assert!(f.stderr.contains("continuing with this run's values"), "{}", f.stderr);
}
