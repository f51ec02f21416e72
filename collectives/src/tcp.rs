//! A ring of TCP connections between processes.
//!
//! Rank r connects to rank r+1 (its *send link*) and accepts a connection from rank r-1 (its
//! *recv link*). Reductions run as reduce-scatter then all-gather around the ring, cut into
//! slices of [`TcpRingConfig::chunk_bytes`] so that sending, receiving and adding overlap: the
//! calling thread drives both links with non-blocking sockets and poll(2), writing slices to r+1
//! and reading and reducing slices from r-1 as each becomes ready.
//!
//! Every message is a frame: a 32-byte header (magic, op code, kind, sequence number, payload
//! length, the collective's total length) and the payload. The receiver checks every field, so
//! ranks that call different collectives, different lengths, or get out of step fail with
//! [`CommError::Protocol`] naming the peer; garbage on the port is an error, and lengths are
//! bounded by [`TcpRingConfig::max_message_bytes`] before anything is allocated. The byte-level
//! decoders are pure functions ([`decode_frame_header`], [`decode_abort_payload`],
//! [`decode_hello`]), which the fuzz targets in `fuzz/` feed arbitrary bytes.
//!
//! A rank that sees an error forwards an abort frame naming the culprit to r+1 and closes both
//! links, so the failure travels round the ring at once instead of waiting for timeouts. Ranks
//! next to a dead rank name it; ranks further away name it when the abort frame reaches them
//! first and otherwise name the neighbour that closed on them. After an error the communicator
//! is unusable ([`CommError::Poisoned`]).
//!
//! Data travels in the machine's native byte order; the handshake refuses a peer whose byte
//! order differs.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::flight::{FaultPoint, FlightRecorder, fault_point};
use crate::{CommError, Communicator, ReduceOp, Result};

const HELLO_MAGIC: [u8; 8] = *b"TSRHELO1";
/// Length of the handshake ("hello") a connecting rank sends first.
pub const HELLO_LEN: usize = 48;
const ACK_OK: u8 = 1;
const ACK_REFUSED: u8 = 2;
const FRAME_MAGIC: u32 = 0x5453_5246;
/// Length of a data-plane frame header on the wire.
pub const FRAME_HEADER_LEN: usize = 32;
const HEADER_LEN: usize = FRAME_HEADER_LEN;
const KIND_DATA: u16 = 0;
const KIND_ABORT: u16 = 1;
const ENDIAN_TAG: u32 = 0x0102_0304;
/// Collectives (and ring steps) that send at most this many bytes run with plain blocking I/O: the
/// kernel's socket buffers absorb them, so sending before receiving cannot deadlock.
const SEQUENTIAL_MAX_BYTES: usize = 64 * 1024;
/// Largest payload of an abort frame (a code, the culprit rank, a message).
pub const MAX_ABORT_PAYLOAD: usize = 4096;

/// Settings of a [`TcpRing`].
#[derive(Clone, Debug)]
pub struct TcpRingConfig {
    /// How long a peer may send nothing (or accept nothing) before the call fails with
    /// [`CommError::Timeout`].
    pub timeout: Duration,
    /// Deadline for connecting to r+1 and accepting r-1 in [`TcpRing::connect`].
    pub setup_timeout: Duration,
    /// Pipelining slice size in bytes.
    pub chunk_bytes: usize,
    /// Job/session id; connections from another session are refused.
    pub session: u64,
    /// Largest variable-length message accepted (all_gather_bytes, ring_shift_bytes).
    pub max_message_bytes: usize,
}

impl Default for TcpRingConfig {
    fn default() -> Self {
        TcpRingConfig {
            timeout: Duration::from_secs(600),
            setup_timeout: Duration::from_secs(60),
            chunk_bytes: 512 * 1024,
            session: 0,
            max_message_bytes: 1 << 30,
        }
    }
}

/// The listening socket of one rank's data plane, bound before the addresses are exchanged
/// (so its port can be published, e.g. through the coordinator).
#[derive(Debug)]
pub struct DataPlaneListener {
    listener: TcpListener,
}

impl DataPlaneListener {
    /// Binds `ip` on a port chosen by the kernel.
    pub fn bind(ip: IpAddr) -> Result<Self> {
        Self::bind_addr(SocketAddr::new(ip, 0))
    }

    /// Binds exactly `addr`.
    pub fn bind_addr(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            CommError::Setup(format!(
                "cannot listen on {addr}: {e}; pick an address of this host (or port 0)"
            ))
        })?;
        Ok(DataPlaneListener { listener })
    }

    /// The address peers must connect to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| CommError::Setup(format!("reading the listener's address: {e}")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
enum Op {
    AllReduceF32 = 1,
    AllReduceF64 = 2,
    AllGatherF32 = 3,
    AllGatherBytes = 4,
    ReduceScatterF32 = 5,
    Broadcast = 6,
    RingShift = 7,
    Barrier = 8,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceF32 => "all_reduce_f32",
            Op::AllReduceF64 => "all_reduce_f64",
            Op::AllGatherF32 => "all_gather_f32",
            Op::AllGatherBytes => "all_gather_bytes",
            Op::ReduceScatterF32 => "reduce_scatter_f32",
            Op::Broadcast => "broadcast_bytes",
            Op::RingShift => "ring_shift_bytes",
            Op::Barrier => "barrier",
        }
    }

    fn from_code(code: u16) -> Option<Op> {
        Some(match code {
            1 => Op::AllReduceF32,
            2 => Op::AllReduceF64,
            3 => Op::AllGatherF32,
            4 => Op::AllGatherBytes,
            5 => Op::ReduceScatterF32,
            6 => Op::Broadcast,
            7 => Op::RingShift,
            8 => Op::Barrier,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct Header {
    magic: u32,
    op: u16,
    kind: u16,
    seq: u64,
    len: u64,
    total: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.op.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.total.to_le_bytes());
        b
    }
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Part of a collective's data.
    Data,
    /// The sender failed; the payload names the culprit (see [`decode_abort_payload`]).
    Abort,
}

/// A decoded data-plane frame header. Only the framing is checked here (magic, kind); whether
/// the operation, sequence number and lengths are the ones expected is up to the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The sender's operation code (possibly one this build does not know).
    pub op: u16,
    pub kind: FrameKind,
    /// Sequence number of the sender's collective.
    pub seq: u64,
    /// Payload length in bytes, as claimed by the sender (not yet bounded).
    pub len: u64,
    /// Total bytes of the sender's collective.
    pub total: u64,
}

impl FrameHeader {
    /// The header's bytes on the wire.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let kind = match self.kind {
            FrameKind::Data => KIND_DATA,
            FrameKind::Abort => KIND_ABORT,
        };
        Header {
            magic: FRAME_MAGIC,
            op: self.op,
            kind,
            seq: self.seq,
            len: self.len,
            total: self.total,
        }
        .encode()
    }

    /// The payload length of an abort frame, checked to be plausible before anything is read.
    pub fn abort_payload_len(&self) -> std::result::Result<usize, FrameError> {
        if (9..=MAX_ABORT_PAYLOAD as u64).contains(&self.len) {
            Ok(self.len as usize)
        } else {
            Err(FrameError::AbortLength(self.len))
        }
    }
}

/// Why bytes received on the data plane are not a well-formed frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame header is {FRAME_HEADER_LEN} bytes, got {0}")]
    Short(usize),
    #[error(
        "received bytes that are not a Tessera frame (magic {0:#010x}); another program may be \
         writing to the data-plane port"
    )]
    BadMagic(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("malformed abort frame of {0} bytes")]
    AbortLength(u64),
    #[error("abort frame names rank {0}")]
    AbortCulprit(u64),
}

/// Decodes the first [`FRAME_HEADER_LEN`] bytes of `bytes` as a frame header; extra bytes are
/// ignored. Never panics; checks the magic and the kind.
pub fn decode_frame_header(bytes: &[u8]) -> std::result::Result<FrameHeader, FrameError> {
    let b: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Short(bytes.len()))?;
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let kind = match u16::from_le_bytes([b[6], b[7]]) {
        KIND_DATA => FrameKind::Data,
        KIND_ABORT => FrameKind::Abort,
        other => return Err(FrameError::UnknownKind(other)),
    };
    Ok(FrameHeader {
        op: u16::from_le_bytes([b[4], b[5]]),
        kind,
        seq: u64_at(8),
        len: u64_at(16),
        total: u64_at(24),
    })
}

/// The contents of an abort frame: why the sender failed and which rank it blames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortPayload {
    /// 1: disconnected, 2: timeout, anything else: protocol error.
    pub code: u8,
    pub culprit: usize,
    pub detail: String,
}

/// Decodes an abort frame's payload (its length already checked with
/// [`FrameHeader::abort_payload_len`]) in a ring of `world` ranks. Never panics.
pub fn decode_abort_payload(
    p: &[u8],
    world: usize,
) -> std::result::Result<AbortPayload, FrameError> {
    if !(9..=MAX_ABORT_PAYLOAD).contains(&p.len()) {
        return Err(FrameError::AbortLength(p.len() as u64));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&p[1..9]);
    let culprit = u64::from_le_bytes(c);
    if culprit >= world as u64 {
        return Err(FrameError::AbortCulprit(culprit));
    }
    Ok(AbortPayload {
        code: p[0],
        culprit: culprit as usize,
        detail: String::from_utf8_lossy(&p[9..]).into_owned(),
    })
}

/// Who failed and how, forwarded to r+1 in an abort frame.
#[derive(Clone, Debug)]
struct AbortInfo {
    code: u8,
    culprit: usize,
    detail: String,
}

const ABORT_DISCONNECTED: u8 = 1;
const ABORT_TIMEOUT: u8 = 2;
const ABORT_PROTOCOL: u8 = 3;

impl AbortInfo {
    fn from_error(e: &CommError, me: usize) -> AbortInfo {
        let mut info = Self::from_error_raw(e, me);
        // Forwarded again: keep the original reason, not a chain of relays.
        if let Some(i) = info.detail.find(" (reported through rank") {
            info.detail.truncate(i);
        }
        info
    }

    fn from_error_raw(e: &CommError, me: usize) -> AbortInfo {
        match e {
            CommError::PeerDisconnected { peer, detail, .. } => {
                AbortInfo { code: ABORT_DISCONNECTED, culprit: *peer, detail: detail.clone() }
            }
            CommError::Timeout { peer, after, .. } => {
                AbortInfo { code: ABORT_TIMEOUT, culprit: *peer, detail: format!("{after:?}") }
            }
            CommError::Protocol { peer, detail, .. } => {
                AbortInfo { code: ABORT_PROTOCOL, culprit: *peer, detail: detail.clone() }
            }
            other => AbortInfo { code: ABORT_PROTOCOL, culprit: me, detail: other.to_string() },
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + self.detail.len());
        v.push(self.code);
        v.extend_from_slice(&(self.culprit as u64).to_le_bytes());
        let detail = self.detail.as_bytes();
        v.extend_from_slice(&detail[..detail.len().min(MAX_ABORT_PAYLOAD - 9)]);
        v
    }
}

/// Identifies one collective call: what, which, with whom, and for how long to wait.
#[derive(Clone, Copy)]
struct Ctx {
    op: Op,
    seq: u64,
    me: usize,
    world: usize,
    next: usize,
    prev: usize,
    timeout: Duration,
    max_len: usize,
}

impl Ctx {
    fn io_error(&self, peer: usize, e: io::Error, what: &str) -> CommError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                CommError::Timeout { op: self.op.name(), seq: self.seq, peer, after: self.timeout }
            }
            io::ErrorKind::UnexpectedEof => CommError::PeerDisconnected {
                op: self.op.name(),
                seq: self.seq,
                peer,
                detail: format!("connection closed while {what}"),
            },
            _ => CommError::PeerDisconnected {
                op: self.op.name(),
                seq: self.seq,
                peer,
                detail: format!("{what}: {e}"),
            },
        }
    }

    fn frame_sent(&self, frame: usize) {
        fault_point(FaultPoint::FrameSent { op: self.op.name(), seq: self.seq, frame });
    }

    fn protocol(&self, peer: usize, detail: String) -> CommError {
        CommError::Protocol { op: self.op.name(), seq: self.seq, peer, detail }
    }

    fn data_header(&self, len: usize, total: u64) -> Header {
        Header {
            magic: FRAME_MAGIC,
            op: self.op as u16,
            kind: KIND_DATA,
            seq: self.seq,
            len: len as u64,
            total,
        }
    }

    /// Reads and checks the next frame header from r-1. `expect_len`: the payload length this
    /// rank expects, or `None` for variable-length messages (then bounded by `max_len`).
    fn read_header(
        &self,
        stream: &mut TcpStream,
        expect_len: Option<usize>,
        total: u64,
    ) -> Result<usize> {
        let mut b = [0u8; HEADER_LEN];
        stream
            .read_exact(&mut b)
            .map_err(|e| self.io_error(self.prev, e, "receiving a frame header"))?;
        self.check_header(&b, stream, expect_len, total)
    }

    /// Checks a received header (see `read_header`); reads the rest of an abort frame.
    fn check_header(
        &self,
        b: &[u8; HEADER_LEN],
        stream: &mut TcpStream,
        expect_len: Option<usize>,
        total: u64,
    ) -> Result<usize> {
        let peer = self.prev;
        let h = decode_frame_header(b).map_err(|e| self.protocol(peer, e.to_string()))?;
        if h.kind == FrameKind::Abort {
            let _ = stream.set_nonblocking(false);
            return Err(self.read_abort(stream, &h));
        }
        if h.op != self.op as u16 || h.seq != self.seq {
            let theirs = Op::from_code(h.op).map_or("an unknown operation", Op::name);
            return Err(self.protocol(
                peer,
                format!(
                    "rank {peer} is in {theirs} #{} while this rank is in {} #{}: the ranks \
                     called different sequences of collectives",
                    h.seq,
                    self.op.name(),
                    self.seq
                ),
            ));
        }
        if h.total != total {
            return Err(self.protocol(
                peer,
                format!(
                    "rank {peer} called {} with {} bytes in total, this rank with {total}; every \
                     rank must pass the same length",
                    self.op.name(),
                    h.total
                ),
            ));
        }
        match expect_len {
            Some(n) if h.len != n as u64 => {
                Err(self
                    .protocol(peer, format!("frame of {} bytes where {n} were expected", h.len)))
            }
            None if h.len > self.max_len as u64 => Err(self.protocol(
                peer,
                format!(
                    "message of {} bytes exceeds the limit of {} bytes \
                     (TcpRingConfig::max_message_bytes)",
                    h.len, self.max_len
                ),
            )),
            _ => Ok(h.len as usize),
        }
    }

    fn read_abort(&self, stream: &mut TcpStream, h: &FrameHeader) -> CommError {
        let peer = self.prev;
        let len = match h.abort_payload_len() {
            Ok(len) => len,
            Err(e) => return self.protocol(peer, e.to_string()),
        };
        let mut p = vec![0u8; len];
        if let Err(e) = stream.read_exact(&mut p) {
            return self.io_error(peer, e, "receiving an abort frame");
        }
        let AbortPayload { code, culprit, detail } = match decode_abort_payload(&p, self.world) {
            Ok(a) => a,
            Err(e) => return self.protocol(peer, e.to_string()),
        };
        let (op, seq) = (self.op.name(), self.seq);
        match code {
            ABORT_TIMEOUT => CommError::Timeout { op, seq, peer: culprit, after: self.timeout },
            ABORT_DISCONNECTED => CommError::PeerDisconnected {
                op,
                seq,
                peer: culprit,
                detail: format!("{detail} (reported through rank {peer})"),
            },
            _ => CommError::Protocol {
                op,
                seq,
                peer: culprit,
                detail: format!("{detail} (reported through rank {peer})"),
            },
        }
    }

    fn write_frame(&self, stream: &mut TcpStream, payload: &[u8], total: u64) -> Result<()> {
        let h = self.data_header(payload.len(), total).encode();
        write_all_vectored(stream, &h, payload)
            .map_err(|e| self.io_error(self.next, e, "sending a frame"))
    }

    fn write_abort(&self, stream: &mut TcpStream, info: &AbortInfo) {
        let payload = info.encode();
        let h = Header {
            magic: FRAME_MAGIC,
            op: self.op as u16,
            kind: KIND_ABORT,
            seq: self.seq,
            len: payload.len() as u64,
            total: 0,
        }
        .encode();
        // Best effort: the peer may be gone too. Do not wait long for a stalled one.
        let _ = stream.set_write_timeout(Some(self.timeout.min(Duration::from_secs(2))));
        let _ = write_all_vectored(stream, &h, &payload);
    }
}

fn write_all_vectored(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(body)];
    let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "peer accepts no data"));
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One frame to send: `len` bytes at `off`, once the receiver has completed `after_recv` ops.
#[derive(Clone, Copy, Debug)]
struct SendOp {
    off: usize,
    len: usize,
    after_recv: usize,
}

/// One frame to receive into `off..off+len`, once the sender has completed `after_send` ops.
/// `add`: add the payload (f32) instead of copying it; `scale`: then multiply by this.
#[derive(Clone, Copy, Debug)]
struct RecvOp {
    off: usize,
    len: usize,
    add: bool,
    scale: Option<f32>,
    after_send: usize,
}

#[derive(Default, Debug)]
struct Plan {
    sends: Vec<SendOp>,
    recvs: Vec<RecvOp>,
    /// Total bytes of the collective, checked in every header.
    total: u64,
}

/// Element bounds of chunk `c` of `len` elements cut into `n` chunks.
fn chunk_bounds(len: usize, n: usize, c: usize) -> (usize, usize) {
    let at = |i: usize| ((i as u128 * len as u128) / n as u128) as usize;
    (at(c), at(c + 1))
}

/// Ring reduce-scatter (`rs`) and/or all-gather (`ag`) over `len` f32 elements cut into `world`
/// chunks. Reduce-scatter leaves chunk `rank` reduced on `rank`; all-gather starts from chunk
/// `rank` owned by `rank`.
fn ring_plan(
    rank: usize,
    world: usize,
    len: usize,
    slice_elems: usize,
    rs: bool,
    ag: bool,
    scale: Option<f32>,
) -> Plan {
    let bounds = |c: usize| chunk_bounds(len, world, c);
    ring_plan_with(rank, world, len, &bounds, slice_elems, rs, ag, scale)
}

/// Chunk bounds of the part `offset..offset + len` of a buffer of `total` elements: the
/// whole buffer's chunks cut to the part, in the part's own coordinates. A ring plan over
/// these bounds sums every element of the part in the order that a plan over the whole buffer
/// would (the order depends only on the chunk an element falls in).
fn part_bounds(total: usize, offset: usize, len: usize, n: usize, c: usize) -> (usize, usize) {
    let (a, b) = chunk_bounds(total, n, c);
    let cut = |x: usize| x.clamp(offset, offset + len) - offset;
    (cut(a), cut(b))
}

/// [`ring_plan`] over `len` elements cut into chunks by `bounds(c)` (element bounds of chunk
/// `c`, in order, covering `0..len`).
#[allow(clippy::too_many_arguments)]
fn ring_plan_with(
    rank: usize,
    world: usize,
    len: usize,
    bounds: &dyn Fn(usize) -> (usize, usize),
    slice_elems: usize,
    rs: bool,
    ag: bool,
    scale: Option<f32>,
) -> Plan {
    let n = world;
    let max_chunk = (0..n).map(|c| bounds(c).1 - bounds(c).0).max().unwrap_or(0);
    let nsl = max_chunk.div_ceil(slice_elems.max(1)).max(1);
    let slice = |c: usize, k: usize| {
        let (a, b) = bounds(c);
        let cl = b - a;
        let s = a + k * cl / nsl;
        let e = a + (k + 1) * cl / nsl;
        (s * 4, (e - s) * 4)
    };
    let modn = |x: isize| x.rem_euclid(n as isize) as usize;
    let r = rank as isize;
    let mut plan = Plan { total: (len * 4) as u64, ..Plan::default() };
    let rs_steps = if rs { n - 1 } else { 0 };
    let ag_steps = if ag { n - 1 } else { 0 };
    for g in 0..rs_steps + ag_steps {
        let (send_c, recv_c, is_rs) = if g < rs_steps {
            let s = g as isize;
            (modn(r - s - 1), modn(r - s - 2), true)
        } else {
            let s = (g - rs_steps) as isize;
            (modn(r - s), modn(r - s - 1), false)
        };
        for k in 0..nsl {
            let (off, l) = slice(send_c, k);
            let after_recv = if g == 0 { 0 } else { (g - 1) * nsl + k + 1 };
            plan.sends.push(SendOp { off, len: l, after_recv });
            let (off, l) = slice(recv_c, k);
            // An all-gather step overwrites the chunk this rank sent at the same reduce-scatter
            // step: wait until that frame has left.
            let after_send = if !is_rs && rs_steps > 0 { (g - rs_steps) * nsl + k + 1 } else { 0 };
            let last_rs = is_rs && g + 1 == rs_steps;
            plan.recvs.push(RecvOp {
                off,
                len: l,
                add: is_rs,
                scale: if last_rs { scale } else { None },
                after_send,
            });
        }
    }
    plan
}

/// Pipelined chain broadcast of `len` bytes from `root`.
fn broadcast_plan(rank: usize, world: usize, root: usize, len: usize, slice: usize) -> Plan {
    let nsl = len.div_ceil(slice.max(1)).max(1);
    let pos = (rank + world - root) % world;
    let mut plan = Plan { total: len as u64, ..Plan::default() };
    for k in 0..nsl {
        let s = k * len / nsl;
        let e = (k + 1) * len / nsl;
        if pos != 0 {
            plan.recvs.push(RecvOp { off: s, len: e - s, add: false, scale: None, after_send: 0 });
        }
        if pos != world - 1 {
            let after_recv = if pos == 0 { 0 } else { k + 1 };
            plan.sends.push(SendOp { off: s, len: e - s, after_recv });
        }
    }
    plan
}

/// A raw view of the collective's buffer, from which the send and receive sides take regions.
/// The plan's dependencies guarantee that no region is written before its last send.
#[derive(Clone, Copy)]
struct BufPtr {
    ptr: *mut u8,
    len: usize,
}

impl BufPtr {
    fn check(&self, off: usize, len: usize) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.len)
    }
}

struct Links {
    send: TcpStream,
    recv: TcpStream,
    /// A second handle of the recv link, to wake the receiver when the sender fails.
    recv_ctl: TcpStream,
    /// A second handle of the send link, to break a write blocked on a stalled r+1 when the
    /// receiver has failed.
    send_ctl: TcpStream,
    /// The last collective stopped in the middle of a frame to r+1: no abort frame may follow.
    send_mid_frame: bool,
}

/// Closes a [`TcpRing`]'s links from any thread; see [`TcpRing::abort_handle`].
#[derive(Debug)]
pub struct AbortHandle {
    streams: Vec<TcpStream>,
}

impl AbortHandle {
    /// Shuts both links down; idempotent.
    pub fn abort(&self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A ring of TCP connections implementing [`Communicator`].
pub struct TcpRing {
    rank: usize,
    world: usize,
    seq: u64,
    cfg: TcpRingConfig,
    links: Option<Links>,
    broken: Option<String>,
    scratch: Vec<f32>,
    flight: Arc<FlightRecorder>,
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .field("broken", &self.broken)
            .finish()
    }
}

/// The handshake a rank sends on connecting to r+1: magic, byte-order tag, session, world size,
/// and the sender's rank.
pub fn encode_hello(session: u64, world: usize, rank: usize) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&HELLO_MAGIC);
    b[8..12].copy_from_slice(&ENDIAN_TAG.to_ne_bytes());
    b[16..24].copy_from_slice(&session.to_le_bytes());
    b[24..32].copy_from_slice(&(world as u64).to_le_bytes());
    b[32..40].copy_from_slice(&(rank as u64).to_le_bytes());
    b
}

/// A decoded handshake (see [`encode_hello`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub session: u64,
    pub world: u64,
    pub rank: u64,
}

/// Why a connecting peer's handshake is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a handshake is {HELLO_LEN} bytes, got {0}")]
    Short(usize),
    #[error("not a Tessera data-plane handshake")]
    BadMagic,
    #[error("peer has a different byte order")]
    ByteOrder,
    #[error(
        "session {found:#x} does not match this job's session {expected:#x} (a stale or foreign \
         job?)"
    )]
    Session { found: u64, expected: u64 },
    #[error("world size {found} does not match this job's {expected}")]
    World { found: u64, expected: usize },
    #[error("connection from rank {found} but rank {expected} was expected")]
    Rank { found: u64, expected: usize },
}

/// Decodes the first [`HELLO_LEN`] bytes of `bytes` as a handshake; extra bytes are ignored.
/// Checks the magic and the byte order; never panics.
pub fn decode_hello(bytes: &[u8]) -> std::result::Result<Hello, HandshakeError> {
    let b = bytes.get(..HELLO_LEN).ok_or(HandshakeError::Short(bytes.len()))?;
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if b[0..8] != HELLO_MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    if b[8..12] != ENDIAN_TAG.to_ne_bytes() {
        return Err(HandshakeError::ByteOrder);
    }
    Ok(Hello { session: u64_at(16), world: u64_at(24), rank: u64_at(32) })
}

impl Hello {
    /// Checks that this hello comes from rank `expect_rank` of this job.
    pub fn check(
        &self,
        session: u64,
        world: usize,
        expect_rank: usize,
    ) -> std::result::Result<(), HandshakeError> {
        if self.session != session {
            return Err(HandshakeError::Session { found: self.session, expected: session });
        }
        if self.world != world as u64 {
            return Err(HandshakeError::World { found: self.world, expected: world });
        }
        if self.rank != expect_rank as u64 {
            return Err(HandshakeError::Rank { found: self.rank, expected: expect_rank });
        }
        Ok(())
    }
}

/// Checks a hello from a connecting peer; `Err(reason)` if it is not the expected rank.
fn check_hello(
    b: &[u8; HELLO_LEN],
    session: u64,
    world: usize,
    expect_rank: usize,
) -> std::result::Result<(), String> {
    decode_hello(b).and_then(|h| h.check(session, world, expect_rank)).map_err(|e| e.to_string())
}

fn configure(stream: &TcpStream, cfg: &TcpRingConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(cfg.timeout))?;
    stream.set_write_timeout(Some(cfg.timeout))?;
    Ok(())
}

impl TcpRing {
    /// Connects the ring: this rank (`rank`, listening on `listener`) connects to
    /// `addrs[rank+1]` and accepts `addrs[rank-1]`, both with a handshake carrying the session
    /// id, the world size (`addrs.len()`) and the ranks. Connections that fail the handshake are
    /// refused (and told why) and the wait goes on until `cfg.setup_timeout`.
    pub fn connect<A: ToSocketAddrs>(
        listener: DataPlaneListener,
        rank: usize,
        addrs: &[A],
        cfg: TcpRingConfig,
    ) -> Result<TcpRing> {
        let world = addrs.len();
        if world == 0 || rank >= world {
            return Err(CommError::InvalidArgument {
                op: "TcpRing::connect",
                detail: format!(
                    "rank {rank} with {world} addresses; need rank < number of addresses"
                ),
            });
        }
        Self::connect_next(listener, rank, world, &addrs[(rank + 1) % world], cfg)
    }

    /// [`TcpRing::connect`] knowing only the address of the next rank (`rank + 1` mod
    /// `world`), which is all a ring needs: what the coordinator hands each rank, so that its
    /// join replies stay O(1) in the world size.
    pub fn connect_next<A: ToSocketAddrs>(
        listener: DataPlaneListener,
        rank: usize,
        world: usize,
        next_addr: &A,
        cfg: TcpRingConfig,
    ) -> Result<TcpRing> {
        if world == 0 || rank >= world {
            return Err(CommError::InvalidArgument {
                op: "TcpRing::connect",
                detail: format!("rank {rank} in a world of {world}; need rank < world"),
            });
        }
        if cfg.timeout.is_zero() || cfg.setup_timeout.is_zero() || cfg.chunk_bytes < 4 {
            return Err(CommError::InvalidArgument {
                op: "TcpRing::connect",
                detail: format!(
                    "timeout {:?}, setup_timeout {:?} and chunk_bytes {} must be positive \
                     (chunk_bytes at least 4)",
                    cfg.timeout, cfg.setup_timeout, cfg.chunk_bytes
                ),
            });
        }
        let mut ring = TcpRing {
            rank,
            world,
            seq: 0,
            links: None,
            broken: None,
            scratch: Vec::new(),
            cfg,
            flight: Arc::new(FlightRecorder::new()),
        };
        if world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + ring.cfg.setup_timeout;
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let next_addr: SocketAddr =
            next_addr.to_socket_addrs().ok().and_then(|mut it| it.next()).ok_or_else(|| {
                CommError::Setup(format!("the address of rank {next} does not resolve"))
            })?;
        let mut send = connect_retry(next_addr, next, deadline)?;
        configure(&send, &ring.cfg)
            .map_err(|e| CommError::Setup(format!("configuring the link to rank {next}: {e}")))?;
        send.write_all(&encode_hello(ring.cfg.session, world, rank)).map_err(|e| {
            CommError::Setup(format!("sending the handshake to rank {next} at {next_addr}: {e}"))
        })?;
        let recv = accept_peer(&listener.listener, prev, world, &ring.cfg, deadline)?;
        drop(listener);
        send.set_read_timeout(Some(remaining(deadline)))
            .map_err(|e| CommError::Setup(format!("link to rank {next}: {e}")))?;
        let mut ack = [0u8; 2];
        send.read_exact(&mut ack).map_err(|e| {
            CommError::Setup(format!(
                "rank {next} at {next_addr} did not answer the handshake before the setup \
                 deadline: {e}"
            ))
        })?;
        match ack[0] {
            ACK_OK => {}
            ACK_REFUSED => {
                let mut reason = vec![0u8; ack[1] as usize];
                let _ = send.read_exact(&mut reason);
                return Err(CommError::Setup(format!(
                    "rank {next} at {next_addr} refused this rank's connection: {}",
                    String::from_utf8_lossy(&reason)
                )));
            }
            other => {
                return Err(CommError::Setup(format!(
                    "rank {next} at {next_addr} answered the handshake with byte {other}; is \
                     that address a Tessera rank of this job?"
                )));
            }
        }
        configure(&send, &ring.cfg)
            .map_err(|e| CommError::Setup(format!("configuring the link to rank {next}: {e}")))?;
        let recv_ctl = recv
            .try_clone()
            .map_err(|e| CommError::Setup(format!("duplicating the link from rank {prev}: {e}")))?;
        let send_ctl = send
            .try_clone()
            .map_err(|e| CommError::Setup(format!("duplicating the link to rank {next}: {e}")))?;
        ring.links = Some(Links { send, recv, recv_ctl, send_ctl, send_mid_frame: false });
        Ok(ring)
    }

    /// A handle that closes this ring's links from another thread (e.g. when the coordinator
    /// reports that the job is aborting): a collective blocked in this rank fails at once, and
    /// the neighbours see the disconnect.
    pub fn abort_handle(&self) -> Result<AbortHandle> {
        let mut streams = Vec::new();
        if let Some(l) = &self.links {
            for s in [&l.send, &l.recv] {
                streams.push(s.try_clone().map_err(|e| {
                    CommError::Setup(format!("duplicating a data-plane socket: {e}"))
                })?);
            }
        }
        Ok(AbortHandle { streams })
    }

    /// The settings this ring was built with.
    pub fn config(&self) -> &TcpRingConfig {
        &self.cfg
    }

    /// What this ring is doing, readable from other threads (for abort messages).
    pub fn flight_recorder(&self) -> Arc<FlightRecorder> {
        self.flight.clone()
    }

    fn begin(&mut self, op: Op) -> Result<Ctx> {
        let seq = self.seq;
        self.seq += 1;
        self.flight.begin(op.name(), seq);
        fault_point(FaultPoint::Begin { op: op.name(), seq });
        if let Some(why) = &self.broken {
            return Err(CommError::Poisoned(why.clone()));
        }
        Ok(Ctx {
            op,
            seq,
            me: self.rank,
            world: self.world,
            next: (self.rank + 1) % self.world,
            prev: (self.rank + self.world - 1) % self.world,
            timeout: self.cfg.timeout,
            max_len: self.cfg.max_message_bytes,
        })
    }

    /// Marks the ring unusable, forwards an abort frame naming the culprit to r+1 (unless r+1
    /// is the culprit, whose link may be mid-frame) and closes both links so that neighbours
    /// learn of it at once.
    fn poison(&mut self, ctx: &Ctx, e: &CommError) {
        self.broken = Some(e.to_string());
        if let Some(l) = &mut self.links {
            let info = AbortInfo::from_error(e, ctx.me);
            if info.culprit != ctx.next && info.culprit != ctx.me && !l.send_mid_frame {
                ctx.write_abort(&mut l.send, &info);
            }
            let _ = l.send.shutdown(Shutdown::Both);
            let _ = l.recv.shutdown(Shutdown::Both);
        }
    }

    fn finish<T>(&mut self, ctx: &Ctx, r: Result<T>) -> Result<T> {
        self.flight.end();
        if let Err(e) = &r {
            self.poison(ctx, e);
        }
        r
    }

    /// Runs a plan over `buf` (`f32_aligned`: the buffer holds f32 values, needed by add ops).
    fn run_plan(&mut self, ctx: Ctx, buf: &mut [u8], plan: &Plan) -> Result<()> {
        let max_add = plan.recvs.iter().filter(|r| r.add).map(|r| r.len / 4).max().unwrap_or(0);
        if self.scratch.len() < max_add {
            self.scratch.resize(max_add, 0.0);
        }
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let bp = BufPtr { ptr: buf.as_mut_ptr(), len: buf.len() };
        let send_bytes: usize = plan.sends.iter().map(|s| s.len).sum();
        let scratch = &mut self.scratch[..];
        if plan.sends.is_empty() || plan.recvs.is_empty() || send_bytes <= SEQUENTIAL_MAX_BYTES {
            return run_sequential(ctx, links, bp, plan, scratch);
        }
        run_polled(ctx, links, bp, plan, scratch)
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn connect_retry(addr: SocketAddr, peer: usize, deadline: Instant) -> Result<TcpStream> {
    loop {
        let left = remaining(deadline);
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(CommError::Setup(format!(
                        "cannot connect to rank {peer} at {addr} before the setup deadline: {e}; \
                         is it running and reachable?"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20).min(left));
            }
        }
    }
}

/// Accepts connections until one passes the handshake as rank `prev`; others are refused.
fn accept_peer(
    listener: &TcpListener,
    prev: usize,
    world: usize,
    cfg: &TcpRingConfig,
    deadline: Instant,
) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::Setup(format!("configuring the listener: {e}")))?;
    let mut refused: Vec<String> = Vec::new();
    loop {
        match listener.accept() {
            Ok((mut s, from)) => {
                let checked = (|| -> std::result::Result<(), String> {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(remaining(deadline).min(Duration::from_secs(5))))
                        .map_err(|e| e.to_string())?;
                    let mut b = [0u8; HELLO_LEN];
                    s.read_exact(&mut b).map_err(|e| format!("no handshake: {e}"))?;
                    check_hello(&b, cfg.session, world, prev)
                })();
                match checked {
                    Ok(()) => {
                        let _ = s.set_write_timeout(Some(cfg.timeout));
                        s.write_all(&[ACK_OK, 0]).map_err(|e| {
                            CommError::Setup(format!("answering rank {prev} at {from}: {e}"))
                        })?;
                        configure(&s, cfg).map_err(|e| {
                            CommError::Setup(format!("configuring the link from rank {prev}: {e}"))
                        })?;
                        return Ok(s);
                    }
                    Err(reason) => {
                        tracing::warn!(%from, %reason, "refused a data-plane connection");
                        let msg = reason.as_bytes();
                        let msg = &msg[..msg.len().min(255)];
                        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                        let mut out = vec![ACK_REFUSED, msg.len() as u8];
                        out.extend_from_slice(msg);
                        let _ = s.write_all(&out);
                        if refused.len() < 8 {
                            refused.push(format!("{from}: {reason}"));
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let extra = if refused.is_empty() {
                        String::new()
                    } else {
                        format!("; refused: {}", refused.join("; "))
                    };
                    return Err(CommError::Setup(format!(
                        "rank {prev} did not connect within the setup timeout {:?}{extra}",
                        cfg.setup_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CommError::Setup(format!("accepting rank {prev}: {e}"))),
        }
    }
}

fn send_region(bp: BufPtr, op: &SendOp) -> &[u8] {
    assert!(bp.check(op.off, op.len), "send op outside the buffer");
    // SAFETY: bounds checked above; the plan guarantees no concurrent write to this region.
    unsafe { std::slice::from_raw_parts(bp.ptr.add(op.off), op.len) }
}

fn recv_region<'a>(bp: BufPtr, op: &RecvOp) -> &'a mut [u8] {
    assert!(bp.check(op.off, op.len), "recv op outside the buffer");
    // SAFETY: bounds checked above; the plan guarantees no concurrent access to this region.
    unsafe { std::slice::from_raw_parts_mut(bp.ptr.add(op.off), op.len) }
}

/// Receives one planned frame from r-1 into the buffer.
fn recv_one(
    ctx: &Ctx,
    stream: &mut TcpStream,
    bp: BufPtr,
    op: &RecvOp,
    total: u64,
    scratch: &mut [f32],
) -> Result<()> {
    ctx.read_header(stream, Some(op.len), total)?;
    let dst = recv_region(bp, op);
    if op.add {
        let n = op.len / 4;
        let sc = &mut scratch[..n];
        stream
            .read_exact(f32_bytes_mut(sc))
            .map_err(|e| ctx.io_error(ctx.prev, e, "receiving data"))?;
        debug_assert_eq!(dst.as_ptr() as usize % 4, 0);
        // SAFETY: add ops only address f32 buffers at multiples of 4 bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), n) };
        add_into(dst, sc);
        if let Some(f) = op.scale {
            dst.iter_mut().for_each(|v| *v *= f);
        }
    } else {
        stream.read_exact(dst).map_err(|e| ctx.io_error(ctx.prev, e, "receiving data"))?;
    }
    Ok(())
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        for i in 0..8 {
            d[i] += s[i];
        }
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d += *s;
    }
}

/// Waits until `fds` are ready or `timeout` passes; `Ok(false)` on timeout.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<bool> {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Runs a plan on one thread with non-blocking sockets and poll(2): writes to r+1 and reads
/// from r-1 whenever either is ready, so both directions stream at once without a second
/// thread. A side that makes no progress for `ctx.timeout` fails with a timeout naming its peer.
fn run_polled(
    ctx: Ctx,
    links: &mut Links,
    bp: BufPtr,
    plan: &Plan,
    scratch: &mut [f32],
) -> Result<()> {
    fn set_nb(ctx: &Ctx, links: &Links, nb: bool) -> Result<()> {
        links
            .send
            .set_nonblocking(nb)
            .map_err(|e| ctx.io_error(ctx.next, e, "configuring the link"))?;
        links
            .recv
            .set_nonblocking(nb)
            .map_err(|e| ctx.io_error(ctx.prev, e, "configuring the link"))
    }
    set_nb(&ctx, links, true)?;
    let mut partial = None;
    let r = polled_loop(ctx, links, bp, plan, scratch, &mut partial);
    let restored = set_nb(&ctx, links, false);
    links.send_mid_frame = partial.is_some();
    if let (Err(e), Some((si, s_pos))) = (&r, partial)
        && AbortInfo::from_error(e, ctx.me).culprit != ctx.next
    {
        // r+1 is alive: finish the frame it is reading so that the abort frame can follow.
        let op = &plan.sends[si];
        let hdr = ctx.data_header(op.len, plan.total).encode();
        let payload = send_region(bp, op);
        let (head, body) = if s_pos < HEADER_LEN {
            (&hdr[s_pos..], payload)
        } else {
            (&[][..], &payload[s_pos - HEADER_LEN..])
        };
        let _ = links.send.set_write_timeout(Some(ctx.timeout.min(Duration::from_millis(500))));
        if write_all_vectored(&mut links.send, head, body).is_ok() {
            links.send_mid_frame = false;
        }
    }
    r.and(restored)
}

/// Called when the send link has failed: r+1 may only have closed because a failure upstream
/// of this rank reached it first. Reads on from r-1 for a short grace period, skipping data
/// frames: an abort frame or a closed link there is the better error to report. `hdr_part`: the
/// bytes of a header already read; `body_left`: what remains of a frame being read.
fn upstream_failure(
    ctx: &Ctx,
    recv: &mut TcpStream,
    hdr_part: &[u8],
    body_left: usize,
) -> Option<CommError> {
    let deadline = Instant::now() + Duration::from_millis(200);
    recv.set_nonblocking(false).ok()?;
    let mut sink = vec![0u8; 64 * 1024];
    let mut hdr = [0u8; HEADER_LEN];
    let mut have = hdr_part.len().min(HEADER_LEN);
    hdr[..have].copy_from_slice(&hdr_part[..have]);
    let mut skip = body_left;
    let eof =
        || ctx.io_error(ctx.prev, io::Error::from(io::ErrorKind::UnexpectedEof), "receiving data");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        recv.set_read_timeout(Some(left)).ok()?;
        let want = if skip > 0 { skip.min(sink.len()) } else { HEADER_LEN - have };
        let buf = if skip > 0 { &mut sink[..want] } else { &mut hdr[have..] };
        match recv.read(buf) {
            Ok(0) => return Some(eof()),
            Ok(n) if skip > 0 => skip -= n,
            Ok(n) => {
                have += n;
                if have == HEADER_LEN {
                    // Not a frame (or an unknown kind): nothing better to report.
                    let h = decode_frame_header(&hdr).ok()?;
                    if h.kind == FrameKind::Abort {
                        return Some(ctx.read_abort(recv, &h));
                    }
                    skip = usize::try_from(h.len).ok()?;
                    have = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => return Some(ctx.io_error(ctx.prev, e, "receiving data")),
        }
    }
}

fn polled_loop(
    ctx: Ctx,
    links: &mut Links,
    bp: BufPtr,
    plan: &Plan,
    scratch: &mut [f32],
    partial: &mut Option<(usize, usize)>,
) -> Result<()> {
    use std::os::fd::AsRawFd;
    let (sends, recvs) = (&plan.sends, &plan.recvs);
    let (mut si, mut s_pos) = (0usize, 0usize);
    let mut s_hdr = [0u8; HEADER_LEN];
    let (mut ri, mut r_pos) = (0usize, 0usize);
    let mut r_hdr = [0u8; HEADER_LEN];
    let mut last_send = Instant::now();
    let mut last_recv = last_send;
    let would_block = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
    loop {
        // Send side: as much as the socket takes.
        while si < sends.len() && sends[si].after_recv <= ri {
            let op = &sends[si];
            if s_pos == 0 {
                s_hdr = ctx.data_header(op.len, plan.total).encode();
            }
            let payload = send_region(bp, op);
            let r = if s_pos < HEADER_LEN {
                links.send.write_vectored(&[IoSlice::new(&s_hdr[s_pos..]), IoSlice::new(payload)])
            } else {
                links.send.write(&payload[s_pos - HEADER_LEN..])
            };
            match r {
                Ok(0) => {
                    return Err(ctx.io_error(
                        ctx.next,
                        io::Error::new(io::ErrorKind::WriteZero, "peer accepts no data"),
                        "sending a frame",
                    ));
                }
                Ok(n) => {
                    s_pos += n;
                    last_send = Instant::now();
                    if s_pos == HEADER_LEN + op.len {
                        si += 1;
                        s_pos = 0;
                        ctx.frame_sent(si);
                    }
                    *partial = (s_pos != 0).then_some((si, s_pos));
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let send_err = ctx.io_error(ctx.next, e, "sending a frame");
                    let (part, left) = if r_pos < HEADER_LEN {
                        (&r_hdr[..r_pos], 0)
                    } else {
                        (&[][..], HEADER_LEN + recvs.get(ri).map_or(0, |o| o.len) - r_pos)
                    };
                    return Err(
                        upstream_failure(&ctx, &mut links.recv, part, left).unwrap_or(send_err)
                    );
                }
            }
        }
        // Receive side: as much as has arrived.
        while ri < recvs.len() && recvs[ri].after_send <= si {
            let op = recvs[ri];
            let r = if r_pos < HEADER_LEN {
                links.recv.read(&mut r_hdr[r_pos..])
            } else {
                let at = r_pos - HEADER_LEN;
                if op.add {
                    links.recv.read(&mut f32_bytes_mut(&mut scratch[..op.len / 4])[at..])
                } else {
                    links.recv.read(&mut recv_region(bp, &op)[at..])
                }
            };
            match r {
                Ok(0) => {
                    return Err(ctx.io_error(
                        ctx.prev,
                        io::Error::from(io::ErrorKind::UnexpectedEof),
                        "receiving data",
                    ));
                }
                Ok(n) => {
                    r_pos += n;
                    last_recv = Instant::now();
                    if r_pos == HEADER_LEN {
                        ctx.check_header(&r_hdr, &mut links.recv, Some(op.len), plan.total)?;
                    }
                    if r_pos == HEADER_LEN + op.len {
                        if op.add {
                            let dst = recv_region(bp, &op);
                            // SAFETY: add ops only address f32 buffers at multiples of 4 bytes.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    dst.as_mut_ptr().cast::<f32>(),
                                    op.len / 4,
                                )
                            };
                            add_into(dst, &scratch[..op.len / 4]);
                            if let Some(f) = op.scale {
                                dst.iter_mut().for_each(|v| *v *= f);
                            }
                        }
                        ri += 1;
                        r_pos = 0;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ctx.io_error(ctx.prev, e, "receiving data")),
            }
        }
        let want_send = si < sends.len() && sends[si].after_recv <= ri;
        let want_recv = ri < recvs.len() && recvs[ri].after_send <= si;
        if !want_send && !want_recv {
            if si == sends.len() && ri == recvs.len() {
                return Ok(());
            }
            return Err(ctx.protocol(ctx.next, "internal error: the plan is stuck".into()));
        }
        let pfd = |fd, events| libc::pollfd { fd, events, revents: 0 };
        let mut fds =
            [pfd(links.send.as_raw_fd(), libc::POLLOUT), pfd(links.recv.as_raw_fd(), libc::POLLIN)];
        let fds = match (want_send, want_recv) {
            (true, true) => &mut fds[..],
            (true, false) => &mut fds[..1],
            _ => &mut fds[1..],
        };
        // The side that has waited longest decides the deadline.
        let since = match (want_send, want_recv) {
            (true, true) => last_send.min(last_recv),
            (true, false) => last_send,
            _ => last_recv,
        };
        let left = (since + ctx.timeout).saturating_duration_since(Instant::now());
        let ready = poll_fds(fds, left).map_err(|e| ctx.io_error(ctx.next, e, "poll"))?;
        if !ready && Instant::now() >= since + ctx.timeout {
            let peer =
                if want_recv && last_recv <= last_send || !want_send { ctx.prev } else { ctx.next };
            return Err(ctx.io_error(peer, io::Error::from(io::ErrorKind::TimedOut), "waiting"));
        }
    }
}

fn run_sequential(
    ctx: Ctx,
    links: &mut Links,
    bp: BufPtr,
    plan: &Plan,
    scratch: &mut [f32],
) -> Result<()> {
    let mut si = 0;
    for (ri, rop) in plan.recvs.iter().enumerate() {
        while si < plan.sends.len() && plan.sends[si].after_recv <= ri {
            ctx.write_frame(&mut links.send, send_region(bp, &plan.sends[si]), plan.total)?;
            si += 1;
            ctx.frame_sent(si);
        }
        recv_one(&ctx, &mut links.recv, bp, rop, plan.total, scratch)?;
    }
    while si < plan.sends.len() {
        ctx.write_frame(&mut links.send, send_region(bp, &plan.sends[si]), plan.total)?;
        si += 1;
        ctx.frame_sent(si);
    }
    Ok(())
}

fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

impl TcpRing {
    /// One ring step with variable-length messages: sends `send` to r+1 while receiving r-1's
    /// message (length checked against `expect_len` if given).
    fn exchange(
        &mut self,
        ctx: Ctx,
        send: &[u8],
        recv: &mut Vec<u8>,
        expect_len: Option<usize>,
        total: u64,
    ) -> Result<()> {
        let Some(links) = self.links.as_mut() else {
            recv.clear();
            recv.extend_from_slice(send);
            return Ok(());
        };
        let Links { send: out, recv: inp, recv_ctl, send_ctl, send_mid_frame } = links;
        let receive = |inp: &mut TcpStream, recv: &mut Vec<u8>| -> Result<()> {
            let len = ctx.read_header(inp, expect_len, total)?;
            recv.clear();
            recv.resize(len, 0);
            inp.read_exact(recv).map_err(|e| ctx.io_error(ctx.prev, e, "receiving data"))
        };
        if send.len() <= SEQUENTIAL_MAX_BYTES {
            ctx.write_frame(out, send, total)?;
            ctx.frame_sent(1);
            return receive(inp, recv);
        }
        let sender_failed = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let sender_failed = &sender_failed;
            let h = sc.spawn(move || {
                let r = ctx.write_frame(out, send, total);
                if r.is_ok() {
                    ctx.frame_sent(1);
                }
                if r.is_err() {
                    sender_failed.store(true, Ordering::SeqCst);
                    let _ = recv_ctl.shutdown(Shutdown::Read);
                }
                r
            });
            let rres = receive(inp, recv);
            if rres.is_err() && !sender_failed.load(Ordering::SeqCst) {
                // Do not wait for a write that r+1 may never take.
                let _ = send_ctl.shutdown(Shutdown::Write);
                *send_mid_frame = true;
            }
            let sres = h.join().unwrap_or_else(|_| {
                Err(ctx.protocol(ctx.next, "the sender thread panicked".to_string()))
            });
            match (sres, rres) {
                (Err(e), _) if sender_failed.load(Ordering::SeqCst) => Err(e),
                (_, Err(e)) | (Err(e), Ok(())) => Err(e),
                (Ok(()), Ok(())) => Ok(()),
            }
        })
    }

    /// Ring all-gather of variable-length messages; result indexed by rank.
    fn gather_bytes(
        &mut self,
        ctx: Ctx,
        input: &[u8],
        expect_len: Option<usize>,
        total: u64,
    ) -> Result<Vec<Vec<u8>>> {
        let n = self.world;
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
        out[self.rank] = input.to_vec();
        for s in 0..n.saturating_sub(1) {
            let send_from = (self.rank + n - s) % n;
            let recv_from = (self.rank + 2 * n - s - 1) % n;
            let outgoing = std::mem::take(&mut out[send_from]);
            let mut incoming = std::mem::take(&mut out[recv_from]);
            let r = self.exchange(ctx, &outgoing, &mut incoming, expect_len, total);
            out[send_from] = outgoing;
            out[recv_from] = incoming;
            r?;
        }
        Ok(out)
    }

    fn check_world_op(&self, ctx: &Ctx, root: Option<usize>) -> Result<()> {
        if let Some(root) = root
            && root >= self.world
        {
            return Err(CommError::InvalidArgument {
                op: ctx.op.name(),
                detail: format!("root {root} is not a rank of a world of {}", self.world),
            });
        }
        Ok(())
    }
}

impl Communicator for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn seq(&self) -> u64 {
        self.seq
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let ctx = self.begin(Op::AllReduceF32)?;
        if self.world == 1 {
            return Ok(());
        }
        let scale = match op {
            ReduceOp::Sum => None,
            ReduceOp::Mean => Some(1.0 / self.world as f32),
        };
        let plan = ring_plan(
            self.rank,
            self.world,
            buf.len(),
            self.cfg.chunk_bytes / 4,
            true,
            true,
            scale,
        );
        let r = self.run_plan(ctx, f32_bytes_mut(buf), &plan);
        self.finish(&ctx, r)
    }

    fn all_reduce_f32_part(
        &mut self,
        buf: &mut [f32],
        offset: usize,
        total: usize,
        op: ReduceOp,
    ) -> Result<()> {
        let ctx = self.begin(Op::AllReduceF32)?;
        crate::check_part(ctx.op.name(), buf.len(), offset, total)?;
        if self.world == 1 {
            return Ok(());
        }
        let scale = match op {
            ReduceOp::Sum => None,
            ReduceOp::Mean => Some(1.0 / self.world as f32),
        };
        let (len, world) = (buf.len(), self.world);
        let bounds = |c: usize| part_bounds(total, offset, len, world, c);
        let plan = ring_plan_with(
            self.rank,
            world,
            len,
            &bounds,
            self.cfg.chunk_bytes / 4,
            true,
            true,
            scale,
        );
        let r = self.run_plan(ctx, f32_bytes_mut(buf), &plan);
        self.finish(&ctx, r)
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        let ctx = self.begin(Op::AllReduceF64)?;
        if self.world == 1 {
            return Ok(());
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let total = bytes.len() as u64;
        let r = self.gather_bytes(ctx, &bytes, Some(bytes.len()), total);
        let all = self.finish(&ctx, r)?;
        for (i, v) in buf.iter_mut().enumerate() {
            let at = |r: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&all[r][i * 8..i * 8 + 8]);
                f64::from_le_bytes(w)
            };
            let mut acc = at(0);
            for r in 1..self.world {
                acc += at(r);
            }
            if op == ReduceOp::Mean {
                acc *= 1.0 / self.world as f64;
            }
            *v = acc;
        }
        Ok(())
    }

    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let ctx = self.begin(Op::AllGatherF32)?;
        let m = input.len();
        if output.len() != m * self.world {
            return Err(CommError::InvalidArgument {
                op: ctx.op.name(),
                detail: format!(
                    "output has {} elements; it needs world × input = {} × {m}",
                    output.len(),
                    self.world
                ),
            });
        }
        output[self.rank * m..(self.rank + 1) * m].copy_from_slice(input);
        if self.world == 1 {
            return Ok(());
        }
        let plan = ring_plan(
            self.rank,
            self.world,
            output.len(),
            self.cfg.chunk_bytes / 4,
            false,
            true,
            None,
        );
        let r = self.run_plan(ctx, f32_bytes_mut(output), &plan);
        self.finish(&ctx, r)
    }

    fn all_gather_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let ctx = self.begin(Op::AllGatherBytes)?;
        let r = self.gather_bytes(ctx, input, None, 0);
        self.finish(&ctx, r)
    }

    fn reduce_scatter_f32(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<()> {
        let ctx = self.begin(Op::ReduceScatterF32)?;
        let m = output.len();
        if input.len() != m * self.world {
            return Err(CommError::InvalidArgument {
                op: ctx.op.name(),
                detail: format!(
                    "input has {} elements; it needs world × output = {} × {m}",
                    input.len(),
                    self.world
                ),
            });
        }
        if self.world == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        let scale = match op {
            ReduceOp::Sum => None,
            ReduceOp::Mean => Some(1.0 / self.world as f32),
        };
        let mut work = input.to_vec();
        let plan = ring_plan(
            self.rank,
            self.world,
            work.len(),
            self.cfg.chunk_bytes / 4,
            true,
            false,
            scale,
        );
        let r = self.run_plan(ctx, f32_bytes_mut(&mut work), &plan);
        self.finish(&ctx, r)?;
        output.copy_from_slice(&work[self.rank * m..(self.rank + 1) * m]);
        Ok(())
    }

    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        let ctx = self.begin(Op::Broadcast)?;
        self.check_world_op(&ctx, Some(root))?;
        if self.world == 1 {
            return Ok(());
        }
        let plan = broadcast_plan(self.rank, self.world, root, buf.len(), self.cfg.chunk_bytes);
        let r = self.run_plan(ctx, buf, &plan);
        self.finish(&ctx, r)
    }

    fn ring_shift_bytes(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        let ctx = self.begin(Op::RingShift)?;
        let r = self.exchange(ctx, send, recv, None, 0);
        self.finish(&ctx, r)
    }

    fn ring_shift_bytes_sized(
        &mut self,
        send: &[u8],
        recv: &mut Vec<u8>,
        recv_len: usize,
    ) -> Result<()> {
        // The frame header carries the length anyway: checked there, before any payload.
        let ctx = self.begin(Op::RingShift)?;
        let r = self.exchange(ctx, send, recv, Some(recv_len), 0).and_then(|()| {
            // One rank: the message comes back to its sender, unchecked by any header.
            if recv.len() == recv_len {
                Ok(())
            } else {
                Err(crate::shift_len_mismatch(ctx.me, ctx.world, ctx.seq, recv.len(), recv_len))
            }
        });
        self.finish(&ctx, r)
    }

    fn barrier(&mut self) -> Result<()> {
        let ctx = self.begin(Op::Barrier)?;
        let r = self.gather_bytes(ctx, &[], Some(0), 0);
        self.finish(&ctx, r).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A real rank 0 and a hand-driven rank 1 that completes the handshake; returns rank 0's
    /// ring and the fake's two sockets (to rank 0, from rank 0).
    fn with_fake_peer() -> (TcpRing, TcpStream, TcpStream) {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let l0 = DataPlaneListener::bind(ip).unwrap();
        let l1 = TcpListener::bind((ip, 0)).unwrap();
        let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let cfg = TcpRingConfig {
            timeout: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(10),
            session: 7,
            max_message_bytes: 1 << 20,
            ..TcpRingConfig::default()
        };
        let a0 = addrs[0];
        let fake = std::thread::spawn(move || {
            let mut to0 = TcpStream::connect(a0).unwrap();
            to0.write_all(&encode_hello(7, 2, 1)).unwrap();
            let (mut from0, _) = l1.accept().unwrap();
            let mut hello = [0u8; HELLO_LEN];
            from0.read_exact(&mut hello).unwrap();
            check_hello(&hello, 7, 2, 0).unwrap();
            from0.write_all(&[ACK_OK, 0]).unwrap();
            let mut ack = [0u8; 2];
            to0.read_exact(&mut ack).unwrap();
            assert_eq!(ack[0], ACK_OK);
            (to0, from0)
        });
        let ring = TcpRing::connect(l0, 0, &addrs, cfg).unwrap();
        let (to0, from0) = fake.join().unwrap();
        (ring, to0, from0)
    }

    #[test]
    fn huge_length_is_refused_before_allocating() {
        let (mut ring, mut to0, _from0) = with_fake_peer();
        let h = Header {
            magic: FRAME_MAGIC,
            op: Op::AllGatherBytes as u16,
            kind: KIND_DATA,
            seq: 0,
            len: u64::MAX / 2,
            total: 0,
        };
        to0.write_all(&h.encode()).unwrap();
        let e = ring.all_gather_bytes(b"abc").unwrap_err();
        assert!(matches!(e, CommError::Protocol { peer: 1, .. }), "{e}");
        assert!(e.to_string().contains("max_message_bytes"), "{e}");
    }

    #[test]
    fn garbage_frame_is_a_protocol_error() {
        let (mut ring, mut to0, _from0) = with_fake_peer();
        to0.write_all(&[0x5a; 100]).unwrap();
        let e = ring.all_reduce_f32(&mut [1.0; 8], ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, CommError::Protocol { peer: 1, .. }), "{e}");
        assert!(e.to_string().contains("not a Tessera frame"), "{e}");
    }

    #[test]
    fn wrong_seq_is_a_protocol_error() {
        let (mut ring, mut to0, _from0) = with_fake_peer();
        let h = Header {
            magic: FRAME_MAGIC,
            op: Op::Barrier as u16,
            kind: KIND_DATA,
            seq: 5,
            len: 0,
            total: 0,
        };
        to0.write_all(&h.encode()).unwrap();
        let e = ring.barrier().unwrap_err();
        assert!(e.to_string().contains("barrier #5"), "{e}");
    }

    #[test]
    fn abort_frame_names_the_culprit() {
        let (mut ring, mut to0, _from0) = with_fake_peer();
        let info = AbortInfo { code: ABORT_DISCONNECTED, culprit: 1, detail: "gone".into() };
        let ctx = Ctx {
            op: Op::AllReduceF32,
            seq: 0,
            me: 1,
            world: 2,
            next: 0,
            prev: 0,
            timeout: Duration::from_secs(1),
            max_len: 1 << 20,
        };
        ctx.write_abort(&mut to0, &info);
        let e = ring.all_reduce_f32(&mut [1.0; 8], ReduceOp::Sum).unwrap_err();
        assert!(matches!(e, CommError::PeerDisconnected { peer: 1, .. }), "{e}");
    }

    #[test]
    fn frame_header_decoder_round_trips_and_refuses_malformed_bytes() {
        let h = FrameHeader {
            op: Op::RingShift as u16,
            kind: FrameKind::Abort,
            seq: 9,
            len: 17,
            total: u64::MAX,
        };
        let b = h.encode();
        assert_eq!(decode_frame_header(&b), Ok(h));
        // Extra bytes after the header are ignored; fewer than 32 are an error, never a panic.
        let mut long = b.to_vec();
        long.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode_frame_header(&long), Ok(h));
        for n in 0..FRAME_HEADER_LEN {
            assert_eq!(decode_frame_header(&b[..n]), Err(FrameError::Short(n)));
        }
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(decode_frame_header(&bad), Err(FrameError::BadMagic(_))));
        let mut bad = b;
        bad[6..8].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(decode_frame_header(&bad), Err(FrameError::UnknownKind(7)));
        // Abort payload lengths are bounded before anything is allocated.
        for (len, ok) in [(0u64, false), (8, false), (9, true), (4096, true), (4097, false)] {
            let r = FrameHeader { len, ..h }.abort_payload_len();
            assert_eq!(r.is_ok(), ok, "len {len}");
        }
        assert_eq!(
            FrameHeader { len: u64::MAX, ..h }.abort_payload_len(),
            Err(FrameError::AbortLength(u64::MAX))
        );
    }

    #[test]
    fn abort_payload_decoder_checks_length_and_culprit() {
        let info = AbortInfo { code: ABORT_TIMEOUT, culprit: 2, detail: "slow".into() };
        let p = info.encode();
        let a = decode_abort_payload(&p, 3).unwrap();
        assert_eq!((a.code, a.culprit, a.detail.as_str()), (ABORT_TIMEOUT, 2, "slow"));
        assert_eq!(decode_abort_payload(&p, 2), Err(FrameError::AbortCulprit(2)));
        assert_eq!(decode_abort_payload(&p[..8], 3), Err(FrameError::AbortLength(8)));
        let mut huge = p.clone();
        huge.resize(MAX_ABORT_PAYLOAD + 1, b'x');
        assert!(decode_abort_payload(&huge, 3).is_err());
        // A culprit that does not fit a usize on any platform is refused, not truncated.
        let mut far = p.clone();
        far[1..9].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode_abort_payload(&far, 3), Err(FrameError::AbortCulprit(u64::MAX)));
    }

    #[test]
    fn handshake_decoder_names_what_is_wrong() {
        let b = encode_hello(0xabc, 4, 3);
        let h = decode_hello(&b).unwrap();
        assert_eq!(h, Hello { session: 0xabc, world: 4, rank: 3 });
        assert_eq!(h.check(0xabc, 4, 3), Ok(()));
        let e = h.check(0xabd, 4, 3).unwrap_err().to_string();
        assert!(e.contains("session 0xabc") && e.contains("0xabd"), "{e}");
        assert_eq!(h.check(0xabc, 5, 3), Err(HandshakeError::World { found: 4, expected: 5 }));
        assert_eq!(h.check(0xabc, 4, 2), Err(HandshakeError::Rank { found: 3, expected: 2 }));
        assert_eq!(decode_hello(&b[..47]), Err(HandshakeError::Short(47)));
        assert_eq!(decode_hello(&[0x5a; 100]), Err(HandshakeError::BadMagic));
        let mut swapped = b;
        swapped[8..12].reverse();
        assert_eq!(decode_hello(&swapped), Err(HandshakeError::ByteOrder));
        assert_eq!(check_hello(&b, 0xabc, 4, 3), Ok(()));
        assert_eq!(
            check_hello(&b, 1, 4, 3).unwrap_err(),
            h.check(1, 4, 3).unwrap_err().to_string()
        );
    }

    #[test]
    fn plans_cover_every_element_once_per_phase() {
        for world in 1..=5 {
            for len in [0usize, 1, 3, 97, 1000] {
                for slice in [1usize, 7, 4096] {
                    let p = ring_plan(0, world, len, slice, true, true, None);
                    let steps = 2 * (world - 1);
                    let bytes: usize = p.recvs.iter().map(|r| r.len).sum();
                    // Every step moves one chunk; chunks cover the buffer.
                    if world > 1 {
                        assert!(bytes <= steps * len.div_ceil(world) * 4);
                    }
                    assert!(p.sends.iter().all(|s| s.off + s.len <= len * 4));
                    assert!(p.recvs.iter().all(|r| r.off + r.len <= len * 4));
                }
            }
        }
    }
}
