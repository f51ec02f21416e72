//! Blocking client for rank processes. It owns a small tokio runtime (one worker thread), so
//! rank code stays synchronous and the monitor (heartbeats + Watch) runs in the background.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::TOKEN_METADATA_KEY;
use tessera_proto::v1::coordinator_client::CoordinatorClient as GrpcClient;
use tessera_proto::v1::{self as pb, watch_event};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::error::{CoordinatorError, Result};
use crate::types::{AbortInfo, JoinInfo, Membership, Progress};

/// Adds the job token to every call.
#[derive(Clone)]
struct TokenInterceptor {
    token: AsciiMetadataValue,
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(TOKEN_METADATA_KEY, self.token.clone());
        Ok(req)
    }
}

type Grpc = GrpcClient<InterceptedService<Channel, TokenInterceptor>>;

/// Interval of the HTTP/2 keep-alive PINGs to the coordinator, and how long an answer may take.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// The latest progress a rank publishes; heartbeats carry it to the coordinator.
#[derive(Debug, Default)]
pub struct ProgressCell {
    inner: Mutex<Option<Progress>>,
}

impl ProgressCell {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes the rank's progress.
    pub fn set(&self, progress: Progress) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(progress);
    }

    /// The last published progress, if any.
    pub fn get(&self) -> Option<Progress> {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The client's runtime; dropping it never blocks, so a client may be dropped anywhere
/// (even inside another runtime).
struct OwnedRuntime(Option<Runtime>);

impl std::ops::Deref for OwnedRuntime {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        // Only `drop` takes the runtime out.
        self.0.as_ref().unwrap_or_else(|| unreachable!("runtime used after drop"))
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Extra time a blocking call may take beyond its own server-side timeout.
const CALL_GRACE: Duration = Duration::from_secs(5);

/// A connection to the coordinator, for one rank process. Its methods block: call them from
/// plain threads, not from inside an async runtime.
pub struct CoordinatorClient {
    rt: Arc<OwnedRuntime>,
    grpc: Grpc,
    addr: String,
    rank: Mutex<Option<u32>>,
    finished: Arc<AtomicBool>,
}

fn check_addr(addr: &str) -> Result<String> {
    let bare = addr.strip_prefix("http://").unwrap_or(addr).trim_end_matches('/');
    let invalid = |detail: &str| CoordinatorError::InvalidAddress {
        addr: addr.to_owned(),
        detail: detail.to_owned(),
    };
    let (host, port) = bare.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    port.parse::<u16>().map_err(|_| invalid("the port is not a number between 0 and 65535"))?;
    Ok(bare.to_owned())
}

impl CoordinatorClient {
    /// Connects to the coordinator at `addr` ("host:port"), retrying until `timeout` passes
    /// (ranks may start before the coordinator listens).
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<Self> {
        let addr = check_addr(addr)?;
        if token.is_empty() {
            return Err(CoordinatorError::InvalidToken);
        }
        let token: AsciiMetadataValue =
            MetadataValue::try_from(token).map_err(|_| CoordinatorError::InvalidToken)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-coordinator-client")
            .enable_all()
            .build()
            .map_err(CoordinatorError::Runtime)?;
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| CoordinatorError::InvalidAddress {
                addr: addr.clone(),
                detail: e.to_string(),
            })?
            .tcp_nodelay(true)
            .connect_timeout(timeout.clamp(Duration::from_millis(100), Duration::from_secs(5)))
            // Heartbeats stream without answers: HTTP/2 PINGs find a coordinator that hangs
            // (stopped, wedged) and close the connection, which aborts the rank.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let channel = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match endpoint.connect().await {
                    Ok(ch) => return Ok(ch),
                    Err(e) => {
                        if tokio::time::Instant::now() >= deadline {
                            return Err(CoordinatorError::Connect {
                                addr: addr.clone(),
                                detail: format!("{e} (tried for {:?})", timeout),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })?;
        let grpc = GrpcClient::with_interceptor(channel, TokenInterceptor { token });
        Ok(Self {
            rt: Arc::new(OwnedRuntime(Some(rt))),
            grpc,
            addr,
            rank: Mutex::new(None),
            finished: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The coordinator's address, as given to `connect`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn my_rank(&self, call: &'static str) -> Result<u32> {
        self.rank.lock().unwrap_or_else(|p| p.into_inner()).ok_or_else(|| CoordinatorError::Rpc {
            call,
            addr: self.addr.clone(),
            code: tonic::Code::FailedPrecondition,
            message: "this client has not joined yet: call join first".into(),
        })
    }

    fn call<T>(
        &self,
        call: &'static str,
        limit: Option<Duration>,
        f: impl AsyncFnOnce(Grpc) -> Result<tonic::Response<T>, Status>,
    ) -> Result<T> {
        let grpc = self.grpc.clone();
        let result = self.rt.block_on(async move {
            match limit {
                Some(limit) => match tokio::time::timeout(limit, f(grpc)).await {
                    Ok(r) => r,
                    Err(_) => Err(Status::deadline_exceeded(format!("no answer within {limit:?}"))),
                },
                None => f(grpc).await,
            }
        });
        result
            .map(tonic::Response::into_inner)
            .map_err(|s| CoordinatorError::rpc(call, &self.addr, s))
    }

    /// Joins the world; returns once every rank joined (or the coordinator refused).
    pub fn join(&self, info: JoinInfo) -> Result<Membership> {
        let req = pb::JoinRequest {
            host: info.host,
            local_rank: info.local_rank,
            pid: info.pid,
            launcher_rank: info.launcher_rank.and_then(|r| i32::try_from(r).ok()),
            launcher_world: info.launcher_world,
            config_hash: info.config_hash,
            version: info.version,
            data_addr: info.data_addr,
            generation: info.generation,
        };
        let r = self.call("join", None, async move |mut g| g.join(req).await)?;
        *self.rank.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.rank);
        Ok(Membership {
            rank: r.rank,
            world: r.world,
            local_rank: r.local_rank,
            local_size: r.local_size,
            node_rank: r.node_rank,
            num_nodes: r.num_nodes,
            generation: r.generation,
            data_addrs: r.data_addrs,
            hosts: r.hosts,
            heartbeat_interval: Duration::from_millis(u64::from(r.heartbeat_interval_ms)),
        })
    }

    /// Stores `value` under `key`.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = pb::StoreSetRequest { key: key.to_owned(), value: value.to_vec() };
        self.call("store set", Some(CALL_GRACE), async move |mut g| g.store_set(req).await)?;
        Ok(())
    }

    /// The value under `key`, waiting up to `timeout` for some rank to set it.
    pub fn store_get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let req = pb::StoreGetRequest { key: key.to_owned(), timeout_ms: millis(timeout) };
        let r = self.call("store get", Some(timeout + CALL_GRACE), async move |mut g| {
            g.store_get(req).await
        })?;
        Ok(r.value)
    }

    /// Returns once every rank entered barrier `name`; errors after `timeout` naming the
    /// ranks that did not.
    pub fn barrier(&self, name: &str, timeout: Duration) -> Result<()> {
        let rank = self.my_rank("barrier")?;
        let req = pb::BarrierRequest { name: name.to_owned(), rank, timeout_ms: millis(timeout) };
        self.call("barrier", Some(timeout + CALL_GRACE), async move |mut g| g.barrier(req).await)?;
        Ok(())
    }

    /// Declares this rank failed: every rank is aborted with `reason`.
    pub fn report_error(&self, reason: &str) -> Result<()> {
        let rank = self.my_rank("report error")?;
        let req = pb::ReportErrorRequest { rank, reason: reason.to_owned() };
        self.call("report error", Some(CALL_GRACE), async move |mut g| g.report_error(req).await)?;
        Ok(())
    }

    /// This rank is done: its monitor stops and its disconnect is not a failure.
    pub fn finish(&self) -> Result<()> {
        let rank = self.my_rank("finish")?;
        self.finished.store(true, Ordering::SeqCst);
        self.call("finish", Some(CALL_GRACE), async move |mut g| {
            g.finish(pb::FinishRequest { rank }).await
        })?;
        Ok(())
    }

    /// Starts heartbeats (every `interval`, carrying `progress`) and the Watch stream in the
    /// background. `on_abort` is called at most once: when the coordinator aborts the job, or
    /// when the coordinator is lost ("lost the coordinator at ADDR: ..."). It is not called
    /// after [`Self::finish`] or [`MonitorHandle::stop`].
    pub fn start_monitor(
        &self,
        rank: u32,
        interval: Duration,
        progress: Arc<ProgressCell>,
        on_abort: Box<dyn Fn(AbortInfo) + Send>,
    ) -> MonitorHandle {
        let (stop, stop_rx) = watch::channel(false);
        let task = Monitor {
            grpc: self.grpc.clone(),
            addr: self.addr.clone(),
            rank,
            interval: interval.max(Duration::from_millis(10)),
            progress,
            finished: self.finished.clone(),
        };
        let join = self.rt.spawn(task.run(stop_rx, on_abort));
        MonitorHandle { stop, task: Some(join), rt: self.rt.clone() }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

struct Monitor {
    grpc: Grpc,
    addr: String,
    rank: u32,
    interval: Duration,
    progress: Arc<ProgressCell>,
    finished: Arc<AtomicBool>,
}

impl Monitor {
    fn lost(&self, detail: impl std::fmt::Display) -> AbortInfo {
        AbortInfo { rank: None, reason: format!("lost the coordinator at {}: {detail}", self.addr) }
    }

    fn stopped(&self, stop_rx: &watch::Receiver<bool>) -> bool {
        *stop_rx.borrow() || self.finished.load(Ordering::SeqCst)
    }

    async fn run(
        mut self,
        mut stop_rx: watch::Receiver<bool>,
        on_abort: Box<dyn Fn(AbortInfo) + Send>,
    ) {
        if let Some(abort) = self.watch_loop(&mut stop_rx).await
            && !self.stopped(&stop_rx)
        {
            on_abort(abort);
        }
    }

    /// Runs until an abort is due (`Some`) or the monitor should end quietly (`None`).
    async fn watch_loop(&mut self, stop_rx: &mut watch::Receiver<bool>) -> Option<AbortInfo> {
        let mut stream = match self.grpc.watch(pb::WatchRequest { rank: self.rank }).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Some(self.status_abort(s)),
        };
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let hb_limit = (self.interval * 5).max(Duration::from_secs(5));
        // Heartbeats travel on one long-lived stream; the call returns only when the
        // coordinator ends it (a refusal, e.g. the job failed) or the connection breaks.
        let (beat_tx, beat_rx) = tokio::sync::mpsc::channel::<pb::HeartbeatRequest>(4);
        let mut grpc = self.grpc.clone();
        let beats = grpc.heartbeats(tokio_stream::wrappers::ReceiverStream::new(beat_rx));
        tokio::pin!(beats);
        loop {
            tokio::select! {
                biased;
                _ = stop_requested(stop_rx) => return None,
                msg = stream.message() => match msg {
                    Ok(Some(pb::WatchEvent { event: Some(watch_event::Event::Abort(a)) })) => {
                        return Some(AbortInfo { rank: a.rank, reason: a.reason });
                    }
                    Ok(Some(pb::WatchEvent { event: Some(watch_event::Event::Done(_)) })) => {
                        return None;
                    }
                    Ok(Some(pb::WatchEvent { event: None })) => {}
                    Ok(None) => return Some(self.lost("the watch stream ended")),
                    Err(s) => return Some(self.lost(status_text(&s))),
                },
                ended = &mut beats => {
                    if self.finished.load(Ordering::SeqCst) {
                        return None;
                    }
                    let s = match ended {
                        Ok(_) => return Some(self.lost("the heartbeat stream ended")),
                        Err(s) => s,
                    };
                    // The Watch stream names the failed rank; prefer its event.
                    let from_watch =
                        tokio::time::timeout(Duration::from_secs(1), stream.message());
                    if let Ok(Ok(Some(pb::WatchEvent {
                        event: Some(watch_event::Event::Abort(a)),
                    }))) = from_watch.await
                    {
                        return Some(AbortInfo { rank: a.rank, reason: a.reason });
                    }
                    return Some(self.status_abort(s));
                }
                _ = ticker.tick() => {
                    if self.finished.load(Ordering::SeqCst) {
                        return None;
                    }
                    let p = self.progress.get();
                    let req = pb::HeartbeatRequest {
                        rank: self.rank,
                        step: p.map(|p| p.step),
                        loss: p.and_then(|p| p.loss),
                        samples: p.map(|p| p.samples),
                        b_simple: p.and_then(|p| p.b_simple),
                    };
                    // A coordinator that stops reading lets the stream's buffer fill up.
                    if tokio::time::timeout(hb_limit, beat_tx.send(req)).await.is_err() {
                        return Some(self.lost(format!("heartbeats not taken within {hb_limit:?}")));
                    }
                }
            }
        }
    }

    /// A refused call: a job abort the coordinator explains, or a lost coordinator.
    fn status_abort(&self, s: Status) -> AbortInfo {
        match s.code() {
            tonic::Code::Aborted
            | tonic::Code::DeadlineExceeded
            | tonic::Code::FailedPrecondition => {
                AbortInfo { rank: None, reason: s.message().to_owned() }
            }
            _ => self.lost(status_text(&s)),
        }
    }
}

fn status_text(s: &Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{} ({:?})", s.message(), s.code())
    }
}

/// The background monitor of a rank. Dropping it stops the monitor.
pub struct MonitorHandle {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: Arc<OwnedRuntime>,
}

impl MonitorHandle {
    /// Stops heartbeats and the Watch stream; `on_abort` will not be called afterwards
    /// (unless it is already running). Waits for the monitor to end.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }

    /// Whether the monitor ended (an abort was delivered, the job is done, or it was stopped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Resolves once `true` was sent (or the sender is gone).
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
