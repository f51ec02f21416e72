//! `tessera cuda selftest`: every kernel on random inputs of odd sizes against the CPU device
//! and an f64 reference, one cuBLAS SGEMM, every method of [`CudaDevice`] against
//! [`CpuDevice`] (on managed buffers and on plain `Vec`s), two training steps of the default
//! model in managed memory against the CPU, the fused CLIP loss against the CPU
//! tiled loss and the f64 reference, and every NCCL collective at world size 1 through
//! `NcclComm`. Also `bench_loss` for `tessera cuda bench-loss`.
//!
//! Errors are normwise: `‖out − ref‖₂ / ‖ref‖₂` (NaN or an unwritten output — outputs are
//! poisoned with NaN first — counts as infinite error).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::CudaError;
use super::device::{CudaDevice, CudaDeviceOpts, GemmMath, gemm_row_major_raw};
use super::gpu::{FusedClipLoss, Gpu, LossMode, Precision, clip_loss, drv, elem_cfg, row_cfg};
use super::libs::{Lib, require};
use super::nvrtc::Defines;
use crate::device::{CpuDevice, Device, L2_NORM_EPS};
use crate::rng::Rng;

/// One line of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    /// `libs`, `kernel`, `cublas`, `device`, `loss`, `nccl`.
    pub group: &'static str,
    pub name: String,
    /// Sizes or what loaded.
    pub detail: String,
    /// Error vs the CPU device (normwise relative).
    pub err_cpu: Option<f64>,
    /// Error vs the f64 reference (normwise relative).
    pub err_ref: Option<f64>,
    /// Pass threshold for both errors.
    pub tol: Option<f64>,
    pub pass: bool,
}

/// The whole report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub device: String,
    pub arch: String,
    pub rows: Vec<Row>,
}

impl Report {
    /// True when every row passed.
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    /// A fixed-width table.
    pub fn table(&self) -> String {
        let fmt = |v: Option<f64>| v.map(|e| format!("{e:.2e}")).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "{:<7} {:<24} {:<34} {:>9} {:>9} {:>8}  result\n",
            "group", "check", "detail", "err_cpu", "err_f64", "tol"
        );
        for r in &self.rows {
            s += &format!(
                "{:<7} {:<24} {:<34} {:>9} {:>9} {:>8}  {}\n",
                r.group,
                r.name,
                r.detail,
                fmt(r.err_cpu),
                fmt(r.err_ref),
                fmt(r.tol),
                if r.pass { "PASS" } else { "FAIL" }
            );
        }
        let failed = self.rows.iter().filter(|r| !r.pass).count();
        s += &format!("{} checks, {} failed\n", self.rows.len(), failed);
        s
    }
}

/// Which libraries load now (no side effects beyond dlopen/dlclose).
pub fn probe_rows() -> Vec<Row> {
    Lib::ALL
        .iter()
        .map(|&l| {
            let ok = l.present();
            Row {
                group: "libs",
                name: l.name().to_string(),
                detail: if ok {
                    format!("{} loaded", l.file())
                } else {
                    format!("{} MISSING", l.file())
                },
                err_cpu: None,
                err_ref: None,
                tol: None,
                pass: ok,
            }
        })
        .collect()
}

/// `‖a − b‖ / ‖b‖` in f64; infinite when anything is NaN/inf.
pub fn rel_err<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y): (f64, f64) = (x.into(), y.into());
        num += (x - y) * (x - y);
        den += y * y;
    }
    let e = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    if e.is_finite() { e } else { f64::INFINITY }
}

fn row(
    group: &'static str,
    name: &str,
    detail: String,
    err_cpu: Option<f64>,
    err_ref: Option<f64>,
    tol: f64,
) -> Row {
    let ok = |e: Option<f64>| e.is_none_or(|e| e <= tol);
    Row {
        group,
        name: name.to_string(),
        detail,
        err_cpu,
        err_ref,
        tol: Some(tol),
        pass: ok(err_cpu) && ok(err_ref) && (err_cpu.is_some() || err_ref.is_some()),
    }
}

fn failed(group: &'static str, name: &str, e: &CudaError) -> Row {
    let mut msg = e.to_string().replace('\n', " ");
    if msg.len() > 200 {
        msg.truncate(200);
    }
    Row {
        group,
        name: name.to_string(),
        detail: msg,
        err_cpu: None,
        err_ref: None,
        tol: None,
        pass: false,
    }
}

fn normal(rng: &mut Rng, n: usize, sd: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * sd) as f32).collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Runs the whole self-test on GPU `ordinal`, its kernels compiled with the knobs `defs`
/// (defaults: `Defines::default()`). `Err` only when the GPU cannot be used at all (driver or
/// NVRTC missing, no device, kernels fail to compile); every later failure is a failed row.
pub fn run(ordinal: usize, seed: u64, defs: &Defines) -> Result<Report, CudaError> {
    let mut rows = probe_rows();
    let gpu = Gpu::open_with(ordinal, defs)?;
    let mut rep = Report { device: gpu.name.clone(), arch: gpu.arch.clone(), rows: Vec::new() };
    rows.push(Row {
        group: "nvrtc",
        name: "compile+load".into(),
        detail: format!(
            "{} sources for {} in {:.0} ms ({} from the kernel cache), knobs: {}",
            super::nvrtc::SOURCES.len(),
            gpu.arch,
            gpu.compile_ms,
            gpu.cached,
            gpu.defines
        ),
        err_cpu: None,
        err_ref: None,
        tol: None,
        pass: true,
    });
    let mut rng = Rng::new(seed);
    let cpu = CpuDevice::new(1);
    macro_rules! guard {
        ($group:expr, $name:expr, $body:expr) => {
            match $body {
                Ok(mut r) => rows.append(&mut r),
                Err(e) => rows.push(failed($group, $name, &e)),
            }
        };
    }
    guard!("kernel", "elementwise", elementwise_checks(&gpu, &cpu, &mut rng));
    guard!("kernel", "row kernels", row_checks(&gpu, &cpu, &mut rng));
    guard!("cublas", "sgemm", cublas_checks(&gpu, &cpu, &mut rng));
    guard!("device", "CudaDevice", catch_fault(|| device_checks(ordinal, defs, &cpu, &mut rng)));
    guard!("loss", "fused clip loss", loss_checks(&gpu, &mut rng));
    guard!("loss", "GPU ring blocks", catch_fault(|| ring_checks(&gpu, &mut rng)));
    guard!("nccl", "NcclComm world 1", nccl_check(&gpu, &mut rng));
    rep.rows = rows;
    Ok(rep)
}

/// Launches a `(const float* x, float* y, i64 n)`-shaped kernel, or with `x2` a
/// `(const float* x, const float* x2, float* y, i64 n)` one.
fn launch_xy(
    gpu: &Gpu,
    name: &str,
    x: &CudaSlice<f32>,
    x2: Option<&CudaSlice<f32>>,
    y: &mut CudaSlice<f32>,
    n: usize,
) -> Result<(), CudaError> {
    let n64 = n as i64;
    let f = gpu.func(name)?;
    let mut l = gpu.stream.launch_builder(f);
    l.arg(x);
    if let Some(x2) = x2 {
        l.arg(x2);
    }
    l.arg(y).arg(&n64);
    // SAFETY: the caller names a kernel of this shape; every buffer holds n values.
    drv(&format!("launch {name}"), unsafe { l.launch(elem_cfg(n)) }).map(|_| ())
}

fn elementwise_checks(gpu: &Gpu, cpu: &CpuDevice, rng: &mut Rng) -> Result<Vec<Row>, CudaError> {
    let n = 100_003;
    let mut out = Vec::new();
    let x = normal(rng, n, 2.0);
    let dy = normal(rng, n, 1.0);
    let (gx, gdy) = (gpu.upload(&x)?, gpu.upload(&dy)?);
    let nan = vec![f32::NAN; n];
    let detail = format!("n={n}");

    // gelu
    let u = |v: f64| (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
    let mut gy = gpu.upload(&nan)?;
    launch_xy(gpu, "gelu_fwd", &gx, None, &mut gy, n)?;
    let y = gpu.download(&gy)?;
    let mut yc = vec![0.0; n];
    cpu.gelu_fwd(&x, &mut yc);
    let yr: Vec<f64> = x.iter().map(|&v| 0.5 * v as f64 * (1.0 + u(v as f64).tanh())).collect();
    out.push(row(
        "kernel",
        "gelu_fwd",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-5,
    ));

    let mut gdx = gpu.upload(&nan)?;
    launch_xy(gpu, "gelu_bwd", &gx, Some(&gdy), &mut gdx, n)?;
    let dx = gpu.download(&gdx)?;
    let mut dxc = vec![0.0; n];
    cpu.gelu_bwd(&x, &dy, &mut dxc);
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let dxr: Vec<f64> = x
        .iter()
        .zip(&dy)
        .map(|(&v, &g)| {
            let v = v as f64;
            let th = u(v).tanh();
            g as f64
                * (0.5 * (1.0 + th)
                    + 0.5 * v * (1.0 - th * th) * c * (1.0 + 3.0 * 0.044715 * v * v))
        })
        .collect();
    out.push(row(
        "kernel",
        "gelu_bwd",
        detail.clone(),
        Some(rel_err(&dx, &dxc)),
        Some(rel_err(&dx, &dxr)),
        1e-5,
    ));

    // relu
    let mut gy = gpu.upload(&nan)?;
    launch_xy(gpu, "relu_fwd", &gx, None, &mut gy, n)?;
    let y = gpu.download(&gy)?;
    cpu.relu_fwd(&x, &mut yc);
    let yr: Vec<f64> = x.iter().map(|&v| (v as f64).max(0.0)).collect();
    out.push(row(
        "kernel",
        "relu_fwd",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        0.0,
    ));
    let mut gdx = gpu.upload(&nan)?;
    launch_xy(gpu, "relu_bwd", &gx, Some(&gdy), &mut gdx, n)?;
    let dx = gpu.download(&gdx)?;
    cpu.relu_bwd(&x, &dy, &mut dxc);
    let dxr: Vec<f64> =
        x.iter().zip(&dy).map(|(&v, &g)| if v > 0.0 { g as f64 } else { 0.0 }).collect();
    out.push(row(
        "kernel",
        "relu_bwd",
        detail.clone(),
        Some(rel_err(&dx, &dxc)),
        Some(rel_err(&dx, &dxr)),
        0.0,
    ));

    // add_inplace: y += x
    let y0 = normal(rng, n, 1.0);
    let mut gy = gpu.upload(&y0)?;
    {
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(gpu.func("add_inplace")?);
        l.arg(&mut gy).arg(&gx).arg(&n64);
        // SAFETY: add_inplace(float* y, const float* x, i64 n); both hold n values.
        drv("launch add_inplace", unsafe { l.launch(elem_cfg(n)) })?;
    }
    let y = gpu.download(&gy)?;
    let mut yc = y0.clone();
    cpu.add_inplace(&mut yc, &x);
    let yr: Vec<f64> = y0.iter().zip(&x).map(|(&a, &b)| a as f64 + b as f64).collect();
    out.push(row(
        "kernel",
        "add_inplace",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-7,
    ));

    // axpy: y += alpha x
    let alpha = -0.37f32;
    let mut gy = gpu.upload(&y0)?;
    {
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(gpu.func("axpy")?);
        l.arg(&alpha).arg(&gx).arg(&mut gy).arg(&n64);
        // SAFETY: axpy(float alpha, const float* x, float* y, i64 n).
        drv("launch axpy", unsafe { l.launch(elem_cfg(n)) })?;
    }
    let y = gpu.download(&gy)?;
    let mut yc = y0.clone();
    cpu.axpy(alpha, &x, &mut yc);
    let yr: Vec<f64> =
        y0.iter().zip(&x).map(|(&a, &b)| a as f64 + alpha as f64 * b as f64).collect();
    out.push(row(
        "kernel",
        "axpy",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-6,
    ));

    // scale: x *= alpha
    let mut gy = gpu.upload(&y0)?;
    {
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(gpu.func("scale")?);
        l.arg(&alpha).arg(&mut gy).arg(&n64);
        // SAFETY: scale(float alpha, float* x, i64 n).
        drv("launch scale", unsafe { l.launch(elem_cfg(n)) })?;
    }
    let y = gpu.download(&gy)?;
    let mut yc = y0.clone();
    cpu.scale(alpha, &mut yc);
    let yr: Vec<f64> = y0.iter().map(|&a| a as f64 * alpha as f64).collect();
    out.push(row(
        "kernel",
        "scale",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-7,
    ));

    // sq_norm: block partials, summed here in order.
    let blocks = 97usize;
    let mut gp = gpu.zeros::<f64>(blocks)?;
    {
        let n64 = n as i64;
        let mut l = gpu.stream.launch_builder(gpu.func("sq_norm_partial")?);
        l.arg(&gx).arg(&n64).arg(&mut gp);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 256 * 8,
        };
        // SAFETY: sq_norm_partial(const float*, i64, double* partial[gridDim.x]).
        drv("launch sq_norm_partial", unsafe { l.launch(cfg) })?;
    }
    let s: f64 = gpu.download(&gp)?.iter().sum();
    let sc = cpu.sq_norm(&x);
    let sr: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    out.push(row(
        "kernel",
        "sq_norm",
        detail,
        Some(rel_err(&[s], &[sc])),
        Some(rel_err(&[s], &[sr])),
        1e-12,
    ));
    Ok(out)
}

fn row_checks(gpu: &Gpu, cpu: &CpuDevice, rng: &mut Rng) -> Result<Vec<Row>, CudaError> {
    let (rows, cols) = (37usize, 1031usize);
    let n = rows * cols;
    let (r64, c64) = (rows as i64, cols as i64);
    let detail = format!("{rows}x{cols}");
    let mut out = Vec::new();
    let x: Vec<f32> = normal(rng, n, 1.5).iter().map(|v| v + 0.3).collect();
    let dy = normal(rng, n, 1.0);
    let gx = gpu.upload(&x)?;
    let gdy = gpu.upload(&dy)?;
    let nan = vec![f32::NAN; n];

    // bias_add
    let bias = normal(rng, cols, 1.0);
    let y0 = normal(rng, n, 1.0);
    let gb = gpu.upload(&bias)?;
    let mut gy = gpu.upload(&y0)?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("bias_add")?);
        l.arg(&mut gy).arg(&gb).arg(&r64).arg(&c64);
        // SAFETY: bias_add(float* y, const float* bias, i64 rows, i64 cols).
        drv("launch bias_add", unsafe { l.launch(elem_cfg(n)) })?;
    }
    let y = gpu.download(&gy)?;
    let mut yc = y0.clone();
    cpu.bias_add(&mut yc, &bias, rows, cols);
    let yr: Vec<f64> = (0..n).map(|i| y0[i] as f64 + bias[i % cols] as f64).collect();
    out.push(row(
        "kernel",
        "bias_add",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-7,
    ));

    // bias_grad (accumulates)
    let db0 = normal(rng, cols, 1.0);
    let mut gdb = gpu.upload(&db0)?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("bias_grad")?);
        l.arg(&gdy).arg(&r64).arg(&c64).arg(&mut gdb);
        // SAFETY: bias_grad(const float* dy, i64 rows, i64 cols, float* dbias).
        drv("launch bias_grad", unsafe { l.launch(elem_cfg(cols)) })?;
    }
    let db = gpu.download(&gdb)?;
    let mut dbc = db0.clone();
    cpu.bias_grad(&dy, rows, cols, &mut dbc);
    let dbr: Vec<f64> = (0..cols)
        .map(|c| db0[c] as f64 + (0..rows).map(|r| dy[r * cols + c] as f64).sum::<f64>())
        .collect();
    out.push(row(
        "kernel",
        "bias_grad",
        detail.clone(),
        Some(rel_err(&db, &dbc)),
        Some(rel_err(&db, &dbr)),
        1e-6,
    ));

    // layernorm_fwd
    let gamma: Vec<f32> = normal(rng, cols, 0.2).iter().map(|v| v + 1.0).collect();
    let beta = normal(rng, cols, 0.2);
    let eps = 1e-5f32;
    let (gg, gbeta) = (gpu.upload(&gamma)?, gpu.upload(&beta)?);
    let mut gy = gpu.upload(&nan)?;
    let mut gmean = gpu.upload(&vec![f32::NAN; rows])?;
    let mut grstd = gpu.upload(&vec![f32::NAN; rows])?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("layernorm_fwd")?);
        l.arg(&gx).arg(&gg).arg(&gbeta).arg(&r64).arg(&c64).arg(&eps);
        l.arg(&mut gy).arg(&mut gmean).arg(&mut grstd);
        // SAFETY: layernorm_fwd(x, gamma, beta, rows, cols, eps, y, mean, rstd).
        drv("launch layernorm_fwd", unsafe { l.launch(row_cfg(rows)) })?;
    }
    let (y, mean, rstd) = (gpu.download(&gy)?, gpu.download(&gmean)?, gpu.download(&grstd)?);
    let (mut yc, mut mc, mut rc) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    cpu.layernorm_fwd(&x, &gamma, &beta, rows, cols, eps, &mut yc, &mut mc, &mut rc);
    let mut yr = vec![0.0f64; n];
    let mut rr = vec![0.0f64; rows];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
        rr[r] = 1.0 / (var + eps as f64).sqrt();
        for c in 0..cols {
            yr[r * cols + c] = (xr[c] as f64 - mu) * rr[r] * gamma[c] as f64 + beta[c] as f64;
        }
    }
    out.push(row(
        "kernel",
        "layernorm_fwd y",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-6,
    ));
    out.push(row(
        "kernel",
        "layernorm_fwd mean",
        detail.clone(),
        Some(rel_err(&mean, &mc)),
        None,
        1e-6,
    ));
    out.push(row(
        "kernel",
        "layernorm_fwd rstd",
        detail.clone(),
        Some(rel_err(&rstd, &rc)),
        Some(rel_err(&rstd, &rr)),
        1e-6,
    ));

    // layernorm_bwd: dx (overwrite) + dgamma/dbeta (accumulate), from the CPU's mean/rstd.
    let (gm, gr) = (gpu.upload(&mc)?, gpu.upload(&rc)?);
    let mut gdx = gpu.upload(&nan)?;
    let dg0 = normal(rng, cols, 1.0);
    let dbeta0 = normal(rng, cols, 1.0);
    let mut gdg = gpu.upload(&dg0)?;
    let mut gdbeta = gpu.upload(&dbeta0)?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("layernorm_bwd_dx")?);
        l.arg(&gx).arg(&gg).arg(&gm).arg(&gr).arg(&gdy).arg(&r64).arg(&c64).arg(&mut gdx);
        // SAFETY: layernorm_bwd_dx(x, gamma, mean, rstd, dy, rows, cols, dx).
        drv("launch layernorm_bwd_dx", unsafe { l.launch(row_cfg(rows)) })?;
        let mut l = gpu.stream.launch_builder(gpu.func("layernorm_bwd_params")?);
        l.arg(&gx).arg(&gm).arg(&gr).arg(&gdy).arg(&r64).arg(&c64).arg(&mut gdg).arg(&mut gdbeta);
        // SAFETY: layernorm_bwd_params(x, mean, rstd, dy, rows, cols, dgamma, dbeta).
        drv("launch layernorm_bwd_params", unsafe { l.launch(elem_cfg(cols)) })?;
    }
    let (dx, dg, dbt) = (gpu.download(&gdx)?, gpu.download(&gdg)?, gpu.download(&gdbeta)?);
    let (mut dxc, mut dgc, mut dbtc) = (vec![0.0; n], dg0.clone(), dbeta0.clone());
    cpu.layernorm_bwd(&x, &gamma, &mc, &rc, &dy, rows, cols, &mut dxc, &mut dgc, &mut dbtc);
    let mut dxr = vec![0.0f64; n];
    let mut dgr = to64(&dg0);
    let mut dbr = to64(&dbeta0);
    for r in 0..rows {
        let (mu, rs) = (mc[r] as f64, rc[r] as f64);
        let xh: Vec<f64> = (0..cols).map(|c| (x[r * cols + c] as f64 - mu) * rs).collect();
        let g: Vec<f64> = (0..cols).map(|c| dy[r * cols + c] as f64 * gamma[c] as f64).collect();
        let mg = g.iter().sum::<f64>() / cols as f64;
        let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
        for c in 0..cols {
            dxr[r * cols + c] = rs * (g[c] - mg - xh[c] * mgx);
            dgr[c] += dy[r * cols + c] as f64 * xh[c];
            dbr[c] += dy[r * cols + c] as f64;
        }
    }
    out.push(row(
        "kernel",
        "layernorm_bwd dx",
        detail.clone(),
        Some(rel_err(&dx, &dxc)),
        Some(rel_err(&dx, &dxr)),
        1e-5,
    ));
    out.push(row(
        "kernel",
        "layernorm_bwd dgamma",
        detail.clone(),
        Some(rel_err(&dg, &dgc)),
        Some(rel_err(&dg, &dgr)),
        1e-5,
    ));
    out.push(row(
        "kernel",
        "layernorm_bwd dbeta",
        detail.clone(),
        Some(rel_err(&dbt, &dbtc)),
        Some(rel_err(&dbt, &dbr)),
        1e-5,
    ));

    // l2_normalize fwd/bwd
    let mut gy = gpu.upload(&nan)?;
    let mut gn = gpu.upload(&vec![f32::NAN; rows])?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("l2_normalize_fwd")?);
        l.arg(&gx).arg(&r64).arg(&c64).arg(&L2_NORM_EPS).arg(&mut gy).arg(&mut gn);
        // SAFETY: l2_normalize_fwd(x, rows, cols, eps, y, norms).
        drv("launch l2_normalize_fwd", unsafe { l.launch(row_cfg(rows)) })?;
    }
    let (y, nrm) = (gpu.download(&gy)?, gpu.download(&gn)?);
    let (mut yc, mut nc) = (vec![0.0; n], vec![0.0; rows]);
    cpu.l2_normalize_fwd(&x, rows, cols, &mut yc, &mut nc);
    let mut yr = vec![0.0f64; n];
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let nn = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        for c in 0..cols {
            yr[r * cols + c] = xr[c] as f64 / nn;
        }
    }
    out.push(row(
        "kernel",
        "l2_normalize_fwd",
        detail.clone(),
        Some(rel_err(&y, &yc)),
        Some(rel_err(&y, &yr)),
        1e-6,
    ));
    out.push(row(
        "kernel",
        "l2_normalize_fwd norms",
        detail.clone(),
        Some(rel_err(&nrm, &nc)),
        None,
        1e-6,
    ));
    let (gyc, gnc) = (gpu.upload(&yc)?, gpu.upload(&nc)?);
    let mut gdx = gpu.upload(&nan)?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("l2_normalize_bwd")?);
        l.arg(&gyc).arg(&gnc).arg(&gdy).arg(&r64).arg(&c64).arg(&mut gdx);
        // SAFETY: l2_normalize_bwd(y, norms, dy, rows, cols, dx).
        drv("launch l2_normalize_bwd", unsafe { l.launch(row_cfg(rows)) })?;
    }
    let dx = gpu.download(&gdx)?;
    let mut dxc = vec![0.0; n];
    cpu.l2_normalize_bwd(&yc, &nc, &dy, rows, cols, &mut dxc);
    let mut dxr = vec![0.0f64; n];
    for (r, &nr) in nc.iter().enumerate() {
        let s = r * cols..(r + 1) * cols;
        let dot: f64 =
            yc[s.clone()].iter().zip(&dy[s.clone()]).map(|(&a, &b)| a as f64 * b as f64).sum();
        for c in 0..cols {
            let i = r * cols + c;
            dxr[i] = (dy[i] as f64 - yc[i] as f64 * dot) / nr as f64;
        }
    }
    out.push(row(
        "kernel",
        "l2_normalize_bwd",
        detail.clone(),
        Some(rel_err(&dx, &dxc)),
        Some(rel_err(&dx, &dxr)),
        1e-5,
    ));

    // softmax_xent
    let logits = normal(rng, n, 3.0);
    let labels: Vec<u32> = (0..rows).map(|_| rng.below(cols as u64) as u32).collect();
    let grad_scale = 1.0 / rows as f32;
    let gl = gpu.upload(&logits)?;
    let glab = gpu.upload(&labels)?;
    let mut gd = gpu.upload(&nan)?;
    let mut gloss = gpu.upload(&vec![f64::NAN; rows])?;
    let mut ghit = gpu.zeros::<i32>(rows)?;
    {
        let mut l = gpu.stream.launch_builder(gpu.func("softmax_xent")?);
        l.arg(&gl).arg(&glab).arg(&r64).arg(&c64).arg(&grad_scale);
        l.arg(&mut gd).arg(&mut gloss).arg(&mut ghit);
        // SAFETY: softmax_xent(logits, labels, rows, cols, grad_scale, dlogits, row_loss, row_hit).
        drv("launch softmax_xent", unsafe { l.launch(row_cfg(rows)) })?;
    }
    let (d, ls, hits) = (gpu.download(&gd)?, gpu.download(&gloss)?, gpu.download(&ghit)?);
    let mut dc = vec![0.0; n];
    let xo = cpu.softmax_xent(&logits, &labels, rows, cols, grad_scale, &mut dc);
    let loss: f64 = ls.iter().sum();
    let correct = hits.iter().filter(|&&h| h == 1).count();
    let mut dr = vec![0.0f64; n];
    let mut lr = 0.0f64;
    for r in 0..rows {
        let lg = &logits[r * cols..(r + 1) * cols];
        let m = lg.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
        let lse = m + lg.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        lr += lse - lg[labels[r] as usize] as f64;
        for c in 0..cols {
            let onehot = if c == labels[r] as usize { 1.0 } else { 0.0 };
            dr[r * cols + c] = grad_scale as f64 * ((lg[c] as f64 - lse).exp() - onehot);
        }
    }
    out.push(row(
        "kernel",
        "softmax_xent dlogits",
        detail.clone(),
        Some(rel_err(&d, &dc)),
        Some(rel_err(&d, &dr)),
        1e-5,
    ));
    out.push(row(
        "kernel",
        "softmax_xent loss",
        detail.clone(),
        Some(rel_err(&[loss], &[xo.loss_sum])),
        Some(rel_err(&[loss], &[lr])),
        1e-9,
    ));
    let hit_ok = correct == xo.correct;
    out.push(Row {
        group: "kernel",
        name: "softmax_xent correct".into(),
        detail: format!("gpu {correct} cpu {}", xo.correct),
        err_cpu: None,
        err_ref: None,
        tol: None,
        pass: hit_ok,
    });
    Ok(out)
}

/// Row-major `C = alpha·op(A)·op(B) + beta·C` in fp32 through cuBLAS (the GEMM of
/// [`CudaDevice`], see [`gemm_row_major_raw`]).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_row_major(
    gpu: &Gpu,
    blas: &cudarc::cublas::CudaBlas,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    beta: f32,
    c: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(CudaError::Invalid(format!("sgemm {m}x{n}x{k}: buffers too short")));
    }
    let handle = *blas.handle();
    let (pa, _ga) = a.device_ptr(&gpu.stream);
    let (pb, _gb) = b.device_ptr(&gpu.stream);
    let (pc, _gc) = c.device_ptr_mut(&gpu.stream);
    // SAFETY: the pointers are live device buffers of at least the sizes checked above, and
    // the handle is bound to gpu.stream.
    unsafe {
        gemm_row_major_raw(
            handle,
            GemmMath::Fp32,
            trans_a,
            trans_b,
            m,
            n,
            k,
            alpha,
            pa,
            pb,
            beta,
            pc,
        )
    }
}

fn cublas_checks(gpu: &Gpu, cpu: &CpuDevice, rng: &mut Rng) -> Result<Vec<Row>, CudaError> {
    require(Lib::Cublas)?;
    let cb = |what: &str, e: cudarc::cublas::result::CublasError| CudaError::Cublas {
        what: what.into(),
        detail: format!("{e:?}"),
    };
    let blas = cudarc::cublas::CudaBlas::new(Arc::clone(&gpu.stream))
        .map_err(|e| cb("create handle", e))?;
    let handle = *blas.handle();
    // TF32 off: plain FP32 math.
    // SAFETY: a live handle.
    unsafe {
        cudarc::cublas::sys::cublasSetMathMode(
            handle,
            cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
        )
    }
    .result()
    .map_err(|e| cb("set math mode", e))?;
    let mut out = Vec::new();
    let (m, n, k) = (67usize, 93usize, 129usize);
    for (ta, tb, beta) in [(false, false, 0.0f32), (false, true, 0.0), (true, false, 1.0)] {
        let a = normal(rng, m * k, 1.0);
        let b = normal(rng, k * n, 1.0);
        let c0 = normal(rng, m * n, 1.0);
        let (ga, gb) = (gpu.upload(&a)?, gpu.upload(&b)?);
        let mut gc = gpu.upload(&c0)?;
        sgemm_row_major(gpu, &blas, ta, tb, m, n, k, 0.75, &ga, &gb, beta, &mut gc)?;
        let c = gpu.download(&gc)?;
        let mut cc = c0.clone();
        cpu.gemm(ta, tb, m, n, k, 0.75, &a, &b, beta, &mut cc);
        let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] } as f64;
        let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] } as f64;
        let cr: Vec<f64> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                0.75 * (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f64>()
                    + beta as f64 * c0[ij] as f64
            })
            .collect();
        let name = format!("sgemm {}{}", if ta { "T" } else { "N" }, if tb { "T" } else { "N" });
        out.push(row(
            "cublas",
            &name,
            format!("{m}x{n}x{k} beta={beta}"),
            Some(rel_err(&c, &cc)),
            Some(rel_err(&c, &cr)),
            1e-5,
        ));
    }
    Ok(out)
}

/// A [`Device`] method checked by the `device` group, with its scalar arguments. A case's
/// buffers are in the order [`apply_op`] passes them.
#[derive(Clone, Copy, Debug)]
enum DevOp {
    Gemm { ta: bool, tb: bool, alpha: f32, beta: f32 },
    BiasAdd,
    BiasGrad,
    GeluFwd,
    GeluBwd,
    ReluFwd,
    ReluBwd,
    LayerNormFwd { eps: f32 },
    LayerNormBwd,
    AddInplace,
    L2Fwd,
    L2Bwd,
    SoftmaxXent { grad_scale: f32 },
    SqNorm,
    Axpy { alpha: f32 },
    Scale { alpha: f32 },
    Copy,
}

/// One call of the `device` group: its buffers' initial contents (outputs that the method
/// overwrites are NaN) and the tolerance vs the CPU device.
struct DevCase {
    name: String,
    op: DevOp,
    /// `rows, cols, _` (GEMM: `m, n, k`).
    dims: [usize; 3],
    bufs: Vec<Vec<f32>>,
    labels: Vec<u32>,
    tol: f64,
}

/// Calls `op` on `dev`. Returns the method's scalar results (cross-entropy: loss sum and hits;
/// `sq_norm`), or `None` when `bufs` does not match the method (a bug in the case table).
fn apply_op<D: Device>(
    dev: &D,
    op: DevOp,
    [r, c, k]: [usize; 3],
    labels: &[u32],
    bufs: &mut [&mut [f32]],
) -> Option<Vec<f64>> {
    match (op, bufs) {
        (DevOp::Gemm { ta, tb, alpha, beta }, [a, b, cm]) => {
            dev.gemm(ta, tb, r, c, k, alpha, a, b, beta, cm)
        }
        (DevOp::BiasAdd, [y, bias]) => dev.bias_add(y, bias, r, c),
        (DevOp::BiasGrad, [dy, db]) => dev.bias_grad(dy, r, c, db),
        (DevOp::GeluFwd, [x, y]) => dev.gelu_fwd(x, y),
        (DevOp::GeluBwd, [x, dy, dx]) => dev.gelu_bwd(x, dy, dx),
        (DevOp::ReluFwd, [x, y]) => dev.relu_fwd(x, y),
        (DevOp::ReluBwd, [x, dy, dx]) => dev.relu_bwd(x, dy, dx),
        (DevOp::LayerNormFwd { eps }, [x, g, b, y, mean, rstd]) => {
            dev.layernorm_fwd(x, g, b, r, c, eps, y, mean, rstd)
        }
        (DevOp::LayerNormBwd, [x, g, mean, rstd, dy, dx, dg, db]) => {
            dev.layernorm_bwd(x, g, mean, rstd, dy, r, c, dx, dg, db)
        }
        (DevOp::AddInplace, [y, x]) => dev.add_inplace(y, x),
        (DevOp::L2Fwd, [x, y, norms]) => dev.l2_normalize_fwd(x, r, c, y, norms),
        (DevOp::L2Bwd, [y, norms, dy, dx]) => dev.l2_normalize_bwd(y, norms, dy, r, c, dx),
        (DevOp::SoftmaxXent { grad_scale }, [l, d]) => {
            let o = dev.softmax_xent(l, labels, r, c, grad_scale, d);
            return Some(vec![o.loss_sum, o.correct as f64]);
        }
        (DevOp::SqNorm, [x]) => return Some(vec![dev.sq_norm(x)]),
        (DevOp::Axpy { alpha }, [x, y]) => dev.axpy(alpha, x, y),
        (DevOp::Scale { alpha }, [x]) => dev.scale(alpha, x),
        (DevOp::Copy, [x, y]) => dev.copy(x, y),
        _ => return None,
    }
    Some(Vec::new())
}

/// Every method of [`Device`] on random inputs of odd sizes (the CPU device supplies the
/// LayerNorm statistics and normalised rows the backward passes take).
fn device_cases(rng: &mut Rng) -> Vec<DevCase> {
    let cpu = CpuDevice::new(1);
    let (rows, cols) = (37usize, 1031usize);
    let n = rows * cols;
    let (m, nn, k) = (67usize, 93usize, 129usize);
    let nan = |len: usize| vec![f32::NAN; len];
    let x: Vec<f32> = normal(rng, n, 1.5).iter().map(|v| v + 0.3).collect();
    let dy = normal(rng, n, 1.0);
    let gamma: Vec<f32> = normal(rng, cols, 0.2).iter().map(|v| v + 1.0).collect();
    let beta = normal(rng, cols, 0.2);
    let eps = 1e-5f32;
    let (mut y, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    cpu.layernorm_fwd(&x, &gamma, &beta, rows, cols, eps, &mut y, &mut mean, &mut rstd);
    let (mut l2y, mut norms) = (vec![0.0; n], vec![0.0; rows]);
    cpu.l2_normalize_fwd(&x, rows, cols, &mut l2y, &mut norms);
    let labels: Vec<u32> = (0..rows).map(|_| rng.below(cols as u64) as u32).collect();
    let rc = [rows, cols, 0];
    let case = |name: &str, op: DevOp, dims: [usize; 3], bufs: Vec<Vec<f32>>, tol: f64| DevCase {
        name: name.to_string(),
        op,
        dims,
        bufs,
        labels: Vec::new(),
        tol,
    };
    let mut cases = Vec::new();
    for (ta, tb, beta) in [(false, false, 0.0f32), (false, true, 0.0), (true, false, 1.0)] {
        let c0 = if beta == 0.0 { nan(m * nn) } else { normal(rng, m * nn, 1.0) };
        cases.push(case(
            &format!("gemm {}{}", if ta { "T" } else { "N" }, if tb { "T" } else { "N" }),
            DevOp::Gemm { ta, tb, alpha: 0.75, beta },
            [m, nn, k],
            vec![normal(rng, m * k, 1.0), normal(rng, k * nn, 1.0), c0],
            1e-5,
        ));
    }
    let zero_k = DevOp::Gemm { ta: false, tb: false, alpha: 1.0, beta: 0.0 };
    cases.push(case("gemm k=0", zero_k, [m, nn, 0], vec![vec![], vec![], nan(m * nn)], 0.0));
    cases.extend([
        case(
            "bias_add",
            DevOp::BiasAdd,
            rc,
            vec![normal(rng, n, 1.0), normal(rng, cols, 1.0)],
            1e-7,
        ),
        case("bias_grad", DevOp::BiasGrad, rc, vec![dy.clone(), normal(rng, cols, 1.0)], 1e-6),
        case("gelu_fwd", DevOp::GeluFwd, rc, vec![x.clone(), nan(n)], 1e-5),
        case("gelu_bwd", DevOp::GeluBwd, rc, vec![x.clone(), dy.clone(), nan(n)], 1e-5),
        case("relu_fwd", DevOp::ReluFwd, rc, vec![x.clone(), nan(n)], 0.0),
        case("relu_bwd", DevOp::ReluBwd, rc, vec![x.clone(), dy.clone(), nan(n)], 0.0),
        case(
            "layernorm_fwd",
            DevOp::LayerNormFwd { eps },
            rc,
            vec![x.clone(), gamma.clone(), beta, nan(n), nan(rows), nan(rows)],
            1e-6,
        ),
        case(
            "layernorm_bwd",
            DevOp::LayerNormBwd,
            rc,
            vec![
                x.clone(),
                gamma,
                mean,
                rstd,
                dy.clone(),
                nan(n),
                normal(rng, cols, 1.0),
                normal(rng, cols, 1.0),
            ],
            1e-5,
        ),
        case("add_inplace", DevOp::AddInplace, rc, vec![normal(rng, n, 1.0), x.clone()], 1e-7),
        case("l2_normalize_fwd", DevOp::L2Fwd, rc, vec![x.clone(), nan(n), nan(rows)], 1e-6),
        case("l2_normalize_bwd", DevOp::L2Bwd, rc, vec![l2y, norms, dy.clone(), nan(n)], 1e-5),
        DevCase {
            labels,
            ..case(
                "softmax_xent",
                DevOp::SoftmaxXent { grad_scale: 1.0 / rows as f32 },
                rc,
                vec![normal(rng, n, 3.0), nan(n)],
                1e-5,
            )
        },
        case("sq_norm", DevOp::SqNorm, rc, vec![x.clone()], 1e-12),
        case("axpy", DevOp::Axpy { alpha: -0.37 }, rc, vec![x.clone(), dy], 1e-6),
        case("copy", DevOp::Copy, rc, vec![x.clone(), nan(n)], 0.0),
        case("scale", DevOp::Scale { alpha: -0.37 }, rc, vec![x], 1e-7),
    ]);
    cases
}

/// Zero floats around each managed buffer of [`run_case`] (kernels must not touch them).
const PAD: usize = 3;

/// What one case left: every buffer, the scalars, and whether the padding stayed zero.
struct CaseOut {
    bufs: Vec<Vec<f32>>,
    scalars: Vec<f64>,
    pad_ok: bool,
}

/// Runs `case` on `dev`, on sub-slices of [`Device::alloc`] buffers when `managed` (read
/// after [`Device::synchronize`]), else on plain `Vec`s (read right after the call: staged
/// outputs must be back when it returns). `None` when the case's buffers do not fit its method.
fn run_case<D: Device>(dev: &D, case: &DevCase, managed: bool) -> Option<CaseOut> {
    if !managed {
        let mut bufs = case.bufs.clone();
        let mut views: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        let scalars = apply_op(dev, case.op, case.dims, &case.labels, &mut views)?;
        return Some(CaseOut { bufs, scalars, pad_ok: true });
    }
    let mut held: Vec<D::Buf> = case.bufs.iter().map(|v| dev.alloc(v.len() + 2 * PAD)).collect();
    dev.synchronize();
    for (b, v) in held.iter_mut().zip(&case.bufs) {
        b[PAD..PAD + v.len()].copy_from_slice(v);
    }
    let mut views: Vec<&mut [f32]> = held
        .iter_mut()
        .map(|b| {
            let end = b.len() - PAD;
            &mut b[PAD..end]
        })
        .collect();
    let scalars = apply_op(dev, case.op, case.dims, &case.labels, &mut views)?;
    dev.synchronize();
    let pad_ok = held.iter().all(|b| b[..PAD].iter().chain(&b[b.len() - PAD..]).all(|&v| v == 0.0));
    let bufs = held.iter().map(|b| b[PAD..b.len() - PAD].to_vec()).collect();
    Some(CaseOut { bufs, scalars, pad_ok })
}

/// Largest normwise error of `got` vs `want` over the buffers and the scalars.
fn case_err(got: &CaseOut, want: &CaseOut) -> f64 {
    let bufs = got.bufs.iter().zip(&want.bufs).map(|(g, w)| rel_err(g, w));
    let scalars = got.scalars.iter().zip(&want.scalars).map(|(g, w)| rel_err(&[*g], &[*w]));
    let n_ok = got.bufs.len() == want.bufs.len() && got.scalars.len() == want.scalars.len();
    let e = bufs.chain(scalars).fold(0.0, f64::max);
    if n_ok { e } else { f64::INFINITY }
}

/// Runs `f`; a panic (a [`CudaDevice`] fault, see its module documentation) becomes an error,
/// so it is a failed row and the later groups still run.
fn catch_fault<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        Err(CudaError::Invalid(format!("panicked: {msg}")))
    })
}

/// The fused loss as training on the GPU runs it (`FusedClipLoss::run_managed`): features in
/// the device's managed buffers still being written by queued work (a staged copy stands in
/// for the forward), gradients into managed buffers, every copy on the GPU. It must give
/// bitwise what the host-slice path (`FusedClipLoss::run`) gives for the same features.
fn managed_loss_check(dev: &CudaDevice, rng: &mut Rng) -> Row {
    let (b, d, scale) = (300usize, 96usize, 14.0f32);
    let (mode, prec) = (LossMode::Deterministic, Precision::Fp32);
    let unit = |rng: &mut Rng| {
        let mut v = normal(rng, b * d, 1.0);
        for r in v.chunks_mut(d) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
        v
    };
    let (img, txt) = (unit(rng), unit(rng));
    let r = catch_fault(|| {
        let (mut mi, mut mt) = (dev.alloc(b * d), dev.alloc(b * d));
        dev.copy(&img, &mut mi);
        dev.copy(&txt, &mut mt);
        let (mut gi, mut gt) = (dev.alloc(b * d), dev.alloc(b * d));
        let mut k = FusedClipLoss::default();
        let (loss, d_t) =
            k.run_managed(dev.gpu(), &mi, &mt, b, d, scale, mode, prec, &mut gi, &mut gt)?;
        let host = FusedClipLoss::default().run(dev.gpu(), &img, &txt, b, d, scale, mode, prec)?;
        let bits = |a: &[f32], c: &[f32]| a.iter().zip(c).all(|(x, y)| x.to_bits() == y.to_bits());
        let refused = k.run_managed(
            dev.gpu(),
            &img,
            &txt,
            b,
            d,
            scale,
            mode,
            prec,
            &mut gi.to_vec(),
            &mut gt.to_vec(),
        );
        Ok((
            loss.to_bits() == host.loss.to_bits()
                && d_t.to_bits() == host.d_t.to_bits()
                && bits(&gi, &host.d_img)
                && bits(&gt, &host.d_txt),
            matches!(refused, Err(CudaError::Invalid(_))),
        ))
    });
    let name = "fused loss managed".to_string();
    match r {
        Ok((same, refused)) => Row {
            group: "device",
            name,
            detail: format!(
                "B={b} d={d}: {} host path; host slices {}",
                if same { "bitwise the" } else { "DIFFERS from the" },
                if refused { "refused" } else { "ACCEPTED" }
            ),
            err_cpu: None,
            err_ref: None,
            tol: None,
            pass: same && refused,
        },
        Err(e) => failed("device", "fused loss managed", &e),
    }
}

/// The `device` group: every method of [`CudaDevice`] vs [`CpuDevice`] on managed buffers (no
/// staging allowed) and on plain `Vec`s (staged), then the `Vec` pass again: bitwise the same
/// results and no new scratch memory (the pool is reused).
fn device_checks(
    ordinal: usize,
    defs: &Defines,
    cpu: &CpuDevice,
    rng: &mut Rng,
) -> Result<Vec<Row>, CudaError> {
    let mut dev = CudaDevice::with_gpu(Gpu::open_with(ordinal, defs)?, CudaDeviceOpts::default())?;
    let table_bug =
        |c: &DevCase| CudaError::Invalid(format!("device check {}: buffers do not fit", c.name));
    let cases = device_cases(rng);
    let mut out = Vec::new();
    let mut vec_runs = Vec::new();
    for case in &cases {
        let want = run_case(cpu, case, false).ok_or_else(|| table_bug(case))?;
        for managed in [true, false] {
            let staged0 = dev.staged_count();
            let got = run_case(&dev, case, managed).ok_or_else(|| table_bug(case))?;
            let staged = dev.staged_count() - staged0;
            let staging_ok = if managed { staged == 0 } else { staged > 0 };
            let [a, b, c] = case.dims;
            let mut detail = format!("{a}x{b}x{c} staged={staged}");
            if !staging_ok {
                detail += " (unexpected)";
            }
            if !got.pad_ok {
                detail += " padding written";
            }
            let mode = if managed { "managed" } else { "vec" };
            let mut r = row(
                "device",
                &format!("{} {mode}", case.name),
                detail,
                Some(case_err(&got, &want)),
                None,
                case.tol,
            );
            r.pass &= staging_ok && got.pad_ok;
            out.push(r);
            if !managed {
                vec_runs.push(got);
            }
        }
    }
    let scratch = dev.scratch_bytes();
    let mut same = true;
    for (case, first) in cases.iter().zip(&vec_runs) {
        let again = run_case(&dev, case, false).ok_or_else(|| table_bug(case))?;
        let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        same &= again.bufs.iter().zip(&first.bufs).all(|(a, b)| bits(a, b))
            && again.scalars.iter().zip(&first.scalars).all(|(a, b)| a.to_bits() == b.to_bits());
    }
    let reused = dev.scratch_bytes() == scratch;
    out.push(Row {
        group: "device",
        name: "vec repeat".into(),
        detail: format!(
            "bitwise {}, pool {} KiB {}",
            if same { "same" } else { "DIFFERENT" },
            scratch / 1024,
            if reused { "reused" } else { "GREW" }
        ),
        err_cpu: None,
        err_ref: None,
        tol: None,
        pass: same && reused,
    });
    out.extend(model_step_checks(&dev, cpu, rng));
    out.push(frozen_model_step_check(&dev, cpu, rng));
    out.extend(optim_checks(&dev, rng));
    out.push(managed_loss_check(&dev, rng));
    // Tensor-core GEMMs: inputs rounded to 10 (TF32) or 7 (BF16) mantissa bits, so the
    // normwise error is about 2⁻¹¹·√2 or 2⁻⁸·√2 at these sizes; the bounds leave 5–10×.
    for (math, tol) in [(GemmMath::Tf32, 5e-3), (GemmMath::Bf16, 2e-2)] {
        dev.set_gemm_math(math)?;
        for case in cases.iter().filter(|c| matches!(c.op, DevOp::Gemm { .. }) && c.dims[2] > 0) {
            let want = run_case(cpu, case, false).ok_or_else(|| table_bug(case))?;
            let got = run_case(&dev, case, true).ok_or_else(|| table_bug(case))?;
            let [a, b, c] = case.dims;
            out.push(row(
                "device",
                &format!("{} {} managed", case.name, math.name()),
                format!("{a}x{b}x{c}"),
                Some(case_err(&got, &want)),
                None,
                tol,
            ));
        }
    }
    Ok(out)
}

/// One training step of the default dual encoder (depth 2, LayerNorm, GELU, residual) on the
/// GPU with its buffers in managed memory ([`Model::into_device`]) vs the same step on the
/// CPU: the features and the gradient buffer. Only the step's host inputs (the two views and
/// the two feature gradients) may be staged, and a second step must reuse the first step's
/// managed memory (the cache of dropped buffers), not allocate more.
fn model_step_checks(dev: &CudaDevice, cpu: &CpuDevice, rng: &mut Rng) -> Vec<Row> {
    use crate::model::{Model, ModelConfig};
    let cfg = ModelConfig::default();
    let batch = 67;
    let xa = normal(rng, batch * cfg.tower_a.input_dim, 1.0);
    let xb = normal(rng, batch * cfg.tower_b.input_dim, 1.0);
    let d = cfg.tower_a.output_dim;
    let (da, db) = (normal(rng, batch * d, 0.1), normal(rng, batch * d, 0.1));
    let mut on_cpu = Model::new(&cfg, 7).expect("the default model config is valid");
    let mut on_gpu = on_cpu.clone().into_device(dev);
    let (fa_cpu, fb_cpu) = on_cpu.forward_pair(cpu, &xa, &xb, batch);
    on_cpu.backward_pair(cpu, &da, &db);
    let mut rows = Vec::new();
    let mut managed = [0usize; 2];
    let mut results = Vec::new();
    for (i, m) in managed.iter_mut().enumerate() {
        let staged0 = dev.staged_count();
        let r = catch_fault(|| {
            on_gpu.zero_grads();
            let f = on_gpu.forward_pair(dev, &xa, &xb, batch);
            on_gpu.backward_pair(dev, &da, &db);
            Ok(f)
        });
        *m = dev.managed_bytes();
        match r {
            Ok(f) => results.push((f, on_gpu.grads().to_vec(), dev.staged_count() - staged0)),
            Err(e) => {
                rows.push(failed("device", &format!("model step {}", i + 1), &e));
                return rows;
            }
        }
    }
    let ((fa, fb), grads, staged) = &results[0];
    let f_err = rel_err(fa, &fa_cpu).max(rel_err(fb, &fb_cpu));
    rows.push(row(
        "device",
        "model step features",
        format!("batch {batch}"),
        Some(f_err),
        None,
        1e-5,
    ));
    let mut r = row(
        "device",
        "model step grads",
        format!("{} params staged={staged} (4 allowed)", grads.len()),
        Some(rel_err(grads, on_cpu.grads())),
        None,
        1e-4,
    );
    r.pass &= *staged <= 4;
    rows.push(r);
    let (_, grads2, _) = &results[1];
    let same = grads.iter().zip(grads2).all(|(a, b)| a.to_bits() == b.to_bits());
    rows.push(Row {
        group: "device",
        name: "model step repeat".into(),
        detail: format!(
            "bitwise {}, managed {} KiB then {} KiB",
            if same { "same" } else { "DIFFERENT" },
            managed[0] / 1024,
            managed[1] / 1024
        ),
        err_cpu: None,
        err_ref: None,
        tol: None,
        pass: same && managed[1] == managed[0],
    });
    rows
}

/// One step of the default dual encoder with parts frozen (`model.freeze`): tower a's input
/// layer and its first block's LayerNorm gain, tower b's second block. The backward passes the
/// gradient down through the frozen block, writes the frozen gain's gradient to a spare buffer
/// and stops above tower a's input layer: the gradient must match the CPU's, with every frozen
/// tensor's exactly zero.
fn frozen_model_step_check(dev: &CudaDevice, cpu: &CpuDevice, rng: &mut Rng) -> Row {
    use crate::model::{Model, ModelConfig};
    let freeze = ["a.in", "a.blocks.0.ln.gamma", "b.blocks.1"];
    let cfg = ModelConfig { freeze: freeze.map(String::from).to_vec(), ..ModelConfig::default() };
    let name = "model step, partly frozen";
    let batch = 53;
    let xa = normal(rng, batch * cfg.tower_a.input_dim, 1.0);
    let xb = normal(rng, batch * cfg.tower_b.input_dim, 1.0);
    let d = cfg.tower_a.output_dim;
    let (da, db) = (normal(rng, batch * d, 0.1), normal(rng, batch * d, 0.1));
    let mut on_cpu = Model::new(&cfg, 7).expect("the frozen tensors exist in the default model");
    let mut on_gpu = on_cpu.clone().into_device(dev);
    on_cpu.forward_pair(cpu, &xa, &xb, batch);
    on_cpu.backward_pair(cpu, &da, &db);
    let r = catch_fault(|| {
        on_gpu.forward_pair(dev, &xa, &xb, batch);
        on_gpu.backward_pair(dev, &da, &db);
        Ok(())
    });
    if let Err(e) = r {
        return failed("device", name, &e);
    }
    let grads = on_gpu.grads();
    let frozen: Vec<_> = on_gpu.param_groups().into_iter().filter(|g| !g.trainable).collect();
    let zero = frozen.iter().all(|g| grads[g.offset..g.offset + g.len].iter().all(|v| *v == 0.0));
    let values: usize = frozen.iter().map(|g| g.len).sum();
    let mut r = row(
        "device",
        name,
        format!(
            "{values} of {} values frozen, their gradient {}",
            grads.len(),
            if zero { "zero" } else { "NOT ZERO" }
        ),
        Some(rel_err(grads, on_cpu.grads())),
        None,
        1e-4,
    );
    r.pass &= zero;
    r
}

/// The optimizer on the GPU ([`Optimizer::step_on`] with its state in managed memory) vs the
/// host optimizer, every variant of the engine's tests (optim/cases.rs) on two layouts: the
/// tests' seven small tensors and one with a 300×400 weight (many blocks per tensor). Three
/// steps each; parameters and momentum within 1e-6 normwise (the element arithmetic is the
/// CPU's, so they differ only where a norm summed in another order moves a trust ratio by an
/// ulp), the statistics' ratios within 1e-12. The first layout also runs with the parameters
/// in host memory (staged), which must give the same result.
fn optim_checks(dev: &CudaDevice, rng: &mut Rng) -> Vec<Row> {
    use crate::optim::{Optimizer, TensorGroup, cases};
    let wide = vec![
        TensorGroup::from_shape("wide.weight", 0, 120_000, &[300, 400], true),
        TensorGroup::from_shape("wide.bias", 120_000, 400, &[400], true),
        TensorGroup::from_shape("ln.gamma", 120_400, 37, &[37], true),
        TensorGroup::from_shape("logit_scale", 120_437, 1, &[], true),
    ];
    let layouts = [("small", cases::model_groups(), true), ("wide", wide, false)];
    let mut rows = Vec::new();
    for (layout, groups, staged_too) in &layouts {
        let n = groups.iter().map(|g| g.offset + g.len).max().unwrap_or(0);
        let p0 = normal(rng, n, 1.0);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| normal(rng, n, 0.1)).collect();
        rows.push(norm_checks(dev, layout, groups, &grads[0]));
        for (vi, c) in cases::variants().iter().enumerate() {
            let mut host = Optimizer::new(c, groups.clone()).expect("the test variants are valid");
            let mut p_host = p0.clone();
            let want: Vec<_> = grads
                .iter()
                .enumerate()
                .map(|(s, g)| host.step(&mut p_host, g, 0.1 * (s + 1) as f64, s as u64))
                .collect();
            for managed in [true, false].into_iter().filter(|&m| m || *staged_too) {
                let name = format!(
                    "optim {}#{vi} {layout} {}",
                    c.name,
                    if managed { "managed" } else { "vec" }
                );
                let r = catch_fault(|| {
                    let mut opt =
                        Optimizer::new(c, groups.clone()).expect("valid").into_device(dev);
                    let (mut pm, mut gm) = (dev.alloc(n), dev.alloc(n));
                    dev.synchronize();
                    pm.copy_from_slice(&p0);
                    let mut pv = p0.clone();
                    let mut stats = Vec::new();
                    for (s, g) in grads.iter().enumerate() {
                        let lr = 0.1 * (s + 1) as f64;
                        stats.push(if managed {
                            gm.copy_from_slice(g);
                            opt.step_on(dev, &mut pm, &gm, lr, s as u64)
                        } else {
                            opt.step_on(dev, &mut pv, g, lr, s as u64)
                        });
                    }
                    let p = if managed { pm.to_vec() } else { pv };
                    Ok((p, opt.velocity().to_vec(), stats))
                });
                let (p, v, stats) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        rows.push(failed("device", &name, &e));
                        continue;
                    }
                };
                let ratio_err = stats
                    .iter()
                    .zip(&want)
                    .flat_map(|(a, b)| a.groups.iter().zip(&b.groups))
                    .map(|(a, b)| (a.ratio - b.ratio).abs() / b.ratio.abs().max(1e-30))
                    .fold(0.0, f64::max);
                let same =
                    p.iter().zip(&p_host).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                let err = rel_err(&p, &p_host).max(rel_err(&v, host.velocity()));
                let mut r = row(
                    "device",
                    &name,
                    format!("3 steps, {same}/{n} params bitwise, ratio err {ratio_err:.1e}"),
                    Some(err),
                    None,
                    1e-6,
                );
                r.pass &= ratio_err <= 1e-12;
                rows.push(r);
            }
        }
    }
    rows
}

/// The noise scale's group norms ([`Device::sq_norms`]) and the non-finite check
/// ([`Device::all_finite`]) on a managed gradient: norms within 1e-12 of the host's, finite
/// data finite, and one NaN or infinity anywhere (first, middle, last value) found.
fn norm_checks(
    dev: &CudaDevice,
    layout: &str,
    groups: &[crate::optim::TensorGroup],
    g: &[f32],
) -> Row {
    let name = format!("sq_norms+all_finite {layout}");
    let spans: Vec<(usize, usize)> = groups.iter().map(|t| (t.offset, t.len)).collect();
    let r = catch_fault(|| {
        let mut x = dev.alloc(g.len());
        dev.synchronize();
        x.copy_from_slice(g);
        let norms = dev.sq_norms(&x, &spans);
        let mut found = dev.all_finite(&x);
        for (at, bad) in [(0, f32::NAN), (g.len() / 2, f32::INFINITY), (g.len() - 1, f32::NAN)] {
            let keep = x[at];
            x[at] = bad;
            found &= !dev.all_finite(&x);
            x[at] = keep;
        }
        Ok((norms, found))
    });
    match r {
        Ok((norms, ok)) => {
            let want = crate::gns::host_sq_norms(g, &spans);
            let mut r = row(
                "device",
                &name,
                format!(
                    "{} groups, non-finite {}",
                    spans.len(),
                    if ok { "found" } else { "MISSED" }
                ),
                Some(rel_err(&norms, &want)),
                None,
                1e-12,
            );
            r.pass &= ok;
            r
        }
        Err(e) => failed("device", &name, &e),
    }
}

/// Random L2-normalised `b × d` features.
pub fn random_features(rng: &mut Rng, b: usize, d: usize) -> Vec<f32> {
    let mut v = normal(rng, b * d, 1.0);
    for r in v.chunks_mut(d) {
        let n = r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
    }
    v
}

/// Tolerances `(loss, gradients)` of the fused loss at `precision` and logit scale `scale`
/// (normwise relative errors against the CPU's fp32 loss and the f64 reference).
///
/// TF32 rounds the inputs of the logit products to 10-bit mantissas: the error of x grows with
/// s, and softmax passes it on. fp32 and 3xTF32 stay near fp32. BF16 rounds them to 7-bit
/// mantissas (8 significant bits vs TF32's 11): each logit moves by about s·2⁻⁸ instead of
/// s·2⁻¹¹, so the loss bound is TF32's × 8. The gradient bound stays TF32's 5e-2: with bf16
/// features in the logits and in G·T, Gᵀ·I, a CPU emulation of the rounding at the four sizes
/// of [`loss_checks`] gives normwise errors of 1.4e-3…4.3e-3 (about 2⁻⁸), so 5e-2 leaves > 10×
/// (for the ring's sizes see the test `ring_bf16_tolerances_fit_the_rounding`); TF32's × 8 =
/// 0.4 would not: a wrong fragment layout (two emulated: swapped A registers, reversed B
/// columns) moves these gradients, of random features under a flat softmax, by only 0.2…0.8.
pub(crate) fn loss_tols(precision: Precision, scale: f32) -> (f64, f64) {
    match precision {
        Precision::Tf32 => (2e-3 * (scale as f64 / 10.0).max(1.0), 5e-2),
        Precision::Bf16 => (1.6e-2 * (scale as f64 / 10.0).max(1.0), 5e-2),
        Precision::Fp32 | Precision::Tf32x3 => (1e-4, 1e-4),
    }
}

fn loss_checks(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, CudaError> {
    use crate::loss::{RingLossOpts, clip_loss_reference_f64, clip_loss_ring};
    let mut out = Vec::new();
    for &(b, d, scale) in
        &[(333usize, 77usize, 14.3f32), (1000, 129, 100.0), (61, 5, 1.0), (3000, 64, 30.0)]
    {
        let img = random_features(rng, b, d);
        let txt = random_features(rng, b, d);
        let mut comms = tessera_collectives::threads::ThreadComm::group(1);
        let cpu = clip_loss_ring(&mut comms[0], &img, &txt, b, d, scale, &RingLossOpts::default())
            .map_err(|e| CudaError::Invalid(format!("CPU tiled loss failed: {e}")))?;
        let (lr, dir, dtr, dtr_t) =
            clip_loss_reference_f64(&to64(&img), &to64(&txt), b, d, scale as f64);
        let detail = format!("B={b} d={d} s={scale}");
        for prec in Precision::ALL {
            let (tol_loss, tol_grad) = loss_tols(prec, scale);
            let mut det_runs = Vec::new();
            // The backward's column splits as planned (at these sizes, several on a large GPU)
            // and, for the two larger cases, none (the grid of large batches).
            let splits: &[Option<usize>] = if b >= 1000 { &[None, Some(1)] } else { &[None] };
            for (mode, &bwd_splits) in [LossMode::Deterministic, LossMode::Fast]
                .into_iter()
                .flat_map(|m| splits.iter().map(move |s| (m, s)))
            {
                let mut loss = FusedClipLoss::default();
                loss.bwd_splits = bwd_splits;
                let g = loss.run(gpu, &img, &txt, b, d, scale, mode, prec)?;
                let tag = format!(
                    "{} {}{}",
                    prec.name(),
                    if mode == LossMode::Fast { "fast" } else { "det" },
                    if bwd_splits.is_some() { " 1 split" } else { "" }
                );
                let checks: [(&str, f64, f64, f64); 4] = [
                    ("loss", rel_err(&[g.loss], &[cpu.loss]), rel_err(&[g.loss], &[lr]), tol_loss),
                    ("dI", rel_err(&g.d_img, &cpu.d_img_local), rel_err(&g.d_img, &dir), tol_grad),
                    ("dT", rel_err(&g.d_txt, &cpu.d_txt_local), rel_err(&g.d_txt, &dtr), tol_grad),
                    (
                        "dt",
                        rel_err(&[g.d_t], &[cpu.d_t_partial]),
                        rel_err(&[g.d_t], &[dtr_t]),
                        tol_grad,
                    ),
                ];
                for (what, e_cpu, e_ref, tol) in checks {
                    out.push(row(
                        "loss",
                        &format!("clip {tag} {what}"),
                        detail.clone(),
                        Some(e_cpu),
                        Some(e_ref),
                        tol,
                    ));
                }
                if mode == LossMode::Deterministic && bwd_splits.is_none() {
                    det_runs.push(g);
                    det_runs.push(clip_loss(gpu, &img, &txt, b, d, scale, mode, prec)?);
                }
            }
            let (r0, r1) = (&det_runs[0], &det_runs[1]);
            let bits =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            let same = r0.loss.to_bits() == r1.loss.to_bits()
                && r0.d_t.to_bits() == r1.d_t.to_bits()
                && bits(&r0.d_img, &r1.d_img)
                && bits(&r0.d_txt, &r1.d_txt);
            out.push(Row {
                group: "loss",
                name: format!("clip {} det repeat", prec.name()),
                detail: format!("{detail} bitwise"),
                err_cpu: None,
                err_ref: None,
                tol: None,
                pass: same,
            });
        }
    }
    Ok(out)
}

fn nccl_check(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, CudaError> {
    // Every collective of NcclComm at world size 1 vs the input (what the CPU computes), the
    // device-buffer path, argument errors and an init timeout (super::nccl::world1_checks).
    let checks = super::nccl::world1_checks(&gpu.ctx, rng.next_u64())?;
    Ok(checks
        .into_iter()
        .map(|c| match c.err {
            Some(e) => row("nccl", &c.name, c.detail, Some(e), None, 0.0),
            None => Row {
                group: "nccl",
                name: c.name,
                detail: c.detail,
                err_cpu: None,
                err_ref: None,
                tol: None,
                pass: c.pass,
            },
        })
        .collect())
}

/// The ring checks' rows per rank (world sizes 1–3, unequal), feature dimension, logit scale and
/// chunk rows.
const RING_SIZES: [&[usize]; 3] = [&[301], &[230, 157], &[130, 200, 64]];
const RING_D: usize = 67;
const RING_SCALE: f32 = 20.0;
const RING_CHUNK_ROWS: usize = 96;

/// The CLIP ring with its blocks on the GPU ([`super::ring::GpuClipBlocks`]) against the CPU's
/// ring ([`crate::loss::clip_loss_ring`]) at the same world size: 1, 2 and 3 ranks as threads
/// sharing this GPU, unequal rows per rank, chunks of 96 rows (several rounds, a short last
/// chunk), fp32 and TF32, deterministic and fast. Every rank's loss, dI, dT and dt share.
/// BF16 (deterministic and fast) gets a row per quantity, against the CPU ring and the f64
/// reference of the whole batch, with the single-GPU bf16 tolerances ([`loss_tols`]), and a
/// bitwise repeat of deterministic mode.
///
/// SigLIP's one pass (`siglip_bwd*` blocks) likewise against the CPU's SigLIP ring: fp32 with
/// host messages, fp32 fast and TF32 on the device ring, a row per quantity (∂L/∂β too) of BF16
/// against the CPU ring and the f64 reference, and a bitwise repeat of fp32 deterministic.
fn ring_checks(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, CudaError> {
    use super::ring::{BlockTravel, GpuClipBlocks};
    use crate::loss::{
        RingLossOpts, RingLossOut, clip_loss_reference_f64, clip_loss_ring_with,
        siglip_loss_ring_with,
    };
    use tessera_collectives::threads::ThreadComm;
    let (d, scale, chunk_rows) = (RING_D, RING_SCALE, RING_CHUNK_ROWS);
    let mut out = Vec::new();
    for sizes in RING_SIZES.map(<[usize]>::to_vec) {
        let world = sizes.len();
        let feats: Vec<(Vec<f32>, Vec<f32>)> = sizes
            .iter()
            .map(|&b| (random_features(rng, b, d), random_features(rng, b, d)))
            .collect();
        let opts = RingLossOpts { chunk_rows, ..RingLossOpts::default() };
        // CLIP, or SigLIP with the logit bias `bias`.
        let run_loss = |gpu_ops: Option<(LossMode, Precision, BlockTravel)>,
                        bias: Option<f32>|
         -> Result<Vec<RingLossOut>, String> {
            std::thread::scope(|s| {
                let hs: Vec<_> = ThreadComm::group(world)
                    .into_iter()
                    .zip(&feats)
                    .zip(&sizes)
                    .map(|((mut c, (img, txt)), &b)| {
                        let opts = &opts;
                        s.spawn(move || -> Result<RingLossOut, String> {
                            let c = &mut c;
                            let r = match (gpu_ops, bias) {
                                (None, None) => {
                                    crate::loss::clip_loss_ring(c, img, txt, b, d, scale, opts)
                                }
                                (None, Some(bias)) => crate::loss::siglip_loss_ring(
                                    c, img, txt, b, d, scale, bias, opts,
                                ),
                                (Some((mode, prec, travel)), _) => {
                                    let mut ops = GpuClipBlocks::new(gpu, mode, prec)
                                        .map_err(|e| e.to_string())?
                                        .with_travel(travel);
                                    let k = &mut ops;
                                    match bias {
                                        None => clip_loss_ring_with(
                                            c, k, chunk_rows, None, img, txt, b, d, scale, None,
                                        ),
                                        Some(bias) => siglip_loss_ring_with(
                                            c, k, chunk_rows, None, img, txt, b, d, scale, bias,
                                            None,
                                        ),
                                    }
                                }
                            };
                            r.map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
                    .collect()
            })
        };
        let run = |gpu_ops| run_loss(gpu_ops, None);
        let cpu = run(None).map_err(|e| CudaError::Invalid(format!("CPU ring loss: {e}")))?;
        let detail = format!("rows {sizes:?} d={d} s={scale} chunk {chunk_rows}");
        // Host messages (the blocks' ring over a communicator other than NCCL), then the device
        // ring (rank/src/loss/ring_device.rs: the blocks' own buffers, each hop staged through
        // the host here, as NCCL refuses ranks sharing a GPU).
        for (mode, prec, tol, travel) in [
            (LossMode::Deterministic, Precision::Fp32, 1e-4, BlockTravel::Host),
            (LossMode::Fast, Precision::Fp32, 1e-4, BlockTravel::Host),
            (LossMode::Deterministic, Precision::Tf32, 5e-2, BlockTravel::Host),
            (LossMode::Deterministic, Precision::Fp32, 1e-4, BlockTravel::Device),
            (LossMode::Fast, Precision::Tf32, 5e-2, BlockTravel::Device),
        ] {
            let name = format!(
                "ring{} {} {} world {world}",
                if travel == BlockTravel::Device { " device" } else { "" },
                prec.name(),
                if mode == LossMode::Fast { "fast" } else { "det" }
            );
            let detail = detail.clone();
            match run(Some((mode, prec, travel))) {
                Ok(got) => {
                    let mut err = 0.0f64;
                    for (g, c) in got.iter().zip(&cpu) {
                        err = err
                            .max(rel_err(&[g.loss], &[c.loss]))
                            .max(rel_err(&g.d_img_local, &c.d_img_local))
                            .max(rel_err(&g.d_txt_local, &c.d_txt_local))
                            .max(rel_err(&[g.d_t_partial], &[c.d_t_partial]));
                    }
                    out.push(row("loss", &name, detail, Some(err), None, tol));
                }
                Err(e) => out.push(failed("loss", &name, &CudaError::Invalid(e))),
            }
        }
        // BF16: the whole batch's f64 reference (rank r's rows follow rank r − 1's).
        let all_img: Vec<f64> = feats.iter().flat_map(|(i, _)| to64(i)).collect();
        let all_txt: Vec<f64> = feats.iter().flat_map(|(_, t)| to64(t)).collect();
        let big_b = sizes.iter().sum::<usize>();
        let reference = clip_loss_reference_f64(&all_img, &all_txt, big_b, d, scale as f64);
        let (tol_loss, tol_grad) = loss_tols(Precision::Bf16, scale);
        for (mode, travel) in [
            (LossMode::Deterministic, BlockTravel::Host),
            (LossMode::Fast, BlockTravel::Host),
            (LossMode::Deterministic, BlockTravel::Device),
        ] {
            let tag = format!(
                "ring{} bf16 {} world {world}",
                if travel == BlockTravel::Device { " device" } else { "" },
                if mode == LossMode::Fast { "fast" } else { "det" }
            );
            let got = match run(Some((mode, Precision::Bf16, travel))) {
                Ok(got) => got,
                Err(e) => {
                    out.push(failed("loss", &tag, &CudaError::Invalid(e)));
                    continue;
                }
            };
            for (what, e_cpu, e_ref) in ring_errs(&got, &cpu, &reference) {
                let tol = if what == "loss" { tol_loss } else { tol_grad };
                let name = format!("{tag} {what}");
                out.push(row("loss", &name, detail.clone(), Some(e_cpu), Some(e_ref), tol));
            }
            if mode == LossMode::Deterministic {
                let name = format!("{tag} repeat");
                let same = match run(Some((mode, Precision::Bf16, travel))) {
                    Ok(again) => same_ring_bits(&got, &again),
                    Err(e) => {
                        out.push(failed("loss", &name, &CudaError::Invalid(e)));
                        continue;
                    }
                };
                out.push(Row {
                    group: "loss",
                    name,
                    detail: format!("{detail} bitwise"),
                    err_cpu: None,
                    err_ref: None,
                    tol: None,
                    pass: same,
                });
            }
        }
        out.extend(siglip_ring_rows(&run_loss, &feats, &sizes, &detail)?);
    }
    Ok(out)
}

/// The SigLIP logit bias of the self-test's rings (with `RING_SCALE`, so that the sigmoids are
/// neither saturated nor all near one half).
const RING_SIGLIP_BIAS: f32 = -4.0;

/// A ring run of [`ring_checks`]: GPU blocks (`Some`) or the CPU ring, CLIP or SigLIP (bias).
type RingRun<'a> = dyn Fn(
        Option<(LossMode, Precision, super::ring::BlockTravel)>,
        Option<f32>,
    ) -> Result<Vec<crate::loss::RingLossOut>, String>
    + 'a;

/// [`ring_checks`]'s SigLIP rows for one world (see there).
fn siglip_ring_rows(
    run: &RingRun<'_>,
    feats: &[(Vec<f32>, Vec<f32>)],
    sizes: &[usize],
    detail: &str,
) -> Result<Vec<Row>, CudaError> {
    use super::ring::BlockTravel::{Device, Host};
    use crate::loss::siglip_loss_reference_f64;
    use LossMode::{Deterministic as Det, Fast};
    let (world, d, scale, bias) = (sizes.len(), RING_D, RING_SCALE, RING_SIGLIP_BIAS);
    let mut out = Vec::new();
    let detail = format!("{detail} bias={bias}");
    let cpu = run(None, Some(bias))
        .map_err(|e| CudaError::Invalid(format!("CPU SigLIP ring loss: {e}")))?;
    let db = |o: &crate::loss::RingLossOut| o.d_bias_partial.unwrap_or(f32::NAN);
    for (mode, prec, tol, travel) in [
        (Det, Precision::Fp32, 1e-4, Host),
        (Fast, Precision::Fp32, 1e-4, Device),
        (Det, Precision::Tf32, 5e-2, Device),
    ] {
        let name = format!(
            "siglip ring{} {} {} world {world}",
            if travel == Device { " device" } else { "" },
            prec.name(),
            if mode == Fast { "fast" } else { "det" }
        );
        match run(Some((mode, prec, travel)), Some(bias)) {
            Ok(got) => {
                let mut err = if got.len() == cpu.len() { 0.0f64 } else { f64::INFINITY };
                for (g, c) in got.iter().zip(&cpu) {
                    err = err
                        .max(rel_err(&[g.loss], &[c.loss]))
                        .max(rel_err(&g.d_img_local, &c.d_img_local))
                        .max(rel_err(&g.d_txt_local, &c.d_txt_local))
                        .max(rel_err(&[g.d_t_partial], &[c.d_t_partial]))
                        .max(rel_err(&[db(g)], &[db(c)]));
                }
                out.push(row("loss", &name, detail.clone(), Some(err), None, tol));
            }
            Err(e) => out.push(failed("loss", &name, &CudaError::Invalid(e))),
        }
    }
    // BF16 on the device ring, per quantity against the CPU ring and the f64 reference.
    let all_img: Vec<f64> = feats.iter().flat_map(|(i, _)| to64(i)).collect();
    let all_txt: Vec<f64> = feats.iter().flat_map(|(_, t)| to64(t)).collect();
    let big_b = sizes.iter().sum::<usize>();
    let (l, di, dtx, dt, dbias) =
        siglip_loss_reference_f64(&all_img, &all_txt, big_b, d, scale as f64, bias as f64);
    let tag = format!("siglip ring device bf16 det world {world}");
    match run(Some((Det, Precision::Bf16, Device)), Some(bias)) {
        Ok(got) => {
            let (tol_loss, tol_grad) = loss_tols(Precision::Bf16, scale);
            let mut errs = ring_errs(&got, &cpu, &(l, di, dtx, dt)).to_vec();
            let db_sum = |o: &[crate::loss::RingLossOut]| o.iter().map(|r| db(r) as f64).sum();
            let (g_db, c_db): (f64, f64) = (db_sum(&got), db_sum(&cpu));
            errs.push(("dbias", rel_err(&[g_db], &[c_db]), rel_err(&[g_db], &[dbias])));
            for (what, e_cpu, e_ref) in errs {
                let tol = if what == "loss" { tol_loss } else { tol_grad };
                let name = format!("{tag} {what}");
                out.push(row("loss", &name, detail.clone(), Some(e_cpu), Some(e_ref), tol));
            }
        }
        Err(e) => out.push(failed("loss", &tag, &CudaError::Invalid(e))),
    }
    // Deterministic mode repeats bitwise (∂L/∂β included).
    let name = format!("siglip ring device fp32 det world {world} repeat");
    let twice = run(Some((Det, Precision::Fp32, Device)), Some(bias))
        .and_then(|a| Ok((run(Some((Det, Precision::Fp32, Device)), Some(bias))?, a)));
    match twice {
        Ok((a, b)) => {
            let same = same_ring_bits(&a, &b)
                && a.iter().zip(&b).all(|(x, y)| db(x).to_bits() == db(y).to_bits());
            out.push(Row {
                group: "loss",
                name,
                detail: format!("{detail} bitwise"),
                err_cpu: None,
                err_ref: None,
                tol: None,
                pass: same,
            });
        }
        Err(e) => out.push(failed("loss", &name, &CudaError::Invalid(e))),
    }
    Ok(out)
}

/// The errors of a ring's outputs (`got`, one per rank in rank order) against the CPU ring's
/// (`cpu`) and the f64 reference of the whole batch (`(loss, dI, dT, dt)` of
/// [`crate::loss::clip_loss_reference_f64`]): `(quantity, vs CPU, vs reference)` for the loss
/// (the worst rank's), dI and dT (the ranks' rows concatenated) and dt (the ranks' shares
/// summed); infinite everywhere when a rank's outputs are missing.
fn ring_errs(
    got: &[crate::loss::RingLossOut],
    cpu: &[crate::loss::RingLossOut],
    reference: &(f64, Vec<f64>, Vec<f64>, f64),
) -> [(&'static str, f64, f64); 4] {
    let (lr, dir, dtr, dtr_t) = reference;
    let names = ["loss", "dI", "dT", "dt"];
    if got.is_empty() || got.len() != cpu.len() {
        return names.map(|n| (n, f64::INFINITY, f64::INFINITY));
    }
    let worst = |want: f64| got.iter().map(|g| rel_err(&[g.loss], &[want])).fold(0.0, f64::max);
    let rows = |o: &[crate::loss::RingLossOut], dt: bool| -> Vec<f32> {
        o.iter()
            .flat_map(|r| if dt { &r.d_txt_local } else { &r.d_img_local }.iter().copied())
            .collect()
    };
    let dt_sum = |o: &[crate::loss::RingLossOut]| o.iter().map(|r| r.d_t_partial as f64).sum();
    let (gi, gt, g_dt): (_, _, f64) = (rows(got, false), rows(got, true), dt_sum(got));
    let (ci, ct, c_dt): (_, _, f64) = (rows(cpu, false), rows(cpu, true), dt_sum(cpu));
    [
        ("loss", worst(cpu[0].loss as f64), worst(*lr)),
        ("dI", rel_err(&gi, &ci), rel_err(&gi, dir)),
        ("dT", rel_err(&gt, &ct), rel_err(&gt, dtr)),
        ("dt", rel_err(&[g_dt], &[c_dt]), rel_err(&[g_dt], &[*dtr_t])),
    ]
}

/// Whether two runs of the ring gave bitwise the same outputs on every rank.
fn same_ring_bits(a: &[crate::loss::RingLossOut], b: &[crate::loss::RingLossOut]) -> bool {
    let bits = |x: &[f32], y: &[f32]| {
        x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
    };
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.loss.to_bits() == y.loss.to_bits()
                && x.d_t_partial.to_bits() == y.d_t_partial.to_bits()
                && bits(&x.d_img_local, &y.d_img_local)
                && bits(&x.d_txt_local, &y.d_txt_local)
        })
}

/// One timing of [`bench_loss`] or [`bench_siglip`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    /// `clip` or `siglip`.
    pub loss_name: &'static str,
    pub b: usize,
    pub d: usize,
    pub mode: String,
    pub precision: String,
    /// Median milliseconds of forward + backward.
    pub ms_median: f64,
    pub ms_min: f64,
    /// Median milliseconds of the forward (the bf16 copies, the tile kernels, the LSE merge,
    /// the loss's sum) and of the backward (zeroing, the backward kernels, the sum of dL/dt),
    /// each over the same runs (their medians need not add up to `ms_median`).
    pub fwd_ms_median: f64,
    pub bwd_ms_median: f64,
    /// Fingerprints of the gradients of the last run (see [`grad_fingerprint`]): the norms of
    /// dI and dT and their projections on a fixed ±1 sequence, so that two builds (or kernel
    /// knobs) timed on the same inputs can be checked to give the same gradients.
    pub grad_norm_i: f64,
    pub grad_norm_t: f64,
    pub grad_proj_i: f64,
    pub grad_proj_t: f64,
    /// FP32 TFLOP/s counting `2·B²·d` per GEMM-equivalent (CLIP: 5 deterministic, 4 fast;
    /// SigLIP: 4 and 3).
    pub tflops: f64,
    /// Device bytes of the loss buffers (the caller's fp32 features excluded; bf16: the bf16
    /// copies included).
    pub workspace_bytes: usize,
    /// Column splits of the backward's grid ([`super::gpu::plan_bwd`]).
    pub bwd_splits: usize,
    pub loss: f64,
}

/// `(‖v‖, Σ wᵢ vᵢ)` with wᵢ = ±1 from a fixed xorshift sequence: a gradient that differs from
/// another by a relative error ε moves the projection by about ε‖v‖, so comparing both at a
/// tolerance of a few 1e-2 of the norm tells a wrong gradient (ε near 1) from rounding.
pub fn grad_fingerprint(v: &[f32]) -> (f64, f64) {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    let (mut n2, mut proj) = (0.0f64, 0.0f64);
    for &x in v {
        h ^= h << 13;
        h ^= h >> 7;
        h ^= h << 17;
        let x = x as f64;
        n2 += x * x;
        proj += if h & 1 == 0 { x } else { -x };
    }
    (n2.sqrt(), proj)
}

/// Times the fused loss (forward + backward) at `b × d`, `reps` timed runs after one warm-up,
/// with CUDA events; `bwd_splits`: the backward's column splits (None: as planned).
#[allow(clippy::too_many_arguments)]
pub fn bench_loss(
    gpu: &Gpu,
    b: usize,
    d: usize,
    mode: LossMode,
    precision: Precision,
    reps: usize,
    seed: u64,
    bwd_splits: Option<usize>,
) -> Result<BenchRow, CudaError> {
    let mut rng = Rng::new(seed);
    let img = gpu.upload(&random_features(&mut rng, b, d))?;
    let txt = gpu.upload(&random_features(&mut rng, b, d))?;
    let mut bufs = super::gpu::LossBuffers::new(gpu, b, d)?;
    bufs.bwd_splits = bwd_splits;
    let scale = 14.3f32;
    super::gpu::clip_loss_launch(gpu, &mut bufs, &img, &txt, scale, mode, precision, None)?;
    gpu.sync()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (mut times, mut fwd, mut bwd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        let start = drv("event", gpu.ctx.new_event(flags))?;
        let mid = drv("event", gpu.ctx.new_event(flags))?;
        let stop = drv("event", gpu.ctx.new_event(flags))?;
        drv("record", start.record(&gpu.stream))?;
        super::gpu::clip_loss_launch(
            gpu,
            &mut bufs,
            &img,
            &txt,
            scale,
            mode,
            precision,
            Some(&mid),
        )?;
        drv("record", stop.record(&gpu.stream))?;
        drv("event sync", stop.synchronize())?;
        times.push(drv("elapsed", start.elapsed_ms(&stop))? as f64);
        fwd.push(drv("elapsed", start.elapsed_ms(&mid))? as f64);
        bwd.push(drv("elapsed", mid.elapsed_ms(&stop))? as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med = median(&mut times);
    let (fwd_med, bwd_med) = (median(&mut fwd), median(&mut bwd));
    let gemms = if mode == LossMode::Fast { 4.0 } else { 5.0 };
    let flops = gemms * 2.0 * (b as f64) * (b as f64) * d as f64;
    let (loss, _) = super::gpu::read_scalars(gpu, &bufs)?;
    let (grad_norm_i, grad_proj_i) = grad_fingerprint(&gpu.download(&bufs.d_img)?[..b * d]);
    let (grad_norm_t, grad_proj_t) = grad_fingerprint(&gpu.download(&bufs.d_txt)?[..b * d]);
    Ok(BenchRow {
        loss_name: "clip",
        b,
        d,
        mode: format!("{mode:?}").to_lowercase(),
        precision: precision.name().to_string(),
        ms_median: med,
        ms_min: times[0],
        fwd_ms_median: fwd_med,
        bwd_ms_median: bwd_med,
        grad_norm_i,
        grad_norm_t,
        grad_proj_i,
        grad_proj_t,
        tflops: flops / (med * 1e-3) / 1e12,
        workspace_bytes: bufs.bytes(),
        bwd_splits: bufs.last_bwd.map_or(1, |p| p.splits()),
        loss,
    })
}

/// Times SigLIP's fused block work on one GPU (`siglip_bwd*` over the whole batch as one
/// block, the ring's work at world size 1: the loss and both gradients in one pass), as
/// [`bench_loss`] times CLIP's: features already on the GPU, median of `reps` runs between
/// events, each run ending with the host's read of the block's partial sums. The forward
/// columns are 0 (SigLIP has none).
pub fn bench_siglip(
    gpu: &Gpu,
    b: usize,
    d: usize,
    mode: LossMode,
    precision: Precision,
    reps: usize,
    seed: u64,
) -> Result<BenchRow, CudaError> {
    use super::ring::GpuClipBlocks;
    use crate::loss::ClipBlocks;
    let mut rng = Rng::new(seed);
    let img = random_features(&mut rng, b, d);
    let txt = gpu.upload(&random_features(&mut rng, b, d))?;
    let mut d_txt = gpu.zeros::<f32>(b * d)?;
    let (scale, bias) = (14.3f32, -10.0f32);
    let mut ops = GpuClipBlocks::new(gpu, mode, precision)?;
    let invalid = |e: crate::loss::LossError| CudaError::Invalid(e.to_string());
    ops.sig_begin(&img, (0..b).collect(), d, scale, bias, b).map_err(invalid)?;
    ops.sig_queue(&txt, b, 0, &mut d_txt)?;
    gpu.sync()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        // dI accumulates over the runs (as over a ring's blocks); the timing is the same.
        let start = drv("event", gpu.ctx.new_event(flags))?;
        let stop = drv("event", gpu.ctx.new_event(flags))?;
        drv("record", start.record(&gpu.stream))?;
        ops.sig_queue(&txt, b, 0, &mut d_txt)?;
        drv("record", stop.record(&gpu.stream))?;
        drv("event sync", stop.synchronize())?;
        times.push(drv("elapsed", start.elapsed_ms(&stop))? as f64);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = sorted[sorted.len() / 2];
    let gemms = if mode == LossMode::Fast { 3.0 } else { 4.0 };
    let flops = gemms * 2.0 * (b as f64) * (b as f64) * d as f64;
    let workspace_bytes = ops.device_bytes();
    // One more run, untimed, from a zeroed dI: the gradients and loss of one call.
    ops.sig_begin(&img, (0..b).collect(), d, scale, bias, b).map_err(invalid)?;
    let sums = ops.sig_queue(&txt, b, 0, &mut d_txt)?;
    let d_img = ops.bwd_end().map_err(invalid)?;
    let (grad_norm_i, grad_proj_i) = grad_fingerprint(&d_img);
    let (grad_norm_t, grad_proj_t) = grad_fingerprint(&gpu.download(&d_txt)?[..b * d]);
    let wave = super::gpu::backward_wave(gpu, &super::ring::siglip_kernel(mode, precision))?;
    Ok(BenchRow {
        loss_name: "siglip",
        b,
        d,
        mode: format!("{mode:?}").to_lowercase(),
        precision: precision.name().to_string(),
        ms_median: med,
        ms_min: sorted[0],
        fwd_ms_median: 0.0,
        bwd_ms_median: med,
        grad_norm_i,
        grad_norm_t,
        grad_proj_i,
        grad_proj_t,
        tflops: flops / (med * 1e-3) / 1e12,
        workspace_bytes,
        bwd_splits: super::gpu::plan_bwd(mode, b, b, d, wave, None).splits(),
        loss: sums[1] / b as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint tells a gradient from a wrong one (another vector of the same norm) and
    /// from a permuted one, and not from a rounded one.
    #[test]
    fn grad_fingerprints_tell_wrong_gradients_from_rounding() {
        let mut rng = Rng::new(4);
        let g = random_features(&mut rng, 300, 64);
        let wrong = random_features(&mut rng, 300, 64);
        let rounded: Vec<f32> = g.iter().map(|&x| x * (1.0 + 1e-3 * (x.signum()))).collect();
        let mut permuted = g.clone();
        permuted.rotate_left(1);
        let (n, p) = grad_fingerprint(&g);
        assert!((n - (300f64).sqrt()).abs() < 1e-3, "rows of unit norm: {n}");
        let close = |v: &[f32]| {
            let (n2, p2) = grad_fingerprint(v);
            (n2 - n).abs() <= 2e-2 * n && (p2 - p).abs() <= 2e-2 * n
        };
        assert!(close(&g) && close(&rounded));
        assert!(!close(&wrong) && !close(&permuted));
    }

    #[test]
    fn rel_err_is_normwise_and_nan_is_infinite() {
        assert_eq!(rel_err(&[1.0f32, 2.0], &[1.0f64, 2.0]), 0.0);
        let e = rel_err(&[1.0f32, 2.1], &[1.0f64, 2.0]);
        assert!((e - 0.1 / 5f64.sqrt()).abs() < 1e-6, "{e}");
        assert_eq!(rel_err(&[f32::NAN], &[1.0f64]), f64::INFINITY);
        assert_eq!(rel_err(&[1.0f32], &[1.0f64, 2.0]), f64::INFINITY);
    }

    #[test]
    fn report_fails_on_any_failed_row_and_prints_a_table() {
        let mut rep = Report { device: "x".into(), arch: "sm_90".into(), rows: Vec::new() };
        assert!(!rep.passed(), "an empty report is not a pass");
        rep.rows.push(row("kernel", "a", "n=1".into(), Some(1e-7), Some(1e-7), 1e-6));
        assert!(rep.passed());
        rep.rows.push(row("kernel", "b", "n=1".into(), Some(1e-3), None, 1e-6));
        assert!(!rep.passed());
        let t = rep.table();
        assert!(t.contains("FAIL") && t.contains("2 checks, 1 failed"), "{t}");
    }

    /// The `device` group's table on the CPU device: every case fits its method, writes every
    /// output it poisons with NaN, leaves the padding of its buffers alone, and gives the same
    /// bits on `alloc` buffers (sub-slices) as on plain `Vec`s.
    #[test]
    fn a_fault_is_an_error_row_not_the_end_of_the_selftest() {
        let e = catch_fault::<()>(|| panic!("CudaDevice: launch of kernel gelu_fwd failed: X"))
            .expect_err("a panic is an error");
        assert!(e.to_string().contains("gelu_fwd failed: X"), "{e}");
        assert_eq!(catch_fault(|| Ok(7)).ok(), Some(7));
    }

    #[test]
    fn device_cases_fit_their_methods_on_the_cpu() {
        let cpu = CpuDevice::new(1);
        let cases = device_cases(&mut Rng::new(3));
        assert!(cases.len() >= 19, "every Device method has a case");
        for case in &cases {
            let plain = run_case(&cpu, case, false).unwrap_or_else(|| panic!("{}", case.name));
            let held = run_case(&cpu, case, true).unwrap_or_else(|| panic!("{}", case.name));
            assert!(held.pad_ok, "{}", case.name);
            assert_eq!(case_err(&held, &plain), 0.0, "{}", case.name);
            for (j, b) in plain.bufs.iter().enumerate() {
                assert!(
                    b.iter().all(|v| v.is_finite()),
                    "{} buffer {j} not fully written",
                    case.name
                );
            }
            assert!(plain.scalars.iter().all(|v| v.is_finite()), "{}", case.name);
        }
        let xent = cases.iter().find(|c| c.name == "softmax_xent").expect("softmax_xent case");
        assert_eq!(run_case(&cpu, xent, false).map(|o| o.scalars.len()), Some(2));
        // A case whose buffers do not fit its method is reported, not run.
        let bad = DevCase { bufs: vec![vec![1.0]], ..device_cases(&mut Rng::new(3)).remove(0) };
        assert!(run_case(&cpu, &bad, false).is_none());
    }

    /// Round to the nearest bf16, ties to even, as `cvt.rn.bf16.f32` (finite values).
    fn bf16_rne(x: f32) -> f32 {
        let b = x.to_bits();
        f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        let ulp = 2f32.powi(-7); // of bf16 at 1
        assert_eq!(bf16_rne(1.0), 1.0);
        assert_eq!(bf16_rne(1.0 + 0.5 * ulp), 1.0, "a tie goes to the even 1.0");
        assert_eq!(bf16_rne(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp, "a tie goes to the even 1 + 2u");
        assert_eq!(bf16_rne(1.0 + 0.6 * ulp), 1.0 + ulp);
        assert_eq!(bf16_rne(-0.3), -bf16_rne(0.3));
        assert_eq!(bf16_rne(0.3).to_bits() & 0xffff, 0);
    }

    /// The bf16 ring rows' tolerances ([`loss_tols`]) at the ring checks' sizes: the f64 loss
    /// at the bf16-rounded features (what the bf16 kernels compute, up to their fp32
    /// accumulation) is within a fifth of them, and two plausible bugs of a visiting block's
    /// bf16 copy fail them: the copy read with the fp32 row stride d instead of its padded
    /// stride, and the block's rows past its first 64 read as the zero padding.
    #[test]
    fn ring_bf16_tolerances_fit_the_rounding() {
        use crate::device::cuda::gpu::bf16_layout;
        use crate::loss::clip_loss_reference_f64;
        let (d, scale) = (RING_D, RING_SCALE);
        let (tol_loss, tol_grad) = loss_tols(Precision::Bf16, scale);
        let tols = [tol_loss, tol_grad, tol_grad, tol_grad];
        let mut rng = Rng::new(11);
        for sizes in RING_SIZES {
            let b: usize = sizes.iter().sum();
            let img: Vec<f64> = to64(&random_features(&mut rng, b, d));
            let txt: Vec<f64> = to64(&random_features(&mut rng, b, d));
            let exact = clip_loss_reference_f64(&img, &txt, b, d, scale as f64);
            let errs = |i: &[f64], t: &[f64]| -> [f64; 4] {
                let (l, di, dtf, dt) = clip_loss_reference_f64(i, t, b, d, scale as f64);
                [
                    rel_err(&[l], &[exact.0]),
                    rel_err(&di, &exact.1),
                    rel_err(&dtf, &exact.2),
                    rel_err(&[dt], &[exact.3]),
                ]
            };
            let round =
                |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| bf16_rne(x as f32) as f64).collect() };
            let (ih, th) = (round(&img), round(&txt));
            let e = errs(&ih, &th);
            for (what, (e, tol)) in ["loss", "dI", "dT", "dt"].iter().zip(e.iter().zip(tols)) {
                assert!(*e <= tol / 5.0, "{sizes:?} {what}: bf16 rounding {e:.2e}, tol {tol}");
            }
            // The largest rank's text block, its rows [r0, r0 + nb) of the batch.
            let (big, &nb) = sizes.iter().enumerate().max_by_key(|&(_, &n)| n).unwrap();
            let r0: usize = sizes[..big].iter().sum();
            let (rows_p, ld) = bf16_layout(nb, d);
            let mut copy = vec![0.0f64; rows_p * ld];
            for r in 0..nb {
                copy[r * ld..r * ld + d].copy_from_slice(&th[(r0 + r) * d..(r0 + r + 1) * d]);
            }
            let mut strided = th.clone();
            strided[r0 * d..(r0 + nb) * d].copy_from_slice(&copy[..nb * d]);
            let mut cut = th.clone();
            cut[(r0 + 64) * d..(r0 + nb) * d].iter_mut().for_each(|x| *x = 0.0);
            for (bug, t) in [("stride d", &strided), ("rows past 64 zero", &cut)] {
                let e = errs(&ih, t);
                let worst = e.iter().zip(tols).map(|(e, tol)| e / tol).fold(0.0, f64::max);
                assert!(worst > 2.0, "{sizes:?}: {bug} passes the bf16 rows ({e:?})");
            }
        }
    }

    /// The bf16 ring rows' errors: the loss of the worst rank, dI and dT over the ranks' rows in
    /// rank order, dt as the sum of the ranks' shares; a missing rank fails every row.
    #[test]
    fn ring_errs_concatenate_ranks_and_sum_dt_shares() {
        use crate::loss::RingLossOut;
        let out = |loss: f32, di: &[f32], dt: &[f32], share: f32| RingLossOut {
            loss,
            d_img_local: di.to_vec(),
            d_txt_local: dt.to_vec(),
            d_t_partial: share,
            d_bias_partial: None,
            workspace_bytes: 0,
        };
        let cpu = vec![out(2.0, &[1.0, 2.0], &[3.0], 0.25), out(2.0, &[4.0], &[5.0, 6.0], 0.5)];
        let reference = (2.0, vec![1.0, 2.0, 4.0], vec![3.0, 5.0, 6.0], 0.75);
        let errs = |got: &[RingLossOut]| ring_errs(got, &cpu, &reference);
        for (what, e_cpu, e_ref) in errs(&cpu) {
            assert_eq!((e_cpu, e_ref), (0.0, 0.0), "{what}");
        }
        // Rank 1's dT off, its loss off: only those rows move; dt is the sum of the shares.
        let mut got = cpu.clone();
        got[1].d_txt_local[1] = 6.5;
        got[1].loss = 2.5;
        got[0].d_t_partial = 0.5;
        got[1].d_t_partial = 0.25;
        let e = errs(&got);
        assert_eq!(e.map(|x| x.0), ["loss", "dI", "dT", "dt"]);
        assert!((e[0].1 - 0.25).abs() < 1e-12 && (e[0].2 - 0.25).abs() < 1e-12, "{e:?}");
        assert_eq!((e[1].1, e[1].2), (0.0, 0.0));
        let want = 0.5 / (9.0f64 + 25.0 + 36.0).sqrt();
        assert!((e[2].1 - want).abs() < 1e-12 && (e[2].2 - want).abs() < 1e-12, "{e:?}");
        assert_eq!((e[3].1, e[3].2), (0.0, 0.0), "shares summed: 0.75 either way");
        let e = errs(&cpu[..1]);
        assert!(e.iter().all(|x| x.1 == f64::INFINITY && x.2 == f64::INFINITY), "{e:?}");
    }

    #[test]
    fn without_a_driver_run_is_a_clean_error() {
        if Lib::Driver.present() {
            // A GPU machine: the whole self-test must pass.
            let rep = run(0, 1, &Defines::default()).unwrap_or_else(|e| panic!("{e}"));
            assert!(rep.passed(), "{}", rep.table());
            return;
        }
        let e =
            run(0, 1, &Defines::default()).expect_err("run must fail without a driver").to_string();
        assert!(e.contains("libcuda.so.1") && e.contains("NVIDIA driver"), "{e}");
    }
}
