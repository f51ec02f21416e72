//! A plain f64 implementation written straight from ALGORITHMS.md §6, for the tests: one
//! tensor at a time, every norm computed directly (‖g + βw‖ from the vector itself), state in
//! f64.

use super::TensorGroup;
use super::config::{Family, MomentumForm, RatioForm, Settings, ZeroNorm};

pub struct Reference {
    pub s: Settings,
    pub groups: Vec<TensorGroup>,
    pub w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|a| a * a).sum::<f64>().sqrt()
}

impl Reference {
    pub fn new(s: Settings, groups: Vec<TensorGroup>, w: &[f32]) -> Reference {
        let n = w.len();
        Reference {
            s,
            groups,
            w: w.iter().map(|&x| x as f64).collect(),
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Returns the ratio of each group (0 for frozen ones).
    pub fn step(&mut self, grads: &[f32], lr: f64, step: u64) -> Vec<f64> {
        let s = self.s.clone();
        let t = (step + 1) as f64;
        let mut g_all: Vec<f64> = grads.iter().map(|&x| x as f64).collect();
        if let Some(c) = s.grad_clip_norm {
            let n = self
                .groups
                .iter()
                .filter(|g| g.trainable)
                .flat_map(|g| g_all[g.offset..g.offset + g.len].to_vec())
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt();
            if n > c {
                g_all.iter_mut().for_each(|x| *x *= c / n);
            }
        }
        let mut ratios = vec![0.0; self.groups.len()];
        for (gi, grp) in self.groups.iter().enumerate() {
            if !grp.trainable {
                continue;
            }
            let lr = lr * grp.lr_scale;
            let r0 = grp.offset..grp.offset + grp.len;
            let g = g_all[r0.clone()].to_vec();
            let w = self.w[r0.clone()].to_vec();
            let beta = if grp.decay { s.weight_decay } else { 0.0 };
            let adapted = grp.adapt && s.family != Family::Sgd;
            // A tensor without a trust ratio takes lr·excluded_lr_scale (lr under SGD).
            let unadapted = if s.family == Family::Sgd { 1.0 } else { s.excluded_lr_scale };
            let new_w: Vec<f64>;
            if s.family == Family::Lamb {
                let m = &mut self.m[r0.clone()];
                let v = &mut self.v[r0.clone()];
                let mut u = vec![0.0; g.len()];
                for i in 0..g.len() {
                    m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g[i];
                    v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g[i] * g[i];
                    let (mh, vh) = if s.bias_correction {
                        (m[i] / (1.0 - s.beta1.powf(t)), v[i] / (1.0 - s.beta2.powf(t)))
                    } else {
                        (m[i], v[i])
                    };
                    u[i] = mh / (vh.sqrt() + s.eps) + beta * w[i];
                }
                let mut r = if adapted { 1.0 } else { unadapted };
                if adapted {
                    let phi = match s.lamb_clamp {
                        Some(c) => norm(&w).min(c),
                        None => norm(&w),
                    };
                    let un = norm(&u);
                    if phi > 0.0 && un > 0.0 {
                        r = phi / un;
                    }
                }
                ratios[gi] = r;
                new_w = (0..g.len()).map(|i| w[i] - lr * r * u[i]).collect();
            } else {
                let mut beta = beta;
                let mut r = if adapted { 1.0 } else { unadapted };
                if adapted {
                    let d: Vec<f64> = (0..g.len()).map(|i| g[i] + beta * w[i]).collect();
                    let (wn, gn, dn) = (norm(&w), norm(&g), norm(&d));
                    let zero = match s.ratio_form {
                        RatioForm::Larc => wn == 0.0 || gn == 0.0,
                        RatioForm::Combined => wn == 0.0 || dn == 0.0,
                    };
                    if zero {
                        if s.zero_norm == ZeroNorm::Apex {
                            beta = 0.0;
                        }
                    } else {
                        let c = s.norm_clamp.unwrap_or(f64::INFINITY);
                        r = match s.ratio_form {
                            RatioForm::Larc => s.trust * wn / (gn + beta * wn + s.eps),
                            RatioForm::Combined => s.trust * wn.min(c) / dn.min(c),
                        };
                        if let Some(p) = s.phi {
                            r *= 1.0 / (p.alpha + (p.lambda * (t - p.delay)).exp()) + p.min;
                        }
                        if s.larc_clip && lr > 0.0 {
                            r = (r / lr).min(1.0);
                        }
                    }
                }
                ratios[gi] = r;
                let buf = &mut self.m[r0.clone()];
                let mut out = w.clone();
                for i in 0..g.len() {
                    let d = g[i] + beta * w[i];
                    match s.momentum_form {
                        MomentumForm::Classic => {
                            buf[i] = s.momentum * buf[i] + lr * r * d;
                            let upd =
                                if s.nesterov { lr * r * d + s.momentum * buf[i] } else { buf[i] };
                            out[i] -= upd;
                        }
                        MomentumForm::Pytorch => {
                            buf[i] = s.momentum * buf[i] + r * d;
                            let upd = if s.nesterov { r * d + s.momentum * buf[i] } else { buf[i] };
                            out[i] -= lr * upd;
                        }
                    }
                }
                new_w = out;
            }
            self.w[r0].copy_from_slice(&new_w);
        }
        ratios
    }
}
