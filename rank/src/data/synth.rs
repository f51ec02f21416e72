//! Synthetic paired views from a latent-variable model.
//!
//! Each pair shares a latent `z ~ N(0, I_k)`. View v (a or b) is `x_v = f_v(z) + noise * e`,
//! `e ~ N(0, I)`, where `f_v` is a fixed random map drawn from the seed:
//! * `nonlinear = true`: `f_v(z) = W2 tanh(1.5 * W1 z / sqrt(k)) / sqrt(h)` with h = 2k hidden
//!   units and standard-normal `W1` (h x k), `W2` (dim_v x h);
//! * `nonlinear = false`: `f_v(z) = A z / sqrt(k)`.
//!
//! Each output coordinate is then standardised (mean 0, variance 1, estimated once from 4096
//! calibration latents of a separate stream) so that `noise` is relative to the signal: at
//! `noise = 0.5` every feature is signal + noise at a 4:1 variance ratio. The maps are shared by
//! the training and the evaluation split; the latents and noise are not. Rows are generated in
//! blocks of 1024, each block from its own stream `Rng::stream(seed, ..)`, in parallel, so the
//! output depends only on the spec.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{DataError, Dataset};
use crate::rng::Rng;

/// The `[data.synth]` config table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthSpec {
    /// Training pairs.
    pub n_train: usize,
    /// Held-out evaluation pairs.
    pub n_eval: usize,
    /// Dimension k of the shared latent.
    pub latent_dim: usize,
    /// Features of view a (`model.tower_a.input_dim`).
    pub dim_a: usize,
    /// Features of view b (`model.tower_b.input_dim`).
    pub dim_b: usize,
    /// Noise standard deviation relative to the (unit-variance) signal of each feature.
    pub noise: f32,
    pub seed: u64,
    /// Random 2-layer tanh maps (true) or random linear maps (false).
    pub nonlinear: bool,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            n_train: 20_000,
            n_eval: 1000,
            latent_dim: 16,
            dim_a: 32,
            dim_b: 32,
            noise: 0.5,
            seed: 0,
            nonlinear: true,
        }
    }
}

impl SynthSpec {
    /// Checks the spec; errors name the `data.synth.*` key to change.
    pub fn validate(&self) -> Result<(), DataError> {
        let positive = [
            ("n_train", self.n_train),
            ("n_eval", self.n_eval),
            ("latent_dim", self.latent_dim),
            ("dim_a", self.dim_a),
            ("dim_b", self.dim_b),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(DataError::Synth(format!(
                    "data.synth.{key} is 0; set it to at least 1"
                )));
            }
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(DataError::Synth(format!(
                "data.synth.noise = {} must be a finite number >= 0",
                self.noise
            )));
        }
        Ok(())
    }
}

const BLOCK: usize = 1024;
const GAIN: f32 = 1.5;
const CALIBRATION_ROWS: usize = 4096;

/// Fills `out` with standard normals, using both outputs of each Box-Muller draw.
fn normals(rng: &mut Rng, out: &mut [f32]) {
    for pair in out.chunks_mut(2) {
        let u1 = 1.0 - rng.uniform(); // (0, 1]
        let u2 = rng.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        pair[0] = (r * c) as f32;
        if let Some(p) = pair.get_mut(1) {
            *p = (r * s) as f32;
        }
    }
}

/// One view's fixed random map and standardisation.
struct ViewMap {
    k: usize,
    hidden: usize,
    nonlinear: bool,
    /// hidden x k (nonlinear) or dim x k (linear), already scaled.
    w1: Vec<f32>,
    /// dim x hidden, already scaled (nonlinear only).
    w2: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl ViewMap {
    fn new(spec: &SynthSpec, dim: usize, rng: &mut Rng, calib: &[f32]) -> ViewMap {
        let k = spec.latent_dim;
        let hidden = 2 * k;
        let rows1 = if spec.nonlinear { hidden } else { dim };
        let s1 = 1.0 / (k as f64).sqrt() * if spec.nonlinear { GAIN as f64 } else { 1.0 };
        let w1: Vec<f32> = (0..rows1 * k).map(|_| (rng.normal() * s1) as f32).collect();
        let s2 = 1.0 / (hidden as f64).sqrt();
        let w2: Vec<f32> = if spec.nonlinear {
            (0..dim * hidden).map(|_| (rng.normal() * s2) as f32).collect()
        } else {
            Vec::new()
        };
        let mut m = ViewMap {
            k,
            hidden,
            nonlinear: spec.nonlinear,
            w1,
            w2,
            mean: vec![0.0; dim],
            inv_std: vec![1.0; dim],
        };
        // Standardise each output coordinate over the calibration latents.
        let n = calib.len() / k;
        let mut sum = vec![0.0f64; dim];
        let mut sq = vec![0.0f64; dim];
        let (mut h, mut x) = (vec![0.0; hidden], vec![0.0; dim]);
        for z in calib.chunks_exact(k) {
            m.clean(z, &mut h, &mut x);
            for j in 0..dim {
                sum[j] += x[j] as f64;
                sq[j] += (x[j] as f64) * (x[j] as f64);
            }
        }
        for j in 0..dim {
            let mu = sum[j] / n as f64;
            let var = (sq[j] / n as f64 - mu * mu).max(1e-12);
            m.mean[j] = mu as f32;
            m.inv_std[j] = (1.0 / var.sqrt()) as f32;
        }
        m
    }

    /// The noiseless, unstandardised view of latent `z` into `x`.
    fn clean(&self, z: &[f32], h: &mut [f32], x: &mut [f32]) {
        let k = self.k;
        if self.nonlinear {
            for (hi, w) in h.iter_mut().zip(self.w1.chunks_exact(k)) {
                *hi = w.iter().zip(z).map(|(a, b)| a * b).sum::<f32>().tanh();
            }
            for (xj, w) in x.iter_mut().zip(self.w2.chunks_exact(self.hidden)) {
                *xj = w.iter().zip(h.iter()).map(|(a, b)| a * b).sum();
            }
        } else {
            for (xj, w) in x.iter_mut().zip(self.w1.chunks_exact(k)) {
                *xj = w.iter().zip(z).map(|(a, b)| a * b).sum();
            }
        }
    }

    /// Standardised view plus noise, written into `out`.
    fn sample(&self, z: &[f32], noise: f32, rng: &mut Rng, h: &mut [f32], out: &mut [f32]) {
        self.clean(z, h, out);
        let mut e = [0.0f32; 64];
        for (o, (m, s)) in out.chunks_mut(64).zip(self.mean.chunks(64).zip(self.inv_std.chunks(64)))
        {
            let e = &mut e[..o.len()];
            normals(rng, e);
            for j in 0..o.len() {
                o[j] = (o[j] - m[j]) * s[j] + noise * e[j];
            }
        }
    }
}

fn generate(
    spec: &SynthSpec,
    maps: &(ViewMap, ViewMap),
    rows: usize,
    split: u64,
) -> (Vec<f32>, Vec<f32>) {
    let (ma, mb) = maps;
    let k = spec.latent_dim;
    let mut a = vec![0.0f32; rows * spec.dim_a];
    let mut b = vec![0.0f32; rows * spec.dim_b];
    a.par_chunks_mut(BLOCK * spec.dim_a)
        .zip(b.par_chunks_mut(BLOCK * spec.dim_b))
        .enumerate()
        .for_each(|(block, (ca, cb))| {
            // Streams 0..16 are reserved for the maps; blocks of the two splits interleave after.
            let mut rng = Rng::stream(spec.seed, 16 + 2 * block as u64 + split);
            let mut z = vec![0.0f32; k];
            let mut h = vec![0.0f32; 2 * k];
            for (ra, rb) in ca.chunks_exact_mut(spec.dim_a).zip(cb.chunks_exact_mut(spec.dim_b)) {
                normals(&mut rng, &mut z);
                ma.sample(&z, spec.noise, &mut rng, &mut h, ra);
                mb.sample(&z, spec.noise, &mut rng, &mut h, rb);
            }
        });
    (a, b)
}

/// Generates the training and the held-out evaluation pairs of `spec`.
///
/// # Panics
/// If the spec is invalid; validate it first with [`SynthSpec::validate`] (as config loading
/// should) or call [`try_synth`].
pub fn synth(spec: &SynthSpec) -> (Dataset, Dataset) {
    try_synth(spec).unwrap_or_else(|e| panic!("{e}"))
}

/// Generates the training and the held-out evaluation pairs of `spec`, or says what is wrong
/// with the spec.
pub fn try_synth(spec: &SynthSpec) -> Result<(Dataset, Dataset), DataError> {
    spec.validate()?;
    let k = spec.latent_dim;
    let mut calib_rng = Rng::stream(spec.seed, 3);
    let calib: Vec<f32> = (0..CALIBRATION_ROWS * k).map(|_| calib_rng.normal() as f32).collect();
    let maps = (
        ViewMap::new(spec, spec.dim_a, &mut Rng::stream(spec.seed, 1), &calib),
        ViewMap::new(spec, spec.dim_b, &mut Rng::stream(spec.seed, 2), &calib),
    );
    let provenance = format!(
        "tessera synthetic latent-variable pairs: latent_dim={} dim_a={} dim_b={} noise={} seed={} nonlinear={} \
         n_train={} n_eval={}",
        spec.latent_dim,
        spec.dim_a,
        spec.dim_b,
        spec.noise,
        spec.seed,
        spec.nonlinear,
        spec.n_train,
        spec.n_eval
    );
    let mut out = Vec::with_capacity(2);
    for (split, rows, name) in [(0u64, spec.n_train, "synth-train"), (1, spec.n_eval, "synth-eval")]
    {
        let (a, b) = generate(spec, &maps, rows, split);
        out.push(
            Dataset::paired(spec.dim_a, spec.dim_b, a, b)?
                .with_name(name)
                .with_provenance(provenance.clone()),
        );
    }
    let eval = out.pop().ok_or_else(|| DataError::Synth("internal: eval split missing".into()))?;
    let train =
        out.pop().ok_or_else(|| DataError::Synth("internal: train split missing".into()))?;
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SynthSpec {
        SynthSpec { n_train: 3000, n_eval: 1000, ..SynthSpec::default() }
    }

    #[test]
    fn deterministic_and_seed_sensitive() {
        let (t1, e1) = try_synth(&small()).unwrap();
        let (t2, e2) = try_synth(&small()).unwrap();
        assert_eq!(t1.features_a(), t2.features_a());
        assert_eq!(t1.features_b(), t2.features_b());
        assert_eq!(e1.features_a(), e2.features_a());
        let (t3, _) = try_synth(&SynthSpec { seed: 1, ..small() }).unwrap();
        assert_ne!(t1.features_a(), t3.features_a());
        assert_ne!(t1.features_a()[..32], e1.features_a()[..32]);
        // Growing the training split keeps its prefix and leaves the eval split unchanged.
        let (t4, e4) = try_synth(&SynthSpec { n_train: 5000, ..small() }).unwrap();
        assert_eq!(t4.features_a()[..3000 * 32], t1.features_a()[..]);
        assert_eq!(e4.features_b(), e1.features_b());
        assert_eq!(t1.len(), 3000);
        assert_eq!(synth(&small()).0.features_b(), t1.features_b());
        assert_eq!(e1.len(), 1000);
    }

    #[test]
    fn features_are_standardised_signal_plus_noise() {
        let (t, _) = try_synth(&SynthSpec { n_train: 20_000, ..small() }).unwrap();
        let x = t.features_a();
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        // Unit-variance signal + 0.5 noise: variance 1.25.
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.25).abs() < 0.1, "var {var}");
    }

    #[test]
    fn spec_parses_with_defaults_and_rejects_unknown_keys() {
        let s: SynthSpec = toml::from_str("n_train = 100\nnoise = 0.25").unwrap();
        assert_eq!(s, SynthSpec { n_train: 100, noise: 0.25, ..SynthSpec::default() });
        let e = toml::from_str::<SynthSpec>("n_trian = 100").unwrap_err().to_string();
        assert!(e.contains("n_trian"), "{e}");
        let e = try_synth(&SynthSpec { dim_b: 0, ..small() }).unwrap_err().to_string();
        assert!(e.contains("data.synth.dim_b"), "{e}");
        let e = try_synth(&SynthSpec { noise: -1.0, ..small() }).unwrap_err().to_string();
        assert!(e.contains("data.synth.noise"), "{e}");
    }

    /// Solves the ridge normal equations (X^T X + l I) W = X^T Y in f64 by Gaussian elimination.
    fn ridge(x: &[f32], y: &[f32], n: usize, dx: usize, dy: usize, l: f64) -> Vec<f64> {
        let mut m = vec![0.0f64; dx * (dx + dy)];
        let w = dx + dy;
        for r in 0..n {
            let xr = &x[r * dx..(r + 1) * dx];
            let yr = &y[r * dy..(r + 1) * dy];
            for i in 0..dx {
                for j in 0..dx {
                    m[i * w + j] += xr[i] as f64 * xr[j] as f64;
                }
                for j in 0..dy {
                    m[i * w + dx + j] += xr[i] as f64 * yr[j] as f64;
                }
            }
        }
        for i in 0..dx {
            m[i * w + i] += l;
        }
        for c in 0..dx {
            let p = m[c * w + c];
            for j in 0..w {
                m[c * w + j] /= p;
            }
            for r in 0..dx {
                if r != c {
                    let f = m[r * w + c];
                    for j in 0..w {
                        m[r * w + j] -= f * m[c * w + j];
                    }
                }
            }
        }
        (0..dx).flat_map(|i| (0..dy).map(move |j| (i, j))).map(|(i, j)| m[i * w + dx + j]).collect()
    }

    /// Recall@1 of predicting view b from view a with a linear map fitted on the training split:
    /// a lower bound on what a trained encoder can reach. Chance is 1/1000.
    fn linear_recall_at_1(spec: &SynthSpec) -> f64 {
        let (t, e) = synth(spec);
        let (da, db) = (spec.dim_a, spec.dim_b);
        let w = ridge(t.features_a(), t.features_b(), t.len(), da, db, 1.0);
        let norm = |v: &mut [f64]| {
            let s = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= s);
        };
        let n = e.len();
        let preds: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                let a = e.row_a(i);
                let mut p: Vec<f64> =
                    (0..db).map(|j| (0..da).map(|k| a[k] as f64 * w[k * db + j]).sum()).collect();
                norm(&mut p);
                p
            })
            .collect();
        let targets: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                let mut b: Vec<f64> = e.row_b(i).iter().map(|&v| v as f64).collect();
                norm(&mut b);
                b
            })
            .collect();
        let hits = (0..n)
            .filter(|&i| {
                let score =
                    |j: usize| preds[i].iter().zip(&targets[j]).map(|(a, b)| a * b).sum::<f64>();
                let own = score(i);
                (0..n).all(|j| j == i || score(j) < own)
            })
            .count();
        hits as f64 / n as f64
    }

    #[test]
    fn default_task_is_learnable_but_not_trivial() {
        let spec = SynthSpec { n_train: 8000, ..SynthSpec::default() };
        let r = linear_recall_at_1(&spec);
        // Chance is 0.001; a linear map already gets far above it, but the noise keeps it well
        // short of perfect, leaving room for a nonlinear encoder.
        assert!(r > 0.1 && r < 0.8, "linear recall@1 {r}");
        let noisy = linear_recall_at_1(&SynthSpec { noise: 2.0, ..spec });
        assert!(noisy < r, "more noise must be harder: {noisy} vs {r}");
    }
}
