//! Models: MLP / residual-MLP towers, the dual encoder (CLIP/LiT), the shared tower (SimCLR)
//! and the classifier.
//!
//! # Architecture
//!
//! A tower maps `input_dim → output_dim`:
//!
//! ```text
//! h = x·W_in + b_in                                   (input_dim → width)
//! repeat depth times:  u = Linear(act(norm(h)))       (width → width)
//!                      h = h + u   (residual = true)  or  h = u
//! y = Linear(act(norm(h)))                            (width → output_dim, own norm)
//! ```
//!
//! `norm` is a LayerNorm with its own γ, β (or the identity for `norm = "none"`), `act` GELU
//! (tanh approximation) or ReLU. With `residual = false` this is the plain MLP with
//! `depth + 1` hidden activations; with `residual = true` the pre-norm residual MLP.
//! Contrastive towers L2-normalise `y` (features on the unit sphere); the classifier does not.
//!
//! # Parameters
//!
//! All parameters live in one contiguous buffer (tower a, then tower b, then the logit
//! scale `t` as a 0-dim tensor), gradients in one buffer of the same layout;
//! [`Model::param_groups`] lists every tensor exactly once. Linear weights are stored
//! `fan_in × fan_out` (row-major), so a layer is `Y = X·W + b`.
//!
//! Initialisation is deterministic from the seed (same on every rank): weights
//! `N(0, 1/fan_in)` (the linear inside a residual block additionally scaled by
//! `1/√depth` so the residual stream's variance stays bounded), biases and LayerNorm β zero,
//! LayerNorm γ one, `t = logit_scale_init`. Tensor `k` draws from `Rng::stream(seed, k)`.
//! The trainer may then load towers from pretrained weights ([`init`], `model.init_from`).

use crate::device::{Device, DeviceBuf};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub mod init;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
mod tests;

/// The LayerNorm epsilon.
pub const LN_EPS: f32 = 1e-5;

/// What the model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Two towers (CLIP / LiT): view a through tower a, view b through tower b.
    #[default]
    Dual,
    /// One tower for both views (SimCLR).
    Shared,
    /// One tower whose outputs are class logits.
    Classifier,
}

/// Per-layer normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    #[default]
    LayerNorm,
    None,
}

/// Activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Gelu,
    Relu,
}

/// One MLP tower (`[model.tower_a]`, `[model.tower_b]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TowerConfig {
    /// Input features.
    pub input_dim: usize,
    /// Hidden width.
    pub width: usize,
    /// Hidden blocks between the input and output layers (0 allowed).
    pub depth: usize,
    /// Output features (embedding dimension, or the number of classes for a classifier).
    pub output_dim: usize,
    /// `"layernorm"` or `"none"`.
    pub norm: Norm,
    /// `"gelu"` or `"relu"`.
    pub activation: Activation,
    /// Residual blocks `h + Linear(act(norm(h)))` instead of `Linear(act(norm(h)))`.
    pub residual: bool,
}

impl Default for TowerConfig {
    fn default() -> Self {
        TowerConfig {
            input_dim: 32,
            width: 128,
            depth: 2,
            output_dim: 32,
            norm: Norm::LayerNorm,
            activation: Activation::Gelu,
            residual: true,
        }
    }
}

fn default_logit_scale_init() -> f32 {
    (1.0f32 / 0.07).ln()
}

fn default_logit_scale_max() -> f32 {
    100.0
}

/// The `[model]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `"dual"`, `"shared"` or `"classifier"`.
    #[serde(default)]
    pub kind: ModelKind,
    /// The tower for view a (and view b in shared mode; the only tower of a classifier).
    #[serde(default)]
    pub tower_a: TowerConfig,
    /// The tower for view b (dual only; ignored otherwise).
    #[serde(default)]
    pub tower_b: TowerConfig,
    /// LiT: tower b is frozen (dual only): its gradients stay zero.
    #[serde(default)]
    pub freeze_b: bool,
    /// Tensors that keep their initial (or loaded) values: a tensor's name, or a prefix ending
    /// at a dot (`"a.blocks"`: every block of tower a; `"b"`: tower b, as `freeze_b`;
    /// `"logit_scale"`: a fixed temperature). Their gradients stay zero and are not
    /// all-reduced; a tower's backward stops below its lowest trainable layer. A linear probe
    /// of a classifier: `["a.in", "a.blocks"]`. Empty: everything trains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
    /// Pretrained weights for the towers: a safetensors file or a Tessera checkpoint (see
    /// [`init`]). `None`: every tower starts from its random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// The towers loaded from `init_from`: `"b"` or `"b=a"` (this model's tower b from the
    /// file's tower a); empty: every tower of the model, by its own name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_towers: Vec<String>,
    /// Tensors of the loaded towers that keep their initialisation: a tensor's name, or a
    /// prefix ending at a dot (`"a.out"`: a.out.weight and a.out.bias), e.g. a classifier's head
    /// when its tower comes from a contrastive run. Empty: every tensor is loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_exclude: Vec<String>,
    /// Initial `t`, the logit scale being `s = exp(t)`. Default `ln(1/0.07)`.
    #[serde(default = "default_logit_scale_init")]
    pub logit_scale_init: f32,
    /// Upper bound of `s = exp(t)`. Default 100.
    #[serde(default = "default_logit_scale_max")]
    pub logit_scale_max: f32,
    /// Classifier only: the number of classes; must equal `tower_a.output_dim` when given.
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Initial logit bias β, for losses that have one (SigLIP); `None`: no bias parameter. Set
    /// by the trainer from the `[loss]` table, not a `[model]` key.
    #[serde(skip)]
    pub logit_bias_init: Option<f32>,
    /// The logit bias stays at its initial value (`loss.learnable_bias = false`).
    #[serde(skip)]
    pub freeze_logit_bias: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Dual,
            tower_a: TowerConfig::default(),
            tower_b: TowerConfig::default(),
            freeze_b: false,
            freeze: Vec::new(),
            init_from: None,
            init_towers: Vec::new(),
            init_exclude: Vec::new(),
            logit_scale_init: default_logit_scale_init(),
            logit_scale_max: default_logit_scale_max(),
            num_classes: None,
            logit_bias_init: None,
            freeze_logit_bias: false,
        }
    }
}

/// A configuration the model cannot be built from.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error(
        "model.{tower}.{field} = 0: every dimension of a tower must be at least 1; set it in the [model.{tower}] table"
    )]
    ZeroDim { tower: &'static str, field: &'static str },
    #[error(
        "model.tower_a.output_dim = {a} but model.tower_b.output_dim = {b}: the two towers of a dual encoder must embed into the same dimension; make them equal"
    )]
    OutputMismatch { a: usize, b: usize },
    #[error(
        "model.num_classes = {num_classes} but model.tower_a.output_dim = {output_dim}: a classifier's tower outputs one logit per class; make them equal"
    )]
    ClassMismatch { num_classes: usize, output_dim: usize },
    #[error(
        "model.freeze_b = true needs model.kind = \"dual\" (got {kind:?}): only a dual encoder has a tower b to freeze"
    )]
    FreezeNeedsDual { kind: ModelKind },
    #[error(
        "model.logit_scale_init = {init} with model.logit_scale_max = {max}: need a finite init with exp(init) <= max and max > 0; the default init is ln(1/0.07) ≈ 2.659 and max 100"
    )]
    LogitScale { init: f32, max: f32 },
    #[error(
        "the model has {0} parameters, more than one rank can hold (at most {MAX_PARAMS}: every \
         rank keeps the whole model, its gradients and optimizer state); shrink the towers \
         (model.tower_a / model.tower_b: width, depth)"
    )]
    TooLarge(u128),
    #[error(
        "the model has {params} parameters: allocating their {:.1} GB ({what}) failed on this \
         machine; shrink the towers or run on a machine with more memory (`tessera model` lists \
         every tensor's size)",
        *params as f64 * 4e-9
    )]
    OutOfMemory { params: usize, what: &'static str },
    #[error("{0}")]
    Freeze(String),
}

/// One parameter tensor's place in the parameter (and gradient) buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamGroup {
    /// e.g. `a.in.weight`, `a.blocks.0.ln.gamma`, `b.out.bias`, `logit_scale`.
    pub name: String,
    pub offset: usize,
    pub len: usize,
    /// `[fan_in, fan_out]` for weights, `[n]` for biases and LayerNorm γ/β, `[]` for the logit
    /// scale.
    pub shape: Vec<usize>,
    /// False for a frozen tensor (`model.freeze`, `model.freeze_b`, a fixed logit bias).
    pub trainable: bool,
}

#[derive(Clone, Debug)]
struct Linear {
    w: usize,
    b: usize,
    fan_in: usize,
    fan_out: usize,
    /// Whether the weight and the bias train (a frozen one gets no gradient).
    train: (bool, bool),
}

/// `Linear(act(norm(h)))`.
#[derive(Clone, Debug)]
struct Unit {
    ln: Option<(usize, usize)>,
    /// Whether the LayerNorm's γ and β train.
    ln_train: (bool, bool),
    lin: Linear,
}

impl Linear {
    fn trains(&self) -> bool {
        self.train.0 || self.train.1
    }
}

impl Unit {
    fn trains(&self) -> bool {
        self.lin.trains() || self.ln_trains()
    }

    /// Whether the unit has a LayerNorm with a tensor that trains.
    fn ln_trains(&self) -> bool {
        self.ln.is_some() && (self.ln_train.0 || self.ln_train.1)
    }
}

#[derive(Clone, Debug)]
struct Tower {
    cfg: TowerConfig,
    input: Linear,
    blocks: Vec<Unit>,
    head: Unit,
    normalize: bool,
    /// The lowest layer with a tensor that trains (0: the input layer, `i + 1`: block `i`,
    /// `depth + 1`: the head): the backward stops there. `None` for a frozen tower.
    lowest: Option<usize>,
}

/// What a unit's backward needs, in device buffers.
#[derive(Clone, Debug)]
struct UnitCache<B> {
    /// Input of the unit (`batch × fan_in`).
    h: B,
    /// The LayerNorm's output `z` (the activation's input), mean and rstd; `None` when
    /// `norm = none` (then the activation's input is `h`).
    ln: Option<LnCache<B>>,
    /// Activation output, the input of the linear.
    a: B,
}

#[derive(Clone, Debug)]
struct LnCache<B> {
    z: B,
    mean: B,
    rstd: B,
}

/// What a tower's backward reads: only the layers it runs (those from the lowest trainable
/// one up) keep their activations.
#[derive(Clone, Debug)]
struct TowerCache<B> {
    batch: usize,
    /// The input, when the input layer trains.
    x: Option<B>,
    /// Per unit (blocks, then the head): its activations, when the backward runs it.
    units: Vec<Option<UnitCache<B>>>,
    /// L2-normalised output and the norms (contrastive towers only).
    l2: Option<(B, B)>,
}

struct Layout<'f> {
    groups: Vec<ParamGroup>,
    next: usize,
    /// `model.freeze`: the names and prefixes of frozen tensors.
    frozen: &'f [String],
}

impl Layout<'_> {
    /// Adds a tensor; it trains when `trainable` and `model.freeze` does not name it.
    fn add(&mut self, name: String, shape: Vec<usize>, trainable: bool) -> usize {
        let len = shape.iter().product::<usize>();
        let offset = self.next;
        let trainable = trainable && !self.frozen.iter().any(|f| under(&name, f));
        self.groups.push(ParamGroup { name, offset, len, shape, trainable });
        self.next += len;
        offset
    }

    /// Whether the tensor added last trains.
    fn trains(&self) -> bool {
        self.groups.last().is_some_and(|g| g.trainable)
    }

    fn linear(&mut self, prefix: &str, fan_in: usize, fan_out: usize, trainable: bool) -> Linear {
        let w = self.add(format!("{prefix}.weight"), vec![fan_in, fan_out], trainable);
        let tw = self.trains();
        let b = self.add(format!("{prefix}.bias"), vec![fan_out], trainable);
        Linear { w, b, fan_in, fan_out, train: (tw, self.trains()) }
    }

    fn unit(
        &mut self,
        prefix: &str,
        norm: Norm,
        fan_in: usize,
        fan_out: usize,
        trainable: bool,
    ) -> Unit {
        let (ln, ln_train) = match norm {
            Norm::LayerNorm => {
                let g = self.add(format!("{prefix}.ln.gamma"), vec![fan_in], trainable);
                let tg = self.trains();
                let b = self.add(format!("{prefix}.ln.beta"), vec![fan_in], trainable);
                (Some((g, b)), (tg, self.trains()))
            }
            Norm::None => (None, (false, false)),
        };
        Unit { ln, ln_train, lin: self.linear(prefix, fan_in, fan_out, trainable) }
    }

    fn tower(&mut self, name: &str, cfg: &TowerConfig, normalize: bool, trainable: bool) -> Tower {
        let input = self.linear(&format!("{name}.in"), cfg.input_dim, cfg.width, trainable);
        let blocks: Vec<Unit> = (0..cfg.depth)
            .map(|i| {
                self.unit(&format!("{name}.blocks.{i}"), cfg.norm, cfg.width, cfg.width, trainable)
            })
            .collect();
        let head =
            self.unit(&format!("{name}.out"), cfg.norm, cfg.width, cfg.output_dim, trainable);
        let lowest = if input.trains() {
            Some(0)
        } else if let Some(i) = blocks.iter().position(Unit::trains) {
            Some(i + 1)
        } else {
            head.trains().then_some(blocks.len() + 1)
        };
        Tower { cfg: cfg.clone(), input, blocks, head, normalize, lowest }
    }
}

/// The most parameters a model may have: 2³⁷ (137 billion, 550 GB in f32 before gradients and
/// optimizer state), beyond any one rank's memory, and far below what the buffers can address.
pub const MAX_PARAMS: u128 = 1 << 37;

/// A tower's parameter count, in arithmetic that cannot overflow, so that an absurd size is
/// refused before its layout is built.
fn tower_params(t: &TowerConfig) -> u128 {
    let (i, w, o, depth) = (t.input_dim as u128, t.width as u128, t.output_dim as u128, t.depth);
    let ln = |n: u128| if t.norm == Norm::LayerNorm { 2 * n } else { 0 };
    (i * w + w) + depth as u128 * (ln(w) + w * w + w) + (ln(w) + w * o + o)
}

/// A zeroed buffer of `len` floats, or the error that names what did not fit.
fn zeroed(len: usize, what: &'static str) -> Result<Vec<f32>, ModelError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| ModelError::OutOfMemory { params: len, what })?;
    v.resize(len, 0.0);
    Ok(v)
}

fn validate_tower(tower: &'static str, t: &TowerConfig) -> Result<(), ModelError> {
    for (field, v) in [("input_dim", t.input_dim), ("width", t.width), ("output_dim", t.output_dim)]
    {
        if v == 0 {
            return Err(ModelError::ZeroDim { tower, field });
        }
    }
    Ok(())
}

/// Splits one buffer into two disjoint mutable ranges (`o1 + l1 <= o2`).
fn two_mut(
    buf: &mut [f32],
    o1: usize,
    l1: usize,
    o2: usize,
    l2: usize,
) -> (&mut [f32], &mut [f32]) {
    let (lo, hi) = buf.split_at_mut(o2);
    (&mut lo[o1..o1 + l1], &mut hi[..l2])
}

fn act_fwd<D: Device>(dev: &D, act: Activation, x: &[f32], y: &mut [f32]) {
    match act {
        Activation::Gelu => dev.gelu_fwd(x, y),
        Activation::Relu => dev.relu_fwd(x, y),
    }
}

fn act_bwd<D: Device>(dev: &D, act: Activation, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    match act {
        Activation::Gelu => dev.gelu_bwd(x, dy, dx),
        Activation::Relu => dev.relu_bwd(x, dy, dx),
    }
}

fn linear_fwd<D: Device>(dev: &D, p: &[f32], l: &Linear, x: &[f32], batch: usize) -> D::Buf {
    let mut y = dev.alloc(batch * l.fan_out);
    let w = &p[l.w..l.w + l.fan_in * l.fan_out];
    dev.gemm(false, false, batch, l.fan_out, l.fan_in, 1.0, x, w, 0.0, &mut y);
    dev.bias_add(&mut y, &p[l.b..l.b + l.fan_out], batch, l.fan_out);
    y
}

/// Accumulates dW and db (those that train); returns dX when `want_dx`.
#[allow(clippy::too_many_arguments)]
fn linear_bwd<D: Device>(
    dev: &D,
    p: &[f32],
    g: &mut [f32],
    l: &Linear,
    x: &[f32],
    dy: &[f32],
    batch: usize,
    want_dx: bool,
) -> Option<D::Buf> {
    let (fi, fo) = (l.fan_in, l.fan_out);
    if l.train.0 {
        dev.gemm(true, false, fi, fo, batch, 1.0, x, dy, 1.0, &mut g[l.w..l.w + fi * fo]);
    }
    if l.train.1 {
        dev.bias_grad(dy, batch, fo, &mut g[l.b..l.b + fo]);
    }
    if !want_dx {
        return None;
    }
    let mut dx = dev.alloc(batch * fi);
    dev.gemm(false, true, batch, fi, fo, 1.0, dy, &p[l.w..l.w + fi * fo], 0.0, &mut dx);
    Some(dx)
}

/// `Linear(act(norm(h)))`; the cache takes `h` (the caller adds a residual from it).
fn unit_fwd<D: Device>(
    dev: &D,
    p: &[f32],
    act: Activation,
    u: &Unit,
    h: D::Buf,
    batch: usize,
) -> (D::Buf, UnitCache<D::Buf>) {
    let n = u.lin.fan_in;
    let ln = u.ln.map(|(go, bo)| {
        let mut c =
            LnCache { z: dev.alloc(batch * n), mean: dev.alloc(batch), rstd: dev.alloc(batch) };
        dev.layernorm_fwd(
            &h,
            &p[go..go + n],
            &p[bo..bo + n],
            batch,
            n,
            LN_EPS,
            &mut c.z,
            &mut c.mean,
            &mut c.rstd,
        );
        c
    });
    let mut a = dev.alloc(batch * n);
    act_fwd(dev, act, ln.as_ref().map_or(&h, |c| &c.z), &mut a);
    let y = linear_fwd(dev, p, &u.lin, &a, batch);
    (y, UnitCache { h, ln, a })
}

/// Accumulates the unit's gradients (those that train); returns the gradient of its input when
/// `want_dh` (a layer below trains).
#[allow(clippy::too_many_arguments)]
fn unit_bwd<D: Device>(
    dev: &D,
    p: &[f32],
    g: &mut [f32],
    act: Activation,
    u: &Unit,
    c: &UnitCache<D::Buf>,
    dy: &[f32],
    batch: usize,
    want_dh: bool,
) -> Option<D::Buf> {
    let n = u.lin.fan_in;
    let ln_trains = u.ln_trains();
    let da = linear_bwd(dev, p, g, &u.lin, &c.a, dy, batch, want_dh || ln_trains)?;
    let mut dz = dev.alloc(batch * n);
    act_bwd(dev, act, c.ln.as_ref().map_or(&c.h, |l| &l.z), &da, &mut dz);
    let dh = match (u.ln, &c.ln) {
        (Some((go, bo)), Some(l)) => {
            let mut dh = dev.alloc(batch * n);
            // A frozen γ or β: the kernel writes its gradient to a spare buffer.
            let mut spare = (u.ln_train != (true, true)).then(|| dev.alloc(2 * n));
            let (dgamma, dbeta): (&mut [f32], &mut [f32]) = match (u.ln_train, spare.as_deref_mut())
            {
                (_, None) => two_mut(g, go, n, bo, n),
                ((true, _), Some(s)) => (&mut g[go..go + n], &mut s[..n]),
                ((false, true), Some(s)) => (&mut s[..n], &mut g[bo..bo + n]),
                ((false, false), Some(s)) => s.split_at_mut(n),
            };
            dev.layernorm_bwd(
                &c.h,
                &p[go..go + n],
                &l.mean,
                &l.rstd,
                &dz,
                batch,
                n,
                &mut dh,
                dgamma,
                dbeta,
            );
            dh
        }
        _ => dz,
    };
    want_dh.then_some(dh)
}

/// A unit's activations, which the forward keeps for every layer the backward runs.
fn kept<B>(c: &Option<UnitCache<B>>) -> &UnitCache<B> {
    c.as_ref().expect("the forward keeps the activations of every layer the backward runs")
}

impl Tower {
    /// Whether any tensor of the tower trains.
    fn trains(&self) -> bool {
        self.lowest.is_some()
    }

    /// Forward of `x` (host or device memory): the output, and with `keep` the activations
    /// its backward reads (none of a frozen layer below the lowest trainable one, as autograd
    /// saves nothing for a layer whose inputs and weights need no gradient). Only queues work;
    /// the caller synchronises before the host reads the output.
    fn forward<D: Device>(
        &self,
        dev: &D,
        p: &[f32],
        x: &[f32],
        batch: usize,
        keep: bool,
    ) -> (D::Buf, Option<TowerCache<D::Buf>>) {
        let cfg = &self.cfg;
        assert_eq!(
            x.len(),
            batch * cfg.input_dim,
            "tower input has {} values, expected batch {batch} x input_dim {}",
            x.len(),
            cfg.input_dim
        );
        // Layer `i` (0: the input layer, then the blocks, the head last) keeps its activations
        // when the backward runs it.
        let kept_from = if keep { self.lowest } else { None };
        let keeps = |layer: usize| kept_from.is_some_and(|l| layer >= l);
        // Training keeps the input in device memory, where the first layer and its backward
        // read it; otherwise it is read where it is (a GPU stages it for that one GEMM).
        let xd = keeps(0).then(|| {
            let mut xd = dev.alloc(x.len());
            dev.copy(x, &mut xd);
            xd
        });
        let mut units = Vec::new();
        let mut h = linear_fwd(dev, p, &self.input, xd.as_deref().unwrap_or(x), batch);
        for (i, u) in self.blocks.iter().enumerate() {
            let (mut y, c) = unit_fwd(dev, p, cfg.activation, u, h, batch);
            if cfg.residual {
                // h + y, computed as y + h (the same sum) so the cache keeps h without a copy.
                dev.add_inplace(&mut y, &c.h);
            }
            h = y;
            units.push(keeps(i + 1).then_some(c));
        }
        let (y, c) = unit_fwd(dev, p, cfg.activation, &self.head, h, batch);
        units.push(keeps(self.blocks.len() + 1).then_some(c));
        let mut l2 = None;
        let out = if self.normalize {
            let mut f = dev.alloc(y.len());
            let mut norms = dev.alloc(batch);
            dev.l2_normalize_fwd(&y, batch, cfg.output_dim, &mut f, &mut norms);
            if kept_from.is_some() {
                let mut kept = dev.alloc(f.len());
                dev.copy(&f, &mut kept);
                l2 = Some((kept, norms));
            }
            f
        } else {
            y
        };
        (out, keep.then(|| TowerCache { batch, x: xd, units, l2 }))
    }

    /// Backward of the tower, accumulating into `g`. With `ready`, after each unit (head,
    /// blocks from the top, input layer) it calls `ready(offset, grads)` with that unit's slice
    /// of `g`, which this backward no longer touches: after waiting for the device when
    /// `ready.wait`, else as soon as the unit's kernels are queued (the consumer orders itself
    /// after the device's stream). Without, it only queues kernels (a GPU's host does not wait
    /// per layer).
    fn backward<'o, D: Device>(
        &self,
        dev: &D,
        p: &[f32],
        g: &mut [f32],
        cache: &TowerCache<D::Buf>,
        dout: &[f32],
        mut ready: Option<Report<'_, 'o>>,
    ) {
        let cfg = &self.cfg;
        let batch = cache.batch;
        assert_eq!(
            dout.len(),
            batch * cfg.output_dim,
            "output gradient has {} values, expected batch {batch} x output_dim {}",
            dout.len(),
            cfg.output_dim
        );
        let Some(lowest) = self.lowest else {
            return;
        };
        let mut dy = dev.alloc(dout.len());
        match &cache.l2 {
            Some((feat, norms)) => {
                dev.l2_normalize_bwd(feat, norms, dout, batch, cfg.output_dim, &mut dy)
            }
            None => dev.copy(dout, &mut dy),
        }
        let nb = self.blocks.len();
        let unit_range = |u: &Unit| {
            let start = u.ln.map_or(u.lin.w, |(gamma, _)| gamma);
            start..u.lin.b + u.lin.fan_out
        };
        let mut report = |g: &[f32], r: std::ops::Range<usize>| {
            if let Some(rep) = ready.as_mut() {
                if rep.wait {
                    dev.synchronize();
                }
                (rep.ready)(r.start, &g[r]);
            }
        };
        // Each layer passes a gradient down only while a layer below it trains: the backward
        // ends at the lowest one (a linear probe's runs through the head alone).
        let head = &self.head;
        let hc = kept(&cache.units[nb]);
        let dh = unit_bwd(dev, p, g, cfg.activation, head, hc, &dy, batch, lowest <= nb);
        if head.trains() {
            report(g, unit_range(head));
        }
        let Some(mut dh) = dh else {
            return;
        };
        for (i, (u, c)) in self.blocks.iter().zip(&cache.units).enumerate().rev() {
            let dx = unit_bwd(dev, p, g, cfg.activation, u, kept(c), &dh, batch, lowest <= i);
            if u.trains() {
                report(g, unit_range(u));
            }
            let Some(dx) = dx else {
                return;
            };
            if cfg.residual {
                dev.add_inplace(&mut dh, &dx);
            } else {
                dh = dx;
            }
        }
        let x = cache.x.as_ref().expect("the forward keeps the input when the input layer trains");
        linear_bwd(dev, p, g, &self.input, x, &dh, batch, false);
        report(g, self.input.w..self.input.b + self.input.fan_out);
    }
}

/// What a backward calls with each finished layer's gradient slice: `(offset, grads)`.
type Ready<'o> = dyn FnMut(usize, &[f32]) + 'o;

/// A backward's consumer of finished layers, and whether it needs the device idle first.
struct Report<'r, 'o> {
    ready: &'r mut Ready<'o>,
    wait: bool,
}

impl<'o> Report<'_, 'o> {
    fn reborrow(&mut self) -> Report<'_, 'o> {
        Report { ready: &mut *self.ready, wait: self.wait }
    }
}

/// A model: parameters, gradients and the activations of the last training forward.
///
/// `B` is the buffer type of the device the model runs on ([`Device::Buf`]): `Vec<f32>` for
/// [`crate::device::CpuDevice`] (what [`Model::new`] builds), managed memory for a GPU
/// ([`Model::into_device`]), so that kernels use parameters, gradients and activations in
/// place. The methods that take a device need that device's `Buf` to be `B`. They return with
/// the device idle (host-side results, gradients and parameters are then current), and host
/// code (optimizer, all-reduce, checkpoint) reads and writes the buffers between them.
#[derive(Clone, Debug)]
pub struct Model<B = Vec<f32>> {
    cfg: ModelConfig,
    towers: Vec<Tower>,
    t_offset: Option<usize>,
    bias_offset: Option<usize>,
    groups: Vec<ParamGroup>,
    params: B,
    grads: B,
    cache_a: Option<TowerCache<B>>,
    cache_b: Option<TowerCache<B>>,
}

/// Whether tensor `name` lies under `prefix`: the name itself, or a prefix ending at a dot
/// (`a.out` holds a.out.weight and a.out.ln.gamma, not a.outer.weight).
pub(crate) fn under(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|r| r.is_empty() || r.starts_with('.'))
}

/// Whether a config entry (`model.freeze`, `optim.lr_scale`) names at least one of `names`: a
/// tensor's name, or a prefix of some ending at a dot (an entry ending with a dot names none).
pub(crate) fn names_a_tensor<'a>(entry: &str, mut names: impl Iterator<Item = &'a str>) -> bool {
    !entry.ends_with('.') && names.any(|n| under(n, entry))
}

/// A model's layout before its parameters exist.
struct Plan {
    towers: Vec<Tower>,
    t_offset: Option<usize>,
    bias_offset: Option<usize>,
    groups: Vec<ParamGroup>,
    total: usize,
}

impl ModelConfig {
    /// Checks what [`Model::new`] checks (dimensions, `model.freeze`, …) without allocating
    /// the parameters: for a configuration's validation before any rank starts.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.tensor_names().map(|_| ())
    }

    /// The names of the model's tensors in their order in the flat buffer, after the checks
    /// of [`ModelConfig::validate`].
    pub fn tensor_names(&self) -> Result<Vec<String>, ModelError> {
        Ok(Plan::new(self)?.groups.into_iter().map(|g| g.name).collect())
    }
}

impl Plan {
    fn new(cfg: &ModelConfig) -> Result<Plan, ModelError> {
        validate_tower("tower_a", &cfg.tower_a)?;
        match cfg.kind {
            ModelKind::Dual => {
                validate_tower("tower_b", &cfg.tower_b)?;
                if cfg.tower_a.output_dim != cfg.tower_b.output_dim {
                    return Err(ModelError::OutputMismatch {
                        a: cfg.tower_a.output_dim,
                        b: cfg.tower_b.output_dim,
                    });
                }
            }
            ModelKind::Classifier => {
                if let Some(k) = cfg.num_classes
                    && k != cfg.tower_a.output_dim
                {
                    return Err(ModelError::ClassMismatch {
                        num_classes: k,
                        output_dim: cfg.tower_a.output_dim,
                    });
                }
            }
            ModelKind::Shared => {}
        }
        if cfg.freeze_b && cfg.kind != ModelKind::Dual {
            return Err(ModelError::FreezeNeedsDual { kind: cfg.kind });
        }
        let contrastive = cfg.kind != ModelKind::Classifier;
        if contrastive
            && !(cfg.logit_scale_init.is_finite()
                && cfg.logit_scale_max > 0.0
                && cfg.logit_scale_init <= cfg.logit_scale_max.ln())
        {
            return Err(ModelError::LogitScale {
                init: cfg.logit_scale_init,
                max: cfg.logit_scale_max,
            });
        }

        let towers_params = tower_params(&cfg.tower_a)
            + if cfg.kind == ModelKind::Dual { tower_params(&cfg.tower_b) } else { 0 };
        if towers_params > MAX_PARAMS {
            return Err(ModelError::TooLarge(towers_params));
        }
        let mut layout = Layout { groups: Vec::new(), next: 0, frozen: &cfg.freeze };
        let mut towers = vec![layout.tower("a", &cfg.tower_a, contrastive, true)];
        if cfg.kind == ModelKind::Dual {
            towers.push(layout.tower("b", &cfg.tower_b, true, !cfg.freeze_b));
        }
        let t_offset = contrastive.then(|| layout.add("logit_scale".into(), vec![], true));
        let bias_offset = match cfg.logit_bias_init {
            Some(_) if contrastive => {
                Some(layout.add("logit_bias".into(), vec![], !cfg.freeze_logit_bias))
            }
            _ => None,
        };
        let total = layout.next;
        check_freeze(&cfg.freeze, &layout.groups)?;
        Ok(Plan { towers, t_offset, bias_offset, groups: layout.groups, total })
    }
}

/// Each `model.freeze` entry must name a tensor, and something must be left to train.
fn check_freeze(freeze: &[String], groups: &[ParamGroup]) -> Result<(), ModelError> {
    for f in freeze {
        if !names_a_tensor(f, groups.iter().map(|g| g.name.as_str())) {
            let top = f.split('.').next().unwrap_or_default();
            let mut names: Vec<&str> =
                groups.iter().filter(|g| under(&g.name, top)).map(|g| g.name.as_str()).collect();
            let what = if names.is_empty() {
                names =
                    groups.iter().map(|g| g.name.split('.').next().unwrap_or_default()).collect();
                names.dedup();
                "its towers and scalars".to_string()
            } else {
                format!("tower {top}'s tensors")
            };
            return Err(ModelError::Freeze(format!(
                "model.freeze entry {f:?} names no tensor of this model ({what}: {}); name a \
                 tensor, or a prefix ending at a dot such as \"a.blocks\" (`tessera model` lists \
                 the names)",
                names.join(", ")
            )));
        }
    }
    if !freeze.is_empty() && !groups.iter().any(|g| g.trainable) {
        return Err(ModelError::Freeze(format!(
            "model.freeze = {freeze:?}: no tensor of this model is left to train; leave at \
             least one out (a linear probe of a classifier: [\"a.in\", \
             \"a.blocks\"])"
        )));
    }
    Ok(())
}

impl Model {
    /// Validates `cfg` and initialises the parameters deterministically from `seed`.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Result<Model, ModelError> {
        let Plan { towers, t_offset, bias_offset, groups, total } = Plan::new(cfg)?;
        let mut params = zeroed(total, "the parameters")?;
        for (k, g) in groups.iter().enumerate() {
            let dst = &mut params[g.offset..g.offset + g.len];
            if g.name == "logit_scale" {
                dst[0] = cfg.logit_scale_init;
            } else if g.name == "logit_bias" {
                dst[0] = cfg.logit_bias_init.unwrap_or(0.0);
            } else if g.name.ends_with(".ln.gamma") {
                dst.fill(1.0);
            } else if g.name.ends_with(".weight") {
                let mut std = 1.0 / (g.shape[0] as f64).sqrt();
                let tower = if g.name.starts_with("b.") { &cfg.tower_b } else { &cfg.tower_a };
                if tower.residual && g.name.contains(".blocks.") {
                    std /= (tower.depth as f64).sqrt();
                }
                let mut rng = Rng::stream(seed, k as u64);
                dst.iter_mut().for_each(|v| *v = (rng.normal() * std) as f32);
            }
        }
        Ok(Model {
            cfg: cfg.clone(),
            towers,
            t_offset,
            bias_offset,
            groups,
            grads: zeroed(total, "the gradients")?,
            params,
            cache_a: None,
            cache_b: None,
        })
    }

    /// The same model on `dev`: parameters and gradients copied into buffers of `dev` (for
    /// the CPU device, buffers like the ones it had).
    pub fn into_device<D: Device>(self, dev: &D) -> Model<D::Buf> {
        let mut params = dev.alloc(self.params.len());
        let mut grads = dev.alloc(self.grads.len());
        dev.synchronize();
        params.copy_from_slice(&self.params);
        grads.copy_from_slice(&self.grads);
        Model {
            cfg: self.cfg,
            towers: self.towers,
            t_offset: self.t_offset,
            bias_offset: self.bias_offset,
            groups: self.groups,
            params,
            grads,
            cache_a: None,
            cache_b: None,
        }
    }
}

impl<B: DeviceBuf> Model<B> {
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn kind(&self) -> ModelKind {
        self.cfg.kind
    }

    /// The feature dimension of a contrastive model, or the number of classes.
    pub fn output_dim(&self) -> usize {
        self.cfg.tower_a.output_dim
    }

    /// Total number of parameters (the length of `params()` and `grads()`).
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// Every tensor, in buffer order; together they cover the buffer exactly once.
    pub fn param_groups(&self) -> Vec<ParamGroup> {
        self.groups.clone()
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// Both buffers at once (for the optimizer).
    pub fn params_and_grads_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut *self.params, &mut *self.grads)
    }

    pub fn zero_grads(&mut self) {
        self.grads.fill(0.0);
    }

    fn tower_b(&self) -> &Tower {
        self.towers.get(1).unwrap_or(&self.towers[0])
    }

    fn assert_contrastive(&self, what: &str) {
        assert!(
            self.cfg.kind != ModelKind::Classifier,
            "Model::{what} needs a contrastive model (kind = dual or shared), this one is a classifier"
        );
    }

    fn assert_classifier(&self, what: &str) {
        assert!(
            self.cfg.kind == ModelKind::Classifier,
            "Model::{what} needs kind = classifier, this model is {:?}",
            self.cfg.kind
        );
    }

    /// Training forward of both views (`a`: `batch × tower_a.input_dim`, `b`: `batch ×
    /// tower_b.input_dim`, or tower a's in shared mode). Returns the L2-normalised features
    /// (`batch × output_dim` each) and keeps the activations for [`Model::backward_pair`].
    ///
    /// # Panics
    /// On a classifier, or when the input lengths do not match `batch` and the input dims.
    pub fn forward_pair<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        a: &[f32],
        b: &[f32],
        batch: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (fa, fb) = self.forward_pair_buf(dev, a, b, batch);
        dev.synchronize();
        (dev.host_vec(fa), dev.host_vec(fb))
    }

    /// [`Model::forward_pair`] that leaves the features where the device wrote them and does
    /// not wait: for a consumer on the device (the fused loss on the GPU reads them on the same
    /// stream, no copy through the host). The host reads them only after
    /// [`Device::synchronize`].
    ///
    /// # Panics
    /// As [`Model::forward_pair`].
    pub fn forward_pair_buf<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        a: &[f32],
        b: &[f32],
        batch: usize,
    ) -> (B, B) {
        self.assert_contrastive("forward_pair");
        let (fa, ca) = self.towers[0].forward(dev, &self.params, a, batch, true);
        let tb = self.tower_b();
        let (fb, cb) = tb.forward(dev, &self.params, b, batch, tb.trains());
        self.cache_a = ca;
        self.cache_b = cb;
        (fa, fb)
    }

    /// The forward that a [`Model::backward_pair`] needs when the features are already known
    /// (GradCache's replay): every trainable tower runs, keeping its activations; a frozen
    /// tower does not run at all. Returns with the device idle; the features are dropped.
    ///
    /// # Panics
    /// As [`Model::forward_pair`].
    pub fn forward_for_backward<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        a: &[f32],
        b: &[f32],
        batch: usize,
    ) {
        self.assert_contrastive("forward_for_backward");
        let ta = &self.towers[0];
        let (fa, ca) = if ta.trains() {
            let (fa, ca) = ta.forward(dev, &self.params, a, batch, true);
            (Some(fa), ca)
        } else {
            // A frozen tower a: its backward reads nothing but the batch size.
            (None, Some(TowerCache { batch, x: None, units: Vec::new(), l2: None }))
        };
        let tb = self.tower_b();
        let (fb, cb) = if tb.trains() {
            let (fb, cb) = tb.forward(dev, &self.params, b, batch, true);
            (Some(fb), cb)
        } else {
            (None, None)
        };
        // The features go back to the device's pool only once no kernel writes them.
        dev.synchronize();
        drop((fa, fb));
        self.cache_a = ca;
        self.cache_b = cb;
    }

    /// Backward of the last [`Model::forward_pair`] from the feature gradients, ACCUMULATING
    /// into the gradient buffer. A frozen tower b receives nothing.
    ///
    /// # Panics
    /// Without a preceding `forward_pair`, or on length mismatches.
    pub fn backward_pair<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        d_feat_a: &[f32],
        d_feat_b: &[f32],
    ) {
        self.backward_pair_inner(dev, d_feat_a, d_feat_b, None);
    }

    /// [`Model::backward_pair`] that reports gradients as they become final: after each layer
    /// whose gradient this backward has finished (top layers first, tower a then tower b; in
    /// shared mode only during the second view's pass) it calls `ready(offset, grads)` with
    /// that layer's slice of the gradient buffer. The reported slices are disjoint; the logit
    /// scale and bias, and a layer whose tensors are all frozen, are never reported (a reported
    /// layer's frozen tensors, if any, hold zero).
    ///
    /// # Panics
    /// As [`Model::backward_pair`].
    pub fn backward_pair_with<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        d_feat_a: &[f32],
        d_feat_b: &[f32],
        ready: &mut dyn FnMut(usize, &[f32]),
    ) {
        self.backward_pair_inner(dev, d_feat_a, d_feat_b, Some(Report { ready, wait: true }));
    }

    /// [`Model::backward_pair_with`] without waiting for the device before each report: a
    /// layer is reported once its kernels are queued, when the values in its slice may not
    /// be written yet. For consumers that order their reads after the device's stream (the
    /// NCCL all-reduce of a bucket, queued on the communication stream after an event of the
    /// compute stream). Returns, like [`Model::backward_pair`], with the device idle.
    ///
    /// # Panics
    /// As [`Model::backward_pair`].
    pub fn backward_pair_queued<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        d_feat_a: &[f32],
        d_feat_b: &[f32],
        ready: &mut dyn FnMut(usize, &[f32]),
    ) {
        self.backward_pair_inner(dev, d_feat_a, d_feat_b, Some(Report { ready, wait: false }));
    }

    fn backward_pair_inner<'o, D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        d_feat_a: &[f32],
        d_feat_b: &[f32],
        mut ready: Option<Report<'_, 'o>>,
    ) {
        self.assert_contrastive("backward_pair");
        let ca = self
            .cache_a
            .take()
            .expect("Model::backward_pair called without a forward_pair before it");
        // One tower for both views: its gradient is final only after the second pass.
        let twice = self.towers.len() == 1 && self.cache_b.is_some();
        let first = if twice { None } else { ready.as_mut().map(Report::reborrow) };
        self.towers[0].backward(dev, &self.params, &mut self.grads, &ca, d_feat_a, first);
        let tb = self.towers.get(1).unwrap_or(&self.towers[0]);
        if let Some(cb) = self.cache_b.take() {
            tb.backward(dev, &self.params, &mut self.grads, &cb, d_feat_b, ready);
        }
        dev.synchronize();
    }

    /// Inference features of view a (no activations kept).
    pub fn embed_a<D: Device<Buf = B>>(&self, dev: &D, x: &[f32], batch: usize) -> Vec<f32> {
        let f = self.embed_a_buf(dev, x, batch);
        dev.synchronize();
        dev.host_vec(f)
    }

    /// Inference features of view b (tower a in shared mode).
    pub fn embed_b<D: Device<Buf = B>>(&self, dev: &D, x: &[f32], batch: usize) -> Vec<f32> {
        let f = self.embed_b_buf(dev, x, batch);
        dev.synchronize();
        dev.host_vec(f)
    }

    /// [`Model::embed_a`] left in the device's buffer, without waiting (as
    /// [`Model::forward_pair_buf`]).
    pub fn embed_a_buf<D: Device<Buf = B>>(&self, dev: &D, x: &[f32], batch: usize) -> B {
        self.assert_contrastive("embed_a");
        self.towers[0].forward(dev, &self.params, x, batch, false).0
    }

    /// [`Model::embed_b`] left in the device's buffer, without waiting.
    pub fn embed_b_buf<D: Device<Buf = B>>(&self, dev: &D, x: &[f32], batch: usize) -> B {
        self.assert_contrastive("embed_b");
        self.tower_b().forward(dev, &self.params, x, batch, false).0
    }

    /// The raw parameter `t` (0 for a classifier).
    pub fn logit_scale_param(&self) -> f32 {
        self.t_offset.map_or(0.0, |o| self.params[o])
    }

    /// `s = exp(t)` (1 for a classifier).
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale_param().exp()
    }

    /// Adds `dt` to `∂L/∂t` (no-op on a classifier, or when `t` is frozen).
    pub fn add_logit_scale_grad(&mut self, dt: f32) {
        if let Some(o) = self.t_offset
            && self.trains_at(o)
        {
            self.grads[o] += dt;
        }
    }

    /// Whether the tensor at `offset` trains (the scalars are the last tensors).
    fn trains_at(&self, offset: usize) -> bool {
        self.groups.iter().rev().find(|g| g.offset == offset).is_some_and(|g| g.trainable)
    }

    /// The logit bias β (0 when the model has none).
    pub fn logit_bias(&self) -> f32 {
        self.bias_offset.map_or(0.0, |o| self.params[o])
    }

    /// Adds `g` to `∂L/∂β` (no-op without a bias, or when it is frozen).
    pub fn add_logit_bias_grad(&mut self, g: f32) {
        if let Some(o) = self.bias_offset
            && self.trains_at(o)
        {
            self.grads[o] += g;
        }
    }

    /// Clamps `t ≤ ln(logit_scale_max)`; call after every optimizer step.
    pub fn clamp_logit_scale(&mut self) {
        if let Some(o) = self.t_offset {
            let max = self.cfg.logit_scale_max.ln();
            if self.params[o] > max {
                self.params[o] = max;
            }
        }
    }

    /// Training forward of a classifier: logits `batch × num_classes`, activations kept.
    pub fn forward_logits<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        x: &[f32],
        batch: usize,
    ) -> Vec<f32> {
        self.assert_classifier("forward_logits");
        let (y, c) = self.towers[0].forward(dev, &self.params, x, batch, true);
        self.cache_a = c;
        dev.synchronize();
        dev.host_vec(y)
    }

    /// Backward of the last [`Model::forward_logits`], accumulating into the gradients.
    pub fn backward_logits<D: Device<Buf = B>>(&mut self, dev: &D, d_logits: &[f32]) {
        self.assert_classifier("backward_logits");
        let c = self
            .cache_a
            .take()
            .expect("Model::backward_logits called without a forward_logits before it");
        self.towers[0].backward(dev, &self.params, &mut self.grads, &c, d_logits, None);
        dev.synchronize();
    }

    /// Inference logits (no activations kept).
    pub fn predict<D: Device<Buf = B>>(&self, dev: &D, x: &[f32], batch: usize) -> Vec<f32> {
        self.assert_classifier("predict");
        let y = self.towers[0].forward(dev, &self.params, x, batch, false).0;
        dev.synchronize();
        dev.host_vec(y)
    }
}
