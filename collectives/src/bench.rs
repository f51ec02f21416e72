//! All-reduce benchmark in nccl-tests vocabulary (doc/PERFORMANCE.md of nccl-tests):
//! algbw = S / t, busbw = algbw · 2(n-1)/n, GB = 1e9 bytes.

use std::time::Instant;

use crate::{CommError, Communicator, ReduceOp, Result};

/// One measured size.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// Bytes reduced (count × 4).
    pub size_bytes: usize,
    /// f32 elements.
    pub count: usize,
    /// Mean time of one all-reduce, the maximum over ranks, in microseconds.
    pub time_us: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
    /// `Some(true)` when every element of every rank matched the exact expected sum.
    pub check: Option<bool>,
}

impl BenchRow {
    /// One JSON object: `size_bytes`, `count`, `time_us`, `algbw`, `busbw` (GB/s), `check`.
    pub fn to_json(&self) -> String {
        let check = match self.check {
            None => "null",
            Some(true) => "true",
            Some(false) => "false",
        };
        format!(
            "{{\"size_bytes\":{},\"count\":{},\"time_us\":{:.3},\"algbw\":{:.6},\"busbw\":{:.6},\"check\":{check}}}",
            self.size_bytes, self.count, self.time_us, self.algbw_gbs, self.busbw_gbs
        )
    }
}

/// Value of element `i` on `rank` for the correctness check: small integers, so the sum over
/// ranks is exact in f32 whatever the order of additions.
fn check_value(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 251 + 1)) as f32
}

fn expected_sum(world: usize, i: usize) -> f32 {
    ((i % 251 + 1) * world * (world + 1) / 2) as f32
}

/// Times `iters` all-reduces (after `warmup` untimed ones) of every size in `sizes` (bytes,
/// rounded down to whole f32). Every rank must call this with the same arguments; all ranks
/// return the same rows.
pub fn bench_all_reduce(
    comm: &mut dyn Communicator,
    sizes: &[usize],
    iters: usize,
    warmup: usize,
    check: bool,
) -> Result<Vec<BenchRow>> {
    if iters == 0 {
        return Err(CommError::InvalidArgument {
            op: "bench_all_reduce",
            detail: "iters must be at least 1".into(),
        });
    }
    let rank = comm.rank();
    let world = comm.world();
    let mut rows = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let count = size / 4;
        let mut buf: Vec<f32> = (0..count).map(|i| check_value(rank, i) * 1e-3).collect();
        for _ in 0..warmup {
            comm.all_reduce_f32(&mut buf, ReduceOp::Mean)?;
        }
        comm.barrier()?;
        let t0 = Instant::now();
        for _ in 0..iters {
            comm.all_reduce_f32(&mut buf, ReduceOp::Mean)?;
        }
        let mine = t0.elapsed().as_secs_f64() / iters as f64;
        let times = comm.all_gather_bytes(&mine.to_le_bytes())?;
        let mut t = mine;
        for b in &times {
            if let Ok(w) = <[u8; 8]>::try_from(b.as_slice()) {
                t = t.max(f64::from_le_bytes(w));
            }
        }
        let ok = if check {
            buf.iter_mut().enumerate().for_each(|(i, v)| *v = check_value(rank, i));
            comm.all_reduce_f32(&mut buf, ReduceOp::Sum)?;
            let bad =
                buf.iter().enumerate().filter(|(i, v)| **v != expected_sum(world, *i)).count();
            let mut total = [bad as f64];
            comm.all_reduce_f64(&mut total, ReduceOp::Sum)?;
            Some(total[0] == 0.0)
        } else {
            None
        };
        let bytes = count * 4;
        let algbw = if t > 0.0 { bytes as f64 / t / 1e9 } else { 0.0 };
        let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
        rows.push(BenchRow {
            size_bytes: bytes,
            count,
            time_us: t * 1e6,
            algbw_gbs: algbw,
            busbw_gbs: busbw,
            check: ok,
        });
    }
    Ok(rows)
}

/// Parses a byte size: a number with an optional suffix K, M, G (powers of 1024; `KB`, `KiB`
/// and lower case are accepted too), e.g. `1K`, `64M`, `256M`, `4096`.
pub fn parse_size(s: &str) -> Result<usize> {
    let bad = |why: &str| CommError::InvalidArgument {
        op: "parse_size",
        detail: format!("{s:?} is not a size ({why}); write e.g. 4096, 1K, 64M or 1G"),
    };
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(bad("no number"));
    }
    let n: usize = t[..digits].parse().map_err(|_| bad("number too large"))?;
    let unit = t[digits..].trim().to_ascii_lowercase();
    let mult: usize = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(bad("unknown unit")),
    };
    n.checked_mul(mult).ok_or_else(|| bad("too large"))
}

/// Sizes from `min` to `max` (inclusive), each `factor` times the previous (nccl-tests -b/-e/-f).
pub fn size_range(min: usize, max: usize, factor: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut s = min.max(1);
    while s <= max {
        out.push(s);
        match s.checked_mul(factor.max(2)) {
            Some(n) => s = n,
            None => break,
        }
    }
    out
}

/// Parses `MIN..MAX` (sizes doubling from MIN to MAX), a comma-separated list, or one size.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>> {
    if let Some((a, b)) = s.split_once("..") {
        let (a, b) = (parse_size(a)?, parse_size(b)?);
        if a > b || a == 0 {
            return Err(CommError::InvalidArgument {
                op: "parse_sizes",
                detail: format!("{s:?}: the range must go from a positive size up to a larger one"),
            });
        }
        return Ok(size_range(a, b, 2));
    }
    s.split(',').map(parse_size).collect()
}

/// The rows as an nccl-tests style table: two header lines, then one line per row.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "#{:>13} {:>13} {:>11} {:>9} {:>9} {:>8}\n",
        "size", "count", "time", "algbw", "busbw", "check"
    ));
    out.push_str(&format!(
        "#{:>13} {:>13} {:>11} {:>9} {:>9} {:>8}\n",
        "(B)", "(elements)", "(us)", "(GB/s)", "(GB/s)", ""
    ));
    for r in rows {
        let check = match r.check {
            None => "N/A",
            Some(true) => "ok",
            Some(false) => "WRONG",
        };
        out.push_str(&format!(
            " {:>13} {:>13} {:>11.1} {:>9.3} {:>9.3} {:>8}\n",
            r.size_bytes, r.count, r.time_us, r.algbw_gbs, r.busbw_gbs, check
        ));
    }
    out
}
