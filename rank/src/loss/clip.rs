//! The symmetric CLIP / InfoNCE loss over an all-gathered global batch (ALGORITHMS.md §2).
//!
//! Logits `x_ij = s·⟨I_i, T_j⟩`, positives on the diagonal,
//! `L = 1/(2B)·[Σ_i (ℓ_i − x_ii) + Σ_j (κ_j − x_jj)]` with row LSEs `ℓ` and column LSEs `κ`
//! over the whole global batch. `G_ij = (P_ij + Q_ij − 2δ_ij)/(2B)`.
//!
//! This is the naive loss: a rank materialises `b_local × B` logits (one row block and one
//! column block) plus a row-chunked pass over the whole `B × B` matrix for the LSEs, never
//! more than `CHUNK × B` at once. The tiled ring loss replaces it later.
//!
//! Precision: logits come from an f32 GEMM; differences `x − lse` are formed in f64, the
//! exponentials (all of arguments ≤ 0) in f32, and every sum is accumulated in f64.

use crate::device::{CpuDevice, Device, fast_exp};

/// Rows per chunk of the statistics pass.
const CHUNK: usize = 256;

/// Lanes of the explicit reductions below: float sums are not reassociated by the compiler,
/// so the loops accumulate into `LANES` independent partial sums to let it vectorise them.
const LANES: usize = 8;

/// One rank's result of [`clip_loss_local`].
#[derive(Clone, Debug, PartialEq)]
pub struct ClipOut {
    /// The GLOBAL loss (bitwise the same on every rank given the same gathered features).
    pub loss: f32,
    /// `∂L/∂I_i` for this rank's rows (`b_local × d`).
    pub d_img_local: Vec<f32>,
    /// `∂L/∂T_j` for this rank's rows (`b_local × d`).
    pub d_txt_local: Vec<f32>,
    /// This rank's share of `∂L/∂t` (`Σ_{i local} Σ_j G_ij x_ij`): the sum over ranks is
    /// exactly `∂L/∂t`.
    pub d_t_partial: f32,
}

/// `Σ_j exp(x_j − m)`, exponentials in f32 (all arguments ≤ 0), sums in f64.
fn sum_exp_shifted(xr: &[f32], m: f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = xr.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += fast_exp(c[k] - m) as f64;
        }
    }
    let tail: f64 = rest.iter().map(|&v| fast_exp(v - m) as f64).sum();
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn g_entry(x: f64, row_lse: f64, col_lse: f64, inv2b: f64) -> f64 {
    (fast_exp((x - row_lse) as f32) as f64 + fast_exp((x - col_lse) as f32) as f64) * inv2b
}

/// Overwrites the logits `xr` of row `i` (over the columns whose LSEs are `col_lse`) with
/// `G_ij = (P_ij + Q_ij − 2δ_ij)/(2B)`, `diag` being the position of column `i` in `xr` if
/// present, and returns `Σ_j G_ij x_ij`.
fn g_row(xr: &mut [f32], row_lse: f64, col_lse: &[f64], diag: Option<usize>, inv2b: f64) -> f64 {
    let x_diag = diag.map(|j| xr[j] as f64);
    let mut acc = [0.0f64; LANES];
    let mut xs = xr.chunks_exact_mut(LANES);
    let mut ks = col_lse.chunks_exact(LANES);
    for (xc, kc) in (&mut xs).zip(&mut ks) {
        for k in 0..LANES {
            let x = xc[k] as f64;
            let g = g_entry(x, row_lse, kc[k], inv2b);
            acc[k] += g * x;
            xc[k] = g as f32;
        }
    }
    let mut sum = 0.0f64;
    for (v, &kj) in xs.into_remainder().iter_mut().zip(ks.remainder()) {
        let x = *v as f64;
        let g = g_entry(x, row_lse, kj, inv2b);
        sum += g * x;
        *v = g as f32;
    }
    sum += acc.iter().sum::<f64>();
    if let (Some(j), Some(xd)) = (diag, x_diag) {
        xr[j] = (xr[j] as f64 - 2.0 * inv2b) as f32;
        sum -= 2.0 * inv2b * xd;
    }
    sum
}

/// Row and column log-sum-exps of `X = scale·I·Tᵀ` over the whole `B × B` matrix, and the
/// loss.
fn stats(
    dev: &CpuDevice,
    img: &[f32],
    txt: &[f32],
    big_b: usize,
    d: usize,
    scale: f32,
) -> (Vec<f64>, Vec<f64>, f64) {
    let mut row_lse = vec![0.0f64; big_b];
    // Running column maxima (maxima of f32 values, so exact in f32) and rescaled sums.
    let mut col_m = vec![f32::NEG_INFINITY; big_b];
    let mut col_z = vec![0.0f64; big_b];
    let mut diag_sum = 0.0f64;
    let mut buf = vec![0.0f32; CHUNK.min(big_b) * big_b];
    let mut chunk_max = vec![0.0f32; big_b];
    let mut r0 = 0;
    while r0 < big_b {
        let rows = CHUNK.min(big_b - r0);
        let x = &mut buf[..rows * big_b];
        let img_rows = &img[r0 * d..(r0 + rows) * d];
        dev.gemm(false, true, rows, big_b, d, scale, img_rows, txt, 0.0, x);
        chunk_max.fill(f32::NEG_INFINITY);
        for (i, xr) in x.chunks_exact(big_b).enumerate() {
            let m = xr.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            row_lse[r0 + i] = m as f64 + sum_exp_shifted(xr, m).ln();
            diag_sum += xr[r0 + i] as f64;
            for (cm, &v) in chunk_max.iter_mut().zip(xr) {
                *cm = cm.max(v);
            }
        }
        for ((z, m), &cm) in col_z.iter_mut().zip(col_m.iter_mut()).zip(&chunk_max) {
            let m_new = m.max(cm);
            if *z != 0.0 {
                *z *= (*m as f64 - m_new as f64).exp();
            }
            *m = m_new;
        }
        for xr in x.chunks_exact(big_b) {
            for ((z, &m), &v) in col_z.iter_mut().zip(&col_m).zip(xr) {
                *z += fast_exp(v - m) as f64;
            }
        }
        r0 += rows;
    }
    let col_lse: Vec<f64> = col_m.iter().zip(&col_z).map(|(&m, z)| m as f64 + z.ln()).collect();
    let loss = (row_lse.iter().sum::<f64>() + col_lse.iter().sum::<f64>() - 2.0 * diag_sum)
        / (2.0 * big_b as f64);
    (row_lse, col_lse, loss)
}

/// The symmetric CLIP loss for data parallelism. `img_all` and `txt_all` are the all-gathered,
/// L2-normalised features (`big_b × d`, rows in rank order); this rank owns rows
/// `row_offset .. row_offset + b_local`; `scale = s = exp(t)`.
///
/// Returns the global loss and this rank's gradients (see [`ClipOut`]): summing the parameter
/// gradients backpropagated from `d_img_local`/`d_txt_local` over ranks, and `d_t_partial`
/// over ranks, gives one process's gradient on the global batch.
///
/// # Panics
/// When the slice lengths do not match `big_b × d` or the row range exceeds `big_b`.
pub fn clip_loss_local(
    img_all: &[f32],
    txt_all: &[f32],
    big_b: usize,
    d: usize,
    row_offset: usize,
    b_local: usize,
    scale: f32,
) -> ClipOut {
    assert_eq!(
        img_all.len(),
        big_b * d,
        "clip_loss_local: img_all has {} values, expected {big_b} x {d}",
        img_all.len()
    );
    assert_eq!(
        txt_all.len(),
        big_b * d,
        "clip_loss_local: txt_all has {} values, expected {big_b} x {d}",
        txt_all.len()
    );
    assert!(
        row_offset + b_local <= big_b,
        "clip_loss_local: rows {row_offset}..{} exceed the global batch {big_b}",
        row_offset + b_local
    );
    if big_b == 0 {
        return ClipOut {
            loss: 0.0,
            d_img_local: Vec::new(),
            d_txt_local: Vec::new(),
            d_t_partial: 0.0,
        };
    }
    let dev = CpuDevice::new(1);
    let (row_lse, col_lse, loss) = stats(&dev, img_all, txt_all, big_b, d, scale);
    let inv2b = 1.0 / (2.0 * big_b as f64);
    let rows = row_offset..row_offset + b_local;
    let mut d_t = 0.0f64;
    let col_lse_local = &col_lse[rows.clone()];
    let (d_img_local, d_txt_local) = naive_blocks(
        &dev,
        img_all,
        txt_all,
        d,
        rows.clone(),
        scale,
        |i, xr| d_t += g_row(xr, row_lse[i], &col_lse, Some(i), inv2b),
        |i, xr| {
            let diag = rows.contains(&i).then(|| i - row_offset);
            g_row(xr, row_lse[i], col_lse_local, diag, inv2b);
        },
    );

    ClipOut { loss: loss as f32, d_img_local, d_txt_local, d_t_partial: d_t as f32 }
}

/// The two blocks of logits a naive loss materialises on a rank that owns `rows` of the
/// all-gathered `img_all` / `txt_all` (`B × d` each). The row block, `x = s·I_rows·Tᵀ`: `row(i,
/// x_i)` overwrites global row `i`'s logits with G, then `∂L/∂I_rows = s·G·T`. The column
/// block, `x = s·I·T_rowsᵀ`: `col(i, x_i)` overwrites row `i`'s logits against this rank's
/// columns with G, then `∂L/∂T_rows = s·Gᵀ·I`. Returns `(∂L/∂I_rows, ∂L/∂T_rows)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn naive_blocks(
    dev: &CpuDevice,
    img_all: &[f32],
    txt_all: &[f32],
    d: usize,
    rows: std::ops::Range<usize>,
    scale: f32,
    mut row: impl FnMut(usize, &mut [f32]),
    mut col: impl FnMut(usize, &mut [f32]),
) -> (Vec<f32>, Vec<f32>) {
    let (big_b, b_local) = (img_all.len() / d.max(1), rows.len());
    let img_local = &img_all[rows.start * d..rows.end * d];
    let txt_local = &txt_all[rows.start * d..rows.end * d];
    let mut d_img_local = vec![0.0f32; b_local * d];
    let mut d_txt_local = vec![0.0f32; b_local * d];
    if b_local == 0 || big_b == 0 {
        return (d_img_local, d_txt_local);
    }
    let mut x = vec![0.0f32; b_local * big_b];
    dev.gemm(false, true, b_local, big_b, d, scale, img_local, txt_all, 0.0, &mut x);
    for (li, xr) in x.chunks_exact_mut(big_b).enumerate() {
        row(rows.start + li, xr);
    }
    dev.gemm(false, false, b_local, d, big_b, scale, &x, txt_all, 0.0, &mut d_img_local);
    drop(x);
    let mut xc = vec![0.0f32; big_b * b_local];
    dev.gemm(false, true, big_b, b_local, d, scale, img_all, txt_local, 0.0, &mut xc);
    for (i, xr) in xc.chunks_exact_mut(b_local).enumerate() {
        col(i, xr);
    }
    dev.gemm(true, false, b_local, d, big_b, scale, &xc, img_all, 0.0, &mut d_txt_local);
    (d_img_local, d_txt_local)
}

/// Naive one-process f64 reference: `(L, ∂L/∂I, ∂L/∂T, ∂L/∂t)` for `B × d` features and
/// scale `s`.
pub fn clip_loss_reference_f64(
    img: &[f64],
    txt: &[f64],
    big_b: usize,
    d: usize,
    scale: f64,
) -> (f64, Vec<f64>, Vec<f64>, f64) {
    let n = big_b;
    let mut x = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            x[i * n + j] = scale * (0..d).map(|k| img[i * d + k] * txt[j * d + k]).sum::<f64>();
        }
    }
    let lse = |it: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = it.collect();
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|a| (a - m).exp()).sum::<f64>().ln()
    };
    let row: Vec<f64> = (0..n).map(|i| lse(&mut (0..n).map(|j| x[i * n + j]))).collect();
    let col: Vec<f64> = (0..n).map(|j| lse(&mut (0..n).map(|i| x[i * n + j]))).collect();
    let mut loss = 0.0;
    for i in 0..n {
        loss += row[i] + col[i] - 2.0 * x[i * n + i];
    }
    loss /= 2.0 * n as f64;
    let mut di = vec![0.0; n * d];
    let mut dt_feat = vec![0.0; n * d];
    let mut dt = 0.0;
    for i in 0..n {
        for j in 0..n {
            let xv = x[i * n + j];
            let g = ((xv - row[i]).exp() + (xv - col[j]).exp() - if i == j { 2.0 } else { 0.0 })
                / (2.0 * n as f64);
            dt += g * xv;
            for k in 0..d {
                di[i * d + k] += scale * g * txt[j * d + k];
                dt_feat[j * d + k] += scale * g * img[i * d + k];
            }
        }
    }
    (loss, di, dt_feat, dt)
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: [f64; 6] = [1.0, 0.0, 0.6, 0.8, 0.0, 1.0];
    const T: [f64; 6] = [0.8, 0.6, 1.0, 0.0, 0.0, -1.0];
    const DI: [f64; 6] =
        [0.0481219116, -0.5343793425, -0.1687836559, 0.1654409085, 0.3606535611, 0.8158347751];
    const DT: [f64; 6] =
        [-0.2112663547, 0.6180800842, 0.1158648018, -0.2688374310, 0.3083549846, -0.5773394514];

    fn close(what: &str, got: f64, want: f64, tol: f64) {
        assert!((got - want).abs() <= tol, "{what}: got {got}, want {want}");
    }

    #[test]
    fn reference_reproduces_algorithms_test_values() {
        let (l, di, dt_feat, dt) = clip_loss_reference_f64(&I, &T, 3, 2, 2.0);
        close("L", l, 1.7144396774, 1e-9);
        close("dt", dt, 0.8950392200, 1e-9);
        for k in 0..6 {
            close("dI", di[k], DI[k], 1e-9);
            close("dT", dt_feat[k], DT[k], 1e-9);
        }
    }

    #[test]
    fn local_reproduces_algorithms_test_values() {
        let i32v: Vec<f32> = I.iter().map(|&v| v as f32).collect();
        let t32v: Vec<f32> = T.iter().map(|&v| v as f32).collect();
        let scale = (2.0f64.ln() as f32).exp();
        let out = clip_loss_local(&i32v, &t32v, 3, 2, 0, 3, scale);
        close("L", out.loss as f64, 1.7144396774, 1e-6);
        close("dt", out.d_t_partial as f64, 0.8950392200, 1e-6);
        for k in 0..6 {
            close("dI", out.d_img_local[k] as f64, DI[k], 1e-6);
            close("dT", out.d_txt_local[k] as f64, DT[k], 1e-6);
        }
    }

    fn random_unit(rng: &mut crate::rng::Rng, n: usize, d: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        for r in v.chunks_exact_mut(d) {
            let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= nrm);
        }
        v
    }

    #[test]
    fn split_ranks_sum_to_one_process() {
        let mut rng = crate::rng::Rng::new(11);
        // B larger than CHUNK exercises the chunked statistics pass.
        for &(big_b, d) in &[(7usize, 3usize), (300, 8)] {
            let img = random_unit(&mut rng, big_b, d);
            let txt = random_unit(&mut rng, big_b, d);
            let scale = 14.285_714f32;
            let (l, di, dtf, dt) = clip_loss_reference_f64(
                &img.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                &txt.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                big_b,
                d,
                scale as f64,
            );
            let splits: Vec<Vec<usize>> = vec![
                vec![big_b],
                vec![big_b / 2, big_b - big_b / 2],
                vec![1, big_b / 3, big_b - 1 - big_b / 3],
            ];
            for split in splits {
                let mut off = 0;
                let mut dt_sum = 0.0f64;
                let mut got_i = Vec::new();
                let mut got_t = Vec::new();
                let mut losses = Vec::new();
                for &b in &split {
                    let out = clip_loss_local(&img, &txt, big_b, d, off, b, scale);
                    dt_sum += out.d_t_partial as f64;
                    got_i.extend(out.d_img_local);
                    got_t.extend(out.d_txt_local);
                    losses.push(out.loss);
                    off += b;
                }
                assert!(
                    losses.iter().all(|&x| x == losses[0]),
                    "loss differs between ranks: {losses:?}"
                );
                close("L", losses[0] as f64, l, 1e-5 * l.abs().max(1.0));
                close("dt", dt_sum, dt, 1e-5);
                for k in 0..big_b * d {
                    close("dI", got_i[k] as f64, di[k], 1e-6);
                    close("dT", got_t[k] as f64, dtf[k], 1e-6);
                }
            }
        }
    }

    #[test]
    fn reference_gradient_matches_finite_differences() {
        let mut rng = crate::rng::Rng::new(12);
        let (n, d) = (4, 3);
        let img: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let txt: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
        let s = 3.0;
        let (_, di, dtf, dt) = clip_loss_reference_f64(&img, &txt, n, d, s);
        let h = 1e-6;
        for k in 0..n * d {
            let mut p = img.clone();
            p[k] += h;
            let lp = clip_loss_reference_f64(&p, &txt, n, d, s).0;
            p[k] -= 2.0 * h;
            let lm = clip_loss_reference_f64(&p, &txt, n, d, s).0;
            close("fd dI", (lp - lm) / (2.0 * h), di[k], 1e-6);
            let mut p = txt.clone();
            p[k] += h;
            let lp = clip_loss_reference_f64(&img, &p, n, d, s).0;
            p[k] -= 2.0 * h;
            let lm = clip_loss_reference_f64(&img, &p, n, d, s).0;
            close("fd dT", (lp - lm) / (2.0 * h), dtf[k], 1e-6);
        }
        // t = ln s: dL/dt by perturbing t.
        let lp = clip_loss_reference_f64(&img, &txt, n, d, (s.ln() + h).exp()).0;
        let lm = clip_loss_reference_f64(&img, &txt, n, d, (s.ln() - h).exp()).0;
        close("fd dt", (lp - lm) / (2.0 * h), dt, 1e-6);
    }
}
