//! `tessera run`: a coordinator on loopback plus N rank processes on this machine.
//!
//! The launcher prefixes every line a rank prints with its rank, forwards Ctrl-C/SIGTERM, shows
//! a progress bar fed by the ranks' heartbeats, and when a rank dies, tells the coordinator (which
//! aborts every other rank), stops what is left, and exits non-zero naming the rank and its exit
//! status. When every rank succeeds it prints rank 0's report (the JSON summary) last, on stdout.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_coordinator::{AbortInfo, CoordinatorConfig, CoordinatorHandle};

use crate::TrainArgs;

/// How long the other ranks get to exit by themselves after one failed, before SIGKILL.
const GRACE: Duration = Duration::from_secs(10);
/// How long a rank the coordinator declared failed (e.g. no heartbeats: stopped or hung) gets
/// before SIGKILL.
const CULPRIT_GRACE: Duration = Duration::from_secs(2);

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Describes an exit status for people: "exit code 3" or "signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            format!("signal {sig}{name}")
        }
        None => "unknown status".into(),
    }
}

/// An error and its causes on one line, as anyhow's `{:#}` writes them, less the causes the
/// message before already ends with: many errors put their source into their own message
/// ("reading config file x.toml: No such file or directory") and also name it as their
/// source, which `{:#}` would print a second time.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// What the launcher is running: the arguments after `tessera rank`, and the step count for
/// the progress bar.
pub struct JobSpec {
    pub rank_args: Vec<String>,
    pub total_steps: Option<u64>,
    pub label: String,
    /// How often a failed job is restarted (`tessera run --max-restarts`); 0 for benchmarks.
    pub max_restarts: u32,
    /// Arguments added to every rank's command line on a restart (resume from a checkpoint).
    pub restart_args: Vec<String>,
    /// Said when restarting, after the restart count: what the restart resumes from.
    pub restart_note: String,
    /// Whether `restart_args` apply now (checked at each restart; `None`: always).
    pub restart_when: Option<Box<dyn Fn() -> bool>>,
}

pub fn run_training(
    nproc: usize,
    train: &TrainArgs,
    heartbeat_timeout: f64,
    max_restarts: u32,
) -> Result<ExitCode> {
    if nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    // Resolve once here so that a bad config fails before any process starts, and print it.
    let cfg = train.job.load()?;
    cfg.check_world(nproc).map_err(|e| anyhow::anyhow!("{e} (--nproc {nproc})"))?;
    std::fs::create_dir_all(&cfg.run.out_dir)
        .with_context(|| format!("creating run.out_dir {}", cfg.run.out_dir.display()))?;
    let resolved = cfg.run.out_dir.join("config.toml");
    tessera_rank::atomic_file::write_atomic(&resolved, cfg.to_toml().as_bytes())?;
    eprintln!("# resolved config (saved to {})", resolved.display());
    eprint!("{}", cfg.to_toml());
    let rank_args = train.job.to_args();
    // A restarted job resumes from its newest checkpoint (a fresh start when there is none),
    // or, when the user resumed from a checkpoint elsewhere and the job has not written one of
    // its own yet, from that one again (see `restart_args_now`).
    let restart_args = vec!["--set".to_string(), "checkpoint.resume=\"auto\"".to_string()];
    let ckpt_dir = cfg.checkpoint.dir_for(&cfg.run.out_dir);
    let restart_note = if cfg.checkpoint.enabled {
        format!(" from the newest checkpoint in {}, if any", ckpt_dir.display())
    } else {
        " from step 0 (checkpoint.enabled = false)".to_string()
    };
    let user_resume = !cfg.checkpoint.resume.is_empty() && cfg.checkpoint.resume != "auto";
    let spec = JobSpec {
        rank_args,
        total_steps: Some(cfg.run.steps),
        label: "train".into(),
        max_restarts,
        restart_args,
        restart_note,
        // The user's own resume point stays in force until the job saved a checkpoint.
        restart_when: Some(Box::new(move || {
            !user_resume
                || tessera_rank::checkpoint::list_checkpoints(&ckpt_dir)
                    .is_ok_and(|found| !found.is_empty())
        })),
    };
    launch(nproc, &spec, heartbeat_timeout)
}

struct Printer {
    bar: ProgressBar,
    lock: Mutex<()>,
}

impl Printer {
    fn line(&self, to_stderr: bool, text: &str) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.bar.suspend(|| {
            if to_stderr {
                let _ = writeln!(std::io::stderr(), "{text}");
            } else {
                let _ = writeln!(std::io::stdout(), "{text}");
            }
        });
    }
}

fn forward_lines(
    stream: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    printer: Arc<Printer>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            printer.line(to_stderr, &format!("{prefix}{}", text.trim_end_matches('\r')));
        }
    })
}

fn signal_children(children: &mut [Option<Child>], sig: libc::c_int) {
    for child in children.iter_mut().flatten() {
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
    }
}

/// SIGKILL to every child not reaped yet, remembering which were sent one.
fn kill_children(children: &mut [Option<Child>], sent: &mut [bool]) {
    for (child, sent) in children.iter().zip(sent.iter_mut()) {
        *sent |= child.is_some();
    }
    signal_children(children, libc::SIGKILL);
}

/// How one attempt of a job ended.
enum Attempt {
    /// Every rank exited 0; rank 0's report.
    Succeeded(String),
    /// A rank failed; what to tell the user.
    Failed(String),
    /// The launcher got SIGINT/SIGTERM.
    Interrupted(i32),
}

/// Starts the coordinator and `nproc` ranks running `spec`, and supervises them. A failed
/// attempt is restarted up to `spec.max_restarts` times, each restart a new generation.
pub fn launch(nproc: usize, spec: &JobSpec, heartbeat_timeout: f64) -> Result<ExitCode> {
    if nproc == 0 {
        bail!("--nproc must be at least 1");
    }
    install_signal_handlers();
    let report_dir = tempdir_for_reports()?;
    let mut generation = 1u64;
    let result = loop {
        let restarting = generation > 1 && spec.restart_when.as_ref().is_none_or(|f| f());
        let extra: &[String] = if restarting { &spec.restart_args } else { &[] };
        match run_attempt(nproc, spec, heartbeat_timeout, generation, extra, &report_dir) {
            Err(e) => break Err(e),
            Ok(Attempt::Succeeded(report)) => {
                print!("{report}");
                if !report.ends_with('\n') {
                    println!();
                }
                break Ok(ExitCode::SUCCESS);
            }
            Ok(Attempt::Interrupted(sig)) => {
                eprintln!("tessera run: interrupted by signal {sig}; all ranks stopped");
                break Ok(ExitCode::from(130));
            }
            Ok(Attempt::Failed(why)) => {
                eprintln!("tessera run: {why}");
                let restarts = generation - 1;
                if restarts < u64::from(spec.max_restarts) {
                    eprintln!(
                        "tessera run: restart {} of {} (generation {}){}",
                        restarts + 1,
                        spec.max_restarts,
                        generation + 1,
                        spec.restart_note
                    );
                    generation += 1;
                    continue;
                }
                if spec.max_restarts > 0 {
                    eprintln!(
                        "tessera run: giving up: the job failed {} times (--max-restarts {})",
                        restarts + 1,
                        spec.max_restarts
                    );
                }
                break Ok(ExitCode::FAILURE);
            }
        }
    };
    let _ = std::fs::remove_dir_all(&report_dir);
    result
}

/// One attempt: a coordinator of `generation` and `nproc` ranks, supervised until they exit.
fn run_attempt(
    nproc: usize,
    spec: &JobSpec,
    heartbeat_timeout: f64,
    generation: u64,
    extra_args: &[String],
    report_dir: &std::path::Path,
) -> Result<Attempt> {
    let token = tessera_coordinator::generate_token();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the coordinator's runtime")?;
    let coord_cfg = CoordinatorConfig {
        heartbeat_timeout: Duration::from_secs_f64(heartbeat_timeout),
        generation,
        ..CoordinatorConfig::new(nproc, token.clone())
    };
    let coordinator: CoordinatorHandle = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the coordinator on 127.0.0.1")?;
        tessera_coordinator::serve(coord_cfg, listener).await.context("starting the coordinator")
    })?;
    let addr = coordinator.local_addr().to_string();

    let report_file = report_dir.join("report");
    let _ = std::fs::remove_file(&report_file);

    let bar = match spec.total_steps {
        Some(n) => {
            let b = ProgressBar::new(n);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] step {pos}/{len} {elapsed_precise} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        }
        None => ProgressBar::hidden(),
    };
    let printer = Arc::new(Printer { bar: bar.clone(), lock: Mutex::new(()) });

    let exe = std::env::current_exe().context("locating the tessera executable")?;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    let mut forwarders = Vec::new();
    for i in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.arg("rank")
            .args(&spec.rank_args)
            .args(extra_args)
            .env("TESSERA_COORDINATOR", &addr)
            .env("TESSERA_TOKEN", &token)
            .env("TESSERA_LAUNCH_RANK", i.to_string())
            .env("TESSERA_LAUNCH_WORLD", nproc.to_string())
            .env("TESSERA_LOCAL_RANK", i.to_string())
            .env("TESSERA_LOCAL_WORLD", nproc.to_string())
            .env("TESSERA_REPORT_FILE", &report_file)
            .env("TESSERA_GENERATION", generation.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                signal_children(&mut children, libc::SIGKILL);
                return Err(e).with_context(|| format!("starting rank {i} ({})", exe.display()));
            }
        };
        let prefix = format!("[rank {i}] ");
        if let Some(out) = child.stdout.take() {
            forwarders.push(forward_lines(out, prefix.clone(), false, printer.clone()));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(forward_lines(err, prefix, true, printer.clone()));
        }
        children.push(Some(child));
    }

    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    // The coordinator's abort (a missed heartbeat, a reported error), the launcher index of
    // the rank it blames, and when it was seen: a rank declared dead but still there (stopped,
    // hung) is killed after a short grace, so that every rank is gone within seconds.
    let mut coord_abort: Option<(AbortInfo, Option<usize>, Instant)> = None;
    let mut interrupted: Option<(i32, Instant)> = None;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; nproc];
    // The ranks this launcher sent SIGKILL: a rank killed by SIGKILL that is not among them
    // was killed from outside the job.
    let mut kill_sent = vec![false; nproc];
    loop {
        let mut failed_now: Vec<(usize, ExitStatus)> = Vec::new();
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    statuses[i] = Some(status);
                    *slot = None;
                    if !status.success() {
                        failed_now.push((i, status));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    printer.line(true, &format!("tessera run: waiting for rank {i}: {e}"));
                }
            }
        }
        // Of the ranks that failed since the last look, blame one killed by a signal first:
        // the others most likely exited because they lost that peer.
        // Then one with an exit code of its own (ranks that lost a peer exit with 1).
        failed_now
            .sort_by_key(|(i, status)| (status.signal().is_none(), status.code() == Some(1), *i));
        if let Some(&(i, status)) = failed_now.first()
            && first_failure.is_none()
            && interrupted.is_none()
        {
            first_failure = Some((i, status));
            failed_at = Some(Instant::now());
            coordinator.mark_failed(i as u32, &format!("exited with {}", describe_status(status)));
        }
        if coord_abort.is_none()
            && interrupted.is_none()
            && let Some(abort) = coordinator.abort_info()
        {
            let culprit = abort.rank.and_then(|r| {
                coordinator
                    .progress()
                    .into_iter()
                    .find(|p| p.rank == r)
                    .and_then(|p| p.launcher_rank)
                    .map(|l| l as usize)
                    .filter(|&l| l < nproc)
            });
            coord_abort = Some((abort, culprit, Instant::now()));
            failed_at.get_or_insert_with(Instant::now);
        }
        if let Some((_, Some(c), seen)) = &coord_abort
            && seen.elapsed() > CULPRIT_GRACE
            && let Some(child) = children[*c].as_mut()
        {
            // SAFETY: kill(2) on a child we spawned and have not reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
            kill_sent[*c] = true;
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if interrupted.is_none() {
                printer.line(
                    true,
                    &format!("tessera run: got signal {sig}; stopping the ranks (again to kill)"),
                );
                interrupted = Some((sig, Instant::now()));
                signal_children(&mut children, libc::SIGTERM);
            } else {
                kill_children(&mut children, &mut kill_sent);
            }
        }
        let deadline_passed = failed_at.is_some_and(|t| t.elapsed() > GRACE)
            || interrupted.is_some_and(|(_, t)| t.elapsed() > GRACE);
        if deadline_passed {
            kill_children(&mut children, &mut kill_sent);
        }
        if let Some(progress) =
            coordinator.progress().into_iter().find(|p| p.rank == 0).and_then(|p| p.progress)
        {
            bar.set_position(progress.step);
            if let Some(loss) = progress.loss {
                let gns = progress.b_simple.map_or(String::new(), |b| format!(" B_simple {b:.0}"));
                bar.set_message(format!("{} loss {loss:.4}{gns}", spec.label));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for f in forwarders {
        let _ = f.join();
    }
    bar.finish_and_clear();
    if let Err(e) = runtime.block_on(coordinator.shutdown()) {
        eprintln!("tessera run: stopping the coordinator: {e}");
    }
    drop(runtime);

    if let Some((sig, _)) = interrupted {
        return Ok(Attempt::Interrupted(sig));
    }
    // Blame a rank killed by a signal first (the others most likely failed because they lost
    // it), preferring the one the coordinator blamed (it knows about missed heartbeats and
    // reported errors); else the coordinator's culprit; else the first rank that failed.
    let coord_culprit = coord_abort.as_ref().and_then(|(a, c, _)| c.map(|c| (c, a.reason.clone())));
    let killed = |i: usize| statuses[i].is_some_and(|st| st.signal().is_some());
    let blamed = match coord_culprit {
        Some((c, why)) if killed(c) => statuses[c].map(|st| (c, st, Some(why))),
        _ => (0..nproc)
            .find(|&i| killed(i))
            .and_then(|i| statuses[i].map(|st| (i, st, None)))
            .or(first_failure.map(|(i, st)| (i, st, None))),
    };
    if let Some((rank, status, why)) = blamed {
        let why = why
            .filter(|w| !w.starts_with("exited with"))
            .map_or(String::new(), |w| format!(": {w}"));
        let others: Vec<String> = statuses
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != rank)
            .map(|(i, s)| format!("rank {i}: {}", s.map_or("not reaped".into(), describe_status)))
            .collect();
        let outside = if status.signal() == Some(libc::SIGKILL) && !kill_sent[rank] {
            format!(
                "; nothing in this job sent rank {rank} its SIGKILL: most often it is the \
                 kernel's out-of-memory killer (`dmesg` or `journalctl -k` says), else a \
                 scheduler's limit or a person"
            )
        } else {
            String::new()
        };
        return Ok(Attempt::Failed(format!(
            "rank {rank} failed ({}){why}; the other ranks were stopped [{}]{outside}",
            describe_status(status),
            others.join(", ")
        )));
    }
    match std::fs::read_to_string(&report_file) {
        Ok(report) => Ok(Attempt::Succeeded(report)),
        Err(e) => Ok(Attempt::Failed(format!(
            "every rank exited 0 but rank 0 wrote no report to {}: {e}",
            report_file.display()
        ))),
    }
}

fn tempdir_for_reports() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tessera-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `tessera coordinator`: serve until every rank finished (exit 0) or the job aborted (exit 1).
pub fn standalone_coordinator(
    bind: &str,
    world: usize,
    heartbeat_timeout: f64,
    join_timeout: f64,
    generation: u64,
) -> Result<ExitCode> {
    let token = std::env::var("TESSERA_TOKEN").context(
        "the standalone coordinator needs the job token in TESSERA_TOKEN (any secret string, \
         the same for every rank)",
    )?;
    if world == 0 {
        bail!("--world must be at least 1");
    }
    let cfg = CoordinatorConfig {
        heartbeat_timeout: Duration::from_secs_f64(heartbeat_timeout),
        join_timeout: Duration::from_secs_f64(join_timeout),
        generation,
        ..CoordinatorConfig::new(world, token)
    };
    let outcome = tessera_coordinator::run_standalone(cfg, bind, |addr| {
        eprintln!("tessera coordinator: listening on {addr} for {world} ranks");
    });
    match outcome {
        Ok(()) => {
            eprintln!("tessera coordinator: all {world} ranks finished");
            Ok(ExitCode::SUCCESS)
        }
        Err(tessera_coordinator::CoordinatorError::Aborted(info)) => {
            eprintln!("tessera coordinator: job aborted: {info}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Err(e).context(format!("running the coordinator on {bind}")),
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;
    use anyhow::Context;

    #[test]
    fn error_chain_prints_each_cause_once() {
        let read = tessera_rank::config::Config::load(
            Some(std::path::Path::new("/nonexistent/tessera.toml")),
            &[],
        )
        .map_err(anyhow::Error::from)
        .unwrap_err();
        let text = error_chain(&read);
        assert_eq!(text.matches("No such file or directory").count(), 1, "{text}");
        assert!(text.starts_with("reading config file /nonexistent/tessera.toml: "), "{text}");

        // Causes that are not part of the message above them are all kept, in order.
        let io = std::io::Error::other("disk full");
        let e = Err::<(), _>(io).context("writing x").context("saving step 3").unwrap_err();
        assert_eq!(error_chain(&e), "saving step 3: writing x: disk full");
    }
}
