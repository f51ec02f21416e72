//! A debug wrapper that finds ranks whose collective calls diverge.
//!
//! Ranks must call the same collectives in the same order with matching sizes; when they do
//! not, a ring either hangs until its timeout or fails with a protocol error far from the
//! cause. [`CheckedComm`] first all-gathers a short description of the call every rank is
//! about to make (its index, operation, sizes, root) and compares them, so that the first
//! divergence is an error naming the call and the ranks that differ, before any data moves.
//! Cost: one small all-gather per collective (the idea of PyTorch's
//! `TORCH_DISTRIBUTED_DEBUG=DETAIL` collective fingerprints).

use std::collections::BTreeMap;

use crate::{CommError, Communicator, ReduceOp, Result};

/// Wraps a communicator; every collective is checked against the other ranks' first.
pub struct CheckedComm<'a> {
    inner: &'a mut dyn Communicator,
    calls: u64,
}

impl<'a> CheckedComm<'a> {
    pub fn new(inner: &'a mut dyn Communicator) -> Self {
        Self { inner, calls: 0 }
    }

    /// Number of collectives checked so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    fn check(&mut self, what: String) -> Result<()> {
        let call = self.calls;
        self.calls += 1;
        let mine = format!("#{call} {what}");
        let all = self.inner.all_gather_bytes(mine.as_bytes())?;
        let all: Vec<String> =
            all.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        diverged(call, &mine, &all)
    }

    /// [`CheckedComm::check`] for a sized ring shift: the ranks must all be in it, and each
    /// rank's expected length must be what rank r−1 sends.
    fn check_shift(&mut self, send: usize, recv: usize) -> Result<()> {
        let call = self.calls;
        self.calls += 1;
        let what = format!("#{call} ring_shift_bytes_sized");
        let all = self.inner.all_gather_bytes(format!("{what} {send} {recv}").as_bytes())?;
        let all: Vec<String> =
            all.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
        // The call without its lengths, as `check` would see it; then the lengths.
        let split = |d: &str| -> Option<(String, (usize, usize))> {
            let (rest, recv) = d.rsplit_once(' ')?;
            let (call, send) = rest.rsplit_once(' ')?;
            Some((call.to_string(), (send.parse().ok()?, recv.parse().ok()?)))
        };
        let (calls, lens): (Vec<String>, Vec<(usize, usize)>) =
            all.iter().map(|d| split(d).unwrap_or_else(|| (d.clone(), (0, 0)))).unzip();
        diverged(call, &what, &calls)?;
        let n = all.len();
        let prev = |r: usize| (r + n - 1) % n;
        let bad: Vec<usize> = (0..n).filter(|&r| lens[r].1 != lens[prev(r)].0).collect();
        let Some(&first) = bad.first() else { return Ok(()) };
        let detail: Vec<String> = bad
            .iter()
            .map(|&r| {
                let p = prev(r);
                format!("rank {r} expects {} bytes, rank {p} sends {}", lens[r].1, lens[p].0)
            })
            .collect();
        Err(CommError::Diverged {
            call,
            first,
            detail: format!(
                "ring_shift_bytes_sized with mismatched lengths: {}",
                detail.join("; ")
            ),
        })
    }
}

/// `Ok` when every rank's description of call `call` is `mine`; otherwise the error naming the
/// groups of ranks that agree (the largest group, lowest rank on a tie, is the reference).
fn diverged(call: u64, mine: &str, all: &[String]) -> Result<()> {
    if all.iter().all(|d| *d == mine) {
        return Ok(());
    }
    // Group the ranks by call; the largest group (lowest rank on a tie) is the reference.
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (r, d) in all.iter().enumerate() {
        groups.entry(d.as_str()).or_default().push(r);
    }
    let reference =
        groups.iter().max_by_key(|(_, rs)| (rs.len(), std::cmp::Reverse(rs[0]))).map(|g| *g.0);
    let first = all.iter().position(|d| Some(d.as_str()) != reference).unwrap_or(0);
    let mut parts: Vec<(usize, String)> = groups
        .iter()
        .map(|(d, rs)| {
            let names: Vec<String> = rs.iter().map(usize::to_string).collect();
            let who = if rs.len() == 1 { "rank" } else { "ranks" };
            (rs[0], format!("{who} {} call {d}", names.join(", ")))
        })
        .collect();
    parts.sort();
    let detail: Vec<String> = parts.into_iter().map(|p| p.1).collect();
    Err(CommError::Diverged { call, first, detail: detail.join("; ") })
}

fn reduce_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum => "sum",
        ReduceOp::Mean => "mean",
    }
}

impl Communicator for CheckedComm<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn seq(&self) -> u64 {
        self.inner.seq()
    }
    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.check(format!("all_reduce_f32(len {}, {})", buf.len(), reduce_name(op)))?;
        self.inner.all_reduce_f32(buf, op)
    }
    fn all_reduce_f32_part(
        &mut self,
        buf: &mut [f32],
        offset: usize,
        total: usize,
        op: ReduceOp,
    ) -> Result<()> {
        self.check(format!(
            "all_reduce_f32_part(len {}, offset {offset}, total {total}, {})",
            buf.len(),
            reduce_name(op)
        ))?;
        self.inner.all_reduce_f32_part(buf, offset, total, op)
    }
    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        self.check(format!("all_reduce_f64(len {}, {})", buf.len(), reduce_name(op)))?;
        self.inner.all_reduce_f64(buf, op)
    }
    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.check(format!("all_gather_f32(len {}, out {})", input.len(), output.len()))?;
        self.inner.all_gather_f32(input, output)
    }
    fn all_gather_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        // Lengths may differ between ranks: only the operation is compared.
        self.check("all_gather_bytes".into())?;
        self.inner.all_gather_bytes(input)
    }
    fn reduce_scatter_f32(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<()> {
        self.check(format!(
            "reduce_scatter_f32(len {}, out {}, {})",
            input.len(),
            output.len(),
            reduce_name(op)
        ))?;
        self.inner.reduce_scatter_f32(input, output, op)
    }
    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.check(format!("broadcast_bytes(len {}, root {root})", buf.len()))?;
        self.inner.broadcast_bytes(buf, root)
    }
    fn ring_shift_bytes(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        self.check("ring_shift_bytes".into())?;
        self.inner.ring_shift_bytes(send, recv)
    }
    fn ring_shift_bytes_sized(
        &mut self,
        send: &[u8],
        recv: &mut Vec<u8>,
        recv_len: usize,
    ) -> Result<()> {
        self.check_shift(send.len(), recv_len)?;
        self.inner.ring_shift_bytes_sized(send, recv, recv_len)
    }
    fn barrier(&mut self) -> Result<()> {
        self.check("barrier".into())?;
        self.inner.barrier()
    }
}
