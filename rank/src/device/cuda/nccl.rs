//! [`NcclComm`]: a [`Communicator`] on NCCL (cudarc's `nccl::result`/`nccl::sys` level), with a
//! watchdog.
//!
//! - **Set-up.** Rank 0 creates an id ([`unique_id`], 128 bytes) and hands it to every rank
//!   (in Tessera through the coordinator's key/value store: [`NcclComm::init_via_store`] with
//!   [`nccl_id_key`]); every rank then calls [`NcclComm::init`] with the same id. The
//!   communicator is created non-blocking (`ncclConfig_t::blocking = 0`) and its readiness is
//!   polled with `ncclCommGetAsyncError` until [`NcclOpts::init_timeout`]; on timeout or error
//!   it is aborted and `init` returns a [`CudaError`] that says what to check.
//! - **Streams.** Every NCCL call runs on a stream of its own ([`NcclComm::stream`]), separate
//!   from the compute stream; device-buffer calls first make it wait for the work queued so far
//!   on the caller's stream.
//! - **Host slices** (the [`Communicator`] API) go through pinned host memory and two device
//!   buffers that are kept and grown (to the next power of two) across calls, never allocated
//!   per call.
//! - **Watchdog.** Every wait polls `ncclCommGetAsyncError` and a CUDA event recorded after the
//!   work, until [`NcclOpts::timeout`]. On an NCCL error, a CUDA error or the timeout the
//!   communicator is aborted (`ncclCommAbort`) and marked broken; the call and every later call
//!   return [`CommError::Poisoned`] naming NCCL, the operation, its sequence number and what to
//!   check. Nothing waits without a deadline and nothing panics.
//! - **Drop** finalizes and destroys the communicator (aborting it when finalizing fails or
//!   after an error).
//!
//! Reductions: [`ReduceOp::Sum`] is `ncclSum`, [`ReduceOp::Mean`] is `ncclAvg`. NCCL gives every
//! rank the same result; its summation order is NCCL's (it depends on the algorithm NCCL picks
//! for the size), so [`Communicator::all_reduce_f32_part`] (the trait's default: the part on its
//! own) matches one whole-buffer all-reduce bitwise only at world size ≤ 2.
//!
//! Ranks that call collectives in different orders or with different sizes make NCCL hang or
//! fail; the watchdog turns that into an error after the timeout (NCCL cannot detect it
//! earlier).
//!
//! [`bench_local`] measures all-reduce bus bandwidth through raw NCCL calls and through this
//! communicator in the same run (`tessera cuda nccl-bench`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::driver::{PinnedHostSlice, result as dr, sys as ds};
use cudarc::nccl::{result as nr, sys as ns};
use tessera_collectives::{CommError, Communicator, ReduceOp, Result};

use super::CudaError;
use super::gpu::{f32_bytes, managed_range};
use super::libs::{Lib, require};
use crate::overlap::BucketPlan;

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// `NCCL_VERSION(2, 30, 0)`: the `ncclConfig_t` layout cudarc's bindings describe.
const CONFIG_HEADER_VERSION: i32 = 23000;
/// `NCCL_CONFIG_UNDEF_INT`: "let NCCL choose".
const UNDEF_INT: i32 = i32::MIN;
/// `ncclConfig_t::magic` as set by `NCCL_CONFIG_INITIALIZER`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;

/// What to check when NCCL fails or stalls.
const FIX: &str = "check that every rank calls the same collectives in the same order with the \
                   same sizes and that no rank died (its log says why); rerun with NCCL_DEBUG=WARN \
                   (or INFO) for NCCL's own message; raise NcclOpts::timeout only if a collective \
                   legitimately takes longer";

/// Settings of an [`NcclComm`].
#[derive(Clone, Debug)]
pub struct NcclOpts {
    /// Longest wait for one collective (enqueueing and completion) before the communicator is
    /// aborted; the TCP collectives' default (`TcpRingConfig::timeout`, 600 s).
    pub timeout: Duration,
    /// Longest wait for every rank to join in [`NcclComm::init`] (60 s, as the TCP ring's
    /// `setup_timeout`); also the wait for the id in [`NcclComm::init_via_store`].
    pub init_timeout: Duration,
    /// Largest message of `all_gather_bytes` / `ring_shift_bytes` accepted from a peer.
    pub max_message_bytes: usize,
}

impl Default for NcclOpts {
    fn default() -> Self {
        NcclOpts {
            timeout: Duration::from_secs(600),
            init_timeout: Duration::from_secs(60),
            max_message_bytes: 1 << 30,
        }
    }
}

/// The store key under which rank 0 publishes the NCCL id of job generation `generation`.
pub fn nccl_id_key(generation: u64) -> String {
    format!("tessera/nccl-id/{generation}")
}

/// NCCL's reduction for `op`.
pub fn nccl_op(op: ReduceOp) -> ns::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ns::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => ns::ncclRedOp_t::ncclAvg,
    }
}

/// nccl-tests' bus-bandwidth factor of all-reduce, `2(n−1)/n` (0 at world size 1).
pub fn all_reduce_bus_factor(world: usize) -> f64 {
    if world == 0 { 0.0 } else { 2.0 * (world as f64 - 1.0) / world as f64 }
}

/// `(algbw, busbw)` in GB/s (1e9 bytes) of an all-reduce of `bytes` taking `secs`.
pub fn all_reduce_bandwidth(bytes: usize, secs: f64, world: usize) -> (f64, f64) {
    if secs <= 0.0 || !secs.is_finite() {
        return (0.0, 0.0);
    }
    let alg = bytes as f64 / secs / 1e9;
    (alg, alg * all_reduce_bus_factor(world))
}

/// `input` followed by zeros up to `width` bytes (`all_gather_bytes` sends every rank's message
/// padded to the longest one).
pub fn pad_message(input: &[u8], width: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(width.max(input.len()));
    v.extend_from_slice(input);
    v.resize(width.max(input.len()), 0);
    v
}

/// Splits the gathered `padded` buffer (one `width`-byte slot per rank) into each rank's
/// message, `lens[r]` bytes of slot `r`. `None` when the sizes do not fit together.
pub fn unpad_messages(padded: &[u8], lens: &[usize], width: usize) -> Option<Vec<Vec<u8>>> {
    if padded.len() != lens.len().checked_mul(width)? || lens.iter().any(|&l| l > width) {
        return None;
    }
    Some(lens.iter().enumerate().map(|(r, &l)| padded[r * width..r * width + l].to_vec()).collect())
}

/// Message lengths from the gathered little-endian u64 words; `Err` names the first rank whose
/// length exceeds `max`.
fn decode_lengths(words: &[u8], max: usize) -> std::result::Result<Vec<usize>, (usize, u64)> {
    let mut out = Vec::with_capacity(words.len() / 8);
    for (r, w) in words.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if v > max as u64 {
            return Err((r, v));
        }
        out.push(v as usize);
    }
    Ok(out)
}

/// The smallest power of two ≥ `n` (at least 256): staging buffers grow in steps.
fn staging_capacity(n: usize) -> usize {
    n.max(256).checked_next_power_of_two().unwrap_or(n)
}

fn f64_bytes(v: &[f64]) -> &[u8] {
    // SAFETY: any f64 is 8 initialised bytes; the slice covers exactly v's memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn fill_f32(dst: &mut [f32], bytes: &[u8]) {
    for (v, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn fill_f64(dst: &mut [f64], bytes: &[u8]) {
    for (v, c) in dst.iter_mut().zip(bytes.chunks_exact(8)) {
        *v = f64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    }
}

/// NCCL's name and description of `r`.
fn describe(r: ns::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string (or null).
    let s = unsafe { ns::ncclGetErrorString(r) };
    if s.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    let text = unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy();
    format!("{r:?} ({text})")
}

fn nccl_err(what: impl Into<String>, e: nr::NcclError) -> CudaError {
    CudaError::Nccl { what: what.into(), detail: describe(e.0) }
}

/// A fresh NCCL unique id (call on rank 0 only, then hand the bytes to every rank).
pub fn unique_id() -> std::result::Result<[u8; NCCL_ID_BYTES], CudaError> {
    require(Lib::Nccl)?;
    let id = nr::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    let mut out = [0u8; NCCL_ID_BYTES];
    for (o, &c) in out.iter_mut().zip(id.internal.iter()) {
        *o = c as u8;
    }
    Ok(out)
}

fn id_from_bytes(bytes: &[u8]) -> std::result::Result<ns::ncclUniqueId, CudaError> {
    if bytes.len() != NCCL_ID_BYTES {
        return Err(CudaError::Invalid(format!(
            "an NCCL id has {NCCL_ID_BYTES} bytes, got {} (pass the bytes of unique_id() from \
             rank 0 unchanged)",
            bytes.len()
        )));
    }
    let mut id = ns::ncclUniqueId { internal: [0; NCCL_ID_BYTES] };
    for (o, &b) in id.internal.iter_mut().zip(bytes) {
        *o = b as std::ffi::c_char;
    }
    Ok(id)
}

fn check_rank_world(rank: usize, world: usize) -> std::result::Result<(), CudaError> {
    if world == 0 || rank >= world || world > i32::MAX as usize {
        return Err(CudaError::Invalid(format!(
            "NCCL communicator: rank {rank} of world size {world} (need 0 <= rank < world)"
        )));
    }
    Ok(())
}

/// The `ncclConfig_t` of `NCCL_CONFIG_INITIALIZER` with `blocking = 0`, declared at the older of
/// the run-time NCCL's version and the bindings' layout (NCCL reads the fields that version
/// has and copies at most its own struct size).
fn nonblocking_config(runtime_version: i32) -> ns::ncclConfig_t {
    ns::ncclConfig_t {
        size: std::mem::size_of::<ns::ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: runtime_version.clamp(0, CONFIG_HEADER_VERSION) as u32,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// Spins, then yields, then sleeps up to 1 ms between polls.
struct Backoff(u32);

impl Backoff {
    fn pause(&mut self) {
        self.0 = self.0.saturating_add(1);
        match self.0 {
            0..=200 => std::hint::spin_loop(),
            201..=2000 => std::thread::yield_now(),
            n => std::thread::sleep(Duration::from_micros(((n - 2000) as u64 * 10).min(1000))),
        }
    }
}

/// The communicator's async state: `Ok(ncclSuccess | ncclInProgress)` or the error.
fn async_state(comm: ns::ncclComm_t) -> std::result::Result<ns::ncclResult_t, ns::ncclResult_t> {
    let mut st = ns::ncclResult_t::ncclSuccess;
    // SAFETY: `comm` is a live communicator (or one whose init is in progress); `st` is a valid
    // out-pointer.
    let r = unsafe { ns::ncclCommGetAsyncError(comm, &mut st) };
    if r != ns::ncclResult_t::ncclSuccess {
        return Err(r);
    }
    match st {
        ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress => Ok(st),
        e => Err(e),
    }
}

/// Polls until the communicator's pending operation (init, a call that returned
/// `ncclInProgress`, finalize) completes; `Err` with a description on error or at `deadline`.
fn settle(comm: ns::ncclComm_t, deadline: Instant) -> std::result::Result<(), String> {
    let mut b = Backoff(0);
    loop {
        match async_state(comm) {
            Ok(ns::ncclResult_t::ncclSuccess) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("NCCL reports {}", describe(e))),
        }
        if Instant::now() >= deadline {
            return Err("still in progress at the deadline (timeout)".into());
        }
        b.pause();
    }
}

/// The id exchange of [`NcclComm::init_via_store`]: rank 0 creates an id and publishes it
/// under `key` with `set`; every other rank reads it with `get`, waiting up to `timeout`.
pub fn exchange_id(
    rank: usize,
    world: usize,
    key: &str,
    timeout: Duration,
    set: impl FnOnce(&str, &[u8]) -> std::result::Result<(), String>,
    get: impl FnOnce(&str, Duration) -> std::result::Result<Vec<u8>, String>,
) -> std::result::Result<Vec<u8>, CudaError> {
    check_rank_world(rank, world)?;
    let id = if rank == 0 {
        let id = unique_id()?;
        set(key, &id).map_err(|e| {
            CudaError::Invalid(format!("cannot publish the NCCL id under {key:?}: {e}"))
        })?;
        id.to_vec()
    } else {
        get(key, timeout).map_err(|e| {
            CudaError::Invalid(format!(
                "no NCCL id under {key:?} within {timeout:?}: {e} (rank 0 publishes it; check \
                 that it started and reached NCCL set-up)"
            ))
        })?
    };
    id_from_bytes(&id)?;
    Ok(id)
}

/// A raw communicator handle, owned by one [`NcclComm`].
struct RawComm(ns::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` owns it and takes `&mut self` for every call.
unsafe impl Send for RawComm {}

/// Pinned host buffer and two device buffers, grown on demand and kept across calls.
struct Staging {
    host: Option<PinnedHostSlice<u8>>,
    dev: [Option<CudaSlice<u8>>; 2],
}

/// An NCCL communicator implementing [`Communicator`]. See the module docs.
pub struct NcclComm {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    comm: RawComm,
    done: CudaEvent,
    rank: usize,
    world: usize,
    seq: u64,
    opts: NcclOpts,
    staging: Staging,
    version: i32,
    /// Set after an error: the communicator was aborted and every call fails with this text.
    broken: Option<String>,
}

impl NcclComm {
    /// Joins the communicator of `world` ranks named by `id` (the bytes of [`unique_id`] from
    /// rank 0) as `rank`, on `ctx`'s device. Every rank must call this within
    /// `opts.init_timeout` of the others.
    pub fn init(
        ctx: &Arc<CudaContext>,
        rank: usize,
        world: usize,
        id: &[u8],
        opts: NcclOpts,
    ) -> std::result::Result<NcclComm, CudaError> {
        check_rank_world(rank, world)?;
        let id = id_from_bytes(id)?;
        if opts.timeout.is_zero() || opts.init_timeout.is_zero() {
            return Err(CudaError::Invalid(format!(
                "NCCL timeouts must be positive (timeout {:?}, init_timeout {:?})",
                opts.timeout, opts.init_timeout
            )));
        }
        require(Lib::Nccl)?;
        let drv = |what: &str, e| CudaError::driver(what, e);
        ctx.bind_to_thread().map_err(|e| drv("bind context", e))?;
        let version = nr::get_nccl_version().map_err(|e| nccl_err("ncclGetVersion", e))?;
        let stream = ctx.new_stream().map_err(|e| drv("create the NCCL stream", e))?;
        let done = ctx.new_event(None).map_err(|e| drv("create the NCCL event", e))?;
        let mut config = nonblocking_config(version);
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        let what = format!("ncclCommInitRankConfig (rank {rank} of {world}, non-blocking)");
        let deadline = Instant::now() + opts.init_timeout;
        // SAFETY: valid out-pointer and config; the id is 128 bytes; the context is current.
        let r = unsafe {
            nr::comm_init_rank_config(&mut comm, world as i32, id, rank as i32, &mut config)
        };
        if let Err(e) = r {
            if !comm.is_null() {
                // SAFETY: a communicator NCCL returned and nobody else holds.
                let _ = unsafe { nr::comm_abort(comm) };
            }
            return Err(nccl_err(what, e));
        }
        if comm.is_null() {
            return Err(CudaError::Nccl { what, detail: "NCCL returned no communicator".into() });
        }
        if let Err(why) = settle(comm, deadline) {
            // SAFETY: as above; aborting a communicator whose init is in progress is allowed
            // for non-blocking communicators.
            let _ = unsafe { nr::comm_abort(comm) };
            return Err(CudaError::Nccl {
                what,
                detail: format!(
                    "{why} after {:?}: every rank must call init with the same id and world \
                     size within init_timeout; check that all {world} ranks started, that they \
                     can reach each other (NCCL_SOCKET_IFNAME), and rerun with NCCL_DEBUG=INFO",
                    opts.init_timeout
                ),
            });
        }
        Ok(NcclComm {
            ctx: ctx.clone(),
            stream,
            comm: RawComm(comm),
            done,
            rank,
            world,
            seq: 0,
            opts,
            staging: Staging { host: None, dev: [None, None] },
            version,
            broken: None,
        })
    }

    /// [`NcclComm::init`] on GPU `ordinal`'s primary context; checks for the driver and NCCL
    /// first, so a machine without them gets a [`CudaError::LibraryMissing`] naming the library.
    pub fn open(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &[u8],
        opts: NcclOpts,
    ) -> std::result::Result<NcclComm, CudaError> {
        check_rank_world(rank, world)?;
        id_from_bytes(id)?;
        require(Lib::Driver)?;
        require(Lib::Nccl)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver("create context", e))?;
        NcclComm::init(&ctx, rank, world, id, opts)
    }

    /// Rank 0 creates the id and publishes it under `key` with `set`; the other ranks read it
    /// with `get` (waiting up to `opts.init_timeout`); then every rank calls [`NcclComm::init`].
    ///
    /// With the coordinator client (`tessera_coordinator::client::CoordinatorClient`):
    /// `set = |k, v| client.store_set(k, v).map_err(|e| e.to_string())`,
    /// `get = |k, t| client.store_get(k, t).map_err(|e| e.to_string())` and
    /// `key = nccl_id_key(membership.generation)`.
    pub fn init_via_store(
        ctx: &Arc<CudaContext>,
        rank: usize,
        world: usize,
        key: &str,
        opts: NcclOpts,
        set: impl FnOnce(&str, &[u8]) -> std::result::Result<(), String>,
        get: impl FnOnce(&str, Duration) -> std::result::Result<Vec<u8>, String>,
    ) -> std::result::Result<NcclComm, CudaError> {
        let id = exchange_id(rank, world, key, opts.init_timeout, set, get)?;
        NcclComm::init(ctx, rank, world, &id, opts)
    }

    /// [`NcclComm::init_via_store`] on GPU `ordinal`'s primary context, after checking for the
    /// driver and NCCL (for callers without a `CudaContext`, e.g. `tessera rank`).
    pub fn open_via_store(
        ordinal: usize,
        rank: usize,
        world: usize,
        key: &str,
        opts: NcclOpts,
        set: impl FnOnce(&str, &[u8]) -> std::result::Result<(), String>,
        get: impl FnOnce(&str, Duration) -> std::result::Result<Vec<u8>, String>,
    ) -> std::result::Result<NcclComm, CudaError> {
        check_rank_world(rank, world)?;
        require(Lib::Driver)?;
        require(Lib::Nccl)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver("create context", e))?;
        NcclComm::init_via_store(&ctx, rank, world, key, opts, set, get)
    }

    /// The communication stream (every NCCL call of this communicator runs on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context the communicator lives on.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// NCCL's version code (e.g. 22805 for 2.28.5).
    pub fn nccl_version(&self) -> i32 {
        self.version
    }

    /// The settings.
    pub fn opts(&self) -> &NcclOpts {
        &self.opts
    }

    /// Why the communicator is unusable, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Aborts the communicator without waiting for the peers (`ncclCommAbort`): for a rank
    /// that is failing for a reason of its own, so that dropping the communicator does not
    /// first wait for peers stuck in a collective this rank will never join (finalizing would
    /// wait up to 30 s before the rank reports its error). Every later call fails with `why`.
    pub fn abort(&mut self, why: &str) {
        if self.broken.is_none() {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: the communicator is live and owned here; after abort it is never used
            // again (broken is set, Drop skips finalize and destroy).
            let _ = unsafe { nr::comm_abort(self.comm.0) };
            self.broken = Some(format!(
                "NCCL communicator (rank {} of {}) aborted: {why}",
                self.rank, self.world
            ));
        }
    }

    /// Starts a call: sequence number, poisoned check, context bound.
    fn begin(&mut self) -> Result<u64> {
        let seq = self.seq;
        self.seq += 1;
        if let Some(why) = &self.broken {
            return Err(CommError::Poisoned(why.clone()));
        }
        if let Err(e) = self.ctx.bind_to_thread() {
            return Err(self.fail("bind context", seq, format!("CUDA error {e:?}")));
        }
        Ok(seq)
    }

    /// Aborts the communicator and returns the error every later call repeats.
    fn fail(&mut self, op: &str, seq: u64, why: String) -> CommError {
        // NCCL's own account (a peer, a network error), read before the abort frees it.
        let last = if self.broken.is_some() {
            std::ptr::null()
        } else {
            // SAFETY: the communicator is live (not yet aborted: broken is unset); NCCL
            // returns a NUL-terminated string it owns, or null.
            unsafe { ns::ncclGetLastError(self.comm.0) }
        };
        let last = if last.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated, valid until the next NCCL call on this thread.
            unsafe { std::ffi::CStr::from_ptr(last) }.to_string_lossy().trim().to_string()
        };
        let last = if last.is_empty() { last } else { format!(" (NCCL: {last})") };
        let msg = format!(
            "NCCL {op} #{seq} (rank {} of {}): {why}{last}; the communicator was aborted; {FIX}",
            self.rank, self.world
        );
        if self.broken.is_none() {
            // SAFETY: the communicator is live and owned here; after abort it is never used
            // again (broken is set, Drop skips destroy).
            let _ = unsafe { nr::comm_abort(self.comm.0) };
            self.broken = Some(msg.clone());
        }
        CommError::Poisoned(msg)
    }

    /// Checks the result of an NCCL call; waits (with the watchdog) when it is in progress.
    fn check(
        &mut self,
        op: &str,
        seq: u64,
        call: &str,
        r: std::result::Result<nr::NcclStatus, nr::NcclError>,
    ) -> Result<()> {
        match r {
            Ok(nr::NcclStatus::InProgress) => {
                let deadline = Instant::now() + self.opts.timeout;
                settle(self.comm.0, deadline)
                    .map_err(|why| self.fail(op, seq, format!("{call}: {why}")))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(op, seq, format!("{call} failed: {}", describe(e.0)))),
        }
    }

    /// Waits for everything queued on the communication stream, polling NCCL's async error and
    /// the stream until `opts.timeout`.
    fn wait_op(&mut self, op: &str, seq: u64) -> Result<()> {
        if let Err(e) = self.done.record(&self.stream) {
            return Err(self.fail(op, seq, format!("recording the completion event: {e:?}")));
        }
        let t0 = Instant::now();
        let deadline = t0 + self.opts.timeout;
        let mut b = Backoff(0);
        loop {
            if let Err(e) = async_state(self.comm.0) {
                return Err(self.fail(op, seq, format!("NCCL reports {}", describe(e))));
            }
            match self.done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(self.fail(
                        op,
                        seq,
                        format!("CUDA error on the NCCL stream: {e:?}"),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.fail(
                    op,
                    seq,
                    format!(
                        "not complete after {:?} (timeout): a rank is stalled, dead or calling a \
                         different collective",
                        t0.elapsed()
                    ),
                ));
            }
            b.pause();
        }
    }

    /// Waits (with the watchdog) for every device-buffer call enqueued so far, e.g. the bucket
    /// all-reduces of [`NcclComm::all_reduce_f32_device_enqueue`].
    pub fn wait(&mut self) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(CommError::Poisoned(why.clone()));
        }
        let seq = self.seq.saturating_sub(1);
        self.wait_op("wait", seq)
    }

    /// Makes the communication stream wait for the work queued so far on `compute`.
    fn after(&mut self, op: &str, seq: u64, compute: Option<&CudaStream>) -> Result<()> {
        if let Some(c) = compute
            && *c != *self.stream
            && let Err(e) = self.stream.join(c)
        {
            return Err(self.fail(op, seq, format!("ordering after the compute stream: {e:?}")));
        }
        Ok(())
    }

    /// Enqueues an in-place all-reduce of device buffer `buf` (a `CudaSlice<f32>` or a
    /// `CudaViewMut<f32>`, e.g. one gradient bucket of a flat buffer) on the communication
    /// stream, ordered after the work queued so far on `compute` (the stream that wrote `buf`;
    /// `None` when it is already complete). Does not wait: call [`NcclComm::wait`] (or make the
    /// compute stream wait for [`NcclComm::stream`]) before reading `buf`.
    pub fn all_reduce_f32_device_enqueue<B: DevicePtrMut<f32>>(
        &mut self,
        buf: &mut B,
        op: ReduceOp,
        compute: Option<&CudaStream>,
    ) -> Result<()> {
        let name = "all_reduce_f32_device";
        let seq = self.begin()?;
        self.after(name, seq, compute)?;
        let n = buf.len();
        let stream = self.stream.clone();
        let (p, guard) = buf.device_ptr_mut(&stream);
        // SAFETY: `p` holds n floats on this communicator's device, kept by `guard` until
        // the enqueue returns and by the caller's borrow of `buf` afterwards.
        let r = unsafe {
            self.all_reduce_in_place(name, seq, p, n, ns::ncclDataType_t::ncclFloat32, op)
        };
        drop(guard);
        r
    }

    /// Enqueues an in-place `ncclAllReduce` of `count` elements of `dtype` at device address
    /// `p` on the communication stream and settles its status (watchdog when in progress).
    ///
    /// # Safety
    /// `p` addresses at least `count` elements of `dtype` that this device can access and that
    /// nothing else uses until the stream has finished the call.
    unsafe fn all_reduce_in_place(
        &mut self,
        name: &str,
        seq: u64,
        p: ds::CUdeviceptr,
        count: usize,
        dtype: ns::ncclDataType_t,
        op: ReduceOp,
    ) -> Result<()> {
        // SAFETY: per this function's contract; in place is allowed by NCCL.
        unsafe { self.all_reduce_raw(name, seq, p, p, count, dtype, op) }
    }

    /// Enqueues `ncclAllReduce` of `count` elements of `dtype` from device address `send` into
    /// `recv` (the same address for in place) on the communication stream and settles its
    /// status (watchdog when in progress).
    ///
    /// # Safety
    /// `send` and `recv` each address at least `count` elements of `dtype` that this device
    /// can access, either the same range or disjoint ones, that nothing else writes (nor, for
    /// `recv`, reads) until the stream has finished the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn all_reduce_raw(
        &mut self,
        name: &str,
        seq: u64,
        send: ds::CUdeviceptr,
        recv: ds::CUdeviceptr,
        count: usize,
        dtype: ns::ncclDataType_t,
        op: ReduceOp,
    ) -> Result<()> {
        // SAFETY: per this function's contract.
        let r = unsafe {
            nr::all_reduce(
                send as *const _,
                recv as *mut _,
                count,
                dtype,
                nccl_op(op),
                self.comm.0,
                self.cu(),
            )
        };
        self.check(name, seq, "ncclAllReduce", r)
    }

    /// Queues one hop of the device ring (rank/src/loss/ring_device.rs) on the communication
    /// stream, ordered after the work queued so far on `compute`: the first `n` values of each
    /// `send` part go to rank r+1, each `recv` part's first `n` values come from rank r−1, all
    /// in one NCCL group, in order. Parts of no values are left out: both sides derive every
    /// length from the same sizes, so rank r's sends pair with rank r+1's receives. Does not
    /// wait: [`NcclComm::wait`] does, with the watchdog; until then the buffers stay in use.
    pub fn ring_exchange_f32_device_enqueue(
        &mut self,
        send: &[(&CudaSlice<f32>, usize)],
        recv: &mut [(&mut CudaSlice<f32>, usize)],
        compute: Option<&CudaStream>,
    ) -> Result<()> {
        let name = "ring_exchange_f32_device";
        let seq = self.begin()?;
        let short =
            send.iter().map(|(b, n)| (b.len(), *n)).chain(recv.iter().map(|(b, n)| (b.len(), *n)));
        for (have, n) in short {
            if n > have {
                // A bug in the caller while the peers may already be in their half of the
                // hop: the communicator is aborted, never reused out of step with them, and
                // the error ends the job through the coordinator.
                return Err(self.fail(
                    name,
                    seq,
                    format!("{n} values to move with a device buffer of {have}"),
                ));
            }
        }
        self.after(name, seq, compute)?;
        let next = ((self.rank + 1) % self.world) as i32;
        let prev = ((self.rank + self.world - 1) % self.world) as i32;
        let f32t = ns::ncclDataType_t::ncclFloat32;
        let stream = self.stream.clone();
        let (comm, cu) = (self.comm.0, self.cu());
        let mut results = Vec::with_capacity(send.len() + recv.len());
        let r = nr::group_start();
        self.check(name, seq, "ncclGroupStart", r)?;
        // The guards record the buffers' use on the communication stream when dropped: after
        // the group is queued and its status settled (below).
        let mut reads = Vec::with_capacity(send.len());
        let mut writes = Vec::with_capacity(recv.len());
        {
            for (b, n) in send.iter().filter(|(_, n)| *n > 0) {
                let (p, g) = b.device_ptr(&stream);
                reads.push(g);
                // SAFETY: `p` holds at least n floats (checked above) on this device, kept
                // alive by the caller's borrow until it has waited for the stream.
                results.push(("ncclSend", unsafe {
                    nr::send(p as *const _, *n, f32t, next, comm, cu)
                }));
            }
            for (b, n) in recv.iter_mut().filter(|(_, n)| *n > 0) {
                let (p, g) = b.device_ptr_mut(&stream);
                writes.push(g);
                // SAFETY: as above; nothing else uses the buffer until the caller's wait.
                results
                    .push(("ncclRecv", unsafe { nr::recv(p as *mut _, *n, f32t, prev, comm, cu) }));
            }
            let re = nr::group_end();
            results.push(("ncclGroupEnd", re));
        }
        for (call, r) in results {
            self.check(name, seq, call, r)?;
        }
        drop((reads, writes));
        Ok(())
    }

    /// In-place all-reduce of device buffer `buf`, waiting (with the watchdog) for it.
    pub fn all_reduce_f32_device<B: DevicePtrMut<f32>>(
        &mut self,
        buf: &mut B,
        op: ReduceOp,
        compute: Option<&CudaStream>,
    ) -> Result<()> {
        self.all_reduce_f32_device_enqueue(buf, op, compute)?;
        let seq = self.seq - 1;
        self.wait_op("all_reduce_f32_device", seq)
    }

    /// Makes sure the staging buffers hold `host` and `dev` bytes.
    fn reserve(&mut self, op: &str, seq: u64, host: usize, dev: [usize; 2]) -> Result<()> {
        let grow = |have: Option<usize>, need: usize| have.is_none_or(|h| h < need.max(1));
        if grow(self.staging.host.as_ref().map(|h| h.len()), host) {
            self.staging.host = None;
            // SAFETY: the memory is written before it is read (every call copies into it first).
            match unsafe { self.ctx.alloc_pinned_with_flags::<u8>(staging_capacity(host), 0) } {
                Ok(h) => self.staging.host = Some(h),
                Err(e) => {
                    return Err(self.fail(
                        op,
                        seq,
                        format!(
                            "cannot pin {} host bytes for staging: {e:?}",
                            staging_capacity(host)
                        ),
                    ));
                }
            }
        }
        for (i, &need) in dev.iter().enumerate() {
            if grow(self.staging.dev[i].as_ref().map(|d| d.len()), need) {
                self.staging.dev[i] = None;
                // SAFETY: written (copy or NCCL output) before it is read.
                match unsafe { self.stream.alloc::<u8>(staging_capacity(need)) } {
                    Ok(d) => self.staging.dev[i] = Some(d),
                    Err(e) => {
                        return Err(self.fail(
                            op,
                            seq,
                            format!(
                                "cannot allocate {} device bytes for staging: {e:?}",
                                staging_capacity(need)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Pinned staging memory as a mutable byte slice of `len` bytes.
    fn host_mut(&mut self, len: usize) -> &mut [u8] {
        match self.staging.host.as_mut().and_then(|h| h.as_mut_ptr().ok()) {
            // SAFETY: `reserve` made the buffer at least `len` bytes; no copy is in flight
            // (every call waits for its copies before returning).
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p, len) },
            None => &mut [],
        }
    }

    /// Raw device pointer of staging buffer `i` (0 or 1).
    fn dev_ptr(&mut self, i: usize) -> ds::CUdeviceptr {
        let stream = self.stream.clone();
        match self.staging.dev[i].as_mut() {
            Some(d) => {
                let (p, _g) = d.device_ptr_mut(&stream);
                p
            }
            None => 0,
        }
    }

    /// Host staging → device buffer `i`, `len` bytes, on the communication stream.
    fn upload(&mut self, op: &str, seq: u64, i: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let dst = self.dev_ptr(i);
        let cu = self.stream.cu_stream();
        let src: &[u8] = self.host_mut(len);
        // SAFETY: dst holds ≥ len bytes; src is pinned, not moved and not touched until the
        // call's wait completes.
        let r = unsafe { dr::memcpy_htod_async(dst, src, cu) };
        r.map_err(|e| self.fail(op, seq, format!("copy to the device: {e:?}")))
    }

    /// Device buffer `i` → host staging, `len` bytes, on the communication stream.
    fn download(&mut self, op: &str, seq: u64, i: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let src = self.dev_ptr(i);
        let cu = self.stream.cu_stream();
        let dst = self.host_mut(len);
        // SAFETY: as in `upload`, the other way round.
        let r = unsafe { dr::memcpy_dtoh_async(dst, src, cu) };
        r.map_err(|e| self.fail(op, seq, format!("copy to the host: {e:?}")))
    }

    fn cu(&self) -> ns::cudaStream_t {
        self.stream.cu_stream() as ns::cudaStream_t
    }

    /// The staging every host-slice collective shares: `input` goes through the host buffer to
    /// device buffer 0 (device buffers reserved at `dev` bytes), `enqueue` queues the NCCL work
    /// on the communication stream, then `out_bytes` of device buffer `out` come back to the
    /// host buffer, returned once the stream is done (with the watchdog).
    #[allow(clippy::too_many_arguments)]
    fn staged(
        &mut self,
        name: &str,
        seq: u64,
        input: &[u8],
        dev: [usize; 2],
        out: usize,
        out_bytes: usize,
        enqueue: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<&[u8]> {
        let nb = input.len();
        self.reserve(name, seq, nb.max(out_bytes), dev)?;
        self.host_mut(nb).copy_from_slice(input);
        self.upload(name, seq, 0, nb)?;
        enqueue(self)?;
        self.download(name, seq, out, out_bytes)?;
        self.wait_op(name, seq)?;
        Ok(self.host_mut(out_bytes))
    }

    /// Stages `input` in, runs an all-reduce of `count` elements of `dtype` in place on device
    /// buffer 0 and stages the result out into the host buffer (returned).
    fn host_all_reduce(
        &mut self,
        name: &str,
        seq: u64,
        input: &[u8],
        count: usize,
        dtype: ns::ncclDataType_t,
        op: ReduceOp,
    ) -> Result<&[u8]> {
        let nb = input.len();
        self.staged(name, seq, input, [nb, 0], 0, nb, |c| {
            let p = c.dev_ptr(0);
            // SAFETY: device buffer 0 holds ≥ nb bytes = count elements of dtype, used only by
            // this call until `staged` has waited for the stream.
            unsafe { c.all_reduce_in_place(name, seq, p, count, dtype, op) }
        })
    }

    /// All-gather of `bytes` bytes per rank from the host staging buffer's first `bytes` bytes;
    /// leaves `world × bytes` bytes in the host staging buffer.
    fn host_all_gather_bytes(&mut self, name: &str, seq: u64, input: &[u8]) -> Result<&[u8]> {
        let nb = input.len();
        let total = nb * self.world;
        self.staged(name, seq, input, [nb, total], 1, total, |c| {
            let (s, d) = (c.dev_ptr(0), c.dev_ptr(1));
            // SAFETY: buffer 0 holds nb bytes, buffer 1 holds world × nb bytes.
            let r = unsafe {
                nr::all_gather(
                    s as *const _,
                    d as *mut _,
                    nb,
                    ns::ncclDataType_t::ncclUint8,
                    c.comm.0,
                    c.cu(),
                )
            };
            c.check(name, seq, "ncclAllGather", r)
        })
    }

    /// Sends `nb_send` bytes of device buffer 0 to rank r+1 and receives `nb_recv` bytes from
    /// rank r−1 into device buffer 1, in one NCCL group.
    fn shift(&mut self, name: &str, seq: u64, nb_send: usize, nb_recv: usize) -> Result<()> {
        let next = ((self.rank + 1) % self.world) as i32;
        let prev = ((self.rank + self.world - 1) % self.world) as i32;
        let (s, d) = (self.dev_ptr(0), self.dev_ptr(1));
        let r = nr::group_start();
        self.check(name, seq, "ncclGroupStart", r)?;
        let u8t = ns::ncclDataType_t::ncclUint8;
        // SAFETY: buffer 0 holds ≥ nb_send bytes, buffer 1 ≥ nb_recv bytes.
        let rs = unsafe { nr::send(s as *const _, nb_send, u8t, next, self.comm.0, self.cu()) };
        // SAFETY: as above.
        let rr = unsafe { nr::recv(d as *mut _, nb_recv, u8t, prev, self.comm.0, self.cu()) };
        let re = nr::group_end();
        self.check(name, seq, "ncclSend", rs)?;
        self.check(name, seq, "ncclRecv", rr)?;
        self.check(name, seq, "ncclGroupEnd", re)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = self.comm.0;
        let _ = self.ctx.bind_to_thread();
        if self.broken.is_none() {
            let deadline = Instant::now() + self.opts.timeout.min(Duration::from_secs(30));
            // SAFETY: the communicator is live and owned here.
            let fin = unsafe { nr::comm_finalize(comm) };
            let ok = match fin {
                Ok(nr::NcclStatus::InProgress) => settle(comm, deadline).is_ok(),
                Ok(_) => true,
                Err(_) => false,
            };
            if ok {
                // SAFETY: finalized; destroyed once and never used again.
                let _ = unsafe { nr::comm_destroy(comm) };
            } else {
                // SAFETY: as above; abort releases it without waiting for peers.
                let _ = unsafe { nr::comm_abort(comm) };
                self.broken = Some("finalize failed".into());
            }
        }
        // After an abort the stream may still hold work that never completes: the pinned
        // buffer's free could then block, so it is leaked instead.
        let idle = self.done.record(&self.stream).is_ok() && {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut b = Backoff(0);
            loop {
                match self.done.try_is_complete() {
                    Ok(true) => break true,
                    Err(_) => break false,
                    Ok(false) if Instant::now() >= deadline => break false,
                    Ok(false) => b.pause(),
                }
            }
        };
        if !idle && let Some(h) = self.staging.host.take() {
            std::mem::forget(h);
        }
    }
}

impl Communicator for NcclComm {
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
        let seq = self.begin()?;
        let f32t = ns::ncclDataType_t::ncclFloat32;
        if let Some(p) = managed_range(f32_bytes(buf)) {
            // Managed memory (a GPU model's gradient): NCCL reduces it where it is, no staging.
            // As with any host access to managed memory, the caller has waited for the device
            // work that writes `buf` (training reads the gradient's norms first); NCCL's stream
            // is not ordered after any compute stream here.
            // SAFETY: `p` addresses buf.len() floats of one managed allocation, which the
            // exclusive borrow keeps alive and unaliased until the wait below returns.
            unsafe { self.all_reduce_in_place("all_reduce_f32", seq, p, buf.len(), f32t, op)? };
            return self.wait_op("all_reduce_f32", seq);
        }
        let out =
            self.host_all_reduce("all_reduce_f32", seq, f32_bytes(buf), buf.len(), f32t, op)?;
        fill_f32(buf, out);
        Ok(())
    }

    fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        let seq = self.begin()?;
        let f64t = ns::ncclDataType_t::ncclFloat64;
        let out =
            self.host_all_reduce("all_reduce_f64", seq, f64_bytes(buf), buf.len(), f64t, op)?;
        fill_f64(buf, out);
        Ok(())
    }

    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let name = "all_gather_f32";
        let seq = self.begin()?;
        let m = input.len();
        if Some(output.len()) != m.checked_mul(self.world) {
            return Err(CommError::InvalidArgument {
                op: name,
                detail: format!(
                    "output has {} elements; it needs world × input = {} × {m} (call #{seq})",
                    output.len(),
                    self.world
                ),
            });
        }
        let out = self.host_all_gather_bytes(name, seq, f32_bytes(input))?;
        fill_f32(output, out);
        Ok(())
    }

    fn all_gather_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        let name = "all_gather_bytes";
        let seq = self.begin()?;
        if input.len() > self.opts.max_message_bytes {
            return Err(CommError::InvalidArgument {
                op: name,
                detail: format!(
                    "message of {} bytes exceeds max_message_bytes {} (call #{seq})",
                    input.len(),
                    self.opts.max_message_bytes
                ),
            });
        }
        // Lengths first (8 bytes per rank), then every message padded to the longest.
        let words =
            self.host_all_gather_bytes(name, seq, &(input.len() as u64).to_le_bytes())?.to_vec();
        let lens = match decode_lengths(&words, self.opts.max_message_bytes) {
            Ok(l) => l,
            Err((r, v)) => {
                return Err(self.fail(
                    name,
                    seq,
                    format!(
                        "rank {r} sends {v} bytes, more than max_message_bytes {}",
                        self.opts.max_message_bytes
                    ),
                ));
            }
        };
        let width = lens.iter().copied().max().unwrap_or(0);
        let padded = pad_message(input, width);
        let all = self.host_all_gather_bytes(name, seq, &padded)?.to_vec();
        match unpad_messages(&all, &lens, width) {
            Some(v) => Ok(v),
            None => Err(self.fail(name, seq, "gathered sizes do not fit together".into())),
        }
    }

    fn reduce_scatter_f32(
        &mut self,
        input: &[f32],
        output: &mut [f32],
        op: ReduceOp,
    ) -> Result<()> {
        let name = "reduce_scatter_f32";
        let seq = self.begin()?;
        let m = output.len();
        if Some(input.len()) != m.checked_mul(self.world) {
            return Err(CommError::InvalidArgument {
                op: name,
                detail: format!(
                    "input has {} elements; it needs world × output = {} × {m} (call #{seq})",
                    input.len(),
                    self.world
                ),
            });
        }
        let (nb_in, nb_out) = (input.len() * 4, m * 4);
        let out = self.staged(name, seq, f32_bytes(input), [nb_in, nb_out], 1, nb_out, |c| {
            let (s, d) = (c.dev_ptr(0), c.dev_ptr(1));
            // SAFETY: buffer 0 holds world × m floats, buffer 1 holds m floats.
            let r = unsafe {
                nr::reduce_scatter(
                    s as *const _,
                    d as *mut _,
                    m,
                    ns::ncclDataType_t::ncclFloat32,
                    nccl_op(op),
                    c.comm.0,
                    c.cu(),
                )
            };
            c.check(name, seq, "ncclReduceScatter", r)
        })?;
        fill_f32(output, out);
        Ok(())
    }

    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        let name = "broadcast_bytes";
        let seq = self.begin()?;
        if root >= self.world {
            return Err(CommError::InvalidArgument {
                op: name,
                detail: format!(
                    "root {root} is not a rank of world size {} (call #{seq})",
                    self.world
                ),
            });
        }
        let nb = buf.len();
        let out = self.staged(name, seq, buf, [nb, 0], 0, nb, |c| {
            let p = c.dev_ptr(0);
            // SAFETY: buffer 0 holds nb bytes; in place.
            let r = unsafe {
                nr::broadcast(
                    p as *const _,
                    p as *mut _,
                    nb,
                    ns::ncclDataType_t::ncclUint8,
                    root as i32,
                    c.comm.0,
                    c.cu(),
                )
            };
            c.check(name, seq, "ncclBroadcast", r)
        })?;
        buf.copy_from_slice(out);
        Ok(())
    }

    fn ring_shift_bytes(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        let name = "ring_shift_bytes";
        let seq = self.begin()?;
        if send.len() > self.opts.max_message_bytes {
            return Err(CommError::InvalidArgument {
                op: name,
                detail: format!(
                    "message of {} bytes exceeds max_message_bytes {} (call #{seq})",
                    send.len(),
                    self.opts.max_message_bytes
                ),
            });
        }
        // The length first, then the message.
        let len = (send.len() as u64).to_le_bytes();
        let word =
            self.staged(name, seq, &len, [8, 8], 1, 8, |c| c.shift(name, seq, 8, 8))?.to_vec();
        let n = match decode_lengths(&word, self.opts.max_message_bytes) {
            Ok(l) => l[0],
            Err((_, v)) => {
                let prev = (self.rank + self.world - 1) % self.world;
                return Err(self.fail(
                    name,
                    seq,
                    format!(
                        "rank {prev} sends {v} bytes, more than max_message_bytes {}",
                        self.opts.max_message_bytes
                    ),
                ));
            }
        };
        let nb = send.len();
        let got = self.staged(name, seq, send, [nb, n], 1, n, |c| c.shift(name, seq, nb, n))?;
        recv.clear();
        recv.extend_from_slice(got);
        Ok(())
    }

    fn ring_shift_bytes_sized(
        &mut self,
        send: &[u8],
        recv: &mut Vec<u8>,
        recv_len: usize,
    ) -> Result<()> {
        // NCCL's send and recv each need their count up front: known here, so the message
        // moves in one group, without ring_shift_bytes's round announcing the length.
        let name = "ring_shift_bytes";
        let seq = self.begin()?;
        let limit = self.opts.max_message_bytes;
        if send.len() > limit || recv_len > limit {
            return Err(CommError::InvalidArgument {
                op: name,
                detail: format!(
                    "message of {} bytes sent or {recv_len} expected exceeds max_message_bytes \
                     {limit} (call #{seq})",
                    send.len()
                ),
            });
        }
        let nb = send.len();
        let got = self.staged(name, seq, send, [nb, recv_len], 1, recv_len, |c| {
            c.shift(name, seq, nb, recv_len)
        })?;
        recv.clear();
        recv.extend_from_slice(got);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let seq = self.begin()?;
        let one = 1.0f32.to_ne_bytes();
        let f32t = ns::ncclDataType_t::ncclFloat32;
        self.host_all_reduce("barrier", seq, &one, 1, f32t, ReduceOp::Sum)?;
        Ok(())
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

/// One check of [`world1_checks`].
#[derive(Clone, Debug)]
pub struct NcclCheck {
    pub name: String,
    pub detail: String,
    /// Normwise relative error vs the CPU result (`None` for pass/fail checks).
    pub err: Option<f64>,
    pub pass: bool,
}

/// DDP's bucketed gradient all-reduce on the GPU. A flat gradient in managed memory (a
/// [`CudaDevice`](super::device::CudaDevice) model's) is all-reduced bucket by bucket on the
/// communication stream while the backward that writes it still runs on the compute stream:
/// each bucket's `ncclAllReduce` waits for an event recorded on the compute stream when the
/// backward reported the bucket's layers, so the host never waits per layer. It reads the
/// gradient where it is and writes a device buffer kept across steps, so the local gradient
/// stays for the noise scale and the NaN check until [`OverlapAllReduce::take`] copies the
/// reduced one over it.
///
/// One step: [`begin`](OverlapAllReduce::begin) with the gradient buffer,
/// [`ready`](OverlapAllReduce::ready) for each layer the backward reports (as
/// [`Model::backward_pair_queued`](crate::model::Model::backward_pair_queued) does, with the
/// layer's kernels queued), [`finish`](OverlapAllReduce::finish) once the rest is final (the
/// logit scale, the slice holding element 0), then `take`. The buckets follow [`BucketPlan`],
/// the same on every rank. Each bucket is summed by NCCL on its own: bitwise the whole-buffer
/// all-reduce at world size ≤ 2, NCCL's order for the bucket's size beyond.
///
/// Between `begin` and `take` the host may read the gradient and write elements it has not
/// reported (the device's concurrent managed access allows it while NCCL reads other ones);
/// nothing may write a reported element.
pub struct OverlapAllReduce {
    compute: Arc<CudaStream>,
    bucket_bytes: usize,
    reduced: Option<CudaSlice<f32>>,
    step: Option<OverlapStep>,
}

/// The gradient being reduced.
struct OverlapStep {
    grads: ds::CUdeviceptr,
    total: usize,
    plan: BucketPlan,
    finished: bool,
}

const OVERLAP: &str = "all_reduce_overlapped";

impl OverlapAllReduce {
    /// Buckets of `bucket_bytes` (DDP's `bucket_cap_mb`; at least one element) after the work
    /// of the `compute` stream (the one the backward's kernels run on).
    pub fn new(compute: Arc<CudaStream>, bucket_bytes: usize) -> Self {
        OverlapAllReduce { compute, bucket_bytes, reduced: None, step: None }
    }

    fn invalid(detail: String) -> CommError {
        CommError::InvalidArgument { op: OVERLAP, detail }
    }

    /// Starts a step on `grads`, which must lie in one managed allocation, reducing the
    /// elements in `spans` (`[0..grads.len()]` for all; see [`BucketPlan`]).
    pub fn begin(
        &mut self,
        comm: &mut NcclComm,
        grads: &[f32],
        spans: &[std::ops::Range<usize>],
    ) -> Result<()> {
        let Some(p) = managed_range(f32_bytes(grads)) else {
            return Err(Self::invalid(format!(
                "the gradient ({} values) is not in CUDA managed memory: the overlapped \
                 all-reduce reads it where the GPU backward writes it (a CudaDevice model's \
                 buffer); use the plain all-reduce for host buffers",
                grads.len()
            )));
        };
        let n = grads.len();
        if self.reduced.as_ref().is_none_or(|r| r.len() < n) {
            self.reduced = None;
            if let Some(why) = &comm.broken {
                return Err(CommError::Poisoned(why.clone()));
            }
            if let Err(e) = comm.ctx.bind_to_thread() {
                return Err(Self::invalid(format!("binding the CUDA context: {e:?}")));
            }
            // SAFETY: every element is written by a bucket's all-reduce before `take` reads it.
            match unsafe { comm.stream.alloc::<f32>(n) } {
                Ok(r) => self.reduced = Some(r),
                Err(e) => {
                    return Err(Self::invalid(format!(
                        "cannot allocate {} bytes of GPU memory for the reduced gradient: {e:?} \
                         (train with run.overlap_allreduce = false)",
                        n * 4
                    )));
                }
            }
        }
        self.step = Some(OverlapStep {
            grads: p,
            total: n,
            plan: BucketPlan::new(n, spans, self.bucket_bytes),
            finished: false,
        });
        Ok(())
    }

    /// Reports gradient elements `offset..offset + len` final once the compute stream's work
    /// queued so far is done; queues the buckets that completes.
    pub fn ready(&mut self, comm: &mut NcclComm, offset: usize, len: usize) -> Result<()> {
        let due = match self.step.as_mut() {
            Some(st) if !st.finished => st.plan.ready(offset, len),
            _ => return Err(Self::invalid("ready outside begin..finish".into())),
        };
        for r in due {
            self.enqueue(comm, r)?;
        }
        Ok(())
    }

    /// Queues every bucket not queued yet; the whole gradient must be final on the host and on
    /// the compute stream's queue.
    pub fn finish(&mut self, comm: &mut NcclComm) -> Result<()> {
        let due = match self.step.as_mut() {
            Some(st) if !st.finished => {
                st.finished = true;
                st.plan.finish()
            }
            _ => return Err(Self::invalid("finish outside begin..finish".into())),
        };
        for r in due {
            self.enqueue(comm, r)?;
        }
        Ok(())
    }

    /// One bucket: the communication stream waits for the compute stream, then NCCL sums the
    /// bucket from the gradient into the reduced buffer.
    fn enqueue(&mut self, comm: &mut NcclComm, r: std::ops::Range<usize>) -> Result<()> {
        let seq = comm.begin()?;
        comm.after(OVERLAP, seq, Some(&self.compute))?;
        let (st, reduced) = match (&self.step, self.reduced.as_mut()) {
            (Some(st), Some(red)) => (st, red),
            _ => return Err(Self::invalid("a bucket outside a step".into())),
        };
        let stream = comm.stream.clone();
        let (base, guard) = reduced.device_ptr_mut(&stream);
        let at = (r.start * 4) as ds::CUdeviceptr;
        // SAFETY: the plan keeps r inside 0..total; the gradient (begin's managed range of
        // total floats) is not written there until `take`, the reduced buffer holds ≥ total
        // floats and only this stream touches it; the ranges are disjoint allocations.
        let res = unsafe {
            comm.all_reduce_raw(
                OVERLAP,
                seq,
                st.grads + at,
                base + at,
                r.len(),
                ns::ncclDataType_t::ncclFloat32,
                ReduceOp::Sum,
            )
        };
        drop(guard);
        res
    }

    /// Waits (with the watchdog) for every bucket and copies the reduced spans over `grads`,
    /// the buffer given to [`OverlapAllReduce::begin`], after the compute stream's work queued
    /// so far (which may read the local gradient). Outside the spans `grads` keeps its values.
    pub fn take(&mut self, comm: &mut NcclComm, grads: &mut [f32]) -> Result<()> {
        let st = match self.step.take() {
            Some(st) if st.finished => st,
            Some(_) => return Err(Self::invalid("take before finish".into())),
            None => return Err(Self::invalid("take without begin".into())),
        };
        if managed_range(f32_bytes(grads)) != Some(st.grads) || grads.len() != st.total {
            return Err(Self::invalid(format!(
                "take got another buffer ({} values) than begin ({} values)",
                grads.len(),
                st.total
            )));
        }
        let seq = comm.begin()?;
        comm.after(OVERLAP, seq, Some(&self.compute))?;
        let Some(reduced) = self.reduced.as_mut() else {
            return Err(Self::invalid("no reduced buffer".into()));
        };
        let stream = comm.stream.clone();
        let (src, guard) = reduced.device_ptr_mut(&stream);
        let r = st.plan.spans().iter().try_for_each(|sp| {
            let at = (sp.start * 4) as ds::CUdeviceptr;
            // SAFETY: both hold total floats and the plan keeps its spans inside 0..total; the
            // exclusive borrow of `grads` keeps the host off it until the wait below, and the
            // compute stream's readers come before on the stream.
            unsafe {
                dr::memcpy_dtod_async(st.grads + at, src + at, sp.len() * 4, stream.cu_stream())
            }
        });
        drop(guard);
        if let Err(e) = r {
            return Err(comm.fail(OVERLAP, seq, format!("copying the reduced gradient: {e:?}")));
        }
        comm.wait_op(OVERLAP, seq)
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, |m, d| if d.is_nan() || m.is_nan() { f64::NAN } else { m.max(d) })
}

/// Every collective of [`NcclComm`] at world size 1 on `ctx`'s GPU against the result computed
/// on the CPU (at world size 1 every collective returns its input), the device-buffer path, the
/// sequence numbers, argument errors that leave the communicator usable, and an init that
/// times out (world 2 with one rank) instead of hanging. `Err` only when no communicator can be
/// created at all.
pub fn world1_checks(
    ctx: &Arc<CudaContext>,
    seed: u64,
) -> std::result::Result<Vec<NcclCheck>, CudaError> {
    let id = unique_id()?;
    let mut c = NcclComm::init(
        ctx,
        0,
        1,
        &id,
        NcclOpts { timeout: Duration::from_secs(60), ..NcclOpts::default() },
    )?;
    let version = c.nccl_version();
    let mut out = Vec::new();
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let n = 10_007usize;
    let x: Vec<f32> = (0..n).map(|_| next()).collect();
    let mut push = |name: &str, detail: String, r: Result<f64>| {
        out.push(match r {
            Ok(e) => NcclCheck { name: name.into(), detail, err: Some(e), pass: e == 0.0 },
            Err(e) => {
                NcclCheck { name: name.into(), detail: e.to_string(), err: None, pass: false }
            }
        })
    };
    let d = format!("n={n} nccl {version}");
    for (op, tag) in [(ReduceOp::Sum, "sum"), (ReduceOp::Mean, "mean")] {
        let mut b = x.clone();
        let r = c.all_reduce_f32(&mut b, op).map(|_| max_abs_diff(&b, &x));
        push(&format!("all_reduce_f32 {tag}"), d.clone(), r);
    }
    let xd: Vec<f64> = x.iter().map(|&v| v as f64 * 1.000_000_1).collect();
    let mut bd = xd.clone();
    let r = c
        .all_reduce_f64(&mut bd, ReduceOp::Sum)
        .map(|_| bd.iter().zip(&xd).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max));
    push("all_reduce_f64 sum", format!("n={n}"), r);
    let mut part = x[100..1100].to_vec();
    let r = c
        .all_reduce_f32_part(&mut part, 100, n, ReduceOp::Sum)
        .map(|_| max_abs_diff(&part, &x[100..1100]));
    push("all_reduce_f32_part", "1000 of n".into(), r);
    let mut g = vec![f32::NAN; n];
    let r = c.all_gather_f32(&x, &mut g).map(|_| max_abs_diff(&g, &x));
    push("all_gather_f32", d.clone(), r);
    let mut rs = vec![f32::NAN; n];
    let r = c.reduce_scatter_f32(&x, &mut rs, ReduceOp::Sum).map(|_| max_abs_diff(&rs, &x));
    push("reduce_scatter_f32 sum", d.clone(), r);
    let bytes: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut bb = bytes.clone();
    let r = c.broadcast_bytes(&mut bb, 0).map(|_| if bb == bytes { 0.0 } else { 1.0 });
    push("broadcast_bytes", "1001 bytes".into(), r);
    let mut bf = x[..333].to_vec();
    let r = c.broadcast_f32(&mut bf, 0).map(|_| max_abs_diff(&bf, &x[..333]));
    push("broadcast_f32", "n=333".into(), r);
    let mut recv = vec![9u8; 5];
    let r = c.ring_shift_bytes(&bytes, &mut recv).map(|_| if recv == bytes { 0.0 } else { 1.0 });
    push("ring_shift_bytes", "1001 bytes to self".into(), r);
    let mut recv = vec![9u8; 5];
    let r = c
        .ring_shift_bytes_sized(&bytes, &mut recv, bytes.len())
        .map(|_| if recv == bytes { 0.0 } else { 1.0 });
    push("ring_shift_bytes_sized", "1001 bytes to self, one NCCL group".into(), r);
    let r = c.all_gather_bytes(&bytes).map(|v| if v == vec![bytes.clone()] { 0.0 } else { 1.0 });
    push("all_gather_bytes", "1001 bytes".into(), r);
    let r = c.all_gather_bytes(&[]).map(|v| if v == vec![Vec::<u8>::new()] { 0.0 } else { 1.0 });
    push("all_gather_bytes empty", "0 bytes".into(), r);
    let r = c.barrier().map(|_| 0.0);
    push("barrier", "1-element all-reduce".into(), r);
    let r = (|| {
        let stream = ctx.default_stream();
        let mut dbuf = stream.clone_htod(&x).map_err(|e| CommError::Setup(format!("{e:?}")))?;
        c.all_reduce_f32_device(&mut dbuf, ReduceOp::Sum, Some(&stream))?;
        let y = stream.clone_dtoh(&dbuf).map_err(|e| CommError::Setup(format!("{e:?}")))?;
        Ok(max_abs_diff(&y, &x))
    })();
    push("all_reduce_f32_device", format!("{d}, after the compute stream"), r);
    let r = (|| {
        // The device ring's hop: three parts (one of them empty) to itself in one group, after
        // the compute stream; what arrives must be what was sent, the buffers' tails untouched.
        let stream = ctx.default_stream();
        let setup = |e: cudarc::driver::DriverError| CommError::Setup(format!("{e:?}"));
        let (a, b) = (
            stream.clone_htod(&x[..4001]).map_err(setup)?,
            stream.clone_htod(&x[..9]).map_err(setup)?,
        );
        let c3 = stream.clone_htod(&x[5000..7000]).map_err(setup)?;
        let fill = vec![7.0f32; 4100];
        let (mut ra, mut rb, mut rc) = (
            stream.clone_htod(&fill).map_err(setup)?,
            stream.clone_htod(&fill[..9]).map_err(setup)?,
            stream.clone_htod(&fill[..2100]).map_err(setup)?,
        );
        c.ring_exchange_f32_device_enqueue(
            &[(&a, 4001), (&b, 0), (&c3, 1999)],
            &mut [(&mut ra, 4001), (&mut rb, 0), (&mut rc, 1999)],
            Some(&stream),
        )?;
        c.wait()?;
        stream.join(c.stream()).map_err(setup)?;
        let (ya, yb, yc) = (
            stream.clone_dtoh(&ra).map_err(setup)?,
            stream.clone_dtoh(&rb).map_err(setup)?,
            stream.clone_dtoh(&rc).map_err(setup)?,
        );
        let tails = ya[4001..].iter().chain(&yb).chain(&yc[1999..]).all(|&v| v == 7.0);
        let e =
            max_abs_diff(&ya[..4001], &x[..4001]).max(max_abs_diff(&yc[..1999], &x[5000..6999]));
        Ok(if tails { e } else { 1.0 })
    })();
    push("ring_exchange_f32_device", "4001 + 0 + 1999 floats to self, one group".into(), r);
    let r = (|| {
        let bytes = n * 4;
        ctx.bind_to_thread().map_err(|e| CommError::Setup(format!("bind context: {e:?}")))?;
        // SAFETY: a plain managed allocation of n floats, written below before any use, freed
        // at the end of this closure after the all-reduce waited for the stream.
        let p = unsafe { dr::malloc_managed(bytes, ds::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .map_err(|e| CommError::Setup(format!("cuMemAllocManaged: {e:?}")))?;
        // SAFETY: `p` holds n floats and nothing else uses it.
        let m = unsafe { std::slice::from_raw_parts_mut(p as *mut f32, n) };
        m.copy_from_slice(&x);
        let found = managed_range(f32_bytes(&m[5..n - 5])).is_some()
            && managed_range(f32_bytes(&x)).is_none();
        let r = c.all_reduce_f32(m, ReduceOp::Sum).map(|_| max_abs_diff(m, &x));
        // SAFETY: allocated above; the all-reduce has completed (or the communicator was
        // aborted, which also ends its work).
        let _ = unsafe { dr::free_sync(p) };
        match r {
            Ok(e) if found => Ok(e),
            Ok(_) => Err(CommError::Setup("managed memory was not recognised".into())),
            Err(e) => Err(e),
        }
    })();
    push("all_reduce_f32 managed", format!("{d}, in place, no staging"), r);
    // Errors that must not break the communicator.
    let before = c.seq();
    let mut short = vec![0.0f32; n - 1];
    let bad = c.all_gather_f32(&x, &mut short);
    let bad_root = c.broadcast_bytes(&mut bb, 1);
    let after = c.barrier();
    let pass = matches!(bad, Err(CommError::InvalidArgument { .. }))
        && matches!(bad_root, Err(CommError::InvalidArgument { .. }))
        && after.is_ok()
        && c.seq() == before + 3;
    out.push(NcclCheck {
        name: "bad sizes/root rejected".into(),
        detail: match (&bad, &after) {
            (Err(e), Ok(())) => e.to_string().chars().take(60).collect(),
            (_, Err(e)) => format!("barrier after the error failed: {e}"),
            (Ok(()), _) => "a wrong output length was accepted".into(),
        },
        err: None,
        pass,
    });
    out.push(NcclCheck {
        name: "seq counts calls".into(),
        detail: format!("seq {} after 19 calls", c.seq()),
        err: None,
        // Every call above that reaches `begin`, the rejected ones included; the trait's
        // defaults (all_reduce_f32_part, broadcast_f32) make one call each.
        pass: c.seq() == 19,
    });
    out.push(overlap_check(ctx, &mut c, &x));
    drop(c);
    out.push(init_timeout_check(ctx));
    out.push(abort_check(ctx));
    Ok(out)
}

/// [`NcclComm::abort`] (a rank failing for a reason of its own): later calls fail with the
/// reason, and the drop returns at once (no finalize).
fn abort_check(ctx: &Arc<CudaContext>) -> NcclCheck {
    let name = "abort -> calls refused".to_string();
    let opts = NcclOpts { timeout: Duration::from_secs(60), ..NcclOpts::default() };
    let mut c = match unique_id().and_then(|id| NcclComm::init(ctx, 0, 1, &id, opts)) {
        Ok(c) => c,
        Err(e) => return NcclCheck { name, detail: e.to_string(), err: None, pass: false },
    };
    c.abort("self-test");
    let refused =
        matches!(c.barrier(), Err(CommError::Poisoned(m)) if m.contains("aborted: self-test"));
    let t0 = Instant::now();
    drop(c);
    let secs = t0.elapsed().as_secs_f64();
    NcclCheck {
        name,
        detail: format!("barrier refused: {refused}; drop took {secs:.2} s"),
        err: None,
        pass: refused && secs < 5.0,
    }
}

/// [`OverlapAllReduce`] at world size 1: the gradient is written on a compute stream slice by
/// slice from the top (memsets of a value per slice standing in for the backward's kernels,
/// each behind a 64 MiB memset that keeps the stream busy), each slice reported as soon as its
/// write is queued, element 0's last. The buckets must wait for those writes: the taken
/// gradient equals them bitwise (a bucket that ran early would read zeros, or the first run's
/// values the second time). A third run reduces two spans around a frozen hole, which must
/// keep its local values. A host buffer is refused.
fn overlap_check(ctx: &Arc<CudaContext>, c: &mut NcclComm, x: &[f32]) -> NcclCheck {
    let n = x.len();
    let setup =
        |what: &str, e: cudarc::driver::DriverError| CommError::Setup(format!("{what}: {e:?}"));
    let r = (|| -> Result<f64> {
        ctx.bind_to_thread().map_err(|e| setup("bind context", e))?;
        let compute = ctx.new_stream().map_err(|e| setup("create a stream", e))?;
        let busy = 64usize << 20;
        let mut scratch = compute.alloc_zeros::<u8>(busy).map_err(|e| setup("cuMemAlloc", e))?;
        let (scratch_p, _g) = scratch.device_ptr_mut(&compute);
        // SAFETY: a plain managed allocation of n floats, zeroed by the host before any work
        // is queued, freed below after `take` waited for the streams.
        let p = unsafe { dr::malloc_managed(n * 4, ds::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .map_err(|e| setup("cuMemAllocManaged", e))?;
        // SAFETY: `p` holds n floats and nothing else uses it.
        let m = unsafe { std::slice::from_raw_parts_mut(p as *mut f32, n) };
        m.fill(0.0);
        let mut ov = OverlapAllReduce::new(compute.clone(), 4096);
        let host_refused = matches!(
            ov.begin(c, x, std::slice::from_ref(&(0..n))),
            Err(CommError::InvalidArgument { .. })
        );
        // Each slice is written on the device (a memset of its own value, run `base` + slice
        // number), so nothing on the host orders the write before the bucket.
        let run = |ov: &mut OverlapAllReduce,
                   c: &mut NcclComm,
                   m: &mut [f32],
                   base: f32,
                   spans: &[std::ops::Range<usize>]|
         -> Result<Vec<f32>> {
            ov.begin(c, m, spans)?;
            let mut want = vec![0.0f32; n];
            let mut hi = n;
            for (k, lo) in [n * 3 / 4, n / 2, n / 2 - 3, n / 4, 7, 0].into_iter().enumerate() {
                let cu = compute.cu_stream();
                let v = base + k as f32;
                want[lo..hi].fill(v);
                // SAFETY: scratch holds `busy` bytes; m[lo..hi] lies in the managed range and
                // only this stream writes it.
                let w = unsafe {
                    dr::memset_d8_async(scratch_p, 1, busy, cu).and_then(|_| {
                        ds::cuMemsetD32Async(p + (lo * 4) as u64, v.to_bits(), hi - lo, cu).result()
                    })
                };
                w.map_err(|e| setup("queue a write", e))?;
                ov.ready(c, lo, hi - lo)?;
                hi = lo;
            }
            ov.finish(c)?;
            ov.take(c, m)?;
            Ok(want)
        };
        let whole = 0..n;
        let all = std::slice::from_ref(&whole);
        let r = run(&mut ov, c, m, 1.0, all).map(|want| max_abs_diff(m, &want));
        // Twice, with other values: the reduced buffer is kept and reused.
        let again =
            r.and_then(|e| run(&mut ov, c, m, 11.0, all).map(|want| e.max(max_abs_diff(m, &want))));
        // A third time with a frozen hole (the slice written third): it is neither reduced nor
        // copied back, so it keeps this run's write; a copy of the whole reduced buffer would
        // put the second run's value there.
        let spans = [0..n / 2 - 3, n / 2..n];
        let again = again.and_then(|e| {
            run(&mut ov, c, m, 21.0, &spans).map(|want| e.max(max_abs_diff(m, &want)))
        });
        let _ = compute.synchronize();
        // SAFETY: allocated above; `take` waited for the communication stream and the compute
        // stream is idle (or the communicator was aborted, which ends its work).
        let _ = unsafe { dr::free_sync(p) };
        match again {
            Ok(_) if !host_refused => {
                Err(CommError::Setup("a host buffer was accepted as the gradient".into()))
            }
            other => other,
        }
    })();
    match r {
        Ok(e) => NcclCheck {
            name: OVERLAP.into(),
            detail: format!(
                "n={n}, 4 KiB buckets behind compute-stream writes, twice, then with a frozen hole"
            ),
            err: Some(e),
            pass: e == 0.0,
        },
        Err(e) => NcclCheck { name: OVERLAP.into(), detail: e.to_string(), err: None, pass: false },
    }
}

/// World size 2 with only rank 0: init must fail with a timeout (and abort) within seconds.
fn init_timeout_check(ctx: &Arc<CudaContext>) -> NcclCheck {
    let name = "init timeout -> abort".to_string();
    let ctx = ctx.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let opts = NcclOpts { init_timeout: Duration::from_secs(3), ..NcclOpts::default() };
        let r = unique_id().and_then(|id| NcclComm::init(&ctx, 0, 2, &id, opts));
        let _ = tx.send(r.map(|_| ()));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Err(e)) => {
            let s = e.to_string();
            // Any NCCL error within the wait passes (NCCL may give up before the deadline); the
            // point is that init returns instead of hanging.
            let pass = s.contains("NCCL");
            let why = if s.contains("timeout") { "timeout" } else { "error" };
            NcclCheck {
                name,
                detail: format!("{why} after {:.1} s", t0.elapsed().as_secs_f64()),
                err: None,
                pass,
            }
        }
        Ok(Ok(())) => NcclCheck {
            name,
            detail: "init of world 2 with one rank succeeded".into(),
            err: None,
            pass: false,
        },
        Err(_) => NcclCheck {
            name,
            detail: "init did not return within 30 s (hang)".into(),
            err: None,
            pass: false,
        },
    }
}

/// One measured (path, size) of [`bench_local`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct NcclBenchRow {
    /// `nccl-raw` (ncclAllReduce back to back, one wait), `tessera-device`
    /// ([`NcclComm::all_reduce_f32_device_enqueue`] back to back, one watchdog wait),
    /// `tessera-sync` (a watchdog wait after every call) or `tessera-host` (the
    /// [`Communicator`] API: pinned staging, copies in and out).
    pub path: &'static str,
    pub world: usize,
    pub bytes: usize,
    /// Mean microseconds per all-reduce, the maximum over ranks.
    pub time_us: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
    /// Every element of every rank equal to the exact sum (small integers).
    pub check: bool,
}

/// Times all-reduce (f32 sum) of every size in `sizes` (bytes) on GPUs `0..world` (`world` 0:
/// every visible GPU), one thread and one [`NcclComm`] per GPU, through raw NCCL and through
/// Tessera, in the same run.
pub fn bench_local(
    world: usize,
    sizes: &[usize],
    iters: usize,
    warmup: usize,
    opts: NcclOpts,
) -> std::result::Result<Vec<NcclBenchRow>, CudaError> {
    if iters == 0 || sizes.is_empty() {
        return Err(CudaError::Invalid("nccl-bench: iters and the sizes must not be empty".into()));
    }
    require(Lib::Driver)?;
    require(Lib::Nccl)?;
    let n = CudaContext::device_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
    let world = if world == 0 { n.max(1) as usize } else { world };
    if world > n.max(0) as usize {
        return Err(CudaError::Invalid(format!(
            "nccl-bench: world size {world} needs {world} GPUs; the driver reports {n}"
        )));
    }
    let id = unique_id()?;
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let (sizes, opts) = (sizes.to_vec(), opts.clone());
            std::thread::spawn(move || -> std::result::Result<Vec<NcclBenchRow>, CudaError> {
                let ctx =
                    CudaContext::new(r).map_err(|e| CudaError::driver("create context", e))?;
                let mut c = NcclComm::init(&ctx, r, world, &id, opts)?;
                bench_rank(&mut c, &sizes, iters, warmup).map_err(|e| CudaError::Nccl {
                    what: "nccl-bench".into(),
                    detail: e.to_string(),
                })
            })
        })
        .collect();
    let mut per_rank = Vec::new();
    for h in handles {
        match h.join() {
            Ok(r) => per_rank.push(r?),
            Err(_) => return Err(CudaError::Invalid("nccl-bench: a rank thread panicked".into())),
        }
    }
    let mut rows = per_rank.first().cloned().unwrap_or_default();
    for (i, row) in rows.iter_mut().enumerate() {
        for other in &per_rank[1..] {
            if let Some(o) = other.get(i) {
                row.time_us = row.time_us.max(o.time_us);
                row.check &= o.check;
            }
        }
        let (a, b) = all_reduce_bandwidth(row.bytes, row.time_us * 1e-6, row.world);
        row.algbw_gbs = a;
        row.busbw_gbs = b;
    }
    Ok(rows)
}

/// A byte count: digits with an optional K, M or G suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Option<usize> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1usize << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v: usize = digits.parse().ok()?;
    v.checked_mul(mult).filter(|&b| b > 0)
}

/// The rows of [`bench_local`] as a table, with Tessera's bus bandwidth relative to raw NCCL
/// per size (algorithm bandwidth at world size 1, where the bus factor is 0).
pub fn bench_table(rows: &[NcclBenchRow]) -> String {
    let mut s = format!(
        "{:>12} {:<15} {:>11} {:>10} {:>10} {:>8} {:>6}\n",
        "bytes", "path", "time_us", "algbw", "busbw", "vs_raw", "check"
    );
    for r in rows {
        let raw = rows.iter().find(|o| o.path == "nccl-raw" && o.bytes == r.bytes);
        let ratio = raw.map_or(f64::NAN, |o| {
            if r.world > 1 { r.busbw_gbs / o.busbw_gbs } else { r.algbw_gbs / o.algbw_gbs }
        });
        s += &format!(
            "{:>12} {:<15} {:>11.1} {:>10.2} {:>10.2} {:>8.3} {:>6}\n",
            r.bytes,
            r.path,
            r.time_us,
            r.algbw_gbs,
            r.busbw_gbs,
            ratio,
            if r.check { "ok" } else { "WRONG" }
        );
    }
    s
}

/// Exact-sum check values: small integers, so any summation order gives the exact sum.
fn check_value(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 251 + 1)) as f32
}

/// One rank's part of [`bench_local`].
pub fn bench_rank(
    c: &mut NcclComm,
    sizes: &[usize],
    iters: usize,
    warmup: usize,
) -> Result<Vec<NcclBenchRow>> {
    let (rank, world) = (c.rank, c.world);
    let setup = |e: cudarc::driver::DriverError| CommError::Setup(format!("nccl-bench: {e:?}"));
    let stream = c.stream().clone();
    let mut rows = Vec::new();
    for &size in sizes {
        let count = (size / 4).max(1);
        let bytes = count * 4;
        let init: Vec<f32> = (0..count).map(|i| check_value(rank, i)).collect();
        let expect: Vec<f32> =
            (0..count).map(|i| ((i % 251 + 1) * world * (world + 1) / 2) as f32).collect();
        let mut buf = stream.clone_htod(&init).map_err(setup)?;
        // Correctness first (one sum), then the timings on the same buffer.
        c.all_reduce_f32_device(&mut buf, ReduceOp::Sum, None)?;
        let got = stream.clone_dtoh(&buf).map_err(setup)?;
        let check = got == expect;
        let ev = |c: &NcclComm| {
            c.ctx.new_event(Some(ds::CUevent_flags::CU_EVENT_DEFAULT)).map_err(setup)
        };
        let (start, stop) = (ev(c)?, ev(c)?);
        let mut time = |c: &mut NcclComm, path: &'static str| -> Result<NcclBenchRow> {
            let mut run = |c: &mut NcclComm, k: usize| -> Result<()> {
                if path == "nccl-raw" {
                    let cu = stream.cu_stream() as ns::cudaStream_t;
                    let (p, guard) = buf.device_ptr_mut(&stream);
                    for _ in 0..k {
                        // SAFETY: `buf` holds count floats on this device; in place.
                        let r = unsafe {
                            nr::all_reduce(
                                p as *const _,
                                p as *mut _,
                                count,
                                ns::ncclDataType_t::ncclFloat32,
                                ns::ncclRedOp_t::ncclSum,
                                c.comm.0,
                                cu,
                            )
                        };
                        c.check("nccl-bench raw", c.seq, "ncclAllReduce", r)?;
                    }
                    drop(guard);
                } else {
                    for _ in 0..k {
                        if path == "tessera-device" {
                            c.all_reduce_f32_device_enqueue(&mut buf, ReduceOp::Sum, None)?;
                        } else {
                            c.all_reduce_f32_device(&mut buf, ReduceOp::Sum, None)?;
                        }
                    }
                }
                Ok(())
            };
            run(c, warmup)?;
            c.wait()?;
            // The stop event is queued before the host waits, so the wait's polling is not
            // timed (for tessera-sync the waits between calls are, as they are its cost).
            start.record(&stream).map_err(setup)?;
            run(c, iters)?;
            stop.record(&stream).map_err(setup)?;
            c.wait()?;
            let ms = start.elapsed_ms(&stop).map_err(setup)? as f64;
            Ok(row(path, world, bytes, ms * 1e3 / iters as f64, check))
        };
        for path in ["nccl-raw", "tessera-device", "tessera-sync"] {
            rows.push(time(c, path)?);
        }
        let mut host = init.clone();
        for _ in 0..warmup {
            c.all_reduce_f32(&mut host, ReduceOp::Sum)?;
        }
        let t0 = Instant::now();
        for _ in 0..iters {
            c.all_reduce_f32(&mut host, ReduceOp::Sum)?;
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
        rows.push(row("tessera-host", world, bytes, us, check));
    }
    Ok(rows)
}

fn row(path: &'static str, world: usize, bytes: usize, time_us: f64, check: bool) -> NcclBenchRow {
    let (a, b) = all_reduce_bandwidth(bytes, time_us * 1e-6, world);
    NcclBenchRow { path, world, bytes, time_us, algbw_gbs: a, busbw_gbs: b, check }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_ops_map_sum_and_mean() {
        assert_eq!(nccl_op(ReduceOp::Sum), ns::ncclRedOp_t::ncclSum);
        assert_eq!(nccl_op(ReduceOp::Mean), ns::ncclRedOp_t::ncclAvg);
    }

    #[test]
    fn nccl_busbw_follows_nccl_tests() {
        assert_eq!(all_reduce_bus_factor(1), 0.0);
        assert_eq!(all_reduce_bus_factor(2), 1.0);
        assert!((all_reduce_bus_factor(8) - 1.75).abs() < 1e-12);
        let (alg, bus) = all_reduce_bandwidth(1_000_000_000, 0.5, 4);
        assert!((alg - 2.0).abs() < 1e-12 && (bus - 3.0).abs() < 1e-12, "{alg} {bus}");
        assert_eq!(all_reduce_bandwidth(100, 0.0, 4), (0.0, 0.0));
        let (alg1, bus1) = all_reduce_bandwidth(4096, 1e-6, 1);
        assert!((alg1 - 4.096).abs() < 1e-9 && bus1 == 0.0);
    }

    #[test]
    fn nccl_all_gather_bytes_padding_round_trips() {
        let msgs: Vec<Vec<u8>> =
            vec![b"abc".to_vec(), Vec::new(), b"hello!".to_vec(), b"x".to_vec()];
        let lens: Vec<usize> = msgs.iter().map(Vec::len).collect();
        let width = *lens.iter().max().unwrap();
        let padded: Vec<u8> = msgs.iter().flat_map(|m| pad_message(m, width)).collect();
        assert_eq!(padded.len(), 4 * width);
        assert_eq!(&padded[..width], b"abc\0\0\0");
        assert_eq!(unpad_messages(&padded, &lens, width).unwrap(), msgs);
        // All empty: zero-width slots.
        assert_eq!(unpad_messages(&[], &[0, 0], 0).unwrap(), vec![Vec::<u8>::new(); 2]);
        // Inconsistent sizes are refused, not sliced out of bounds.
        assert!(unpad_messages(&padded, &[3, 0, 7, 1], width).is_none());
        assert!(unpad_messages(&padded[1..], &lens, width).is_none());
        assert!(unpad_messages(&padded, &lens, usize::MAX).is_none());
    }

    #[test]
    fn nccl_lengths_decode_and_refuse_oversized() {
        let mut w = Vec::new();
        for v in [5u64, 0, 1 << 20] {
            w.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(decode_lengths(&w, 1 << 20).unwrap(), vec![5, 0, 1 << 20]);
        assert_eq!(decode_lengths(&w, 1000), Err((2, 1 << 20)));
    }

    #[test]
    fn nccl_id_exchange_reads_the_store_on_other_ranks() {
        let id = vec![7u8; NCCL_ID_BYTES];
        let got = exchange_id(
            2,
            4,
            &nccl_id_key(3),
            Duration::from_secs(5),
            |_, _| Err("only rank 0 publishes".into()),
            |k, t| {
                assert_eq!((k, t), ("tessera/nccl-id/3", Duration::from_secs(5)));
                Ok(id.clone())
            },
        )
        .unwrap();
        assert_eq!(got, id);
        let e = exchange_id(
            1,
            2,
            "k",
            Duration::from_secs(1),
            |_, _| Ok(()),
            |_, _| Err("store get timed out".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no NCCL id under \"k\"") && e.contains("store get timed out"), "{e}");
        let e =
            exchange_id(1, 2, "k", Duration::from_secs(1), |_, _| Ok(()), |_, _| Ok(vec![1; 5]))
                .unwrap_err()
                .to_string();
        assert!(e.contains("128 bytes") && e.contains("got 5"), "{e}");
    }

    #[test]
    fn nccl_bench_sizes_parse_and_table_compares_with_raw() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("64K"), Some(65536));
        assert_eq!(parse_bytes("16m"), Some(16 << 20));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        for bad in ["", "M", "0", "-4", "1.5M", "12X", "99999999999999999999G"] {
            assert_eq!(parse_bytes(bad), None, "{bad:?}");
        }
        let rows = vec![
            row("nccl-raw", 4, 1 << 20, 100.0, true),
            row("tessera-device", 4, 1 << 20, 125.0, true),
            row("tessera-host", 4, 1 << 20, 400.0, false),
        ];
        let t = bench_table(&rows);
        assert!(t.contains("   1.000") && t.contains("   0.800") && t.contains("   0.250"), "{t}");
        assert!(t.contains("WRONG"), "{t}");
        // World size 1: the bus factor is 0, so the ratio uses algbw.
        let t1 = bench_table(&[
            row("nccl-raw", 1, 4096, 10.0, true),
            row("tessera-sync", 1, 4096, 20.0, true),
        ]);
        assert!(t1.contains("   0.500"), "{t1}");
    }

    #[test]
    fn nccl_staging_grows_in_powers_of_two() {
        assert_eq!(staging_capacity(0), 256);
        assert_eq!(staging_capacity(257), 512);
        assert_eq!(staging_capacity(4096), 4096);
        assert_eq!(staging_capacity(usize::MAX), usize::MAX);
    }

    #[test]
    fn nccl_config_is_the_initializer_with_blocking_off() {
        let c = nonblocking_config(22_805);
        assert_eq!(c.size, std::mem::size_of::<ns::ncclConfig_t>());
        assert_eq!((c.magic, c.version, c.blocking), (0xcafe_beef, 22_805, 0));
        assert_eq!((c.cgaClusterSize, c.maxP2pPeers), (i32::MIN, i32::MIN));
        assert!(c.netName.is_null() && c.commName.is_null());
        // A newer NCCL than the bindings: declared at the bindings' version.
        assert_eq!(nonblocking_config(23_105).version, 23_000);
    }

    #[test]
    fn nccl_id_and_rank_arguments_are_checked() {
        let e = id_from_bytes(&[0u8; 12]).unwrap_err().to_string();
        assert!(e.contains("128 bytes") && e.contains("got 12"), "{e}");
        let id = id_from_bytes(&[0xffu8; NCCL_ID_BYTES]).unwrap();
        assert!(id.internal.iter().all(|&c| c as u8 == 0xff));
        for (rank, world) in [(0, 0), (2, 2), (5, 3)] {
            let e = check_rank_world(rank, world).unwrap_err().to_string();
            assert!(e.contains(&format!("rank {rank} of world size {world}")), "{e}");
        }
        check_rank_world(1, 2).unwrap();
        // Bad arguments are reported before any library is touched.
        let e = NcclComm::open(0, 3, 2, &[0u8; NCCL_ID_BYTES], NcclOpts::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank 3 of world size 2"), "{e}");
        assert_eq!(nccl_id_key(7), "tessera/nccl-id/7");
    }

    #[test]
    fn nccl_without_driver_or_library_is_a_clean_error() {
        let id = [0u8; NCCL_ID_BYTES];
        match (Lib::Driver.present(), Lib::Nccl.present()) {
            (false, _) => {
                let e =
                    NcclComm::open(0, 0, 1, &id, NcclOpts::default()).err().unwrap().to_string();
                assert!(e.contains("libcuda.so.1") && e.contains("NVIDIA driver"), "{e}");
                let e = NcclComm::open_via_store(
                    0,
                    1,
                    2,
                    "k",
                    NcclOpts::default(),
                    |_, _| Ok(()),
                    |_, _| Ok(vec![0; NCCL_ID_BYTES]),
                )
                .err()
                .unwrap()
                .to_string();
                assert!(e.contains("libcuda.so.1"), "{e}");
                let e = bench_local(1, &[4096], 1, 0, NcclOpts::default()).unwrap_err().to_string();
                assert!(e.contains("libcuda.so.1"), "{e}");
            }
            (true, false) => {
                let e =
                    NcclComm::open(0, 0, 1, &id, NcclOpts::default()).err().unwrap().to_string();
                assert!(e.contains("libnccl.so.2") && e.contains("nvidia-nccl-cu13"), "{e}");
            }
            (true, true) => {
                // A machine with a GPU and NCCL: world size 1 must work end to end.
                let id = unique_id().unwrap();
                let mut c = NcclComm::open(0, 0, 1, &id, NcclOpts::default()).unwrap();
                let mut v = vec![1.5f32, -2.0];
                c.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap();
                assert_eq!(v, vec![1.5, -2.0]);
            }
        }
        if Lib::Nccl.present() {
            // No GPU is needed for these: the id, the version, NCCL's error strings, and rank 0
            // of the store exchange publishing the id.
            assert_eq!(unique_id().unwrap().len(), NCCL_ID_BYTES);
            assert!(nr::get_nccl_version().unwrap() >= 21000);
            let d = describe(ns::ncclResult_t::ncclInvalidArgument);
            assert!(d.starts_with("ncclInvalidArgument (") && d.len() > 25, "{d}");
            let mut published = Vec::new();
            let id = exchange_id(
                0,
                2,
                "k",
                Duration::from_secs(1),
                |k, v| {
                    assert_eq!(k, "k");
                    published = v.to_vec();
                    Ok(())
                },
                |_, _| Err("rank 0 does not read".into()),
            )
            .unwrap();
            assert_eq!((id.len(), &published), (NCCL_ID_BYTES, &id));
        } else {
            let e = unique_id().unwrap_err().to_string();
            assert!(e.contains("libnccl.so.2") && e.contains("nvidia-nccl-cu13"), "{e}");
            let mut published = false;
            let r = exchange_id(
                0,
                2,
                "k",
                Duration::from_secs(1),
                |_, _| {
                    published = true;
                    Ok(())
                },
                |_, _| Err("rank 0 does not read".into()),
            );
            assert!(r.unwrap_err().to_string().contains("libnccl.so.2"));
            assert!(!published, "nothing is published without an id");
        }
    }
}
