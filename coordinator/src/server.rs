//! The tonic service around [`CoordinatorState`]: waiting requests, a ticker, the job token.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_proto::TOKEN_METADATA_KEY;
use tessera_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use tessera_proto::v1::{self as pb, watch_event};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use crate::error::{CoordinatorError, Result};
use crate::state::{CoordinatorState, Decision, Phase, Refusal, RefusalKind, StateConfig};
use crate::types::{AbortInfo, JoinInfo, Progress, RankProgress, fmt_duration};

/// Settings of a coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Number of ranks the world waits for.
    pub world: usize,
    /// The job token every call must carry in `x-tessera-token`.
    pub token: String,
    /// A running rank silent for longer than this is declared failed (default 10 s).
    pub heartbeat_timeout: Duration,
    /// The world must form within this time of the coordinator's start (default 300 s).
    pub join_timeout: Duration,
    /// Interval ranks are told to send heartbeats at (default 1 s).
    pub heartbeat_interval: Duration,
    /// How often time-driven decisions are taken (default 100 ms).
    pub tick_interval: Duration,
    /// Restart generation of the job (default 1); joins from another generation are refused.
    pub generation: u64,
}

impl CoordinatorConfig {
    /// Defaults for everything but the world size and the token.
    pub fn new(world: usize, token: impl Into<String>) -> Self {
        Self {
            world,
            token: token.into(),
            heartbeat_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(1),
            tick_interval: Duration::from_millis(100),
            generation: 1,
        }
    }

    fn state_config(&self) -> StateConfig {
        StateConfig {
            world: self.world,
            heartbeat_timeout: self.heartbeat_timeout,
            join_timeout: self.join_timeout,
            heartbeat_interval: self.heartbeat_interval,
            generation: self.generation,
        }
    }
}

pub(crate) fn refusal_status(r: &Refusal) -> Status {
    let code = match r.kind {
        RefusalKind::InvalidArgument => tonic::Code::InvalidArgument,
        RefusalKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        RefusalKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        RefusalKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        RefusalKind::Aborted => tonic::Code::Aborted,
    };
    Status::new(code, r.message.clone())
}

fn shutting_down() -> Status {
    Status::unavailable("the coordinator is shutting down")
}

/// State shared by the service, the ticker and the handle.
struct Shared {
    state: Mutex<CoordinatorState>,
    /// Bumped after every change; waiters re-check their condition.
    epoch: watch::Sender<u64>,
    shutdown: AtomicBool,
}

enum WaitEnd {
    Timeout,
    Shutdown,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CoordinatorState> {
        // The state is never left half-updated by a panic in a way that matters more than
        // stopping the whole control plane would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Logs and announces decisions. Nothing waits on events that decided nothing (a finish
    /// before the last one), so waiters are only woken when there is a decision.
    fn apply(&self, decisions: Vec<Decision>) {
        if decisions.is_empty() {
            return;
        }
        for d in &decisions {
            match d {
                Decision::Abort(a) => tracing::warn!("aborting the job: {a}"),
                Decision::Done => tracing::info!("every rank finished"),
            }
        }
        self.bump();
    }

    /// Waits until `check` returns a value, the deadline passes or the coordinator shuts down.
    async fn wait_until<T>(
        &self,
        deadline: Option<tokio::time::Instant>,
        mut check: impl FnMut(&mut CoordinatorState) -> Option<T>,
    ) -> std::result::Result<T, WaitEnd> {
        let mut rx = self.epoch.subscribe();
        loop {
            rx.borrow_and_update();
            let found = check(&mut self.lock());
            if let Some(v) = found {
                return Ok(v);
            }
            if self.shutdown.load(Ordering::SeqCst) {
                return Err(WaitEnd::Shutdown);
            }
            let changed = match deadline {
                Some(d) => match tokio::time::timeout_at(d, rx.changed()).await {
                    Ok(r) => r,
                    Err(_) => return Err(WaitEnd::Timeout),
                },
                None => rx.changed().await,
            };
            if changed.is_err() {
                return Err(WaitEnd::Shutdown);
            }
        }
    }
}

struct Service {
    shared: Arc<Shared>,
}

fn deadline_after(ms: u64) -> Option<tokio::time::Instant> {
    if ms == 0 { None } else { Some(tokio::time::Instant::now() + Duration::from_millis(ms)) }
}

/// The progress a heartbeat carries, if any.
fn beat_progress(r: &pb::HeartbeatRequest) -> Option<Progress> {
    (r.step.is_some() || r.loss.is_some() || r.samples.is_some()).then(|| Progress {
        step: r.step.unwrap_or(0),
        loss: r.loss,
        samples: r.samples.unwrap_or(0),
        b_simple: r.b_simple,
    })
}

impl Service {
    /// One heartbeat, from a unary call or a heartbeat stream.
    fn on_beat(&self, r: pb::HeartbeatRequest) -> Result<(), Status> {
        self.shared
            .lock()
            .on_heartbeat(r.rank, beat_progress(&r), Instant::now())
            .map_err(|r| refusal_status(&r))
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let r = req.into_inner();
        let info = JoinInfo {
            host: r.host,
            local_rank: r.local_rank,
            pid: r.pid,
            launcher_rank: r.launcher_rank.and_then(|l| u32::try_from(l).ok()),
            launcher_world: r.launcher_world,
            config_hash: r.config_hash,
            version: r.version,
            data_addr: r.data_addr,
            generation: r.generation,
        };
        let who = format!("host {} pid {}", info.host, info.pid);
        let (ticket, world_decided) = {
            let mut state = self.shared.lock();
            let ticket = state.on_join(info, Instant::now()).map_err(|r| refusal_status(&r))?;
            (ticket, *state.phase() != Phase::Joining)
        };
        tracing::debug!("{who} joined");
        // Joiners wait for the world to form (or fail); waking all of them on every join would
        // cost world² wake-ups.
        if world_decided {
            self.shared.bump();
        }
        let m = match self.shared.wait_until(None, |s| s.join_result(ticket)).await {
            Ok(result) => result.map_err(|r| refusal_status(&r))?,
            Err(_) => return Err(shutting_down()),
        };
        Ok(Response::new(pb::JoinReply {
            rank: m.rank,
            world: m.world,
            local_rank: m.local_rank,
            local_size: m.local_size,
            node_rank: m.node_rank,
            num_nodes: m.num_nodes,
            generation: m.generation,
            heartbeat_interval_ms: u32::try_from(m.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            next_data_addr: m.next_data_addr,
            node_leader: m.node_leader,
        }))
    }

    async fn store_set(
        &self,
        req: Request<pb::StoreSetRequest>,
    ) -> Result<Response<pb::StoreSetReply>, Status> {
        let r = req.into_inner();
        self.shared.lock().store_set(&r.key, r.value).map_err(|r| refusal_status(&r))?;
        self.shared.bump();
        Ok(Response::new(pb::StoreSetReply {}))
    }

    async fn store_get(
        &self,
        req: Request<pb::StoreGetRequest>,
    ) -> Result<Response<pb::StoreGetReply>, Status> {
        let r = req.into_inner();
        let key = r.key;
        let waited = self
            .shared
            .wait_until(deadline_after(r.timeout_ms), |s| {
                if let Some(v) = s.store_get(&key) {
                    Some(Ok(v.to_vec()))
                } else {
                    s.failure().map(|f| Err(refusal_status(f)))
                }
            })
            .await;
        match waited {
            Ok(Ok(value)) => Ok(Response::new(pb::StoreGetReply { value })),
            Ok(Err(status)) => Err(status),
            Err(WaitEnd::Timeout) => Err(Status::deadline_exceeded(format!(
                "store key {key:?} was not set within {}; the rank that sets it may have failed \
                 or not reached that point yet",
                fmt_duration(Duration::from_millis(r.timeout_ms))
            ))),
            Err(WaitEnd::Shutdown) => Err(shutting_down()),
        }
    }

    async fn barrier(
        &self,
        req: Request<pb::BarrierRequest>,
    ) -> Result<Response<pb::BarrierReply>, Status> {
        let r = req.into_inner();
        let (ticket, passed) = {
            let mut state = self.shared.lock();
            let ticket = state.barrier_enter(&r.name, r.rank).map_err(|r| refusal_status(&r))?;
            let passed = state.barrier_passed(&ticket);
            (ticket, passed)
        };
        // Only the last rank to enter releases the others.
        if passed {
            self.shared.bump();
        }
        let waited = self
            .shared
            .wait_until(deadline_after(r.timeout_ms), |s| {
                if s.barrier_passed(&ticket) {
                    Some(Ok(()))
                } else {
                    s.failure().map(|f| Err(refusal_status(f)))
                }
            })
            .await;
        match waited {
            Ok(Ok(())) => Ok(Response::new(pb::BarrierReply {})),
            Ok(Err(status)) => Err(status),
            Err(WaitEnd::Timeout) => {
                let missing = self.shared.lock().barrier_leave(&ticket);
                Err(Status::deadline_exceeded(format!(
                    "barrier {:?} timed out after {} waiting at rank {}: ranks {missing:?} never \
                     entered it",
                    r.name,
                    fmt_duration(Duration::from_millis(r.timeout_ms)),
                    r.rank
                )))
            }
            Err(WaitEnd::Shutdown) => Err(shutting_down()),
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.on_beat(req.into_inner())?;
        Ok(Response::new(pb::HeartbeatReply {}))
    }

    async fn heartbeats(
        &self,
        req: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let mut beats = req.into_inner();
        while let Some(r) = beats.message().await? {
            self.on_beat(r)?;
        }
        Ok(Response::new(pb::HeartbeatReply {}))
    }

    async fn relayed_heartbeats(
        &self,
        req: Request<tonic::Streaming<pb::HeartbeatBatch>>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let mut batches = req.into_inner();
        let mut beats = Vec::new();
        while let Some(b) = batches.message().await? {
            beats.clear();
            beats.extend(b.beats.iter().map(|r| (r.rank, beat_progress(r))));
            self.shared
                .lock()
                .on_relayed_heartbeats(b.relay, &beats, Instant::now())
                .map_err(|r| refusal_status(&r))?;
        }
        Ok(Response::new(pb::HeartbeatReply {}))
    }

    async fn report_error(
        &self,
        req: Request<pb::ReportErrorRequest>,
    ) -> Result<Response<pb::ReportErrorReply>, Status> {
        let r = req.into_inner();
        let decisions = self
            .shared
            .lock()
            .on_report_error(r.rank, &r.reason)
            .map_err(|r| refusal_status(&r))?;
        self.shared.apply(decisions);
        Ok(Response::new(pb::ReportErrorReply {}))
    }

    async fn finish(
        &self,
        req: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishReply>, Status> {
        let r = req.into_inner();
        let decisions = self.shared.lock().on_finish(r.rank).map_err(|r| refusal_status(&r))?;
        self.shared.apply(decisions);
        Ok(Response::new(pb::FinishReply {}))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let ended = shared.wait_until(None, |s| match s.phase() {
                Phase::Failed { abort, .. } => Some(watch_event::Event::Abort(pb::Abort {
                    rank: abort.rank,
                    reason: abort.reason.clone(),
                })),
                Phase::Done => Some(watch_event::Event::Done(pb::Done {})),
                _ => None,
            });
            let item = tokio::select! {
                _ = tx.closed() => return,
                ended = ended => match ended {
                    Ok(event) => Ok(pb::WatchEvent { event: Some(event) }),
                    Err(_) => Err(shutting_down()),
                },
            };
            // The watcher may be gone already; nothing to do then.
            let _ = tx.send(item).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Checks the job token on every call.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    pub(crate) token: Arc<str>,
}

impl Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get(TOKEN_METADATA_KEY) {
            None => Err(Status::unauthenticated(
                "missing job token: set TESSERA_TOKEN to the job's token",
            )),
            Some(t) if t.as_bytes() == self.token.as_bytes() => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "wrong job token: TESSERA_TOKEN does not match the token of the coordinator's job",
            )),
        }
    }
}

/// A running coordinator. Dropping it stops the server (without waiting).
pub struct CoordinatorHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<std::result::Result<(), tonic::transport::Error>>>,
    ticker: Option<JoinHandle<()>>,
}

/// Starts a coordinator on `listener` (bind 127.0.0.1:0 for tests and `tessera run`).
/// Must be called inside a tokio runtime; the server runs on spawned tasks.
pub async fn serve(cfg: CoordinatorConfig, listener: TcpListener) -> Result<CoordinatorHandle> {
    if cfg.token.is_empty() {
        return Err(CoordinatorError::InvalidConfig(
            "the job token is empty: generate one (tessera run does) or set TESSERA_TOKEN".into(),
        ));
    }
    if cfg.tick_interval.is_zero() {
        return Err(CoordinatorError::InvalidConfig(
            "tick interval must be greater than zero".into(),
        ));
    }
    let local_addr = listener.local_addr().map_err(|e| CoordinatorError::Serve {
        addr: "?".into(),
        detail: format!("the listener has no local address: {e}"),
    })?;
    let state = CoordinatorState::new(cfg.state_config(), Instant::now())
        .map_err(|r| CoordinatorError::InvalidConfig(r.message))?;
    let (epoch, _) = watch::channel(0u64);
    let shared =
        Arc::new(Shared { state: Mutex::new(state), epoch, shutdown: AtomicBool::new(false) });
    let (stop, stop_rx) = watch::channel(false);

    let ticker = {
        let shared = shared.clone();
        let mut stop_rx = stop_rx.clone();
        let period = cfg.tick_interval;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        let decisions = shared.lock().tick(Instant::now());
                        if !decisions.is_empty() {
                            shared.apply(decisions);
                        }
                    }
                    _ = stop_requested(&mut stop_rx) => return,
                }
            }
        })
    };

    let service = CoordinatorServer::with_interceptor(
        Service { shared: shared.clone() },
        TokenCheck { token: Arc::from(cfg.token.as_str()) },
    );
    let mut stop_rx = stop_rx;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }),
    );
    tracing::info!("coordinator listening on {local_addr} for {} ranks", cfg.world);
    Ok(CoordinatorHandle { shared, local_addr, stop, server: Some(server), ticker: Some(ticker) })
}

/// Standalone coordinator (`tessera coordinator --bind ADDR --world N`): serves until every
/// rank finished (`Ok`) or the job was aborted (`Err(CoordinatorError::Aborted)`), then shuts
/// down after the ranks were told.
pub async fn serve_until_done(cfg: CoordinatorConfig, listener: TcpListener) -> Result<()> {
    let handle = serve(cfg, listener).await?;
    let outcome = handle.wait().await;
    handle.shutdown().await?;
    outcome
}

impl CoordinatorHandle {
    /// The address the coordinator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Latest heartbeat progress of every rank, by rank (empty before the world formed).
    pub fn progress(&self) -> Vec<RankProgress> {
        self.shared.lock().progress(Instant::now())
    }

    /// Number of ranks that joined so far.
    pub fn joined(&self) -> usize {
        self.shared.lock().joined()
    }

    /// The launcher saw the process it started as `launcher_rank` fail; `reason` completes
    /// "rank R (host, pid) ...", e.g. "exited with status 1". Aborts every other rank.
    pub fn mark_failed(&self, launcher_rank: u32, reason: &str) {
        let decisions = self.shared.lock().on_launcher_failure(launcher_rank, reason);
        if !decisions.is_empty() {
            self.shared.apply(decisions);
        }
    }

    /// Why the job was aborted, if it was.
    pub fn abort_info(&self) -> Option<AbortInfo> {
        self.shared.lock().abort_info().cloned()
    }

    /// Whether every rank finished normally.
    pub fn is_done(&self) -> bool {
        self.shared.lock().is_done()
    }

    /// Waits until every rank finished (`Ok`) or the job was aborted
    /// (`Err(CoordinatorError::Aborted)`).
    pub async fn wait(&self) -> Result<()> {
        let waited = self
            .shared
            .wait_until(None, |s| match s.phase() {
                Phase::Done => Some(Ok(())),
                Phase::Failed { abort, .. } => Some(Err(abort.clone())),
                _ => None,
            })
            .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(abort)) => Err(CoordinatorError::Aborted(abort)),
            Err(_) => Err(CoordinatorError::Serve {
                addr: self.local_addr.to_string(),
                detail: "shut down before the job ended".into(),
            }),
        }
    }

    /// Stops the server: pending requests are answered "shutting down", Watch streams that
    /// have an Abort or Done to deliver deliver it first.
    pub async fn shutdown(mut self) -> Result<()> {
        self.signal_stop();
        if let Some(t) = self.ticker.take() {
            let _ = t.await;
        }
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        let addr = self.local_addr.to_string();
        match tokio::time::timeout(Duration::from_secs(3), server).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(CoordinatorError::Serve { addr, detail: e.to_string() }),
            Ok(Err(e)) => {
                Err(CoordinatorError::Serve { addr, detail: format!("server task failed: {e}") })
            }
            // Connections that linger after the grace period are cut.
            Err(_) => Ok(()),
        }
    }

    fn signal_stop(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.bump();
        let _ = self.stop.send(true);
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

/// Resolves once `true` was sent (or the sender is gone).
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// A coordinator on a runtime of its own, for callers without tokio (the launcher's main
/// thread, tests). Dropping it stops the server.
pub struct BlockingCoordinator {
    handle: Option<CoordinatorHandle>,
    rt: tokio::runtime::Runtime,
}

impl BlockingCoordinator {
    /// Binds `bind` ("127.0.0.1:0" picks a free port) and starts serving.
    pub fn start(cfg: CoordinatorConfig, bind: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-coordinator")
            .enable_all()
            .build()
            .map_err(CoordinatorError::Runtime)?;
        let handle = rt.block_on(async {
            let listener = bind_listener(bind).await?;
            serve(cfg, listener).await
        })?;
        Ok(Self { handle: Some(handle), rt })
    }

    fn h(&self) -> &CoordinatorHandle {
        // Only `shutdown` takes the handle, and it consumes `self`.
        self.handle.as_ref().unwrap_or_else(|| unreachable!("handle taken before shutdown"))
    }

    /// See [`CoordinatorHandle::local_addr`].
    pub fn local_addr(&self) -> SocketAddr {
        self.h().local_addr()
    }

    /// See [`CoordinatorHandle::progress`].
    pub fn progress(&self) -> Vec<RankProgress> {
        self.h().progress()
    }

    /// See [`CoordinatorHandle::joined`].
    pub fn joined(&self) -> usize {
        self.h().joined()
    }

    /// See [`CoordinatorHandle::mark_failed`].
    pub fn mark_failed(&self, launcher_rank: u32, reason: &str) {
        self.h().mark_failed(launcher_rank, reason)
    }

    /// See [`CoordinatorHandle::abort_info`].
    pub fn abort_info(&self) -> Option<AbortInfo> {
        self.h().abort_info()
    }

    /// See [`CoordinatorHandle::is_done`].
    pub fn is_done(&self) -> bool {
        self.h().is_done()
    }

    /// Waits up to `timeout` for the job's outcome: `None` if it is still running, else
    /// `Some(Ok(()))` when every rank finished or `Some(Err(CoordinatorError::Aborted))`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        self.rt.block_on(async { tokio::time::timeout(timeout, self.h().wait()).await.ok() })
    }

    /// Stops the server (see [`CoordinatorHandle::shutdown`]).
    pub fn shutdown(mut self) -> Result<()> {
        match self.handle.take() {
            Some(h) => self.rt.block_on(h.shutdown()),
            None => Ok(()),
        }
    }
}

impl Drop for BlockingCoordinator {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.rt.block_on(h.shutdown());
        }
    }
}

async fn bind_listener(bind: &str) -> Result<TcpListener> {
    TcpListener::bind(bind).await.map_err(|e| CoordinatorError::Serve {
        addr: bind.to_owned(),
        detail: format!("cannot listen there: {e}; pick a free port or an address of this machine"),
    })
}

/// The standalone coordinator, blocking: binds `bind`, calls `on_listening` with the bound
/// address (to print it), and serves until every rank finished (`Ok`) or the job was aborted
/// (`Err(CoordinatorError::Aborted)`).
pub fn run_standalone(
    cfg: CoordinatorConfig,
    bind: &str,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tessera-coordinator")
        .enable_all()
        .build()
        .map_err(CoordinatorError::Runtime)?;
    rt.block_on(async {
        let listener = bind_listener(bind).await?;
        let handle = serve(cfg, listener).await?;
        on_listening(handle.local_addr());
        let outcome = handle.wait().await;
        handle.shutdown().await?;
        outcome
    })
}

/// A fresh random job token (32 hex digits) for `tessera run` to hand to its ranks.
pub fn generate_token() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if from_os.is_err() {
        // No /dev/urandom: std's randomly keyed hasher, salted with time and pid.
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u32(std::process::id());
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
