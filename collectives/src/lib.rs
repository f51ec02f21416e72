//! Collective communication for Tessera ranks.
//!
//! [`Communicator`] is the one interface the rank code sees. Backends:
//! - [`tcp::TcpRing`]: a ring of TCP connections between processes (rank r sends to r+1 and
//!   receives from r-1), bandwidth-optimal reduce-scatter + all-gather, chunked and pipelined.
//! - [`threads::ThreadComm`]: ranks as threads of one process, for unit tests.
//!
//! Every call carries a sequence number and a timeout: a peer that disconnects or stalls is an
//! error that names it, never a hang.
//!
//! Setting up a TCP ring across processes:
//! 1. every rank binds [`tcp::DataPlaneListener::bind`] (port 0) and publishes
//!    [`tcp::DataPlaneListener::local_addr`] (e.g. through the coordinator's join);
//! 2. once every address is known, each rank calls [`tcp::TcpRing::connect`] with its rank, the
//!    addresses in rank order and a [`tcp::TcpRingConfig`] whose `session` is the same on every
//!    rank of the job (and differs between jobs), e.g. derived from the job token.
//!
//! [`bench`](mod@bench) measures all-reduce in nccl-tests terms on any communicator.

pub mod bench;
pub mod checked;
pub mod error;
pub mod flight;
pub mod tcp;
pub mod threads;

pub use error::CommError;

/// The part `offset..offset + len` of a buffer of `total` elements must lie inside it
/// ([`Communicator::all_reduce_f32_part`]); `op` names the operation in the error.
pub(crate) fn check_part(op: &'static str, len: usize, offset: usize, total: usize) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > total) {
        return Err(CommError::InvalidArgument {
            op,
            detail: format!(
                "part {offset}..{offset}+{len} lies outside the buffer of {total} elements"
            ),
        });
    }
    Ok(())
}

/// The error of a [`Communicator::ring_shift_bytes_sized`] whose message from rank r−1 has
/// `got` bytes where this rank expected `want`.
pub fn shift_len_mismatch(
    rank: usize,
    world: usize,
    seq: u64,
    got: usize,
    want: usize,
) -> CommError {
    let peer = (rank + world - 1) % world;
    CommError::Protocol {
        op: "ring_shift_bytes",
        seq,
        peer,
        detail: format!(
            "rank {peer} sent {got} bytes where rank {rank} expected {want}: the ranks disagree \
             on the sizes of the ring's messages (different inputs or Tessera versions)"
        ),
    }
}

pub type Result<T> = std::result::Result<T, CommError>;

/// Reduction applied by all-reduce and reduce-scatter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum, then divide by the world size.
    Mean,
}

/// A group of ranks that run collectives together.
///
/// Every rank must call the same collectives in the same order with matching sizes. Results of
/// reductions are bitwise identical on every rank.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sequence number of the next collective call (starts at 0, +1 per call).
    fn seq(&self) -> u64;

    /// In-place all-reduce of `buf` (same length on every rank).
    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// In-place all-reduce of `buf`, elements `offset..offset + buf.len()` of a buffer of
    /// `total` elements that is reduced part by part (gradient buckets): every element is
    /// summed in the same order as by one [`Communicator::all_reduce_f32`] over the whole
    /// buffer, so the parts together are bitwise identical to it. Every rank passes the same
    /// `offset` and `total`. The default suits backends whose summation order does not depend
    /// on the buffer's length (it reduces the part on its own).
    fn all_reduce_f32_part(
        &mut self,
        buf: &mut [f32],
        offset: usize,
        total: usize,
        op: ReduceOp,
    ) -> Result<()> {
        check_part("all_reduce_f32_part", buf.len(), offset, total)?;
        self.all_reduce_f32(buf, op)
    }
    /// In-place all-reduce of a few f64 scalars (statistics, norms); same length on every rank.
    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<()>;
    /// `output.len() == world * input.len()`; rank r's input lands at `output[r*len..(r+1)*len]`.
    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()>;
    /// All-gather of byte strings whose lengths may differ between ranks; result indexed by rank.
    fn all_gather_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `input.len() == world * output.len()`; rank r receives the reduction of chunk r.
    fn reduce_scatter_f32(&mut self, input: &[f32], output: &mut [f32], op: ReduceOp)
    -> Result<()>;
    /// Copies `buf` of rank `root` into `buf` of every rank (same length everywhere).
    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Sends `send` to rank r+1 while receiving rank r-1's message into `recv` (resized to fit).
    /// Lengths may differ between ranks.
    fn ring_shift_bytes(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()>;
    /// [`Communicator::ring_shift_bytes`] where the caller knows the length of rank r−1's
    /// message: receives exactly `recv_len` bytes, and a message of another length is a
    /// protocol error naming rank r−1. Every rank's `recv_len` must be rank r−1's `send.len()`.
    /// Backends whose transfers need both lengths up front (NCCL's send/recv) skip the round
    /// that would otherwise announce them. The default shifts and checks the length after.
    /// NCCL cannot check it: there a mismatch leaves the ranks waiting until the watchdog's
    /// timeout, so the lengths must come from values every rank agrees on (`CheckedComm`,
    /// `run.check_collectives`, finds a mismatch before any data moves).
    fn ring_shift_bytes_sized(
        &mut self,
        send: &[u8],
        recv: &mut Vec<u8>,
        recv_len: usize,
    ) -> Result<()> {
        let seq = self.seq();
        self.ring_shift_bytes(send, recv)?;
        if recv.len() == recv_len {
            return Ok(());
        }
        Err(shift_len_mismatch(self.rank(), self.world(), seq, recv.len(), recv_len))
    }
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;

    /// This backend itself, for callers that use its own interface where they find it (the
    /// NCCL communicator's all-reduce of device buffers on its stream). `None` (the default)
    /// for wrappers, which only ever offer the collectives above.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }

    /// Broadcast of f32 values, by way of their bytes.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.broadcast_bytes(&mut bytes, root)?;
        for (v, c) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
            *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}
