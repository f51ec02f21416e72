//! TcpRing over real loopback sockets, one thread per rank.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{assert_bitwise_identical, exercise, lens, listeners, run_ranks, tcp_group, val};
use tessera_collectives::tcp::{TcpRing, TcpRingConfig};
use tessera_collectives::{CommError, Communicator, ReduceOp};

fn cfg() -> TcpRingConfig {
    TcpRingConfig {
        timeout: Duration::from_secs(30),
        setup_timeout: Duration::from_secs(10),
        // Small slices so that even the small sizes run through many pipelined slices.
        chunk_bytes: 4096,
        session: 0x5eed,
        ..TcpRingConfig::default()
    }
}

fn all_collectives_with(world: usize, cfg: &TcpRingConfig) {
    // 100_003 floats exceed the sequential threshold: exercises the pipelined engines.
    let lens = lens(world, &[100_003]);
    let results = run_ranks(tcp_group(world, cfg), |mut c| exercise(&mut c, &lens));
    assert_bitwise_identical(&results);
}

fn all_collectives(world: usize) {
    all_collectives_with(world, &cfg());
}

#[test]
fn all_collectives_world_1() {
    all_collectives(1);
}

#[test]
fn all_collectives_world_2() {
    all_collectives(2);
}

#[test]
fn all_collectives_world_3() {
    all_collectives(3);
}

#[test]
fn all_collectives_world_4() {
    all_collectives(4);
}

#[test]
fn cheap_collectives_world_8() {
    let lens = lens(8, &[]);
    let results = run_ranks(tcp_group(8, &cfg()), |mut c| exercise(&mut c, &lens));
    assert_bitwise_identical(&results);
}

/// 64 MiB + 3 floats, default slice size: checked against the naive sum on every rank and
/// bitwise across ranks.
fn big_all_reduce(world: usize) {
    let len = (64 << 20) / 4 + 3;
    let cfg = TcpRingConfig { chunk_bytes: TcpRingConfig::default().chunk_bytes, ..cfg() };
    let results = run_ranks(tcp_group(world, &cfg), |mut c| {
        let r = c.rank();
        let mut buf: Vec<f32> = (0..len).map(|i| val(r, i, 9)).collect();
        c.all_reduce_f32(&mut buf, ReduceOp::Sum).expect("all_reduce");
        // Each rank checks a stride of the elements against the naive reference.
        for i in (r..len).step_by(world * 7).chain(len - 3..len) {
            let want: f64 = (0..world).map(|q| val(q, i, 9) as f64).sum();
            assert!((buf[i] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "[{i}]");
        }
        vec![buf]
    });
    assert_bitwise_identical(&results);
}

#[test]
fn big_all_reduce_world_2() {
    big_all_reduce(2);
}

#[test]
fn big_all_reduce_world_3() {
    big_all_reduce(3);
}

#[test]
fn big_all_reduce_world_4() {
    big_all_reduce(4);
}

#[test]
fn seq_counts_calls() {
    let seqs = run_ranks(tcp_group(2, &cfg()), |mut c| {
        assert_eq!(c.seq(), 0);
        c.barrier().unwrap();
        c.all_reduce_f32(&mut [1.0], ReduceOp::Sum).unwrap();
        c.seq()
    });
    assert_eq!(seqs, vec![2, 2]);
}

#[test]
fn diverging_collectives_are_protocol_errors_naming_the_peer() {
    let errs = run_ranks(tcp_group(2, &cfg()), |mut c| {
        if c.rank() == 0 {
            c.all_reduce_f32(&mut [1.0; 10], ReduceOp::Sum).unwrap_err()
        } else {
            c.all_gather_bytes(b"hello").unwrap_err()
        }
    });
    for (r, e) in errs.iter().enumerate() {
        match e {
            CommError::Protocol { peer, .. } => assert_eq!(*peer, 1 - r, "{e}"),
            other => panic!("rank {r}: expected a protocol error, got {other}"),
        }
    }
    assert!(errs[0].to_string().contains("all_gather_bytes"), "{}", errs[0]);
}

#[test]
fn mismatched_lengths_are_protocol_errors() {
    let errs = run_ranks(tcp_group(2, &cfg()), |mut c| {
        let mut buf = vec![1.0f32; 10 + 2 * c.rank()];
        let e = c.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap_err();
        // The communicator is unusable afterwards, and says so.
        let again = c.barrier().unwrap_err();
        assert!(matches!(again, CommError::Poisoned(_)), "{again}");
        e
    });
    for e in &errs {
        assert!(matches!(e, CommError::Protocol { .. }), "{e}");
        assert!(e.to_string().contains("same length") || e.to_string().contains("expected"), "{e}");
    }
}

#[test]
fn a_sized_ring_shift_of_another_length_is_refused_at_the_header() {
    // Rank 0 expects 100 bytes from rank 1, which sends 101: refused before the payload, and
    // the communicator is poisoned. Rank 1's own shift completes (rank 0 sent what it expects).
    let out = run_ranks(tcp_group(2, &cfg()), |mut c| {
        let mut recv = Vec::new();
        let r = c.ring_shift_bytes_sized(&vec![3u8; 100 + c.rank()], &mut recv, 100);
        (r.err(), recv.len())
    });
    let e = out[0].0.as_ref().expect("rank 0 fails");
    assert!(matches!(e, CommError::Protocol { peer: 1, .. }), "{e}");
    assert!(e.to_string().contains("frame of 101 bytes where 100 were expected"), "{e}");
    assert!(out[1].0.is_none(), "{:?}", out[1].0);
    assert_eq!(out[1].1, 100);
}

#[test]
fn a_sized_ring_shift_on_one_rank_checks_the_length() {
    let mut c = tcp_group(1, &cfg()).pop().unwrap();
    let mut recv = Vec::new();
    c.ring_shift_bytes_sized(b"abc", &mut recv, 3).unwrap();
    assert_eq!(recv, b"abc");
    let e = c.ring_shift_bytes_sized(b"abc", &mut recv, 4).unwrap_err();
    assert!(e.to_string().contains("rank 0 sent 3 bytes where rank 0 expected 4"), "{e}");
}

#[test]
fn dropped_peer_mid_all_reduce_is_named() {
    dropped_peer_mid_all_reduce(&cfg());
}

fn dropped_peer_mid_all_reduce(cfg: &TcpRingConfig) {
    let world = 3;
    let comms = tcp_group(world, cfg);
    let started = Instant::now();
    let errs = run_ranks(comms, |mut c| {
        let r = c.rank();
        let mut buf: Vec<f32> = (0..4_000_000).map(|i| val(r, i, 1)).collect();
        if r == 2 {
            // Rank 2 takes part in the all-reduce but its links are closed from another thread.
            let handle = c.abort_handle().unwrap();
            std::thread::scope(|s| {
                s.spawn(move || handle.abort());
                let _ = c.all_reduce_f32(&mut buf, ReduceOp::Sum);
            });
            None
        } else {
            Some(c.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap_err())
        }
    });
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    for (r, e) in errs.iter().enumerate().take(2) {
        match e {
            Some(CommError::PeerDisconnected { peer, .. }) => {
                assert_eq!(*peer, 2, "rank {r}: {e:?}")
            }
            other => panic!("rank {r}: expected PeerDisconnected naming rank 2, got {other:?}"),
        }
    }
}

#[test]
fn dropped_peer_in_world_4_fails_everyone_quickly() {
    let comms = tcp_group(4, &cfg());
    let started = Instant::now();
    let errs = run_ranks(comms, |mut c| {
        let r = c.rank();
        let mut buf: Vec<f32> = (0..2_000_000).map(|i| val(r, i, 1)).collect();
        if r == 3 {
            drop(c);
            return None;
        }
        Some(c.all_reduce_f32(&mut buf, ReduceOp::Sum).unwrap_err())
    });
    assert!(started.elapsed() < Duration::from_secs(20));
    // Direct neighbours name rank 3; everyone fails with a disconnect.
    for (r, e) in errs.iter().enumerate().take(3) {
        let e = e.as_ref().unwrap();
        match e {
            CommError::PeerDisconnected { peer, .. } => {
                if r == 0 || r == 2 {
                    assert_eq!(*peer, 3, "rank {r}: {e}");
                }
            }
            other => panic!("rank {r}: expected PeerDisconnected, got {other}"),
        }
    }
}

#[test]
fn stalled_peer_times_out_naming_it_small() {
    stalled_peer_times_out(&cfg(), 1000);
}

#[test]
fn stalled_peer_times_out_naming_it_pipelined() {
    stalled_peer_times_out(&cfg(), 1 << 20);
}

fn stalled_peer_times_out(cfg: &TcpRingConfig, len: usize) {
    let timeout = Duration::from_millis(1500);
    let cfg = TcpRingConfig { timeout, ..cfg.clone() };
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let done_rx = std::sync::Mutex::new(done_rx);
    let comms = tcp_group(2, &cfg);
    let started = Instant::now();
    let errs = run_ranks(comms, |mut c| {
        if c.rank() == 1 {
            // Stalls: holds its links open and calls nothing until rank 0 has given up.
            let _ = done_rx.lock().unwrap().recv();
            return None;
        }
        let e = c.all_reduce_f32(&mut vec![1.0; len], ReduceOp::Sum).unwrap_err();
        let waited = started.elapsed();
        done_tx.send(()).unwrap();
        Some((e, waited))
    });
    let (e, waited) = errs[0].as_ref().unwrap();
    match e {
        CommError::Timeout { peer, after, .. } => {
            assert_eq!(*peer, 1);
            assert_eq!(*after, timeout);
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(*waited >= timeout && *waited < timeout + Duration::from_secs(5), "{waited:?}");
}

#[test]
fn stray_garbage_connections_are_refused_and_setup_goes_on() {
    let (ls, addrs) = listeners(2);
    // Strays connect first to rank 1's listener: garbage, then a silent-then-closed one.
    let mut garbage = TcpStream::connect(addrs[1]).unwrap();
    garbage.write_all(&[0xAB; 64]).unwrap();
    let closed = TcpStream::connect(addrs[1]).unwrap();
    drop(closed);
    let cfg = cfg();
    let rings: Vec<TcpRing> = std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, cfg) = (&addrs, cfg.clone());
                s.spawn(move || TcpRing::connect(l, r, addrs, cfg).unwrap())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The garbage connection was told it was refused (or closed), not accepted.
    garbage.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = garbage.read_to_end(&mut answer);
    assert_ne!(answer.first(), Some(&1u8), "a garbage connection was accepted");
    let sums = run_ranks(rings, |mut c| {
        let mut b = [c.rank() as f32 + 1.0];
        c.all_reduce_f32(&mut b, ReduceOp::Sum).unwrap();
        b[0]
    });
    assert_eq!(sums, vec![3.0, 3.0]);
}

#[test]
fn wrong_session_is_refused() {
    let (ls, addrs) = listeners(2);
    let errs: Vec<CommError> = std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                let cfg = TcpRingConfig {
                    session: 100 + r as u64,
                    setup_timeout: Duration::from_secs(2),
                    ..cfg()
                };
                s.spawn(move || TcpRing::connect(l, r, addrs, cfg).unwrap_err())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errs {
        assert!(matches!(e, CommError::Setup(_)), "{e}");
        assert!(e.to_string().contains("session"), "{e}");
    }
}

#[test]
fn setup_times_out_when_a_peer_never_comes() {
    let (ls, addrs) = listeners(2);
    let mut ls = ls.into_iter();
    let l0 = ls.next().unwrap();
    let _l1 = ls.next().unwrap(); // bound but never connects or accepts
    let cfg = TcpRingConfig { setup_timeout: Duration::from_millis(800), ..cfg() };
    let started = Instant::now();
    let e = TcpRing::connect(l0, 0, &addrs, cfg).unwrap_err();
    assert!(matches!(e, CommError::Setup(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn invalid_arguments_are_errors() {
    let (ls, addrs) = listeners(1);
    let l = ls.into_iter().next().unwrap();
    assert!(matches!(
        TcpRing::connect(l, 3, &addrs, cfg()),
        Err(CommError::InvalidArgument { .. })
    ));
    let errs = run_ranks(tcp_group(2, &cfg()), |mut c| {
        let e1 = c.all_gather_f32(&[1.0; 3], &mut [0.0; 5]).unwrap_err();
        let e2 = c.broadcast_bytes(&mut [0u8; 3], 7).unwrap_err();
        (e1, e2)
    });
    for (e1, e2) in errs {
        assert!(matches!(e1, CommError::InvalidArgument { .. }));
        assert!(matches!(e2, CommError::InvalidArgument { .. }));
    }
}

/// A buffer all-reduced in parts (gradient buckets, in any order and of any sizes, some cut
/// across the whole buffer's chunks) equals one all-reduce of the whole buffer bitwise, at
/// worlds where the order of the summation matters (3, 4 ranks); sums and means.
#[test]
fn parts_equal_the_whole_bitwise() {
    for world in [2usize, 3, 4] {
        let total = 20_011;
        // Parts in a scattered order; they cover 0..total exactly once.
        let cuts = [0usize, 17, 5_000, 6_667, 6_668, 13_340, 19_999, total];
        let order = [4usize, 0, 6, 2, 5, 1, 3];
        let results = run_ranks(tcp_group(world, &cfg()), |mut c| {
            let r = c.rank();
            let mut out = Vec::new();
            for op in [ReduceOp::Sum, ReduceOp::Mean] {
                let input: Vec<f32> = (0..total).map(|i| val(r, i, 3)).collect();
                let mut whole = input.clone();
                c.all_reduce_f32(&mut whole, op).expect("all_reduce");
                let mut parts = input.clone();
                for &k in &order {
                    let (a, b) = (cuts[k], cuts[k + 1]);
                    c.all_reduce_f32_part(&mut parts[a..b], a, total, op).expect("part");
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&parts), bits(&whole), "world {world}, {op:?}");
                out.push(parts);
            }
            let e = c.all_reduce_f32_part(&mut [0.0; 4], total - 2, total, ReduceOp::Sum);
            assert!(matches!(e, Err(CommError::InvalidArgument { .. })), "{e:?}");
            out
        });
        assert_bitwise_identical(&results);
    }
}
