//! The CPU implementation of [`Device`].

use super::{Device, L2_NORM_EPS, XentOut};
use gemm::Parallelism;
use std::time::Instant;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// CPU kernels. GEMMs run on a private rayon pool of `threads` threads (none when 1), so a
/// rank process never uses more cores than it was given.
pub struct CpuDevice {
    threads: usize,
    pool: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuDevice").field("threads", &self.threads).finish()
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new(1)
    }
}

impl CpuDevice {
    /// A CPU device using `threads` threads for GEMMs (0 is treated as 1). If the thread pool
    /// cannot be created the device falls back to one thread.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let pool = if threads > 1 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("tessera-gemm-{i}"))
                .build()
                .ok()
        } else {
            None
        };
        let threads = if pool.is_some() { threads } else { 1 };
        CpuDevice { threads, pool }
    }
}

fn check(kernel: &str, arg: &str, got: usize, want: usize) {
    assert!(
        got == want,
        "{kernel}: argument `{arg}` has {got} elements, expected {want} from the given dimensions"
    );
}

/// `exp(x)` in f32 without a libm call, so loops over it vectorise: range reduction
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, a degree-6 Taylor polynomial for `exp(r)` (relative
/// error below 2e-7) and `2ⁿ` built in the exponent bits. Inputs are clamped to
/// `[-87, 88]` (results below `f32::MIN_POSITIVE` are not needed by its callers).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    // t = 1.5·2²³ + n exactly, so n sits in the low mantissa bits of t: integer operations
    // only (a saturating `as i32` cast would not vectorise).
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// `tanh(u) = (e − 1)/(e + 1)` with `e = exp(2u)`; absolute error below 5e-7.
#[inline(always)]
fn fast_tanh(u: f32) -> f32 {
    let e = fast_exp(2.0 * u.clamp(-9.0, 9.0));
    (e - 1.0) / (e + 1.0)
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    0.5 * x * (1.0 + fast_tanh(u))
}

#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    let th = fast_tanh(u);
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x)
}

impl Device for CpuDevice {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu(threads={})", self.threads)
    }

    fn threads(&self) -> usize {
        self.threads
    }

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn host_vec(&self, buf: Vec<f32>) -> Vec<f32> {
        buf
    }

    fn copy(&self, x: &[f32], y: &mut [f32]) {
        check("copy", "x", x.len(), y.len());
        y.copy_from_slice(x);
    }

    fn gemm(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &mut [f32],
    ) {
        check("gemm", "a", a.len(), m * k);
        check("gemm", "b", b.len(), k * n);
        check("gemm", "c", c.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            // op(A)·op(B) is the zero matrix.
            if beta == 0.0 {
                c.fill(0.0);
            } else {
                self.scale(beta, c);
            }
            return;
        }
        let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
        let par = match &self.pool {
            Some(_) => Parallelism::Rayon(self.threads),
            None => Parallelism::None,
        };
        let mut run = || {
            // SAFETY: the lengths were checked above, so every element addressed through the
            // strides (row-major, or transposed row-major) lies inside its slice; `c` is a
            // unique borrow and does not alias `a` or `b`.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    beta != 0.0,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    beta,
                    alpha,
                    false,
                    false,
                    false,
                    par,
                )
            }
        };
        match &self.pool {
            Some(pool) => pool.install(run),
            None => run(),
        }
    }

    fn bias_add(&self, y: &mut [f32], bias: &[f32], rows: usize, cols: usize) {
        check("bias_add", "y", y.len(), rows * cols);
        check("bias_add", "bias", bias.len(), cols);
        for row in y.chunks_exact_mut(cols.max(1)) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }

    fn bias_grad(&self, dy: &[f32], rows: usize, cols: usize, dbias: &mut [f32]) {
        check("bias_grad", "dy", dy.len(), rows * cols);
        check("bias_grad", "dbias", dbias.len(), cols);
        for row in dy.chunks_exact(cols.max(1)) {
            for (g, d) in dbias.iter_mut().zip(row) {
                *g += d;
            }
        }
    }

    fn gelu_fwd(&self, x: &[f32], y: &mut [f32]) {
        check("gelu_fwd", "y", y.len(), x.len());
        for (o, &v) in y.iter_mut().zip(x) {
            *o = gelu(v);
        }
    }

    fn gelu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        check("gelu_bwd", "dy", dy.len(), x.len());
        check("gelu_bwd", "dx", dx.len(), x.len());
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *o = g * gelu_grad(v);
        }
    }

    fn relu_fwd(&self, x: &[f32], y: &mut [f32]) {
        check("relu_fwd", "y", y.len(), x.len());
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v.max(0.0);
        }
    }

    fn relu_bwd(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        check("relu_bwd", "dy", dy.len(), x.len());
        check("relu_bwd", "dx", dx.len(), x.len());
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *o = if v > 0.0 { g } else { 0.0 };
        }
    }

    fn layernorm_fwd(
        &self,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        rows: usize,
        cols: usize,
        eps: f32,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) {
        check("layernorm_fwd", "x", x.len(), rows * cols);
        check("layernorm_fwd", "y", y.len(), rows * cols);
        check("layernorm_fwd", "gamma", gamma.len(), cols);
        check("layernorm_fwd", "beta", beta.len(), cols);
        check("layernorm_fwd", "mean", mean.len(), rows);
        check("layernorm_fwd", "rstd", rstd.len(), rows);
        if cols == 0 {
            return;
        }
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            let (mu, rs) = (mu as f32, rs as f32);
            mean[r] = mu;
            rstd[r] = rs;
            let yr = &mut y[r * cols..(r + 1) * cols];
            for c in 0..cols {
                yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
            }
        }
    }

    fn layernorm_bwd(
        &self,
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        check("layernorm_bwd", "x", x.len(), rows * cols);
        check("layernorm_bwd", "dy", dy.len(), rows * cols);
        check("layernorm_bwd", "dx", dx.len(), rows * cols);
        check("layernorm_bwd", "gamma", gamma.len(), cols);
        check("layernorm_bwd", "dgamma", dgamma.len(), cols);
        check("layernorm_bwd", "dbeta", dbeta.len(), cols);
        check("layernorm_bwd", "mean", mean.len(), rows);
        check("layernorm_bwd", "rstd", rstd.len(), rows);
        if cols == 0 {
            return;
        }
        let inv_n = 1.0 / cols as f32;
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let dyr = &dy[r * cols..(r + 1) * cols];
            let (mu, rs) = (mean[r], rstd[r]);
            // g = dy ⊙ γ; dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))
            let mut sum_g = 0.0f32;
            let mut sum_gx = 0.0f32;
            for c in 0..cols {
                let xh = (xr[c] - mu) * rs;
                let g = dyr[c] * gamma[c];
                sum_g += g;
                sum_gx += g * xh;
                dgamma[c] += dyr[c] * xh;
                dbeta[c] += dyr[c];
            }
            let (mg, mgx) = (sum_g * inv_n, sum_gx * inv_n);
            let dxr = &mut dx[r * cols..(r + 1) * cols];
            for c in 0..cols {
                let xh = (xr[c] - mu) * rs;
                dxr[c] = rs * (dyr[c] * gamma[c] - mg - xh * mgx);
            }
        }
    }

    fn add_inplace(&self, y: &mut [f32], x: &[f32]) {
        check("add_inplace", "x", x.len(), y.len());
        for (o, v) in y.iter_mut().zip(x) {
            *o += v;
        }
    }

    fn l2_normalize_fwd(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        y: &mut [f32],
        norms: &mut [f32],
    ) {
        check("l2_normalize_fwd", "x", x.len(), rows * cols);
        check("l2_normalize_fwd", "y", y.len(), rows * cols);
        check("l2_normalize_fwd", "norms", norms.len(), rows);
        if cols == 0 {
            return;
        }
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            let n = (xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32)
                .max(L2_NORM_EPS);
            norms[r] = n;
            let inv = 1.0 / n;
            for (o, v) in y[r * cols..(r + 1) * cols].iter_mut().zip(xr) {
                *o = v * inv;
            }
        }
    }

    fn l2_normalize_bwd(
        &self,
        y: &[f32],
        norms: &[f32],
        dy: &[f32],
        rows: usize,
        cols: usize,
        dx: &mut [f32],
    ) {
        check("l2_normalize_bwd", "y", y.len(), rows * cols);
        check("l2_normalize_bwd", "dy", dy.len(), rows * cols);
        check("l2_normalize_bwd", "dx", dx.len(), rows * cols);
        check("l2_normalize_bwd", "norms", norms.len(), rows);
        if cols == 0 {
            return;
        }
        for r in 0..rows {
            let yr = &y[r * cols..(r + 1) * cols];
            let dyr = &dy[r * cols..(r + 1) * cols];
            let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
            let inv = 1.0 / norms[r];
            for c in 0..cols {
                dx[r * cols + c] = (dyr[c] - yr[c] * dot) * inv;
            }
        }
    }

    fn softmax_xent(
        &self,
        logits: &[f32],
        labels: &[u32],
        rows: usize,
        cols: usize,
        grad_scale: f32,
        dlogits: &mut [f32],
    ) -> XentOut {
        check("softmax_xent", "logits", logits.len(), rows * cols);
        check("softmax_xent", "dlogits", dlogits.len(), rows * cols);
        check("softmax_xent", "labels", labels.len(), rows);
        let mut loss_sum = 0.0f64;
        let mut correct = 0usize;
        if cols == 0 {
            return XentOut { loss_sum, correct };
        }
        for r in 0..rows {
            let lr = &logits[r * cols..(r + 1) * cols];
            let label = labels[r] as usize;
            assert!(label < cols, "softmax_xent: label {label} in row {r} is not < {cols} classes");
            let mut arg = 0usize;
            for c in 1..cols {
                if lr[c] > lr[arg] {
                    arg = c;
                }
            }
            if arg == label {
                correct += 1;
            }
            let mx = lr[arg] as f64;
            let z: f64 = lr.iter().map(|&v| (v as f64 - mx).exp()).sum();
            let lse = mx + z.ln();
            loss_sum += lse - lr[label] as f64;
            let dr = &mut dlogits[r * cols..(r + 1) * cols];
            for c in 0..cols {
                let p = (lr[c] as f64 - lse).exp() as f32;
                dr[c] = grad_scale * (p - if c == label { 1.0 } else { 0.0 });
            }
        }
        XentOut { loss_sum, correct }
    }

    fn sq_norm(&self, x: &[f32]) -> f64 {
        x.iter().map(|&v| v as f64 * v as f64).sum()
    }

    fn axpy(&self, alpha: f32, x: &[f32], y: &mut [f32]) {
        check("axpy", "x", x.len(), y.len());
        for (o, v) in y.iter_mut().zip(x) {
            *o += alpha * v;
        }
    }

    fn scale(&self, alpha: f32, x: &mut [f32]) {
        for v in x.iter_mut() {
            *v *= alpha;
        }
    }
}

/// Single-precision GEMM throughput of [`CpuDevice::gemm`] on `n × n` matrices with `threads`
/// threads: the best of `reps` timed runs (after one warm-up), in GFLOP/s (2·n³ flops per run).
/// Returns 0 for `n == 0`.
pub fn sgemm_gflops(n: usize, threads: usize, reps: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let dev = CpuDevice::new(threads);
    let mut rng = crate::rng::Rng::new(0x6e6d);
    let a: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32 - 0.5).collect();
    let mut c = vec![0.0f32; n * n];
    dev.gemm(false, false, n, n, n, 1.0, &a, &b, 0.0, &mut c);
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dev.gemm(false, false, n, n, n, 1.0, &a, &b, 0.0, &mut c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best.max(1e-12) / 1e9
}
