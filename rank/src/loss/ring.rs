//! Tiled contrastive losses on a ring of ranks (ALGORITHMS.md §2 and §3, after Inf-CL):
//! memory per rank O(b·d + tile²), never a `b × B` matrix.
//!
//! # Schedule
//! Every rank keeps its image rows. Text blocks travel the ring: at step `k` rank `r` holds the
//! block of rank `q = (r − k) mod n` and sends it on to `r + 1` while it computes on it (the
//! transfer runs on a helper thread, so it overlaps the tile work). What rides with a block is
//! an accumulator that each rank along the way extends:
//! - CLIP forward: the block's column statistics `(m, z)` (online log-sum-exp);
//! - CLIP backward (with the block's column LSEs `κ`) and SigLIP: the block's `∂L/∂T`.
//!
//! A rank computes its contribution to the accumulator of the block in hand into a fresh
//! buffer and merges the incoming accumulator (which arrives during the compute) afterwards,
//! so receiving overlaps computing too. After the last step one more hop brings each
//! accumulator home to the block's owner.
//!
//! The messages here are host bytes. A device whose communicator moves its own buffers (GPU
//! blocks over NCCL) runs the same schedule on device buffers instead: [`super::ring_device`],
//! through [`ClipBlocks::fwd_round`], [`ClipBlocks::bwd_round`] and [`ClipBlocks::sig_round`];
//! [`Hop`] is the schedule's plan of what each hop moves, shared by both.
//!
//! Blocks travel in chunks of at most [`RingLossOpts::chunk_rows`] rows (about 2 MiB of
//! features by default): round `s` runs the schedule above on chunk `s` of every block, so what
//! is in flight per rank is O(chunk·d) whatever the batch. What a rank holds for the whole
//! call is its own features, `∂L/∂I`, `∂L/∂T` and O(b) statistics; the `_owned` variants
//! write `∂L/∂T` over the text features (a chunk's features are not read after its round of
//! the last pass), one `b × d` buffer less.
//!
//! # Inside a rank
//! Each block is cut into column panels of `tile_cols` columns; for each panel the row tiles
//! (`tile_rows` rows) run in parallel on rayon: one tile GEMM into a per-thread tile buffer,
//! then the fused pass (row/column max and sum-exp, or the gradient tile and its two GEMMs).
//! Logits never exist beyond one tile. The panel is transposed once (`d × tile_cols`) and
//! shared by its row tiles, so the tile GEMM reads it in the layout of its micro-kernel
//! instead of repacking it for every tile; the forward pass reads each tile twice (maxima of
//! rows and columns, then both sums of exponentials). Per-tile partials of column statistics
//! and per-group partials of `∂L/∂T` and of the scalars (a group is a run of consecutive row
//! tiles, at most 32 groups, fixed by the sizes) are merged in a fixed order (row-tile or group
//! order, then panel order, then chunk and ring order), so the result does not depend on the
//! number of threads or on scheduling: every run is bitwise reproducible and the loss is
//! bitwise identical on all ranks.
//!
//! # Cost
//! CLIP: forward 1 GEMM-equivalent (`B×B×d`), backward 3 (recompute, `dI`, `dT`): 4 in all.
//! SigLIP: 3 (forward and backward in one pass).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use tessera_collectives::{CommError, Communicator, ReduceOp};

use crate::device::{CpuDevice, Device, fast_exp};

/// Errors of the ring losses.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    #[error("ring loss: collective failed: {0}")]
    Comm(CommError),
    #[error("ring loss: invalid input: {0}")]
    Invalid(String),
    #[error(
        "ring loss: rank {peer} sent a malformed block message ({detail}); all ranks must run \
         the same Tessera version and call the same loss with the same feature dimension"
    )]
    Protocol { peer: usize, detail: String },
}

// Not `#[from]`: that would make the CommError the source too, and `{:#}` would print it twice.
impl From<CommError> for LossError {
    fn from(e: CommError) -> Self {
        LossError::Comm(e)
    }
}

/// Tiling and threading of the ring losses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingLossOpts {
    /// Rows of image features per tile (the unit of parallel work).
    pub tile_rows: usize,
    /// Columns (text features) per tile / panel.
    pub tile_cols: usize,
    /// Threads for the tile work; 0 = rayon's current pool.
    pub threads: usize,
    /// Rows of a block that travel the ring together (a chunk); 0 = about
    /// [`AUTO_CHUNK_BYTES`] of features, rounded down to whole panels. Blocks longer than a
    /// chunk go round in several rounds, one chunk of every block per round, so the features
    /// and accumulators in flight take O(chunk·d) per rank instead of O(b·d).
    pub chunk_rows: usize,
}

impl Default for RingLossOpts {
    fn default() -> Self {
        RingLossOpts { tile_rows: 256, tile_cols: 256, threads: 0, chunk_rows: 0 }
    }
}

/// Feature bytes per travelling chunk when [`RingLossOpts::chunk_rows`] is 0.
pub const AUTO_CHUNK_BYTES: usize = 2 << 20;

impl RingLossOpts {
    /// The chunk length used for features of dimension `d`.
    pub fn chunk_rows_for(&self, d: usize) -> usize {
        if self.chunk_rows > 0 {
            return self.chunk_rows;
        }
        let rows = AUTO_CHUNK_BYTES / (4 * d.max(1));
        (rows / self.tile_cols.max(1) * self.tile_cols).max(self.tile_cols).max(1)
    }

    /// The chunk length for blocks whose work runs on a GPU ([`ClipBlocks`] there): the set
    /// [`RingLossOpts::chunk_rows`], else whole blocks (one round per pass). The blocks then sit
    /// in device memory, where a rank's block is small beside the GPU, and a chunk much
    /// narrower than the rows starves the deterministic backward: its swapped pass (the
    /// chunk's `∂L/∂T`) has one thread block per 64 rows of the chunk, each walking every row
    /// tile (at 64k rows and 2 MiB chunks of d = 768, 11 thread blocks of 1,024 tiles each).
    pub fn device_chunk_rows(&self) -> usize {
        if self.chunk_rows > 0 { self.chunk_rows } else { usize::MAX }
    }
}

/// The rounds of a chunked ring: chunk `s` of every block travels in round `s`. Every block
/// is cut at multiples of `rows`, so all ranks run the same `rounds` (a block shorter than
/// the longest has empty chunks at the end).
struct Chunks {
    rows: usize,
    rounds: usize,
}

impl Chunks {
    fn new(sizes: &[usize], rows: usize) -> Chunks {
        let rows = rows.max(1);
        let longest = sizes.iter().copied().max().unwrap_or(0);
        Chunks { rows, rounds: longest.div_ceil(rows).max(1) }
    }

    /// First row and length of chunk `s` of a block of `b` rows.
    fn of(&self, b: usize, s: usize) -> (usize, usize) {
        let lo = (s * self.rows).min(b);
        (lo, (b - lo).min(self.rows))
    }

    /// First row and length of chunk `s` of every block.
    fn round(&self, sizes: &[usize], s: usize) -> (Vec<usize>, Vec<usize>) {
        sizes.iter().map(|&b| self.of(b, s)).unzip()
    }
}

/// One rank's result of [`clip_loss_ring`] / [`siglip_loss_ring`].
#[derive(Clone, Debug, PartialEq)]
pub struct RingLossOut {
    /// The GLOBAL loss, bitwise identical on every rank.
    pub loss: f32,
    /// `∂L/∂I_i` for this rank's rows (`b_local × d`).
    pub d_img_local: Vec<f32>,
    /// `∂L/∂T_j` for this rank's rows (`b_local × d`).
    pub d_txt_local: Vec<f32>,
    /// This rank's share of `∂L/∂t` (`t = ln s`): the SUM over ranks is exactly `∂L/∂t`.
    pub d_t_partial: f32,
    /// SigLIP only: this rank's share of `∂L/∂β`; the SUM over ranks is exactly `∂L/∂β`.
    pub d_bias_partial: Option<f32>,
    /// Peak bytes of the buffers this call allocated (features in flight, statistics, tile
    /// partials, tile buffers, outputs) — the quantity bounded by O(b·d + threads·tile²).
    pub workspace_bytes: usize,
}

/// Pool of per-thread tile buffers: a tile task takes one and gives it back, so at most one
/// buffer per concurrently running task ever exists.
#[derive(Default)]
struct TilePool {
    free: Mutex<Vec<Vec<f32>>>,
    created_bytes: AtomicUsize,
}

impl TilePool {
    fn take(&self, len: usize) -> Vec<f32> {
        let got = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut v = got.unwrap_or_default();
        if v.len() < len {
            let before = v.capacity();
            v.resize(len, 0.0);
            self.created_bytes.fetch_add((v.capacity() - before) * 4, Ordering::Relaxed);
        }
        v
    }

    fn give(&self, v: Vec<f32>) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(v);
    }
}

/// Per-row-tile partials of one panel, merged in row-tile order.
#[derive(Default)]
struct Slots {
    /// Column maxima and sums (forward), `tiles × tile_cols`.
    m: Vec<f32>,
    z: Vec<f32>,
    /// Partial `∂L/∂T` of the panel, `groups × tile_cols × d` (at most [`DT_GROUPS`] groups).
    g: Vec<f32>,
    /// Scalars per group of row tiles: `[Σ G·x, loss, Σ G]`.
    s: Vec<[f64; 3]>,
    /// The current text panel transposed (`d × tc`), shared by its row tiles: the tile GEMM
    /// then reads it in the layout its kernel wants instead of repacking it for every tile.
    tp: Vec<f32>,
}

impl Slots {
    fn bytes(&self) -> usize {
        self.m.capacity() * 4
            + self.z.capacity() * 8
            + self.g.capacity() * 4
            + self.s.capacity() * 24
            + self.tp.capacity() * 4
    }
}

/// Reusable state of the ring losses: tiling options, the thread pool and the tile partials.
/// Keep one per rank across steps to avoid reallocating.
pub struct RingLossWorkspace {
    opts: RingLossOpts,
    pool: Option<rayon::ThreadPool>,
    dev: CpuDevice,
    tiles: TilePool,
    slots: Slots,
    progress: Option<LossProgress>,
}

/// Told after every round of chunks: the pass (`forward`, `backward`, SigLIP's `pass`), the
/// rounds done and the rounds in the pass.
pub type LossProgress = Box<dyn FnMut(&'static str, usize, usize) + Send>;

impl std::fmt::Debug for RingLossWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingLossWorkspace").field("opts", &self.opts).finish()
    }
}

impl RingLossWorkspace {
    /// A workspace for `opts`; fails on zero tile sizes or when the thread pool cannot be
    /// built.
    pub fn new(opts: &RingLossOpts) -> Result<Self, LossError> {
        if opts.tile_rows == 0 || opts.tile_cols == 0 {
            return Err(LossError::Invalid(format!(
                "tile_rows = {} and tile_cols = {}: both must be at least 1 (typical: 64..256)",
                opts.tile_rows, opts.tile_cols
            )));
        }
        let pool = if opts.threads > 0 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(opts.threads)
                    .thread_name(|i| format!("tessera-loss-{i}"))
                    .build()
                    .map_err(|e| {
                        LossError::Invalid(format!(
                            "cannot start {} loss threads ({e}); use threads = 0 for the shared \
                             pool",
                            opts.threads
                        ))
                    })?,
            )
        } else {
            None
        };
        Ok(RingLossWorkspace {
            opts: opts.clone(),
            pool,
            dev: CpuDevice::new(1),
            tiles: TilePool::default(),
            slots: Slots::default(),
            progress: None,
        })
    }

    /// Calls `f` after every round of chunks (for long runs: a B = 10⁶ loss takes hours on a
    /// CPU).
    pub fn set_progress(&mut self, f: LossProgress) {
        self.progress = Some(f);
    }

    pub fn opts(&self) -> &RingLossOpts {
        &self.opts
    }

    /// Bytes currently held by the workspace (tile partials and tile buffers).
    pub fn bytes(&self) -> usize {
        self.slots.bytes() + self.tiles.created_bytes.load(Ordering::Relaxed)
    }
}

/// Running online-LSE statistics of one local row, plus its positive logit.
#[derive(Clone, Copy, Debug)]
struct RowAcc {
    m: f32,
    z: f64,
    pos_x: f32,
}

const LANES: usize = 8;

/// Most groups of row tiles whose `∂L/∂T` partials the gradient pass keeps per panel (see
/// `Kern::grad_block`).
const DT_GROUPS: usize = 32;

/// Merges the online-LSE partial `(m2, z2)` into `(m, z)`.
#[inline]
fn merge_stat(m: &mut f32, z: &mut f64, m2: f32, z2: f64) {
    if z2 == 0.0 {
        return;
    }
    if *z == 0.0 {
        *m = m2;
        *z = z2;
        return;
    }
    let mn = m.max(m2);
    *z = *z * fast_exp(*m - mn) as f64 + z2 * fast_exp(m2 - mn) as f64;
    *m = mn;
}

/// What the ranks tell each other before a ring loss: sizes, and whether the local inputs
/// are valid, so that a bad input on one rank fails every rank (instead of leaving the others
/// waiting in the ring until the collective timeout).
struct Setup {
    sizes: Vec<usize>,
    offsets: Vec<usize>,
    big_b: usize,
    /// Global positive column of each local row.
    pos: Vec<usize>,
}

/// Checks the local inputs and agrees with the other ranks on sizes and positives. Every rank
/// returns the same verdict: an error if any rank's input is invalid.
#[allow(clippy::too_many_arguments)]
fn setup(
    comm: &mut dyn Communicator,
    what: &str,
    img: &[f32],
    txt: &[f32],
    b_local: usize,
    d: usize,
    (scale, bias): (f32, f32),
    positives: Option<&[usize]>,
    need_permutation: bool,
) -> Result<Setup, LossError> {
    let local_err = check_inputs(what, img, txt, b_local, d, scale, positives)
        .and_then(|()| {
            if bias.is_finite() {
                Ok(())
            } else {
                Err(format!("{what}: bias {bias} is not finite"))
            }
        })
        .err();
    let (world, r) = (comm.world(), comm.rank());
    let mut mine = Vec::with_capacity(17);
    mine.extend_from_slice(&(b_local as u64).to_le_bytes());
    mine.extend_from_slice(&(d as u64).to_le_bytes());
    mine.push(u8::from(local_err.is_some()) | (u8::from(positives.is_some()) << 1));
    if let Some(e) = &local_err {
        mine.extend_from_slice(e.as_bytes());
    }
    let all = if world == 1 { vec![mine] } else { comm.all_gather_bytes(&mine)? };
    let mut sizes = Vec::with_capacity(world);
    let mut any_positives = false;
    for (peer, v) in all.iter().enumerate() {
        if v.len() < 17 {
            return Err(LossError::Protocol {
                peer,
                detail: format!("size message of {} bytes, expected at least 17", v.len()),
            });
        }
        let b = u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])) as usize;
        let dq = u64::from_le_bytes(v[8..16].try_into().unwrap_or([0; 8])) as usize;
        if v[16] & 1 != 0 {
            return Err(LossError::Invalid(match &local_err {
                Some(e) => e.clone(),
                None => format!("rank {peer} reported: {}", String::from_utf8_lossy(&v[17..])),
            }));
        }
        if dq != d {
            return Err(LossError::Invalid(format!(
                "{what}: rank {r} has feature dimension {d} but rank {peer} has {dq}: all ranks \
                 must call the loss with the same d"
            )));
        }
        any_positives |= v[16] & 2 != 0;
        sizes.push(b);
    }
    let offsets = offsets(&sizes);
    let big_b: usize = sizes.iter().sum();
    let diagonal = || (offsets[r]..offsets[r] + b_local).collect::<Vec<usize>>();
    if !any_positives {
        return Ok(Setup { pos: diagonal(), sizes, offsets, big_b });
    }
    // Some rank gave positives: every rank checks all of them, so all agree on the verdict.
    let pos = positives.map_or_else(diagonal, <[usize]>::to_vec);
    let bytes: Vec<u8> = pos.iter().flat_map(|&j| (j as u64).to_le_bytes()).collect();
    let all = if world == 1 { vec![bytes] } else { comm.all_gather_bytes(&bytes)? };
    let mut seen = vec![false; if need_permutation { big_b } else { 0 }];
    for (peer, v) in all.iter().enumerate() {
        if v.len() != sizes[peer] * 8 {
            return Err(LossError::Protocol {
                peer,
                detail: format!("{} positive-index bytes for {} rows", v.len(), sizes[peer]),
            });
        }
        for (i, c) in v.chunks_exact(8).enumerate() {
            let j = u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize;
            if j >= big_b {
                return Err(LossError::Invalid(format!(
                    "{what}: positive index {j} of rank {peer}'s row {i} is outside the global \
                     batch 0..{big_b}"
                )));
            }
            if need_permutation && std::mem::replace(&mut seen[j], true) {
                return Err(LossError::Invalid(format!(
                    "{what}: column {j} is the positive of two rows (found again at rank \
                     {peer}'s row {i}): the CLIP positives must be a permutation of 0..{big_b}, \
                     every text the positive of exactly one image"
                )));
            }
        }
    }
    Ok(Setup { pos, sizes, offsets, big_b })
}

fn check_inputs(
    what: &str,
    img: &[f32],
    txt: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    positives: Option<&[usize]>,
) -> Result<(), String> {
    if d == 0 {
        return Err(format!("{what}: feature dimension d = 0"));
    }
    if img.len() != b_local * d || txt.len() != b_local * d {
        return Err(format!(
            "{what}: image features have {} values and text features {}, expected b_local × d = \
             {b_local} × {d} each",
            img.len(),
            txt.len()
        ));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(format!(
            "{what}: logit scale {scale} must be finite and positive (scale = exp(t))"
        ));
    }
    if let Some(p) = positives
        && p.len() != b_local
    {
        return Err(format!(
            "{what}: {} positive indices for {b_local} local rows: give one global column \
             index per row",
            p.len()
        ));
    }
    Ok(())
}

fn encode(out: &mut Vec<u8>, feat: &[f32], extra: &[f64], acc: &[f32]) {
    out.clear();
    out.reserve(24 + feat.len() * 4 + extra.len() * 8 + acc.len() * 4);
    for n in [feat.len(), extra.len(), acc.len()] {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for v in feat {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in extra {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in acc {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode(
    buf: &[u8],
    peer: usize,
    feat: &mut Vec<f32>,
    extra: &mut Vec<f64>,
    acc: &mut Vec<f32>,
) -> Result<(), LossError> {
    let bad = |detail: String| LossError::Protocol { peer, detail };
    if buf.len() < 24 {
        return Err(bad(format!("{} bytes, shorter than the 24-byte header", buf.len())));
    }
    let n = |k: usize| u64::from_le_bytes(buf[8 * k..8 * k + 8].try_into().unwrap_or([0; 8]));
    let (nf, ne, na) = (n(0) as usize, n(1) as usize, n(2) as usize);
    let want = nf
        .checked_mul(4)
        .and_then(|a| ne.checked_mul(8).and_then(|b| a.checked_add(b)))
        .and_then(|a| na.checked_mul(4).and_then(|b| a.checked_add(b)))
        .and_then(|a| a.checked_add(24));
    if want != Some(buf.len()) {
        return Err(bad(format!(
            "header announces {nf} features, {ne} statistics, {na} accumulator values but the \
             message has {} bytes",
            buf.len()
        )));
    }
    let mut p = 24;
    feat.clear();
    feat.extend(
        buf[p..p + nf * 4].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    p += nf * 4;
    extra.clear();
    extra.extend(
        buf[p..p + ne * 8]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
    );
    p += ne * 8;
    acc.clear();
    acc.extend(buf[p..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    Ok(())
}

/// What moves on one hop of the ring, in rows: a block's features (and extras) and an
/// accumulator, each out to rank r+1 and in from rank r−1. Every rank derives the same plan
/// from the sizes, so each side of a hop knows the other's lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    /// Rows of the block sent on (that in hand), 0 at the last step.
    pub feat_out: usize,
    /// Rows of the block arriving (the one held next), 0 at the last step.
    pub feat_in: usize,
    /// Rows of the accumulator sent on: that of the block computed at the step before
    /// (block q+1), 0 at step 0.
    pub acc_out: usize,
    /// Rows of the accumulator arriving: block q's, extended by the ranks before, 0 at step 0.
    pub acc_in: usize,
}

impl Hop {
    /// The hop of step `k` on rank `r`, which holds block `q = (r − k) mod n` (`n ≥ 2`).
    pub fn at(sizes: &[usize], r: usize, k: usize) -> Hop {
        let n = sizes.len();
        let q = (r + n - k) % n;
        let last = k + 1 == n;
        Hop {
            feat_out: if last { 0 } else { sizes[q] },
            feat_in: if last { 0 } else { sizes[(q + n - 1) % n] },
            acc_out: if k == 0 { 0 } else { sizes[(q + 1) % n] },
            acc_in: if k == 0 { 0 } else { sizes[q] },
        }
    }

    /// The trip home after the last step: block r+1's accumulator out, this rank's in.
    pub fn home(sizes: &[usize], r: usize) -> Hop {
        let n = sizes.len();
        Hop { feat_out: 0, feat_in: 0, acc_out: sizes[(r + 1) % n], acc_in: sizes[r] }
    }
}

/// One trip of blocks around the ring. `compute(q, feat_q, extra_q, partial)` writes this
/// rank's contribution to block `q`'s accumulator (`acc_per_row · b_q` values) into `partial`;
/// `combine(partial, incoming)` turns it into `incoming ⊕ partial`. `own_extra` holds
/// `extra_per_row` values per row of this rank's block. Returns this rank's own block's final
/// accumulator and the peak bytes of the buffers used here.
///
/// Every message's length follows from `sizes`, so each shift tells the communicator what it
/// expects ([`Communicator::ring_shift_bytes_sized`]): NCCL then moves a message in one round
/// instead of announcing its length first.
#[allow(clippy::too_many_arguments)]
fn ring_drive(
    comm: &mut dyn Communicator,
    sizes: &[usize],
    d: usize,
    own_feat: &[f32],
    (own_extra, extra_per_row): (&[f64], usize),
    acc_per_row: usize,
    combine: fn(&mut [f32], &[f32]),
    mut compute: impl FnMut(usize, &[f32], &[f64], &mut [f32]) -> Result<(), LossError>,
) -> Result<(Vec<f32>, usize), LossError> {
    let n = sizes.len();
    let r = comm.rank();
    let mut cur_feat = own_feat.to_vec();
    let mut cur_extra = own_extra.to_vec();
    let mut next_feat: Vec<f32> = Vec::new();
    let mut next_extra: Vec<f64> = Vec::new();
    let mut done: Vec<f32> = Vec::new();
    let mut partial: Vec<f32> = Vec::new();
    let mut incoming: Vec<f32> = Vec::new();
    let mut send: Vec<u8> = Vec::new();
    let mut recv: Vec<u8> = Vec::new();
    let mut peak = 0usize;
    let prev = (r + n - 1) % n;
    // The encoded length of `hop`'s incoming message: its rows' features and extras and its
    // accumulator's rows (`encode`).
    let msg_len =
        |h: &Hop| 24 + h.feat_in * (d * 4 + extra_per_row * 8) + h.acc_in * acc_per_row * 4;
    for k in 0..n {
        let q = (r + n - k) % n;
        let bq = sizes[q];
        if cur_feat.len() != bq * d {
            return Err(LossError::Protocol {
                peer: prev,
                detail: format!(
                    "block of rank {q} has {} feature values, expected {bq} × {d}",
                    cur_feat.len()
                ),
            });
        }
        partial.clear();
        partial.resize(bq * acc_per_row, 0.0);
        if n == 1 {
            compute(q, &cur_feat, &cur_extra, &mut partial)?;
        } else {
            let h = Hop::at(sizes, r, k);
            let last = k + 1 == n;
            encode(
                &mut send,
                if last { &[] } else { &cur_feat },
                if last { &[] } else { &cur_extra },
                &done,
            );
            let want = msg_len(&h);
            let (shifted, computed) = std::thread::scope(|s| {
                let comm = &mut *comm;
                let send = &send;
                let recv = &mut recv;
                let h = s.spawn(move || comm.ring_shift_bytes_sized(send, recv, want));
                let computed = compute(q, &cur_feat, &cur_extra, &mut partial);
                (h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), computed)
            });
            computed?;
            shifted?;
            decode(&recv, prev, &mut next_feat, &mut next_extra, &mut incoming)?;
            if k > 0 {
                if incoming.len() != partial.len() {
                    return Err(LossError::Protocol {
                        peer: prev,
                        detail: format!(
                            "accumulator of block {q} has {} values, expected {}",
                            incoming.len(),
                            partial.len()
                        ),
                    });
                }
                combine(&mut partial, &incoming);
            }
            std::mem::swap(&mut cur_feat, &mut next_feat);
            std::mem::swap(&mut cur_extra, &mut next_extra);
        }
        std::mem::swap(&mut done, &mut partial);
        peak = peak.max(
            (cur_feat.capacity() + next_feat.capacity()) * 4
                + (cur_extra.capacity() + next_extra.capacity()) * 8
                + (done.capacity() + partial.capacity() + incoming.capacity()) * 4
                + send.capacity()
                + recv.capacity(),
        );
    }
    if n == 1 {
        return Ok((done, peak));
    }
    // The accumulator of block r+1 sits here: one more hop takes it home, and ours arrives.
    encode(&mut send, &[], &[], &done);
    comm.ring_shift_bytes_sized(&send, &mut recv, msg_len(&Hop::home(sizes, r)))?;
    decode(&recv, prev, &mut next_feat, &mut next_extra, &mut incoming)?;
    let want = sizes[r] * acc_per_row;
    if incoming.len() != want || !next_feat.is_empty() {
        return Err(LossError::Protocol {
            peer: prev,
            detail: format!(
                "returning accumulator has {} values, expected {want} for this rank's block",
                incoming.len()
            ),
        });
    }
    Ok((incoming, peak))
}

/// Geometry and shared read-only state of the tile kernels.
struct Kern<'a> {
    dev: &'a CpuDevice,
    tiles: &'a TilePool,
    tr: usize,
    tc: usize,
    d: usize,
    scale: f32,
}

/// Writes the `rows × d` row-major panel `p` transposed into `out` (`d × rows`), in 8 × 8
/// blocks so both sides stay in cache lines.
fn transpose_panel(p: &[f32], rows: usize, d: usize, out: &mut Vec<f32>) {
    const BS: usize = 8;
    out.clear();
    out.resize(rows * d, 0.0);
    for j0 in (0..rows).step_by(BS) {
        let j1 = (j0 + BS).min(rows);
        for k0 in (0..d).step_by(BS) {
            let k1 = (k0 + BS).min(d);
            for j in j0..j1 {
                for k in k0..k1 {
                    out[k * rows + j] = p[j * d + k];
                }
            }
        }
    }
}

impl Kern<'_> {
    /// Sums the per-group `∂L/∂T` partials of a panel (`tc` columns at `c0`) into `out_dt` in
    /// group order, in parallel over columns.
    fn reduce_dt(&self, slots: &[f32], nt: usize, c0: usize, tc: usize, out_dt: &mut [f32]) {
        let d = self.d;
        let stride = self.tc * d;
        const COLS: usize = 16;
        out_dt[c0 * d..(c0 + tc) * d].par_chunks_mut(COLS * d).enumerate().for_each(|(ci, o)| {
            let base = ci * COLS * d;
            for t in 0..nt {
                let s = &slots[t * stride + base..t * stride + base + o.len()];
                for (a, &b) in o.iter_mut().zip(s) {
                    *a += b;
                }
            }
        });
    }

    /// CLIP forward over one block: updates the local rows' statistics and writes the block's
    /// column statistics over the local rows into `out` (`[m; b_q]` then `[z; b_q]`).
    #[allow(clippy::too_many_arguments)]
    fn clip_fwd_block(
        &self,
        img: &[f32],
        rows: &mut [RowAcc],
        pos: &[usize],
        txt: &[f32],
        col0: usize,
        out: &mut [f32],
        sl: &mut Slots,
    ) {
        let (d, tr_max, tc_max) = (self.d, self.tr, self.tc);
        let bq = txt.len() / d;
        let (out_m, out_z) = out.split_at_mut(bq);
        out_m.fill(f32::NEG_INFINITY);
        out_z.fill(0.0);
        let br = rows.len();
        if br == 0 || bq == 0 {
            return;
        }
        let nt = br.div_ceil(tr_max);
        sl.m.resize(nt * tc_max, 0.0);
        sl.z.resize(nt * tc_max, 0.0);
        let mut c0 = 0;
        while c0 < bq {
            let tc = tc_max.min(bq - c0);
            transpose_panel(&txt[c0 * d..(c0 + tc) * d], tc, d, &mut sl.tp);
            let tpt = &sl.tp;
            let gc0 = col0 + c0;
            rows.par_chunks_mut(tr_max)
                .zip(img.par_chunks(tr_max * d))
                .zip(pos.par_chunks(tr_max))
                .zip(sl.m.par_chunks_mut(tc_max))
                .zip(sl.z.par_chunks_mut(tc_max))
                .for_each(|((((racc, it), pt), sm), sz)| {
                    let tr = racc.len();
                    // The tile, then the tile's row maxima.
                    let mut buf = self.tiles.take(tr_max * tc_max + tr_max);
                    let (x, rmax) = buf.split_at_mut(tr * tc);
                    self.dev.gemm(false, false, tr, tc, d, self.scale, it, tpt, 0.0, x);
                    fwd_tile(x, tc, &mut sm[..tc], &mut sz[..tc], racc, pt, gc0, &mut rmax[..tr]);
                    self.tiles.give(buf);
                });
            let (slm, slz) = (&sl.m, &sl.z);
            const COLS: usize = 64;
            out_m[c0..c0 + tc]
                .par_chunks_mut(COLS)
                .zip(out_z[c0..c0 + tc].par_chunks_mut(COLS))
                .enumerate()
                .for_each(|(ci, (om, oz))| {
                    for (k, (m, zf)) in om.iter_mut().zip(oz.iter_mut()).enumerate() {
                        let j = ci * COLS + k;
                        let mut z = *zf as f64;
                        for t in 0..nt {
                            merge_stat(m, &mut z, slm[t * tc_max + j], slz[t * tc_max + j] as f64);
                        }
                        *zf = z as f32;
                    }
                });
            c0 += tc;
        }
    }

    /// The gradient pass over one block: recomputes each tile, turns it into `∂L/∂x` with
    /// `grad_row(x_row, local_row, global_col0, positive_col_in_tile) -> [Σ G·x, loss, Σ G]`,
    /// accumulates `d_img += s·G·T` and writes the block's `∂L/∂T` over the local rows into
    /// `out_dt`. Returns the block's scalar sums.
    #[allow(clippy::too_many_arguments)]
    fn grad_block<F>(
        &self,
        img: &[f32],
        pos: &[usize],
        txt: &[f32],
        col0: usize,
        d_img: &mut [f32],
        out_dt: &mut [f32],
        sl: &mut Slots,
        grad_row: F,
    ) -> [f64; 3]
    where
        F: Fn(&mut [f32], usize, usize, Option<usize>) -> [f64; 3] + Sync,
    {
        let (d, tr_max, tc_max) = (self.d, self.tr, self.tc);
        let bq = txt.len() / d;
        let br = img.len() / d;
        out_dt.fill(0.0);
        let mut total = [0.0f64; 3];
        if br == 0 || bq == 0 {
            return total;
        }
        // Row tiles are dealt to at most DT_GROUPS groups of consecutive tiles, fixed by the
        // sizes alone (not by the thread count): a group runs its tiles in order and
        // accumulates their ∂L/∂T into its own partial, and the partials are summed in group
        // order. Results do not depend on threads, and the partials take DT_GROUPS·tc·d
        // floats, not one per row tile (that would be another b × d buffer).
        let nt = br.div_ceil(tr_max);
        let per_group = nt.div_ceil(DT_GROUPS);
        let groups = nt.div_ceil(per_group);
        sl.g.resize(groups * tc_max * d, 0.0);
        sl.s.resize(groups, [0.0; 3]);
        let rows_per_group = per_group * tr_max;
        let mut c0 = 0;
        while c0 < bq {
            let tc = tc_max.min(bq - c0);
            let tp = &txt[c0 * d..(c0 + tc) * d];
            transpose_panel(tp, tc, d, &mut sl.tp);
            let tpt = &sl.tp;
            let gc0 = col0 + c0;
            d_img
                .par_chunks_mut(rows_per_group * d)
                .zip(img.par_chunks(rows_per_group * d))
                .zip(pos.par_chunks(rows_per_group))
                .zip(sl.g.par_chunks_mut(tc_max * d))
                .zip(sl.s.par_iter_mut())
                .enumerate()
                .for_each(|(gi, ((((dg, ig), pg), gs), ss))| {
                    let mut buf = self.tiles.take(tr_max * tc_max);
                    let mut acc = [0.0f64; 3];
                    let tiles = dg
                        .chunks_mut(tr_max * d)
                        .zip(ig.chunks(tr_max * d))
                        .zip(pg.chunks(tr_max))
                        .enumerate();
                    for (k, ((di, it), pt)) in tiles {
                        let tr = pt.len();
                        let row0 = gi * rows_per_group + k * tr_max;
                        let x = &mut buf[..tr * tc];
                        self.dev.gemm(false, false, tr, tc, d, self.scale, it, tpt, 0.0, x);
                        for (li, xr) in x.chunks_exact_mut(tc).enumerate() {
                            let p = pt[li];
                            let diag = (p >= gc0 && p < gc0 + tc).then(|| p - gc0);
                            let v = grad_row(xr, row0 + li, c0, diag);
                            for j in 0..3 {
                                acc[j] += v[j];
                            }
                        }
                        self.dev.gemm(false, false, tr, d, tc, self.scale, x, tp, 1.0, di);
                        let beta = if k == 0 { 0.0 } else { 1.0 };
                        let g = &mut gs[..tc * d];
                        self.dev.gemm(true, false, tc, d, tr, self.scale, x, it, beta, g);
                    }
                    *ss = acc;
                    self.tiles.give(buf);
                });
            self.reduce_dt(&sl.g, groups, c0, tc, out_dt);
            for s in &sl.s {
                for k in 0..3 {
                    total[k] += s[k];
                }
            }
            c0 += tc;
        }
        total
    }
}

/// Post-GEMM work of one forward tile `x` (`rows × tc`): the tile's column statistics into
/// `(sm, sz)`, the rows' running statistics and positive logits. `rmax` (`rows` values) is
/// scratch for the rows' maxima. Two passes over the tile: the maxima of rows and columns
/// together, then both sums of exponentials together.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fwd_tile_body(
    x: &[f32],
    tc: usize,
    sm: &mut [f32],
    sz: &mut [f32],
    racc: &mut [RowAcc],
    pt: &[usize],
    gc0: usize,
    rmax: &mut [f32],
) {
    sm.fill(f32::NEG_INFINITY);
    sz.fill(0.0);
    for (xr, rm) in x.chunks_exact(tc).zip(rmax.iter_mut()) {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut xs = xr.chunks_exact(LANES);
        let mut ms = sm.chunks_exact_mut(LANES);
        for (c, mc) in (&mut xs).zip(&mut ms) {
            for k in 0..LANES {
                acc[k] = acc[k].max(c[k]);
                mc[k] = mc[k].max(c[k]);
            }
        }
        let rest = xs.remainder();
        for (m, &v) in ms.into_remainder().iter_mut().zip(rest) {
            *m = m.max(v);
        }
        *rm = rest
            .iter()
            .fold(acc.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)), |a, &v| a.max(v));
    }
    for (li, xr) in x.chunks_exact(tc).enumerate() {
        let a = &mut racc[li];
        let mn = a.m.max(rmax[li]);
        // Column sums in f32 per column; the row sum in 8 f32 lanes, then f64 (`Σ exp(x − mn)`).
        let mut acc = [0.0f32; LANES];
        let mut xs = xr.chunks_exact(LANES);
        let mut zs = sz.chunks_exact_mut(LANES);
        let mut ms = sm.chunks_exact(LANES);
        for ((c, zc), mc) in (&mut xs).zip(&mut zs).zip(&mut ms) {
            for k in 0..LANES {
                zc[k] += fast_exp(c[k] - mc[k]);
                acc[k] += fast_exp(c[k] - mn);
            }
        }
        let rest = xs.remainder();
        for ((z, &m), &v) in zs.into_remainder().iter_mut().zip(ms.remainder()).zip(rest) {
            *z += fast_exp(v - m);
        }
        let tail: f64 = rest.iter().map(|&v| fast_exp(v - mn) as f64).sum();
        let row_sum = acc.iter().map(|&v| v as f64).sum::<f64>() + tail;
        let mut z = if a.z != 0.0 { a.z * fast_exp(a.m - mn) as f64 } else { 0.0 };
        z += row_sum;
        a.m = mn;
        a.z = z;
        let p = pt[li];
        if p >= gc0 && p < gc0 + tc {
            a.pos_x = xr[p - gc0];
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fwd_tile_avx2(
    x: &[f32],
    tc: usize,
    sm: &mut [f32],
    sz: &mut [f32],
    racc: &mut [RowAcc],
    pt: &[usize],
    gc0: usize,
    rmax: &mut [f32],
) {
    fwd_tile_body(x, tc, sm, sz, racc, pt, gc0, rmax)
}

/// Whether the AVX2 builds of the element-wise loops may run (same results: no operation is
/// reordered or fused, only vectorised wider).
#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[allow(clippy::too_many_arguments)]
fn fwd_tile(
    x: &[f32],
    tc: usize,
    sm: &mut [f32],
    sz: &mut [f32],
    racc: &mut [RowAcc],
    pt: &[usize],
    gc0: usize,
    rmax: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { fwd_tile_avx2(x, tc, sm, sz, racc, pt, gc0, rmax) };
    }
    fwd_tile_body(x, tc, sm, sz, racc, pt, gc0, rmax)
}

/// CLIP gradient row: overwrites `xr` with `G_ij = (P_ij + Q_ij − 2δ)/(2B)` and returns
/// `[Σ G·x, 0, 0]`.
/// `v` as `hi + lo` in f32 (`hi = v` rounded, `lo` the rest), so `x − v` is formed in f32 as
/// `(x − hi) − lo` with the accuracy of an f64 difference where it matters (small `|x − v|`).
pub(crate) fn split_hi_lo(v: f64) -> (f32, f32) {
    let hi = v as f32;
    (hi, (v - hi as f64) as f32)
}

/// CLIP gradient row: overwrites `xr` with `G_ij = (P_ij + Q_ij − 2δ)/(2B)` and returns
/// `[Σ G·x, 0, 0]`. `lse` is the row's LSE and `(kh, kl)` the columns' LSEs, split by
/// [`split_hi_lo`].
#[inline(always)]
fn clip_grad_row_body(
    xr: &mut [f32],
    lse: (f32, f32),
    kh: &[f32],
    kl: &[f32],
    diag: Option<usize>,
    inv2b: f64,
) -> [f64; 3] {
    let x_diag = diag.map(|j| xr[j] as f64);
    let inv = inv2b as f32;
    let (lh, ll) = lse;
    let g_of = |x: f32, kh: f32, kl: f32| (fast_exp((x - lh) - ll) + fast_exp((x - kh) - kl)) * inv;
    let mut acc = [0.0f32; LANES];
    let mut xs = xr.chunks_exact_mut(LANES);
    let mut hs = kh.chunks_exact(LANES);
    let mut ls = kl.chunks_exact(LANES);
    for ((xc, hc), lc) in (&mut xs).zip(&mut hs).zip(&mut ls) {
        for k in 0..LANES {
            let x = xc[k];
            let g = g_of(x, hc[k], lc[k]);
            acc[k] += g * x;
            xc[k] = g;
        }
    }
    let mut sum = acc.iter().map(|&a| a as f64).sum::<f64>();
    for ((v, &h), &l) in xs.into_remainder().iter_mut().zip(hs.remainder()).zip(ls.remainder()) {
        let x = *v;
        let g = g_of(x, h, l);
        sum += g as f64 * x as f64;
        *v = g;
    }
    if let (Some(j), Some(xd)) = (diag, x_diag) {
        xr[j] = (xr[j] as f64 - 2.0 * inv2b) as f32;
        sum -= 2.0 * inv2b * xd;
    }
    [sum, 0.0, 0.0]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn clip_grad_row_avx2(
    xr: &mut [f32],
    lse: (f32, f32),
    kh: &[f32],
    kl: &[f32],
    diag: Option<usize>,
    inv2b: f64,
) -> [f64; 3] {
    clip_grad_row_body(xr, lse, kh, kl, diag, inv2b)
}

fn clip_grad_row(
    xr: &mut [f32],
    lse: (f32, f32),
    kh: &[f32],
    kl: &[f32],
    diag: Option<usize>,
    inv2b: f64,
) -> [f64; 3] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { clip_grad_row_avx2(xr, lse, kh, kl, diag, inv2b) };
    }
    clip_grad_row_body(xr, lse, kh, kl, diag, inv2b)
}

/// `log(1 + e)` for `e ∈ [0, 1]`: `2·atanh(w)` with `w = e/(2 + e) ≤ 1/3`, odd series to
/// `w¹⁵` (error below 1e-8), so the loop vectorises (no libm call).
#[inline(always)]
fn log1p_small(e: f32) -> f32 {
    let w = e / (2.0 + e);
    let w2 = w * w;
    let p = 2.0 / 13.0 + w2 * (2.0 / 15.0);
    let p = 2.0 / 11.0 + w2 * p;
    let p = 2.0 / 9.0 + w2 * p;
    let p = 2.0 / 7.0 + w2 * p;
    let p = 2.0 / 5.0 + w2 * p;
    let p = 2.0 / 3.0 + w2 * p;
    w * (2.0 + w2 * p)
}

/// SigLIP gradient row: overwrites `xr` with `(σ(x + β) − [positive])/B` and returns
/// `[Σ G·x, Σ −log σ(z(x + β)), Σ G]` (the loss term not yet divided by B).
#[inline(always)]
fn siglip_grad_row_body(xr: &mut [f32], bias: f32, diag: Option<usize>, inv_b: f64) -> [f64; 3] {
    let inv = inv_b as f32;
    let x_diag = diag.map(|j| xr[j]);
    let mut gx = [0.0f32; LANES];
    let mut loss = [0.0f32; LANES];
    let mut gs = [0.0f32; LANES];
    // Every pair as a negative first: −log σ(−u) = softplus(u) = max(u, 0) + log(1 + e^{−|u|}).
    let term = |x: f32| {
        let u = x + bias;
        let e = fast_exp(-u.abs());
        let sig = if u >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        (u.max(0.0) + log1p_small(e), sig * inv)
    };
    let mut xs = xr.chunks_exact_mut(LANES);
    for c in &mut xs {
        for k in 0..LANES {
            let x = c[k];
            let (l, g) = term(x);
            loss[k] += l;
            gx[k] += g * x;
            gs[k] += g;
            c[k] = g;
        }
    }
    let sum = |a: [f32; LANES]| a.iter().map(|&v| v as f64).sum::<f64>();
    let (mut gx, mut loss, mut gs) = (sum(gx), sum(loss), sum(gs));
    for v in xs.into_remainder() {
        let x = *v;
        let (l, g) = term(x);
        loss += l as f64;
        gx += g as f64 * x as f64;
        gs += g as f64;
        *v = g;
    }
    if let (Some(j), Some(x)) = (diag, x_diag) {
        // The positive: softplus(−u) − softplus(u) = −u, and ∂/∂x gains −1/B.
        loss -= (x + bias) as f64;
        xr[j] -= inv;
        gx -= inv_b * x as f64;
        gs -= inv_b;
    }
    [gx, loss, gs]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn siglip_grad_row_avx2(xr: &mut [f32], bias: f32, diag: Option<usize>, inv_b: f64) -> [f64; 3] {
    siglip_grad_row_body(xr, bias, diag, inv_b)
}

pub(super) fn siglip_grad_row(
    xr: &mut [f32],
    bias: f32,
    diag: Option<usize>,
    inv_b: f64,
) -> [f64; 3] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { siglip_grad_row_avx2(xr, bias, diag, inv_b) };
    }
    siglip_grad_row_body(xr, bias, diag, inv_b)
}

pub(crate) fn add_into(partial: &mut [f32], incoming: &[f32]) {
    for (p, &i) in partial.iter_mut().zip(incoming) {
        *p += i;
    }
}

pub(crate) fn merge_into(partial: &mut [f32], incoming: &[f32]) {
    let bq = partial.len() / 2;
    let (pm, pz) = partial.split_at_mut(bq);
    let (im, iz) = incoming.split_at(bq);
    for j in 0..bq {
        let (mut m, mut z) = (im[j], iz[j] as f64);
        merge_stat(&mut m, &mut z, pm[j], pz[j] as f64);
        pm[j] = m;
        pz[j] = z as f32;
    }
}

fn offsets(sizes: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(sizes.len());
    let mut acc = 0;
    for &b in sizes {
        o.push(acc);
        acc += b;
    }
    o
}

fn install<R: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// The symmetric CLIP loss on a ring with default tiling (see [`clip_loss_ring_ws`]).
pub fn clip_loss_ring(
    comm: &mut dyn Communicator,
    img_local: &[f32],
    txt_local: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    opts: &RingLossOpts,
) -> Result<RingLossOut, LossError> {
    let mut ws = RingLossWorkspace::new(opts)?;
    clip_loss_ring_ws(comm, &mut ws, img_local, txt_local, b_local, d, scale, None)
}

/// The symmetric CLIP / InfoNCE loss (ALGORITHMS.md §2) over the global batch spread over the
/// ranks of `comm`, each holding its own `b_local × d` L2-normalised image and text features
/// (`b_local` may differ between ranks; global rows are in rank order). `scale = s = exp(t)`.
/// `positives`: global column index of each local row's positive text (a permutation of
/// `0..B` over all ranks); `None` = the diagonal.
///
/// Collective: every rank must call it with the same `d`. Returns the global loss and this
/// rank's gradients, with `Σ_ranks d_t_partial = ∂L/∂t` exactly.
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_ring_ws(
    comm: &mut dyn Communicator,
    ws: &mut RingLossWorkspace,
    img_local: &[f32],
    txt_local: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let txt = TxtIn::Borrowed(txt_local, Vec::new());
    clip_ring(comm, ws, img_local, txt, b_local, d, scale, positives)
}

/// [`clip_loss_ring_ws`] that consumes the text features and returns `∂L/∂T` in their
/// allocation (`d_txt_local`), written chunk by chunk once a chunk's last use is past: one
/// `b_local × d` buffer less at the peak, for callers that do not need the features after the
/// loss (GradCache replay needs only their gradients). Results are bitwise those of
/// [`clip_loss_ring_ws`]. On an error the features are lost with the buffer.
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_ring_ws_owned(
    comm: &mut dyn Communicator,
    ws: &mut RingLossWorkspace,
    img_local: &[f32],
    txt_local: Vec<f32>,
    b_local: usize,
    d: usize,
    scale: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    clip_ring(comm, ws, img_local, TxtIn::Owned(txt_local), b_local, d, scale, positives)
}

/// The text features of a ring loss and the home of their gradient: a new buffer (borrowed
/// features) or the features' own buffer.
enum TxtIn<'a> {
    Borrowed(&'a [f32], Vec<f32>),
    Owned(Vec<f32>),
}

impl TxtIn<'_> {
    fn feat(&self) -> &[f32] {
        match self {
            TxtIn::Borrowed(f, _) => f,
            TxtIn::Owned(v) => v,
        }
    }

    /// Writes the gradient of rows `lo..lo + rows` (their features are not read again).
    fn put_grad(&mut self, lo: usize, d: usize, g: &[f32]) {
        let dst = match self {
            TxtIn::Borrowed(f, out) => {
                if out.len() != f.len() {
                    *out = vec![0.0; f.len()];
                }
                out
            }
            TxtIn::Owned(v) => v,
        };
        dst[lo * d..lo * d + g.len()].copy_from_slice(g);
    }

    /// Bytes this call allocated for the gradient.
    fn grad_bytes(&self) -> usize {
        match self {
            TxtIn::Borrowed(_, out) => out.capacity() * 4,
            TxtIn::Owned(_) => 0,
        }
    }

    fn into_grad(self) -> Vec<f32> {
        match self {
            TxtIn::Borrowed(f, out) if out.len() != f.len() => vec![0.0; f.len()],
            TxtIn::Borrowed(_, out) => out,
            TxtIn::Owned(v) => v,
        }
    }
}

/// The tile work of the contrastive ring losses on one rank, behind the ring's schedule: the
/// CPU's tiles ([`CpuClipBlocks`]) or a GPU's fused kernels. The rows are this rank's image
/// features, fixed for the call; blocks are chunks of text features visiting on the ring, in
/// the schedule's order. Every implementation must give the same values as the CPU's (up to its
/// arithmetic), and merge in an order fixed by the sizes, so that every rank computes the same
/// loss.
///
/// A call is either CLIP's two passes (`begin`, `fwd_*`, `bwd_*`) or SigLIP's one pass
/// (`sig_begin`, `sig_block`s, then `bwd_end` for `∂L/∂I`).
pub trait ClipBlocks {
    /// Starts a call: this rank's `rows × d` image features, the global column of each row's
    /// positive, the logit scale and the global batch.
    fn begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        scale: f32,
        big_b: usize,
    ) -> Result<(), LossError>;

    /// Forward over one block (`feat`, `nb × d`, whose first row is global column `col0`):
    /// folds it into the rows' running log-sum-exp, picks up the rows' positive logits that lie
    /// in it, and writes the block's column statistics over this rank's rows into `cols`
    /// (`[m; nb]` then `[z; nb]`: max and Σ exp(x − m), f32).
    fn fwd_block(&mut self, feat: &[f32], col0: usize, cols: &mut [f32]) -> Result<(), LossError>;

    /// After every block's forward: each row's LSE ℓ (f64) and the sum of the rows' positive
    /// logits.
    fn fwd_end(&mut self) -> Result<(Vec<f64>, f64), LossError>;

    /// Before the backward: the rows' LSEs as [`ClipBlocks::fwd_end`] returned them.
    fn bwd_begin(&mut self, lse: &[f64]) -> Result<(), LossError>;

    /// Backward over one block with its columns' LSEs `kap`: adds `s·G·T` to the rows'
    /// `∂L/∂I`, writes the block's `∂L/∂T` over this rank's rows into `d_feat` (`nb × d`,
    /// overwritten) and returns `Σ G∘X` over the block (its share of `∂L/∂t`).
    fn bwd_block(
        &mut self,
        feat: &[f32],
        kap: &[f64],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<f64, LossError>;

    /// After every block's backward: `∂L/∂I` of the rows (`rows × d`).
    fn bwd_end(&mut self) -> Result<Vec<f32>, LossError>;

    /// Host bytes this implementation holds for the call (for `workspace_bytes`).
    fn held_bytes(&self) -> usize;

    /// One forward round of the ring: this rank's chunk `own` (`lens[r] × d`) and the other
    /// ranks' chunks (`lens[q] × d`, first row at global column `col0[q]`) each visit every
    /// rank once. Returns this rank's chunk's column statistics over every rank's rows
    /// (`[m; lens[r]]` then `[z; lens[r]]`) and the peak bytes of the round's buffers.
    ///
    /// The default moves host messages through `comm` ([`host_fwd_round`]). A device whose
    /// communicator moves the device's own buffers overrides it ([`super::ring_device`]).
    fn fwd_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
    ) -> Result<(Vec<f32>, usize), LossError> {
        host_fwd_round(self, comm, lens, col0, d, own)
    }

    /// One backward round, as [`ClipBlocks::fwd_round`], with this rank's chunk's column LSEs
    /// `kap` riding along. Returns this rank's chunk's `∂L/∂T` (`lens[r] × d`), this rank's
    /// share of `∂L/∂t` over the round's blocks, and the peak bytes of the round's buffers.
    fn bwd_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
        kap: &[f64],
    ) -> Result<(Vec<f32>, f64, usize), LossError> {
        host_bwd_round(self, comm, lens, col0, d, own, kap)
    }

    /// Starts a SigLIP call, as [`ClipBlocks::begin`] with the logit bias `bias`; `∂L/∂I`
    /// starts from zero.
    #[allow(clippy::too_many_arguments)]
    fn sig_begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        scale: f32,
        bias: f32,
        big_b: usize,
    ) -> Result<(), LossError>;

    /// SigLIP over one block (`feat`, `nb × d`, first row at global column `col0`): adds
    /// `s·G·T` to the rows' `∂L/∂I`, writes the block's `∂L/∂T` over this rank's rows into
    /// `d_feat` (`nb × d`, overwritten) and returns `[Σ G∘X, Σ −log σ(z(x + β)), Σ G]` over the
    /// block (its shares of `∂L/∂t`, of `B·L` and of `∂L/∂β`).
    fn sig_block(
        &mut self,
        feat: &[f32],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<[f64; 3], LossError>;

    /// One SigLIP round, as [`ClipBlocks::bwd_round`] without riders: adds the round's blocks'
    /// sums into `sums` in block order and returns this rank's chunk's `∂L/∂T` and the peak
    /// bytes of the round's buffers.
    fn sig_round(
        &mut self,
        comm: &mut dyn Communicator,
        lens: &[usize],
        col0: &[usize],
        d: usize,
        own: &[f32],
        sums: &mut [f64; 3],
    ) -> Result<(Vec<f32>, usize), LossError> {
        host_sig_round(self, comm, lens, col0, d, own, sums)
    }
}

/// [`ClipBlocks::fwd_round`] with host messages: `ring_drive` through `comm`.
pub fn host_fwd_round<K: ClipBlocks + ?Sized>(
    ops: &mut K,
    comm: &mut dyn Communicator,
    lens: &[usize],
    col0: &[usize],
    d: usize,
    own: &[f32],
) -> Result<(Vec<f32>, usize), LossError> {
    ring_drive(comm, lens, d, own, (&[], 0), 2, merge_into, |q, feat, _extra, partial| {
        ops.fwd_block(feat, col0[q], partial)
    })
}

/// [`ClipBlocks::bwd_round`] with host messages: `ring_drive` through `comm`.
pub fn host_bwd_round<K: ClipBlocks + ?Sized>(
    ops: &mut K,
    comm: &mut dyn Communicator,
    lens: &[usize],
    col0: &[usize],
    d: usize,
    own: &[f32],
    kap: &[f64],
) -> Result<(Vec<f32>, f64, usize), LossError> {
    let mut d_t = 0.0f64;
    let (d_chunk, peak) =
        ring_drive(comm, lens, d, own, (kap, 1), d, add_into, |q, feat, extra, partial| {
            d_t += ops.bwd_block(feat, extra, col0[q], partial)?;
            Ok(())
        })?;
    Ok((d_chunk, d_t, peak))
}

/// [`ClipBlocks::sig_round`] with host messages: `ring_drive` through `comm`.
pub fn host_sig_round<K: ClipBlocks + ?Sized>(
    ops: &mut K,
    comm: &mut dyn Communicator,
    lens: &[usize],
    col0: &[usize],
    d: usize,
    own: &[f32],
    sums: &mut [f64; 3],
) -> Result<(Vec<f32>, usize), LossError> {
    ring_drive(comm, lens, d, own, (&[], 0), d, add_into, |q, feat, _extra, partial| {
        let s = ops.sig_block(feat, col0[q], partial)?;
        for k in 0..3 {
            sums[k] += s[k];
        }
        Ok(())
    })
}

/// [`ClipBlocks`] on the CPU: rayon over row tiles, the tile GEMM and fused passes of [`Kern`].
struct CpuClipBlocks<'a> {
    kn: Kern<'a>,
    pool: &'a Option<rayon::ThreadPool>,
    slots: &'a mut Slots,
    img: &'a [f32],
    pos: Vec<usize>,
    rows: Vec<RowAcc>,
    lse_hl: Vec<(f32, f32)>,
    kap_hl: (Vec<f32>, Vec<f32>),
    inv2b: f64,
    d_img: Vec<f32>,
    /// SigLIP: the logit bias and 1/B.
    bias: f32,
    inv_b: f64,
}

impl<'a> CpuClipBlocks<'a> {
    fn new(
        ws: &'a mut RingLossWorkspace,
        img: &'a [f32],
        d: usize,
        scale: f32,
    ) -> (Self, usize, Option<&'a mut LossProgress>) {
        let RingLossWorkspace { opts, pool, dev, tiles, slots, progress } = ws;
        let chunk_rows = opts.chunk_rows_for(d);
        let ops = CpuClipBlocks {
            kn: Kern { dev, tiles, tr: opts.tile_rows, tc: opts.tile_cols, d, scale },
            pool,
            slots,
            img,
            pos: Vec::new(),
            rows: Vec::new(),
            lse_hl: Vec::new(),
            kap_hl: (Vec::new(), Vec::new()),
            inv2b: 0.0,
            d_img: Vec::new(),
            bias: 0.0,
            inv_b: 0.0,
        };
        (ops, chunk_rows, progress.as_mut())
    }

    /// Bytes of the tile buffers and slots (beyond `held_bytes`).
    fn scratch_bytes(&self) -> usize {
        self.slots.bytes() + self.kn.tiles.created_bytes.load(Ordering::Relaxed)
    }
}

impl ClipBlocks for CpuClipBlocks<'_> {
    fn begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        d: usize,
        _scale: f32,
        big_b: usize,
    ) -> Result<(), LossError> {
        debug_assert!(std::ptr::eq(img, self.img), "CpuClipBlocks is built on the call's rows");
        let rows = img.len() / d;
        self.pos = pos;
        self.rows = vec![RowAcc { m: f32::NEG_INFINITY, z: 0.0, pos_x: f32::NAN }; rows];
        self.inv2b = 1.0 / (2.0 * big_b as f64);
        Ok(())
    }

    fn fwd_block(&mut self, feat: &[f32], col0: usize, cols: &mut [f32]) -> Result<(), LossError> {
        let Self { kn, pool, slots, img, pos, rows, .. } = self;
        install(pool, || kn.clip_fwd_block(img, rows, pos, feat, col0, cols, slots));
        Ok(())
    }

    fn fwd_end(&mut self) -> Result<(Vec<f64>, f64), LossError> {
        let lse: Vec<f64> = self.rows.iter().map(|a| a.m as f64 + a.z.ln()).collect();
        let pos_sum: f64 = self.rows.iter().map(|a| a.pos_x as f64).sum();
        Ok((lse, pos_sum))
    }

    fn bwd_begin(&mut self, lse: &[f64]) -> Result<(), LossError> {
        // The rows' LSEs split for the gradient rows; ∂L/∂I from zero.
        self.lse_hl = lse.iter().map(|&v| split_hi_lo(v)).collect();
        self.d_img = vec![0.0; self.img.len()];
        Ok(())
    }

    fn bwd_block(
        &mut self,
        feat: &[f32],
        kap: &[f64],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<f64, LossError> {
        let Self { kn, pool, slots, img, pos, lse_hl, kap_hl, inv2b, d_img, .. } = self;
        kap_hl.0.clear();
        kap_hl.1.clear();
        for &k in kap {
            let (h, l) = split_hi_lo(k);
            kap_hl.0.push(h);
            kap_hl.1.push(l);
        }
        let (kh, kl) = (&kap_hl.0, &kap_hl.1);
        let (lse_hl, inv2b) = (&*lse_hl, *inv2b);
        let s = install(pool, || {
            kn.grad_block(img, pos, feat, col0, d_img, d_feat, slots, |xr, li, c0, diag| {
                let cols = c0..c0 + xr.len();
                clip_grad_row(xr, lse_hl[li], &kh[cols.clone()], &kl[cols], diag, inv2b)
            })
        });
        Ok(s[0])
    }

    fn bwd_end(&mut self) -> Result<Vec<f32>, LossError> {
        Ok(std::mem::take(&mut self.d_img))
    }

    fn held_bytes(&self) -> usize {
        self.rows.capacity() * std::mem::size_of::<RowAcc>()
            + self.lse_hl.capacity() * 8
            + (self.kap_hl.0.capacity() + self.kap_hl.1.capacity()) * 4
            + self.d_img.capacity() * 4
            + self.pos.capacity() * 8
    }

    fn sig_begin(
        &mut self,
        img: &[f32],
        pos: Vec<usize>,
        _d: usize,
        _scale: f32,
        bias: f32,
        big_b: usize,
    ) -> Result<(), LossError> {
        debug_assert!(std::ptr::eq(img, self.img), "CpuClipBlocks is built on the call's rows");
        self.pos = pos;
        self.bias = bias;
        self.inv_b = 1.0 / big_b as f64;
        self.d_img = vec![0.0; img.len()];
        Ok(())
    }

    fn sig_block(
        &mut self,
        feat: &[f32],
        col0: usize,
        d_feat: &mut [f32],
    ) -> Result<[f64; 3], LossError> {
        let Self { kn, pool, slots, img, pos, d_img, bias, inv_b, .. } = self;
        let (bias, inv_b) = (*bias, *inv_b);
        Ok(install(pool, || {
            kn.grad_block(img, pos, feat, col0, d_img, d_feat, slots, |xr, _li, _c0, diag| {
                siglip_grad_row(xr, bias, diag, inv_b)
            })
        }))
    }
}

/// Runs `f` with the CPU's tile work for rows `img` and the chunk rows of `ws`'s options (tests
/// that wrap the CPU blocks).
#[cfg(test)]
pub(crate) fn with_cpu_blocks<R>(
    ws: &mut RingLossWorkspace,
    img: &[f32],
    d: usize,
    scale: f32,
    f: impl FnOnce(&mut dyn ClipBlocks, usize) -> R,
) -> R {
    let (mut ops, chunk_rows, _) = CpuClipBlocks::new(ws, img, d, scale);
    f(&mut ops, chunk_rows)
}

#[allow(clippy::too_many_arguments)]
fn clip_ring(
    comm: &mut dyn Communicator,
    ws: &mut RingLossWorkspace,
    img_local: &[f32],
    txt: TxtIn<'_>,
    b_local: usize,
    d: usize,
    scale: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let (mut ops, chunk_rows, progress) = CpuClipBlocks::new(ws, img_local, d, scale);
    let mut out = clip_ring_with(
        comm, &mut ops, chunk_rows, progress, img_local, txt, b_local, d, scale, positives,
    )?;
    out.workspace_bytes += ops.scratch_bytes();
    Ok(out)
}

/// The symmetric CLIP loss on the ring with the tile work of `ops` (see [`clip_loss_ring_ws`]
/// for the contract; `chunk_rows`: rows of a block that travel together). Collective.
#[allow(clippy::too_many_arguments)]
pub fn clip_loss_ring_with<K: ClipBlocks + ?Sized>(
    comm: &mut dyn Communicator,
    ops: &mut K,
    chunk_rows: usize,
    progress: Option<&mut LossProgress>,
    img_local: &[f32],
    txt_local: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let txt = TxtIn::Borrowed(txt_local, Vec::new());
    clip_ring_with(comm, ops, chunk_rows, progress, img_local, txt, b_local, d, scale, positives)
}

#[allow(clippy::too_many_arguments)]
fn clip_ring_with<K: ClipBlocks + ?Sized>(
    comm: &mut dyn Communicator,
    ops: &mut K,
    chunk_rows: usize,
    mut progress: Option<&mut LossProgress>,
    img_local: &[f32],
    mut txt: TxtIn<'_>,
    b_local: usize,
    d: usize,
    scale: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let Setup { sizes, offsets: offs, big_b, pos } = setup(
        comm,
        "clip_loss_ring",
        img_local,
        txt.feat(),
        b_local,
        d,
        (scale, 0.0),
        positives,
        true,
    )?;
    if big_b == 0 {
        return Ok(RingLossOut {
            loss: 0.0,
            d_img_local: Vec::new(),
            d_txt_local: Vec::new(),
            d_t_partial: 0.0,
            d_bias_partial: None,
            workspace_bytes: 0,
        });
    }
    let ch = Chunks::new(&sizes, chunk_rows);
    ops.begin(img_local, pos, d, scale, big_b)?;

    // Forward: row statistics stay here, column statistics travel with their chunk.
    let mut own_cols = vec![0.0f32; 2 * b_local];
    let mut peak_fwd = 0;
    for s in 0..ch.rounds {
        let (starts, lens) = ch.round(&sizes, s);
        let (lo, n) = ch.of(b_local, s);
        let own = &txt.feat()[lo * d..(lo + n) * d];
        let col0: Vec<usize> = offs.iter().zip(&starts).map(|(o, s)| o + s).collect();
        let (cols, peak) = ops.fwd_round(comm, &lens, &col0, d, own)?;
        if cols.len() != 2 * n {
            return Err(LossError::Invalid(format!(
                "the forward round returned {} column statistics for a chunk of {n} rows",
                cols.len()
            )));
        }
        own_cols[lo..lo + n].copy_from_slice(&cols[..n]);
        own_cols[b_local + lo..b_local + lo + n].copy_from_slice(&cols[n..]);
        peak_fwd = peak_fwd.max(peak);
        if let Some(p) = progress.as_mut() {
            p("forward", s + 1, ch.rounds);
        }
    }
    let (lse, pos_sum) = ops.fwd_end()?;
    let (cm, cz) = own_cols.split_at(b_local);
    let kap: Vec<f64> = cm.iter().zip(cz).map(|(&m, &z)| m as f64 + (z as f64).ln()).collect();
    let mut loss_part = [lse.iter().sum::<f64>() + kap.iter().sum::<f64>() - 2.0 * pos_sum];

    // Backward: dT accumulators travel with their chunk and its column LSEs.
    let inv2b = 1.0 / (2.0 * big_b as f64);
    ops.bwd_begin(&lse)?;
    let mut d_t = 0.0f64;
    let mut peak_bwd = 0;
    for s in 0..ch.rounds {
        let (starts, lens) = ch.round(&sizes, s);
        let (lo, n) = ch.of(b_local, s);
        let own = &txt.feat()[lo * d..(lo + n) * d];
        let col0: Vec<usize> = offs.iter().zip(&starts).map(|(o, s)| o + s).collect();
        let (d_chunk, dt_round, peak) =
            ops.bwd_round(comm, &lens, &col0, d, own, &kap[lo..lo + n])?;
        if d_chunk.len() != n * d {
            return Err(LossError::Invalid(format!(
                "the backward round returned {} gradient values for a chunk of {n} × {d}",
                d_chunk.len()
            )));
        }
        d_t += dt_round;
        // This rank's chunk s has made its last trip: its gradient may take its place.
        txt.put_grad(lo, d, &d_chunk);
        peak_bwd = peak_bwd.max(peak);
        if let Some(p) = progress.as_mut() {
            p("backward", s + 1, ch.rounds);
        }
    }
    let d_img = ops.bwd_end()?;
    if comm.world() > 1 {
        comm.all_reduce_f64(&mut loss_part, ReduceOp::Sum)?;
    }
    let held = ops.held_bytes()
        + (lse.capacity() + kap.capacity()) * 8
        + (own_cols.capacity() + d_img.capacity()) * 4
        + txt.grad_bytes();
    Ok(RingLossOut {
        loss: (loss_part[0] * inv2b) as f32,
        d_img_local: d_img,
        d_txt_local: txt.into_grad(),
        d_t_partial: d_t as f32,
        d_bias_partial: None,
        workspace_bytes: held + peak_fwd.max(peak_bwd),
    })
}

/// The SigLIP loss with default tiling (see [`siglip_loss_ring_ws`]).
#[allow(clippy::too_many_arguments)]
pub fn siglip_loss_ring(
    comm: &mut dyn Communicator,
    img_local: &[f32],
    txt_local: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    bias: f32,
    opts: &RingLossOpts,
) -> Result<RingLossOut, LossError> {
    let mut ws = RingLossWorkspace::new(opts)?;
    siglip_loss_ring_ws(comm, &mut ws, img_local, txt_local, b_local, d, scale, bias, None)
}

/// The pairwise sigmoid loss (ALGORITHMS.md §3)
/// `L = −(1/B)·Σ_ij log σ(z_ij·(s·⟨I_i, T_j⟩ + β))` over the global batch on a ring, one
/// pass (forward and backward together). `positives`: global column index of each local row's
/// positive (`None` = the diagonal). Returns this rank's gradients with
/// `Σ_ranks d_t_partial = ∂L/∂t` and `Σ_ranks d_bias_partial = ∂L/∂β` exactly.
#[allow(clippy::too_many_arguments)]
pub fn siglip_loss_ring_ws(
    comm: &mut dyn Communicator,
    ws: &mut RingLossWorkspace,
    img_local: &[f32],
    txt_local: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    bias: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let txt = TxtIn::Borrowed(txt_local, Vec::new());
    siglip_ring(comm, ws, img_local, txt, b_local, d, (scale, bias), positives)
}

/// [`siglip_loss_ring_ws`] that consumes the text features and returns `∂L/∂T` in their
/// allocation (see [`clip_loss_ring_ws_owned`]).
#[allow(clippy::too_many_arguments)]
pub fn siglip_loss_ring_ws_owned(
    comm: &mut dyn Communicator,
    ws: &mut RingLossWorkspace,
    img_local: &[f32],
    txt_local: Vec<f32>,
    b_local: usize,
    d: usize,
    scale: f32,
    bias: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let txt = TxtIn::Owned(txt_local);
    siglip_ring(comm, ws, img_local, txt, b_local, d, (scale, bias), positives)
}

#[allow(clippy::too_many_arguments)]
fn siglip_ring(
    comm: &mut dyn Communicator,
    ws: &mut RingLossWorkspace,
    img_local: &[f32],
    txt: TxtIn<'_>,
    b_local: usize,
    d: usize,
    (scale, bias): (f32, f32),
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let (mut ops, chunk_rows, progress) = CpuClipBlocks::new(ws, img_local, d, scale);
    let mut out = siglip_ring_with(
        comm,
        &mut ops,
        chunk_rows,
        progress,
        img_local,
        txt,
        b_local,
        d,
        (scale, bias),
        positives,
    )?;
    out.workspace_bytes += ops.scratch_bytes();
    Ok(out)
}

/// The SigLIP loss on the ring with the tile work of `ops` (see [`siglip_loss_ring_ws`] for
/// the contract; `chunk_rows`: rows of a block that travel together). Collective.
#[allow(clippy::too_many_arguments)]
pub fn siglip_loss_ring_with<K: ClipBlocks + ?Sized>(
    comm: &mut dyn Communicator,
    ops: &mut K,
    chunk_rows: usize,
    progress: Option<&mut LossProgress>,
    img_local: &[f32],
    txt_local: &[f32],
    b_local: usize,
    d: usize,
    scale: f32,
    bias: f32,
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let txt = TxtIn::Borrowed(txt_local, Vec::new());
    siglip_ring_with(
        comm,
        ops,
        chunk_rows,
        progress,
        img_local,
        txt,
        b_local,
        d,
        (scale, bias),
        positives,
    )
}

#[allow(clippy::too_many_arguments)]
fn siglip_ring_with<K: ClipBlocks + ?Sized>(
    comm: &mut dyn Communicator,
    ops: &mut K,
    chunk_rows: usize,
    mut progress: Option<&mut LossProgress>,
    img_local: &[f32],
    mut txt: TxtIn<'_>,
    b_local: usize,
    d: usize,
    (scale, bias): (f32, f32),
    positives: Option<&[usize]>,
) -> Result<RingLossOut, LossError> {
    let Setup { sizes, offsets: offs, big_b, pos } = setup(
        comm,
        "siglip_loss_ring",
        img_local,
        txt.feat(),
        b_local,
        d,
        (scale, bias),
        positives,
        false,
    )?;
    if big_b == 0 {
        return Ok(RingLossOut {
            loss: 0.0,
            d_img_local: Vec::new(),
            d_txt_local: Vec::new(),
            d_t_partial: 0.0,
            d_bias_partial: Some(0.0),
            workspace_bytes: 0,
        });
    }
    let ch = Chunks::new(&sizes, chunk_rows);
    let inv_b = 1.0 / big_b as f64;
    ops.sig_begin(img_local, pos, d, scale, bias, big_b)?;
    let mut sums = [0.0f64; 3];
    let mut peak = 0;
    for s in 0..ch.rounds {
        let (starts, lens) = ch.round(&sizes, s);
        let (lo, n) = ch.of(b_local, s);
        let own = &txt.feat()[lo * d..(lo + n) * d];
        let col0: Vec<usize> = offs.iter().zip(&starts).map(|(o, s)| o + s).collect();
        let (d_chunk, p) = ops.sig_round(comm, &lens, &col0, d, own, &mut sums)?;
        if d_chunk.len() != n * d {
            return Err(LossError::Invalid(format!(
                "the SigLIP round returned {} gradient values for a chunk of {n} × {d}",
                d_chunk.len()
            )));
        }
        txt.put_grad(lo, d, &d_chunk);
        peak = peak.max(p);
        if let Some(p) = progress.as_mut() {
            p("pass", s + 1, ch.rounds);
        }
    }
    let d_img = ops.bwd_end()?;
    let mut loss_part = [sums[1]];
    if comm.world() > 1 {
        comm.all_reduce_f64(&mut loss_part, ReduceOp::Sum)?;
    }
    let held = ops.held_bytes() + txt.grad_bytes();
    Ok(RingLossOut {
        loss: (loss_part[0] * inv_b) as f32,
        d_img_local: d_img,
        d_txt_local: txt.into_grad(),
        d_t_partial: sums[0] as f32,
        d_bias_partial: Some(sums[2] as f32),
        workspace_bytes: held + peak,
    })
}

/// Naive one-process f64 SigLIP reference: `(L, ∂L/∂I, ∂L/∂T, ∂L/∂t, ∂L/∂β)`, positives on
/// the diagonal.
pub fn siglip_loss_reference_f64(
    img: &[f64],
    txt: &[f64],
    big_b: usize,
    d: usize,
    scale: f64,
    bias: f64,
) -> (f64, Vec<f64>, Vec<f64>, f64, f64) {
    let n = big_b;
    let mut loss = 0.0;
    let mut di = vec![0.0; n * d];
    let mut dtf = vec![0.0; n * d];
    let (mut dt, mut db) = (0.0, 0.0);
    for i in 0..n {
        for j in 0..n {
            let x = scale * (0..d).map(|k| img[i * d + k] * txt[j * d + k]).sum::<f64>();
            let u = x + bias;
            let z = if i == j { 1.0 } else { -1.0 };
            // −log σ(z·u) = log(1 + exp(−z·u)), stably.
            let y = -z * u;
            loss += y.max(0.0) + (-y.abs()).exp().ln_1p();
            let sig = 1.0 / (1.0 + (-u).exp());
            let g = (sig - if i == j { 1.0 } else { 0.0 }) / n as f64;
            dt += g * x;
            db += g;
            for k in 0..d {
                di[i * d + k] += scale * g * txt[j * d + k];
                dtf[j * d + k] += scale * g * img[i * d + k];
            }
        }
    }
    (loss / n as f64, di, dtf, dt, db)
}
