//! The run configuration: one TOML file plus `--set key=value` overrides.
//!
//! Keys that scripts and docs rely on are stable: `run.steps`, `run.seed`, `batch.global`,
//! `optim.name`, `optim.lr`. Every table rejects unknown keys, so a typo is an error that names
//! the key instead of a silently ignored setting. The resolved configuration is printed, saved
//! beside the outputs, and hashed; every rank checks the hash at rendezvous.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::SynthSpec;
use crate::gns::GnsConfig;
use crate::loss::LossConfig;
use crate::model::ModelConfig;

/// The default job, embedded so that `tessera run --nproc 4` needs no file.
pub const DEFAULT_CONFIG: &str = include_str!("../../examples/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error(
        "--set {arg}: expected key=value with a dotted key such as optim.lr=0.1 or run.steps=100"
    )]
    BadOverride { arg: String },
    #[error("--set {key}: {message}")]
    Override { key: String, message: String },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub data: DataConfig,
    pub model: ModelConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Gradient noise scale measurement (`[gns]`).
    #[serde(default)]
    pub gns: GnsConfig,
    /// Checkpoints and resume (`[checkpoint]`).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Optimizer steps to train.
    pub steps: u64,
    /// Seed for initialisation, sampling and synthetic data (same on every rank).
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Write a metrics line every this many steps.
    pub log_every: u64,
    /// Where metrics, the resolved config and the final parameters go.
    pub out_dir: PathBuf,
    /// Kernel threads per rank; 0 = the machine's cores divided by the ranks on this host.
    pub threads: usize,
    /// Per-collective timeout in seconds: a peer silent for longer is declared dead.
    pub collective_timeout_s: f64,
    /// A loss or gradient that is NaN or infinite (seen by every rank in the same step, after
    /// the gradient all-reduce): `stop` the run naming the tensor, or `skip` the step (no
    /// update; counted in the summary and metrics).
    pub on_nonfinite: OnNonFinite,
    /// Debug mode: before every collective, ranks compare what they are about to call (the
    /// operation, its sequence number and sizes) and a divergence is an error naming the first
    /// rank that differs. One small extra all-gather per collective.
    pub check_collectives: bool,
    /// Contrastive models on several ranks: all-reduce the gradient in buckets on a
    /// communication thread while the last micro-batch's backward still runs (finished layers,
    /// top first). The result is bitwise identical to the plain all-reduce. Off by default:
    /// with one core per rank the communication thread takes that core from the backward
    /// (docs/BENCHMARKS.md); it pays where ranks have cores or a network engine to spare.
    /// With `run.device = "cuda"` and NCCL the buckets go on NCCL's stream behind events of
    /// the compute stream instead (no thread, no host wait per layer; also at world size 1);
    /// NCCL sums each bucket on its own, bitwise the plain all-reduce up to 2 ranks.
    pub overlap_allreduce: bool,
    /// Bucket size of the overlapped all-reduce, in bytes.
    pub allreduce_bucket_bytes: usize,
    /// Where the model's kernels run: `cpu`, or `cuda` (GPU `local_rank mod GPUs`; ranks of
    /// one node may share a GPU). The optimizer, and the loss of a job with several ranks, stay
    /// on the CPU for now.
    pub device: DeviceKind,
    /// `run.device = "cuda"` and `loss.name = "clip_tiled"` or `"siglip"`: `fused` (the default)
    /// computes the loss with the fused kernels on the GPU (a job of several ranks, and SigLIP
    /// always: the ring of GPU blocks), in `run.cuda_loss_precision` and `run.cuda_loss_mode`;
    /// `host` with the tiled ring loss on the CPU. Other jobs use the host loss.
    pub cuda_loss: String,
    /// `run.cuda_loss = "fused"`: how the fused CLIP kernels compute the logit tiles: `fp32`
    /// (the default: FMA), `tf32x3` (3xTF32 tensor cores, close to fp32), `tf32` (TF32 tensor
    /// cores) or `bf16` (BF16 tensor cores on bf16 copies of the features). Features and
    /// gradients stay fp32 on the way in and out; statistics and accumulators are fp32.
    pub cuda_loss_precision: String,
    /// `run.cuda_loss = "fused"`: the fused loss's backward: `deterministic` (the default: no
    /// atomics, bitwise repeatable) or `fast` (one pass fewer, ∂L/∂T by atomicAdd).
    pub cuda_loss_mode: String,
    /// `run.cuda_loss = "fused"` with `run.collectives = "nccl"` and several ranks: how the
    /// loss ring's blocks travel. `device` (the default): NCCL send/recv between the blocks'
    /// own GPU buffers, on NCCL's stream while the compute stream works on the block in hand
    /// (rank/src/loss/ring_device.rs); `host`: as host messages through the communicator
    /// (each hop copied to the host and back). Other communicators always use host messages,
    /// and so does `run.check_collectives` (its checker compares the messages' lengths).
    pub cuda_ring: String,
    /// `run.device = "cuda"`: how cuBLAS computes the model's GEMMs: `fp32` (tracks the CPU),
    /// `tf32` or `bf16` (tensor cores, fp32 accumulation).
    pub cuda_gemm: String,
    /// `run.device = "cuda"`: values of the CUDA kernels' tuning knobs, as `NAME=VALUE` items
    /// (e.g. `["CLIP_BWD_PANEL=2"]`), compiled into this job's kernels; empty (the default):
    /// the knobs' defaults. The knobs, their ranges and how to time a value first:
    /// docs/GPU.md, "Kernel knobs" (`tessera cuda bench-loss --define NAME=VALUE`). Ignored on
    /// the CPU.
    pub cuda_kernel_defines: Vec<String>,
    /// The collectives of training: `tcp` (the ring over the data plane; any devices, several
    /// ranks per GPU) or `nccl` (one GPU per rank, GPU `local_rank`; the id travels through
    /// the coordinator's store).
    pub collectives: CollectivesKind,
}

/// The collectives a rank trains with (`run.collectives`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CollectivesKind {
    #[default]
    Tcp,
    Nccl,
}

/// Where a rank's model kernels run (`run.device`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

/// What to do when the loss or a gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    #[default]
    Stop,
    Skip,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            steps: 100,
            seed: 0,
            eval_every: 0,
            log_every: 10,
            out_dir: PathBuf::from("runs/latest"),
            threads: 0,
            collective_timeout_s: 600.0,
            on_nonfinite: OnNonFinite::Stop,
            check_collectives: false,
            overlap_allreduce: false,
            allreduce_bucket_bytes: 4 << 20,
            device: DeviceKind::Cpu,
            cuda_gemm: "fp32".into(),
            cuda_loss: "fused".into(),
            cuda_loss_precision: "fp32".into(),
            cuda_loss_mode: "deterministic".into(),
            cuda_ring: "device".into(),
            cuda_kernel_defines: Vec::new(),
            collectives: CollectivesKind::Tcp,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Global batch: examples per optimizer step over all ranks together.
    pub global: usize,
    /// Micro-batch rows per rank (0: the whole local batch at once). Contrastive models use
    /// GradCache: embed in micro-batches without activations, loss on all features, then
    /// replay each micro-batch; classifiers accumulate gradients. Same result, less memory.
    pub micro: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { global: 256, micro: 0 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `synth`: generate the latent-variable task in memory from `[data.synth]` (same on every
    /// rank); `shards`: read `train` and `eval` shard files.
    pub source: DataSource,
    pub train: Option<PathBuf>,
    pub eval: Option<PathBuf>,
    pub synth: SynthSpec,
    /// Two-view (SimCLR-style) training from a labeled shard of 8×8 images: every step draws
    /// two fresh augmented views of each image (±1-pixel shift, 10% masking, noise 0.1),
    /// deterministic in (seed, step, position in the global batch).
    pub two_views: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: DataSource::Synth,
            train: None,
            eval: None,
            synth: SynthSpec::default(),
            two_views: false,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    Synth,
    Shards,
}

pub use crate::optim::OptimConfig;

/// The `[checkpoint]` table: when to save, how many to keep, where, and what to resume from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write checkpoints at all (rank 0 writes; every rank learns whether it worked).
    pub enabled: bool,
    /// Save every this many steps; 0: only after the last step. The last step always saves.
    pub every: u64,
    /// Keep the newest this many checkpoints (older ones are deleted once the new one is
    /// durable); 0 keeps all.
    pub keep: usize,
    /// Where checkpoints go (default: `run.out_dir`/checkpoints).
    pub dir: Option<PathBuf>,
    /// `""`: start from step 0; `"auto"`: the newest valid checkpoint in `dir` (a fresh start
    /// when there is none); otherwise a checkpoint file, or a directory to take the newest from.
    pub resume: String,
    /// Resume even when the training-relevant config differs from the checkpoint's (the
    /// tensors must still match); off by default because the result is then a different run.
    pub allow_config_change: bool,
    /// Stop cleanly after this step, with a checkpoint (0: run to `run.steps`): a planned
    /// preemption, for time-limited allocations and resume tests.
    pub stop_after: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            enabled: true,
            every: 0,
            keep: 3,
            dir: None,
            resume: String::new(),
            allow_config_change: false,
            stop_after: 0,
        }
    }
}

impl CheckpointConfig {
    /// The checkpoint directory of a run writing to `out_dir`.
    pub fn dir_for(&self, out_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| out_dir.join("checkpoints"))
    }
}

/// Keys that do not change the training trajectory: left out of [`Config::resume_hash`], so a
/// resumed run may change them (a new output directory, other logging, another checkpoint
/// policy, more or fewer kernel threads).
pub const RESUME_IGNORED_KEYS: &[&str] = &[
    "checkpoint",
    "eval",
    "run.out_dir",
    "run.eval_every",
    "run.log_every",
    "run.threads",
    "run.collective_timeout_s",
    "run.check_collectives",
    "run.overlap_allreduce",
    "run.allreduce_bucket_bytes",
    "run.cuda_kernel_defines",
    // Pretrained weights matter only at step 0: a resumed run takes its parameters from the
    // checkpoint.
    "model.init_from",
    "model.init_towers",
    "model.init_exclude",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Held-out examples used for evaluation (0: all).
    pub max_examples: usize,
    /// For contrastive models trained on images: labeled shards for a k-NN probe of tower a.
    pub knn_train: Option<PathBuf>,
    pub knn_test: Option<PathBuf>,
    pub knn_k: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { max_examples: 0, knn_train: None, knn_test: None, knn_k: 5 }
    }
}

impl Config {
    /// Parses `text` (from `origin`, for messages), applies `overrides` (`key=value`), and
    /// validates the result. Relative data paths are resolved against `base_dir`.
    pub fn resolve(
        text: &str,
        origin: &str,
        overrides: &[String],
        base_dir: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Syntax { origin: origin.to_string(), message: e.to_string() }
        })?;
        for arg in overrides {
            apply_override(&mut table, arg)?;
        }
        // The path names the key a bad value belongs to ("run.steps: invalid type: ..."),
        // which the value's own error does not.
        let mut cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| {
                let path = e.path().to_string();
                let message = e.inner().message();
                ConfigError::Invalid {
                    origin: origin.to_string(),
                    message: if path == "." {
                        message.to_string()
                    } else {
                        format!("{path}: {message}")
                    },
                }
            },
        )?;
        if let Some(base) = base_dir {
            for p in [
                &mut cfg.data.train,
                &mut cfg.data.eval,
                &mut cfg.eval.knn_train,
                &mut cfg.eval.knn_test,
                &mut cfg.model.init_from,
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.validate()
            .map_err(|message| ConfigError::Invalid { origin: origin.to_string(), message })?;
        cfg.optim = cfg
            .optim
            .resolved()
            .map_err(|message| ConfigError::Invalid { origin: origin.to_string(), message })?;
        Ok(cfg)
    }

    /// Reads a config file (or the embedded default when `path` is None).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        match path {
            None => Config::resolve(DEFAULT_CONFIG, "<embedded default>", overrides, None),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?;
                Config::resolve(&text, &p.display().to_string(), overrides, p.parent())
            }
        }
    }

    /// The checks that need the world size: run by every rank, and by `tessera run` before it
    /// starts any.
    pub fn check_world(&self, world: usize) -> Result<(), String> {
        let global = self.batch.global;
        if global < world {
            return Err(format!(
                "batch.global = {global} is smaller than the {world} ranks: every rank needs at \
                 least one example; raise batch.global"
            ));
        }
        if self.gns.adaptive.enabled {
            crate::gns::BatchController::new(&self.gns.adaptive, global, world)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if self.run.steps == 0 {
            return Err("run.steps must be at least 1".into());
        }
        if self.batch.global == 0 {
            return Err("batch.global must be at least 1".into());
        }
        self.optim.validate()?;
        self.loss.validate()?;
        crate::model::init::tower_loads(&self.model).map_err(|e| e.to_string())?;
        let names = crate::train::model_config(self).tensor_names().map_err(|e| e.to_string())?;
        self.optim.check_lr_scale(&names)?;
        if crate::device::cuda::device::GemmMath::parse(&self.run.cuda_gemm).is_none() {
            return Err(format!(
                "run.cuda_gemm = {:?}: must be \"fp32\", \"tf32\" or \"bf16\"",
                self.run.cuda_gemm
            ));
        }
        if !matches!(self.run.cuda_loss.as_str(), "fused" | "host") {
            return Err(format!(
                "run.cuda_loss = {:?}: must be \"fused\" (the loss on the GPU) or \"host\"",
                self.run.cuda_loss
            ));
        }
        use crate::device::cuda::gpu::{LossMode, Precision};
        if Precision::parse(&self.run.cuda_loss_precision).is_none() {
            return Err(format!(
                "run.cuda_loss_precision = {:?}: must be one of {} (the fused CLIP loss's logit \
                 tiles)",
                self.run.cuda_loss_precision,
                quoted(&Precision::ALL.map(Precision::name)),
            ));
        }
        if LossMode::parse(&self.run.cuda_loss_mode).is_none() {
            return Err(format!(
                "run.cuda_loss_mode = {:?}: must be one of {} (the fused CLIP loss's backward)",
                self.run.cuda_loss_mode,
                quoted(&LossMode::ALL.map(LossMode::name)),
            ));
        }
        if !matches!(self.run.cuda_ring.as_str(), "device" | "host") {
            return Err(format!(
                "run.cuda_ring = {:?}: must be \"device\" (the loss ring's blocks move between \
                 GPU buffers over NCCL) or \"host\" (as host messages)",
                self.run.cuda_ring
            ));
        }
        if let Err(e) = crate::device::cuda::nvrtc::Defines::parse(&self.run.cuda_kernel_defines) {
            return Err(format!(
                "run.cuda_kernel_defines = {:?}: {e} (leave it empty for the defaults)",
                self.run.cuda_kernel_defines
            ));
        }
        if self.run.allreduce_bucket_bytes < 4 {
            return Err(format!(
                "run.allreduce_bucket_bytes = {} must be at least 4 (one f32; typical: 4194304)",
                self.run.allreduce_bucket_bytes
            ));
        }
        if self.run.collective_timeout_s <= 0.0 {
            return Err("run.collective_timeout_s must be > 0".into());
        }
        self.gns.validate().map_err(|e| e.to_string())?;
        if self.checkpoint.stop_after > 0 && !self.checkpoint.enabled {
            return Err("checkpoint.stop_after needs checkpoint.enabled = true (it stops with a \
                        checkpoint to resume from)"
                .into());
        }
        if self.data.source == DataSource::Synth {
            self.data.synth.validate().map_err(|e| e.to_string())?;
        }
        if self.data.source == DataSource::Shards && self.data.train.is_none() {
            return Err(
                "data.source = \"shards\" needs data.train = \"path/to/train.shard\"".into()
            );
        }
        Ok(())
    }

    /// The resolved configuration as TOML (printed at start-up and saved beside the outputs).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// SHA-256 of the resolved configuration, hex; equal on every rank of one job.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.to_toml().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The configuration as a TOML table without [`RESUME_IGNORED_KEYS`]: what a checkpoint
    /// must agree with to be resumed.
    pub fn resume_table(&self) -> toml::Table {
        let mut table = toml::Table::try_from(self).unwrap_or_default();
        for key in RESUME_IGNORED_KEYS {
            match key.split_once('.') {
                Some((t, k)) => {
                    if let Some(toml::Value::Table(sub)) = table.get_mut(t) {
                        sub.remove(k);
                    }
                }
                None => {
                    table.remove(*key);
                }
            }
        }
        table
    }

    /// SHA-256 (hex) of [`Config::resume_table`]: stored in checkpoints and compared on resume.
    pub fn resume_hash(&self) -> String {
        let text = toml::to_string(&self.resume_table()).unwrap_or_default();
        let digest = Sha256::digest(text.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The dotted keys whose values differ between two configuration tables (keys present in only
/// one of them included), each as `key (old → new)`; sorted.
pub fn differing_keys(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    fn flatten(
        prefix: &str,
        t: &toml::Table,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(sub) => flatten(&key, sub, out),
                other => {
                    out.insert(key, other.to_string());
                }
            }
        }
    }
    let (mut a, mut b) = (Default::default(), Default::default());
    flatten("", old, &mut a);
    flatten("", new, &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let none = "(unset)".to_string();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k} ({} → {})", a.get(k).unwrap_or(&none), b.get(k).unwrap_or(&none)))
        .collect()
}

/// `"a", "b" or "c"`: allowed values for an error message.
fn quoted(names: &[&str]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match q.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let (key, raw) = arg
        .split_once('=')
        .filter(|(k, _)| !k.trim().is_empty())
        .ok_or_else(|| ConfigError::BadOverride { arg: arg.to_string() })?;
    let key = key.trim();
    let value = parse_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let entry =
            cur.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::Override {
                    key: key.to_string(),
                    message: format!("{} is a value, not a table", parts[..=i].join(".")),
                });
            }
        };
    }
    Ok(())
}

/// A TOML value if `raw` parses as one (number, bool, string in quotes, array), else a string.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_resolves() {
        let cfg = Config::load(None, &[]).unwrap();
        assert!(cfg.run.steps > 0);
        assert_eq!(cfg.hash(), Config::load(None, &[]).unwrap().hash());
    }

    #[test]
    fn overrides_apply_and_change_the_hash() {
        let base = Config::load(None, &[]).unwrap();
        let cfg = Config::load(
            None,
            &["run.steps=7".into(), "optim.lr=0.5".into(), "run.out_dir=somewhere".into()],
        )
        .unwrap();
        assert_eq!(cfg.run.steps, 7);
        assert_eq!(cfg.optim.lr, 0.5);
        assert_eq!(cfg.run.out_dir, PathBuf::from("somewhere"));
        assert_ne!(cfg.hash(), base.hash());
    }

    #[test]
    fn resume_hash_ignores_output_and_checkpoint_keys_only() {
        let base = Config::load(None, &[]).unwrap();
        let moved = Config::load(
            None,
            &[
                "run.out_dir=elsewhere".into(),
                "run.log_every=1".into(),
                "checkpoint.every=5".into(),
                "checkpoint.resume=auto".into(),
            ],
        )
        .unwrap();
        assert_ne!(base.hash(), moved.hash());
        assert_eq!(base.resume_hash(), moved.resume_hash());
        let other = Config::load(None, &["optim.lr=0.25".into()]).unwrap();
        assert_ne!(base.resume_hash(), other.resume_hash());
        let diff = differing_keys(&base.resume_table(), &other.resume_table());
        assert_eq!(diff, vec!["optim.lr (0.5 → 0.25)".to_string()]);
    }

    #[test]
    fn checkpoint_defaults_and_dir() {
        let cfg = Config::load(None, &["run.out_dir=r".into()]).unwrap();
        assert!(cfg.checkpoint.enabled);
        assert_eq!(cfg.checkpoint.dir_for(&cfg.run.out_dir), PathBuf::from("r/checkpoints"));
        let err = Config::load(None, &["checkpoint.evry=3".into()]).unwrap_err().to_string();
        assert!(err.contains("evry"), "{err}");
    }

    #[test]
    fn device_settings_parse_and_bad_ones_are_named() {
        let cfg =
            Config::load(None, &["run.device=\"cuda\"".into(), "run.cuda_gemm=\"tf32\"".into()])
                .unwrap();
        assert_eq!((cfg.run.device, cfg.run.cuda_gemm.as_str()), (DeviceKind::Cuda, "tf32"));
        assert_eq!(Config::load(None, &[]).unwrap().run.device, DeviceKind::Cpu);
        let err = Config::load(None, &["run.cuda_gemm=\"fp16\"".into()]).unwrap_err().to_string();
        assert!(err.contains("run.cuda_gemm") && err.contains("tf32"), "{err}");
        let err = Config::load(None, &["run.device=\"tpu\"".into()]).unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        assert_eq!(Config::load(None, &[]).unwrap().run.cuda_loss, "fused");
        let cfg = Config::load(None, &["run.cuda_loss=\"host\"".into()]).unwrap();
        assert_eq!(cfg.run.cuda_loss, "host");
        let err = Config::load(None, &["run.cuda_loss=\"gpu\"".into()]).unwrap_err().to_string();
        assert!(err.contains("run.cuda_loss") && err.contains("fused"), "{err}");
    }

    #[test]
    fn kernel_defines_are_checked_with_the_config_and_leave_resume_alone() {
        let base = Config::load(None, &[]).unwrap();
        assert!(base.run.cuda_kernel_defines.is_empty());
        let set = |v: &str| Config::load(None, &[format!("run.cuda_kernel_defines={v}")]);
        let cfg = set(r#"["CLIP_BWD_PANEL=2", "CLIP_FWD_MIN_BLOCKS=3"]"#).unwrap();
        let defs = crate::device::cuda::nvrtc::Defines::parse(&cfg.run.cuda_kernel_defines);
        let defs = defs.unwrap();
        assert_eq!((defs.value("CLIP_BWD_PANEL"), defs.value("CLIP_FWD_MIN_BLOCKS")), (2, 3));
        // A tuning knob, like the bucket size: a checkpoint resumes under another value (and
        // the checkpoints of configs from before the key have the same hash).
        assert_eq!(cfg.resume_hash(), base.resume_hash());
        for (bad, want) in [
            (r#"["NOPE=1"]"#, "no knob named \"NOPE\""),
            (r#"["CLIP_BWD_PANEL=9"]"#, "1..=4"),
            (r#"["CLIP_BWD_PANEL"]"#, "expected NAME=VALUE"),
            (r#"["CLIP_BWD_PANEL=2", "CLIP_BWD_PANEL=3"]"#, "CLIP_BWD_PANEL"),
        ] {
            let err = set(bad).unwrap_err().to_string();
            assert!(err.contains("run.cuda_kernel_defines") && err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn cuda_loss_precision_and_mode_parse_and_bad_ones_are_named() {
        use crate::device::cuda::gpu::{LossMode, Precision};
        let cfg = Config::load(None, &[]).unwrap();
        assert_eq!(cfg.run.cuda_loss_precision, "fp32");
        assert_eq!(cfg.run.cuda_loss_mode, "deterministic");
        assert_eq!(Precision::parse(&cfg.run.cuda_loss_precision), Some(Precision::Fp32));
        assert_eq!(LossMode::parse(&cfg.run.cuda_loss_mode), Some(LossMode::Deterministic));
        for p in ["fp32", "tf32", "tf32x3", "bf16"] {
            let cfg = Config::load(
                None,
                &[
                    "run.device=\"cuda\"".into(),
                    format!("run.cuda_loss_precision=\"{p}\""),
                    "run.cuda_loss_mode=\"fast\"".into(),
                ],
            )
            .unwrap();
            assert_eq!(cfg.run.cuda_loss_precision, p);
            assert_eq!(
                Precision::parse(&cfg.run.cuda_loss_precision).map(Precision::name),
                Some(p)
            );
            assert_eq!(LossMode::parse(&cfg.run.cuda_loss_mode), Some(LossMode::Fast));
        }
        let err = Config::load(None, &["run.cuda_loss_precision=\"fp16\"".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.cuda_loss_precision = \"fp16\""), "{err}");
        assert!(
            err.contains("\"fp32\", \"tf32x3\", \"tf32\" or \"bf16\""),
            "names every allowed value: {err}"
        );
        assert_eq!(cfg.run.cuda_ring, "device");
        let host = Config::load(None, &["run.cuda_ring=\"host\"".into()]).unwrap();
        assert_eq!(host.run.cuda_ring, "host");
        let err = Config::load(None, &["run.cuda_ring=\"gpu\"".into()]).unwrap_err().to_string();
        assert!(err.contains("run.cuda_ring = \"gpu\": must be \"device\""), "{err}");
        let err =
            Config::load(None, &["run.cuda_loss_mode=\"det\"".into()]).unwrap_err().to_string();
        assert!(err.contains("run.cuda_loss_mode = \"det\""), "{err}");
        assert!(err.contains("\"deterministic\" or \"fast\""), "{err}");
        // Training-relevant: they change the resume hash.
        let bf16 = Config::load(None, &["run.cuda_loss_precision=\"bf16\"".into()]).unwrap();
        assert_ne!(bf16.resume_hash(), cfg.resume_hash());
        assert_eq!(quoted(&["a"]), "\"a\"");
        assert_eq!(quoted(&["a", "b"]), "\"a\" or \"b\"");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::load(None, &["optim.lrr=0.5".into()]).unwrap_err().to_string();
        assert!(err.contains("lrr"), "{err}");
    }

    #[test]
    fn bad_override_syntax() {
        let err = Config::load(None, &["steps".into()]).unwrap_err().to_string();
        assert!(err.contains("key=value"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let err = Config::load(None, &["run.steps=0".into()]).unwrap_err().to_string();
        assert!(err.contains("run.steps"), "{err}");
        let err = Config::load(None, &["optim.name=\"adamw\"".into()]).unwrap_err().to_string();
        assert!(err.contains("optim.name"), "{err}");
    }

    /// `optim.lr_scale`: from `--set` as an inline table or from a file's table, the longest
    /// matching key wins, it survives the resolved config's round trip and is part of the
    /// resume hash; a key that names no tensor, or a factor below 0, is refused.
    #[test]
    fn lr_scale_keys_are_tensor_names_or_prefixes() {
        let set = "optim.lr_scale={\"a\" = 0.1, \"a.out\" = 10.0, \"logit_scale\" = 0}";
        let cfg = Config::load(None, &[set.into()]).unwrap();
        let o = &cfg.optim;
        assert_eq!(o.lr_scale_of("a.out.weight"), 10.0);
        assert_eq!(o.lr_scale_of("a.blocks.0.weight"), 0.1);
        assert_eq!(o.lr_scale_of("logit_scale"), 0.0);
        assert_eq!(o.lr_scale_of("b.out.weight"), 1.0);
        assert_eq!(o.lr_scale_of("a.outer"), 0.1, "\"a.out\" is not a prefix of a.outer");
        let again = Config::resolve(&cfg.to_toml(), "resolved", &[], None).unwrap();
        assert_eq!(again.optim.lr_scale, cfg.optim.lr_scale);
        let plain = Config::load(None, &[]).unwrap();
        assert_ne!(cfg.resume_hash(), plain.resume_hash());
        assert!(!plain.to_toml().contains("optim.lr_scale"), "an unset table changes every hash");
        let file = format!("{DEFAULT_CONFIG}\n[optim.lr_scale]\n\"b.blocks\" = 0.5\n");
        let from_file = Config::resolve(&file, "x.toml", &[], None).unwrap();
        assert_eq!(from_file.optim.lr_scale_of("b.blocks.1.ln.gamma"), 0.5);

        let bad = |set: &str| Config::load(None, &[set.into()]).unwrap_err().to_string();
        let e = bad("optim.lr_scale={\"a.head\" = 2}");
        assert!(e.contains("optim.lr_scale key \"a.head\" names no tensor"), "{e}");
        assert!(e.contains("a.out.weight"), "{e}");
        assert!(bad("optim.lr_scale={\"a.\" = 2}").contains("names no tensor"));
        let e = bad("optim.lr_scale={\"a\" = -1}");
        assert!(e.contains("optim.lr_scale \"a\" = -1 must be a finite number >= 0"), "{e}");
    }

    /// A value of the wrong type, or a key that does not exist, is named by its whole path
    /// (the value's own error says only what it expected), from an override or from a file.
    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let bad = |set: &str| Config::load(None, &[set.into()]).unwrap_err().to_string();
        let err = bad("run.steps=\"abc\"");
        assert!(err.ends_with("run.steps: invalid type: string \"abc\", expected u64"), "{err}");
        let err = bad("model.tower_a.width=-3");
        assert!(err.contains(": model.tower_a.width: invalid value: integer `-3`"), "{err}");
        let err = bad("gns.adaptive.stepz=1");
        assert!(err.contains(": gns.adaptive.stepz: unknown field `stepz`"), "{err}");
        let err = bad("foo=1");
        assert!(err.contains(": foo: unknown field `foo`"), "{err}");
        let text = "[run]\nsteps = 10\n[batch]\nglobal = 1.5\n";
        let err = Config::resolve(text, "x.toml", &[], None).unwrap_err().to_string();
        assert!(err.starts_with("config x.toml: batch.global: invalid type: floating"), "{err}");
    }
}
