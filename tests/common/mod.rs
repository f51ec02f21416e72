//! Helpers for the multi-process tests: run the real `tessera` binary, with deadlines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("TESSERA_COORDINATOR").env_remove("TESSERA_TOKEN");
    c.env_remove("TESSERA_REPORT_FILE").env_remove("TESSERA_LAUNCH_RANK");
    // Tests run under `cargo test`, maybe inside an sbatch or mpirun job: what a launcher set
    // for the test process must not make the ranks started here think they are its ranks.
    const LAUNCHER_PREFIXES: &[&str] =
        &["TESSERA_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "MPI_LOCALRANKID"];
    const TORCHRUN: &[&str] =
        &["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"];
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if LAUNCHER_PREFIXES.iter().any(|p| k.starts_with(p)) || TORCHRUN.contains(&k.as_ref()) {
            c.env_remove(k.as_ref());
        }
    }
    c
}

/// `tessera run --nproc N [--config C] [--set S]... EXTRA... --set run.out_dir=OUT`.
pub fn run_command(
    nproc: usize,
    config: Option<&Path>,
    sets: &[&str],
    extra: &[&str],
    out: &Path,
) -> Command {
    let mut cmd = tessera();
    cmd.args(["run", "--nproc", &nproc.to_string()]);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.args(extra);
    cmd.arg("--set").arg(format!("run.out_dir={:?}", out.display().to_string()));
    cmd
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn all_output(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs a command to completion; kills it and panics if it outlives `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Finished {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawning tessera");
    wait(child, limit)
}

/// Collects a child's output and waits for it, with a deadline.
pub fn wait(mut child: Child, limit: Duration) -> Finished {
    let start = Instant::now();
    let out = child.stdout.take().map(read_all);
    let err = child.stderr.take().map(read_all);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.map(|h| h.join().unwrap()).unwrap_or_default();
            let stderr = err.map(|h| h.join().unwrap()).unwrap_or_default();
            panic!(
                "process still running after {limit:?}: killed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let stdout = out.map(|h| h.join().unwrap()).unwrap_or_default();
    let stderr = err.map(|h| h.join().unwrap()).unwrap_or_default();
    Finished { status, stdout, stderr, elapsed }
}

fn read_all(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// A standalone coordinator on 127.0.0.1:0; its address is read from its first line.
pub struct Coordinator {
    pub child: Child,
    pub addr: String,
    pub token: String,
    lines: mpsc::Receiver<String>,
}

impl Coordinator {
    pub fn start(world: usize, extra: &[&str]) -> Coordinator {
        let token = format!("test-token-{}", std::process::id());
        let mut child = tessera()
            .args(["coordinator", "--bind", "127.0.0.1:0", "--world", &world.to_string()])
            .args(extra)
            .env("TESSERA_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the coordinator");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("the coordinator never said where it listens");
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        Coordinator { child, addr, token, lines: rx }
    }

    /// A `tessera rank` process for this coordinator (output piped).
    pub fn rank(
        &self,
        launch_rank: Option<usize>,
        world: usize,
        args: &[&str],
        out_dir: &Path,
    ) -> Child {
        let mut cmd = self.rank_command(launch_rank, world, args, out_dir);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.spawn().expect("spawning a rank")
    }

    /// The command line of a `tessera rank` process for this coordinator.
    pub fn rank_command(
        &self,
        launch_rank: Option<usize>,
        world: usize,
        args: &[&str],
        out_dir: &Path,
    ) -> Command {
        let mut cmd = tessera();
        cmd.arg("rank")
            .args(args)
            .arg("--set")
            .arg(format!("run.out_dir={:?}", out_dir.display().to_string()))
            .env("TESSERA_COORDINATOR", &self.addr)
            .env("TESSERA_TOKEN", &self.token)
            .env("TESSERA_LAUNCH_WORLD", world.to_string());
        if let Some(r) = launch_rank {
            cmd.env("TESSERA_LAUNCH_RANK", r.to_string()).env("TESSERA_LOCAL_RANK", r.to_string());
        }
        cmd
    }

    /// The coordinator's remaining output, once it has exited (or been killed).
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.try_iter().collect::<Vec<_>>().join("\n")
    }
}

/// The stdout lines that are JSON objects (`--json` benchmark rows).
pub fn json_rows(f: &Finished) -> Vec<serde_json::Value> {
    f.stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON row {l:?}: {e}")))
        .collect()
}

/// Reads the last line of stdout as the JSON summary.
pub fn summary(f: &Finished) -> serde_json::Value {
    let line = f
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary line\n{}", f.all_output()));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad summary {line:?}: {e}"))
}

/// Reads a raw little-endian f32 file.
pub fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A child whose stderr is watched line by line while it runs (stdout is collected).
pub struct Watched {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Watched {
    /// Spawns `cmd` with `TESSERA_LOG=info`, so ranks say when their ring is connected.
    pub fn spawn(mut cmd: Command) -> Watched {
        cmd.env("TESSERA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning tessera");
        let stdout = child.stdout.take().map(read_all);
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Watched { child, lines: rx, stderr, stdout }
    }

    /// Blocks until `count` stderr lines containing `needle` have appeared; panics after `limit`.
    pub fn wait_for_lines(&self, needle: &str, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut seen = 0;
        while seen < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => seen += 1,
                Ok(_) => {}
                Err(_) => panic!(
                    "saw {seen} of {count} lines with {needle:?} within {limit:?}\n{}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    /// Waits for the exit (killing it after `limit`) and returns everything it printed.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "process still running after {limit:?}: killed\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = start.elapsed();
        let stdout = self.stdout.take().map(|h| h.join().unwrap()).unwrap_or_default();
        // The reader thread ends at EOF, shortly after the exit.
        let eof = Instant::now() + Duration::from_secs(5);
        while self.lines.recv_timeout(eof.saturating_duration_since(Instant::now())).is_ok() {}
        let stderr = self.stderr.lock().unwrap().clone();
        Finished { status, stdout, stderr, elapsed }
    }
}
