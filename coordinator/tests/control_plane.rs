//! The real server on 127.0.0.1:0 with rank clients on threads.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tessera_coordinator::{
    AbortInfo, CoordinatorClient, CoordinatorConfig, CoordinatorError, CoordinatorHandle,
    HeartbeatRoute, JoinInfo, Membership, Progress, ProgressCell, serve,
};
use tessera_proto::v1 as pb;
use tessera_proto::v1::coordinator_client::CoordinatorClient as RawClient;

const TOKEN: &str = "test-token-123";
const T: Duration = Duration::from_secs(10);

struct Server {
    handle: Option<CoordinatorHandle>,
    rt: Option<tokio::runtime::Runtime>,
    addr: String,
}

impl Server {
    fn start(cfg: CoordinatorConfig) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            serve(cfg, listener).await.unwrap()
        });
        let addr = handle.local_addr().to_string();
        Server { handle: Some(handle), rt: Some(rt), addr }
    }

    fn with_world(world: usize) -> Server {
        Server::start(fast_cfg(world))
    }

    fn handle(&self) -> &CoordinatorHandle {
        self.handle.as_ref().unwrap()
    }

    /// Waits for the job's outcome (bounded).
    fn wait(&self) -> Result<(), CoordinatorError> {
        let rt = self.rt.as_ref().unwrap();
        rt.block_on(async {
            tokio::time::timeout(T, self.handle().wait()).await.expect("job outcome within 10 s")
        })
    }

    /// Kills the server abruptly: its runtime and every connection go away.
    fn kill(mut self) {
        // Dropping the runtime first cancels the tasks without a graceful shutdown.
        let rt = self.rt.take().unwrap();
        rt.shutdown_background();
        std::mem::forget(self.handle.take());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let (Some(h), Some(rt)) = (self.handle.take(), self.rt.as_ref()) {
            rt.block_on(h.shutdown()).unwrap();
        }
    }
}

/// Ranks without monitors never heartbeat: the default test budget is long enough that none
/// is declared silent; [`short_budget`] is for the liveness tests.
fn fast_cfg(world: usize) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::new(world, TOKEN);
    cfg.heartbeat_timeout = Duration::from_secs(30);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.join_timeout = Duration::from_secs(20);
    cfg.tick_interval = Duration::from_millis(50);
    cfg
}

fn short_budget(world: usize) -> Server {
    let mut cfg = fast_cfg(world);
    cfg.heartbeat_timeout = Duration::from_secs(1);
    Server::start(cfg)
}

fn info(launcher_rank: Option<u32>, pid: u32) -> JoinInfo {
    JoinInfo {
        host: "localhost".into(),
        local_rank: launcher_rank,
        pid,
        launcher_rank,
        launcher_world: None,
        config_hash: "hash-a".into(),
        version: "0.1.0".into(),
        data_addr: format!("127.0.0.1:{}", 40000 + pid),
        generation: None,
    }
}

fn connect(addr: &str) -> CoordinatorClient {
    CoordinatorClient::connect(addr, TOKEN, T).unwrap()
}

/// Joins `infos.len()` ranks concurrently; returns each thread's client and result.
fn join_all(
    addr: &str,
    infos: Vec<JoinInfo>,
) -> Vec<(CoordinatorClient, Result<Membership, CoordinatorError>)> {
    let threads: Vec<_> = infos
        .into_iter()
        .map(|i| {
            let addr = addr.to_owned();
            thread::spawn(move || {
                let c = connect(&addr);
                let r = c.join(i);
                (c, r)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn joined(addr: &str, n: u32) -> Vec<(CoordinatorClient, Membership)> {
    join_all(addr, (0..n).map(|r| info(Some(r), 100 + r)).collect())
        .into_iter()
        .map(|(c, r)| (c, r.unwrap()))
        .collect()
}

fn rpc_code(e: &CoordinatorError) -> tonic::Code {
    e.code().unwrap_or_else(|| panic!("not an rpc error: {e}"))
}

#[test]
fn rendezvous_of_1_2_4_8_ranks() {
    for n in [1u32, 2, 4, 8] {
        let server = Server::with_world(n as usize);
        // Join in reverse launcher order; launcher ranks must still be kept.
        let infos = (0..n).rev().map(|r| info(Some(r), 100 + r)).collect();
        let results = join_all(&server.addr, infos);
        let mut seen = vec![false; n as usize];
        for (i, (_, r)) in results.iter().enumerate() {
            let m = r.as_ref().unwrap();
            let launcher_rank = n - 1 - i as u32;
            assert_eq!(m.rank, launcher_rank);
            assert_eq!(m.world, n);
            assert_eq!((m.local_rank, m.local_size), (m.rank, n));
            assert_eq!((m.node_rank, m.num_nodes), (0, 1));
            assert_eq!(m.generation, 1);
            assert_eq!(m.heartbeat_interval, Duration::from_millis(100));
            // Each rank learns the next rank's data address, and who relays its node's beats.
            assert_eq!(m.next_data_addr, format!("127.0.0.1:{}", 40100 + (m.rank + 1) % n));
            assert_eq!(m.node_leader, 0);
            seen[m.rank as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        for (c, _) in &results {
            c.finish().unwrap();
        }
        server.wait().unwrap();
        assert!(server.handle().is_done());
    }
}

#[test]
fn ranks_without_launcher_ranks_are_sorted() {
    let server = Server::with_world(3);
    let infos = vec![info(None, 30), info(None, 10), info(None, 20)];
    let ranks: Vec<u32> =
        join_all(&server.addr, infos).into_iter().map(|(_, r)| r.unwrap().rank).collect();
    assert_eq!(ranks, vec![2, 0, 1]);
}

#[test]
fn ranks_on_several_hosts_get_local_and_node_ranks() {
    let server = Server::with_world(4);
    let host = |h: &str, pid: u32| JoinInfo { host: h.into(), ..info(None, pid) };
    let infos = vec![host("nodeB", 1), host("nodeA", 2), host("nodeB", 3), host("nodeA", 4)];
    let got: Vec<(u32, u32, u32, u32, u32)> = join_all(&server.addr, infos)
        .into_iter()
        .map(|(_, r)| {
            let m = r.unwrap();
            (m.rank, m.local_rank, m.local_size, m.node_rank, m.num_nodes)
        })
        .collect();
    assert_eq!(got, vec![(2, 0, 2, 1, 2), (0, 0, 2, 0, 2), (3, 1, 2, 1, 2), (1, 1, 2, 0, 2)]);
}

#[test]
fn store_get_blocks_until_set_and_times_out_naming_the_key() {
    let server = Server::with_world(1);
    let addr = server.addr.clone();
    let getter = thread::spawn(move || {
        let c = connect(&addr);
        let start = Instant::now();
        let v = c.store_get("nccl-id", T);
        (v, start.elapsed())
    });
    // Give the getter a head start so it really waits (the result is checked either way).
    thread::sleep(Duration::from_millis(200));
    let setter = connect(&server.addr);
    let id: Vec<u8> = (0..128u8).collect();
    setter.store_set("nccl-id", &id).unwrap();
    let (v, waited) = getter.join().unwrap();
    assert_eq!(v.unwrap(), id);
    assert!(waited >= Duration::from_millis(100), "get returned after {waited:?}");
    // Set then get, and overwrite.
    setter.store_set("k", b"1").unwrap();
    setter.store_set("k", b"2").unwrap();
    assert_eq!(setter.store_get("k", T).unwrap(), b"2");

    let start = Instant::now();
    let err = setter.store_get("never", Duration::from_millis(300)).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(rpc_code(&err), tonic::Code::DeadlineExceeded);
    let msg = err.to_string();
    assert!(msg.contains("store key \"never\" was not set within 300ms"), "{msg}");
}

#[test]
fn barrier_releases_all_ranks_and_times_out_naming_missing() {
    let server = Server::with_world(4);
    let clients = joined(&server.addr, 4);
    let clients: Vec<Arc<CoordinatorClient>> =
        clients.into_iter().map(|(c, _)| Arc::new(c)).collect();
    for round in 0..3 {
        let threads: Vec<_> = clients
            .iter()
            .map(|c| {
                let c = c.clone();
                thread::spawn(move || c.barrier("step", T))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    // Only ranks 0 and 2 enter: rank 0's timeout names 1 and 3.
    let (c0, c2) = (clients[0].clone(), clients[2].clone());
    let t = thread::spawn(move || c2.barrier("partial", Duration::from_millis(2000)));
    let err = c0.barrier("partial", Duration::from_millis(1000)).unwrap_err();
    assert_eq!(rpc_code(&err), tonic::Code::DeadlineExceeded);
    let msg = err.to_string();
    assert!(
        msg.contains("timed out after 1s waiting at rank 0: ranks [1, 3] never entered it"),
        "{msg}"
    );
    // Rank 0 left when it gave up, so rank 2 is told 0, 1 and 3 are missing.
    let msg = t.join().unwrap().unwrap_err().to_string();
    assert!(msg.contains("ranks [0, 1, 3] never entered it"), "{msg}");
}

fn raw_call(addr: &str, token: Option<&str>) -> tonic::Status {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = RawClient::connect(format!("http://{addr}")).await.unwrap();
        let mut req = tonic::Request::new(pb::StoreSetRequest { key: "k".into(), value: vec![1] });
        if let Some(t) = token {
            req.metadata_mut().insert(tessera_coordinator::TOKEN_METADATA_KEY, t.parse().unwrap());
        }
        c.store_set(req).await.unwrap_err()
    })
}

#[test]
fn missing_and_wrong_tokens_are_refused() {
    let server = Server::with_world(1);
    let s = raw_call(&server.addr, None);
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(s.message().contains("missing job token: set TESSERA_TOKEN"), "{s:?}");
    let s = raw_call(&server.addr, Some("nope"));
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    assert!(s.message().contains("wrong job token"), "{s:?}");

    let wrong = CoordinatorClient::connect(&server.addr, "nope", T).unwrap();
    let err = wrong.join(info(Some(0), 1)).unwrap_err();
    assert_eq!(rpc_code(&err), tonic::Code::Unauthenticated);
    assert!(err.to_string().contains("wrong job token"), "{err}");
    // The refused join did not take the world's only slot.
    assert_eq!(server.handle().joined(), 0);
    let ok = connect(&server.addr);
    assert_eq!(ok.join(info(Some(0), 1)).unwrap().rank, 0);

    assert!(matches!(
        CoordinatorClient::connect(&server.addr, "", T),
        Err(CoordinatorError::InvalidToken)
    ));
}

#[test]
fn config_mismatch_reaches_every_rank() {
    let server = Server::with_world(3);
    let mut infos: Vec<JoinInfo> = (0..3).map(|r| info(Some(r), 100 + r)).collect();
    infos[2].config_hash = "hash-b".into();
    let results = join_all(&server.addr, infos);
    for (_, r) in results {
        let err = r.unwrap_err();
        assert_eq!(rpc_code(&err), tonic::Code::FailedPrecondition);
        let msg = err.to_string();
        assert!(msg.contains("config hash mismatch"), "{msg}");
        assert!(
            msg.contains("launcher rank 2 (host localhost, pid 102) has config hash hash-b"),
            "{msg}"
        );
        assert!(msg.contains("have config hash hash-a"), "{msg}");
    }
    let e = server.wait().unwrap_err();
    assert!(matches!(e, CoordinatorError::Aborted(_)), "{e}");
}

#[test]
fn join_timeout_names_missing_ranks() {
    let mut cfg = fast_cfg(4);
    cfg.join_timeout = Duration::from_millis(700);
    let server = Server::start(cfg);
    let start = Instant::now();
    let results = join_all(&server.addr, vec![info(Some(0), 1), info(Some(1), 2)]);
    assert!(start.elapsed() < Duration::from_secs(5));
    for (_, r) in results {
        let err = r.unwrap_err();
        assert_eq!(rpc_code(&err), tonic::Code::DeadlineExceeded);
        let msg = err.to_string();
        assert!(msg.contains("2 of 4 ranks joined after 700ms"), "{msg}");
        assert!(msg.contains("missing launcher ranks [2, 3]"), "{msg}");
    }
}

#[test]
fn joining_a_full_world_is_refused() {
    let server = Server::with_world(1);
    let _one = joined(&server.addr, 1);
    let extra = connect(&server.addr);
    let err = extra.join(info(Some(0), 99)).unwrap_err();
    assert_eq!(rpc_code(&err), tonic::Code::ResourceExhausted);
    assert!(err.to_string().contains("the world is full"), "{err}");
}

type Aborts = mpsc::Receiver<(u32, AbortInfo)>;

type Monitors = (Vec<tessera_coordinator::MonitorHandle>, Aborts, Vec<Arc<ProgressCell>>);

/// Starts a monitor on every given client; aborts arrive on the returned channel.
fn monitors(clients: &[(CoordinatorClient, Membership)]) -> Monitors {
    monitors_routed(clients, false)
}

/// [`monitors`], with the node's heartbeats through its leader's relay when `relay` (all test
/// ranks are on one host; the leader, rank 0, must come first).
fn monitors_routed(clients: &[(CoordinatorClient, Membership)], relay: bool) -> Monitors {
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    let mut cells = Vec::new();
    for (c, m) in clients {
        let tx = tx.clone();
        let rank = m.rank;
        let cell = Arc::new(ProgressCell::new());
        cells.push(cell.clone());
        let route = c.heartbeat_route(m, std::net::Ipv4Addr::LOCALHOST.into(), relay);
        match (relay, m.rank == m.node_leader, &route) {
            (false, _, HeartbeatRoute::Direct)
            | (true, true, HeartbeatRoute::Relay(_))
            | (true, false, HeartbeatRoute::ViaRelay(_)) => {}
            _ => panic!("rank {rank} (relay {relay}) got route {route:?}"),
        }
        handles.push(c.start_monitor(
            m.rank,
            m.heartbeat_interval,
            route,
            cell,
            Box::new(move |a| {
                let _ = tx.send((rank, a));
            }),
        ));
    }
    (handles, rx, cells)
}

fn expect_aborts(rx: &Aborts, n: usize) -> Vec<(u32, AbortInfo)> {
    let mut got: Vec<(u32, AbortInfo)> = (0..n)
        .map(|i| {
            rx.recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("abort {i} of {n} did not arrive within 5 s"))
        })
        .collect();
    got.sort_by_key(|(r, _)| *r);
    got
}

#[test]
fn silent_rank_aborts_the_others_naming_it() {
    let server = short_budget(3);
    let clients = joined(&server.addr, 3);
    // Rank 2 never heartbeats.
    let start = Instant::now();
    let (_m, rx, _) = monitors(&clients[..2]);
    let got = expect_aborts(&rx, 2);
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    for (r, a) in &got {
        assert_eq!(a.rank, Some(2), "rank {r} got {a:?}");
        assert!(
            a.reason.contains("rank 2 (host localhost, pid 102) missed its heartbeat budget"),
            "{}",
            a.reason
        );
    }
    assert_eq!(got[0].0, 0);
    assert_eq!(got[1].0, 1);
    let abort = server.handle().abort_info().unwrap();
    assert_eq!(abort.rank, Some(2));
    assert!(matches!(server.wait(), Err(CoordinatorError::Aborted(a)) if a.rank == Some(2)));
    // Later calls are refused with the reason.
    let err = clients[0].0.barrier("after", T).unwrap_err();
    assert_eq!(rpc_code(&err), tonic::Code::Aborted);
    assert!(err.to_string().contains("rank 2"), "{err}");
}

#[test]
fn silent_rank_behind_a_relay_is_named_itself() {
    let server = short_budget(3);
    let clients = joined(&server.addr, 3);
    // Ranks 0 (the relay) and 1 heartbeat through it; rank 2 never heartbeats.
    let (_m, rx, _) = monitors_routed(&clients[..2], true);
    for (r, a) in expect_aborts(&rx, 2) {
        assert_eq!(a.rank, Some(2), "rank {r} got {a:?}");
        assert!(a.reason.contains("rank 2 (host localhost, pid 102) missed its heartbeat budget"));
    }
}

#[test]
fn relayed_progress_arrives_and_the_others_outlive_their_relay() {
    let server = short_budget(3);
    let mut clients = joined(&server.addr, 3);
    let (mut handles, rx, cells) = monitors_routed(&clients, true);
    cells[2].set(Progress { step: 7, loss: Some(0.25), samples: 70, b_simple: None });
    let deadline = Instant::now() + T;
    while server.handle().progress()[2].progress.is_none() {
        assert!(Instant::now() < deadline, "relayed progress never arrived");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.handle().progress()[2].progress.unwrap().step, 7);
    // The relay (rank 0) finishes and goes away; ranks 1 and 2 must carry on by themselves
    // past the 1 s heartbeat budget.
    let (c0, _) = clients.remove(0);
    c0.finish().unwrap();
    handles.remove(0).stop();
    drop(c0);
    thread::sleep(Duration::from_millis(2000));
    assert!(rx.try_recv().is_err(), "losing the relay caused an abort");
    assert!(server.handle().abort_info().is_none());
    let p = server.handle().progress();
    assert!(p[1].since_heartbeat < Duration::from_secs(1), "{p:?}");
    assert!(p[2].since_heartbeat < Duration::from_secs(1), "{p:?}");
    for (c, _) in &clients {
        c.finish().unwrap();
    }
    server.wait().unwrap();
}

#[test]
fn report_error_fans_out_to_every_rank() {
    let server = Server::with_world(3);
    let clients = joined(&server.addr, 3);
    let (_m, rx, _) = monitors(&clients);
    clients[1].0.report_error("loss is NaN at step 12").unwrap();
    let got = expect_aborts(&rx, 3);
    for (_, a) in got {
        assert_eq!(a.rank, Some(1));
        assert_eq!(
            a.reason,
            "rank 1 (host localhost, pid 101) reported an error: loss is NaN at step 12"
        );
    }
}

#[test]
fn launcher_mark_failed_aborts_every_rank() {
    let server = Server::with_world(2);
    let clients = joined(&server.addr, 2);
    let (_m, rx, _) = monitors(&clients);
    server.handle().mark_failed(0, "exited with status 9");
    for (_, a) in expect_aborts(&rx, 2) {
        assert_eq!(a.rank, Some(0));
        assert_eq!(a.reason, "rank 0 (host localhost, pid 100) exited with status 9");
    }
}

#[test]
fn finish_is_not_a_failure_and_progress_is_reported() {
    let server = short_budget(2);
    let mut clients = joined(&server.addr, 2);
    let (mut handles, rx, cells) = monitors(&clients);
    cells[1].set(Progress { step: 42, loss: Some(0.5), samples: 4200, b_simple: Some(321.5) });
    let deadline = Instant::now() + T;
    loop {
        let p = server.handle().progress();
        if p[1].progress.is_some() {
            assert_eq!(p[1].progress.unwrap().step, 42);
            assert_eq!(p[1].progress.unwrap().loss, Some(0.5));
            assert_eq!(p[1].progress.unwrap().b_simple, Some(321.5));
            assert_eq!(p[0].progress, None);
            break;
        }
        assert!(Instant::now() < deadline, "progress never arrived: {p:?}");
        thread::sleep(Duration::from_millis(20));
    }
    // Rank 0 finishes and goes away entirely; rank 1 keeps running past the budget.
    let (c0, _) = clients.remove(0);
    c0.finish().unwrap();
    handles.remove(0).stop();
    drop(c0);
    thread::sleep(Duration::from_millis(1500));
    assert!(rx.try_recv().is_err(), "a finished rank caused an abort");
    assert!(server.handle().abort_info().is_none());
    assert!(server.handle().progress()[0].finished);
    clients[0].0.finish().unwrap();
    server.wait().unwrap();
    drop(handles);
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn killed_coordinator_is_reported_as_lost() {
    let server = Server::with_world(2);
    let addr = server.addr.clone();
    let clients = joined(&addr, 2);
    let (_m, rx, _) = monitors(&clients);
    server.kill();
    for (_, a) in expect_aborts(&rx, 2) {
        assert_eq!(a.rank, None);
        assert!(a.reason.starts_with(&format!("lost the coordinator at {addr}")), "{}", a.reason);
    }
}

#[test]
fn connect_to_nothing_fails_with_the_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = CoordinatorClient::connect(&addr, TOKEN, Duration::from_millis(300))
        .err()
        .expect("nothing listens there");
    let msg = err.to_string();
    assert!(msg.contains(&format!("cannot reach the coordinator at {addr}")), "{msg}");
    assert!(matches!(
        CoordinatorClient::connect("no-port", TOKEN, T),
        Err(CoordinatorError::InvalidAddress { .. })
    ));
}

#[test]
fn standalone_coordinator_returns_the_abort_reason() {
    let (tx, rx) = mpsc::channel();
    let mut cfg = fast_cfg(2);
    cfg.token = TOKEN.into();
    let server = thread::spawn(move || {
        tessera_coordinator::run_standalone(cfg, "127.0.0.1:0", |addr| {
            tx.send(addr.to_string()).unwrap();
        })
    });
    let addr = rx.recv_timeout(T).unwrap();
    let clients = joined(&addr, 2);
    let (_m, aborts, _) = monitors(&clients);
    clients[0].0.report_error("disk full").unwrap();
    // Every rank hears about it before the standalone coordinator exits.
    for (_, a) in expect_aborts(&aborts, 2) {
        assert_eq!(a.rank, Some(0));
    }
    match server.join().unwrap() {
        Err(CoordinatorError::Aborted(a)) => assert!(a.reason.contains("disk full"), "{a:?}"),
        other => panic!("expected an abort, got {other:?}"),
    }
}

#[test]
fn blocking_coordinator_serves_until_every_rank_finished() {
    let c = tessera_coordinator::BlockingCoordinator::start(fast_cfg(2), "127.0.0.1:0").unwrap();
    let addr = c.local_addr().to_string();
    assert!(c.wait_timeout(Duration::from_millis(50)).is_none());
    let clients = joined(&addr, 2);
    assert_eq!(c.joined(), 2);
    let (handles, aborts, _) = monitors(&clients);
    for (cl, _) in &clients {
        cl.finish().unwrap();
    }
    c.wait_timeout(T).expect("job ended").unwrap();
    assert!(c.is_done());
    c.shutdown().unwrap();
    drop(handles);
    assert!(aborts.recv_timeout(Duration::from_millis(300)).is_err());
}

#[test]
fn generated_tokens_differ() {
    let a = tessera_coordinator::generate_token();
    let b = tessera_coordinator::generate_token();
    assert_eq!(a.len(), 32);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
}
