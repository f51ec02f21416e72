//! Checkpoints: everything a run needs to continue bitwise where it stopped, in one file.
//!
//! A checkpoint file `ckpt-<step:08>.tsr` is a fixed 64-byte header followed by an rkyv archive
//! of [`Checkpoint`]. Header (little-endian):
//!
//! | bytes  | field                                                   |
//! |--------|---------------------------------------------------------|
//! | 0..8   | magic `TSRACKPT`                                        |
//! | 8..12  | format version ([`CHECKPOINT_FORMAT_VERSION`])          |
//! | 12..16 | header length (64)                                      |
//! | 16..24 | payload length in bytes (file length = 64 + this)       |
//! | 24..56 | SHA-256 of the payload                                  |
//! | 56..64 | reserved, zero                                          |
//!
//! Reading checks the magic, the version, the length, the checksum, then validates the archive
//! (bytecheck) and its contents (tensors tile the parameters, sizes agree) before anything is
//! used, so a damaged file is an error that names it, never a panic.
//!
//! What is saved: the flat parameters (the logit scale and bias live there) with the tensor
//! table (names, shapes; `tessera export` needs nothing else), the optimizer state (momentum or
//! LAMB's moments and its step count, [`Optimizer::state_bytes`]), the step, the sampler's
//! position (epoch and step within it: the sampler is a pure function of seed and step), the
//! seed (the augmentations and every other random stream derive from seed and step; nothing
//! random is stateful), the noise-scale averages, the adaptive batch schedule (format version
//! 2; with it the sampler's position is a pure function of the schedule), the config's resume hash
//! ([`Config::resume_hash`]) and the whole resolved config, and the world size.
//!
//! Writing is atomic: rank 0 writes a temporary file in the checkpoint directory, fsyncs it,
//! renames it into place and fsyncs the directory; only then are checkpoints beyond the newest
//! `checkpoint.keep` deleted. Every rank holds bitwise identical state (data parallel), so one
//! writer is enough. Resuming, rank 0 reads the file and broadcasts its bytes to the other
//! ranks, so only rank 0 needs to see the checkpoint directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rkyv::{Archive, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_collectives::{CommError, Communicator};

use crate::atomic_file::{AtomicWriteError, sync_dir, write_atomic, write_atomic_with};
use crate::config::{Config, differing_keys};
use crate::device::DeviceBuf;
use crate::gns::{BatchChange, BatchSchedule, GnsEstimator, GnsReport, GnsState};
use crate::model::Model;
use crate::optim::Optimizer;

pub const CHECKPOINT_MAGIC: &[u8; 8] = b"TSRACKPT";
/// Version 2 added the adaptive batch schedule; version 1 files are still read (as runs with
/// a fixed batch).
pub const CHECKPOINT_FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const CHECKPOINT_OLDEST_VERSION: u32 = 1;
pub const CHECKPOINT_HEADER_LEN: usize = 64;
const FILE_PREFIX: &str = "ckpt-";
const FILE_SUFFIX: &str = ".tsr";
const DAMAGED_HINT: &str = "resume from an older checkpoint (checkpoint.resume = \"auto\" skips \
                            damaged files), or move this file away";

/// What went wrong reading, writing or resuming a checkpoint; every message names the file (or
/// directory) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "{origin}: not a Tessera checkpoint (it starts with {found:?}, not \"TSRACKPT\"); pass a \
         ckpt-*.tsr file written by tessera"
    )]
    BadMagic { origin: String, found: String },
    #[error(
        "{origin}: checkpoint format version {found}, but this build reads versions 1 to \
         {supported}; use the tessera build that wrote it"
    )]
    UnsupportedVersion { origin: String, found: u32, supported: u32 },
    #[error(
        "{origin}: truncated: {actual} bytes, but the header says {expected} (the write was cut \
         short); {DAMAGED_HINT}"
    )]
    Truncated { origin: String, expected: u64, actual: u64 },
    #[error(
        "{origin}: checksum mismatch (stored sha256 {stored}, computed {computed}): the file is \
         corrupt; {DAMAGED_HINT}"
    )]
    Checksum { origin: String, stored: String, computed: String },
    #[error("{origin}: invalid checkpoint: {reason}; {DAMAGED_HINT}")]
    Invalid { origin: String, reason: String },
    #[error("cannot resume from {origin}: {reason}")]
    Incompatible { origin: String, reason: String },
    #[error("no usable checkpoint in {dir}: {reason}")]
    NoneUsable { dir: PathBuf, reason: String },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("saving the checkpoint of step {step}: {source}")]
    Save { step: u64, source: Box<CheckpointError> },
    #[error("rank 0: {0}")]
    Remote(String),
    #[error("checkpoint: {0}")]
    Comm(CommError),
}

// Not `#[from]`: that would make the CommError the source too, and `{:#}` would print it twice.
impl From<CommError> for CheckpointError {
    fn from(e: CommError) -> Self {
        CheckpointError::Comm(e)
    }
}

impl From<AtomicWriteError> for CheckpointError {
    fn from(AtomicWriteError { op, path, source }: AtomicWriteError) -> CheckpointError {
        CheckpointError::Io { op, path, source }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { op, path, source }
}

/// One parameter tensor: a slice of the flat parameter buffer.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// Row-major, e.g. `[fan_in, fan_out]` for a weight, `[]` for the logit scale.
    pub shape: Vec<u64>,
    pub trainable: bool,
}

impl TensorInfo {
    /// The tensor table of `model`.
    pub fn of<B: DeviceBuf>(model: &Model<B>) -> Vec<TensorInfo> {
        model
            .param_groups()
            .into_iter()
            .map(|g| TensorInfo {
                name: g.name,
                offset: g.offset as u64,
                len: g.len as u64,
                shape: g.shape.iter().map(|&d| d as u64).collect(),
                trainable: g.trainable,
            })
            .collect()
    }
}

/// A [`GnsReport`] as archived.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct GnsReportRecord {
    pub step: u64,
    pub samples: u64,
    pub examples: u64,
    pub trace_sigma: Option<f64>,
    pub grad_sq: Option<f64>,
    pub b_simple_raw: Option<f64>,
    pub trace_sigma_ema: Option<f64>,
    pub grad_sq_ema: Option<f64>,
    pub b_simple: Option<f64>,
    pub group_b_simple: Vec<Option<f64>>,
}

impl From<&GnsReport> for GnsReportRecord {
    fn from(r: &GnsReport) -> Self {
        GnsReportRecord {
            step: r.step,
            samples: r.samples as u64,
            examples: r.examples as u64,
            trace_sigma: r.trace_sigma,
            grad_sq: r.grad_sq,
            b_simple_raw: r.b_simple_raw,
            trace_sigma_ema: r.trace_sigma_ema,
            grad_sq_ema: r.grad_sq_ema,
            b_simple: r.b_simple,
            group_b_simple: r.group_b_simple.clone(),
        }
    }
}

impl From<&GnsReportRecord> for GnsReport {
    fn from(r: &GnsReportRecord) -> Self {
        GnsReport {
            step: r.step,
            samples: r.samples as usize,
            examples: r.examples as usize,
            trace_sigma: r.trace_sigma,
            grad_sq: r.grad_sq,
            b_simple_raw: r.b_simple_raw,
            trace_sigma_ema: r.trace_sigma_ema,
            grad_sq_ema: r.grad_sq_ema,
            b_simple: r.b_simple,
            group_b_simple: r.group_b_simple.clone(),
        }
    }
}

/// The noise-scale estimator's averages ([`GnsState`]) as archived.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct GnsRecord {
    pub steps: u64,
    /// `[value, weight]` per slot.
    pub ema_s: Vec<[f64; 2]>,
    pub ema_g: Vec<[f64; 2]>,
    pub last: Option<GnsReportRecord>,
}

impl From<&GnsState> for GnsRecord {
    fn from(s: &GnsState) -> Self {
        GnsRecord {
            steps: s.steps,
            ema_s: s.ema_s.iter().map(|&(v, w)| [v, w]).collect(),
            ema_g: s.ema_g.iter().map(|&(v, w)| [v, w]).collect(),
            last: s.last.as_ref().map(GnsReportRecord::from),
        }
    }
}

impl From<&GnsRecord> for GnsState {
    fn from(r: &GnsRecord) -> Self {
        GnsState {
            steps: r.steps,
            ema_s: r.ema_s.iter().map(|&[v, w]| (v, w)).collect(),
            ema_g: r.ema_g.iter().map(|&[v, w]| (v, w)).collect(),
            last: r.last.as_ref().map(GnsReport::from),
        }
    }
}

/// One change of the global batch ([`BatchChange`]) as archived.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BatchChangeRecord {
    /// The first step (0-based) that runs with `batch`.
    pub step: u64,
    pub batch: u64,
    pub b_simple: f64,
    pub lr_factor: f64,
}

impl From<&BatchChange> for BatchChangeRecord {
    fn from(c: &BatchChange) -> Self {
        BatchChangeRecord {
            step: c.step,
            batch: c.batch as u64,
            b_simple: c.b_simple,
            lr_factor: c.lr_factor,
        }
    }
}

impl From<&BatchChangeRecord> for BatchChange {
    fn from(c: &BatchChangeRecord) -> Self {
        BatchChange {
            step: c.step,
            batch: c.batch as usize,
            b_simple: c.b_simple,
            lr_factor: c.lr_factor,
        }
    }
}

/// The archived batch schedule as a [`BatchSchedule`].
pub fn schedule_of(records: &[BatchChangeRecord]) -> BatchSchedule {
    BatchSchedule { changes: records.iter().map(BatchChange::from).collect() }
}

/// Everything in a checkpoint file after the header.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps completed: training continues with step index `step`.
    pub step: u64,
    /// `run.steps` of the run that wrote it.
    pub total_steps: u64,
    /// Ranks of the run that wrote it.
    pub world: u32,
    pub seed: u64,
    pub global_batch: u64,
    /// The sampler's position: epoch `step / steps_per_epoch`, batch `step % steps_per_epoch`.
    pub epoch: u64,
    pub epoch_step: u64,
    /// [`Config::resume_hash`] of the run that wrote it.
    pub config_hash: String,
    /// The resolved configuration (TOML) of the run that wrote it.
    pub config_toml: String,
    /// The tensors, in buffer order, tiling `params` exactly.
    pub tensors: Vec<TensorInfo>,
    pub params: Vec<f32>,
    /// `optim.name` and [`Optimizer::state_bytes`].
    pub optimizer_name: String,
    pub optimizer_state: Vec<u8>,
    /// The noise-scale averages (None when the run did not measure it).
    pub gns: Option<GnsRecord>,
    /// The loss of the last completed step.
    pub last_loss: f32,
    /// The adaptive batch schedule so far (None: the run had a fixed batch, `global_batch`);
    /// with one, `epoch`/`epoch_step` are those of a fixed `global_batch` and the sampler's
    /// true position follows from the schedule. Since format version 2.
    pub batch_schedule: Option<Vec<BatchChangeRecord>>,
}

/// [`Checkpoint`] as format version 1 archived it (no batch schedule).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckpointV1 {
    pub step: u64,
    pub total_steps: u64,
    pub world: u32,
    pub seed: u64,
    pub global_batch: u64,
    pub epoch: u64,
    pub epoch_step: u64,
    pub config_hash: String,
    pub config_toml: String,
    pub tensors: Vec<TensorInfo>,
    pub params: Vec<f32>,
    pub optimizer_name: String,
    pub optimizer_state: Vec<u8>,
    pub gns: Option<GnsRecord>,
    pub last_loss: f32,
}

impl From<CheckpointV1> for Checkpoint {
    fn from(c: CheckpointV1) -> Self {
        Checkpoint {
            step: c.step,
            total_steps: c.total_steps,
            world: c.world,
            seed: c.seed,
            global_batch: c.global_batch,
            epoch: c.epoch,
            epoch_step: c.epoch_step,
            config_hash: c.config_hash,
            config_toml: c.config_toml,
            tensors: c.tensors,
            params: c.params,
            optimizer_name: c.optimizer_name,
            optimizer_state: c.optimizer_state,
            gns: c.gns,
            last_loss: c.last_loss,
            batch_schedule: None,
        }
    }
}

/// The file name of the checkpoint after `step` steps.
pub fn checkpoint_file_name(step: u64) -> String {
    format!("{FILE_PREFIX}{step:08}{FILE_SUFFIX}")
}

/// The step of a checkpoint file name (None for other names).
fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The complete bytes of a checkpoint file.
pub fn encode(ck: &Checkpoint) -> Result<Vec<u8>, CheckpointError> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(ck).map_err(|e| {
        CheckpointError::Invalid { origin: "new checkpoint".into(), reason: e.to_string() }
    })?;
    let mut out = Vec::with_capacity(CHECKPOINT_HEADER_LEN + payload.len());
    out.extend_from_slice(CHECKPOINT_MAGIC);
    out.extend_from_slice(&CHECKPOINT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(CHECKPOINT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Parses and validates checkpoint bytes (for fuzzing and tools; files: [`load_checkpoint`]).
pub fn read_checkpoint(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    decode(bytes, "checkpoint")
}

/// Parses and validates checkpoint bytes; `origin` (a file name) prefixes every error.
pub fn decode(bytes: &[u8], origin: &str) -> Result<Checkpoint, CheckpointError> {
    let origin_s = || origin.to_string();
    let invalid = |reason: String| CheckpointError::Invalid { origin: origin_s(), reason };
    if bytes.len() < CHECKPOINT_MAGIC.len() || &bytes[..8] != CHECKPOINT_MAGIC {
        let n = bytes.len().min(8);
        return Err(CheckpointError::BadMagic {
            origin: origin_s(),
            found: String::from_utf8_lossy(&bytes[..n]).into_owned(),
        });
    }
    if bytes.len() < CHECKPOINT_HEADER_LEN {
        return Err(CheckpointError::Truncated {
            origin: origin_s(),
            expected: CHECKPOINT_HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if !(CHECKPOINT_OLDEST_VERSION..=CHECKPOINT_FORMAT_VERSION).contains(&version) {
        return Err(CheckpointError::UnsupportedVersion {
            origin: origin_s(),
            found: version,
            supported: CHECKPOINT_FORMAT_VERSION,
        });
    }
    if u32_at(12) as usize != CHECKPOINT_HEADER_LEN || bytes[56..64].iter().any(|&b| b != 0) {
        return Err(invalid(
            "corrupt header (bad header length or non-zero reserved bytes)".into(),
        ));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let payload_len = u64::from_le_bytes(len);
    let expected = (CHECKPOINT_HEADER_LEN as u64).saturating_add(payload_len);
    let actual = bytes.len() as u64;
    if actual < expected {
        return Err(CheckpointError::Truncated { origin: origin_s(), expected, actual });
    }
    if actual > expected {
        return Err(invalid(format!(
            "{} bytes after the {expected} the header announces",
            actual - expected
        )));
    }
    let payload = &bytes[CHECKPOINT_HEADER_LEN..];
    let computed = Sha256::digest(payload);
    if computed.as_slice() != &bytes[24..56] {
        return Err(CheckpointError::Checksum {
            origin: origin_s(),
            stored: hex(&bytes[24..56]),
            computed: hex(&computed),
        });
    }
    // rkyv wants the archive aligned; a slice from anywhere may not be.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let ck = if version == 1 {
        rkyv::from_bytes::<CheckpointV1, rkyv::rancor::Error>(&aligned).map(Checkpoint::from)
    } else {
        rkyv::from_bytes::<Checkpoint, rkyv::rancor::Error>(&aligned)
    }
    .map_err(|e| invalid(format!("archive failed validation: {e}")))?;
    check_contents(&ck).map_err(invalid)?;
    Ok(ck)
}

/// The invariants a checkpoint's contents must satisfy before anything uses them.
fn check_contents(ck: &Checkpoint) -> Result<(), String> {
    if ck.world == 0 {
        return Err("world size 0".into());
    }
    if ck.step > ck.total_steps {
        return Err(format!("step {} is past run.steps = {}", ck.step, ck.total_steps));
    }
    let mut next = 0u64;
    let mut names = std::collections::HashSet::new();
    for t in &ck.tensors {
        if t.name.is_empty() || !names.insert(t.name.as_str()) {
            return Err(format!("tensor name {:?} is empty or repeated", t.name));
        }
        if t.offset != next {
            return Err(format!(
                "tensor {:?} starts at {} but the previous one ends at {next}",
                t.name, t.offset
            ));
        }
        let elems = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if elems != Some(t.len) {
            return Err(format!(
                "tensor {:?} has shape {:?} but {} values",
                t.name, t.shape, t.len
            ));
        }
        next = next.checked_add(t.len).ok_or("tensor sizes overflow")?;
    }
    if next != ck.params.len() as u64 {
        return Err(format!(
            "the tensors cover {next} values but {} parameters are stored",
            ck.params.len()
        ));
    }
    if let Some(g) = &ck.gns
        && (g.ema_s.is_empty() || g.ema_s.len() != g.ema_g.len())
    {
        return Err(format!(
            "noise-scale averages of {} and {} slots",
            g.ema_s.len(),
            g.ema_g.len()
        ));
    }
    if let Some(changes) = &ck.batch_schedule {
        let mut after = 0u64;
        for c in changes {
            if c.batch == 0 || c.step <= after {
                return Err(format!(
                    "batch schedule entry (step {}, batch {}) is out of order or empty",
                    c.step, c.batch
                ));
            }
            after = c.step;
        }
    }
    Ok(())
}

/// Reads and validates a checkpoint file.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = fs::read(path).map_err(io_err("reading checkpoint", path))?;
    decode(&bytes, &path.display().to_string())
}

/// The checkpoint files in `dir` (by name), oldest step first; empty when `dir` does not exist.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        if let Some(step) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint found on disk: where, its bytes, its contents, and the newer files that were
/// skipped because they are damaged (path and reason).
pub struct Found {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub checkpoint: Checkpoint,
    pub skipped: Vec<String>,
}

/// The newest checkpoint in `dir` that reads and validates, skipping damaged ones. Ok(None)
/// when `dir` holds no checkpoint files; an error when it holds only damaged ones.
pub fn latest_valid(dir: &Path) -> Result<Option<Found>, CheckpointError> {
    let files = list_checkpoints(dir)?;
    if files.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    for (_, path) in files.iter().rev() {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                skipped.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        match decode(&bytes, &path.display().to_string()) {
            Ok(checkpoint) => {
                return Ok(Some(Found { path: path.clone(), bytes, checkpoint, skipped }));
            }
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Err(CheckpointError::NoneUsable {
        dir: dir.to_path_buf(),
        reason: format!(
            "all {} checkpoint files are damaged [{}]; move them away (or set \
             checkpoint.resume = \"\") to start over",
            files.len(),
            skipped.join("; ")
        ),
    })
}

/// Writes `ck` into `dir` atomically as [`checkpoint_file_name`]`(ck.step)` (temporary file,
/// fsync, rename, fsync of the directory), then deletes all but the newest `keep` checkpoints
/// (0: keep all) and stale temporary files. Returns the path and the size in bytes.
pub fn write_checkpoint(
    dir: &Path,
    ck: &Checkpoint,
    keep: usize,
) -> Result<(PathBuf, u64), CheckpointError> {
    let bytes = encode(ck)?;
    fs::create_dir_all(dir).map_err(io_err("creating checkpoint directory", dir))?;
    let path = dir.join(checkpoint_file_name(ck.step));
    // Fault-injection tests kill the process halfway, with half of the file written.
    write_atomic_with(&path, &bytes, crate::fault::at_checkpoint)?;
    prune(dir, keep, ck.step)?;
    Ok((path, bytes.len() as u64))
}

/// Deletes checkpoints beyond the newest `keep` (never `just_written`) and temporary files
/// left by interrupted writes.
fn prune(dir: &Path, keep: usize, just_written: u64) -> Result<(), CheckpointError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&format!(".{FILE_PREFIX}")) && name.contains(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    if keep == 0 {
        return Ok(());
    }
    let files = list_checkpoints(dir)?;
    let excess = files.len().saturating_sub(keep);
    for (step, path) in files.into_iter().take(excess) {
        if step != just_written {
            fs::remove_file(&path).map_err(io_err("deleting old checkpoint", &path))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Where `checkpoint.resume` points, resolved against the run's checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// Start from step 0.
    Fresh,
    /// The newest valid checkpoint of this directory, or a fresh start when it has none.
    Auto(PathBuf),
    /// The newest valid checkpoint of this directory (an error when it has none).
    Dir(PathBuf),
    /// This file.
    File(PathBuf),
}

impl ResumeFrom {
    pub fn of(cfg: &Config) -> ResumeFrom {
        let spec = cfg.checkpoint.resume.trim();
        if spec.is_empty() {
            return ResumeFrom::Fresh;
        }
        if spec == "auto" {
            return ResumeFrom::Auto(cfg.checkpoint.dir_for(&cfg.run.out_dir));
        }
        let p = PathBuf::from(spec);
        if p.is_dir() {
            return ResumeFrom::Dir(checkpoints_in(&p));
        }
        ResumeFrom::File(p)
    }
}

/// The checkpoints folder that the folder `dir` names: a run's output folder stands for its
/// `checkpoints` folder, unless it holds checkpoints itself.
pub fn checkpoints_in(dir: &Path) -> PathBuf {
    let sub = dir.join("checkpoints");
    let files_here = list_checkpoints(dir).map(|f| !f.is_empty()).unwrap_or(false);
    if !files_here && sub.is_dir() { sub } else { dir.to_path_buf() }
}

/// A checkpoint to resume from, as every rank received it.
pub struct Resumed {
    /// The file it came from.
    pub origin: String,
    pub checkpoint: Checkpoint,
}

/// Rank 0's side of [`fetch_resume`]: the file's name and bytes, or None for a fresh start.
fn find_on_root(
    from: &ResumeFrom,
) -> Result<Option<(String, Vec<u8>, Checkpoint)>, CheckpointError> {
    let found = match from {
        ResumeFrom::Fresh => return Ok(None),
        ResumeFrom::Auto(dir) => match latest_valid(dir)? {
            Some(f) => f,
            None => {
                eprintln!(
                    "checkpoint: resume = \"auto\" but {} holds no checkpoint: starting at step 0",
                    dir.display()
                );
                return Ok(None);
            }
        },
        ResumeFrom::Dir(dir) => latest_valid(dir)?.ok_or_else(|| CheckpointError::NoneUsable {
            dir: dir.clone(),
            reason: "it holds no ckpt-*.tsr file; pass a checkpoint file or a run's output \
                     directory"
                .into(),
        })?,
        ResumeFrom::File(path) => {
            let bytes = fs::read(path).map_err(io_err("reading checkpoint", path))?;
            let checkpoint = decode(&bytes, &path.display().to_string())?;
            Found { path: path.clone(), bytes, checkpoint, skipped: Vec::new() }
        }
    };
    for s in &found.skipped {
        eprintln!("checkpoint: warning: skipped a damaged checkpoint: {s}");
    }
    Ok(Some((found.path.display().to_string(), found.bytes, found.checkpoint)))
}

const TAG_FRESH: u64 = 0;
const TAG_BYTES: u64 = 1;
const TAG_ERROR: u64 = 2;

/// Rank 0 sends `(tag, body)` to every rank; returns what rank 0 sent. Collective.
pub(crate) fn broadcast_message(
    comm: &mut dyn Communicator,
    tag: u64,
    body: Vec<u8>,
) -> Result<(u64, Vec<u8>), CheckpointError> {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&tag.to_le_bytes());
    head[8..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    comm.broadcast_bytes(&mut head, 0)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(&head[..8]);
    let tag = u64::from_le_bytes(word);
    word.copy_from_slice(&head[8..]);
    let len = usize::try_from(u64::from_le_bytes(word))
        .map_err(|_| CheckpointError::Remote("checkpoint too large for this machine".into()))?;
    let mut buf = if comm.rank() == 0 { body } else { vec![0u8; len] };
    if len > 0 {
        comm.broadcast_bytes(&mut buf, 0)?;
    }
    Ok((tag, buf))
}

/// Finds and reads the checkpoint `checkpoint.resume` names (rank 0) and hands it to every rank
/// (broadcast). Collective when resuming; None for a fresh start. Errors are the same on every
/// rank (rank 0's, relayed).
pub fn fetch_resume(
    cfg: &Config,
    comm: &mut dyn Communicator,
) -> Result<Option<Resumed>, CheckpointError> {
    let from = ResumeFrom::of(cfg);
    if from == ResumeFrom::Fresh {
        return Ok(None);
    }
    if comm.rank() == 0 {
        let found = find_on_root(&from);
        let (tag, body) = match &found {
            Ok(None) => (TAG_FRESH, Vec::new()),
            Ok(Some((origin, bytes, _))) => {
                let mut body = Vec::with_capacity(8 + origin.len() + bytes.len());
                body.extend_from_slice(&(origin.len() as u64).to_le_bytes());
                body.extend_from_slice(origin.as_bytes());
                body.extend_from_slice(bytes);
                (TAG_BYTES, body)
            }
            Err(e) => (TAG_ERROR, e.to_string().into_bytes()),
        };
        if comm.world() > 1 {
            broadcast_message(comm, tag, body)?;
        }
        return Ok(found?.map(|(origin, _, checkpoint)| Resumed { origin, checkpoint }));
    }
    let (tag, body) = broadcast_message(comm, 0, Vec::new())?;
    match tag {
        TAG_FRESH => Ok(None),
        TAG_BYTES if body.len() >= 8 => {
            let mut word = [0u8; 8];
            word.copy_from_slice(&body[..8]);
            let n = (u64::from_le_bytes(word) as usize).min(body.len() - 8);
            let origin = String::from_utf8_lossy(&body[8..8 + n]).into_owned();
            let checkpoint = decode(&body[8 + n..], &origin)?;
            Ok(Some(Resumed { origin, checkpoint }))
        }
        _ => Err(CheckpointError::Remote(String::from_utf8_lossy(&body).into_owned())),
    }
}

/// The checkpoint policy of one run, and what it stamps into every checkpoint.
pub struct Checkpointer {
    enabled: bool,
    every: u64,
    keep: usize,
    stop_after: u64,
    allow_config_change: bool,
    dir: PathBuf,
    total_steps: u64,
    world: usize,
    seed: u64,
    global_batch: u64,
    steps_per_epoch: u64,
    config_hash: String,
    config_toml: String,
    resume_table: toml::Table,
}

impl Checkpointer {
    /// `steps_per_epoch`: the sampler's full global batches per epoch.
    pub fn new(cfg: &Config, world: usize, steps_per_epoch: usize) -> Checkpointer {
        let c = &cfg.checkpoint;
        Checkpointer {
            enabled: c.enabled,
            every: c.every,
            keep: c.keep,
            stop_after: c.stop_after,
            allow_config_change: c.allow_config_change,
            dir: c.dir_for(&cfg.run.out_dir),
            total_steps: cfg.run.steps,
            world,
            seed: cfg.run.seed,
            global_batch: cfg.batch.global as u64,
            steps_per_epoch: steps_per_epoch.max(1) as u64,
            config_hash: cfg.resume_hash(),
            config_toml: cfg.to_toml(),
            resume_table: cfg.resume_table(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether to save once `done` steps are complete: every `checkpoint.every` steps, at
    /// `checkpoint.stop_after`, and after the last step.
    pub fn due(&self, done: u64) -> bool {
        self.enabled
            && (done == self.total_steps
                || (self.every > 0 && done.is_multiple_of(self.every))
                || self.stops_after(done))
    }

    /// Whether the run stops (planned) once `done` steps are complete.
    pub fn stops_after(&self, done: u64) -> bool {
        self.stop_after > 0 && done == self.stop_after && done < self.total_steps
    }

    /// The checkpoint of the state after `step` completed steps; `batch`: the adaptive batch
    /// schedule (None with a fixed batch).
    pub fn capture<B: DeviceBuf>(
        &self,
        step: u64,
        model: &Model<B>,
        opt: &Optimizer<B>,
        gns: Option<&GnsEstimator>,
        batch: Option<&BatchSchedule>,
        last_loss: f32,
    ) -> Checkpoint {
        Checkpoint {
            step,
            total_steps: self.total_steps,
            world: self.world as u32,
            seed: self.seed,
            global_batch: self.global_batch,
            epoch: step / self.steps_per_epoch,
            epoch_step: step % self.steps_per_epoch,
            config_hash: self.config_hash.clone(),
            config_toml: self.config_toml.clone(),
            tensors: TensorInfo::of(model),
            params: model.params().to_vec(),
            optimizer_name: opt.settings().name.clone(),
            optimizer_state: opt.state_bytes(),
            gns: gns.map(|g| GnsRecord::from(&g.export_state())),
            last_loss,
            batch_schedule: batch.map(|b| b.changes.iter().map(BatchChangeRecord::from).collect()),
        }
    }

    /// Saves the state after `step` completed steps: rank 0 writes the file, then tells every
    /// rank whether that worked, so a failed write (a full disk) stops every rank with the same
    /// error. Collective. Call [`GnsEstimator::flush`] first: pending statistics are per rank.
    #[allow(clippy::too_many_arguments)]
    pub fn save<B: DeviceBuf>(
        &self,
        comm: &mut dyn Communicator,
        step: u64,
        model: &Model<B>,
        opt: &Optimizer<B>,
        gns: Option<&GnsEstimator>,
        batch: Option<&BatchSchedule>,
        last_loss: f32,
    ) -> Result<(), CheckpointError> {
        if comm.rank() != 0 {
            let (tag, body) = broadcast_message(comm, 0, Vec::new())?;
            if tag == TAG_ERROR {
                return Err(CheckpointError::Remote(String::from_utf8_lossy(&body).into_owned()));
            }
            return Ok(());
        }
        let t0 = Instant::now();
        let ck = self.capture(step, model, opt, gns, batch, last_loss);
        let written = write_checkpoint(&self.dir, &ck, self.keep)
            .map_err(|e| CheckpointError::Save { step, source: Box::new(e) });
        let (tag, body) = match &written {
            Ok(_) => (TAG_FRESH, Vec::new()),
            Err(e) => (TAG_ERROR, e.to_string().into_bytes()),
        };
        if comm.world() > 1 {
            broadcast_message(comm, tag, body)?;
        }
        let (path, size) = written?;
        eprintln!(
            "checkpoint: step {step} saved to {} ({:.1} MB, {:.0} ms)",
            path.display(),
            size as f64 / 1e6,
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Checks that `r` fits this run and restores it into the model, the optimizer and the
    /// noise-scale estimator. Returns the warnings to show (rank 0 prints them).
    pub fn restore<B: DeviceBuf>(
        &self,
        r: &Resumed,
        model: &mut Model<B>,
        opt: &mut Optimizer<B>,
        gns: Option<&mut GnsEstimator>,
    ) -> Result<Vec<String>, CheckpointError> {
        let ck = &r.checkpoint;
        let incompatible =
            |reason: String| CheckpointError::Incompatible { origin: r.origin.clone(), reason };
        let mut warnings = Vec::new();
        // A checkpoint of an earlier version has another hash when this version added keys
        // (at their defaults in this run): its config read by this version decides.
        let keys = (ck.config_hash != self.config_hash).then(|| {
            Config::resolve(&ck.config_toml, &r.origin, &[], None)
                .ok()
                .map(|c| differing_keys(&c.resume_table(), &self.resume_table))
        });
        if let Some(keys) = keys
            && keys.as_ref().is_none_or(|k| !k.is_empty())
        {
            let keys = keys.map_or_else(
                || "unknown (the saved config does not parse)".into(),
                |k| k.join(", "),
            );
            let what = format!(
                "the checkpoint was written with another training config (resume hash {} vs this \
                 run's {}; keys that differ: {keys})",
                short(&ck.config_hash),
                short(&self.config_hash)
            );
            if !self.allow_config_change {
                return Err(incompatible(format!(
                    "{what}; resume with the same config (the checkpoint's is in config.toml \
                     beside it), or set checkpoint.allow_config_change = true to continue with \
                     the new values"
                )));
            }
            warnings.push(format!("{what}: continuing with this run's values"));
        }
        let mine = TensorInfo::of(model);
        if ck.params.len() != model.num_params() || ck.tensors != mine {
            let first = ck.tensors.iter().zip(&mine).find(|(a, b)| a != b).map_or_else(
                || format!("{} tensors saved, {} in this model", ck.tensors.len(), mine.len()),
                |(a, b)| {
                    format!(
                        "saved {} {:?} vs this model's {} {:?}",
                        a.name, a.shape, b.name, b.shape
                    )
                },
            );
            return Err(incompatible(format!(
                "the checkpoint holds {} parameters but this model has {} ({first}); resume with \
                 the model config that wrote it",
                ck.params.len(),
                model.num_params()
            )));
        }
        if ck.step > self.total_steps {
            return Err(incompatible(format!(
                "it is at step {} but run.steps = {}; raise run.steps (with \
                 checkpoint.allow_config_change = true)",
                ck.step, self.total_steps
            )));
        }
        let (epoch, epoch_step) = (ck.step / self.steps_per_epoch, ck.step % self.steps_per_epoch);
        if (epoch, epoch_step) != (ck.epoch, ck.epoch_step) && !self.allow_config_change {
            return Err(incompatible(format!(
                "the sampler was at epoch {} batch {} but this run's data puts step {} at epoch \
                 {epoch} batch {epoch_step}: the training data changed; resume with the same data",
                ck.epoch, ck.epoch_step, ck.step
            )));
        }
        if ck.world as usize != self.world {
            warnings.push(format!(
                "the checkpoint was written by {} ranks and this run has {}: the same batches, \
                 but sums in another order, so not bitwise identical to an uninterrupted run",
                ck.world, self.world
            ));
        }
        opt.load_state(&ck.optimizer_state).map_err(|e| incompatible(e.to_string()))?;
        match (gns, &ck.gns) {
            (Some(g), Some(saved)) => {
                g.import_state(&GnsState::from(saved)).map_err(incompatible)?;
            }
            (Some(_), None) => warnings.push(
                "the checkpoint has no noise-scale averages: the estimate starts afresh".into(),
            ),
            (None, _) => {}
        }
        model.params_mut().copy_from_slice(&ck.params);
        Ok(warnings)
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Keeps the lines of a metrics file whose `step` is at most `step` (and lines without one):
/// what a run that stopped after `step` had written, before its resumed continuation appends.
pub fn trim_metrics(path: &Path, step: u64) -> Result<(), CheckpointError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("reading", path)(e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_none_or(|s| s <= step)
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    if kept.len() != text.len() {
        fs::write(path, kept).map_err(io_err("rewriting", path))?;
    }
    Ok(())
}

/// The parameters of `ck` as a safetensors file: one F32 tensor per model tensor (its name and
/// shape), data in buffer order, and `__metadata__` with the step, the config hash, the
/// optimizer and the resolved config.
pub fn safetensors_bytes(ck: &Checkpoint) -> Result<Vec<u8>, CheckpointError> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    for (k, v) in [
        ("format", "pt".to_string()),
        ("producer", "tessera".to_string()),
        ("step", ck.step.to_string()),
        ("total_steps", ck.total_steps.to_string()),
        ("world", ck.world.to_string()),
        ("optimizer", ck.optimizer_name.clone()),
        ("config_hash", ck.config_hash.clone()),
        ("config", ck.config_toml.clone()),
    ] {
        meta.insert(k.into(), v.into());
    }
    header.insert("__metadata__".into(), meta.into());
    for t in &ck.tensors {
        let (start, end) = (t.offset * 4, (t.offset + t.len) * 4);
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [start, end] }),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| {
        CheckpointError::Invalid { origin: "safetensors header".into(), reason: e.to_string() }
    })?;
    // Pad with spaces so that the data starts 8-byte aligned.
    while (8 + json.len()) % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + 4 * ck.params.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in &ck.params {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// Writes [`safetensors_bytes`] to `path` (temporary file and rename, so a reader never sees a
/// partial file). Returns the size in bytes.
pub fn write_safetensors(path: &Path, ck: &Checkpoint) -> Result<u64, CheckpointError> {
    let bytes = safetensors_bytes(ck)?;
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests;
