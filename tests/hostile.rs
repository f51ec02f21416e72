//! Hostile input with real processes and sockets: garbage and silent connections on the
//! coordinator's port and on a rank's data-plane port, a peer that knows the job token but
//! sends an absurd frame, and damaged shards.
//!
//! Already covered elsewhere (not repeated here): a wrong or missing token and a config that
//! differs between ranks (tests/cluster.rs), a truncated shard and a shard whose dimensions do
//! not match the config (tests/training.rs).

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Coordinator, Watched, run, tessera, wait};
use tessera_collectives::tcp::{
    FRAME_HEADER_LEN, FrameHeader, FrameKind, HELLO_LEN, decode_frame_header, decode_hello,
    encode_hello,
};
use tessera_coordinator::{CoordinatorClient, JoinInfo};

const LIMIT: Duration = Duration::from_secs(120);

/// The answer byte of a refused data-plane handshake, followed by the reason's length and text.
const ACK_REFUSED: u8 = 2;
/// The answer byte of an accepted handshake.
const ACK_OK: u8 = 1;

fn out_dir_arg(dir: &Path) -> String {
    format!("run.out_dir={:?}", dir.display().to_string())
}

/// Reads until the peer closes (or resets) the connection; panics if it is still open after
/// `limit`. Returns what arrived.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the connection is still open after {limit:?}")
            }
            // Reset: dropped too.
            Err(_) => return got,
        }
    }
}

/// Writes as much of `bytes` as the peer takes; a peer that closes early is fine.
fn write_some(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
}

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The TCP ports process `pid` listens on (IPv4), from /proc: its socket inodes matched against
/// the kernel's table of listening sockets.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 is the inode.
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            (*state == "0A" && inodes.contains(*inode))
                .then(|| u16::from_str_radix(local.split(':').nth(1)?, 16).ok())
                .flatten()
        })
        .collect()
}

/// Waits (up to 60 s) until the rank process `pid` listens on its data-plane port. A rank
/// binds it before joining and, in a world that is not complete yet, waits at the join.
fn data_plane_port(pid: u32) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let [port] = listening_ports(pid)[..] {
            return port;
        }
        assert!(Instant::now() < deadline, "rank process {pid} never listened on one port");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn coordinator_addr(coord: &Coordinator) -> SocketAddr {
    coord.addr.parse().unwrap_or_else(|e| panic!("coordinator address {:?}: {e}", coord.addr))
}

#[test]
fn the_coordinator_drops_garbage_and_outlives_silent_connections() {
    let coord = Coordinator::start(2, &[]);
    let addr = coordinator_addr(&coord);

    // Garbage: random bytes, an HTTP/1 request, and an HTTP/2 preface followed by a frame that
    // claims 16 MiB (far above the default maximum frame size of 16 KiB).
    let mut random = TcpStream::connect(addr).unwrap();
    write_some(&mut random, &noise(64 * 1024, 7));
    let mut http1 = TcpStream::connect(addr).unwrap();
    write_some(&mut http1, b"GET / HTTP/1.1\r\nHost: tessera\r\n\r\n");
    let mut oversized = TcpStream::connect(addr).unwrap();
    let mut frame = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    frame.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1]); // DATA of 16 MiB - 1
    frame.extend_from_slice(&noise(1024, 9));
    write_some(&mut oversized, &frame);
    // Half-open: one connection says nothing, another stops in the middle of the preface.
    let silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    write_some(&mut half, b"PRI * HTTP/2.0\r\n");

    // The job still runs to completion.
    let dir = tempfile::tempdir().unwrap();
    let args = ["--set", "run.steps=3", "--set", "run.eval_every=0"];
    let ranks: Vec<_> = (0..2).map(|r| coord.rank(Some(r), 2, &args, dir.path())).collect();
    for (r, child) in ranks.into_iter().enumerate() {
        let f = wait(child, LIMIT);
        assert!(f.status.success(), "rank {r} failed\n{}", f.all_output());
    }
    // Every garbage connection was dropped.
    for (what, s) in [("random bytes", &mut random), ("HTTP/1", &mut http1)] {
        let answer = read_until_closed(s, Duration::from_secs(30));
        assert!(answer.len() < 4096, "{what}: {} bytes of answer", answer.len());
    }
    read_until_closed(&mut oversized, Duration::from_secs(30));

    // With the two idle connections still open, the coordinator ends with its job.
    let mut child = coord.child;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the coordinator did not exit after its job, with idle connections open");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "coordinator exited with {status}");
    drop((silent, half));
}

#[test]
fn a_rank_refuses_garbage_foreign_and_silent_data_plane_connections_and_the_job_completes() {
    let coord = Coordinator::start(2, &[]);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--set", "run.steps=3", "--set", "run.eval_every=0"];
    let first = Watched::spawn(coord.rank_command(Some(0), 2, &args, dir.path()));
    // The first rank listens and waits at the join for the second: connect to it meanwhile.
    // Its ring setup accepts connections in order once the second rank has joined.
    let port = data_plane_port(first.child.id());
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut garbage = TcpStream::connect(addr).unwrap();
    write_some(&mut garbage, &noise(100, 3));
    let mut foreign = TcpStream::connect(addr).unwrap();
    write_some(&mut foreign, &encode_hello(0xdead_beef, 2, 1));
    let mut short = TcpStream::connect(addr).unwrap();
    write_some(&mut short, &encode_hello(0xdead_beef, 2, 1)[..20]);
    short.shutdown(Shutdown::Write).unwrap();
    // Says nothing at all (the rank waits a few seconds for its handshake, then moves on).
    let mut silent = TcpStream::connect(addr).unwrap();

    let second = Watched::spawn(coord.rank_command(Some(1), 2, &args, dir.path()));
    let expect = [
        (&mut garbage, "not a Tessera data-plane handshake"),
        (&mut foreign, "does not match this job's session"),
        (&mut short, "no handshake"),
        (&mut silent, "no handshake"),
    ];
    for (s, reason) in expect {
        let answer = read_until_closed(s, Duration::from_secs(60));
        assert_eq!(answer.first(), Some(&ACK_REFUSED), "{answer:?}");
        let text = String::from_utf8_lossy(answer.get(2..).unwrap_or_default());
        assert!(text.contains(reason), "expected {reason:?} in the refusal {text:?}");
    }
    first.wait_for_lines("data-plane ring connected", 1, LIMIT);
    // Once the ring is up the port is closed: nothing more can be injected.
    assert!(TcpStream::connect(addr).is_err(), "the data-plane port still accepts connections");
    for (name, rank) in [("first", first), ("second", second)] {
        let f = rank.finish(LIMIT);
        assert!(f.status.success(), "the {name} rank failed\n{}", f.all_output());
        if name == "first" {
            assert!(f.stderr.contains("refused a data-plane connection"), "{}", f.all_output());
        }
    }
    coord.stop();
}

/// The data-plane session of a job: FNV-1a of the token, xor the generation (as `tessera rank`
/// derives it).
fn session_of(token: &str, generation: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in token.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ generation
}

#[test]
fn a_peer_with_the_token_that_claims_a_huge_frame_is_a_protocol_error_not_an_allocation() {
    // One real rank; the test itself joins as the other and speaks the data plane by hand.
    let coord = Coordinator::start(2, &["--heartbeat-timeout", "60"]);
    let dir = tempfile::tempdir().unwrap();
    let job = r#"{"sizes":"1K","iters":3,"warmup":0,"check":false,"json":true}"#;
    let args = ["--job", "bench-allreduce", "--job-args", job];
    let real = Watched::spawn(coord.rank_command(Some(0), 2, &args, dir.path()));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = CoordinatorClient::connect(&coord.addr, &coord.token, LIMIT).unwrap();
    let m = client
        .join(JoinInfo {
            host: "impostor".into(),
            local_rank: Some(1),
            pid: std::process::id(),
            launcher_rank: Some(1),
            launcher_world: Some(2),
            config_hash: format!("bench-allreduce:{job}"),
            version: env!("CARGO_PKG_VERSION").into(),
            data_addr: listener.local_addr().unwrap().to_string(),
            generation: None,
        })
        .unwrap();
    let (me, other) = (m.rank as usize, 1 - m.rank as usize);
    let session = session_of(&coord.token, m.generation);

    // Handshakes both ways: to the real rank as its r-1, from it as its r+1.
    let mut to_real = TcpStream::connect(&m.next_data_addr).unwrap();
    to_real.write_all(&encode_hello(session, 2, me)).unwrap();
    let (mut from_real, _) = listener.accept().unwrap();
    from_real.set_read_timeout(Some(LIMIT)).unwrap();
    let mut hello = [0u8; HELLO_LEN];
    from_real.read_exact(&mut hello).unwrap();
    decode_hello(&hello).unwrap().check(session, 2, other).unwrap();
    from_real.write_all(&[ACK_OK, 0]).unwrap();
    to_real.set_read_timeout(Some(LIMIT)).unwrap();
    let mut ack = [0u8; 2];
    to_real.read_exact(&mut ack).unwrap();
    assert_eq!(ack[0], ACK_OK, "the real rank refused the handshake: {ack:?}");

    // The real rank sends first: learn which collective it is in, then answer with the same
    // collective and a length of 2^63 - 1 bytes.
    let mut head = [0u8; FRAME_HEADER_LEN];
    from_real.read_exact(&mut head).unwrap();
    let theirs = decode_frame_header(&head).unwrap();
    assert_eq!(theirs.kind, FrameKind::Data);
    let huge = u64::MAX / 2;
    to_real.write_all(&FrameHeader { len: huge, ..theirs }.encode()).unwrap();

    let f = real.finish(Duration::from_secs(30));
    assert!(!f.status.success(), "{}", f.all_output());
    let blame = format!("protocol error with rank {me}");
    assert!(f.stderr.contains(&blame), "expected {blame:?}\n{}", f.all_output());
    assert!(f.stderr.contains(&huge.to_string()), "the length is not named\n{}", f.all_output());
    // The real rank closed its links.
    read_until_closed(&mut to_real, Duration::from_secs(30));
    drop(client);
    coord.stop();
}

#[test]
fn a_corrupt_shard_or_a_file_that_is_not_a_shard_is_named_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    let mut cmd = tessera();
    cmd.args(["data", "synth", "--n-train", "400", "--n-eval", "100", "--out"]).arg(&data);
    let f = run(cmd, LIMIT);
    assert!(f.status.success(), "{}", f.all_output());

    let good = std::fs::read(data.join("train.shard")).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let corrupt = dir.path().join("corrupt.shard");
    std::fs::write(&corrupt, &flipped).unwrap();
    let not_a_shard = dir.path().join("notes.shard");
    std::fs::write(&not_a_shard, b"lr = 0.1\nthese are my notes, not a data shard\n").unwrap();

    let eval_set = format!("data.eval={:?}", data.join("eval.shard").display().to_string());
    let cases = [
        (&corrupt, ["corrupt.shard", "checksum mismatch"]),
        (&not_a_shard, ["notes.shard", "not a Tessera shard"]),
    ];
    for (path, needles) in cases {
        let train_set = format!("data.train={:?}", path.display().to_string());
        let mut cmd = tessera();
        cmd.args(["run", "--nproc", "2", "--set", "data.source=\"shards\""])
            .args(["--set", &train_set, "--set", &eval_set, "--set", "run.steps=5"])
            .args(["--set", &out_dir_arg(&dir.path().join("run"))]);
        let f = run(cmd, LIMIT);
        assert!(!f.status.success(), "{}", f.all_output());
        for n in needles {
            assert!(f.stderr.contains(n), "expected {n:?}\n{}", f.all_output());
        }
        assert!(!f.stderr.contains("panicked"), "{}", f.all_output());
    }
}
