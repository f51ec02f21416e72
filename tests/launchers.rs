//! Real cluster launchers on one machine: `mpirun -np 4` (Open MPI) and `srun -n 4` (a
//! single-node Slurm) start `tessera rank` directly, rank 0 hosts the coordinator, and the
//! job ends with the same parameters as `tessera run --nproc 4`. Also: each rank reads its
//! rank from the launcher's own variables, a rank that stops heartbeating aborts the others,
//! and hostlist expansion agrees with `scontrol show hostnames`.
//!
//! Needs mpirun, srun and running Slurm daemons: `scripts/ci/setup-launchers.sh` (as root)
//! installs and starts them; without them these tests fail and say so.

mod common;

#[path = "../launch/src/hostlist.rs"]
#[allow(dead_code)]
mod hostlist;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Finished, Watched, run, summary};

const LIMIT: Duration = Duration::from_secs(180);
const SETUP: &str = "run `scripts/ci/setup-launchers.sh` as root (Debian 12; it installs Open MPI \
                     and a single-node Slurm with munge, and starts them)";

/// A small job: 5 steps of the default task, 128 rows over 4 ranks.
const SETS: &[&str] = &["run.steps=5", "run.eval_every=0", "batch.global=128"];

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(tool);
            f.is_file()
                && std::fs::metadata(&f).is_ok_and(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.permissions().mode() & 0o111 != 0
                })
        })
    })
}

fn require(tool: &str) {
    assert!(on_path(tool), "{tool} is not installed (not on PATH): {SETUP}");
}

/// srun needs slurmctld and slurmd up and the node usable, not just the binaries.
fn require_slurm() {
    for tool in ["srun", "sinfo", "scontrol"] {
        require(tool);
    }
    let mut cmd = Command::new("sinfo");
    cmd.args(["-h", "-o", "%t"]);
    let f = run(cmd, Duration::from_secs(60));
    let states = f.stdout.trim().to_string();
    assert!(
        f.status.success() && states.lines().any(|s| ["idle", "mix", "alloc"].contains(&s.trim())),
        "no usable Slurm node (sinfo says {states:?}, {}): {SETUP}",
        f.stderr.trim()
    );
}

/// `tessera rank` run by a launcher: the binary and the training arguments.
fn rank_args(out: &Path) -> Vec<String> {
    let mut args = vec![env!("CARGO_BIN_EXE_tessera").to_string(), "rank".to_string()];
    for s in SETS {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    args.extend(["--set".to_string(), format!("run.out_dir={:?}", out.display().to_string())]);
    args
}

/// A launcher command with no Tessera or torchrun variables inherited from the test's own
/// environment, and info logs (each rank logs where its values came from).
fn launcher(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "TESSERA_COORDINATOR",
        "TESSERA_TOKEN",
        "TESSERA_REPORT_FILE",
        "TESSERA_LAUNCH_RANK",
        "TESSERA_LAUNCH_WORLD",
        "TESSERA_LOCAL_RANK",
        "TESSERA_LOCAL_WORLD",
        "TESSERA_COORDINATOR_MODE",
        "RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("TESSERA_LOG", "info");
    cmd
}

fn mpirun(np: usize) -> Command {
    require("mpirun");
    let mut cmd = launcher("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()]);
    cmd
}

fn srun(n: usize) -> Command {
    require_slurm();
    let mut cmd = launcher("srun");
    cmd.args(["-n", &n.to_string()]);
    cmd
}

/// The params_sha256 of `tessera run --nproc 4` on the same job (computed once).
fn reference_sha() -> &'static str {
    static SHA: OnceLock<String> = OnceLock::new();
    SHA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = common::tessera();
        cmd.args(["run", "--nproc", "4"]);
        for a in rank_args(dir.path()).iter().skip(2) {
            cmd.arg(a);
        }
        let f = run(cmd, LIMIT);
        assert!(f.status.success(), "tessera run --nproc 4 failed\n{}", f.all_output());
        summary(&f)["params_sha256"].as_str().expect("params_sha256 in the summary").to_string()
    })
}

/// Checks that a launcher's job trained like `tessera run --nproc 4`, that only rank 0
/// printed the summary, and that every rank logged the variables it read.
fn check_job(f: &Finished, what: &str, rank_var: &str, world_var: &str, coordinator_from: &str) {
    assert!(f.status.success(), "{what} failed\n{}", f.all_output());
    let rows = f.stdout.lines().filter(|l| l.trim_start().starts_with('{')).count();
    assert_eq!(rows, 1, "{what}: expected one JSON summary (rank 0's)\n{}", f.all_output());
    let s = summary(f);
    assert_eq!(s["world"], 4, "{s}");
    assert_eq!(s["steps"], 5, "{s}");
    assert_eq!(
        s["params_sha256"].as_str(),
        Some(reference_sha()),
        "{what} ended with other parameters than tessera run --nproc 4\n{}",
        f.all_output()
    );
    let env_lines: Vec<&str> =
        f.stderr.lines().filter(|l| l.contains("launch environment:")).collect();
    assert_eq!(env_lines.len(), 4, "{what}: every rank logs its sources\n{}", f.stderr);
    for r in 0..4 {
        let want = format!("rank={r} ({rank_var})");
        assert!(
            env_lines.iter().any(|l| l.contains(&want)),
            "{what}: no rank logged {want:?}\n{}",
            env_lines.join("\n")
        );
    }
    for l in &env_lines {
        assert!(l.contains(&format!("world=4 ({world_var})")), "{what}: {l}");
        assert!(l.contains(coordinator_from), "{what}: {coordinator_from:?} not in {l}");
    }
    let hosting = f.stderr.lines().filter(|l| l.contains("rank 0 hosts the coordinator")).count();
    assert_eq!(hosting, 1, "{what}: rank 0 hosts the coordinator once\n{}", f.stderr);
}

/// A free TCP port on loopback (bound, then released for the job's rank 0 to take).
///
/// Not one the kernel hands out: between the release here and rank 0's bind, a port of the
/// ephemeral range (Linux: 32768-60999) can become the local end of any outgoing connection
/// on the machine, such as a concurrent test's gRPC client (CI saw `Address already in use`
/// that way). So the port comes from 25000-32767, above the Slurm-derived coordinator ports
/// (15000-24999) and below the ephemeral range, starting at a point that differs per process
/// and per call, and the first that binds is taken.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 25000;
    const SPAN: u32 = 32768 - LOW;
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(nanos / 1000)
        .wrapping_add(call.wrapping_mul(131));
    (0..SPAN)
        .map(|i| (LOW + (start % SPAN + i) % SPAN) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free loopback port in 25000-32767")
}

#[test]
fn mpirun_np_4_trains_to_the_same_parameters_as_tessera_run() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing but mpirun's own variables: one node, so rank 0 hosts on loopback.
    let mut cmd = mpirun(4);
    cmd.args(rank_args(&dir.path().join("a")));
    let f = run(cmd, LIMIT);
    check_job(&f, "mpirun -np 4", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "single node");
    assert!(f.stderr.contains("token=ompi:"), "{}", f.stderr);
    assert!(f.stderr.contains("local_rank=3 (OMPI_COMM_WORLD_LOCAL_RANK)"), "{}", f.stderr);

    // torchrun's address variables, forwarded by mpirun, name where rank 0 hosts it.
    let port = free_port();
    let mut cmd = mpirun(4);
    cmd.args(["-x", "MASTER_ADDR=127.0.0.1", "-x", &format!("MASTER_PORT={port}")])
        .args(rank_args(&dir.path().join("b")));
    let f = run(cmd, LIMIT);
    check_job(
        &f,
        "mpirun -np 4 with MASTER_ADDR/PORT",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        &format!("coordinator=127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)"),
    );
}

#[test]
fn srun_n_4_trains_to_the_same_parameters_as_tessera_run() {
    let dir = tempfile::tempdir().unwrap();
    // No address given: the first host of the node list, on a port from the job id.
    let mut cmd = srun(4);
    cmd.args(rank_args(&dir.path().join("a")));
    let f = run(cmd, LIMIT);
    check_job(
        &f,
        "srun -n 4",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "(first host of SLURM_STEP_NODELIST",
    );
    assert!(f.stderr.contains("local_rank=2 (SLURM_LOCALID)"), "{}", f.stderr);
    assert!(f.stderr.contains("(derived from SLURM_JOB_ID.SLURM_STEP_ID)"), "{}", f.stderr);

    // TESSERA_COORDINATOR and TESSERA_TOKEN (srun passes the environment on).
    let port = free_port();
    let mut cmd = srun(4);
    cmd.env("TESSERA_COORDINATOR", format!("127.0.0.1:{port}"))
        .env("TESSERA_TOKEN", "launchers-test-token")
        .args(rank_args(&dir.path().join("b")));
    let f = run(cmd, LIMIT);
    check_job(
        &f,
        "srun -n 4 with TESSERA_COORDINATOR",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        &format!("coordinator=127.0.0.1:{port} (TESSERA_COORDINATOR)"),
    );
    assert!(f.stderr.contains("token=set (TESSERA_TOKEN)"), "{}", f.stderr);
    assert!(!f.stderr.contains("launchers-test-token"), "the token is never logged");
}

/// Processes whose environment has `mark` and `SLURM_PROCID=rank`.
fn pids_with(mark: &str, rank: usize) -> Vec<i32> {
    let procid = format!("SLURM_PROCID={rank}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        if vars.contains(&mark.as_bytes()) && vars.contains(&procid.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn under_srun_a_rank_that_stops_heartbeating_aborts_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mark = format!("TESSERA_TEST_MARK=hb-{}", std::process::id());
    let mut cmd = srun(3);
    let (k, v) = mark.split_once('=').unwrap();
    cmd.env(k, v);
    let mut args = rank_args(dir.path());
    // Long enough to be stopped mid-run; a short heartbeat budget for the hosted coordinator.
    args.extend(["--set", "run.steps=1000000", "--heartbeat-timeout", "5"].map(String::from));
    cmd.args(&args);
    let job = Watched::spawn(cmd);
    job.wait_for_lines("data-plane ring connected", 3, LIMIT);
    let victims = pids_with(&mark, 2);
    assert_eq!(victims.len(), 1, "the process of rank 2: {victims:?}");
    // SIGSTOP: alive (its sockets stay open) but silent, so only heartbeats can tell.
    unsafe {
        libc::kill(victims[0], libc::SIGSTOP);
    }
    let stopped_at = Instant::now();
    let mut others_gone = false;
    while stopped_at.elapsed() < Duration::from_secs(30) {
        if pids_with(&mark, 0).is_empty() && pids_with(&mark, 1).is_empty() {
            others_gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = stopped_at.elapsed();
    unsafe {
        libc::kill(victims[0], libc::SIGKILL);
    }
    let f = job.finish(LIMIT);
    assert!(others_gone, "ranks 0 and 1 still ran 30 s after rank 2 stopped\n{}", f.stderr);
    assert!(took < Duration::from_secs(15), "the others took {took:?} to stop\n{}", f.stderr);
    assert!(!f.status.success(), "srun exited 0\n{}", f.all_output());
    assert!(f.stderr.contains("job aborted"), "{}", f.stderr);
    let abort = f
        .stderr
        .lines()
        .find(|l| l.contains("missed its heartbeat budget"))
        .unwrap_or_else(|| panic!("no heartbeat abort\n{}", f.stderr));
    assert!(abort.contains("rank 2"), "the abort blames another rank: {abort}");
}

#[test]
fn hostlists_expand_like_scontrol_show_hostnames() {
    require("scontrol");
    let lists = [
        "vm",
        "n[1-3]",
        "n[001-003]",
        "n[8-10]",
        "n[098-101]",
        "n[1-010]",
        "x[01-3]",
        "n[5,1-2,9]",
        "n[1,1]",
        "a[1-2]b[3,5]",
        "a[01-2]b[3]",
        "a[1-2]bb[3-4]",
        "r[1-2]-n[01-02]",
        "login,gpu[01-02],cpu[1,3],z",
        "a,,b",
        "[1-2]",
        "c[1-2],c[1-2]",
        "n[0-1500]",
    ];
    for list in lists {
        let out = Command::new("scontrol").args(["show", "hostnames", list]).output().unwrap();
        assert!(out.status.success(), "scontrol show hostnames {list}: {out:?}");
        let want: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        assert!(!want.is_empty(), "scontrol show hostnames {list}: {out:?}");
        let got = hostlist::expand(list).unwrap_or_else(|e| panic!("{list}: {e}"));
        assert_eq!(got, want, "{list}");
    }
    // Lists scontrol calls invalid are refused here too.
    for list in ["n[3-1]", "n[a]", "n[]", "n[1,,2]", "n[1[2]]", "n[-2]", "n[1-2-3]"] {
        let out = Command::new("scontrol").args(["show", "hostnames", list]).output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("Invalid hostlist"), "scontrol accepted {list}: {said}");
        assert!(hostlist::expand(list).is_err(), "{list} was accepted");
    }
}
