//! `tessera bench collectives-selftest`: every collective, in real rank processes, checked
//! element by element against a naive reference at awkward sizes (0, 1, n−1, a prime, and
//! 64 MiB + 3 floats for all-reduce), and checked to be bitwise identical on every rank.

use anyhow::{Result, bail, ensure};
use tessera_collectives::{Communicator, ReduceOp};

/// A value that rank `r` contributes at index `i`: small integers, so f32 sums are exact.
fn contribution(r: usize, i: usize) -> f32 {
    ((r + 1) * (i % 7 + 1)) as f32 - 3.0
}

fn expected_sum(world: usize, i: usize) -> f32 {
    (0..world).map(|r| contribution(r, i)).sum()
}

fn fingerprint(values: &[f32]) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.to_le_bytes().to_vec()
}

fn same_everywhere(comm: &mut dyn Communicator, what: &str, values: &[f32]) -> Result<()> {
    let prints = comm.all_gather_bytes(&fingerprint(values))?;
    ensure!(
        prints.iter().all(|p| *p == prints[0]),
        "{what}: results differ between ranks (not bitwise identical)"
    );
    Ok(())
}

pub fn run(comm: &mut dyn Communicator) -> Result<String> {
    let n = comm.world();
    let r = comm.rank();
    let big = 64 * 1024 * 1024 / 4 + 3;
    let small_sizes = [0usize, 1, n.saturating_sub(1), 1009];
    let mut checked = 0usize;

    for &len in small_sizes.iter().chain([big].iter()) {
        for op in [ReduceOp::Sum, ReduceOp::Mean] {
            let mut buf: Vec<f32> = (0..len).map(|i| contribution(r, i)).collect();
            comm.all_reduce_f32(&mut buf, op)?;
            for (i, &v) in buf.iter().enumerate() {
                let want = expected_sum(n, i);
                let ok = match op {
                    ReduceOp::Sum => v == want,
                    ReduceOp::Mean => (v - want / n as f32).abs() <= 1e-6 * want.abs().max(1.0),
                };
                if !ok {
                    bail!("all_reduce {op:?} len {len}: element {i} is {v}, expected {want} (sum)");
                }
            }
            same_everywhere(comm, "all_reduce", &buf)?;
            checked += 1;
        }
    }
    for &len in &small_sizes {
        let mut s = vec![r as f64 + 0.5; len];
        comm.all_reduce_f64(&mut s, ReduceOp::Sum)?;
        let want: f64 = (0..n).map(|q| q as f64 + 0.5).sum();
        ensure!(s.iter().all(|&v| v == want), "all_reduce_f64 len {len}: got {s:?}, want {want}");

        let input: Vec<f32> = (0..len).map(|i| contribution(r, i)).collect();
        let mut out = vec![f32::NAN; n * len];
        comm.all_gather_f32(&input, &mut out)?;
        for q in 0..n {
            for i in 0..len {
                ensure!(
                    out[q * len + i] == contribution(q, i),
                    "all_gather_f32 len {len}: rank {q}'s element {i} is {}",
                    out[q * len + i]
                );
            }
        }

        let bytes: Vec<u8> = (0..len + r).map(|i| (i * 31 + r) as u8).collect();
        let parts = comm.all_gather_bytes(&bytes)?;
        ensure!(parts.len() == n, "all_gather_bytes: {} parts for {n} ranks", parts.len());
        for (q, p) in parts.iter().enumerate() {
            let want: Vec<u8> = (0..len + q).map(|i| (i * 31 + q) as u8).collect();
            ensure!(*p == want, "all_gather_bytes len {len}: rank {q}'s bytes differ");
        }

        let input: Vec<f32> = (0..n * len).map(|i| contribution(r, i)).collect();
        let mut out = vec![f32::NAN; len];
        comm.reduce_scatter_f32(&input, &mut out, ReduceOp::Sum)?;
        for (i, &v) in out.iter().enumerate() {
            let want = expected_sum(n, r * len + i);
            ensure!(v == want, "reduce_scatter len {len}: element {i} is {v}, expected {want}");
        }

        let root = n - 1;
        let mut buf: Vec<u8> =
            if r == root { (0..len).map(|i| (i * 7 + 1) as u8).collect() } else { vec![0; len] };
        comm.broadcast_bytes(&mut buf, root)?;
        ensure!(
            buf.iter().enumerate().all(|(i, &b)| b == (i * 7 + 1) as u8),
            "broadcast_bytes len {len} from rank {root}: wrong bytes"
        );

        let send: Vec<u8> = (0..len + r).map(|i| (i + 3 * r) as u8).collect();
        let mut recv = Vec::new();
        comm.ring_shift_bytes(&send, &mut recv)?;
        let prev = (r + n - 1) % n;
        let want: Vec<u8> = (0..len + prev).map(|i| (i + 3 * prev) as u8).collect();
        ensure!(recv == want, "ring_shift_bytes len {len}: wrong bytes from rank {prev}");

        comm.barrier()?;
        checked += 6;
    }
    Ok(format!(
        "all collectives correct: {checked} checks on {n} ranks (sizes {small_sizes:?} and {big} \
         floats for all_reduce)\n"
    ))
}
