//! Problems whose per-example gradient mean G and covariance Σ are known exactly
//! (ALGORITHMS.md §5), and a driver that measures them through [`GnsEstimator`] with the
//! parameters frozen, as Tessera's training loop would: partial gradient buffers scaled by
//! 1/B_global, a summing all-reduce, uneven local batches and micro-batches.

use tessera_collectives::threads::ThreadComm;
use tessera_collectives::{Communicator, ReduceOp};

use super::{GnsConfig, GnsError, GnsEstimator, GnsReport};
use crate::rng::Rng;

/// Standard normals by Box-Muller, using both values of each pair (half the cost of
/// [`Rng::normal`], which the simulations below spend most of their time in).
#[derive(Default)]
struct NormalPairs {
    spare: Option<f64>,
}

impl NormalPairs {
    fn next(&mut self, rng: &mut Rng) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * (1.0 - rng.uniform()).ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * rng.uniform()).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

/// A loss at frozen parameters whose per-example gradients can be drawn and whose gradient
/// statistics are known in closed form, coordinate by coordinate.
pub trait FrozenProblem: Sync {
    /// Number of parameters.
    fn dim(&self) -> usize;
    /// Exact tr Σ restricted to coordinates `[offset, offset + len)`.
    fn trace_sigma(&self, offset: usize, len: usize) -> f64;
    /// Exact |G|² restricted to coordinates `[offset, offset + len)`.
    fn grad_sq(&self, offset: usize, len: usize) -> f64;
    /// Adds `scale`·Σ of `b` fresh i.i.d. per-example gradients to `out` (`dim()` values).
    fn add_grad_sum(&self, rng: &mut Rng, b: usize, scale: f64, out: &mut [f32]);

    /// The exact simple noise scale tr Σ / |G|².
    fn true_b_simple(&self) -> f64 {
        self.trace_sigma(0, self.dim()) / self.grad_sq(0, self.dim())
    }
    /// The exact simple noise scale of one parameter group.
    fn true_group_b_simple(&self, offset: usize, len: usize) -> f64 {
        self.trace_sigma(offset, len) / self.grad_sq(offset, len)
    }
}

/// Mean estimation: ℓ(θ; x) = ½|θ − x|², x ~ N(μ, σ²·I_d), with θ − μ = (dist/√d)·(1, …, 1).
/// G = θ − μ, Σ = σ²·I_d, B_simple = d·σ²/dist².
#[derive(Clone, Debug)]
pub struct MeanEstimation {
    pub d: usize,
    pub sigma: f64,
    /// |θ − μ|.
    pub dist: f64,
}

impl MeanEstimation {
    fn g(&self) -> f64 {
        self.dist / (self.d as f64).sqrt()
    }
}

impl FrozenProblem for MeanEstimation {
    fn dim(&self) -> usize {
        self.d
    }
    fn trace_sigma(&self, _offset: usize, len: usize) -> f64 {
        len as f64 * self.sigma * self.sigma
    }
    fn grad_sq(&self, _offset: usize, len: usize) -> f64 {
        len as f64 * self.g() * self.g()
    }
    fn add_grad_sum(&self, rng: &mut Rng, b: usize, scale: f64, out: &mut [f32]) {
        // Per-example gradient θ − x = (θ − μ) − σ·z with z ~ N(0, I). The sum of b of them is
        // exactly N(b·(θ − μ), b·σ²·I), so it is drawn directly: the same distribution as
        // summing b draws, b times cheaper.
        let g = self.g();
        let sd = self.sigma * (b as f64).sqrt();
        let mut pair = NormalPairs::default();
        for o in out.iter_mut().take(self.d) {
            *o += (scale * (b as f64 * g - sd * pair.next(rng))) as f32;
        }
    }
}

/// Linear regression y = w*ᵀx + ε with x ~ N(0, Λ) (Λ diagonal), ε ~ N(0, σ²),
/// ℓ = ½(wᵀx − y)², at e = w − w*: the per-example gradient is (xᵀe − ε)·x, G = Λe and
/// tr Σ = (eᵀΛe + σ²)·tr Λ + |Λe|². Isotropic (Λ = I): B_simple = ((d + 1)|e|² + dσ²)/|e|².
#[derive(Clone, Debug)]
pub struct Regression {
    /// The diagonal of Λ.
    pub lambda: Vec<f64>,
    /// e = w − w*.
    pub e: Vec<f64>,
    pub sigma: f64,
}

impl Regression {
    /// Λ = I_d and e = (|e|/√d)·(1, …, 1).
    pub fn isotropic(d: usize, sigma: f64, e_norm: f64) -> Self {
        Regression { lambda: vec![1.0; d], e: vec![e_norm / (d as f64).sqrt(); d], sigma }
    }

    /// The textbook isotropic formula ((d + 1)|e|² + dσ²)/|e|², independent of the code above.
    pub fn isotropic_b_simple(d: usize, sigma: f64, e_norm: f64) -> f64 {
        let (d, e2) = (d as f64, e_norm * e_norm);
        ((d + 1.0) * e2 + d * sigma * sigma) / e2
    }

    fn e_lambda_e(&self) -> f64 {
        self.lambda.iter().zip(&self.e).map(|(l, e)| l * e * e).sum()
    }

    /// The Hessian-weighted noise scale B_noise = tr(HΣ)/(GᵀHG) with H = Λ:
    /// [(eᵀΛe + σ²)·tr Λ² + eᵀΛ³e] / eᵀΛ³e. It differs from B_simple unless Λ ∝ I; Tessera
    /// measures B_simple.
    pub fn b_noise(&self) -> f64 {
        let tr_l2: f64 = self.lambda.iter().map(|l| l * l).sum();
        let e_l3_e: f64 = self.lambda.iter().zip(&self.e).map(|(l, e)| l * l * l * e * e).sum();
        ((self.e_lambda_e() + self.sigma * self.sigma) * tr_l2 + e_l3_e) / e_l3_e
    }
}

impl FrozenProblem for Regression {
    fn dim(&self) -> usize {
        self.lambda.len()
    }
    fn trace_sigma(&self, offset: usize, len: usize) -> f64 {
        // Var[(xᵀe − ε)·x_j] = (eᵀΛe + σ²)·λ_j + (λ_j e_j)² for Gaussian x.
        let c = self.e_lambda_e() + self.sigma * self.sigma;
        (offset..offset + len)
            .map(|j| {
                let le = self.lambda[j] * self.e[j];
                c * self.lambda[j] + le * le
            })
            .sum()
    }
    fn grad_sq(&self, offset: usize, len: usize) -> f64 {
        (offset..offset + len)
            .map(|j| {
                let le = self.lambda[j] * self.e[j];
                le * le
            })
            .sum()
    }
    fn add_grad_sum(&self, rng: &mut Rng, b: usize, scale: f64, out: &mut [f32]) {
        let d = self.dim();
        let sd: Vec<f64> = self.lambda.iter().map(|l| l.sqrt()).collect();
        let mut x = vec![0.0f64; d];
        let mut sum = vec![0.0f64; d];
        let mut pair = NormalPairs::default();
        for _ in 0..b {
            let mut r = -self.sigma * pair.next(rng);
            for ((xj, s), e) in x.iter_mut().zip(&sd).zip(&self.e) {
                *xj = s * pair.next(rng);
                r += *xj * e;
            }
            for (acc, xj) in sum.iter_mut().zip(&x) {
                *acc += r * xj;
            }
        }
        for (o, s) in out.iter_mut().zip(&sum) {
            *o += (scale * s) as f32;
        }
    }
}

/// One rank's part of a frozen measurement run.
#[derive(Clone, Debug)]
pub struct FrozenRun {
    pub steps: u64,
    /// This rank's examples per step.
    pub local_batch: usize,
    /// Micro-batches per step on this rank (1: no accumulation); the local batch is split as
    /// evenly as possible, the remainder going to the first micro-batches.
    pub micro_batches: usize,
    /// Examples per step over all ranks.
    pub global_batch: usize,
    pub seed: u64,
}

/// Runs `run.steps` frozen steps of `problem` on this rank the way the training loop does
/// (partial buffers, summing all-reduce, [`GnsEstimator`] calls around it) and returns every
/// step's report. Collective: every rank of `comm` calls it with the same steps and groups.
pub fn run_frozen(
    problem: &dyn FrozenProblem,
    comm: &mut dyn Communicator,
    groups: &[(usize, usize)],
    cfg: &GnsConfig,
    run: &FrozenRun,
) -> Result<Vec<GnsReport>, GnsError> {
    let mut est = GnsEstimator::new(cfg, groups)?;
    let mut rng = Rng::stream(run.seed, comm.rank() as u64);
    let mut grads = vec![0.0f32; problem.dim()];
    let scale = 1.0 / run.global_batch as f64;
    let micro = run.micro_batches.max(1);
    let mut reports = Vec::with_capacity(run.steps as usize);
    for _ in 0..run.steps {
        grads.fill(0.0);
        if micro == 1 {
            problem.add_grad_sum(&mut rng, run.local_batch, scale, &mut grads);
            est.observe_local(&grads, run.local_batch, run.global_batch)?;
        } else {
            for m in 0..micro {
                let b = run.local_batch / micro + usize::from(m < run.local_batch % micro);
                problem.add_grad_sum(&mut rng, b, scale, &mut grads);
                est.observe_accumulated(&grads, b, run.global_batch)?;
            }
        }
        comm.all_reduce_f32(&mut grads, ReduceOp::Sum)?;
        reports.extend(est.finish_step(comm, &grads, run.global_batch)?);
    }
    reports.extend(est.flush(comm)?);
    Ok(reports)
}

/// [`run_frozen`] with ranks as threads of this process: `local_batches[r]` examples on rank
/// r, each split into `micro_batches`. Returns rank 0's reports (every rank's are identical).
pub fn run_frozen_threads(
    problem: &dyn FrozenProblem,
    local_batches: &[usize],
    micro_batches: usize,
    steps: u64,
    groups: &[(usize, usize)],
    cfg: &GnsConfig,
    seed: u64,
) -> Result<Vec<GnsReport>, GnsError> {
    let global_batch: usize = local_batches.iter().sum();
    let results = ThreadComm::run_group(local_batches.len(), |rank, comm| {
        let local_batch = local_batches[rank];
        let run = FrozenRun { steps, local_batch, micro_batches, global_batch, seed };
        run_frozen(problem, comm, groups, cfg, &run)
    });
    let mut first = None;
    for r in results {
        let r = r?;
        first.get_or_insert(r);
    }
    Ok(first.unwrap_or_default())
}
