//! Shared helpers: build groups of communicators, run one thread per rank, naive references.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tessera_collectives::tcp::{DataPlaneListener, TcpRing, TcpRingConfig};
use tessera_collectives::{Communicator, ReduceOp};

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn listeners(world: usize) -> (Vec<DataPlaneListener>, Vec<SocketAddr>) {
    let ls: Vec<DataPlaneListener> =
        (0..world).map(|_| DataPlaneListener::bind(LOOPBACK).expect("bind loopback")).collect();
    let addrs = ls.iter().map(|l| l.local_addr().expect("local addr")).collect();
    (ls, addrs)
}

/// A TCP ring of `world` ranks over loopback, connected concurrently (one thread per rank).
pub fn tcp_group(world: usize, cfg: &TcpRingConfig) -> Vec<TcpRing> {
    let (ls, addrs) = listeners(world);
    std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = &addrs;
                let cfg = cfg.clone();
                s.spawn(move || TcpRing::connect(l, r, addrs, cfg).expect("ring setup"))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("setup thread")).collect()
    })
}

/// Runs `f` on every communicator, one thread each; results in rank order.
pub fn run_ranks<C, T, F>(comms: Vec<C>, f: F) -> Vec<T>
where
    C: Communicator,
    T: Send,
    F: Fn(C) -> T + Sync,
{
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
        hs.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

/// Input value of element `i` on `rank` (not exactly summable: checks tolerances and order).
pub fn val(rank: usize, i: usize, salt: u64) -> f32 {
    let x = (rank as u64 * 1_000_003 + i as u64 * 7919 + salt * 31) % 10007;
    x as f32 * 0.013 - 60.0
}

fn close(got: f32, want: f64) -> bool {
    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs())
}

fn byte_msg(rank: usize, len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(rank as u8 ^ salt)).collect()
}

/// Exercises every collective at each length against naive references; returns the all-reduce
/// results (sum and mean of every length) for a cross-rank bitwise comparison.
pub fn exercise(c: &mut dyn Communicator, lens: &[usize]) -> Vec<Vec<f32>> {
    let r = c.rank();
    let n = c.world();
    let mut outs = Vec::new();
    for &len in lens {
        // all_reduce sum and mean
        for (salt, op) in [(1, ReduceOp::Sum), (2, ReduceOp::Mean)] {
            let mut buf: Vec<f32> = (0..len).map(|i| val(r, i, salt)).collect();
            c.all_reduce_f32(&mut buf, op).expect("all_reduce_f32");
            for (i, got) in buf.iter().enumerate() {
                let mut want: f64 = (0..n).map(|q| val(q, i, salt) as f64).sum();
                if op == ReduceOp::Mean {
                    want /= n as f64;
                }
                assert!(
                    close(*got, want),
                    "all_reduce {op:?} len {len} rank {r} [{i}]: {got} vs {want}"
                );
            }
            outs.push(buf);
        }
        // reduce_scatter: each rank gets `len` elements
        let input: Vec<f32> = (0..len * n).map(|i| val(r, i, 3)).collect();
        let mut out = vec![0.0f32; len];
        c.reduce_scatter_f32(&input, &mut out, ReduceOp::Sum).expect("reduce_scatter_f32");
        for (j, got) in out.iter().enumerate() {
            let want: f64 = (0..n).map(|q| val(q, r * len + j, 3) as f64).sum();
            assert!(close(*got, want), "reduce_scatter len {len} rank {r} [{j}]: {got} vs {want}");
        }
        let mut out = vec![0.0f32; len];
        c.reduce_scatter_f32(&input, &mut out, ReduceOp::Mean).expect("reduce_scatter mean");
        for (j, got) in out.iter().enumerate() {
            let want: f64 = (0..n).map(|q| val(q, r * len + j, 3) as f64).sum::<f64>() / n as f64;
            assert!(close(*got, want), "reduce_scatter mean len {len} rank {r} [{j}]");
        }
        // all_gather_f32
        let input: Vec<f32> = (0..len).map(|i| val(r, i, 4)).collect();
        let mut out = vec![0.0f32; len * n];
        c.all_gather_f32(&input, &mut out).expect("all_gather_f32");
        for q in 0..n {
            for i in 0..len {
                assert_eq!(
                    out[q * len + i].to_bits(),
                    val(q, i, 4).to_bits(),
                    "all_gather len {len}"
                );
            }
        }
        // broadcast from a root that varies with the length
        let root = len % n;
        let mut buf = if r == root { byte_msg(r, len, 5) } else { vec![0u8; len] };
        c.broadcast_bytes(&mut buf, root).expect("broadcast_bytes");
        assert_eq!(buf, byte_msg(root, len, 5), "broadcast len {len} rank {r}");
        // all_gather_bytes with lengths that differ between ranks
        let mine = byte_msg(r, len + r * 3, 6);
        let all = c.all_gather_bytes(&mine).expect("all_gather_bytes");
        assert_eq!(all.len(), n);
        for (q, m) in all.iter().enumerate() {
            assert_eq!(*m, byte_msg(q, len + q * 3, 6), "all_gather_bytes len {len} from {q}");
        }
        // ring shift
        let mut recv = Vec::new();
        c.ring_shift_bytes(&byte_msg(r, len + r, 7), &mut recv).expect("ring_shift_bytes");
        let prev = (r + n - 1) % n;
        assert_eq!(recv, byte_msg(prev, len + prev, 7), "ring_shift len {len}");
        // the same with the incoming length told
        let mut recv = vec![1u8; 3];
        c.ring_shift_bytes_sized(&byte_msg(r, len + 2 * r, 8), &mut recv, len + 2 * prev)
            .expect("ring_shift_bytes_sized");
        assert_eq!(recv, byte_msg(prev, len + 2 * prev, 8), "ring_shift_bytes_sized len {len}");
        // f64 all-reduce and barrier
        let mut f = [r as f64 + 0.5, len as f64, -(r as f64)];
        c.all_reduce_f64(&mut f, ReduceOp::Sum).expect("all_reduce_f64");
        let rs: f64 = (0..n).map(|q| q as f64).sum();
        assert_eq!(f, [rs + 0.5 * n as f64, (len * n) as f64, -rs]);
        let mut f = [2.0f64 * r as f64];
        c.all_reduce_f64(&mut f, ReduceOp::Mean).expect("all_reduce_f64 mean");
        assert!((f[0] - (n as f64 - 1.0)).abs() < 1e-12);
        c.barrier().expect("barrier");
    }
    outs
}

/// Lengths of the standard size list for a world: 0, 1, n-1, a prime, and `extra`.
pub fn lens(world: usize, extra: &[usize]) -> Vec<usize> {
    let mut v = vec![0, 1, world - 1, 97];
    v.extend_from_slice(extra);
    v.dedup();
    v
}

/// Asserts that every rank's results are bitwise identical to rank 0's.
pub fn assert_bitwise_identical(results: &[Vec<Vec<f32>>]) {
    for (r, res) in results.iter().enumerate() {
        assert_eq!(res.len(), results[0].len());
        for (a, b) in res.iter().zip(&results[0]) {
            let same =
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "rank {r}'s all-reduce result differs bitwise from rank 0's");
        }
    }
}
