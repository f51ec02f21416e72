//! Blocking client for rank processes. It owns a small tokio runtime (one worker thread), so
//! rank code stays synchronous and the monitor (heartbeats + Watch) runs in the background.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::TOKEN_METADATA_KEY;
use tessera_proto::v1::coordinator_client::CoordinatorClient as GrpcClient;
use tessera_proto::v1::heartbeat_relay_client::HeartbeatRelayClient;
use tessera_proto::v1::{self as pb, watch_event};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::error::{CoordinatorError, Result};
use crate::relay::{PendingBeats, relay_store_key, serve_relay};
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
    token: AsciiMetadataValue,
    rank: Mutex<Option<u32>>,
    finished: Arc<AtomicBool>,
}

/// Where a rank's heartbeats go (see [`crate::relay`]).
#[derive(Debug)]
pub enum HeartbeatRoute {
    /// Straight to the coordinator, on one stream.
    Direct,
    /// This rank leads its node: it serves a relay on this listener for the node's other ranks
    /// and forwards their beats with its own, one batch per interval.
    Relay(std::net::TcpListener),
    /// To the node's relay at this address; straight to the coordinator when the relay cannot
    /// be reached or goes away.
    ViaRelay(String),
}

/// How long a rank waits for its node leader to publish the relay's address.
const RELAY_ADDR_WAIT: Duration = Duration::from_secs(10);

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
        let grpc = GrpcClient::with_interceptor(channel, TokenInterceptor { token: token.clone() });
        Ok(Self {
            rt: Arc::new(OwnedRuntime(Some(rt))),
            grpc,
            addr,
            token,
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
            next_data_addr: r.next_data_addr,
            node_leader: r.node_leader,
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

    /// Decides where this rank's heartbeats go, after [`Self::join`]. With `relay` on and
    /// other ranks on its node, the node's leader binds a relay listener on `bind_ip` (the
    /// address its data plane uses) and publishes it in the store; the others read it (waiting
    /// up to 10 s). Anything that fails here falls back to [`HeartbeatRoute::Direct`] with a
    /// warning: a relay saves the coordinator work, it is never needed for correctness.
    pub fn heartbeat_route(&self, m: &Membership, bind_ip: IpAddr, relay: bool) -> HeartbeatRoute {
        if !relay || m.local_size < 2 {
            return HeartbeatRoute::Direct;
        }
        let key = relay_store_key(m.generation, m.node_rank);
        if m.rank == m.node_leader {
            let bound = std::net::TcpListener::bind(SocketAddr::new(bind_ip, 0))
                .and_then(|l| l.local_addr().map(|a| (l, a)));
            let (listener, published) = match bound {
                Ok((l, a)) => (Some(l), a.to_string()),
                Err(e) => {
                    tracing::warn!(
                        "no heartbeat relay on this node: cannot listen on {bind_ip}: {e}; the \
                         node's ranks heartbeat the coordinator directly"
                    );
                    (None, String::new())
                }
            };
            if let Err(e) = self.store_set(&key, published.as_bytes()) {
                tracing::warn!("could not publish the heartbeat relay's address: {e}");
                return HeartbeatRoute::Direct;
            }
            match listener {
                Some(l) => {
                    tracing::info!(
                        "relaying the heartbeats of {} ranks of node {} on {published}",
                        m.local_size - 1,
                        m.node_rank
                    );
                    HeartbeatRoute::Relay(l)
                }
                None => HeartbeatRoute::Direct,
            }
        } else {
            match self.store_get(&key, RELAY_ADDR_WAIT) {
                Ok(v) if !v.is_empty() => match String::from_utf8(v) {
                    Ok(addr) => HeartbeatRoute::ViaRelay(addr),
                    Err(_) => HeartbeatRoute::Direct,
                },
                Ok(_) => HeartbeatRoute::Direct,
                Err(e) => {
                    tracing::warn!(
                        "no heartbeat relay address from rank {} ({e}); heartbeating the \
                         coordinator directly",
                        m.node_leader
                    );
                    HeartbeatRoute::Direct
                }
            }
        }
    }

    /// Starts heartbeats (every `interval`, carrying `progress`) and the Watch stream in the
    /// background. `on_abort` is called at most once: when the coordinator aborts the job, or
    /// when the coordinator is lost ("lost the coordinator at ADDR: ..."). It is not called
    /// after [`Self::finish`] or [`MonitorHandle::stop`]. Returns once the Watch stream is
    /// open (or failed to open, or after 5 s), so that an abort decided after this returns
    /// reaches this rank even when the coordinator exits right after it.
    /// Heartbeats follow `route` (see [`Self::heartbeat_route`]).
    pub fn start_monitor(
        &self,
        rank: u32,
        interval: Duration,
        route: HeartbeatRoute,
        progress: Arc<ProgressCell>,
        on_abort: Box<dyn Fn(AbortInfo) + Send>,
    ) -> MonitorHandle {
        let (stop, stop_rx) = watch::channel(false);
        let task = Monitor {
            grpc: self.grpc.clone(),
            addr: self.addr.clone(),
            token: self.token.clone(),
            rank,
            interval: interval.max(Duration::from_millis(10)),
            route: Some(route),
            progress,
            finished: self.finished.clone(),
        };
        let (ready, ready_rx) = tokio::sync::oneshot::channel();
        let join = self.rt.spawn(task.run(stop_rx, on_abort, ready));
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), ready_rx).await });
        MonitorHandle { stop, task: Some(join), rt: self.rt.clone() }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

struct Monitor {
    grpc: Grpc,
    addr: String,
    token: AsciiMetadataValue,
    rank: u32,
    interval: Duration,
    /// Taken when the heartbeat stream opens.
    route: Option<HeartbeatRoute>,
    progress: Arc<ProgressCell>,
    finished: Arc<AtomicBool>,
}

type BeatsCall = Pin<
    Box<
        dyn Future<Output = std::result::Result<tonic::Response<pb::HeartbeatReply>, Status>>
            + Send,
    >,
>;

/// The open heartbeat stream of a monitor.
enum Upstream {
    /// One beat per message, to the coordinator or to the node's relay (`via_relay`).
    Beats { tx: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>, via_relay: bool },
    /// This rank relays: one batch per interval to the coordinator; the relay server is
    /// aborted when this is dropped.
    Batches {
        tx: tokio::sync::mpsc::Sender<pb::HeartbeatBatch>,
        pending: Arc<PendingBeats>,
        _relay_server: AbortOnDrop,
    },
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> tokio_stream::wrappers::ReceiverStream<T> {
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
        ready: tokio::sync::oneshot::Sender<()>,
    ) {
        if let Some(abort) = self.watch_loop(&mut stop_rx, ready).await
            && !self.stopped(&stop_rx)
        {
            on_abort(abort);
        }
    }

    /// Runs until an abort is due (`Some`) or the monitor should end quietly (`None`).
    /// `ready` is told once the Watch stream is open or failed to open.
    async fn watch_loop(
        &mut self,
        stop_rx: &mut watch::Receiver<bool>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Option<AbortInfo> {
        let opened = self.grpc.watch(pb::WatchRequest { rank: self.rank }).await;
        let _ = ready.send(());
        let mut stream = match opened {
            Ok(r) => r.into_inner(),
            Err(s) => return Some(self.status_abort(s)),
        };
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let hb_limit = (self.interval * 5).max(Duration::from_secs(5));
        // Heartbeats travel on one long-lived stream; the call returns only when the
        // coordinator ends it (a refusal, e.g. the job failed) or the connection breaks.
        let route = self.route.take().unwrap_or(HeartbeatRoute::Direct);
        let (mut upstream, mut beats) = self.open_upstream(route).await;
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
                    if let Upstream::Beats { via_relay: true, .. } = upstream {
                        // The node's leader went away (finished, or died: then the
                        // coordinator names it); carry on straight to the coordinator.
                        tracing::warn!(
                            "the heartbeat relay went away ({}); heartbeating the coordinator \
                             directly",
                            match &ended { Ok(_) => "stream ended".to_owned(), Err(s) => status_text(s) }
                        );
                        (upstream, beats) = self.open_upstream(HeartbeatRoute::Direct).await;
                        continue;
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
                    // A coordinator that stops reading lets the stream's buffer fill up. (A
                    // closed channel means the call ended: the branch above sees why.)
                    let taken = match &upstream {
                        Upstream::Beats { tx, .. } => {
                            tokio::time::timeout(hb_limit, tx.send(req)).await.is_ok()
                        }
                        Upstream::Batches { tx, pending, .. } => {
                            let batch = pending.take_batch(self.rank, req);
                            tokio::time::timeout(hb_limit, tx.send(batch)).await.is_ok()
                        }
                    };
                    if !taken {
                        if let Upstream::Beats { via_relay: true, .. } = upstream {
                            tracing::warn!(
                                "the heartbeat relay took no heartbeat within {hb_limit:?}; \
                                 heartbeating the coordinator directly"
                            );
                            (upstream, beats) = self.open_upstream(HeartbeatRoute::Direct).await;
                            continue;
                        }
                        return Some(self.lost(format!("heartbeats not taken within {hb_limit:?}")));
                    }
                }
            }
        }
    }

    /// Opens the heartbeat stream for `route`; a relay that cannot be used falls back to the
    /// coordinator.
    async fn open_upstream(&self, route: HeartbeatRoute) -> (Upstream, BeatsCall) {
        match route {
            HeartbeatRoute::Direct => {}
            HeartbeatRoute::Relay(listener) => {
                let listener = listener
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(listener));
                match listener {
                    Ok(listener) => {
                        let pending = PendingBeats::new();
                        let token = self.token.to_str().unwrap_or_default().to_owned();
                        let served = pending.clone();
                        let server = tokio::spawn(async move {
                            if let Err(e) =
                                serve_relay(listener, &token, served, std::future::pending()).await
                            {
                                tracing::warn!("the heartbeat relay stopped: {e}");
                            }
                        });
                        let (tx, rx) = tokio::sync::mpsc::channel::<pb::HeartbeatBatch>(4);
                        let mut grpc = self.grpc.clone();
                        let call: BeatsCall =
                            Box::pin(async move { grpc.relayed_heartbeats(stream_of(rx)).await });
                        let server = AbortOnDrop(server);
                        return (Upstream::Batches { tx, pending, _relay_server: server }, call);
                    }
                    Err(e) => tracing::warn!(
                        "cannot serve the heartbeat relay ({e}); the node's ranks fall back to \
                         the coordinator"
                    ),
                }
            }
            HeartbeatRoute::ViaRelay(addr) => {
                match connect_relay(&addr, self.token.clone()).await {
                    Ok(mut relay) => {
                        let (tx, rx) = tokio::sync::mpsc::channel::<pb::HeartbeatRequest>(4);
                        let call: BeatsCall =
                            Box::pin(async move { relay.heartbeats(stream_of(rx)).await });
                        return (Upstream::Beats { tx, via_relay: true }, call);
                    }
                    Err(e) => tracing::warn!(
                        "cannot reach the heartbeat relay at {addr} ({e}); heartbeating the \
                         coordinator directly"
                    ),
                }
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::HeartbeatRequest>(4);
        let mut grpc = self.grpc.clone();
        let call: BeatsCall = Box::pin(async move { grpc.heartbeats(stream_of(rx)).await });
        (Upstream::Beats { tx, via_relay: false }, call)
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

type RelayGrpc = HeartbeatRelayClient<InterceptedService<Channel, TokenInterceptor>>;

/// Connects to a node's heartbeat relay (within 2 s), with the same PINGs as the coordinator
/// connection, so a relay that hangs is noticed and left.
async fn connect_relay(
    addr: &str,
    token: AsciiMetadataValue,
) -> std::result::Result<RelayGrpc, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(HeartbeatRelayClient::with_interceptor(channel, TokenInterceptor { token }))
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
