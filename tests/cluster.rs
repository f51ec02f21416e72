//! Cluster plumbing with real processes and sockets: rendezvous, collectives, refusals, faults.

mod common;

use std::time::{Duration, Instant};

use common::{Coordinator, Watched, run, tessera, wait};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn rendezvous_and_checked_all_reduce_at_1_2_4_8_ranks() {
    for n in [1usize, 2, 4, 8] {
        let mut cmd = tessera();
        cmd.args(["bench", "allreduce", "--nproc", &n.to_string(), "--sizes", "4,1K,1M"])
            .args(["--iters", "2", "--warmup", "1", "--check", "--json"]);
        let f = run(cmd, LIMIT);
        assert!(f.status.success(), "{n} ranks failed\n{}", f.all_output());
        let rows = common::json_rows(&f);
        assert_eq!(rows.len(), 3, "{}", f.all_output());
        for r in &rows {
            assert_eq!(r["ranks"], n as u64);
            assert_eq!(r["check"], true, "{r}");
            assert!(r["busbw"].as_f64().unwrap() >= 0.0);
            assert!(r["time_us"].as_f64().unwrap() > 0.0);
        }
    }
}

/// `tessera bench loss` over 3 rank processes: for CLIP and SigLIP, the tiled loss in chunks of
/// 256 rows (4 rounds for 1,000-row blocks) and the naive all-gathered loss report the same
/// loss, and the JSON rows carry the issue's fields.
#[test]
fn bench_loss_tiled_in_chunks_equals_naive_across_processes() {
    let mut cmd = tessera();
    cmd.args(["bench", "loss", "--nproc", "3", "--batch", "3001", "--dim", "7"]).args([
        "--loss",
        "clip,siglip",
        "--chunk-rows",
        "256",
        "--json",
    ]);
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());
    let rows = common::json_rows(&f);
    assert_eq!(rows.len(), 4, "{}", f.all_output());
    let by = |loss: &str, name: &str| {
        rows.iter()
            .find(|r| r["loss_name"] == loss && r["impl"] == name)
            .unwrap_or_else(|| panic!("no {loss} {name} row"))
    };
    let mut values = Vec::new();
    for loss in ["clip", "siglip"] {
        let (tiled, naive) = (by(loss, "tiled"), by(loss, "naive"));
        for r in [tiled, naive] {
            assert_eq!(r["ranks"], 3);
            assert!(r["time_s"].as_f64().unwrap() > 0.0 && r["gflops"].as_f64().unwrap() > 0.0);
            assert!(r["peak_rss_total_bytes"].as_f64().unwrap() > 3.0 * 1e6, "{r}");
        }
        assert_eq!(tiled["chunk_rows"], 256);
        assert!(tiled["loss_workspace_bytes_max"].as_u64().unwrap() > 0);
        let (lt, ln) = (tiled["loss"].as_f64().unwrap(), naive["loss"].as_f64().unwrap());
        assert!((lt - ln).abs() <= 1e-5 * ln.abs(), "{loss}: tiled {lt} vs naive {ln}");
        let (ts, ns) = (tiled["time_s"].as_f64().unwrap(), naive["time_s"].as_f64().unwrap());
        let ratio = naive["tiled_time_over_naive"].as_f64().expect("the naive row's ratio");
        assert!((ratio - ts / ns).abs() <= 1e-9 * ratio, "{loss}: ratio {ratio}, times {ts} {ns}");
        assert!(tiled["tiled_time_over_naive"].is_null(), "{tiled}");
        values.push(lt);
    }
    assert!((values[0] - values[1]).abs() > 1e-3, "CLIP and SigLIP gave the same loss");
}

/// Runs `tessera` with `args`, expecting it to fail with every one of `needles` in its output
/// and no rank's line: the refusal came before any rank started.
fn assert_refused_before_ranks(args: &[&str], needles: &[&str]) {
    let mut cmd = tessera();
    cmd.args(args);
    let f = run(cmd, LIMIT);
    let out = f.all_output();
    assert!(!f.status.success(), "{out}");
    for needle in needles {
        assert!(out.contains(needle), "no {needle:?} in: {out}");
    }
    assert!(!out.contains("[rank"), "ranks started: {out}");
}

/// A `--loss` that is not a loss is named, with the choices, before any rank starts.
#[test]
fn bench_loss_names_a_bad_loss_before_starting_ranks() {
    assert_refused_before_ranks(
        &["bench", "loss", "--nproc", "2", "--loss", "clip,sigmoid"],
        &["--loss \"sigmoid\"", "clip, siglip"],
    );
}

/// A batch smaller than the ranks is refused, naming both, before any rank starts.
#[test]
fn bench_loss_and_gns_refuse_a_batch_smaller_than_the_ranks_before_starting_ranks() {
    assert_refused_before_ranks(
        &["bench", "loss", "--nproc", "2", "--batch", "1"],
        &["--batch 1", "(--nproc 2)"],
    );
    assert_refused_before_ranks(
        &["bench", "gns", "--nproc", "3", "--global-batch", "2"],
        &["--global-batch 2", "(--nproc 3)"],
    );
}

/// A naive loss too large for the machine's memory is refused, with the way out, before any
/// rank starts (B = 10⁷ at d = 8: 200 TB of logits over 2 ranks).
#[test]
fn bench_loss_refuses_a_naive_loss_that_cannot_fit() {
    assert_refused_before_ranks(
        &["bench", "loss", "--nproc", "2", "--batch", "10000000", "--dim", "8"],
        &["--batch 10000000", "--skip-naive"],
    );
}

/// `tessera run` refuses what the world size rules out before it starts a rank: a global batch
/// that leaves a rank without an example, an adaptive batch range with no multiple of the ranks
/// in it; and it says a missing config file's cause once.
#[test]
fn run_refuses_what_the_world_size_rules_out_before_starting_ranks() {
    assert_refused_before_ranks(
        &["run", "--nproc", "4", "--set", "batch.global=3"],
        &["batch.global = 3 is smaller than the 4 ranks", "(--nproc 4)"],
    );
    assert_refused_before_ranks(
        &[
            "run",
            "--nproc",
            "4",
            "--set",
            "gns.adaptive.enabled=true",
            "--set",
            "gns.adaptive.max=3",
        ],
        &["leave no batch that 4 ranks can split", "widen the range"],
    );
    let missing = "/nonexistent/tessera-test.toml";
    let mut cmd = tessera();
    cmd.args(["run", "--nproc", "2", "--config", missing]);
    let f = run(cmd, LIMIT);
    let out = f.all_output();
    assert!(!f.status.success(), "{out}");
    assert!(out.contains(&format!("reading config file {missing}")), "{out}");
    assert_eq!(out.matches("No such file or directory").count(), 1, "{out}");
}

#[test]
fn every_collective_matches_a_naive_reference_across_processes() {
    for n in [2usize, 3, 4] {
        let mut cmd = tessera();
        cmd.args(["bench", "collectives-selftest", "--nproc", &n.to_string()]);
        let f = run(cmd, Duration::from_secs(300));
        assert!(f.status.success(), "{n} ranks failed\n{}", f.all_output());
        assert!(f.stdout.contains("all collectives correct"), "{}", f.all_output());
    }
}

#[test]
fn wrong_and_missing_token_are_refused() {
    let coord = Coordinator::start(1, &[]);
    let dir = tempfile::tempdir().unwrap();
    for token in [Some("not-the-token"), None] {
        let mut cmd = tessera();
        cmd.args(["rank", "--set", "run.steps=1"])
            .arg("--set")
            .arg(format!("run.out_dir={:?}", dir.path().display().to_string()))
            .env("TESSERA_COORDINATOR", &coord.addr);
        if let Some(t) = token {
            cmd.env("TESSERA_TOKEN", t);
        }
        let f = run(cmd, LIMIT);
        assert!(!f.status.success());
        let expect = if token.is_some() { "token" } else { "TESSERA_TOKEN" };
        assert!(f.stderr.contains(expect), "{}", f.all_output());
    }
    coord.stop();
}

#[test]
fn config_mismatch_reaches_every_rank_before_any_collective() {
    let coord = Coordinator::start(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let a = coord.rank(Some(0), 2, &["--set", "run.steps=3"], dir.path());
    let b = coord.rank(Some(1), 2, &["--set", "run.steps=4"], dir.path());
    for child in [a, b] {
        let f = wait(child, LIMIT);
        assert!(!f.status.success(), "{}", f.all_output());
        assert!(f.stderr.to_lowercase().contains("config"), "{}", f.all_output());
        assert!(f.stderr.contains("hash"), "{}", f.all_output());
    }
    coord.stop();
}

#[test]
fn rendezvous_timeout_names_the_missing_ranks() {
    let coord = Coordinator::start(3, &["--join-timeout", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let a = coord.rank(Some(0), 3, &["--set", "run.steps=1"], dir.path());
    let f = wait(a, LIMIT);
    assert!(!f.status.success());
    assert!(f.stderr.contains("1 of 3"), "{}", f.all_output());
    assert!(f.stderr.contains("[1, 2]"), "{}", f.all_output());
    coord.stop();
}

/// PIDs of the rank processes of one job (children of the given process).
fn children_of(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Waits (up to 30 s) until the launcher `pid` has started `n` rank processes; their PIDs.
fn rank_processes(pid: u32, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = children_of(pid);
        if c.len() == n {
            return c;
        }
        assert!(Instant::now() < deadline, "the launcher started {} of {n} ranks", c.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn a_rank_killed_mid_all_reduce_stops_every_other_rank_within_15_s() {
    // Ranks started directly (no launcher to clean up after them): they must stop on their own.
    let coord = Coordinator::start(4, &["--heartbeat-timeout", "5"]);
    let dir = tempfile::tempdir().unwrap();
    let job = r#"{"sizes":"64M","iters":100000,"warmup":0,"check":false,"json":true}"#;
    let args = ["--job", "bench-allreduce", "--job-args", job];
    let ranks: Vec<Watched> =
        (0..4).map(|r| Watched::spawn(coord.rank_command(Some(r), 4, &args, dir.path()))).collect();
    // Once every ring link is up, the ranks go straight into the all-reduce loop.
    for r in &ranks {
        r.wait_for_lines("data-plane ring connected", 1, LIMIT);
    }
    let victim = ranks[2].child.id();
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let killed_at = Instant::now();
    let mut outputs = Vec::new();
    for (r, rank) in ranks.into_iter().enumerate() {
        let f = rank.finish(Duration::from_secs(30));
        if r != 2 {
            assert!(!f.status.success(), "rank {r} exited 0 after a peer died\n{}", f.all_output());
            assert!(
                killed_at.elapsed() < Duration::from_secs(15),
                "rank {r} took {:?} to stop",
                killed_at.elapsed()
            );
            outputs.push(f.stderr);
        }
    }
    let all = outputs.join("\n");
    assert!(all.contains("rank 2"), "no rank names the dead peer:\n{all}");
    coord.stop();
}

/// The launch rank a rank process was given, from its environment.
fn launch_rank_of(pid: u32) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"TESSERA_LAUNCH_RANK="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("the rank process has TESSERA_LAUNCH_RANK")
}

#[test]
fn launcher_names_the_dead_rank_and_stops_the_others() {
    let mut cmd = tessera();
    cmd.args(["bench", "allreduce", "--nproc", "3", "--sizes", "16M", "--iters", "100000"]);
    let launcher = Watched::spawn(cmd);
    let ranks = rank_processes(launcher.child.id(), 3);
    launcher.wait_for_lines("data-plane ring connected", 3, LIMIT);
    let victim = ranks[1];
    let victim_rank = launch_rank_of(victim);
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let killed_at = Instant::now();
    let f = launcher.finish(Duration::from_secs(60));
    assert!(!f.status.success());
    assert!(killed_at.elapsed() < Duration::from_secs(15), "took {:?}", killed_at.elapsed());
    let blame = format!("rank {victim_rank} failed (signal 9 (SIGKILL))");
    assert!(f.stderr.contains(&blame), "expected {blame:?}\n{}", f.all_output());
    assert!(ranks.iter().all(|&p| !alive(p)), "rank processes outlived the launcher");
}

#[test]
fn ctrl_c_on_the_launcher_stops_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tessera();
    cmd.args(["run", "--nproc", "2", "--set", "run.steps=1000000", "--set"])
        .arg(format!("run.out_dir={:?}", dir.path().display().to_string()));
    let launcher = Watched::spawn(cmd);
    let pid = launcher.child.id();
    let ranks = rank_processes(pid, 2);
    launcher.wait_for_lines("data-plane ring connected", 2, LIMIT);
    unsafe {
        libc::kill(pid as i32, libc::SIGINT);
    }
    let f = launcher.finish(Duration::from_secs(30));
    assert_eq!(f.status.code(), Some(130), "{}", f.all_output());
    assert!(f.stderr.contains("interrupted"), "{}", f.all_output());
    assert!(ranks.iter().all(|&p| !alive(p)), "rank processes outlived the launcher");
}

/// A printing command whose reader goes away (`tessera model | head`) ends quietly, as Unix
/// tools do, instead of panicking on the broken pipe. The listing is far longer than a pipe's
/// buffer, so the writes after the reader left do fail.
#[test]
fn a_printing_command_ends_quietly_when_its_reader_goes_away() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = tessera();
    cmd.args(["model", "--set", "model.tower_a.depth=5000", "--set", "model.tower_a.width=8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawning tessera model");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("name "), "{first}");
    // The reader is dropped here: the rest of the 20,000-line listing has nowhere to go.
    let out = child.wait_with_output().expect("waiting for tessera model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}
