//! The contrastive caveat, measured.
//!
//! The noise-scale estimator assumes i.i.d. per-example gradients. A contrastive loss (CLIP's
//! InfoNCE) couples the examples of a batch: every example is a negative for every other. In
//! Tessera the "small-batch gradient" of rank r is its share of the gradient of the *global*
//! loss: the features of all B examples are all-gathered, the loss over the whole global batch
//! is differentiated with respect to rank r's own b_r feature rows (and its share of the
//! temperature's gradient), and that is backpropagated through rank r's towers. The partial
//! gradients of the ranks sum exactly to the global-batch gradient, but none of them is the
//! gradient of a loss on b_r independent examples with their own b_r negatives.
//!
//! [`measure`] compares, at one fixed parameter point, three estimates of B_simple:
//! * Tessera's estimator, averaged (𝒮 and 𝒢 separately) over many global batches split into
//!   K = B/b parts exactly as K ranks would split them;
//! * the direct moments of independent batches of b examples (each its own contrastive loss):
//!   B_simple(b) = b·tr Cov(G_b) / |E G_b|²; and the same at B;
//! * McCandlish's two-batch estimator from those independent batches of sizes b and B.

use crate::config::Config;
use crate::data::{self, Dataset};
use crate::device::CpuDevice;
use crate::loss;
use crate::model::{Model, ModelKind};
use crate::rng::Rng;
use serde::Serialize;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CaveatOpts {
    /// The global batch B.
    pub global: usize,
    /// The ranks K it is split over (b = B/K each).
    pub ranks: usize,
    /// Global batches drawn (and as many independent batches of B; K times as many of b).
    pub repeats: usize,
    /// Seed of the batch draws.
    pub seed: u64,
    /// Threads for the model.
    pub threads: usize,
}

/// Moments of gradients from independent batches of one size.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Moments {
    pub batch: usize,
    pub samples: usize,
    /// E|G_b|² (the mean of the squared norms).
    pub mean_sq_norm: f64,
    /// b · tr Cov(G_b): tr Σ if the examples were independent.
    pub trace_sigma: f64,
    /// |E G_b|², unbiased (|mean|² − tr Cov/N).
    pub grad_sq: f64,
    pub b_simple: f64,
}

/// The comparison at one parameter point.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CaveatReport {
    pub global: usize,
    pub local: usize,
    pub ranks: usize,
    pub repeats: usize,
    /// The mean global-batch loss at this point.
    pub loss: f64,
    /// Tessera's estimator over the global batches: mean 𝒮, mean 𝒢, and their ratio.
    pub tessera_trace_sigma: f64,
    pub tessera_grad_sq: f64,
    pub tessera_b_simple: f64,
    /// The moments of Tessera's per-rank small-batch gradients G_r = (B/b)·partial_r, taken as
    /// samples of size b.
    pub tessera_local: Moments,
    /// Independent batches of b and of B examples, each with its own negatives.
    pub independent_local: Moments,
    pub independent_global: Moments,
    /// The two-batch estimate (sizes b and B) from the independent batches.
    pub independent_two_batch_b_simple: f64,
}

fn sq(v: &[f32]) -> f64 {
    super::sq_norm(v)
}

/// Moments of `samples` gradients (each a flat vector) of batch size `b`.
fn moments(samples: &[Vec<f32>], b: usize) -> Moments {
    let n = samples.len();
    let dim = samples.first().map_or(0, |s| s.len());
    let mut mean = vec![0.0f64; dim];
    for s in samples {
        for (m, &v) in mean.iter_mut().zip(s) {
            *m += f64::from(v);
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    let mean_sq_norm = samples.iter().map(|s| sq(s)).sum::<f64>() / n as f64;
    let mut trace_cov = 0.0;
    for s in samples {
        for (m, &v) in mean.iter().zip(s) {
            let d = f64::from(v) - m;
            trace_cov += d * d;
        }
    }
    trace_cov /= (n.max(2) - 1) as f64;
    let grad_sq = mean.iter().map(|m| m * m).sum::<f64>() - trace_cov / n as f64;
    let trace_sigma = b as f64 * trace_cov;
    Moments {
        batch: b,
        samples: n,
        mean_sq_norm,
        trace_sigma,
        grad_sq,
        b_simple: trace_sigma / grad_sq,
    }
}

/// `count` distinct rows of `0..n`.
fn draw(rng: &mut Rng, n: usize, count: usize) -> Vec<usize> {
    let mut picked = std::collections::HashSet::with_capacity(count);
    let mut rows = Vec::with_capacity(count);
    while rows.len() < count {
        let r = rng.below(n as u64) as usize;
        if picked.insert(r) {
            rows.push(r);
        }
    }
    rows
}

struct Probe<'a> {
    model: Model,
    dev: CpuDevice,
    data: &'a Dataset,
    xa: Vec<f32>,
    xb: Vec<f32>,
}

impl Probe<'_> {
    /// The gradient of the contrastive loss of the batch `rows` alone (its own negatives).
    fn batch_grad(&mut self, rows: &[usize]) -> (f32, Vec<f32>) {
        let b = rows.len();
        self.data.gather_a(rows, &mut self.xa);
        self.data.gather_b(rows, &mut self.xb);
        self.model.zero_grads();
        let (fa, fb) = self.model.forward_pair(&self.dev, &self.xa, &self.xb, b);
        let d = fa.len() / b;
        let o = loss::clip_loss_local(&fa, &fb, b, d, 0, b, self.model.logit_scale());
        self.model.backward_pair(&self.dev, &o.d_img_local, &o.d_txt_local);
        self.model.add_logit_scale_grad(o.d_t_partial);
        (o.loss, self.model.grads().to_vec())
    }

    /// The partial gradients of `ranks` ranks sharing the global batch `rows`, as Tessera's
    /// training loop computes them (global loss, each rank's rows and temperature share).
    fn rank_partials(&mut self, rows: &[usize], ranks: usize) -> (f32, Vec<(usize, Vec<f32>)>) {
        let big = rows.len();
        self.data.gather_a(rows, &mut self.xa);
        self.data.gather_b(rows, &mut self.xb);
        let fa = self.model.embed_a(&self.dev, &self.xa, big);
        let fb = self.model.embed_b(&self.dev, &self.xb, big);
        let d = fa.len() / big;
        let (da, db) = (self.xa.len() / big, self.xb.len() / big);
        let scale = self.model.logit_scale();
        let mut out = Vec::with_capacity(ranks);
        let mut loss_value = 0.0;
        for r in 0..ranks {
            let (off, b) = data::local_rows(big, ranks, r);
            let o = loss::clip_loss_local(&fa, &fb, big, d, off, b, scale);
            loss_value = o.loss;
            self.model.zero_grads();
            let xa = self.xa[off * da..(off + b) * da].to_vec();
            let xb = self.xb[off * db..(off + b) * db].to_vec();
            self.model.forward_pair(&self.dev, &xa, &xb, b);
            self.model.backward_pair(&self.dev, &o.d_img_local, &o.d_txt_local);
            self.model.add_logit_scale_grad(o.d_t_partial);
            out.push((b, self.model.grads().to_vec()));
        }
        (loss_value, out)
    }
}

/// Measures the three estimates at the parameters `params` (None: the model's initial ones)
/// of the contrastive job `cfg` (its training data, model and CLIP loss). The error names
/// what does not fit.
pub fn measure(
    cfg: &Config,
    params: Option<&[f32]>,
    opts: &CaveatOpts,
) -> Result<CaveatReport, String> {
    if cfg.model.kind == ModelKind::Classifier || cfg.data.two_views {
        return Err(
            "the contrastive caveat needs a paired contrastive job (model.kind = \"dual\" \
                    or \"shared\", data.two_views = false), e.g. the default config"
                .into(),
        );
    }
    if opts.ranks < 2 || opts.global < 2 * opts.ranks || opts.repeats < 4 {
        return Err(format!(
            "need at least 2 ranks, 2 examples per rank and 4 repeats (got ranks = {}, global \
             = {}, repeats = {})",
            opts.ranks, opts.global, opts.repeats
        ));
    }
    let train = match cfg.data.source {
        crate::config::DataSource::Synth => {
            data::try_synth(&cfg.data.synth).map_err(|e| e.to_string())?.0
        }
        crate::config::DataSource::Shards => {
            let p = cfg.data.train.as_ref().ok_or("data.train is not set")?;
            data::open_shard(p).map_err(|e| e.to_string())?
        }
    };
    if train.len() < opts.global {
        return Err(format!(
            "the training data has {} examples, fewer than the global batch {}",
            train.len(),
            opts.global
        ));
    }
    let mut model = Model::new(&cfg.model, cfg.run.seed).map_err(|e| e.to_string())?;
    if let Some(p) = params {
        if p.len() != model.num_params() {
            return Err(format!(
                "the parameter file holds {} values but the model has {}; pass the params.f32 \
                 of a run with this model config",
                p.len(),
                model.num_params()
            ));
        }
        model.params_mut().copy_from_slice(p);
    }
    let mut probe = Probe {
        model,
        dev: CpuDevice::new(opts.threads.max(1)),
        data: &train,
        xa: Vec::new(),
        xb: Vec::new(),
    };
    let mut rng = Rng::stream(opts.seed, 0xCA7E);
    let big = opts.global;
    let local = big / opts.ranks;
    let (mut s_sum, mut g_sum, mut loss_sum) = (0.0, 0.0, 0.0);
    let mut tessera_local = Vec::new();
    let mut indep_local = Vec::new();
    let mut indep_global = Vec::new();
    for _ in 0..opts.repeats {
        // Tessera's estimator on one global batch.
        let rows = draw(&mut rng, train.len(), big);
        let (l, parts) = probe.rank_partials(&rows, opts.ranks);
        loss_sum += f64::from(l);
        let mut reduced = vec![0.0f32; parts[0].1.len()];
        let mut weighted = 0.0;
        for (b, p) in &parts {
            for (r, &v) in reduced.iter_mut().zip(p) {
                *r += v;
            }
            // |partial|² = (b/B)²·|G_r|², so b·|G_r|² = |partial|²·B²/b.
            weighted += sq(p) * (big * big) as f64 / *b as f64;
            if *b == local {
                let scale = big as f32 / *b as f32;
                tessera_local.push(p.iter().map(|v| v * scale).collect::<Vec<f32>>());
            }
        }
        let g2 = sq(&reduced);
        let s = (weighted - big as f64 * g2) / (parts.len() - 1) as f64;
        s_sum += s;
        g_sum += g2 - s / big as f64;
        // Independent batches: one of B, K of b.
        indep_global.push(probe.batch_grad(&draw(&mut rng, train.len(), big)).1);
        for _ in 0..opts.ranks {
            indep_local.push(probe.batch_grad(&draw(&mut rng, train.len(), local)).1);
        }
    }
    let n = opts.repeats as f64;
    let independent_local = moments(&indep_local, local);
    let independent_global = moments(&indep_global, big);
    let (eb, e_big) = (independent_local.mean_sq_norm, independent_global.mean_sq_norm);
    let two_g = (big as f64 * e_big - local as f64 * eb) / (big - local) as f64;
    let two_s = (eb - e_big) / (1.0 / local as f64 - 1.0 / big as f64);
    Ok(CaveatReport {
        global: big,
        local,
        ranks: opts.ranks,
        repeats: opts.repeats,
        loss: loss_sum / n,
        tessera_trace_sigma: s_sum / n,
        tessera_grad_sq: g_sum / n,
        tessera_b_simple: s_sum / g_sum,
        tessera_local: moments(&tessera_local, local),
        independent_local,
        independent_global,
        independent_two_batch_b_simple: two_s / two_g,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_of_known_samples() {
        // Four samples of a 2-vector: mean (1, 0), deviations (±1, ±1).
        let s = vec![vec![2.0, 1.0], vec![0.0, -1.0], vec![2.0, -1.0], vec![0.0, 1.0]];
        let m = moments(&s, 8);
        assert_eq!(m.mean_sq_norm, 3.0);
        // tr Cov = (4 · 2)/3; |mean|² unbiased = 1 − tr Cov/4.
        let tc = 8.0 / 3.0;
        assert!((m.trace_sigma - 8.0 * tc).abs() < 1e-12);
        assert!((m.grad_sq - (1.0 - tc / 4.0)).abs() < 1e-12);
    }

    #[test]
    fn the_ranks_partials_sum_to_the_global_gradient_and_the_estimates_are_finite() {
        let sets: Vec<String> = [
            "model.tower_a.width=16",
            "model.tower_a.depth=1",
            "model.tower_a.output_dim=8",
            "model.tower_b.width=16",
            "model.tower_b.depth=1",
            "model.tower_b.output_dim=8",
            "data.synth.n_train=600",
            "data.synth.n_eval=50",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = Config::load(None, &sets).unwrap();
        let (train, _) = data::try_synth(&cfg.data.synth).unwrap();
        let mut probe = Probe {
            model: Model::new(&cfg.model, 0).unwrap(),
            dev: CpuDevice::new(1),
            data: &train,
            xa: Vec::new(),
            xb: Vec::new(),
        };
        let rows: Vec<usize> = (100..164).collect();
        let (l1, whole) = probe.batch_grad(&rows);
        let (l4, parts) = probe.rank_partials(&rows, 4);
        assert!((l1 - l4).abs() < 1e-5, "{l1} vs {l4}");
        let mut sum = vec![0.0f32; whole.len()];
        for (_, p) in &parts {
            for (s, &v) in sum.iter_mut().zip(p) {
                *s += v;
            }
        }
        let err = whole.iter().zip(&sum).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let top = whole.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(err <= 1e-4 * top, "partials sum off by {err} (largest {top})");

        let opts = CaveatOpts { global: 64, ranks: 4, repeats: 12, seed: 3, threads: 1 };
        let r = measure(&cfg, None, &opts).unwrap();
        assert_eq!((r.local, r.tessera_local.samples, r.independent_local.samples), (16, 48, 48));
        for v in [r.tessera_trace_sigma, r.tessera_grad_sq, r.independent_local.trace_sigma] {
            assert!(v.is_finite() && v != 0.0, "{r:?}");
        }
        assert!(r.tessera_trace_sigma > 0.0 && r.independent_local.trace_sigma > 0.0, "{r:?}");
        let bad = CaveatOpts { ranks: 1, ..opts.clone() };
        assert!(measure(&cfg, None, &bad).is_err());
        assert!(measure(&cfg, Some(&[0.0; 3]), &opts).unwrap_err().contains("parameter file"));
    }
}
