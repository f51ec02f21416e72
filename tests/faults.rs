//! Failures with real rank processes, injected at exact points by `TESSERA_FAULT`: a rank
//! SIGKILLed mid all-reduce, mid loss ring and mid checkpoint write, a rank SIGSTOPped past the
//! heartbeat budget, a rank hung inside a collective, a lost coordinator, NaN gradients, a
//! stale generation. Each ends in bounded time with an explanation; checkpoints survive and a
//! restarted or resumed run ends with the same parameters as an unfaulted one.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Coordinator, Finished, Watched, run, run_command, summary};

const LIMIT: Duration = Duration::from_secs(300);

/// A small contrastive job (the default model on the synthetic task, 8 steps of 256).
const SMALL: &[&str] = &["run.steps=8", "batch.global=256", "run.log_every=1"];

fn job(nproc: usize, sets: &[&str], out: &Path, fault: Option<&str>, extra: &[&str]) -> Command {
    let sets: Vec<&str> = SMALL.iter().chain(sets).copied().collect();
    let mut cmd = run_command(nproc, None, &sets, extra, out);
    match fault {
        Some(f) => cmd.env("TESSERA_FAULT", f),
        None => cmd.env_remove("TESSERA_FAULT"),
    };
    cmd
}

fn unfaulted_hash(nproc: usize, sets: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = run(job(nproc, sets, dir.path(), None, &[]), LIMIT);
    assert!(f.status.success(), "the unfaulted run failed\n{}", f.all_output());
    summary(&f)["params_sha256"].as_str().unwrap().to_string()
}

fn checkpoints(out: &Path) -> Vec<String> {
    // Temporary files (".ckpt-…tmpPID", left by a writer killed mid-write) are not checkpoints.
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.retain(|n| !n.starts_with('.'));
    names.sort();
    names
}

fn failed(f: &Finished, what: &str) {
    assert!(!f.status.success(), "{what}: the job exited 0\n{}", f.all_output());
}

#[test]
fn sigkill_mid_gradient_all_reduce_restarts_from_the_checkpoint_and_ends_equal() {
    let want = unfaulted_hash(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let fault = "kill@frame:rank=1,step=5,op=all_reduce_f32,n=1,generation=1";
    let cmd = job(2, &["checkpoint.every=3"], dir.path(), Some(fault), &["--max-restarts", "1"]);
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "the restarted job failed\n{}", f.all_output());
    let err = &f.stderr;
    assert!(err.contains("injecting Kill at Frame (all_reduce_f32) in step 5"), "{err}");
    assert!(err.contains("rank 1 failed (signal 9 (SIGKILL))"), "{err}");
    assert!(err.contains("nothing in this job sent rank 1 its SIGKILL"), "{err}");
    assert!(err.contains("restart 1 of 1 (generation 2)"), "{err}");
    assert!(err.contains("resuming from") && err.contains("ckpt-00000003.tsr"), "{err}");
    assert_eq!(summary(&f)["params_sha256"], want.as_str(), "{}", f.all_output());
}

#[test]
fn restarts_are_bounded_by_max_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // The fault fires in every generation: one restart, then the launcher gives up.
    let fault = "exit@step:rank=0,step=2,code=7";
    let f = run(job(2, &[], dir.path(), Some(fault), &["--max-restarts", "1"]), LIMIT);
    failed(&f, "a job failing in every generation");
    assert!(f.stderr.contains("rank 0 failed (exit code 7)"), "{}", f.all_output());
    assert!(f.stderr.contains("restart 1 of 1 (generation 2)"), "{}", f.all_output());
    assert!(f.stderr.contains("giving up: the job failed 2 times"), "{}", f.all_output());
}

#[test]
fn sigkill_mid_loss_ring_stops_every_rank_naming_the_collective_and_keeps_the_checkpoints() {
    let want = unfaulted_hash(3, &[]);
    let dir = tempfile::tempdir().unwrap();
    let fault = "kill@frame:rank=2,step=5,op=ring_shift_bytes,n=2";
    let f = run(job(3, &["checkpoint.every=2"], dir.path(), Some(fault), &[]), LIMIT);
    failed(&f, "a rank killed mid loss ring");
    let err = &f.stderr;
    assert!(err.contains("rank 2 failed (signal 9 (SIGKILL))"), "{err}");
    // A survivor names the peer and the collective with its sequence number. Which survivor
    // message comes first is a race, and both are right: a survivor inside the next shift sees
    // the peer's socket close ("ring_shift_bytes #N: rank 2 disconnected"); one still computing
    // between shifts gets the coordinator's abort first ("job aborted: rank 2 failed ... (this
    // rank was between collectives (the last one, ring_shift_bytes #N, ...))").
    let in_ring = err.contains("rank 2 disconnected");
    let aborted = err.contains("job aborted: rank 2 failed");
    assert!(err.contains("ring_shift_bytes #") && (in_ring || aborted), "{err}");
    assert_eq!(checkpoints(dir.path()), ["ckpt-00000002.tsr", "ckpt-00000004.tsr"]);
    // Resuming by hand from the newest checkpoint ends where an unfaulted run ends.
    let f = run(job(3, &["checkpoint.resume=\"auto\""], dir.path(), None, &[]), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(f.stderr.contains("ckpt-00000004.tsr at step 4"), "{}", f.all_output());
    assert_eq!(summary(&f)["params_sha256"], want.as_str());
}

#[test]
fn sigkill_mid_checkpoint_write_keeps_the_last_good_checkpoint() {
    let want = unfaulted_hash(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    // Rank 0 dies with half of step 6's checkpoint written.
    let fault = "kill@checkpoint:rank=0,step=6";
    let f = run(job(2, &["checkpoint.every=3"], dir.path(), Some(fault), &[]), LIMIT);
    failed(&f, "rank 0 killed mid checkpoint write");
    assert!(f.stderr.contains("rank 0 failed (signal 9 (SIGKILL))"), "{}", f.all_output());
    assert_eq!(checkpoints(dir.path()), ["ckpt-00000003.tsr"], "{}", f.all_output());
    let f = run(job(2, &["checkpoint.resume=\"auto\""], dir.path(), None, &[]), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert!(f.stderr.contains("ckpt-00000003.tsr at step 3"), "{}", f.all_output());
    assert_eq!(summary(&f)["params_sha256"], want.as_str());
}

#[test]
fn a_stopped_rank_is_declared_dead_and_every_rank_exits_within_15_s() {
    let dir = tempfile::tempdir().unwrap();
    let sets = ["run.steps=1000000"];
    let fault = "stop@step:rank=1,step=3";
    let cmd = job(3, &sets, dir.path(), Some(fault), &["--heartbeat-timeout", "3"]);
    let launcher = Watched::spawn(cmd);
    launcher.wait_for_lines("injecting Stop", 1, LIMIT);
    let stopped_at = Instant::now();
    let f = launcher.finish(Duration::from_secs(60));
    failed(&f, "a stopped rank");
    assert!(stopped_at.elapsed() < Duration::from_secs(15), "took {:?}", stopped_at.elapsed());
    let err = &f.stderr;
    assert!(err.contains("rank 1 failed (signal 9 (SIGKILL))"), "{err}");
    assert!(err.contains("no heartbeat for"), "{err}");
    // The launcher killed it, so the SIGKILL is not blamed on anyone outside.
    assert!(!err.contains("nothing in this job sent"), "{err}");
    // The survivors say which collective they were waiting in.
    assert!(err.contains("(this rank was in "), "{err}");
}

#[test]
fn a_stopped_heartbeat_relay_is_named_not_the_ranks_it_relays() {
    // Rank 0 leads the node: ranks 1 and 2 heartbeat through it, so all three fall silent.
    let dir = tempfile::tempdir().unwrap();
    let sets = ["run.steps=1000000"];
    let fault = "stop@step:rank=0,step=3";
    let cmd = job(3, &sets, dir.path(), Some(fault), &["--heartbeat-timeout", "3"]);
    let launcher = Watched::spawn(cmd);
    launcher.wait_for_lines("injecting Stop", 1, LIMIT);
    let stopped_at = Instant::now();
    let f = launcher.finish(Duration::from_secs(60));
    failed(&f, "a stopped relay");
    assert!(stopped_at.elapsed() < Duration::from_secs(15), "took {:?}", stopped_at.elapsed());
    let err = &f.stderr;
    assert!(err.contains("relaying the heartbeats of 2 ranks of node 0"), "{err}");
    assert!(err.contains("rank 0 failed (signal 9 (SIGKILL))"), "{err}");
    assert!(err.contains("it also relays the heartbeats of 2 other ranks of its node"), "{err}");
}

#[test]
fn a_rank_hung_outside_collectives_times_the_others_out_naming_it() {
    // The main thread hangs while heartbeats go on: the others' collective timeout catches it.
    let dir = tempfile::tempdir().unwrap();
    let sets = ["run.steps=1000000", "run.collective_timeout_s=2"];
    let fault = "hang@step:rank=0,step=3";
    let launcher = Watched::spawn(job(2, &sets, dir.path(), Some(fault), &[]));
    launcher.wait_for_lines("injecting Hang", 1, LIMIT);
    let hung_at = Instant::now();
    let f = launcher.finish(Duration::from_secs(60));
    failed(&f, "a hung rank");
    assert!(hung_at.elapsed() < Duration::from_secs(15), "took {:?}", hung_at.elapsed());
    let err = &f.stderr;
    assert!(err.contains("rank 0 sent nothing for 2s (timeout)"), "{err}");
    assert!(err.contains(" #"), "{err}");
}

/// Two ranks of an endless job under a standalone coordinator; `fault` is done to the
/// coordinator once their ring is up, then every rank must stop within `limit`, saying `says`.
fn coordinator_fault(
    fault: impl FnOnce(Coordinator) -> Option<Coordinator>,
    limit: Duration,
    says: &str,
) {
    let coord = Coordinator::start(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--set", "run.steps=1000000", "--set", "batch.global=256"];
    let ranks: Vec<Watched> =
        (0..2).map(|r| Watched::spawn(coord.rank_command(Some(r), 2, &args, dir.path()))).collect();
    for r in &ranks {
        r.wait_for_lines("data-plane ring connected", 1, LIMIT);
    }
    let left = fault(coord);
    let at = Instant::now();
    for r in ranks {
        let f = r.finish(Duration::from_secs(60));
        failed(&f, "a rank whose coordinator is gone or hangs");
        assert!(at.elapsed() < limit, "took {:?}", at.elapsed());
        assert!(f.stderr.contains(says), "{}", f.all_output());
    }
    if let Some(c) = left {
        c.stop();
    }
}

#[test]
fn a_lost_coordinator_stops_every_rank() {
    coordinator_fault(
        |c| {
            c.stop();
            None
        },
        Duration::from_secs(15),
        "lost the coordinator",
    );
}

#[test]
fn a_stopped_coordinator_stops_every_rank() {
    // A hung coordinator keeps its sockets open: the ranks' HTTP/2 keep-alive PINGs find it.
    coordinator_fault(
        |c| {
            unsafe {
                libc::kill(c.child.id() as i32, libc::SIGSTOP);
            }
            Some(c)
        },
        Duration::from_secs(20),
        "lost the coordinator",
    );
}

#[test]
fn a_nan_gradient_stops_every_rank_naming_the_tensor_and_the_rank() {
    let dir = tempfile::tempdir().unwrap();
    let f = run(job(3, &[], dir.path(), Some("nan@grad:rank=2,step=4"), &[]), LIMIT);
    failed(&f, "a NaN gradient");
    let err = &f.stderr;
    assert!(err.contains("step 4: the gradient of a.in.weight is NaN after the gradient"), "{err}");
    assert!(err.contains("first seen on rank 2"), "{err}");
}

#[test]
fn a_nan_gradient_is_skipped_on_every_rank_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let sets = ["run.on_nonfinite=\"skip\""];
    let f = run(job(3, &sets, dir.path(), Some("nan@grad:rank=1,step=4"), &[]), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    let s = summary(&f);
    assert_eq!(s["skipped_steps"], 1);
    assert_eq!(s["steps"], 8);
    assert!(s["loss"].as_f64().unwrap().is_finite());
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let skipped: Vec<&str> = metrics.lines().filter(|l| l.contains("\"skipped\"")).collect();
    assert_eq!(skipped.len(), 1, "{metrics}");
    assert!(skipped[0].contains("\"step\":4") && skipped[0].contains("rank 1"), "{metrics}");
}

#[test]
fn a_rank_of_a_stale_generation_is_refused() {
    let coord = Coordinator::start(1, &["--generation", "2", "--join-timeout", "5"]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = coord.rank_command(Some(0), 1, &["--set", "run.steps=1"], dir.path());
    cmd.env("TESSERA_GENERATION", "1");
    let f = run(cmd, LIMIT);
    failed(&f, "a stale rank");
    assert!(f.stderr.contains("was started for generation 1"), "{}", f.all_output());
    assert!(f.stderr.contains("this job is at generation 2"), "{}", f.all_output());
    coord.stop();
}

#[test]
fn collective_check_mode_trains_like_the_normal_mode() {
    // The debug mode adds a check before every collective and must change nothing else.
    let want = unfaulted_hash(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let f = run(job(2, &["run.check_collectives=true"], dir.path(), None, &[]), LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    assert_eq!(summary(&f)["params_sha256"], want.as_str());
}
