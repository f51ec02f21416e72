//! ThreadComm: same semantics as the TCP ring, ranks as threads.

mod common;

use std::time::{Duration, Instant};

use common::{assert_bitwise_identical, exercise, lens, run_ranks};
use tessera_collectives::threads::ThreadComm;
use tessera_collectives::{CommError, Communicator, ReduceOp};

fn all_collectives(world: usize, extra: &[usize]) {
    let lens = lens(world, extra);
    let results = run_ranks(ThreadComm::group(world), |mut c| exercise(&mut c, &lens));
    assert_bitwise_identical(&results);
}

#[test]
fn all_collectives_worlds_1_to_4() {
    for world in 1..=4 {
        all_collectives(world, &[10_007]);
    }
}

#[test]
fn all_collectives_world_8() {
    all_collectives(8, &[]);
}

#[test]
fn big_all_reduce_world_4() {
    let len = (64 << 20) / 4 + 3;
    let results = run_ranks(ThreadComm::group(4), |mut c| {
        let mut buf = vec![c.rank() as f32 + 0.25; len];
        c.all_reduce_f32(&mut buf, ReduceOp::Mean).unwrap();
        assert!(buf.iter().all(|v| *v == 1.75), "mean of 0.25..3.25");
        vec![buf]
    });
    assert_bitwise_identical(&results);
}

#[test]
fn dropped_rank_is_named() {
    let errs = run_ranks(ThreadComm::group(3), |mut c| {
        if c.rank() == 1 {
            drop(c);
            return None;
        }
        Some(c.all_reduce_f32(&mut [1.0; 4], ReduceOp::Sum).unwrap_err())
    });
    for e in errs.into_iter().flatten() {
        assert!(matches!(e, CommError::PeerDisconnected { peer: 1, .. }), "{e}");
    }
}

#[test]
fn stalled_rank_times_out() {
    let timeout = Duration::from_millis(300);
    let mut comms = ThreadComm::group_with_timeout(2, timeout);
    let _stalled = comms.pop().unwrap();
    let mut c = comms.pop().unwrap();
    let t0 = Instant::now();
    let e = c.barrier().unwrap_err();
    assert!(matches!(e, CommError::Timeout { peer: 1, .. }), "{e}");
    assert!(t0.elapsed() >= timeout && t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn diverging_collectives_are_protocol_errors() {
    let errs = run_ranks(ThreadComm::group(2), |mut c| {
        if c.rank() == 0 { c.barrier().unwrap_err() } else { c.all_gather_bytes(b"x").unwrap_err() }
    });
    assert!(matches!(errs[0], CommError::Protocol { peer: 1, .. }), "{}", errs[0]);
    assert!(matches!(errs[1], CommError::Protocol { peer: 0, .. }), "{}", errs[1]);
}

#[test]
fn a_sized_ring_shift_of_another_length_names_the_sender() {
    // Rank 1 expects 6 bytes from rank 0, which sends 5 (the trait's default: shift, then check).
    let errs = run_ranks(ThreadComm::group(3), |mut c| {
        let mut recv = Vec::new();
        let want = if c.rank() == 1 { 6 } else { 5 };
        c.ring_shift_bytes_sized(&[7u8; 5], &mut recv, want).err()
    });
    assert!(errs[0].is_none() && errs[2].is_none(), "{errs:?}");
    let e = errs[1].as_ref().expect("rank 1 fails");
    assert!(matches!(e, CommError::Protocol { peer: 0, .. }), "{e}");
    assert!(e.to_string().contains("rank 0 sent 5 bytes where rank 1 expected 6"), "{e}");
}

/// `run_group` returns every rank's result in rank order, the ranks talking to each other, and
/// raises a rank's panic again with its message.
#[test]
fn run_group_returns_rank_order_and_raises_a_ranks_panic() {
    let got = ThreadComm::run_group(4, |r, c| {
        let mut v = [r as f32];
        c.all_reduce_f32(&mut v, ReduceOp::Sum).expect("all_reduce");
        (r, c.rank(), v[0])
    });
    assert_eq!(got, vec![(0, 0, 6.0), (1, 1, 6.0), (2, 2, 6.0), (3, 3, 6.0)]);
    let p = std::panic::catch_unwind(|| {
        ThreadComm::run_group(2, |r, _| assert_ne!(r, 1, "rank one gives up"))
    })
    .expect_err("rank 1 panicked");
    let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("rank one gives up"), "{msg}");
}
