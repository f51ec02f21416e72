//! The training loop of one rank, readable in one file (llm.c's habit).
//!
//! Per step: sample this rank's slice of the global batch, forward, loss over the global batch
//! (features all-gathered for the contrastive loss), backward, all-reduce (sum) of the flat
//! gradient buffer, optimizer step on identical gradients everywhere, bookkeeping on rank 0.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tessera_collectives::checked::CheckedComm;
use tessera_collectives::{CommError, Communicator, ReduceOp};

use crate::checkpoint::{self, CheckpointError, Checkpointer};
use crate::config::DeviceKind;
use crate::config::{Config, DataSource, OnNonFinite};
use crate::data::{self, Dataset, DatasetKind, DistributedSampler, local_rows};
use crate::device::cuda::CudaError;
use crate::device::cuda::device::{CudaDevice, CudaDeviceOpts, GemmMath};
use crate::device::cuda::gpu::{FusedClipLoss, Gpu, LossMode, Precision};
use crate::device::cuda::nccl::{NcclComm, OverlapAllReduce};
use crate::device::cuda::nvrtc::Defines;
use crate::device::cuda::ring::{BlockTravel, GpuClipBlocks};
use crate::device::{CpuDevice, Device, DeviceBuf};
use crate::eval::{self, EvalReport};
use crate::fault;
use crate::gns::{BatchController, GnsError, GnsEstimator, GnsReport};
use crate::loss::{self, LossKind, RingLossOpts};
use crate::model::{Model, ModelKind, ParamGroup};
use crate::optim::{OptimConfig, Optimizer, TensorGroup};
use crate::overlap;
use crate::rng::Rng;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Init(#[from] crate::model::init::InitError),
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    #[error(transparent)]
    Gns(#[from] GnsError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Device(String),
    #[error("writing {path}: {source}")]
    Output { path: PathBuf, source: std::io::Error },
    #[error(
        "ranks disagree on the parameters after training (hashes {hashes:?}): the gradient \
         all-reduce or the optimizer is not deterministic"
    )]
    Diverged { hashes: Vec<String> },
    #[error(
        "step {step}: {what} after the gradient all-reduce ({origin}); every rank stops here \
         (run.on_nonfinite = \"stop\"). Lower optim.lr or check the data, or set \
         run.on_nonfinite = \"skip\" to skip such steps"
    )]
    NonFinite { step: u64, what: String, origin: String },
}

/// The first tensor of `grads` holding a NaN or an infinity, as "the gradient of X is NaN".
/// The device checks the whole buffer (on a GPU without the host reading it); the tensor is
/// only looked for when some value is not finite.
fn first_nonfinite<D: Device>(dev: &D, groups: &[ParamGroup], grads: &[f32]) -> Option<String> {
    if dev.all_finite(grads) {
        return None;
    }
    groups.iter().find_map(|g| {
        grads[g.offset..g.offset + g.len].iter().find(|v| !v.is_finite()).map(|v| {
            let kind = if v.is_nan() { "NaN" } else { "infinite" };
            format!("the gradient of {} is {kind}", g.name)
        })
    })
}

/// What follows a micro-batch's backward (`m` of the global batch's `global` rows): the
/// temperature's gradient `d_t` (and the bias's), and under GradCache (`accumulate`) the
/// noise-scale estimator's look at the accumulated gradient.
fn after_backward<B: DeviceBuf>(
    model: &mut Model<B>,
    d_t: f32,
    d_bias: Option<f32>,
    gns: Option<&mut GnsEstimator>,
    accumulate: bool,
    m: usize,
    global: usize,
) -> Result<(), GnsError> {
    model.add_logit_scale_grad(d_t);
    if let Some(g) = d_bias {
        model.add_logit_bias_grad(g);
    }
    match gns {
        Some(g) if accumulate => g.observe_accumulated(model.grads(), m, global),
        _ => Ok(()),
    }
}

/// The noise-scale estimator's squared norms of the gradient's trainable groups, taken once for
/// one state of the buffer. Finite norms mean finite values in those groups (squares cannot
/// cancel, and f32 squares summed in f64 cannot overflow), so when the trainable groups are
/// every group the non-finite check reads them instead of looking at the gradient again.
struct StepNorms<'g> {
    /// The groups and their norms; no groups when none were taken.
    groups: &'g [(usize, usize)],
    norms: Option<Vec<f64>>,
}

impl<'g> StepNorms<'g> {
    /// The norms of `grads` over `groups`, when there are groups to take.
    fn take<D: Device>(dev: &D, groups: Option<&'g [(usize, usize)]>, grads: &[f32]) -> Self {
        match groups {
            Some(g) => StepNorms { groups: g, norms: Some(dev.sq_norms(grads, g)) },
            None => StepNorms { groups: &[], norms: None },
        }
    }

    fn is_taken(&self) -> bool {
        self.norms.is_some()
    }

    /// Whether norms were taken and all are finite.
    fn all_finite(&self) -> bool {
        self.norms.as_ref().is_some_and(|n| n.iter().all(|v| v.is_finite()))
    }

    /// The estimator's norm function: these norms for their groups, the device's otherwise.
    fn as_fn<'a, D: Device>(
        &'a self,
        dev: &'a D,
    ) -> impl Fn(&[f32], &[(usize, usize)]) -> Vec<f64> + 'a {
        move |x, groups| match &self.norms {
            Some(n) if self.groups == groups => n.clone(),
            _ => dev.sq_norms(x, groups),
        }
    }
}

/// What a step reports to the launcher's progress display (through the coordinator).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f32,
    pub samples: u64,
    /// The latest smoothed simple noise scale (None until measured).
    pub b_simple: Option<f64>,
}

/// The run's outcome, printed by rank 0 as one JSON line.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Summary {
    pub steps: u64,
    pub world: usize,
    /// The global batch of the last step (`batch.global` unless `gns.adaptive` changed it).
    pub global_batch: usize,
    /// Examples trained on over all steps (those before a resume included).
    pub samples: u64,
    /// Changes of the global batch made by `gns.adaptive` (in this process).
    pub batch_changes: usize,
    pub loss: f32,
    /// The last evaluation's figures (recall@k, accuracy, k-NN accuracy), flattened.
    #[serde(flatten)]
    pub eval: EvalReport,
    pub logit_scale: Option<f32>,
    /// The last smoothed simple gradient noise scale (null when not measured: `gns.enabled =
    /// false`, or one rank without micro-batches).
    pub b_simple: Option<f64>,
    /// Seconds spent in the noise-scale measurement (included in `train_seconds`).
    pub gns_seconds: f64,
    pub samples_per_s: f64,
    pub samples_per_s_per_rank: f64,
    pub train_seconds: f64,
    pub params_sha256: String,
    pub out_dir: String,
    /// Steps skipped because the loss or a gradient was not finite (`run.on_nonfinite = skip`).
    pub skipped_steps: u64,
}

/// Everything a rank needs to know about its place in the job.
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    /// Ranks on this host (to share the cores among them).
    pub local_size: usize,
    /// This rank's index among them (picks its GPU with `run.device = "cuda"`).
    pub local_rank: usize,
}

/// This rank's part of a global batch of `global` examples: its first row, its row count, and
/// its micro-batches `(start, len)` (one chunk when `batch.micro` is 0 or covers it).
fn split_batch(
    global: usize,
    world: usize,
    rank: usize,
    micro: usize,
) -> (usize, usize, Vec<(usize, usize)>) {
    let (row_offset, b_local) = local_rows(global, world, rank);
    let micro = if micro == 0 { b_local } else { micro.min(b_local) };
    let chunks = (0..b_local).step_by(micro.max(1)).map(|s| (s, micro.min(b_local - s))).collect();
    (row_offset, b_local, chunks)
}

/// The data a run trains and evaluates on.
struct RunData {
    train: Dataset,
    eval: Option<Dataset>,
}

fn load_data(cfg: &Config) -> Result<RunData, TrainError> {
    match cfg.data.source {
        DataSource::Synth => {
            let (train, eval) = data::try_synth(&cfg.data.synth)?;
            Ok(RunData { train, eval: Some(eval) })
        }
        DataSource::Shards => {
            let train_path = cfg.data.train.as_ref().expect("validated: data.train is set");
            let train = data::open_shard(train_path)?;
            let eval = cfg.data.eval.as_ref().map(|p| data::open_shard(p)).transpose()?;
            Ok(RunData { train, eval })
        }
    }
}

/// All-gathers row blocks of width `d` whose row counts may differ between ranks.
fn gather_rows(
    comm: &mut dyn Communicator,
    local: &[f32],
    global_rows: usize,
    d: usize,
) -> Result<Vec<f32>, TrainError> {
    let world = comm.world();
    if global_rows.is_multiple_of(world) {
        let mut out = vec![0.0f32; global_rows * d];
        comm.all_gather_f32(local, &mut out)?;
        return Ok(out);
    }
    let bytes: Vec<u8> = local.iter().flat_map(|v| v.to_le_bytes()).collect();
    let parts = comm.all_gather_bytes(&bytes)?;
    let mut out = Vec::with_capacity(global_rows * d);
    for p in parts {
        out.extend(p.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    if out.len() != global_rows * d {
        return Err(TrainError::Setup(format!(
            "gathered {} feature values, expected {} ({} rows x {})",
            out.len(),
            global_rows * d,
            global_rows,
            d
        )));
    }
    Ok(out)
}

/// The optimizer's view of the model's tensors, each with its `optim.lr_scale` factor.
fn tensor_groups<B: DeviceBuf>(model: &Model<B>, optim: &OptimConfig) -> Vec<TensorGroup> {
    model
        .param_groups()
        .into_iter()
        .map(|g| TensorGroup {
            lr_scale: optim.lr_scale_of(&g.name),
            ..TensorGroup::from_shape(g.name, g.offset, g.len, &g.shape, g.trainable)
        })
        .collect()
}

/// The gradient's trainable elements as ascending, maximal ranges: what the all-reduce sends. A
/// frozen tower's gradient is zero on every rank (its backward does not run), so its range is
/// left out, as PyTorch DDP leaves out parameters that do not require a gradient.
fn trainable_spans(groups: &[ParamGroup]) -> Vec<std::ops::Range<usize>> {
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    for g in groups.iter().filter(|g| g.trainable && g.len > 0) {
        match spans.last_mut() {
            Some(last) if last.end == g.offset => last.end += g.len,
            _ => spans.push(g.offset..g.offset + g.len),
        }
    }
    spans
}

/// Sums the gradient `grads` over the ranks in `spans` (see [`trainable_spans`]); the rest is
/// left as it is. Each span is summed in the order of one all-reduce over the whole buffer
/// (`all_reduce_f32_part`), so the result is bitwise the whole buffer's all-reduce.
fn all_reduce_spans(
    comm: &mut dyn Communicator,
    grads: &mut [f32],
    spans: &[std::ops::Range<usize>],
) -> Result<(), CommError> {
    let total = grads.len();
    if let [only] = spans
        && *only == (0..total)
    {
        return comm.all_reduce_f32(grads, ReduceOp::Sum);
    }
    for r in spans {
        comm.all_reduce_f32_part(&mut grads[r.clone()], r.start, total, ReduceOp::Sum)?;
    }
    Ok(())
}

fn sha256_f32(values: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

struct Metrics {
    file: Option<fs::File>,
    path: PathBuf,
}

impl Metrics {
    /// `resumed_at`: the step a resumed run continues from (its earlier lines are kept).
    fn open(out_dir: &Path, enabled: bool, resumed_at: Option<u64>) -> Result<Metrics, TrainError> {
        let path = out_dir.join("metrics.jsonl");
        let file = if enabled {
            if let Some(step) = resumed_at {
                checkpoint::trim_metrics(&path, step)?;
            }
            let mut opts = fs::OpenOptions::new();
            opts.create(true).write(true);
            if resumed_at.is_some() {
                opts.append(true)
            } else {
                opts.truncate(true)
            };
            Some(
                opts.open(&path)
                    .map_err(|source| TrainError::Output { path: path.clone(), source })?,
            )
        } else {
            None
        };
        Ok(Metrics { file, path })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{value}")
                .map_err(|source| TrainError::Output { path: self.path.clone(), source })?;
        }
        Ok(())
    }
}

/// Fills `xa` and `xb` with two fresh augmented views of the labeled images at `rows`. The
/// views depend only on (seed, step, position in the global batch), so any split of the batch
/// over ranks sees the same views.
fn two_views(
    ds: &Dataset,
    rows: &[usize],
    first_position: usize,
    seed: u64,
    step: u64,
    xa: &mut Vec<f32>,
    xb: &mut Vec<f32>,
) {
    let mut images = Vec::new();
    ds.gather_a(rows, &mut images);
    let d = ds.kind().dim_a();
    xa.resize(images.len(), 0.0);
    xb.resize(images.len(), 0.0);
    for (k, img) in images.chunks_exact(d).enumerate() {
        let position = (first_position + k) as u64;
        let mut rng = Rng::stream(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15), position);
        data::digits::augment_digit(img, &mut rng, &mut xa[k * d..(k + 1) * d]);
        data::digits::augment_digit(img, &mut rng, &mut xb[k * d..(k + 1) * d]);
    }
}

fn check_dims(cfg: &Config, ds: &Dataset, what: &str) -> Result<(), TrainError> {
    let m = &cfg.model;
    let (want_a, want_b) = match m.kind {
        ModelKind::Dual => (m.tower_a.input_dim, Some(m.tower_b.input_dim)),
        ModelKind::Shared => (m.tower_a.input_dim, Some(m.tower_a.input_dim)),
        ModelKind::Classifier => (m.tower_a.input_dim, None),
    };
    let two_views = cfg.data.two_views && what == "training";
    let ok = match (ds.kind(), want_b) {
        (DatasetKind::Paired { dim_a, dim_b }, Some(wb)) => {
            !two_views && dim_a == want_a && dim_b == wb
        }
        (DatasetKind::Labeled { dim, .. }, Some(wb)) if two_views => {
            dim == want_a && dim == wb && dim == data::digits::DIGITS_DIM
        }
        (DatasetKind::Labeled { dim, num_classes }, None) => {
            dim == want_a && num_classes <= m.tower_a.output_dim
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let want = match want_b {
        Some(_) if two_views => format!(
            "labeled 8x8 images (64 features) for data.two_views, with model.tower_a.input_dim \
             = {want_a} matching"
        ),
        Some(wb) => format!(
            "paired views of dims {want_a} (model.tower_a.input_dim) and {wb} \
             (model.tower_b.input_dim, or tower_a's in shared mode)"
        ),
        None => format!(
            "labeled features of dim {want_a} (model.tower_a.input_dim) with at most {} classes \
             (model.tower_a.output_dim)",
            m.tower_a.output_dim
        ),
    };
    Err(TrainError::Setup(format!(
        "the {what} data holds {} but model.kind = {:?} expects {want}: change the config or the \
         data",
        ds.kind().describe(),
        format!("{:?}", m.kind).to_lowercase()
    )))
}

/// Asks glibc's allocator to keep freed memory for reuse instead of handing it back to the
/// kernel. A training step allocates its activations afresh; by default glibc unmaps (above
/// 128 KiB) or trims what is freed, and the next step faults every page back in: about a
/// quarter of a rank's CPU time at the default job's batch (`perf record`, docs/BENCHMARKS.md).
/// Blocks up to 64 MiB now come from the heap, which keeps up to 256 MiB of free memory.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

/// Trains for `cfg.run.steps` steps and returns the summary (meaningful on rank 0; every rank
/// returns the same loss and parameter hash).
pub fn train(
    cfg: &Config,
    comm: &mut dyn Communicator,
    info: &RankInfo,
    on_step: &mut dyn FnMut(StepReport),
) -> Result<Summary, TrainError> {
    keep_freed_memory();
    if cfg.run.check_collectives {
        // Debug mode: every collective is compared across ranks before it runs.
        let mut checked = CheckedComm::new(comm);
        return train_checked(cfg, &mut checked, info, on_step);
    }
    train_checked(cfg, comm, info, on_step)
}

fn train_checked(
    cfg: &Config,
    comm: &mut dyn Communicator,
    info: &RankInfo,
    on_step: &mut dyn FnMut(StepReport),
) -> Result<Summary, TrainError> {
    cfg.check_world(info.world).map_err(TrainError::Setup)?;

    let threads = if cfg.run.threads > 0 {
        cfg.run.threads
    } else {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / info.local_size.max(1)).max(1)
    };
    match cfg.run.device {
        DeviceKind::Cpu => {
            let cpu = CpuDevice::new(threads);
            train_on(cfg, comm, info, on_step, threads, &cpu, None, None)
        }
        DeviceKind::Cuda => {
            let dev = open_cuda(cfg, info)?;
            // The fused CLIP kernels: the whole batch on one GPU for one rank, the ring of
            // GPU blocks (Inf-CL's multi-level tiling) across ranks. SigLIP: the ring of GPU
            // blocks at every world size (one block of the whole batch on one rank).
            let siglip = cfg.loss.name == LossKind::Siglip;
            let fused =
                (cfg.loss.name == LossKind::ClipTiled || siglip) && cfg.run.cuda_loss == "fused";
            let what = if siglip { "SigLIP" } else { "CLIP" };
            let (mode, precision) = (
                LossMode::parse(&cfg.run.cuda_loss_mode).unwrap_or_default(),
                Precision::parse(&cfg.run.cuda_loss_precision).unwrap_or_default(),
            );
            let mut kernels = FusedClipLoss::default();
            let mut blocks = if fused && (info.world > 1 || siglip) {
                let b = GpuClipBlocks::new(dev.gpu(), mode, precision).map_err(|e| {
                    TrainError::Setup(format!(
                        "run.cuda_loss = \"fused\": {e} (run.cuda_loss = \"host\" computes the \
                         loss on the CPU)"
                    ))
                })?;
                Some(b.with_travel(if cfg.run.cuda_ring == "host" {
                    BlockTravel::Host
                } else {
                    BlockTravel::DeviceOverNccl
                }))
            } else {
                None
            };
            let ring = cfg.loss.ring_opts();
            let mut on_gpu = |comm: &mut dyn Communicator,
                              img: &[f32],
                              txt: &[f32],
                              b: usize,
                              d: usize,
                              scale: f32,
                              bias: Option<f32>| {
                let fail = |e: CudaError| {
                    TrainError::Device(format!(
                        "the fused {what} loss on the GPU failed: {e} (run.cuda_loss = \"host\" \
                         computes the loss on the CPU)"
                    ))
                };
                if let Some(bias) = bias {
                    // SigLIP: one pass of the ring of GPU blocks (made for it at any world).
                    let Some(ops) = blocks.as_mut() else {
                        return Err(TrainError::Device(
                            "the fused SigLIP loss has no GPU blocks (run.cuda_loss = \"host\" \
                             computes the loss on the CPU)"
                                .into(),
                        ));
                    };
                    dev.synchronize();
                    let chunk_rows = ring.device_chunk_rows();
                    let o = loss::siglip_loss_ring_with(
                        comm, ops, chunk_rows, None, img, txt, b, d, scale, bias, None,
                    )?;
                    let (gi, gt) = (Vals::Host(o.d_img_local), Vals::Host(o.d_txt_local));
                    return Ok((o.loss, gi, gt, o.d_t_partial, o.d_bias_partial));
                }
                if blocks.is_none() && dev.is_managed(img) && dev.is_managed(txt) {
                    // The features as the forward left them, the gradients into the device's
                    // buffers: copies on the GPU in the stream's order, none through the host.
                    let (mut gi, mut gt) = (dev.alloc(b * d), dev.alloc(b * d));
                    let (loss, d_t) = kernels
                        .run_managed(
                            dev.gpu(),
                            img,
                            txt,
                            b,
                            d,
                            scale,
                            mode,
                            precision,
                            &mut gi,
                            &mut gt,
                        )
                        .map_err(fail)?;
                    let (gi, gt) = (Vals::Device(gi), Vals::Device(gt));
                    return Ok((loss as f32, gi, gt, d_t as f32, None));
                }
                // The ring sends the features through the host, and host features are copied
                // as host memory: the forward must be done.
                dev.synchronize();
                if let Some(ops) = blocks.as_mut() {
                    let chunk_rows = ring.device_chunk_rows();
                    let o = loss::clip_loss_ring_with(
                        comm, ops, chunk_rows, None, img, txt, b, d, scale, None,
                    )?;
                    let (gi, gt) = (Vals::Host(o.d_img_local), Vals::Host(o.d_txt_local));
                    return Ok((o.loss, gi, gt, o.d_t_partial, None));
                }
                let o =
                    kernels.run(dev.gpu(), img, txt, b, d, scale, mode, precision).map_err(fail)?;
                let (gi, gt) = (Vals::Host(o.d_img), Vals::Host(o.d_txt));
                Ok((o.loss as f32, gi, gt, o.d_t as f32, None))
            };
            let device_loss: Option<&mut DeviceLoss<_>> =
                if fused { Some(&mut on_gpu) } else { None };
            // run.overlap_allreduce with NCCL: the buckets are all-reduced on NCCL's stream
            // behind events of the compute stream, the host never waiting per layer.
            let nccl = comm.as_any_mut().is_some_and(|c| c.is::<NcclComm>());
            let mut on_streams = (cfg.run.overlap_allreduce && nccl).then(|| {
                NcclOverlap(OverlapAllReduce::new(
                    dev.gpu().stream.clone(),
                    cfg.run.allreduce_bucket_bytes,
                ))
            });
            if on_streams.is_some() && info.rank == 0 {
                eprintln!(
                    "run.overlap_allreduce: gradient buckets of {} bytes all-reduced on NCCL's \
                     stream during the backward",
                    cfg.run.allreduce_bucket_bytes
                );
            }
            let overlap = on_streams.as_mut().map(|o| o as &mut dyn DeviceOverlap);
            train_on(cfg, comm, info, on_step, threads, &dev, device_loss, overlap)
        }
    }
}

/// The CLIP loss (`bias` None) or SigLIP (with that logit bias) computed by the device itself:
/// `(comm, img, txt, b, d, scale, bias)` → the global loss, this rank's ∂L/∂I and ∂L/∂T, and
/// its shares of ∂L/∂t and (SigLIP) ∂L/∂β, as the ring loss returns them.
/// The features are the device's buffers as the forward left them, their work possibly still
/// queued (a consumer on the host synchronizes first); the gradients may stay on the device.
type DeviceLoss<'a, B> = dyn FnMut(
        &mut dyn Communicator,
        &[f32],
        &[f32],
        usize,
        usize,
        f32,
        Option<f32>,
    ) -> Result<(f32, Vals<B>, Vals<B>, f32, Option<f32>), TrainError>
    + 'a;

/// A step's values (features, feature gradients) on the host or in a device buffer.
enum Vals<B> {
    Host(Vec<f32>),
    Device(B),
}

impl<B: DeviceBuf> std::ops::Deref for Vals<B> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Vals::Host(v) => v,
            Vals::Device(b) => b,
        }
    }
}

impl<B: DeviceBuf> Vals<B> {
    /// The values in a host vector (after the device's queued work).
    fn into_host<D: Device<Buf = B>>(self, dev: &D) -> Vec<f32> {
        match self {
            Vals::Host(v) => v,
            Vals::Device(b) => {
                dev.synchronize();
                dev.host_vec(b)
            }
        }
    }
}

/// The gradient all-reduce overlapped with the backward on the device's own streams, in place
/// of the host buckets of [`overlap::all_reduce_overlapped`]: `begin` with the local gradient,
/// `ready` for each layer the backward has queued, `finish` once the gradient is final (on the
/// host and in the device's queue), `take` to replace the local gradient by the reduced one
/// (after its last local readers). Collective: every rank makes the same calls.
trait DeviceOverlap {
    /// Only the elements in `spans` (ascending ranges) are reduced; `take` leaves the rest.
    fn begin(
        &mut self,
        comm: &mut dyn Communicator,
        grads: &[f32],
        spans: &[std::ops::Range<usize>],
    ) -> Result<(), CommError>;
    fn ready(
        &mut self,
        comm: &mut dyn Communicator,
        offset: usize,
        len: usize,
    ) -> Result<(), CommError>;
    fn finish(&mut self, comm: &mut dyn Communicator, grads: &[f32]) -> Result<(), CommError>;
    fn take(&mut self, comm: &mut dyn Communicator, grads: &mut [f32]) -> Result<(), CommError>;
}

/// [`DeviceOverlap`] on an [`NcclComm`] (the communicator the calls are given must be one).
struct NcclOverlap(OverlapAllReduce);

impl NcclOverlap {
    fn nccl(comm: &mut dyn Communicator) -> Result<&mut NcclComm, CommError> {
        comm.as_any_mut().and_then(|c| c.downcast_mut::<NcclComm>()).ok_or_else(|| {
            CommError::InvalidArgument {
                op: "all_reduce_overlapped",
                detail: "the overlapped GPU all-reduce needs the NCCL communicator \
                         (run.collectives = \"nccl\")"
                    .into(),
            }
        })
    }
}

impl DeviceOverlap for NcclOverlap {
    fn begin(
        &mut self,
        comm: &mut dyn Communicator,
        grads: &[f32],
        spans: &[std::ops::Range<usize>],
    ) -> Result<(), CommError> {
        self.0.begin(Self::nccl(comm)?, grads, spans)
    }
    fn ready(
        &mut self,
        comm: &mut dyn Communicator,
        offset: usize,
        len: usize,
    ) -> Result<(), CommError> {
        self.0.ready(Self::nccl(comm)?, offset, len)
    }
    fn finish(&mut self, comm: &mut dyn Communicator, _grads: &[f32]) -> Result<(), CommError> {
        // NCCL reads the gradient by its address, on the stream.
        self.0.finish(Self::nccl(comm)?)
    }
    fn take(&mut self, comm: &mut dyn Communicator, grads: &mut [f32]) -> Result<(), CommError> {
        self.0.take(Self::nccl(comm)?, grads)
    }
}

/// Where the gradient all-reduced during the backward is (run.overlap_allreduce).
enum Reduced {
    /// The host buckets' result.
    Host(Vec<f32>),
    /// The device's, taken by [`DeviceOverlap::take`].
    Device,
}

/// The CUDA device of this rank for `run.device = "cuda"`: GPU `local_rank mod GPUs`.
fn open_cuda(cfg: &Config, info: &RankInfo) -> Result<CudaDevice, TrainError> {
    let fail = |e: CudaError| {
        TrainError::Setup(format!(
            "run.device = \"cuda\": {e} (or train on the CPU with run.device = \"cpu\")"
        ))
    };
    let gpus = Gpu::count().map_err(fail)?;
    let gemm_math = GemmMath::parse(&cfg.run.cuda_gemm).unwrap_or_default();
    // (Validated with the config.)
    let defines = Defines::parse(&cfg.run.cuda_kernel_defines).map_err(fail)?;
    if !defines.is_empty() && info.rank == 0 {
        eprintln!(
            "run.cuda_kernel_defines: the CUDA kernels are compiled with {}",
            cfg.run.cuda_kernel_defines.join(", ")
        );
    }
    CudaDevice::open_with(
        Gpu::ordinal_for(info.local_rank, gpus),
        CudaDeviceOpts { gemm_math },
        &defines,
    )
    .map_err(fail)
}

/// The model `cfg` trains: its `[model]` table, with what the loss adds (SigLIP brings a
/// learnable logit bias and its own initial scale, ALGORITHMS.md §3).
pub fn model_config(cfg: &Config) -> crate::model::ModelConfig {
    let mut model_cfg = cfg.model.clone();
    if cfg.loss.name == LossKind::Siglip {
        model_cfg.logit_scale_init = cfg.loss.siglip_scale_init;
        model_cfg.logit_bias_init = Some(cfg.loss.siglip_bias_init);
        model_cfg.freeze_logit_bias = !cfg.loss.learnable_bias;
    }
    model_cfg
}

#[allow(clippy::too_many_arguments)]
fn train_on<D: Device>(
    cfg: &Config,
    comm: &mut dyn Communicator,
    info: &RankInfo,
    on_step: &mut dyn FnMut(StepReport),
    threads: usize,
    dev: &D,
    mut device_loss: Option<&mut DeviceLoss<D::Buf>>,
    mut device_overlap: Option<&mut dyn DeviceOverlap>,
) -> Result<Summary, TrainError> {
    let (rank, world, global) = (info.rank, info.world, cfg.batch.global);
    let is_root = rank == 0;
    let data = load_data(cfg)?;
    check_dims(cfg, &data.train, "training")?;
    if let Some(ev) = &data.eval {
        check_dims(cfg, ev, "evaluation")?;
    }
    if data.train.len() < global {
        return Err(TrainError::Setup(format!(
            "the training data has {} examples, fewer than batch.global = {global}",
            data.train.len()
        )));
    }

    let model_cfg = model_config(cfg);
    // Parameters, gradients and activations in the device's memory.
    let mut model = Model::new(&model_cfg, cfg.run.seed)?.into_device(dev);
    let mut loss_ws = loss::RingLossWorkspace::new(&RingLossOpts {
        threads: if cfg.loss.threads > 0 { cfg.loss.threads } else { threads },
        ..cfg.loss.ring_opts()
    })?;
    let groups = tensor_groups(&model, &cfg.optim);
    // The optimizer's state lives beside the parameters, and its passes run on the device.
    let mut opt = Optimizer::new(&cfg.optim, groups)
        .map_err(|e| TrainError::Setup(e.to_string()))?
        .into_device(dev);
    if is_root && !cfg.optim.lr_scale.is_empty() {
        let scaled = opt.scaled_rates();
        eprintln!(
            "optim.lr_scale: {} of {} tensors at a scaled learning rate: {}",
            scaled.len(),
            opt.groups().len(),
            scaled.join(", ")
        );
    }
    let schedule = cfg.optim.lr_schedule(cfg.run.steps).map_err(TrainError::Setup)?;
    // One global-batch stream for all ranks: the same permutation everywhere, each rank taking
    // its rows, so that N ranks see exactly what one rank with the whole batch would.
    let sampler = DistributedSampler::try_new(data.train.len(), 1, 0, cfg.run.seed, true)?;
    sampler.steps_per_epoch(global)?;

    let out_dir = &cfg.run.out_dir;
    if is_root {
        fs::create_dir_all(out_dir)
            .map_err(|source| TrainError::Output { path: out_dir.clone(), source })?;
    }
    // Resume (checkpoint.rs): rank 0 finds and reads the checkpoint, every rank receives it.
    let resumed = checkpoint::fetch_resume(cfg, comm)?;
    // Pretrained towers (`model.init_from`): rank 0 reads them, every rank receives them. A
    // resumed run takes its parameters from the checkpoint instead.
    if resumed.is_none() {
        let groups = model.param_groups();
        let loaded = crate::model::init::fetch_init(&model_cfg, &groups, model.params_mut(), comm)?;
        if let Some(line) = loaded.filter(|_| is_root) {
            eprintln!("{line}");
        }
    }
    let mut metrics = Metrics::open(out_dir, is_root, resumed.as_ref().map(|r| r.checkpoint.step))?;

    // Gradient noise scale over the trainable tensors (ALGORITHMS.md §5).
    let gns_groups: Vec<(usize, usize)> =
        model.param_groups().iter().filter(|g| g.trainable).map(|g| (g.offset, g.len)).collect();
    let mut gns = if cfg.gns.enabled && !gns_groups.is_empty() {
        Some(GnsEstimator::new(&cfg.gns, &gns_groups)?)
    } else {
        None
    };
    let mut gns_report: Option<GnsReport> = None;
    // The estimator's gradient norms, summed by the device that holds the gradient: taken once
    // per state of the buffer (a GPU waits for each) and, when the trainable groups are every
    // group, read by the non-finite check too (see `StepNorms`).
    let norms_cover_all = gns_groups.len() == model.param_groups().len();
    let mut gns_seconds = 0.0f64;

    let mut xa = Vec::new();
    let mut xb = Vec::new();
    let mut labels = Vec::new();
    let mut last_loss = f32::NAN;
    let mut summary = Summary { world, global_batch: global, ..Summary::default() };
    let mut train_seconds = 0.0f64;
    let contrastive = model.kind() != ModelKind::Classifier;
    let param_groups = model.param_groups();
    let reduce_spans = trainable_spans(&param_groups);
    let reduced_values: usize = reduce_spans.iter().map(|r| r.len()).sum();
    if is_root && world > 1 && reduced_values < model.num_params() {
        eprintln!(
            "gradient all-reduce: {reduced_values} of {} values per step (the frozen tensors' \
             gradients are not sent)",
            model.num_params()
        );
    }

    // Adaptive batch (`[gns.adaptive]`): the global batch and the learning-rate factor of every
    // step. Every rank decides alike, from the all-reduced noise-scale figures.
    let mut batch_ctl = if cfg.gns.adaptive.enabled {
        let c = BatchController::new(&cfg.gns.adaptive, global, world)
            .and_then(|c| c.fit_data(data.train.len()))
            .map_err(GnsError::from)?;
        if is_root {
            let (lo, hi) = c.range();
            eprintln!(
                "gns.adaptive: global batch {} within [{lo}, {hi}], learning rate rule {:?}",
                c.initial(),
                cfg.gns.adaptive.lr_rule
            );
            if world == 1 && cfg.batch.micro == 0 {
                eprintln!(
                    "gns.adaptive: warning: one rank without micro-batches does not measure the \
                     noise scale, so the batch will not change; set batch.micro"
                );
            }
        }
        Some(c)
    } else {
        None
    };

    // Checkpoints: restore the resumed state, then save as `[checkpoint]` says (end of a step).
    let ckpt = Checkpointer::new(cfg, world, sampler.steps_per_epoch(global)?);
    let mut start_step = 0;
    let mut end_step = cfg.run.steps;
    if let Some(r) = &resumed {
        let mut warnings = ckpt.restore(r, &mut model, &mut opt, gns.as_mut())?;
        match (batch_ctl.as_mut(), r.checkpoint.batch_schedule.as_deref()) {
            (Some(c), Some(saved)) => {
                let rows = data.train.len();
                if let Some(big) = saved.iter().find(|ch| ch.batch as usize > rows) {
                    return Err(TrainError::Setup(format!(
                        "{}: its adaptive batch schedule reaches a global batch of {} but the \
                         training data has {rows} examples; resume with the data it was \
                         written with",
                        r.origin, big.batch
                    )));
                }
                c.resume(checkpoint::schedule_of(saved))
            }
            (Some(_), None) => warnings.push(
                "the checkpoint has no adaptive batch schedule (a fixed batch): the adaptive \
                 batch starts from here"
                    .into(),
            ),
            (None, Some(saved)) if !saved.is_empty() => warnings.push(
                "the checkpoint followed an adaptive batch schedule but gns.adaptive is off: \
                 continuing with batch.global (the data order differs from the saved run's)"
                    .into(),
            ),
            _ => {}
        }
        start_step = r.checkpoint.step;
        last_loss = r.checkpoint.last_loss;
        gns_report = gns.as_ref().and_then(|g| g.last_report().cloned());
        if is_root {
            for w in warnings {
                eprintln!("checkpoint: warning: {w}");
            }
            eprintln!("checkpoint: resuming from {} at step {start_step}", r.origin);
        }
    }

    let mut samples_seen =
        batch_ctl.as_ref().map_or(start_step * global as u64, |c| c.examples_before(start_step));
    let samples_at_start = samples_seen;
    let mut last_global = global;
    for step in start_step..cfg.run.steps {
        fault::enter_step(step + 1);
        let t0 = Instant::now();
        // This step's global batch (gns.adaptive may change it between steps), this rank's rows
        // of it, and the learning rate scaled for it.
        let global = batch_ctl.as_ref().map_or(global, |c| c.batch());
        let (row_offset, b_local, chunks) = split_batch(global, world, rank, cfg.batch.micro);
        let lr = schedule.lr(step) * batch_ctl.as_ref().map_or(1.0, |c| c.lr_factor());
        let batch = match &batch_ctl {
            Some(c) => {
                let (epoch, row) = c.sampler_position(step, data.train.len());
                sampler.permutation(epoch)[row..row + global].to_vec()
            }
            None => sampler.try_global_batch_indices(step, global)?,
        };
        let mine = &batch[row_offset..row_offset + b_local];
        model.zero_grads();
        // GradCache (ALGORITHMS.md §4): with micro-batches, embed the local batch without
        // keeping activations, run the loss on the features, then replay each micro-batch
        // forward and backward with its slice of the feature gradients. Parameter gradients
        // accumulate in the flat buffer; the noise-scale estimator sees each micro-batch.
        let accumulate = chunks.len() > 1;
        // The gradient all-reduced during the last replay (run.overlap_allreduce).
        let mut reduced: Option<Reduced> = None;
        let loss_value = if contrastive {
            if cfg.data.two_views {
                two_views(&data.train, mine, row_offset, cfg.run.seed, step, &mut xa, &mut xb);
            } else {
                data.train.gather_a(mine, &mut xa);
                data.train.gather_b(mine, &mut xb);
            }
            let (da, db) = (xa.len() / b_local, xb.len() / b_local);
            let on_device = matches!(cfg.loss.name, LossKind::ClipTiled | LossKind::Siglip)
                && device_loss.is_some();
            let (fa, fb) = if accumulate && on_device {
                // GradCache with the loss on the device: the micro-batches' features gathered
                // into device buffers, on the device.
                let (mut fa, mut fb) = (None, None);
                for &(s, m) in &chunks {
                    let ca = model.embed_a_buf(dev, &xa[s * da..(s + m) * da], m);
                    let cb = model.embed_b_buf(dev, &xb[s * db..(s + m) * db], m);
                    for (all, c) in [(&mut fa, ca), (&mut fb, cb)] {
                        let d = c.len() / m;
                        let all = all.get_or_insert_with(|| dev.alloc(b_local * d));
                        dev.copy(&c, &mut all[s * d..(s + m) * d]);
                    }
                }
                match (fa, fb) {
                    (Some(fa), Some(fb)) => (Vals::Device(fa), Vals::Device(fb)),
                    _ => unreachable!("a step has at least one micro-batch"),
                }
            } else if accumulate {
                let (mut fa, mut fb) = (Vec::new(), Vec::new());
                for &(s, m) in &chunks {
                    fa.extend(model.embed_a(dev, &xa[s * da..(s + m) * da], m));
                    fb.extend(model.embed_b(dev, &xb[s * db..(s + m) * db], m));
                }
                (Vals::Host(fa), Vals::Host(fb))
            } else if on_device {
                // The device's loss reads the features where the forward writes them.
                let (fa, fb) = model.forward_pair_buf(dev, &xa, &xb, b_local);
                (Vals::Device(fa), Vals::Device(fb))
            } else {
                let (fa, fb) = model.forward_pair(dev, &xa, &xb, b_local);
                (Vals::Host(fa), Vals::Host(fb))
            };
            let d = fa.len() / b_local;
            let scale = model.logit_scale();
            let out = match cfg.loss.name {
                LossKind::Clip => {
                    let fa_all = gather_rows(comm, &fa, global, d)?;
                    let fb_all = gather_rows(comm, &fb, global, d)?;
                    let o = loss::clip_loss_local(
                        &fa_all, &fb_all, global, d, row_offset, b_local, scale,
                    );
                    (
                        o.loss,
                        Vals::Host(o.d_img_local),
                        Vals::Host(o.d_txt_local),
                        o.d_t_partial,
                        None,
                    )
                }
                LossKind::ClipTiled if device_loss.is_some() => {
                    let f = device_loss.as_mut().expect("matched on is_some");
                    f(comm, &fa, &fb, b_local, d, scale, None)?
                }
                LossKind::Siglip if device_loss.is_some() => {
                    let f = device_loss.as_mut().expect("matched on is_some");
                    f(comm, &fa, &fb, b_local, d, scale, Some(model.logit_bias()))?
                }
                LossKind::ClipTiled => {
                    // The text features are not needed after the loss: their buffer takes
                    // their gradient (one b × d buffer less at the peak).
                    let o = loss::clip_loss_ring_ws_owned(
                        comm,
                        &mut loss_ws,
                        &fa,
                        fb.into_host(dev),
                        b_local,
                        d,
                        scale,
                        None,
                    )?;
                    (
                        o.loss,
                        Vals::Host(o.d_img_local),
                        Vals::Host(o.d_txt_local),
                        o.d_t_partial,
                        None,
                    )
                }
                LossKind::Siglip => {
                    let bias = model.logit_bias();
                    let o = loss::siglip_loss_ring_ws_owned(
                        comm,
                        &mut loss_ws,
                        &fa,
                        fb.into_host(dev),
                        b_local,
                        d,
                        scale,
                        bias,
                        None,
                    )?;
                    let (gi, gt) = (Vals::Host(o.d_img_local), Vals::Host(o.d_txt_local));
                    (o.loss, gi, gt, o.d_t_partial, o.d_bias_partial)
                }
            };
            let (loss_value, d_img, d_txt, d_t, d_bias) = out;
            // run.overlap_allreduce: the last replay's backward finishes every gradient, layer
            // by layer from the top; finished layers are all-reduced in buckets while the
            // lower layers' backward runs: on a communication thread (bitwise the same sums as
            // the plain all-reduce below), or with NCCL on its stream behind the compute
            // stream's events (also at world size 1, where it checks the path). The local
            // buffer stays local for GNS and the NaN check.
            let overlapped = cfg.run.overlap_allreduce && (world > 1 || device_overlap.is_some());
            let n_params = model.grads().len();
            for (ci, &(s, m)) in chunks.iter().enumerate() {
                if accumulate {
                    // The replay: activations for the backward (a frozen tower b skips it).
                    model.forward_for_backward(
                        dev,
                        &xa[s * da..(s + m) * da],
                        &xb[s * db..(s + m) * db],
                        m,
                    );
                }
                let (ga, gb) = (&d_img[s * d..(s + m) * d], &d_txt[s * d..(s + m) * d]);
                // The temperature's (and bias's) gradient, shared out by micro-batch size so
                // that each micro-batch's contribution carries its part.
                let share = m as f32 / b_local as f32;
                let dt_m = if accumulate { d_t * share } else { d_t };
                let dbias_m = d_bias.map(|g| if accumulate { g * share } else { g });
                if overlapped
                    && ci + 1 == chunks.len()
                    && let Some(ov) = device_overlap.as_deref_mut()
                {
                    ov.begin(comm, model.grads(), &reduce_spans)?;
                    let mut failed = None;
                    model.backward_pair_queued(dev, ga, gb, &mut |o, g| {
                        if failed.is_none()
                            && let Err(e) = ov.ready(comm, o, g.len())
                        {
                            failed = Some(e);
                        }
                    });
                    if let Some(e) = failed {
                        return Err(e.into());
                    }
                    after_backward(&mut model, dt_m, dbias_m, gns.as_mut(), accumulate, m, global)?;
                    // Poisons element 0, which `finish` sends.
                    fault::at_grad(model.grads_mut());
                    ov.finish(comm, model.grads())?;
                    reduced = Some(Reduced::Device);
                } else if overlapped && ci + 1 == chunks.len() {
                    let bucket_bytes = cfg.run.allreduce_bucket_bytes;
                    let (seen, red) = overlap::all_reduce_overlapped(
                        comm,
                        n_params,
                        &reduce_spans,
                        bucket_bytes,
                        |bk| {
                            model.backward_pair_with(dev, ga, gb, &mut |o, g| bk.ready(o, g));
                            let seen = after_backward(
                                &mut model,
                                dt_m,
                                dbias_m,
                                gns.as_mut(),
                                accumulate,
                                m,
                                global,
                            );
                            // Poisons element 0, which the buckets read last.
                            fault::at_grad(model.grads_mut());
                            bk.finish(model.grads());
                            seen
                        },
                    )?;
                    seen?;
                    reduced = Some(Reduced::Host(red));
                } else {
                    model.backward_pair(dev, ga, gb);
                    after_backward(&mut model, dt_m, dbias_m, gns.as_mut(), accumulate, m, global)?;
                }
            }
            loss_value
        } else {
            data.train.gather_a(mine, &mut xa);
            data.train.gather_labels(mine, &mut labels);
            let da = xa.len() / b_local;
            let mut loss_partial = 0.0f64;
            for &(s, m) in &chunks {
                let logits = model.forward_logits(dev, &xa[s * da..(s + m) * da], m);
                let ce = loss::cross_entropy(&logits, &labels[s..s + m], m, global);
                model.backward_logits(dev, &ce.d_logits);
                loss_partial += ce.loss_partial as f64;
                if accumulate && let Some(g) = gns.as_mut() {
                    g.observe_accumulated(model.grads(), m, global)?;
                }
            }
            let mut s = [loss_partial];
            comm.all_reduce_f64(&mut s, ReduceOp::Sum)?;
            s[0] as f32
        };
        // The buffer holds this rank's partial sum (1/B_global)·Σ_local g_i: GNS reads it before
        // the all-reduce and the global mean after it.
        if reduced.is_none() {
            fault::at_grad(model.grads_mut());
        }
        let tg = Instant::now();
        let local_norms = StepNorms::take(
            dev,
            (!accumulate && gns.is_some()).then_some(&gns_groups[..]),
            model.grads(),
        );
        if !accumulate && let Some(g) = gns.as_mut() {
            g.observe_local_with(model.grads(), b_local, global, &local_norms.as_fn(dev))?;
        }
        let mut gns_s = tg.elapsed().as_secs_f64();
        // Where a NaN/inf comes from: this rank's own loss or gradient, before the all-reduce
        // spreads it to every rank.
        let local_bad = if !loss_value.is_finite() {
            Some(format!("the loss is {loss_value}"))
        } else if norms_cover_all && local_norms.all_finite() {
            None
        } else {
            first_nonfinite(dev, &param_groups, model.grads())
        };
        match (reduced, device_overlap.as_deref_mut()) {
            (Some(Reduced::Host(r)), _) => {
                // Outside the spans the local gradient stays, as after `all_reduce_spans`.
                let g = model.grads_mut();
                for s in &reduce_spans {
                    g[s.clone()].copy_from_slice(&r[s.clone()]);
                }
            }
            (Some(Reduced::Device), Some(ov)) => ov.take(comm, model.grads_mut())?,
            (Some(Reduced::Device), None) => unreachable!("only the device overlap says Device"),
            (None, _) => all_reduce_spans(comm, model.grads_mut(), &reduce_spans)?,
        }
        // The estimator's norms of the reduced gradient (one rank's sum is its own gradient:
        // the local norms, when taken, are these).
        let reduced_norms = if world == 1 && local_norms.is_taken() {
            local_norms
        } else {
            StepNorms::take(dev, gns.is_some().then_some(&gns_groups[..]), model.grads())
        };
        // The reduced gradient and the loss are identical on every rank, so every rank takes
        // the same decision in the same step. One rank's sum is its own gradient: no second
        // look (a GPU waits for each).
        let bad = if world == 1 {
            local_bad.clone()
        } else if !loss_value.is_finite() {
            Some(format!("the loss is {loss_value}"))
        } else if norms_cover_all && reduced_norms.all_finite() {
            None
        } else {
            first_nonfinite(dev, &param_groups, model.grads())
        };
        let mut skipped = false;
        if let Some(what) = bad {
            let origins = comm.all_gather_bytes(local_bad.as_deref().unwrap_or("").as_bytes())?;
            let origins: Vec<String> = origins
                .iter()
                .enumerate()
                .filter(|(_, o)| !o.is_empty())
                .map(|(r, o)| format!("rank {r}: {}", String::from_utf8_lossy(o)))
                .collect();
            let origin = if origins.is_empty() {
                "no rank's own gradient was: the sum overflowed".to_string()
            } else {
                format!("first seen on {}", origins.join("; "))
            };
            if cfg.run.on_nonfinite == OnNonFinite::Stop {
                return Err(TrainError::NonFinite { step: step + 1, what, origin });
            }
            if let Some(g) = gns.as_mut() {
                g.reset_step();
            }
            summary.skipped_steps += 1;
            if is_root {
                eprintln!("step {}: skipped: {what} ({origin})", step + 1);
                metrics.write(serde_json::json!({
                    "step": step + 1,
                    "skipped": format!("{what} ({origin})"),
                }))?;
            }
            skipped = true;
        }
        let mut gns_done = Vec::new();
        let mut opt_stats = None;
        if !skipped {
            let tg = Instant::now();
            if let Some(g) = gns.as_mut() {
                gns_done =
                    g.finish_step_with(comm, model.grads(), global, &reduced_norms.as_fn(dev))?;
            }
            gns_s += tg.elapsed().as_secs_f64();
            let (params, grads) = model.params_and_grads_mut();
            opt_stats = Some(opt.step_on(dev, params, grads, lr, step));
            model.clamp_logit_scale();
        }
        gns_seconds += gns_s;
        train_seconds += t0.elapsed().as_secs_f64();
        last_loss = loss_value;
        samples_seen += global as u64;
        last_global = global;
        let samples = samples_seen;

        // Every step's estimates, a line each, as their statistics are reduced (every
        // gns.reduce_every steps).
        for r in gns_done {
            if is_root {
                metrics.write(serde_json::json!({ "step": r.step, "gns": r }))?;
            }
            gns_report = Some(r);
        }
        on_step(StepReport {
            step: step + 1,
            total_steps: cfg.run.steps,
            loss: loss_value,
            samples,
            b_simple: gns_report.as_ref().and_then(|r| r.b_simple),
        });
        if is_root && (cfg.run.log_every > 0 && (step + 1) % cfg.run.log_every == 0 || step == 0) {
            metrics.write(serde_json::json!({
                "step": step + 1,
                "loss": loss_value,
                "lr": lr,
                "logit_scale": if contrastive { Some(model.logit_scale()) } else { None },
                "samples": samples,
                "batch": global,
                "samples_per_s": (samples - samples_at_start) as f64 / train_seconds.max(1e-9),
                "b_simple": gns_report.as_ref().and_then(|r| r.b_simple),
                "optim": opt_stats.as_ref().map(|o| o.summary(opt.groups())),
            }))?;
        }
        // The batch of the next step, from the latest smoothed noise scale (the same on every
        // rank); decided before a checkpoint of this step, which saves the schedule.
        if let Some(c) = batch_ctl.as_mut()
            && step + 1 < cfg.run.steps
            && let Some(ch) = c.after_step(step, gns_report.as_ref().and_then(|r| r.b_simple))
        {
            summary.batch_changes += 1;
            if is_root {
                eprintln!(
                    "step {}: global batch {global} -> {} from step {} (B_simple {:.1}), learning \
                     rate x{:.4}",
                    step + 1,
                    ch.batch,
                    ch.step + 1,
                    ch.b_simple,
                    ch.lr_factor
                );
                metrics.write(serde_json::json!({
                    "step": step + 1,
                    "batch_change": {
                        "from": global,
                        "to": ch.batch,
                        "first_step": ch.step + 1,
                        "b_simple": ch.b_simple,
                        "lr_factor": ch.lr_factor,
                    },
                }))?;
            }
        }
        let last = step + 1 == cfg.run.steps;
        let eval_now = last || (cfg.run.eval_every > 0 && (step + 1) % cfg.run.eval_every == 0);
        if is_root && eval_now {
            let report = eval::evaluate(cfg, &model, dev, data.eval.as_ref())?;
            let mut line = serde_json::to_value(&report).unwrap_or_default();
            if let Some(obj) = line.as_object_mut() {
                obj.insert("step".into(), (step + 1).into());
                obj.insert("eval".into(), true.into());
            }
            metrics.write(line)?;
            eprintln!(
                "step {}/{}: loss {loss_value:.4}, {}",
                step + 1,
                cfg.run.steps,
                report.brief()
            );
            summary.eval = report;
        }

        if ckpt.due(step + 1) {
            // Statistics still pending are per rank: reduce them before saving the averages.
            if let Some(g) = gns.as_mut() {
                for r in g.flush(comm)? {
                    if is_root {
                        metrics.write(serde_json::json!({ "step": r.step, "gns": r }))?;
                    }
                    gns_report = Some(r);
                }
            }
            let sched = batch_ctl.as_ref().map(|c| c.schedule());
            ckpt.save(comm, step + 1, &model, &opt, gns.as_ref(), sched, last_loss)?;
            if ckpt.stops_after(step + 1) {
                if is_root {
                    eprintln!(
                        "checkpoint: stopping after step {} (checkpoint.stop_after)",
                        step + 1
                    );
                }
                end_step = step + 1;
                break;
            }
        }
    }

    if let Some(g) = gns.as_mut() {
        for r in g.flush(comm)? {
            if is_root {
                metrics.write(serde_json::json!({ "step": r.step, "gns": r }))?;
            }
        }
    }

    // Every rank must end with bitwise identical parameters: check it, cheaply, by hash.
    let hash = sha256_f32(model.params());
    let hashes = comm.all_gather_bytes(hash.as_bytes())?;
    let hashes: Vec<String> =
        hashes.into_iter().map(|h| String::from_utf8_lossy(&h).into_owned()).collect();
    if hashes.iter().any(|h| *h != hash) {
        return Err(TrainError::Diverged { hashes });
    }

    if is_root {
        let path = out_dir.join("params.f32");
        let bytes: Vec<u8> = model.params().iter().flat_map(|v| v.to_le_bytes()).collect();
        crate::atomic_file::write_atomic(&path, &bytes)
            .map_err(|e| TrainError::Output { path: e.path, source: e.source })?;
    }

    summary.steps = end_step;
    summary.loss = last_loss;
    summary.logit_scale = contrastive.then(|| model.logit_scale());
    summary.b_simple = gns.as_ref().and_then(|g| g.b_simple());
    summary.gns_seconds = gns_seconds;
    summary.train_seconds = train_seconds;
    summary.global_batch = last_global;
    summary.samples = samples_seen;
    summary.samples_per_s = (samples_seen - samples_at_start) as f64 / train_seconds.max(1e-9);
    summary.samples_per_s_per_rank = summary.samples_per_s / world as f64;
    summary.params_sha256 = hash;
    summary.out_dir = out_dir.display().to_string();
    Ok(summary)
}

#[cfg(test)]
mod tests;
