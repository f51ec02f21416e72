//! The collective-divergence debug mode over a real TCP ring (threads, loopback sockets).

mod common;

use std::time::Duration;

use common::{run_ranks, tcp_group};
use tessera_collectives::checked::CheckedComm;
use tessera_collectives::tcp::TcpRingConfig;
use tessera_collectives::{CommError, Communicator, ReduceOp};

fn cfg() -> TcpRingConfig {
    TcpRingConfig { timeout: Duration::from_secs(20), ..TcpRingConfig::default() }
}

#[test]
fn matching_calls_pass_through_unchanged() {
    let out = run_ranks(tcp_group(3, &cfg()), |mut ring| {
        let mut c = CheckedComm::new(&mut ring);
        let mut v = vec![c.rank() as f32 + 1.0; 1000];
        c.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap();
        let g = c.all_gather_bytes(&vec![7u8; c.rank() + 1]).unwrap();
        c.barrier().unwrap();
        (v[999], g.iter().map(Vec::len).collect::<Vec<_>>(), c.calls())
    });
    for (sum, lens, calls) in out {
        assert_eq!(sum, 6.0);
        assert_eq!(lens, vec![1, 2, 3]);
        assert_eq!(calls, 3);
    }
}

#[test]
fn a_rank_with_another_size_is_named_before_any_data_moves() {
    let errs = run_ranks(tcp_group(4, &cfg()), |mut ring| {
        let mut c = CheckedComm::new(&mut ring);
        c.barrier().unwrap();
        let n = if c.rank() == 2 { 999 } else { 1000 };
        let mut v = vec![1.0f32; n];
        c.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap_err()
    });
    for e in errs {
        let msg = e.to_string();
        assert!(matches!(e, CommError::Diverged { call: 1, first: 2, .. }), "{msg}");
        assert!(msg.contains("ranks 0, 1, 3 call #1 all_reduce_f32(len 1000, sum)"), "{msg}");
        assert!(msg.contains("rank 2 call #1 all_reduce_f32(len 999, sum)"), "{msg}");
    }
}

#[test]
fn a_rank_that_skipped_a_collective_is_named() {
    let errs = run_ranks(tcp_group(3, &cfg()), |mut ring| {
        let mut c = CheckedComm::new(&mut ring);
        // Rank 0 skips the barrier: its all-reduce meets the others' barrier.
        if c.rank() != 0 {
            c.barrier().unwrap_err()
        } else {
            let mut v = [1.0f64];
            c.all_reduce_f64(&mut v, ReduceOp::Sum).unwrap_err()
        }
    });
    for e in errs {
        let msg = e.to_string();
        assert!(matches!(e, CommError::Diverged { call: 0, first: 0, .. }), "{msg}");
        assert!(msg.contains("rank 0 call #0 all_reduce_f64(len 1, sum)"), "{msg}");
        assert!(msg.contains("ranks 1, 2 call #0 barrier"), "{msg}");
    }
}

#[test]
fn a_sized_ring_shift_whose_lengths_disagree_is_named_before_any_data_moves() {
    // Rank 2 expects 9 bytes, but rank 1 sends 11; the others agree.
    let errs = run_ranks(tcp_group(3, &cfg()), |mut ring| {
        let mut c = CheckedComm::new(&mut ring);
        let r = c.rank();
        let send = vec![1u8; 10 + r];
        let want = if r == 2 { 9 } else { 10 + (r + 2) % 3 };
        let mut recv = Vec::new();
        c.ring_shift_bytes_sized(&send, &mut recv, want).unwrap_err()
    });
    for e in errs {
        let msg = e.to_string();
        assert!(matches!(e, CommError::Diverged { call: 0, first: 2, .. }), "{msg}");
        assert!(msg.contains("rank 2 expects 9 bytes, rank 1 sends 11"), "{msg}");
    }
}

#[test]
fn sized_ring_shifts_that_agree_pass_through() {
    let out = run_ranks(tcp_group(3, &cfg()), |mut ring| {
        let mut c = CheckedComm::new(&mut ring);
        let r = c.rank();
        let mut recv = Vec::new();
        c.ring_shift_bytes_sized(&vec![r as u8; 10 + r], &mut recv, 10 + (r + 2) % 3).unwrap();
        recv
    });
    for (r, recv) in out.iter().enumerate() {
        let p = (r + 2) % 3;
        assert_eq!(*recv, vec![p as u8; 10 + p]);
    }
}
