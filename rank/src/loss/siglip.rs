//! The pairwise sigmoid (SigLIP) loss over an all-gathered global batch: the naive peer of the
//! tiled ring ([`super::siglip_loss_ring`]), as `tessera bench loss --loss siglip` times it.
//!
//! Logits `x_ij = s·⟨I_i, T_j⟩`, positives on the diagonal, labels `z_ij = ±1`,
//! `L = 1/B · Σ_ij −log σ(z_ij (x_ij + β))`, `G_ij = (σ(x_ij + β) − δ_ij)/B`.
//!
//! A rank materialises two blocks of `b_local × B` logits, one after the other
//! (`clip::naive_blocks`): its rows against every text (its loss terms, `∂L/∂I`, and its
//! shares of `∂L/∂t` and `∂L/∂β`), then every image against its texts (`∂L/∂T`). No statistic
//! spans a row or a column, so nothing else is computed. The per-pair arithmetic is the ring's
//! own (`siglip_grad_row`), so the two differ only in what they hold.

use super::clip::naive_blocks;
use super::ring::siglip_grad_row;
use crate::device::CpuDevice;

/// One rank's result of [`siglip_loss_local`]. Each `_partial` field is this rank's share: the
/// sum over ranks is the global quantity.
#[derive(Clone, Debug, PartialEq)]
pub struct SiglipOut {
    /// `1/B · Σ_{i local} Σ_j −log σ(z_ij (x_ij + β))`.
    pub loss_partial: f64,
    /// `∂L/∂I_i` for this rank's rows (`b_local × d`).
    pub d_img_local: Vec<f32>,
    /// `∂L/∂T_j` for this rank's rows (`b_local × d`).
    pub d_txt_local: Vec<f32>,
    /// `Σ_{i local} Σ_j G_ij x_ij`: the share of `∂L/∂t` (t = log s).
    pub d_t_partial: f64,
    /// `Σ_{i local} Σ_j G_ij`: the share of `∂L/∂β`.
    pub d_bias_partial: f64,
}

/// SigLIP for data parallelism. `img_all` and `txt_all` are the all-gathered features
/// (`big_b × d`, rows in rank order); this rank owns rows `row_offset .. row_offset + b_local`;
/// `scale = s`, `bias = β`. Returns this rank's gradients and shares ([`SiglipOut`]).
///
/// # Panics
/// When the slice lengths do not match `big_b × d` or the row range exceeds `big_b`.
#[allow(clippy::too_many_arguments)]
pub fn siglip_loss_local(
    img_all: &[f32],
    txt_all: &[f32],
    big_b: usize,
    d: usize,
    row_offset: usize,
    b_local: usize,
    scale: f32,
    bias: f32,
) -> SiglipOut {
    for (name, v) in [("img_all", img_all), ("txt_all", txt_all)] {
        assert_eq!(
            v.len(),
            big_b * d,
            "siglip_loss_local: {name} has {} values, expected {big_b} x {d}",
            v.len()
        );
    }
    assert!(
        row_offset + b_local <= big_b,
        "siglip_loss_local: rows {row_offset}..{} exceed the global batch {big_b}",
        row_offset + b_local
    );
    let dev = CpuDevice::new(1);
    let inv_b = 1.0 / big_b.max(1) as f64;
    let rows = row_offset..row_offset + b_local;
    let mut sums = [0.0f64; 3];
    let (d_img_local, d_txt_local) = naive_blocks(
        &dev,
        img_all,
        txt_all,
        d,
        rows.clone(),
        scale,
        |i, xr| {
            let s = siglip_grad_row(xr, bias, Some(i), inv_b);
            sums.iter_mut().zip(s).for_each(|(a, v)| *a += v);
        },
        |i, xr| {
            siglip_grad_row(xr, bias, rows.contains(&i).then(|| i - row_offset), inv_b);
        },
    );
    SiglipOut {
        loss_partial: sums[1] * inv_b,
        d_img_local,
        d_txt_local,
        d_t_partial: sums[0],
        d_bias_partial: sums[2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::siglip_loss_reference_f64;
    use crate::rng::Rng;

    /// Three "ranks" of 15, 0 and 22 rows: the sums of their shares and their gradient rows
    /// give the f64 reference's loss, gradients, ∂L/∂t and ∂L/∂β.
    #[test]
    fn shares_over_ranks_sum_to_the_f64_reference() {
        let (big_b, d, scale, bias) = (37usize, 5usize, 9.0f32, -2.5f32);
        let mut rng = Rng::new(11);
        let mut unit = || {
            let mut v: Vec<f32> = (0..big_b * d).map(|_| rng.normal() as f32).collect();
            for r in v.chunks_exact_mut(d) {
                let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter_mut().for_each(|x| *x /= n);
            }
            v
        };
        let (img, txt) = (unit(), unit());
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let (l, di, dtf, dt, db) = siglip_loss_reference_f64(
            &f64s(&img),
            &f64s(&txt),
            big_b,
            d,
            scale as f64,
            bias as f64,
        );
        let (mut loss, mut g_t, mut g_b) = (0.0, 0.0, 0.0);
        let (mut got_di, mut got_dt) = (Vec::new(), Vec::new());
        let mut off = 0;
        for b in [15usize, 0, 22] {
            let o = siglip_loss_local(&img, &txt, big_b, d, off, b, scale, bias);
            assert_eq!((o.d_img_local.len(), o.d_txt_local.len()), (b * d, b * d));
            loss += o.loss_partial;
            g_t += o.d_t_partial;
            g_b += o.d_bias_partial;
            got_di.extend(o.d_img_local);
            got_dt.extend(o.d_txt_local);
            off += b;
        }
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-3);
        assert!(rel(loss, l) < 1e-6, "loss {loss} vs {l}");
        assert!(rel(g_t, dt) < 1e-5, "dL/dt {g_t} vs {dt}");
        assert!(rel(g_b, db) < 1e-5, "dL/dbias {g_b} vs {db}");
        let worst = |got: &[f32], want: &[f64]| {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs() / scale).fold(0.0, f64::max)
        };
        assert!(worst(&got_di, &di) < 1e-5, "dI off by {}", worst(&got_di, &di));
        assert!(worst(&got_dt, &dtf) < 1e-5, "dT off by {}", worst(&got_dt, &dtf));
    }
}
