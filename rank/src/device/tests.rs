use super::reference as r;
use super::*;
use crate::rng::Rng;

fn randv(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn devs() -> Vec<CpuDevice> {
    vec![CpuDevice::new(1), CpuDevice::new(2)]
}

#[test]
fn gemm_all_transposes_match_f64_reference() {
    let mut rng = Rng::new(1);
    for dev in devs() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 48, 80), (5, 0, 3), (4, 3, 0)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = randv(&mut rng, m * k);
                    let b = randv(&mut rng, k * n);
                    let c0 = randv(&mut rng, m * n);
                    let want0 = r::matmul(&r::to64(&a), &r::to64(&b), m, n, k, ta, tb);
                    // beta = 0 ignores NaN contents.
                    let mut c = vec![f32::NAN; m * n];
                    dev.gemm(ta, tb, m, n, k, 1.5, &a, &b, 0.0, &mut c);
                    let want: Vec<f64> = want0.iter().map(|v| 1.5 * v).collect();
                    r::assert_close("gemm beta=0", &c, &want, 1e-4, 1e-4);
                    // beta = 1 accumulates.
                    let mut c = c0.clone();
                    dev.gemm(ta, tb, m, n, k, -0.5, &a, &b, 1.0, &mut c);
                    let want: Vec<f64> =
                        want0.iter().zip(&c0).map(|(v, &o)| o as f64 - 0.5 * v).collect();
                    r::assert_close("gemm beta=1", &c, &want, 1e-4, 1e-4);
                }
            }
        }
    }
}

#[test]
fn gemm_large_enough_to_run_threaded() {
    let (m, n, k) = (260, 190, 150);
    let mut rng = Rng::new(21);
    let a = randv(&mut rng, m * k);
    let b = randv(&mut rng, k * n);
    let want = r::matmul(&r::to64(&a), &r::to64(&b), m, n, k, true, false);
    for dev in devs() {
        let mut c = vec![0.0; m * n];
        dev.gemm(true, false, m, n, k, 1.0, &a, &b, 0.0, &mut c);
        r::assert_close("gemm threaded", &c, &want, 1e-3, 1e-4);
    }
    assert_eq!(CpuDevice::new(2).threads(), 2);
    assert_eq!(CpuDevice::new(0).threads(), 1);
}

#[test]
#[should_panic(expected = "gemm: argument `b`")]
fn gemm_length_mismatch_is_caught() {
    let dev = CpuDevice::new(1);
    let mut c = vec![0.0; 4];
    dev.gemm(false, false, 2, 2, 2, 1.0, &[0.0; 4], &[0.0; 3], 0.0, &mut c);
}

#[test]
fn linear_backward_forms_match_finite_differences() {
    // L = Σ w ⊙ (X·W): dX = w·Wᵀ, dW = Xᵀ·w.
    let (m, k, n) = (4, 3, 5);
    let mut rng = Rng::new(2);
    let x = randv(&mut rng, m * k);
    let wt = randv(&mut rng, k * n);
    let g = randv(&mut rng, m * n);
    let dev = CpuDevice::new(1);
    let mut dx = vec![0.0; m * k];
    dev.gemm(false, true, m, k, n, 1.0, &g, &wt, 0.0, &mut dx);
    let mut dw = vec![1.0; k * n]; // accumulate onto ones
    dev.gemm(true, false, k, n, m, 1.0, &x, &g, 1.0, &mut dw);
    let (x64, w64, g64) = (r::to64(&x), r::to64(&wt), r::to64(&g));
    let fx = r::fd_grad(|xx| r::dot(&r::matmul(xx, &w64, m, n, k, false, false), &g64), &x64, 1e-6);
    let fw = r::fd_grad(|ww| r::dot(&r::matmul(&x64, ww, m, n, k, false, false), &g64), &w64, 1e-6);
    let fw1: Vec<f64> = fw.iter().map(|v| v + 1.0).collect();
    r::assert_close("dX", &dx, &fx, 1e-4, 1e-4);
    r::assert_close("dW", &dw, &fw1, 1e-4, 1e-4);
}

#[test]
fn bias_add_and_grad() {
    let dev = CpuDevice::new(1);
    let mut y = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    dev.bias_add(&mut y, &[10.0, 20.0, 30.0], 2, 3);
    assert_eq!(y, vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    let mut db = vec![1.0, 1.0, 1.0];
    dev.bias_grad(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, &mut db);
    assert_eq!(db, vec![6.0, 8.0, 10.0]);
}

#[test]
fn activations_forward_and_backward() {
    let dev = CpuDevice::new(1);
    let mut rng = Rng::new(3);
    let mut x = randv(&mut rng, 64);
    x.iter_mut().for_each(|v| *v *= 2.5);
    // keep relu test points away from the kink
    x.iter_mut().for_each(|v| {
        if v.abs() < 1e-2 {
            *v = 0.5
        }
    });
    let g = randv(&mut rng, 64);
    let (x64, g64) = (r::to64(&x), r::to64(&g));
    let mut y = vec![0.0; 64];
    let mut dx = vec![0.0; 64];

    dev.gelu_fwd(&x, &mut y);
    r::assert_close("gelu", &y, &x64.iter().map(|&v| r::gelu(v)).collect::<Vec<_>>(), 1e-6, 1e-5);
    dev.gelu_bwd(&x, &g, &mut dx);
    let f = r::fd_grad(|xx| xx.iter().zip(&g64).map(|(&v, w)| r::gelu(v) * w).sum(), &x64, 1e-6);
    r::assert_close("gelu'", &dx, &f, 1e-5, 1e-4);

    dev.relu_fwd(&x, &mut y);
    r::assert_close("relu", &y, &x64.iter().map(|&v| v.max(0.0)).collect::<Vec<_>>(), 0.0, 0.0);
    dev.relu_bwd(&x, &g, &mut dx);
    let f = r::fd_grad(|xx| xx.iter().zip(&g64).map(|(&v, w)| v.max(0.0) * w).sum(), &x64, 1e-6);
    r::assert_close("relu'", &dx, &f, 1e-6, 1e-6);
}

#[test]
fn layernorm_forward_and_backward() {
    let dev = CpuDevice::new(1);
    let (rows, cols, eps) = (5, 7, 1e-5f32);
    let mut rng = Rng::new(4);
    let x: Vec<f32> = randv(&mut rng, rows * cols).iter().map(|v| v * 3.0 + 1.0).collect();
    let gamma = randv(&mut rng, cols);
    let beta = randv(&mut rng, cols);
    let g = randv(&mut rng, rows * cols);
    let mut y = vec![0.0; rows * cols];
    let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
    dev.layernorm_fwd(&x, &gamma, &beta, rows, cols, eps, &mut y, &mut mean, &mut rstd);
    let (x64, ga64, be64, g64) = (r::to64(&x), r::to64(&gamma), r::to64(&beta), r::to64(&g));
    let want = r::layernorm(&x64, &ga64, &be64, rows, cols, eps as f64);
    r::assert_close("ln fwd", &y, &want, 1e-5, 1e-5);

    let mut dx = vec![0.0; rows * cols];
    let (mut dg, mut db) = (vec![0.5; cols], vec![0.25; cols]);
    dev.layernorm_bwd(&x, &gamma, &mean, &rstd, &g, rows, cols, &mut dx, &mut dg, &mut db);
    let e = eps as f64;
    let fx =
        r::fd_grad(|xx| r::dot(&r::layernorm(xx, &ga64, &be64, rows, cols, e), &g64), &x64, 1e-6);
    let fg =
        r::fd_grad(|gg| r::dot(&r::layernorm(&x64, gg, &be64, rows, cols, e), &g64), &ga64, 1e-6);
    let fb =
        r::fd_grad(|bb| r::dot(&r::layernorm(&x64, &ga64, bb, rows, cols, e), &g64), &be64, 1e-6);
    r::assert_close("ln dx", &dx, &fx, 1e-4, 1e-3);
    r::assert_close("ln dgamma", &dg, &fg.iter().map(|v| v + 0.5).collect::<Vec<_>>(), 1e-4, 1e-4);
    r::assert_close("ln dbeta", &db, &fb.iter().map(|v| v + 0.25).collect::<Vec<_>>(), 1e-4, 1e-4);
}

#[test]
fn l2_normalize_forward_and_backward() {
    let dev = CpuDevice::new(1);
    let (rows, cols) = (4, 6);
    let mut rng = Rng::new(5);
    let x = randv(&mut rng, rows * cols);
    let g = randv(&mut rng, rows * cols);
    let mut y = vec![0.0; rows * cols];
    let mut norms = vec![0.0; rows];
    dev.l2_normalize_fwd(&x, rows, cols, &mut y, &mut norms);
    let (x64, g64) = (r::to64(&x), r::to64(&g));
    r::assert_close("l2 fwd", &y, &r::l2_normalize(&x64, rows, cols), 1e-6, 1e-5);
    let mut dx = vec![0.0; rows * cols];
    dev.l2_normalize_bwd(&y, &norms, &g, rows, cols, &mut dx);
    let f = r::fd_grad(|xx| r::dot(&r::l2_normalize(xx, rows, cols), &g64), &x64, 1e-6);
    r::assert_close("l2 bwd", &dx, &f, 1e-5, 1e-4);
    // A zero row stays finite.
    let mut y0 = vec![1.0; 3];
    let mut n0 = vec![0.0; 1];
    dev.l2_normalize_fwd(&[0.0; 3], 1, 3, &mut y0, &mut n0);
    assert!(y0.iter().all(|v| *v == 0.0) && n0[0] > 0.0);
}

#[test]
fn softmax_xent_loss_grad_and_accuracy() {
    let dev = CpuDevice::new(1);
    let (rows, cols) = (6, 5);
    let mut rng = Rng::new(6);
    let logits: Vec<f32> = randv(&mut rng, rows * cols).iter().map(|v| v * 4.0).collect();
    let labels: Vec<u32> = (0..rows as u32).map(|i| (i * 3) % cols as u32).collect();
    let mut d = vec![0.0; rows * cols];
    let out = dev.softmax_xent(&logits, &labels, rows, cols, 0.5, &mut d);
    let l64 = r::to64(&logits);
    let want = r::xent_sum(&l64, &labels, rows, cols);
    assert!((out.loss_sum - want).abs() < 1e-5 * want.abs().max(1.0), "{} vs {want}", out.loss_sum);
    let f = r::fd_grad(|ll| 0.5 * r::xent_sum(ll, &labels, rows, cols), &l64, 1e-6);
    r::assert_close("dlogits", &d, &f, 1e-5, 1e-4);
    let mut hits = 0;
    for i in 0..rows {
        let row = &logits[i * cols..(i + 1) * cols];
        let am = (0..cols).fold(0, |a, c| if row[c] > row[a] { c } else { a });
        hits += usize::from(am == labels[i] as usize);
    }
    assert_eq!(out.correct, hits);
    // Huge logits stay finite.
    let out = dev.softmax_xent(&[1000.0, -1000.0], &[1], 1, 2, 1.0, &mut d[..2]);
    assert!((out.loss_sum - 2000.0).abs() < 1e-3);
    assert!(d[..2].iter().all(|v| v.is_finite()));
}

#[test]
fn norms_and_updates() {
    let dev = CpuDevice::new(1);
    assert_eq!(dev.sq_norm(&[3.0, 4.0]), 25.0);
    let mut y = vec![1.0, 2.0];
    dev.axpy(2.0, &[1.0, -1.0], &mut y);
    assert_eq!(y, vec![3.0, 0.0]);
    dev.scale(0.5, &mut y);
    assert_eq!(y, vec![1.5, 0.0]);
    dev.add_inplace(&mut y, &[1.0, 1.0]);
    assert_eq!(y, vec![2.5, 1.0]);
    assert_eq!(dev.alloc(3), vec![0.0; 3]);
    assert_eq!(dev.threads(), 1);
}

#[test]
fn sgemm_gflops_is_positive() {
    let g = sgemm_gflops(64, 1, 2);
    assert!(g.is_finite() && g > 0.0, "{g}");
    assert_eq!(sgemm_gflops(0, 1, 1), 0.0);
}

#[test]
fn fast_exp_is_accurate() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let got = super::cpu::fast_exp(x) as f64;
        let want = (x as f64).exp();
        assert!((got - want).abs() <= 3e-7 * want, "exp({x}): {got} vs {want}");
        x += 0.0137;
    }
    assert_eq!(super::cpu::fast_exp(-1000.0), super::cpu::fast_exp(-87.0));
    assert!(super::cpu::fast_exp(1000.0).is_finite());
}
