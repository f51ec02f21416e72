//! The per-tensor trust-ratio engine behind every optimizer (ALGORITHMS.md §6).
//!
//! For each trainable tensor: one reduction pass in f64 gives ‖w‖², ‖g‖² and ⟨g, w⟩ (so
//! ‖g + βw‖² = ‖g‖² + 2β⟨g, w⟩ + β²‖w‖² needs no second pass), the ratio follows, then one
//! fused pass reads w, g and the state once and writes w and the state once. Tensors are
//! handled one after the other, so a tensor that fits in cache is read from memory once. The
//! arithmetic of a step is f64 and its order is fixed (no threads), so identical gradients give
//! bitwise identical parameters on every rank.

use serde::Serialize;

use super::TensorGroup;
use super::config::{Family, MomentumForm, OptimConfig, RatioForm, Settings, ZeroNorm};

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
    /// The trust ratio r (LARS/TVLARS: the local rate, φ included; LAMB: φ(‖w‖)/‖u‖; 1 when
    /// the tensor is not adapted; 0 when it is frozen).
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
#[derive(Clone, Debug)]
pub struct Optimizer {
    settings: Settings,
    groups: Vec<TensorGroup>,
    extent: usize,
    /// Momentum buffer (SGD, LARS, TVLARS) or LAMB's first moment m.
    buf1: Vec<f32>,
    /// LAMB's second moment v (empty otherwise).
    buf2: Vec<f32>,
    /// LAMB's update direction of the current tensor (not part of the state).
    scratch: Vec<f32>,
    /// Steps taken so far (restored with the state).
    steps: u64,
}

const STATE_MAGIC: &[u8; 8] = b"TSOPTST1";

/// ‖w‖², ‖g‖², ⟨g, w⟩ in f64, eight lanes (lane k takes elements k, k + 8, …) so the
/// compiler vectorises, lanes summed in a fixed order.
fn reduce3(w: &[f32], g: &[f32]) -> (f64, f64, f64) {
    const L: usize = 8;
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
    (ww.iter().sum(), gg.iter().sum(), gw.iter().sum())
}

fn sum_sq(g: &[f32]) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let (c, r) = g.as_chunks::<L>();
    for a in c {
        for k in 0..L {
            acc[k] += a[k] as f64 * a[k] as f64;
        }
    }
    for (k, &x) in r.iter().enumerate() {
        acc[k] += x as f64 * x as f64;
    }
    acc.iter().sum()
}

/// The fused momentum update: d = s·g + wd·w; v ← m·v + a·d; Δ = v (or a·d + m·v with
/// Nesterov); w ← w − b·Δ. Classic momentum is a = lr·r, b = 1; PyTorch's is a = r, b = lr.
#[allow(clippy::too_many_arguments)]
fn momentum_pass(
    w: &mut [f32],
    g: &[f32],
    v: &mut [f32],
    s: f64,
    wd: f64,
    m: f64,
    a: f64,
    b: f64,
    nesterov: bool,
) {
    if nesterov {
        for ((w, &g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
            let d = s * g as f64 + wd * *w as f64;
            let vn = m * *v as f64 + a * d;
            *v = vn as f32;
            *w = (*w as f64 - b * (a * d + m * vn)) as f32;
        }
    } else {
        for ((w, &g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
            let d = s * g as f64 + wd * *w as f64;
            let vn = m * *v as f64 + a * d;
            *v = vn as f32;
            *w = (*w as f64 - b * vn) as f32;
        }
    }
}

/// LAMB constants of one step.
#[derive(Clone, Copy)]
struct LambStep {
    s: f64,
    wd: f64,
    b1: f64,
    b2: f64,
    /// 1/(1 − β₁ᵗ), 1/(1 − β₂ᵗ) (1 without bias correction).
    c1: f64,
    c2: f64,
    eps: f64,
}

/// Moments updated in place and the direction u = m̂/(√v̂ + ε) + λ·w written to `u`, element-wise
/// in f32 (the moments are stored in f32 anyway; this lets the compiler vectorise); returns
/// (‖u‖², ‖w‖²) in f64, eight lanes summed in a fixed order.
fn lamb_moments(
    w: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u: &mut [f32],
    k: LambStep,
) -> (f64, f64) {
    const L: usize = 8;
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
    (uu.iter().sum(), ww.iter().sum())
}

/// One block of at most 8 values of [`lamb_moments`].
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

fn lamb_apply(w: &mut [f32], u: &[f32], rate: f64) {
    for (w, &u) in w.iter_mut().zip(u) {
        *w = (*w as f64 - rate * u as f64) as f32;
    }
}

impl Optimizer {
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
            settings,
            groups,
            extent,
            steps: 0,
        };
        tracing::info!("{}", opt.describe());
        Ok(opt)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn groups(&self) -> &[TensorGroup] {
        &self.groups
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
        format!(
            "optimizer {}: {} tensors ({} frozen); weight decay {} on all but: {}; {}",
            s.name,
            self.groups.len(),
            frozen,
            s.weight_decay,
            names(&|g| !g.decay),
            if adapts {
                format!("trust ratio on all but: {}", names(&|g| !g.adapt))
            } else {
                "no trust ratio".into()
            }
        )
    }

    /// LARS/TVLARS ratio and the decay that goes with it, from the tensor's sums.
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

    /// One update with learning rate `lr` from the (all-reduced) gradient; `step` is the 0-based
    /// optimizer step (TVLARS's t = step + 1, LAMB's bias correction uses step + 1).
    ///
    /// Panics if `params` or `grads` is shorter than the groups' extent (the groups come from
    /// the same model as the buffers, so that is a bug, not bad input).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64, step: u64) -> StepStats {
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
        let mut scale = 1.0;
        if let Some(c) = st.grad_clip_norm {
            let n = self
                .groups
                .iter()
                .filter(|g| g.trainable)
                .map(|g| sum_sq(&grads[g.offset..g.offset + g.len]))
                .sum::<f64>()
                .sqrt();
            stats.grad_norm = Some(n);
            if n > c {
                scale = c / n;
            }
        }
        let t = step + 1;
        let lamb = if st.family == Family::Lamb {
            let (c1, c2) = if st.bias_correction {
                (1.0 / (1.0 - st.beta1.powf(t as f64)), 1.0 / (1.0 - st.beta2.powf(t as f64)))
            } else {
                (1.0, 1.0)
            };
            Some(LambStep { s: scale, wd: 0.0, b1: st.beta1, b2: st.beta2, c1, c2, eps: st.eps })
        } else {
            None
        };
        for (gi, grp) in self.groups.iter().enumerate() {
            if !grp.trainable {
                continue;
            }
            let range = grp.offset..grp.offset + grp.len;
            let w = &mut params[range.clone()];
            let g = &grads[range.clone()];
            let wd = if grp.decay { st.weight_decay } else { 0.0 };
            let adapted = grp.adapt && st.family != Family::Sgd;
            let ratio;
            if let Some(k) = lamb {
                let k = LambStep { wd, ..k };
                let m = &mut self.buf1[range.clone()];
                let v = &mut self.buf2[range];
                let u = &mut self.scratch[..grp.len];
                let (uu, ww) = lamb_moments(w, g, m, v, u, k);
                ratio = if adapted {
                    let wn = ww.sqrt();
                    let un = uu.sqrt();
                    let phi = st.lamb_clamp.map_or(wn, |c| wn.min(c));
                    if phi == 0.0 || un == 0.0 { 1.0 } else { phi / un }
                } else {
                    1.0
                };
                lamb_apply(w, u, lr * ratio);
            } else {
                let (r, wd) = if adapted {
                    let (ww, gg, gw) = reduce3(w, g);
                    self.lars_ratio(ww, scale * scale * gg, scale * gw, wd, lr, step)
                } else {
                    (1.0, wd)
                };
                ratio = r;
                let (a, b) = match st.momentum_form {
                    MomentumForm::Classic => (lr * r, 1.0),
                    MomentumForm::Pytorch => (r, lr),
                };
                let v = &mut self.buf1[range];
                momentum_pass(w, g, v, scale, wd, st.momentum, a, b, st.nesterov);
            }
            stats.groups[gi] = GroupStat { ratio, lr: lr * ratio, adapted, trainable: true };
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
        self.buf2 = bufs.pop().unwrap_or_default();
        self.buf1 = bufs.pop().unwrap_or_default();
        self.steps = steps;
        Ok(())
    }
}
