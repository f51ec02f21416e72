//! `tessera bench coordinator`: load on the coordinator from many simulated ranks.
//!
//! A real coordinator process (`tessera coordinator`) serves in-process simulated ranks: each
//! has its own connection, joins, opens its Watch stream and heartbeats at the interval the
//! coordinator asks for, like a rank process does. The coordinator's CPU time is read from
//! `/proc/PID/stat`, so the clients' own work is not counted.
//!
//! Phase "join": `--join-ranks` ranks join at once; the time from the first Join sent to the
//! last reply received (target: under 5 s). Phase "heartbeat": a fresh coordinator with
//! `--heartbeat-ranks` ranks that heartbeat for `--seconds`; the coordinator's CPU during that
//! window only, as a percentage of one core (target: under 5%). Every rank then finishes, and
//! the coordinator must exit with status 0. As real ranks do (`tessera rank
//! --heartbeat-relay`, on by default), each simulated node's first rank serves a heartbeat
//! relay (`tessera_coordinator::relay`) on loopback and the node's other ranks stream their
//! beats to it; `--heartbeat-relay false` has every rank heartbeat the coordinator itself.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tessera_coordinator::relay::{PendingBeats, serve_relay};
use tessera_proto::TOKEN_METADATA_KEY;
use tessera_proto::v1::coordinator_client::CoordinatorClient;
use tessera_proto::v1::heartbeat_relay_client::HeartbeatRelayClient;
use tessera_proto::v1::{self as pb, watch_event};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

#[derive(Args, Clone, Debug)]
pub struct CoordinatorBenchArgs {
    /// Simulated ranks that join at once (phase "join").
    #[arg(long, default_value_t = 1024)]
    pub join_ranks: usize,
    /// Simulated ranks that heartbeat (phase "heartbeat").
    #[arg(long, default_value_t = 4096)]
    pub heartbeat_ranks: usize,
    /// Length of the heartbeat window in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Heartbeats through one relay per simulated node, as ranks send them by default.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub heartbeat_relay: bool,
    /// One JSON object per phase instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Target of the join phase: the whole world joined within this many seconds.
const JOIN_TARGET_S: f64 = 5.0;
/// Target of the heartbeat phase: the coordinator's CPU, in percent of one core.
const HEARTBEAT_TARGET_PERCENT: f64 = 5.0;
/// Simulated ranks per simulated host (a node of 8 accelerators).
const RANKS_PER_HOST: usize = 8;
/// Connections opened at once while the simulated ranks connect.
const CONNECT_CONCURRENCY: usize = 128;
/// The coordinator's heartbeat budget. Generous, so that delivering thousands of large
/// JoinReplies on a small machine cannot exhaust it before the first heartbeats; it only
/// changes a threshold the coordinator compares against, not what heartbeats cost.
const COORDINATOR_HEARTBEAT_TIMEOUT_S: &str = "60";
/// Longest wait for any one RPC (a join waits for the whole world).
const RPC_LIMIT: Duration = Duration::from_secs(120);

/// One phase's figures (a `--json` row).
#[derive(Serialize, Debug)]
struct PhaseRow {
    phase: &'static str,
    ranks: usize,
    /// Join phase: first Join sent to last JoinReply received. Heartbeat phase: the window.
    seconds: f64,
    /// Time the ranks took to open their connections (before any Join).
    connect_seconds: f64,
    /// Heartbeat phase: how long the world took to form (informational).
    #[serde(skip_serializing_if = "Option::is_none")]
    join_seconds: Option<f64>,
    coordinator_cpu_s: f64,
    cpu_percent_of_one_core: f64,
    /// CPU of this process (the simulated ranks) over the same span.
    client_cpu_s: f64,
    joined: usize,
    rpcs_failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeats: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeats_per_s: Option<f64>,
    /// Heartbeat phase: messages the coordinator received per second (batches when relayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator_messages_per_s: Option<f64>,
    /// Heartbeat phase: whether ranks heartbeat through their node's relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_relay: Option<bool>,
    /// Watch streams that delivered Done after every rank finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    watch_done: Option<usize>,
    coordinator_exit_ok: bool,
    target: &'static str,
    met: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

pub fn bench_coordinator(a: &CoordinatorBenchArgs) -> Result<ExitCode> {
    if a.join_ranks == 0 || a.heartbeat_ranks == 0 {
        bail!("--join-ranks and --heartbeat-ranks must be at least 1");
    }
    if !(a.seconds.is_finite() && a.seconds >= 1.0) {
        bail!(
            "--seconds must be at least 1 (it is {}): the window spans heartbeat intervals",
            a.seconds
        );
    }
    raise_fd_limit(a.join_ranks.max(a.heartbeat_ranks))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tessera-bench-ranks")
        .build()
        .context("starting the tokio runtime of the simulated ranks")?;
    if !a.json {
        println!(
            "# coordinator load: in-process simulated ranks, one connection each, against a \
             `tessera coordinator` process; CPU from /proc/PID/stat"
        );
        println!(
            "{:>10} {:>6} {:>9} {:>12} {:>10} {:>8} {:>13} {:>20} {:>4}",
            "phase",
            "ranks",
            "seconds",
            "coord CPU s",
            "CPU % core",
            "RPC fail",
            "heartbeats/s",
            "target",
            "met"
        );
    }
    let join = rt.block_on(join_phase(a.join_ranks))?;
    print_row(&join, a.json)?;
    let heartbeat =
        rt.block_on(heartbeat_phase(a.heartbeat_ranks, a.seconds, a.heartbeat_relay))?;
    print_row(&heartbeat, a.json)?;
    rt.shutdown_timeout(Duration::from_secs(1));
    let mut problems = Vec::new();
    for row in [&join, &heartbeat] {
        if row.rpcs_failed > 0 {
            problems.push(format!(
                "{} RPCs failed in phase {} (first: {})",
                row.rpcs_failed,
                row.phase,
                row.first_error.as_deref().unwrap_or("?")
            ));
        }
        if !row.coordinator_exit_ok {
            problems.push(format!(
                "the coordinator of phase {} did not exit with status 0 after every rank finished",
                row.phase
            ));
        }
        if row.joined != row.ranks {
            problems.push(format!(
                "only {} of {} ranks joined in phase {}",
                row.joined, row.ranks, row.phase
            ));
        }
    }
    if let Some(done) = heartbeat.watch_done
        && done != heartbeat.ranks
    {
        problems.push(format!(
            "only {done} of {} Watch streams delivered Done after every rank finished",
            heartbeat.ranks
        ));
    }
    if !problems.is_empty() {
        bail!("the coordinator benchmark saw failures: {}", problems.join("; "));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_row(r: &PhaseRow, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        let hb = r.heartbeats_per_s.map_or_else(|| "-".to_owned(), |h| format!("{h:.1}"));
        println!(
            "{:>10} {:>6} {:>9.3} {:>12.3} {:>10.2} {:>8} {:>13} {:>20} {:>4}",
            r.phase,
            r.ranks,
            r.seconds,
            r.coordinator_cpu_s,
            r.cpu_percent_of_one_core,
            r.rpcs_failed,
            hb,
            r.target,
            if r.met { "yes" } else { "no" }
        );
    }
    Ok(())
}

/// Makes room for one socket per simulated rank in this process (and in the coordinator, which
/// inherits the limit): raises the soft RLIMIT_NOFILE up to the hard one.
fn raise_fd_limit(ranks: usize) -> Result<()> {
    let needed = (ranks + 512) as libc::rlim_t;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("reading the open-file limit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= needed {
        return Ok(());
    }
    if lim.rlim_max < needed {
        bail!(
            "{ranks} simulated ranks need about {needed} open files in this process and in the \
             coordinator, but the hard limit is {}: raise it (ulimit -n {needed} as root, or \
             LimitNOFILE) or simulate fewer ranks",
            lim.rlim_max
        );
    }
    let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        bail!(
            "raising the open-file limit from {} to {} failed ({}); raise it with ulimit -n {needed}",
            lim.rlim_cur,
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after the last
    // ')' start at field 3 (state); utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("no ')' in /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("field {} of {path} is not a tick count", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed: cannot convert clock ticks to seconds");
    }
    Ok(total as f64 / hz as f64)
}

/// A `tessera coordinator` process on 127.0.0.1:0. Dropping it kills it if it still runs.
struct CoordinatorProcess {
    child: Child,
    pid: String,
    addr: String,
    lines: mpsc::Receiver<String>,
    exited: Option<ExitStatus>,
}

impl CoordinatorProcess {
    fn start(world: usize, token: &str) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the tessera executable")?;
        let mut child = Command::new(&exe)
            .args(["coordinator", "--bind", "127.0.0.1:0", "--world", &world.to_string()])
            .args(["--heartbeat-timeout", COORDINATOR_HEARTBEAT_TIMEOUT_S])
            .env("TESSERA_TOKEN", token)
            // Logging must not be part of what is measured.
            .env("TESSERA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} coordinator", exe.display()))?;
        let stderr = child.stderr.take().context("the coordinator's stderr is not piped")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id().to_string();
        let mut me = Self { child, pid, addr: String::new(), lines, exited: None };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match me.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1)
                        && let Some(addr) = rest.split_whitespace().next()
                    {
                        me.addr = addr.to_owned();
                        return Ok(me);
                    }
                }
                Err(_) => bail!(
                    "the coordinator (pid {}) never said where it listens within 30 s: {}",
                    me.pid,
                    me.output()
                ),
            }
        }
    }

    fn cpu(&self) -> Result<f64> {
        cpu_seconds(&self.pid).context("measuring the coordinator's CPU time")
    }

    /// Whatever the coordinator printed that was not read yet.
    fn output(&self) -> String {
        let lines: Vec<String> = self.lines.try_iter().collect();
        if lines.is_empty() { "(no output)".into() } else { lines.join(" | ") }
    }

    /// Waits for the coordinator to exit after every rank finished; whether it exited with 0.
    fn wait_exit(&mut self, limit: Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the coordinator")? {
                self.exited = Some(status);
                if !status.success() {
                    eprintln!(
                        "tessera bench: the coordinator exited with {status}: {}",
                        self.output()
                    );
                }
                return Ok(status.success());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the coordinator (pid {}) still ran {limit:?} after every rank finished: {}",
                    self.pid,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Adds the job token to every call.
#[derive(Clone)]
struct Token(AsciiMetadataValue);

impl Interceptor for Token {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(TOKEN_METADATA_KEY, self.0.clone());
        Ok(req)
    }
}

type Grpc = CoordinatorClient<InterceptedService<Channel, Token>>;
type RelayGrpc = HeartbeatRelayClient<InterceptedService<Channel, Token>>;
type BeatsCall = std::pin::Pin<
    Box<dyn Future<Output = Result<tonic::Response<pb::HeartbeatReply>, Status>> + Send>,
>;

fn bench_token() -> Result<AsciiMetadataValue> {
    let token = tessera_coordinator::generate_token();
    AsciiMetadataValue::try_from(token.as_str()).context("the generated job token is not ASCII")
}

/// A simulated rank's endpoint (to the coordinator or its node's relay), configured as the real
/// client's (coordinator/src/client.rs): keep-alive PINGs every 5 s.
fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// Opens one connection per simulated rank, `CONNECT_CONCURRENCY` at a time.
async fn connect_all(addr: &str, token: &AsciiMetadataValue, n: usize) -> Result<Vec<Grpc>> {
    let endpoint = endpoint(addr).with_context(|| format!("coordinator address {addr}"))?;
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for i in 0..n {
        let (endpoint, permits, token) = (endpoint.clone(), permits.clone(), token.clone());
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let channel = endpoint.connect().await;
            (i, channel.map(|c| CoordinatorClient::with_interceptor(c, Token(token))))
        });
    }
    let mut clients: Vec<Option<Grpc>> = (0..n).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        let (i, client) = done.context("a connecting task panicked")?;
        let client = client.with_context(|| {
            format!(
                "simulated rank {i} could not connect to the coordinator at {addr} (if the \
                 error is 'too many open files', raise ulimit -n)"
            )
        })?;
        clients[i] = Some(client);
    }
    clients.into_iter().map(|c| c.context("a simulated rank has no connection")).collect()
}

fn join_request(i: usize, world: usize) -> pb::JoinRequest {
    let node = i / RANKS_PER_HOST;
    let local = i % RANKS_PER_HOST;
    pb::JoinRequest {
        host: format!("sim-node-{node}"),
        local_rank: Some(local as u32),
        pid: 1_000_000 + i as u32,
        launcher_rank: Some(i as i32),
        launcher_world: Some(world as u32),
        config_hash: "bench-coordinator".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        data_addr: format!("10.{}.{}.1:{}", node / 256, node % 256, 29500 + local),
        generation: None,
    }
}

/// What the whole world's join gave: each rank's number and the heartbeat interval.
struct Joined {
    ranks: Vec<u32>,
    /// The node leader (heartbeat relay) of each rank.
    leaders: Vec<u32>,
    interval: Duration,
    /// First Join sent to last JoinReply received.
    seconds: f64,
}

/// Every simulated rank joins at once.
async fn join_all(clients: &[Grpc]) -> Result<Joined> {
    let n = clients.len();
    let mut set = JoinSet::new();
    let start = Instant::now();
    for (i, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let req = join_request(i, n);
        set.spawn(async move {
            let reply = tokio::time::timeout(RPC_LIMIT, client.join(req)).await;
            let at = Instant::now();
            let reply = match reply {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    Ok((r.rank, r.world, r.heartbeat_interval_ms, r.next_data_addr, r.node_leader))
                }
                Ok(Err(s)) => Err(format!("{} ({:?})", s.message(), s.code())),
                Err(_) => Err(format!("no JoinReply within {RPC_LIMIT:?}")),
            };
            (i, at, reply)
        });
    }
    let mut last = start;
    let mut ranks = vec![u32::MAX; n];
    let mut leaders = vec![u32::MAX; n];
    let mut interval_ms = None;
    while let Some(done) = set.join_next().await {
        let (i, at, reply) = done.context("a joining task panicked")?;
        let (rank, world, hb_ms, next_addr, leader) =
            reply.map_err(|e| anyhow::anyhow!("simulated rank {i}: join failed: {e}"))?;
        if world as usize != n {
            bail!("simulated rank {i} was told world {world}, expected {n}");
        }
        if rank as usize != i {
            bail!("simulated rank {i} (launcher rank {i}) was given rank {rank}");
        }
        let expected = join_request((i + 1) % n, n).data_addr;
        if next_addr != expected {
            bail!("simulated rank {i} was told next data address {next_addr}, expected {expected}");
        }
        if leader as usize != i / RANKS_PER_HOST * RANKS_PER_HOST {
            bail!("simulated rank {i} was told node leader {leader}");
        }
        leaders[i] = leader;
        match interval_ms {
            None => interval_ms = Some(hb_ms),
            Some(ms) if ms != hb_ms => {
                bail!("ranks were told different heartbeat intervals ({ms} and {hb_ms} ms)")
            }
            Some(_) => {}
        }
        ranks[i] = rank;
        last = last.max(at);
    }
    let interval_ms = interval_ms.unwrap_or(0);
    if interval_ms == 0 {
        bail!("the coordinator asked for heartbeats every 0 ms");
    }
    Ok(Joined {
        ranks,
        leaders,
        interval: Duration::from_millis(u64::from(interval_ms)),
        seconds: (last - start).as_secs_f64(),
    })
}

/// Failed RPCs and the first failure's text.
#[derive(Default)]
struct Failures {
    count: u64,
    first: Option<String>,
}

impl Failures {
    fn add(&mut self, what: String) {
        self.count += 1;
        self.first.get_or_insert(what);
    }

    fn merge(&mut self, other: Failures) {
        self.count += other.count;
        if self.first.is_none() {
            self.first = other.first;
        }
    }
}

/// Every rank calls Finish at once.
async fn finish_all(clients: &[Grpc], ranks: &[u32]) -> Failures {
    let mut set = JoinSet::new();
    for (client, &rank) in clients.iter().zip(ranks) {
        let mut client = client.clone();
        set.spawn(async move {
            match tokio::time::timeout(RPC_LIMIT, client.finish(pb::FinishRequest { rank })).await {
                Ok(Ok(_)) => None,
                Ok(Err(s)) => {
                    Some(format!("rank {rank}: finish: {} ({:?})", s.message(), s.code()))
                }
                Err(_) => Some(format!("rank {rank}: finish: no answer within {RPC_LIMIT:?}")),
            }
        });
    }
    let mut failures = Failures::default();
    while let Some(done) = set.join_next().await {
        match done {
            Ok(None) => {}
            Ok(Some(e)) => failures.add(e),
            Err(e) => failures.add(format!("a finishing task failed: {e}")),
        }
    }
    failures
}

async fn join_phase(n: usize) -> Result<PhaseRow> {
    let token = bench_token()?;
    let mut coord = CoordinatorProcess::start(n, token.to_str().unwrap_or_default())?;
    let connect_start = Instant::now();
    let clients = connect_all(&coord.addr, &token, n).await?;
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let (cpu0, me0) = (coord.cpu()?, cpu_seconds("self")?);
    let joined = join_all(&clients).await.with_context(|| coord.output())?;
    let (cpu1, me1) = (coord.cpu()?, cpu_seconds("self")?);
    let failures = finish_all(&clients, &joined.ranks).await;
    drop(clients);
    let exit_ok = coord.wait_exit(Duration::from_secs(60))?;
    let coordinator_cpu_s = cpu1 - cpu0;
    Ok(PhaseRow {
        phase: "join",
        ranks: n,
        seconds: joined.seconds,
        connect_seconds,
        join_seconds: None,
        coordinator_cpu_s,
        cpu_percent_of_one_core: 100.0 * coordinator_cpu_s / joined.seconds.max(1e-9),
        client_cpu_s: me1 - me0,
        joined: joined.ranks.len(),
        rpcs_failed: failures.count,
        interval_s: None,
        heartbeats: None,
        heartbeats_per_s: None,
        coordinator_messages_per_s: None,
        heartbeat_relay: None,
        watch_done: None,
        coordinator_exit_ok: exit_ok,
        target: "join < 5 s",
        met: joined.seconds < JOIN_TARGET_S,
        first_error: failures.first,
    })
}

/// A heartbeating rank's count: heartbeats sent inside the window, failures.
struct RankRun {
    stream: Option<Streaming<pb::WatchEvent>>,
    in_window: u64,
    failures: Failures,
}

/// Where a simulated rank sends its heartbeats.
enum Upstream {
    /// To the coordinator, one message per beat.
    Direct(Grpc),
    /// This rank relays its node: a batch of the beats in `PendingBeats` with its own.
    Relay(Grpc, Arc<PendingBeats>),
    /// To the node's relay.
    ViaRelay(RelayGrpc),
}

/// One simulated rank's monitor, like the real client's: heartbeats every `interval` from
/// `first` on (the Watch stream listened to meanwhile) until `end`.
async fn heartbeat_rank(
    upstream: Upstream,
    mut stream: Streaming<pb::WatchEvent>,
    rank: u32,
    first: Instant,
    interval: Duration,
    window: (Instant, Instant),
) -> RankRun {
    let (start, end) = window;
    let mut failures = Failures::default();
    let mut in_window = 0u64;
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = (interval * 5).max(Duration::from_secs(5));
    let mut step = 0u64;
    // As a rank's monitor does: one long-lived heartbeat stream.
    let (beat_tx, beat_rx) = tokio::sync::mpsc::channel::<pb::HeartbeatRequest>(4);
    let (batch_tx, batch_rx) = tokio::sync::mpsc::channel::<pb::HeartbeatBatch>(4);
    let beats_rx = tokio_stream::wrappers::ReceiverStream::new(beat_rx);
    let batches_rx = tokio_stream::wrappers::ReceiverStream::new(batch_rx);
    let (pending, beats): (Option<Arc<PendingBeats>>, BeatsCall) = match upstream {
        Upstream::Direct(mut c) => (None, Box::pin(async move { c.heartbeats(beats_rx).await })),
        Upstream::Relay(mut c, p) => {
            (Some(p), Box::pin(async move { c.relayed_heartbeats(batches_rx).await }))
        }
        Upstream::ViaRelay(mut c) => (None, Box::pin(async move { c.heartbeats(beats_rx).await })),
    };
    tokio::pin!(beats);
    loop {
        tokio::select! {
            biased;
            ended = &mut beats => {
                let what = match ended {
                    Ok(_) => "ended".to_string(),
                    Err(s) => format!("{} ({:?})", s.message(), s.code()),
                };
                failures.add(format!("rank {rank}: heartbeat stream before finishing: {what}"));
                return RankRun { stream: Some(stream), in_window, failures };
            }
            msg = stream.message() => {
                let what = match msg {
                    Ok(Some(pb::WatchEvent { event: Some(watch_event::Event::Abort(a)) })) => {
                        format!("aborted: {}", a.reason)
                    }
                    Ok(Some(ev)) => format!("unexpected event {ev:?}"),
                    Ok(None) => "the stream ended".into(),
                    Err(s) => format!("{} ({:?})", s.message(), s.code()),
                };
                failures.add(format!("rank {rank}: watch before finishing: {what}"));
                return RankRun { stream: None, in_window, failures };
            }
            _ = ticker.tick() => {
                if Instant::now() >= end {
                    return RankRun { stream: Some(stream), in_window, failures };
                }
                step += 1;
                let req = pb::HeartbeatRequest {
                    rank,
                    step: Some(step),
                    loss: Some(1.0 / step as f32),
                    samples: Some(step * 256),
                    b_simple: None,
                };
                let sent = match &pending {
                    Some(p) => {
                        let batch = p.take_batch(rank, req);
                        tokio::time::timeout(limit, batch_tx.send(batch)).await.map(|r| r.is_ok())
                    }
                    None => tokio::time::timeout(limit, beat_tx.send(req)).await.map(|r| r.is_ok()),
                };
                match sent {
                    Ok(true) => {
                        let at = Instant::now();
                        if at >= start && at <= end {
                            in_window += 1;
                        }
                    }
                    Ok(false) => failures.add(format!("rank {rank}: the heartbeat stream closed")),
                    Err(_) => failures.add(format!(
                        "rank {rank}: heartbeat: not taken within {limit:?}"
                    )),
                }
            }
        }
    }
}

/// Starts one relay per node leader on loopback and connects each other rank to its node's;
/// returns every rank's upstream, and the relay servers (stopped when dropped).
async fn relay_upstreams(
    clients: &[Grpc],
    joined: &Joined,
    token: &AsciiMetadataValue,
) -> Result<(Vec<Upstream>, JoinSet<()>)> {
    let n = clients.len();
    let mut servers = JoinSet::new();
    let mut relays: std::collections::HashMap<u32, (String, Arc<PendingBeats>)> =
        std::collections::HashMap::new();
    for i in 0..n {
        let leader = joined.leaders[i];
        if joined.ranks[i] != leader {
            continue;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a simulated node's heartbeat relay on loopback")?;
        let addr = listener.local_addr()?.to_string();
        let pending = PendingBeats::new();
        let (served, token) = (pending.clone(), token.to_str().unwrap_or_default().to_owned());
        servers.spawn(async move {
            let _ = serve_relay(listener, &token, served, std::future::pending()).await;
        });
        relays.insert(leader, (addr, pending));
    }
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for i in 0..n {
        let leader = joined.leaders[i];
        if joined.ranks[i] == leader {
            continue;
        }
        let (addr, _) = relays.get(&leader).context("a simulated node has no relay")?;
        let endpoint = endpoint(addr).with_context(|| format!("relay address {addr}"))?;
        let (permits, token) = (permits.clone(), token.clone());
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let channel = endpoint.connect().await;
            (i, channel.map(|c| HeartbeatRelayClient::with_interceptor(c, Token(token))))
        });
    }
    let mut upstreams: Vec<Option<Upstream>> = (0..n).map(|_| None).collect();
    for i in 0..n {
        if let Some((_, pending)) = relays.get(&joined.ranks[i]) {
            upstreams[i] = Some(Upstream::Relay(clients[i].clone(), pending.clone()));
        }
    }
    while let Some(done) = set.join_next().await {
        let (i, client) = done.context("a connecting task panicked")?;
        let client = client.with_context(|| format!("simulated rank {i}: connecting its relay"))?;
        upstreams[i] = Some(Upstream::ViaRelay(client));
    }
    let upstreams: Result<Vec<Upstream>> =
        upstreams.into_iter().map(|u| u.context("a rank has no upstream")).collect();
    Ok((upstreams?, servers))
}

async fn heartbeat_phase(n: usize, seconds: f64, relay: bool) -> Result<PhaseRow> {
    let token = bench_token()?;
    let mut coord = CoordinatorProcess::start(n, token.to_str().unwrap_or_default())?;
    let connect_start = Instant::now();
    let clients = connect_all(&coord.addr, &token, n).await?;
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let joined = join_all(&clients).await.with_context(|| coord.output())?;

    // Every rank opens its Watch stream, as a rank's monitor does right after joining.
    let mut set = JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let rank = joined.ranks[i];
        set.spawn(async move {
            let r = tokio::time::timeout(RPC_LIMIT, client.watch(pb::WatchRequest { rank })).await;
            (i, r)
        });
    }
    let mut streams: Vec<Option<Streaming<pb::WatchEvent>>> = (0..n).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        let (i, r) = done.context("a watching task panicked")?;
        match r {
            Ok(Ok(s)) => streams[i] = Some(s.into_inner()),
            Ok(Err(s)) => {
                bail!("rank {i}: opening the Watch stream: {} ({:?})", s.message(), s.code())
            }
            Err(_) => bail!("rank {i}: the Watch stream did not open within {RPC_LIMIT:?}"),
        }
    }

    let (upstreams, relay_servers) = if relay {
        relay_upstreams(&clients, &joined, &token).await?
    } else {
        (clients.iter().map(|c| Upstream::Direct(c.clone())).collect(), JoinSet::new())
    };

    // The window starts a little later, so every rank's monitor is in place; first heartbeats
    // are spread evenly over one interval, as independent ranks' would be.
    let interval = joined.interval;
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(seconds);
    let mut set = JoinSet::new();
    for (i, (upstream, stream)) in upstreams.into_iter().zip(streams).enumerate() {
        let stream = stream.context("a rank has no Watch stream")?;
        let first = start + interval.mul_f64(i as f64 / n as f64);
        set.spawn(heartbeat_rank(upstream, stream, joined.ranks[i], first, interval, (start, end)));
    }
    tokio::time::sleep_until(start).await;
    let (cpu0, me0, t0) = (coord.cpu()?, cpu_seconds("self")?, Instant::now());
    tokio::time::sleep_until(end).await;
    let (cpu1, me1, t1) = (coord.cpu()?, cpu_seconds("self")?, Instant::now());
    let window = (t1 - t0).as_secs_f64();

    let mut failures = Failures::default();
    let mut heartbeats = 0u64;
    let mut streams = Vec::with_capacity(n);
    while let Some(done) = set.join_next().await {
        let run = done.context("a heartbeating task panicked")?;
        heartbeats += run.in_window;
        failures.merge(run.failures);
        streams.extend(run.stream);
    }

    drop(relay_servers);
    failures.merge(finish_all(&clients, &joined.ranks).await);
    // Every Watch stream must now deliver Done.
    let mut set = JoinSet::new();
    for mut stream in streams {
        set.spawn(async move {
            matches!(
                tokio::time::timeout(RPC_LIMIT, stream.message()).await,
                Ok(Ok(Some(pb::WatchEvent { event: Some(watch_event::Event::Done(_)) })))
            )
        });
    }
    let mut watch_done = 0;
    while let Some(done) = set.join_next().await {
        if done.unwrap_or(false) {
            watch_done += 1;
        }
    }
    drop(clients);
    let exit_ok = coord.wait_exit(Duration::from_secs(60))?;
    let coordinator_cpu_s = cpu1 - cpu0;
    let cpu_percent = 100.0 * coordinator_cpu_s / window.max(1e-9);
    Ok(PhaseRow {
        phase: "heartbeat",
        ranks: n,
        seconds: window,
        connect_seconds,
        join_seconds: Some(joined.seconds),
        coordinator_cpu_s,
        cpu_percent_of_one_core: cpu_percent,
        client_cpu_s: me1 - me0,
        joined: joined.ranks.len(),
        rpcs_failed: failures.count,
        interval_s: Some(interval.as_secs_f64()),
        heartbeats: Some(heartbeats),
        heartbeats_per_s: Some(heartbeats as f64 / seconds),
        coordinator_messages_per_s: Some(if relay {
            heartbeats as f64 / seconds * n.div_ceil(RANKS_PER_HOST) as f64 / n as f64
        } else {
            heartbeats as f64 / seconds
        }),
        heartbeat_relay: Some(relay),
        watch_done: Some(watch_done),
        coordinator_exit_ok: exit_ok,
        target: "< 5% of one core",
        met: cpu_percent < HEARTBEAT_TARGET_PERCENT,
        first_error: failures.first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_read_and_grows() {
        // Spin until this process has used 50 ms more CPU; a wrong field would never grow.
        let before = cpu_seconds("self").unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.05 && t.elapsed() < Duration::from_secs(30) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            after = cpu_seconds("self").unwrap();
        }
        std::hint::black_box(x);
        assert!(after - before >= 0.05, "CPU time went from {before} to {after} s");
    }

    #[test]
    fn missing_process_is_an_error_naming_the_file() {
        let e = cpu_seconds("999999999").unwrap_err();
        assert!(format!("{e:#}").contains("/proc/999999999/stat"), "{e:#}");
    }

    #[test]
    fn join_requests_are_distinct_and_dense() {
        let a = join_request(0, 16);
        let b = join_request(9, 16);
        assert_ne!(a.pid, b.pid);
        assert_ne!(a.data_addr, b.data_addr);
        assert_eq!(b.host, "sim-node-1");
        assert_eq!(b.local_rank, Some(1));
        assert_eq!(b.launcher_rank, Some(9));
        assert_eq!(a.config_hash, b.config_hash);
    }
}
