//! Naive f64 reference implementations of the kernels, for tests.

pub fn matmul(a: &[f64], b: &[f64], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = s;
        }
    }
    c
}

pub fn gelu(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

pub fn layernorm(x: &[f64], g: &[f64], b: &[f64], rows: usize, cols: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; rows * cols];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let mu = xr.iter().sum::<f64>() / cols as f64;
        let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / cols as f64;
        for c in 0..cols {
            y[r * cols + c] = (xr[c] - mu) / (var + eps).sqrt() * g[c] + b[c];
        }
    }
    y
}

pub fn l2_normalize(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * cols];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let n = xr.iter().map(|v| v * v).sum::<f64>().sqrt();
        for c in 0..cols {
            y[r * cols + c] = xr[c] / n;
        }
    }
    y
}

/// Σ_r (lse(row) − row\[label\]).
pub fn xent_sum(logits: &[f64], labels: &[u32], rows: usize, cols: usize) -> f64 {
    let mut s = 0.0;
    for r in 0..rows {
        let lr = &logits[r * cols..(r + 1) * cols];
        let mx = lr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + lr.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        s += lse - lr[labels[r] as usize];
    }
    s
}

/// Central finite-difference gradient of `f` at `x`.
pub fn fd_grad(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

pub fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` elementwise.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w} (err {err})");
    }
}
