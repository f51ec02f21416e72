//! The fused-loss kernels of clip_loss.cu run by the CPU emulation against the f64 reference.

use super::support::{Guarded, NAN_BF16, NAN_F32, NAN_F64, to64};
use super::{Args, EmuModule, module, module_with};
use crate::device::cuda::gpu::{
    LOSS_TILE, LossMode, Precision, bf16_layout, bwd_shared_bytes, plan_fwd_grid,
};
use crate::device::cuda::nvrtc::Defines;
use crate::device::cuda::selftest::{loss_tols, random_features, rel_err};
use crate::loss::clip_loss_reference_f64;
use crate::rng::Rng;

struct EmuLoss {
    loss: f64,
    d_img: Vec<f32>,
    d_txt: Vec<f32>,
    d_t: f64,
    /// Whether every buffer's guards held.
    guards: bool,
}

fn launch(m: &EmuModule, name: &str, grid: u32, grid_y: u32, args: &mut Args) {
    launch_shared(m, name, grid, grid_y, 0, args)
}

fn launch_shared(m: &EmuModule, name: &str, grid: u32, grid_y: u32, shared: u32, args: &mut Args) {
    // SAFETY: each call below passes clip_loss.cu's parameter list with buffers sized as
    // gpu::clip_loss_launch sizes them (plus guards), and the dynamic shared memory it gives.
    unsafe { m.launch(name, (grid, grid_y, 1), (256, 1, 1), shared, args) }
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The launches of `gpu::clip_loss_launch`, in its order, with its grids and argument lists,
/// on guarded host buffers; `target`: the forward's block budget (a GPU's one wave), small here
/// so that rows and columns are split among several blocks. `m` compiled with the knobs `defs`.
#[allow(clippy::too_many_arguments)]
fn emu_clip_loss(
    m: &EmuModule,
    defs: &Defines,
    img: &[f32],
    txt: &[f32],
    b: usize,
    d: usize,
    scale: f32,
    mode: LossMode,
    prec: Precision,
    target: usize,
) -> EmuLoss {
    let n_t = b.div_ceil(LOSS_TILE);
    let grid = plan_fwd_grid(n_t, target);
    let (bi, di) = (b as i64, d as i64);
    let img = Guarded::from(img, NAN_F32);
    let txt = Guarded::from(txt, NAN_F32);
    let (rows_p, ld_p) = bf16_layout(b, d);
    let mut img_h = Guarded::new(rows_p * ld_p, NAN_BF16, NAN_BF16);
    let mut txt_h = Guarded::new(rows_p * ld_p, NAN_BF16, NAN_BF16);
    let bf16 = prec == Precision::Bf16;
    if bf16 {
        let mut a = Args::new();
        a.buf(img.get()).buf(txt.get()).i64(bi).i64(di).i64(rows_p as i64).i64(ld_p as i64);
        a.buf_mut(img_h.get_mut()).buf_mut(txt_h.get_mut());
        launch(m, "clip_to_bf16", rows_p.clamp(1, 65535) as u32, 1, &mut a);
    }
    let ld = if bf16 { ld_p as i64 } else { di };
    let feats = |a: &mut Args| {
        if bf16 {
            a.buf(img_h.get()).buf(txt_h.get());
        } else {
            a.buf(img.get()).buf(txt.get());
        }
    };
    let (chunks, splits) = (grid.chunks, grid.splits);
    let mut row_m = Guarded::new(splits * b, NAN_F32, NAN_F32);
    let mut row_z = Guarded::new(splits * b, NAN_F32, NAN_F32);
    let mut col_m = Guarded::new(chunks * b, NAN_F32, NAN_F32);
    let mut col_z = Guarded::new(chunks * b, NAN_F32, NAN_F32);
    let mut pos = Guarded::new(b, NAN_F32, NAN_F32);
    let mut a = Args::new();
    feats(&mut a);
    a.i64(bi).i64(bi).i64(ld).f32(scale).i64(0);
    a.i32(grid.tiles_per_chunk as i32).i32(grid.tiles_per_split as i32);
    a.buf_mut(row_m.get_mut()).buf_mut(row_z.get_mut());
    a.buf_mut(col_m.get_mut()).buf_mut(col_z.get_mut()).buf_mut(pos.get_mut());
    let fwd = format!("clip_fwd{}", prec.suffix());
    launch(m, &fwd, chunks as u32, splits as u32, &mut a);

    let [mut lse_hi, mut lse_lo, mut kap_hi, mut kap_lo] =
        std::array::from_fn(|_| Guarded::new(b, NAN_F32, NAN_F32));
    let mut term = Guarded::new(b, NAN_F64, NAN_F64);
    let mut a = Args::new();
    a.buf(row_m.get()).buf(row_z.get()).i32(splits as i32);
    a.buf(col_m.get()).buf(col_z.get()).i32(chunks as i32).buf(pos.get()).i64(bi);
    a.buf_mut(lse_hi.get_mut()).buf_mut(lse_lo.get_mut());
    a.buf_mut(kap_hi.get_mut()).buf_mut(kap_lo.get_mut()).buf_mut(term.get_mut());
    launch(m, "clip_lse", b.div_ceil(256).clamp(1, 8192) as u32, 1, &mut a);

    let mut loss = Guarded::new(1, NAN_F64, NAN_F64);
    let mut a = Args::new();
    a.buf(term.get()).i64(bi).buf_mut(loss.get_mut());
    launch(m, "sum_f64", 1, 1, &mut a);

    let mut d_img = Guarded::new(b * d, 0.0f32, NAN_F32);
    let mut d_txt = Guarded::new(b * d, 0.0f32, NAN_F32);
    let mut dt_part = Guarded::new(n_t, NAN_F64, NAN_F64);
    let inv2b = (1.0 / (2.0 * b as f64)) as f32;
    // Fast mode: clip_bwd*, dT by atomicAdd; deterministic mode: both passes in one launch of
    // clip_bwd_pair* (grid y = 2).
    let (bwd, grid_y) = match mode {
        LossMode::Fast => (format!("clip_bwd{}", prec.suffix()), 1),
        LossMode::Deterministic => (prec.bwd_pair(), 2),
    };
    let mut a = Args::new();
    feats(&mut a);
    a.i64(bi).i64(bi).i64(di);
    if bf16 {
        a.i64(ld);
    }
    a.f32(scale).f32(inv2b);
    a.buf(lse_hi.get()).buf(lse_lo.get()).buf(kap_hi.get()).buf(kap_lo.get()).i64(0);
    a.buf_mut(d_img.get_mut()).buf_mut(d_txt.get_mut()).buf_mut(dt_part.get_mut());
    launch_shared(m, &bwd, n_t as u32, grid_y, bwd_shared_bytes(prec, defs), &mut a);
    let mut dt = Guarded::new(1, NAN_F64, NAN_F64);
    let mut a = Args::new();
    a.buf(dt_part.get()).i64(n_t as i64).buf_mut(dt.get_mut());
    launch(m, "sum_f64", 1, 1, &mut a);

    let guards = [&img, &txt, &row_m, &row_z, &col_m, &col_z, &pos].iter().all(|g| g.intact())
        && [&lse_hi, &lse_lo, &kap_hi, &kap_lo, &d_img, &d_txt].iter().all(|g| g.intact())
        && [&term, &loss, &dt_part, &dt].iter().all(|g| g.intact())
        && img_h.intact()
        && txt_h.intact();
    EmuLoss {
        loss: loss.get()[0] / (2.0 * b as f64),
        d_img: d_img.get().to_vec(),
        d_txt: d_txt.get().to_vec(),
        d_t: dt.get()[0],
        guards,
    }
}

/// Every precision and mode of the fused loss, as clip_loss_launch runs it, at sizes that leave
/// partial tiles in both directions (B not a multiple of 64, d not a multiple of 16 or 64), a
/// forward grid of several chunks and splits, and a d with many k-stages and feature chunks; the same tolerances as `tessera cuda selftest`.
/// Sensitivity, tried by hand: with the emulated A fragments' registers 1 and 2 swapped (in
/// both mma emulations) the first tensor-core case fails at once (3xTF32: loss 9.9e-3, dI 0.46);
/// with a wrong row in the transposed gradient product's A fragment (`product_tc`), fast mode's
/// dT fails (0.69); with the bf16 product's second B pair swapped (`product_bf16`), dI fails
/// (0.97).
#[test]
fn fused_loss_kernels_match_the_f64_reference_in_every_precision_and_mode() {
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let none = Defines::default();
    let mut rng = Rng::new(5);
    // (64, 200): one tile, but 13 k-stages and 4 feature chunks (the last 8 wide, bf16 padded
    // to 256) per tile.
    let cases = [(130usize, 40usize, 14.3f32, 4usize), (70, 75, 30.0, 2), (64, 200, 10.0, 1)];
    for &(b, d, scale, target) in &cases {
        let img = random_features(&mut rng, b, d);
        let txt = random_features(&mut rng, b, d);
        let (lr, dir, dtr, dtr_t) =
            clip_loss_reference_f64(&to64(&img), &to64(&txt), b, d, scale as f64);
        for prec in Precision::ALL {
            let (tol_loss, tol_grad) = loss_tols(prec, scale);
            for mode in LossMode::ALL {
                let t = std::time::Instant::now();
                let g = emu_clip_loss(&m, &none, &img, &txt, b, d, scale, mode, prec, target);
                let errs = [
                    ("loss", rel_err(&[g.loss], &[lr]), tol_loss),
                    ("dI", rel_err(&g.d_img, &dir), tol_grad),
                    ("dT", rel_err(&g.d_txt, &dtr), tol_grad),
                    ("dt", rel_err(&[g.d_t], &[dtr_t]), tol_grad),
                ];
                eprintln!(
                    "B={b} d={d} s={scale} {} {}: {errs:?} ({:.1?})",
                    prec.name(),
                    mode.name(),
                    t.elapsed()
                );
                assert!(
                    g.guards,
                    "{} {}: a kernel wrote outside its buffers",
                    prec.name(),
                    mode.name()
                );
                for (what, e, tol) in errs {
                    assert!(
                        e <= tol,
                        "B={b} d={d} {} {} {what}: {e:.3e} > {tol}",
                        prec.name(),
                        mode.name()
                    );
                }
            }
        }
    }
}

/// The bf16 backward with G panels of 2 and 4 column tiles (`CLIP_BWD_PANEL`, dynamic shared
/// memory): bitwise the single-tile kernels' results, since a dA job then sums the same
/// products in the same order without the round trip through dA between tiles, at sizes where
/// the last panel is partial (B = 130: 3 tiles; 260: 5) or a single tile (B = 64), in both
/// modes, and within the f64 reference's tolerances. Sensitivity, tried by hand: with the
/// transposed product reading the panel's first tile for every dB job, fast mode's dT differs.
#[test]
fn bf16_backward_panels_give_the_single_tile_results_bitwise() {
    let none = Defines::default();
    let one = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(11);
    let cases = [(130usize, 40usize, 14.3f32, 4usize), (260, 72, 30.0, 3), (64, 200, 10.0, 1)];
    let data: Vec<_> = cases
        .iter()
        .map(|&(b, d, ..)| (random_features(&mut rng, b, d), random_features(&mut rng, b, d)))
        .collect();
    // The single-tile kernels' results, per case and mode.
    let single: Vec<Vec<EmuLoss>> = cases
        .iter()
        .zip(&data)
        .map(|(&(b, d, scale, target), (img, txt))| {
            LossMode::ALL
                .iter()
                .map(|&mode| {
                    emu_clip_loss(&one, &none, img, txt, b, d, scale, mode, Precision::Bf16, target)
                })
                .collect()
        })
        .collect();
    for panel in [2, 4] {
        let defs = Defines::parse(&[format!("CLIP_BWD_PANEL={panel}")]).unwrap();
        assert_eq!(bwd_shared_bytes(Precision::Bf16, &defs), 64 * (64 * panel + 8) * 2);
        let m = module_with("clip_loss.cu", &defs).unwrap_or_else(|e| panic!("{e}"));
        for ((&(b, d, scale, target), (img, txt)), single) in cases.iter().zip(&data).zip(&single) {
            let (lr, dir, dtr, dtr_t) =
                clip_loss_reference_f64(&to64(img), &to64(txt), b, d, scale as f64);
            let (tol_loss, tol_grad) = loss_tols(Precision::Bf16, scale);
            for (mode, s) in LossMode::ALL.into_iter().zip(single) {
                let p =
                    emu_clip_loss(&m, &defs, img, txt, b, d, scale, mode, Precision::Bf16, target);
                let what = format!("panel {panel}, B={b} d={d} {}", mode.name());
                assert!(p.guards, "{what}: a kernel wrote outside its buffers");
                assert!(rel_err(&[p.loss], &[lr]) <= tol_loss, "{what}: loss");
                for (name, got, want) in [("dI", &p.d_img, &dir), ("dT", &p.d_txt, &dtr)] {
                    let e = rel_err(got, want);
                    assert!(e <= tol_grad, "{what}: {name} {e:.3e} > {tol_grad}");
                }
                assert!(rel_err(&[p.d_t], &[dtr_t]) <= tol_grad, "{what}: dt");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&p.d_img) == bits(&s.d_img), "{what}: dI differs from one tile's");
                assert!(bits(&p.d_txt) == bits(&s.d_txt), "{what}: dT differs from one tile's");
                assert_eq!(p.loss.to_bits(), s.loss.to_bits(), "{what}: loss");
                assert_eq!(p.d_t.to_bits(), s.d_t.to_bits(), "{what}: dt");
            }
        }
    }
}

/// The translation unit registers every static `__shared__` array for poisoning (also the one
/// declared with a trailing comment) and maps `extern __shared__` to the dynamic shared memory.
#[test]
fn translation_units_register_shared_memory_and_know_every_kernel() {
    use crate::device::cuda::nvrtc::SOURCES;
    for src in SOURCES {
        let tu = super::translation_unit(src);
        let declared =
            src.src.lines().filter(|l| l.trim_start().starts_with("__shared__ ")).count();
        assert_eq!(tu.matches("static emu::Reg emu_reg_").count(), declared, "{}", src.name);
        assert!(!tu.contains("extern __shared__"), "{}", src.name);
        for k in src.kernels {
            assert!(tu.contains(&format!("emu::launch({k}, ")), "{}: {k}", src.name);
        }
    }
    let tu = super::translation_unit(SOURCES.iter().find(|s| s.name == "clip_loss.cu").unwrap());
    assert!(tu.contains(
        "__shared__ __align__(16) float FG[FG_BYTES / 4]; static emu::Reg emu_reg_FG(&FG, sizeof FG);  \
         // the stages"
    ));
}
