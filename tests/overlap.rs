//! `run.overlap_allreduce`: the gradient all-reduce overlapped with the last replay's backward
//! (finished layers all-reduced in buckets on a communication thread) trains bitwise like the
//! plain all-reduce, at a world size where the order of summation matters.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run, run_command, summary};

const LIMIT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The parameter hash and the summary of a run with the overlap on (tiny buckets: many of
/// them, cut across the ring's chunks) or off.
fn params_hash(config: Option<&Path>, sets: &[&str], overlap: bool) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["run.steps=6", "run.eval_every=0"];
    all.extend_from_slice(sets);
    all.extend(if overlap {
        ["run.overlap_allreduce=true", "run.allreduce_bucket_bytes=4096"]
    } else {
        ["run.overlap_allreduce=false", "run.allreduce_bucket_bytes=4096"]
    });
    let f = run(run_command(3, config, &all, &[], dir.path()), LIMIT);
    assert!(f.status.success(), "overlap {overlap}, {sets:?}: the run failed\n{}", f.all_output());
    let s = summary(&f);
    (s["params_sha256"].as_str().expect("params_sha256").to_string(), s.to_string())
}

#[test]
fn overlapped_all_reduce_trains_bitwise_like_the_plain_one() {
    let digits = repo().join("examples/digits-contrastive.toml");
    let cases: [(Option<&Path>, &[&str]); 4] = [
        // Dual encoder, GradCache in micro-batches (ranks of 22, 21, 21 rows: 4 and 3 replays,
        // the last one short), with the noise-scale estimator reading the local gradient.
        (None, &["batch.global=64", "batch.micro=7"]),
        // SigLIP with its learnable bias, one micro-batch per rank.
        (None, &["batch.global=64", "loss.name=\"siglip\"", "optim.lr=0.01"]),
        // LiT: tower b frozen, so never reported final and never sent (the buckets cover the
        // trainable ranges only).
        (None, &["batch.global=60", "model.freeze_b=true", "batch.micro=8"]),
        // One tower for both views: final only after the second view's backward.
        (Some(&digits), &["batch.global=48", "batch.micro=5"]),
    ];
    for (config, sets) in cases {
        let (on, s_on) = params_hash(config, sets, true);
        let (off, s_off) = params_hash(config, sets, false);
        assert_eq!(on, off, "{sets:?}: parameters differ\n on: {s_on}\noff: {s_off}");
    }
}

/// A NaN injected into the local gradient after the backward (element 0, whose bucket is sent
/// last) is still seen before and after the overlapped all-reduce, naming tensor and rank.
#[test]
fn a_nan_gradient_is_named_with_the_overlap_on() {
    let dir = tempfile::tempdir().unwrap();
    let sets = [
        "run.steps=6",
        "batch.global=64",
        "batch.micro=7",
        "run.overlap_allreduce=true",
        "run.allreduce_bucket_bytes=4096",
    ];
    let mut cmd = run_command(3, None, &sets, &[], dir.path());
    cmd.env("TESSERA_FAULT", "nan@grad:rank=2,step=3");
    let f = run(cmd, LIMIT);
    assert!(!f.status.success(), "a NaN gradient: the job exited 0\n{}", f.all_output());
    let err = &f.stderr;
    assert!(err.contains("step 3: the gradient of a.in.weight is NaN after the gradient"), "{err}");
    assert!(err.contains("first seen on rank 2"), "{err}");
}
