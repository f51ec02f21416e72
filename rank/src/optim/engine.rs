//! The per-tensor trust-ratio engine behind every optimizer (ALGORITHMS.md §6).
//!
//! For each trainable tensor, one fused pass reads w, g and the state once and writes w and the
//! state once. Under LARS and TVLARS the trust ratio needs the tensor's norms before that pass:
//! ‖w‖² is accumulated while the previous step wrote w (kept per tensor; computed afresh on the
//! first step and after a restore), ‖g‖² comes from the gradient-clipping pass when there is
//! one and otherwise from a pass over g alone, and only the `combined` form with weight decay
//! also reads w, for ⟨g, w⟩ (‖g + βw‖² = ‖g‖² + 2β⟨g, w⟩ + β²‖w‖²). Every such sum uses the
//! same eight f64 lanes in the same order, so a cached norm is bitwise the norm a separate pass
//! would give. LAMB needs ‖u‖ of its new direction, so it keeps two passes (the second reads w
//! and u). The arithmetic of a step is f64 (LAMB's moments f32) in a fixed order (no threads),
//! so identical gradients give bitwise identical parameters on every rank; the kernels run
//! with AVX2 where the CPU has it, with bitwise the same results.

use serde::Serialize;

use super::TensorGroup;
use super::config::{Family, MomentumForm, OptimConfig, RatioForm, Settings, ZeroNorm};
use super::passes::{LambJob, LambStep, Momentum, MomentumJob, ReduceJob, Span, Sums, check_spans};
use crate::device::{CpuDevice, Device, DeviceBuf};

/// Errors of building an optimizer or restoring its state.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("{0}")]
    Config(String),
    #[error("optimizer state: {0}")]
    State(String),
}

/// What one tensor got on one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GroupStat {
    /// The trust ratio r (LARS/TVLARS: the local rate, φ included; LAMB: φ(‖w‖)/‖u‖). A tensor
    /// that is not adapted gets `optim.excluded_lr_scale` (default 1) under LARS, TVLARS and
    /// LAMB and 1 under SGD; a frozen one 0.
    pub ratio: f64,
    /// The effective learning rate lr·r that multiplies this tensor's update direction.
    pub lr: f64,
    /// The ratio was computed from norms (the tensor's `adapt` flag under LARS, TVLARS, LAMB).
    pub adapted: bool,
    pub trainable: bool,
}

/// Per-tensor statistics of one step, in the order of the groups.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepStats {
    pub groups: Vec<GroupStat>,
    /// Global gradient norm before clipping (computed only when `grad_clip_norm` is set).
    pub grad_norm: Option<f64>,
}

/// First/last adapted tensor and the spread over adapted tensors (all trainable tensors when
/// none is adapted, as under SGD), for the metrics file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsSummary {
    pub first: String,
    pub last: String,
    pub ratio_first: f64,
    pub ratio_last: f64,
    pub ratio_min: f64,
    pub ratio_median: f64,
    pub ratio_max: f64,
    pub lr_first: f64,
    pub lr_last: f64,
    pub lr_min: f64,
    pub lr_median: f64,
    pub lr_max: f64,
}

fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) };
    (v[0], median, v[n - 1])
}

impl StepStats {
    /// `groups` are the optimizer's ([`Optimizer::groups`]). None when no tensor is trainable.
    pub fn summary(&self, groups: &[TensorGroup]) -> Option<StatsSummary> {
        let any_adapted = self.groups.iter().any(|g| g.adapted);
        let picked: Vec<usize> = (0..self.groups.len().min(groups.len()))
            .filter(|&i| self.groups[i].trainable && (self.groups[i].adapted || !any_adapted))
            .collect();
        let (&first, &last) = (picked.first()?, picked.last()?);
        let (ratio_min, ratio_median, ratio_max) =
            spread(picked.iter().map(|&i| self.groups[i].ratio).collect());
        let (lr_min, lr_median, lr_max) =
            spread(picked.iter().map(|&i| self.groups[i].lr).collect());
        Some(StatsSummary {
            first: groups[first].name.clone(),
            last: groups[last].name.clone(),
            ratio_first: self.groups[first].ratio,
            ratio_last: self.groups[last].ratio,
            ratio_min,
            ratio_median,
            ratio_max,
            lr_first: self.groups[first].lr,
            lr_last: self.groups[last].lr,
            lr_min,
            lr_median,
            lr_max,
        })
    }
}

/// SGD (momentum, Nesterov), LARS, TVLARS and LAMB over the flat parameter buffer.
///
/// `B` is the buffer type of the state (momentum, LAMB's moments): a host `Vec` by default, a
/// device's buffer after [`Optimizer::into_device`], where [`Optimizer::step_on`] runs the
/// element passes on that device (see [`super::passes`]).
#[derive(Clone, Debug)]
pub struct Optimizer<B = Vec<f32>> {
    settings: Settings,
    groups: Vec<TensorGroup>,
    extent: usize,
    /// Momentum buffer (SGD, LARS, TVLARS) or LAMB's first moment m.
    buf1: B,
    /// LAMB's second moment v (empty otherwise).
    buf2: B,
    /// LAMB's update direction u of one tensor (the longest; not part of the state; empty
    /// otherwise).
    scratch: B,
    /// Steps taken so far (restored with the state).
    steps: u64,
    /// Per group: ‖w‖² of the tensor as the last step wrote it (adapted tensors under LARS and
    /// TVLARS), so the next step need not read w for it. Not part of the saved state: after a
    /// restore it is computed afresh, with the same lanes, so the value is bitwise the same.
    w_sq: Vec<Option<f64>>,
}

const STATE_MAGIC: &[u8; 8] = b"TSOPTST1";

/// Lanes of every reduction: lane k takes the elements k, k + 8, … of a tensor, and the lanes
/// are summed in a fixed order by [`lanes_sum`]. Every pass that reduces the same values uses
/// this layout, so a norm accumulated while writing a tensor equals, bitwise, the same norm
/// computed by a separate pass over it.
const L: usize = 8;

#[inline(always)]
fn lanes_sum(acc: [f64; L]) -> f64 {
    acc.iter().sum()
}

/// Runs `$body` (an expression over the function's arguments) compiled for AVX2 when the CPU
/// has it, and for the baseline target otherwise. The arithmetic is the same IEEE operations in
/// the same order either way (Rust never contracts a·b + c into an FMA), so both give bitwise
/// the same result; AVX2 only does more lanes per instruction.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident / $avx2:ident ($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty
        $body:block) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        fn $avx2($($arg: $ty),*) -> $ret $body

        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked at run time).
                return unsafe { $avx2($($arg),*) };
            }
            $body
        }
    };
}

/// ‖w‖², ‖g‖², ⟨g, w⟩ in f64.
#[inline(always)]
fn reduce3_body(w: &[f32], g: &[f32]) -> (f64, f64, f64) {
    let (mut ww, mut gg, mut gw) = ([0f64; L], [0f64; L], [0f64; L]);
    let (wc, wr) = w.as_chunks::<L>();
    let (gc, gr) = g.as_chunks::<L>();
    for (a, b) in wc.iter().zip(gc) {
        for k in 0..L {
            let (x, y) = (a[k] as f64, b[k] as f64);
            ww[k] += x * x;
            gg[k] += y * y;
            gw[k] += x * y;
        }
    }
    for (k, (&x, &y)) in wr.iter().zip(gr).enumerate() {
        let (x, y) = (x as f64, y as f64);
        ww[k] += x * x;
        gg[k] += y * y;
        gw[k] += x * y;
    }
    (lanes_sum(ww), lanes_sum(gg), lanes_sum(gw))
}

/// ‖g‖², ⟨g, w⟩ in f64 (‖w‖² comes from the previous step's update pass).
#[inline(always)]
fn reduce_gw_body(w: &[f32], g: &[f32]) -> (f64, f64) {
    let (mut gg, mut gw) = ([0f64; L], [0f64; L]);
    let (wc, wr) = w.as_chunks::<L>();
    let (gc, gr) = g.as_chunks::<L>();
    for (a, b) in wc.iter().zip(gc) {
        for k in 0..L {
            let (x, y) = (a[k] as f64, b[k] as f64);
            gg[k] += y * y;
            gw[k] += x * y;
        }
    }
    for (k, (&x, &y)) in wr.iter().zip(gr).enumerate() {
        let (x, y) = (x as f64, y as f64);
        gg[k] += y * y;
        gw[k] += x * y;
    }
    (lanes_sum(gg), lanes_sum(gw))
}

/// Adds x² of each element to its lane (`x` starts at a multiple of [`L`] within its tensor).
#[inline(always)]
fn sum_sq_into(acc: &mut [f64; L], x: &[f32]) {
    let (c, r) = x.as_chunks::<L>();
    for a in c {
        for k in 0..L {
            acc[k] += a[k] as f64 * a[k] as f64;
        }
    }
    for (k, &x) in r.iter().enumerate() {
        acc[k] += x as f64 * x as f64;
    }
}

#[inline(always)]
fn sum_sq_body(g: &[f32]) -> f64 {
    let mut acc = [0f64; L];
    sum_sq_into(&mut acc, g);
    lanes_sum(acc)
}

/// One element of the momentum update: (new w, new v).
#[inline(always)]
fn momentum_one<const NESTEROV: bool>(w: f32, g: f32, v: f32, k: Momentum) -> (f32, f32) {
    let d = k.s * g as f64 + k.wd * w as f64;
    let vn = k.m * v as f64 + k.a * d;
    let step = if NESTEROV { k.a * d + k.m * vn } else { vn };
    ((w as f64 - k.b * step) as f32, vn as f32)
}

/// Values updated before their squares are summed: small enough that they are still in L1
/// when read again, and a multiple of [`L`] so every element keeps its lane.
const NORM_BLOCK: usize = 32 * L;

/// The fused momentum update, one read of w, g, v and one write of w, v. With `NORM` it also
/// returns ‖w‖² of the new w (the next step's ‖w‖, lanes as in [`reduce3_body`]), summed block
/// by block just after each block is written; 0 otherwise.
#[inline(always)]
fn momentum_body<const NESTEROV: bool, const NORM: bool>(
    w: &mut [f32],
    g: &[f32],
    v: &mut [f32],
    k: Momentum,
) -> f64 {
    let update = |w: &mut [f32], g: &[f32], v: &mut [f32]| {
        for ((w, &g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
            (*w, *v) = momentum_one::<NESTEROV>(*w, g, *v, k);
        }
    };
    if !NORM {
        update(w, g, v);
        return 0.0;
    }
    let mut acc = [0f64; L];
    for ((w, g), v) in
        w.chunks_mut(NORM_BLOCK).zip(g.chunks(NORM_BLOCK)).zip(v.chunks_mut(NORM_BLOCK))
    {
        update(w, g, v);
        sum_sq_into(&mut acc, w);
    }
    lanes_sum(acc)
}

multiversion! {
    fn reduce3 / reduce3_avx2(w: &[f32], g: &[f32]) -> (f64, f64, f64) { reduce3_body(w, g) }
}
multiversion! {
    fn reduce_gw / reduce_gw_avx2(w: &[f32], g: &[f32]) -> (f64, f64) { reduce_gw_body(w, g) }
}
multiversion! {
    fn sum_sq / sum_sq_avx2(g: &[f32]) -> f64 { sum_sq_body(g) }
}
multiversion! {
    fn momentum_plain / momentum_plain_avx2(w: &mut [f32], g: &[f32], v: &mut [f32], k: Momentum)
        -> f64 { momentum_body::<false, false>(w, g, v, k) }
}
multiversion! {
    fn momentum_nesterov / momentum_nesterov_avx2(
        w: &mut [f32], g: &[f32], v: &mut [f32], k: Momentum,
    ) -> f64 { momentum_body::<true, false>(w, g, v, k) }
}
multiversion! {
    fn momentum_plain_norm / momentum_plain_norm_avx2(
        w: &mut [f32], g: &[f32], v: &mut [f32], k: Momentum,
    ) -> f64 { momentum_body::<false, true>(w, g, v, k) }
}
multiversion! {
    fn momentum_nesterov_norm / momentum_nesterov_norm_avx2(
        w: &mut [f32], g: &[f32], v: &mut [f32], k: Momentum,
    ) -> f64 { momentum_body::<true, true>(w, g, v, k) }
}

/// The fused momentum pass; returns ‖w‖² of the new w when `norm` (else 0).
pub(super) fn momentum_pass(
    w: &mut [f32],
    g: &[f32],
    v: &mut [f32],
    k: Momentum,
    nesterov: bool,
    norm: bool,
) -> f64 {
    match (nesterov, norm) {
        (false, false) => momentum_plain(w, g, v, k),
        (true, false) => momentum_nesterov(w, g, v, k),
        (false, true) => momentum_plain_norm(w, g, v, k),
        (true, true) => momentum_nesterov_norm(w, g, v, k),
    }
}

/// Moments updated in place and the direction u = m̂/(√v̂ + ε) + λ·w written to `u`, element-wise
/// in f32 (the moments are stored in f32 anyway; this lets the compiler vectorise); returns
/// (‖u‖², ‖w‖²) in f64, eight lanes summed in a fixed order.
#[inline(always)]
fn lamb_moments_body(
    w: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &mut [f32],
    k: LambStep,
) -> (f64, f64) {
    let (c1, c2, eps, wd) = (k.c1 as f32, k.c2 as f32, k.eps as f32, k.wd as f32);
    let (b1, b2) = (k.b1 as f32, k.b2 as f32);
    let (a1, a2) = ((1.0 - k.b1) as f32, (1.0 - k.b2) as f32);
    let s = k.s as f32;
    let (mut uu, mut ww) = ([0f64; L], [0f64; L]);
    let consts = [s, b1, a1, b2, a2, c1, c2, eps];
    let (wa, wr) = w.as_chunks::<L>();
    let (ga, gr) = g.as_chunks::<L>();
    let (ma, mr) = m.as_chunks_mut::<L>();
    let (va, vr) = v.as_chunks_mut::<L>();
    let (ua, ur) = u.as_chunks_mut::<L>();
    for ((((w, g), m), v), u) in wa.iter().zip(ga).zip(ma).zip(va).zip(ua) {
        lamb_block(w, g, m, v, u, consts, wd, &mut uu, &mut ww);
    }
    lamb_block(wr, gr, mr, vr, ur, consts, wd, &mut uu, &mut ww);
    (lanes_sum(uu), lanes_sum(ww))
}

/// One block of at most 8 values of [`lamb_moments_body`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lamb_block(
    w: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &mut [f32],
    c: [f32; 8],
    wd: f32,
    uu: &mut [f64; 8],
    ww: &mut [f64; 8],
) {
    let [s, b1, a1, b2, a2, c1, c2, eps] = c;
    let n = w.len().min(8);
    let (w, g, m, v, u) = (&w[..n], &g[..n], &mut m[..n], &mut v[..n], &mut u[..n]);
    for j in 0..n {
        let gi = s * g[j];
        let mj = b1 * m[j] + a1 * gi;
        let vj = b2 * v[j] + a2 * gi * gi;
        m[j] = mj;
        v[j] = vj;
        let uj = (mj * c1) / ((vj * c2).sqrt() + eps) + wd * w[j];
        u[j] = uj;
        uu[j] += uj as f64 * uj as f64;
        ww[j] += w[j] as f64 * w[j] as f64;
    }
}

#[inline(always)]
fn lamb_apply_body(w: &mut [f32], u: &[f32], rate: f64) {
    for (w, &u) in w.iter_mut().zip(u) {
        *w = (*w as f64 - rate * u as f64) as f32;
    }
}

multiversion! {
    fn lamb_moments / lamb_moments_avx2(
        w: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32], u: &mut [f32], k: LambStep,
    ) -> (f64, f64) { lamb_moments_body(w, g, m, v, u, k) }
}
multiversion! {
    fn lamb_apply / lamb_apply_avx2(w: &mut [f32], u: &[f32], rate: f64) -> () {
        lamb_apply_body(w, u, rate)
    }
}

/// The CPU's optimizer passes ([`Device::optim_reduce`]): each job with the lane kernels above.
pub fn host_reduce(w: &[f32], g: &[f32], jobs: &[ReduceJob]) -> Vec<Sums> {
    check_spans("optim_reduce", w.len().min(g.len()), jobs.iter().map(|j| j.span));
    jobs.iter()
        .map(|j| {
            let (w, g) = (&w[j.span.range()], &g[j.span.range()]);
            let keep = |on: bool, x: f64| if on { x } else { 0.0 };
            match (j.ww, j.gg, j.gw) {
                (false, false, false) => Sums::default(),
                (true, false, false) => Sums { ww: sum_sq(w), ..Sums::default() },
                (false, true, false) => Sums { gg: sum_sq(g), ..Sums::default() },
                (false, _, true) => {
                    let (gg, gw) = reduce_gw(w, g);
                    Sums { ww: 0.0, gg: keep(j.gg, gg), gw }
                }
                (true, _, _) => {
                    let (ww, gg, gw) = reduce3(w, g);
                    Sums { ww, gg: keep(j.gg, gg), gw: keep(j.gw, gw) }
                }
            }
        })
        .collect()
}

/// The CPU's [`Device::optim_momentum`]: ‖w‖² of each job's new w where it asks (else 0).
pub fn host_momentum(w: &mut [f32], g: &[f32], v: &mut [f32], jobs: &[MomentumJob]) -> Vec<f64> {
    check_spans("optim_momentum", w.len().min(g.len()).min(v.len()), jobs.iter().map(|j| j.span));
    jobs.iter()
        .map(|j| {
            let r = j.span.range();
            momentum_pass(&mut w[r.clone()], &g[r.clone()], &mut v[r], j.k, j.nesterov, j.norm)
        })
        .collect()
}

/// The CPU's [`Device::optim_lamb`]: a tensor at a time, moments then update.
#[allow(clippy::too_many_arguments)]
pub fn host_lamb(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &mut [f32],
    jobs: &[LambJob],
    rate: &mut dyn FnMut(usize, f64, f64) -> f64,
) {
    let len = w.len().min(g.len()).min(m.len()).min(v.len());
    check_spans("optim_lamb", len, jobs.iter().map(|j| j.span));
    let longest = jobs.iter().map(|j| j.span.len).max().unwrap_or(0);
    assert!(u.len() >= longest, "optim_lamb: scratch of {} values for a job of {longest}", u.len());
    for (i, j) in jobs.iter().enumerate() {
        let r = j.span.range();
        let w = &mut w[r.clone()];
        // One scratch reused by every tensor: it stays in cache between its write and read.
        let u = &mut u[..j.span.len];
        let (uu, ww) = lamb_moments(w, &g[r.clone()], &mut m[r.clone()], &mut v[r], u, j.k);
        lamb_apply(w, u, rate(i, uu, ww));
    }
}

impl Optimizer<Vec<f32>> {
    /// Checks `cfg` and the groups (no overlaps) and allocates the state.
    pub fn new(cfg: &OptimConfig, groups: Vec<TensorGroup>) -> Result<Optimizer, OptimError> {
        let settings = cfg.settings().map_err(OptimError::Config)?;
        Optimizer::from_settings(settings, groups)
    }

    pub fn from_settings(
        settings: Settings,
        groups: Vec<TensorGroup>,
    ) -> Result<Optimizer, OptimError> {
        let mut spans: Vec<(usize, usize, &str)> =
            groups.iter().map(|g| (g.offset, g.offset + g.len, g.name.as_str())).collect();
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(OptimError::Config(format!(
                    "parameter tensors {:?} and {:?} overlap in the flat buffer; each element \
                     must belong to one tensor",
                    w[0].2, w[1].2
                )));
            }
        }
        let extent = spans.iter().map(|s| s.1).max().unwrap_or(0);
        let lamb = settings.family == Family::Lamb;
        let opt = Optimizer {
            buf1: vec![0.0; extent],
            buf2: if lamb { vec![0.0; extent] } else { Vec::new() },
            scratch: if lamb {
                vec![0.0; groups.iter().map(|g| g.len).max().unwrap_or(0)]
            } else {
                Vec::new()
            },
            w_sq: vec![None; groups.len()],
            settings,
            groups,
            extent,
            steps: 0,
        };
        tracing::info!("{}", opt.describe());
        Ok(opt)
    }

    /// One update on the host; see [`Optimizer::step_on`].
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64, step: u64) -> StepStats {
        // The CPU device's passes are the host kernels (one thread: no pool is built).
        self.step_on(&CpuDevice::new(1), params, grads, lr, step)
    }

    /// The same optimizer with its state in `dev`'s buffers, for [`Optimizer::step_on`] with
    /// that device.
    pub fn into_device<D: Device>(self, dev: &D) -> Optimizer<D::Buf> {
        let move_in = |v: Vec<f32>| {
            let mut b = dev.alloc(v.len());
            dev.synchronize();
            b.copy_from_slice(&v);
            b
        };
        Optimizer {
            buf1: move_in(self.buf1),
            buf2: move_in(self.buf2),
            scratch: dev.alloc(self.scratch.len()),
            settings: self.settings,
            groups: self.groups,
            extent: self.extent,
            steps: self.steps,
            w_sq: self.w_sq,
        }
    }
}

impl<B: DeviceBuf> Optimizer<B> {
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn groups(&self) -> &[TensorGroup] {
        &self.groups
    }

    /// Forgets the ‖w‖ each adapted tensor had when the last step wrote it, so the next step
    /// reads it from the parameters. Call this after changing trainable parameters other than
    /// through [`Optimizer::step`] (restoring them from a checkpoint through
    /// [`Optimizer::load_state`] already does).
    pub fn forget_weight_norms(&mut self) {
        self.w_sq.iter_mut().for_each(|x| *x = None);
    }

    /// Steps taken (restored by [`Optimizer::load_state`]).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The momentum buffer (SGD, LARS, TVLARS) or LAMB's first moment.
    pub fn velocity(&self) -> &[f32] {
        &self.buf1
    }

    /// One line for the start-up log: the optimizer and which tensors it decays and adapts.
    pub fn describe(&self) -> String {
        let s = &self.settings;
        let adapts = matches!(s.family, Family::Lars | Family::Tvlars | Family::Lamb);
        let names = |f: &dyn Fn(&TensorGroup) -> bool| -> String {
            let v: Vec<&str> = self
                .groups
                .iter()
                .filter(|g| g.trainable && f(g))
                .map(|g| g.name.as_str())
                .collect();
            if v.is_empty() { "none".into() } else { v.join(", ") }
        };
        let frozen = self.groups.iter().filter(|g| !g.trainable).count();
        let scaled = self.scaled_rates();
        let scaled = if scaled.is_empty() {
            String::new()
        } else {
            format!("; learning rate of {}", scaled.join(", "))
        };
        format!(
            "optimizer {}: {} tensors ({} frozen); weight decay {} on all but: {}; {}{scaled}",
            s.name,
            self.groups.len(),
            frozen,
            s.weight_decay,
            names(&|g| !g.decay),
            if adapts {
                format!(
                    "trust ratio on all but: {} (they take lr × {})",
                    names(&|g| !g.adapt),
                    s.excluded_lr_scale
                )
            } else {
                "no trust ratio".into()
            }
        )
    }

    /// The trainable tensors with a learning-rate factor other than 1 (`optim.lr_scale`), as
    /// "name × factor".
    pub fn scaled_rates(&self) -> Vec<String> {
        self.groups
            .iter()
            .filter(|g| g.trainable && g.lr_scale != 1.0)
            .map(|g| format!("{} × {}", g.name, g.lr_scale))
            .collect()
    }

    /// LARS/TVLARS ratio and the decay that goes with it, from the tensor's sums (`gw` is only
    /// read by the `combined` form with `wd` > 0).
    fn lars_ratio(&self, ww: f64, gg: f64, gw: f64, wd: f64, lr: f64, step: u64) -> (f64, f64) {
        let s = &self.settings;
        let wn = ww.sqrt();
        let gn = gg.sqrt();
        let dn = (gg + 2.0 * wd * gw + wd * wd * ww).max(0.0).sqrt();
        let zero = match s.ratio_form {
            RatioForm::Larc => wn == 0.0 || gn == 0.0,
            RatioForm::Combined => wn == 0.0 || dn == 0.0,
        };
        if zero {
            let wd = if s.zero_norm == ZeroNorm::Apex { 0.0 } else { wd };
            return (1.0, wd);
        }
        let (wn_c, dn_c) = match s.norm_clamp {
            Some(c) => (wn.min(c), dn.min(c)),
            None => (wn, dn),
        };
        let mut local = match s.ratio_form {
            RatioForm::Larc => s.trust * wn / (gn + wd * wn + s.eps),
            RatioForm::Combined => s.trust * wn_c / dn_c,
        };
        if let Some(phi) = s.phi {
            local *= phi.at((step + 1) as f64);
        }
        if s.larc_clip && lr > 0.0 {
            local = local.min(lr) / lr;
        }
        (local, wd)
    }

    /// One update with learning rate `lr` from the (all-reduced) gradient, its element passes
    /// run by `dev` (the device whose buffers hold `params`, `grads` and this optimizer's
    /// state); `step` is the 0-based optimizer step (TVLARS's t = step + 1, LAMB's bias
    /// correction uses step + 1). The host computes only scalars: the clipping factor and the
    /// trust ratios from the sums the device returns.
    ///
    /// `params` must be the buffer the previous step wrote, changed by nothing else in between
    /// (or call [`Optimizer::forget_weight_norms`] after changing it): LARS and TVLARS take ‖w‖
    /// of adapted tensors from the previous step's write. Clamping an excluded tensor (the
    /// logit scale) is fine, as no norm of it is kept.
    ///
    /// Panics if `params` or `grads` is shorter than the groups' extent (the groups come from
    /// the same model as the buffers, so that is a bug, not bad input).
    pub fn step_on<D: Device<Buf = B>>(
        &mut self,
        dev: &D,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        step: u64,
    ) -> StepStats {
        assert!(
            params.len() >= self.extent && grads.len() >= self.extent,
            "optimizer groups span {} values but params has {} and grads {}",
            self.extent,
            params.len(),
            grads.len()
        );
        let st = self.settings.clone();
        let mut stats =
            StepStats { groups: vec![GroupStat::default(); self.groups.len()], grad_norm: None };
        let lars = matches!(st.family, Family::Lars | Family::Tvlars);
        let span = |g: &TensorGroup| Span { offset: g.offset, len: g.len };
        let decay = |g: &TensorGroup| if g.decay { st.weight_decay } else { 0.0 };

        // Pass 1: the sums, read as little as possible: ‖g‖² of every tensor for clipping;
        // for a tensor with a LARS/TVLARS ratio ‖g‖², ‖w‖² unless the last update left it,
        // and ⟨g, w⟩ only for the `combined` form with decay. Every sum uses the same lanes,
        // so each value is bitwise what one pass over w and g would give.
        let mut jobs = Vec::new();
        let mut job_of = vec![None; self.groups.len()];
        for (gi, grp) in self.groups.iter().enumerate() {
            if !grp.trainable {
                continue;
            }
            let adapted = grp.adapt && lars;
            let job = ReduceJob {
                span: span(grp),
                ww: adapted && self.w_sq[gi].is_none(),
                gg: st.grad_clip_norm.is_some() || adapted,
                gw: adapted && st.ratio_form == RatioForm::Combined && decay(grp) != 0.0,
            };
            if job.ww || job.gg || job.gw {
                job_of[gi] = Some(jobs.len());
                jobs.push(job);
            }
        }
        let sums =
            if jobs.is_empty() { Vec::new() } else { dev.optim_reduce(params, grads, &jobs) };
        let sums_of = |gi: usize| job_of[gi].map_or(Sums::default(), |j| sums[j]);

        let mut scale = 1.0;
        if let Some(c) = st.grad_clip_norm {
            let n = (0..self.groups.len())
                .filter(|&gi| self.groups[gi].trainable)
                .map(|gi| sums_of(gi).gg)
                .sum::<f64>()
                .sqrt();
            stats.grad_norm = Some(n);
            if n > c {
                scale = c / n;
            }
        }
        // Tensors without a trust ratio take this multiple of lr (1 under SGD).
        let unadapted = if st.family == Family::Sgd { 1.0 } else { st.excluded_lr_scale };
        let t = step + 1;

        if st.family == Family::Lamb {
            // Pass 2 (LAMB): moments and direction, then the update at the rate from ‖u‖, ‖w‖.
            let (c1, c2) = if st.bias_correction {
                (1.0 / (1.0 - st.beta1.powf(t as f64)), 1.0 / (1.0 - st.beta2.powf(t as f64)))
            } else {
                (1.0, 1.0)
            };
            let mut owners = Vec::new();
            let mut ljobs = Vec::new();
            for (gi, grp) in self.groups.iter().enumerate().filter(|(_, g)| g.trainable) {
                let k = LambStep {
                    s: scale,
                    wd: decay(grp),
                    b1: st.beta1,
                    b2: st.beta2,
                    c1,
                    c2,
                    eps: st.eps,
                };
                owners.push(gi);
                ljobs.push(LambJob { span: span(grp), k });
            }
            let groups = &self.groups;
            let mut rate = |j: usize, uu: f64, ww: f64| -> f64 {
                let gi = owners[j];
                let lr = lr * groups[gi].lr_scale;
                let adapted = groups[gi].adapt;
                let ratio = if adapted {
                    let wn = ww.sqrt();
                    let un = uu.sqrt();
                    let phi = st.lamb_clamp.map_or(wn, |c| wn.min(c));
                    if phi == 0.0 || un == 0.0 { 1.0 } else { phi / un }
                } else {
                    unadapted
                };
                stats.groups[gi] = GroupStat { ratio, lr: lr * ratio, adapted, trainable: true };
                lr * ratio
            };
            if !ljobs.is_empty() {
                let (m, v, u) = (&mut self.buf1, &mut self.buf2, &mut self.scratch);
                dev.optim_lamb(params, grads, m, v, u, &ljobs, &mut rate);
            }
        } else {
            // Pass 2 (SGD, LARS, TVLARS): the fused momentum update, which also sums ‖w‖² of
            // the new w of adapted tensors for the next step.
            let mut owners = Vec::new();
            let mut mjobs = Vec::new();
            for (gi, grp) in self.groups.iter().enumerate().filter(|(_, g)| g.trainable) {
                let lr = lr * grp.lr_scale;
                let adapted = grp.adapt && st.family != Family::Sgd;
                let s = sums_of(gi);
                let (r, wd) = if adapted {
                    let ww = self.w_sq[gi].unwrap_or(s.ww);
                    self.lars_ratio(ww, scale * scale * s.gg, scale * s.gw, decay(grp), lr, step)
                } else {
                    (unadapted, decay(grp))
                };
                let (a, b) = match st.momentum_form {
                    MomentumForm::Classic => (lr * r, 1.0),
                    MomentumForm::Pytorch => (r, lr),
                };
                let k = Momentum { s: scale, wd, m: st.momentum, a, b };
                owners.push(gi);
                mjobs.push(MomentumJob {
                    span: span(grp),
                    k,
                    nesterov: st.nesterov,
                    norm: adapted,
                });
                stats.groups[gi] = GroupStat { ratio: r, lr: lr * r, adapted, trainable: true };
            }
            if !mjobs.is_empty() {
                let norms = dev.optim_momentum(params, grads, &mut self.buf1, &mjobs);
                for ((gi, job), ww) in owners.into_iter().zip(&mjobs).zip(norms) {
                    self.w_sq[gi] = job.norm.then_some(ww);
                }
            }
        }
        self.steps = self.steps.max(t);
        stats
    }

    /// The state for a checkpoint: a small header (name, steps, sizes) and the buffers as
    /// little-endian f32.
    pub fn state_bytes(&self) -> Vec<u8> {
        let name = self.settings.name.as_bytes();
        let mut out = Vec::with_capacity(40 + name.len() + 4 * (self.buf1.len() + self.buf2.len()));
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&self.steps.to_le_bytes());
        for buf in [&self.buf1, &self.buf2] {
            out.extend_from_slice(&(buf.len() as u64).to_le_bytes());
            for x in buf.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_bytes`] wrote, from an optimizer built with the same
    /// name and tensors.
    pub fn load_state(&mut self, bytes: &[u8]) -> Result<(), OptimError> {
        let bad = |what: String| OptimError::State(what);
        let mut rest = bytes;
        let mut take = |n: usize, what: &str| -> Result<&[u8], OptimError> {
            if rest.len() < n {
                return Err(OptimError::State(format!(
                    "truncated at the {what} ({} bytes left, {n} needed); the checkpoint file is \
                     incomplete",
                    rest.len()
                )));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        if take(8, "header")? != STATE_MAGIC {
            return Err(bad("not an optimizer state (bad magic)".into()));
        }
        let name_len = u32::from_le_bytes(take(4, "name length")?.try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(take(name_len, "name")?).into_owned();
        if name != self.settings.name {
            return Err(bad(format!(
                "saved by optimizer {name:?} but this run uses {:?}; resume with optim.name = \
                 {name:?} or start without the optimizer state",
                self.settings.name
            )));
        }
        let steps = u64::from_le_bytes(take(8, "step count")?.try_into().unwrap());
        let mut bufs = Vec::with_capacity(2);
        for (i, want) in [self.buf1.len(), self.buf2.len()].into_iter().enumerate() {
            let len = u64::from_le_bytes(take(8, "buffer length")?.try_into().unwrap()) as usize;
            if len != want {
                return Err(bad(format!(
                    "buffer {i} holds {len} values but this model needs {want}; the checkpoint \
                     belongs to another model"
                )));
            }
            let raw = take(len.saturating_mul(4), "buffer data")?;
            bufs.push(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<f32>>(),
            );
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} unexpected bytes after the buffers", rest.len())));
        }
        // The lengths match (checked above); a device's buffers are written from the host,
        // which the caller does with the device idle (before the first step).
        self.buf1.copy_from_slice(&bufs[0]);
        self.buf2.copy_from_slice(&bufs[1]);
        self.steps = steps;
        self.forget_weight_norms();
        Ok(())
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// The dispatched kernels (AVX2 where the CPU has it) give bitwise what the baseline code
    /// gives, and a norm summed while writing equals a separate pass over what was written.
    #[test]
    fn dispatched_kernels_match_the_baseline_bitwise() {
        for n in
            [0, 1, 7, 8, 9, 63, NORM_BLOCK - 1, NORM_BLOCK, NORM_BLOCK + 5, 3 * NORM_BLOCK + 13]
        {
            let (w, g) = (data(n, 1), data(n, 2));
            let bits = |x: (f64, f64, f64)| (x.0.to_bits(), x.1.to_bits(), x.2.to_bits());
            assert_eq!(bits(reduce3(&w, &g)), bits(reduce3_body(&w, &g)), "n = {n}");
            let (gg, gw) = reduce_gw(&w, &g);
            assert_eq!(
                (gg.to_bits(), gw.to_bits()),
                (reduce3_body(&w, &g).1.to_bits(), reduce3_body(&w, &g).2.to_bits())
            );
            assert_eq!(sum_sq(&g).to_bits(), reduce3_body(&w, &g).1.to_bits(), "n = {n}");
            assert_eq!(sum_sq(&w).to_bits(), reduce3_body(&w, &g).0.to_bits(), "n = {n}");
            let k = Momentum { s: 0.7, wd: 1e-3, m: 0.9, a: 0.05, b: 1.3 };
            for nesterov in [false, true] {
                let (mut w1, mut v1) = (w.clone(), data(n, 3));
                let (mut w2, mut v2) = (w.clone(), v1.clone());
                let (mut w3, mut v3) = (w.clone(), v1.clone());
                let norm = momentum_pass(&mut w1, &g, &mut v1, k, nesterov, true);
                momentum_pass(&mut w2, &g, &mut v2, k, nesterov, false);
                if nesterov {
                    momentum_body::<true, false>(&mut w3, &g, &mut v3, k);
                } else {
                    momentum_body::<false, false>(&mut w3, &g, &mut v3, k);
                }
                assert_eq!((&w1, &v1), (&w2, &v2), "n = {n}");
                assert_eq!((&w1, &v1), (&w3, &v3), "n = {n}");
                assert_eq!(norm.to_bits(), sum_sq_body(&w1).to_bits(), "n = {n}");
            }
            let k =
                LambStep { s: 1.0, wd: 0.01, b1: 0.9, b2: 0.999, c1: 10.0, c2: 1000.0, eps: 1e-6 };
            let (mut m1, mut v1, mut u1) = (data(n, 4), data(n, 5), vec![0.0; n]);
            v1.iter_mut().for_each(|x| *x = x.abs());
            let (mut m2, mut v2, mut u2) = (m1.clone(), v1.clone(), vec![0.0; n]);
            let a = lamb_moments(&w, &g, &mut m1, &mut v1, &mut u1, k);
            let b = lamb_moments_body(&w, &g, &mut m2, &mut v2, &mut u2, k);
            assert_eq!((a.0.to_bits(), a.1.to_bits()), (b.0.to_bits(), b.1.to_bits()), "n = {n}");
            assert_eq!((&m1, &v1, &u1), (&m2, &v2, &u2), "n = {n}");
            let (mut w1, mut w2) = (w.clone(), w.clone());
            lamb_apply(&mut w1, &u1, 0.01);
            lamb_apply_body(&mut w2, &u2, 0.01);
            assert_eq!(w1, w2, "n = {n}");
        }
    }
}
