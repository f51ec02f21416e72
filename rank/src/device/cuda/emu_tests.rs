//! The fused-loss kernels of clip_loss.cu run by the CPU emulation against the f64 reference.

use super::support::{Guarded, NAN_BF16, NAN_F32, NAN_F64, to64};
use super::{Args, EmuModule, module, module_with, with_block_order};
use crate::device::cuda::gpu::{
    LOSS_TILE, LossMode, Precision, bf16_layout, bwd_shared_bytes, plan_bwd, plan_fwd_grid,
};
use crate::device::cuda::nvrtc::Defines;
use crate::device::cuda::selftest::{loss_tols, random_features, rel_err};
use crate::loss::clip_loss_reference_f64;
use crate::rng::Rng;

/// The loss's inputs: `b × d` image and text features and the logit scale.
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub img: &'a [f32],
    pub txt: &'a [f32],
    pub b: usize,
    pub d: usize,
    pub scale: f32,
}

pub(super) struct EmuLoss {
    pub loss: f64,
    pub d_img: Vec<f32>,
    pub d_txt: Vec<f32>,
    pub d_t: f64,
    /// Whether every buffer's guards held.
    pub guards: bool,
}

/// Asserts that `got`'s loss, gradients and dL/dt are bitwise `want`'s (`what` names the run).
fn assert_same_bits(what: &str, got: &EmuLoss, want: &EmuLoss) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{what}: loss");
    assert!(bits(&got.d_img) == bits(&want.d_img), "{what}: dI differs");
    assert!(bits(&got.d_txt) == bits(&want.d_txt), "{what}: dT differs");
    assert_eq!(got.d_t.to_bits(), want.d_t.to_bits(), "{what}: dt");
}

/// Asserts that `got`'s gradients are within `tol` (normwise) of `want`'s; returns whether any
/// of their bits differ.
fn assert_close_grads(what: &str, got: &EmuLoss, want: &EmuLoss, tol: f64) -> bool {
    let mut moved = false;
    for (name, g, w) in [("dI", &got.d_img, &want.d_img), ("dT", &got.d_txt, &want.d_txt)] {
        let e = rel_err(g, &to64(w));
        assert!(e <= tol, "{what}: {name} {e:.3e} > {tol}");
        moved |= g.iter().zip(w).any(|(a, b)| a.to_bits() != b.to_bits());
    }
    moved
}

fn launch(m: &EmuModule, name: &str, grid: u32, grid_y: u32, args: &mut Args) {
    launch_shared(m, name, (grid, grid_y, 1), 0, args)
}

fn launch_shared(m: &EmuModule, name: &str, grid: (u32, u32, u32), shared: u32, args: &mut Args) {
    // SAFETY: each call below passes clip_loss.cu's parameter list with buffers sized as
    // gpu::clip_loss_launch sizes them (plus guards), and the dynamic shared memory it gives.
    unsafe { m.launch(name, grid, (256, 1, 1), shared, args) }.unwrap_or_else(|e| panic!("{e}"));
}

/// The launches of `gpu::clip_loss_launch`, in its order, with its grids and argument lists,
/// on guarded host buffers; `target`: the forward's and the backward's block budget (a GPU's
/// one wave), small here so that rows and columns are split among several blocks;
/// `bwd_splits`: the backward's column splits instead of the planned ones (`LossBuffers::
/// bwd_splits`). `m` compiled with the knobs `defs`.
pub(super) fn emu_clip_loss(
    m: &EmuModule,
    defs: &Defines,
    x: &Inputs,
    mode: LossMode,
    prec: Precision,
    target: usize,
    bwd_splits: Option<usize>,
) -> EmuLoss {
    let Inputs { img, txt, b, d, scale } = *x;
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
    let plan = plan_bwd(mode, b, b, d, target, bwd_splits);
    let mut dt_part = Guarded::new(plan.dt_parts, NAN_F64, NAN_F64);
    let mut parts = Guarded::new(plan.parts_len, NAN_F32, NAN_F32);
    let inv2b = (1.0 / (2.0 * b as f64)) as f32;
    // Fast mode: clip_bwd*, dT by atomicAdd; deterministic mode: both passes in one launch of
    // clip_bwd_pair* (grid y = 2); the columns split in grid z as planned.
    let bwd = match mode {
        LossMode::Fast => format!("clip_bwd{}", prec.suffix()),
        LossMode::Deterministic => prec.bwd_pair(),
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
    if plan.parts_len > 0 {
        a.buf_mut(parts.get_mut());
    } else {
        a.null();
    }
    launch_shared(m, &bwd, plan.grid, bwd_shared_bytes(prec, defs), &mut a);
    // gpu::fold_splits: the swapped pass's shares after the first's.
    let n = b * d;
    for (dst, off, np) in
        [(&mut d_img, 0, plan.folds.0), (&mut d_txt, plan.splits() - 1, plan.folds.1)]
    {
        if np > 0 {
            let mut a = Args::new();
            a.buf_mut(dst.get_mut()).buf(&parts.get()[off * n..]).i64(n as i64).i32(np as i32);
            launch(m, "clip_fold_splits", n.div_ceil(256).clamp(1, 8192) as u32, 1, &mut a);
        }
    }
    let mut dt = Guarded::new(1, NAN_F64, NAN_F64);
    let mut a = Args::new();
    a.buf(dt_part.get()).i64(plan.dt_parts as i64).buf_mut(dt.get_mut());
    launch(m, "sum_f64", 1, 1, &mut a);

    let guards = [&img, &txt, &row_m, &row_z, &col_m, &col_z, &pos].iter().all(|g| g.intact())
        && [&lse_hi, &lse_lo, &kap_hi, &kap_lo, &d_img, &d_txt].iter().all(|g| g.intact())
        && [&term, &loss, &dt_part, &dt].iter().all(|g| g.intact())
        && parts.intact()
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
                let x = Inputs { img: &img, txt: &txt, b, d, scale };
                let g = emu_clip_loss(&m, &none, &x, mode, prec, target, None);
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

/// The backward with G panels of 2 and 4 column tiles (`CLIP_BWD_PANEL`, dynamic shared
/// memory), every precision: bitwise the single-tile kernels' results, since a dA job then sums
/// the same products in the same order without the round trip through dA between tiles, at
/// sizes where the last panel is partial (B = 130: 3 tiles; 260: 5) or a single tile (B = 64),
/// in both modes, and within the f64 reference's tolerances. Sensitivity, tried by hand: with
/// the transposed product reading the panel's first tile for every dB job, fast mode's dT
/// differs (bf16 and fp32 alike).
#[test]
fn backward_panels_give_the_single_tile_results_bitwise() {
    let none = Defines::default();
    let one = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(11);
    let cases = [(130usize, 40usize, 14.3f32, 4usize), (260, 72, 30.0, 3), (64, 200, 10.0, 1)];
    let data: Vec<_> = cases
        .iter()
        .map(|&(b, d, ..)| (random_features(&mut rng, b, d), random_features(&mut rng, b, d)))
        .collect();
    // The single-tile kernels' results, per precision, case and mode.
    let single: Vec<Vec<Vec<EmuLoss>>> = Precision::ALL
        .iter()
        .map(|&prec| {
            cases
                .iter()
                .zip(&data)
                .map(|(&(b, d, scale, target), (img, txt))| {
                    LossMode::ALL
                        .iter()
                        .map(|&mode| {
                            let x = Inputs { img, txt, b, d, scale };
                            emu_clip_loss(&one, &none, &x, mode, prec, target, None)
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    for panel in [2, 4] {
        let defs = Defines::parse(&[format!("CLIP_BWD_PANEL={panel}")]).unwrap();
        assert_eq!(bwd_shared_bytes(Precision::Bf16, &defs), 64 * (64 * panel + 8) * 2);
        assert_eq!(bwd_shared_bytes(Precision::Tf32, &defs), 64 * (64 * panel + 4) * 4);
        let m = module_with("clip_loss.cu", &defs).unwrap_or_else(|e| panic!("{e}"));
        for (&prec, single) in Precision::ALL.iter().zip(&single) {
            for ((&(b, d, scale, target), (img, txt)), single) in
                cases.iter().zip(&data).zip(single)
            {
                let (lr, dir, dtr, dtr_t) =
                    clip_loss_reference_f64(&to64(img), &to64(txt), b, d, scale as f64);
                let (tol_loss, tol_grad) = loss_tols(prec, scale);
                for (mode, s) in LossMode::ALL.into_iter().zip(single) {
                    let x = Inputs { img, txt, b, d, scale };
                    let p = emu_clip_loss(&m, &defs, &x, mode, prec, target, None);
                    let what =
                        format!("panel {panel}, {} B={b} d={d} {}", prec.name(), mode.name());
                    assert!(p.guards, "{what}: a kernel wrote outside its buffers");
                    assert!(rel_err(&[p.loss], &[lr]) <= tol_loss, "{what}: loss");
                    for (name, got, want) in [("dI", &p.d_img, &dir), ("dT", &p.d_txt, &dtr)] {
                        let e = rel_err(got, want);
                        assert!(e <= tol_grad, "{what}: {name} {e:.3e} > {tol_grad}");
                    }
                    assert!(rel_err(&[p.d_t], &[dtr_t]) <= tol_grad, "{what}: dt");
                    assert_same_bits(&format!("{what} against one tile"), &p, s);
                }
            }
        }
    }
}

/// G panels inside column splits: B = 260 (5 column tiles) in 2 splits of 3 and 2 tiles, so a
/// split holds a whole panel and a partial one (panel 2) or one partial panel (panel 4), every
/// precision. Deterministic mode: bitwise the one-tile kernels with the same splits (a share
/// starts from zero at its split's first panel and carries over the later ones); fast mode adds
/// each panel's dA atomically instead of each tile's, so only close to them (1e-5).
/// Sensitivity, tried by hand: a panel that runs past its split's last tile (bounded by the
/// column tiles instead of the split) gives fp32 deterministic dI 0.49 off; the panel tests
/// without splits do not see it.
#[test]
fn backward_panels_inside_column_splits() {
    let none = Defines::default();
    let one = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(43);
    let (b, d, scale) = (260usize, 40usize, 14.3f32);
    let (img, txt) = (random_features(&mut rng, b, d), random_features(&mut rng, b, d));
    let x = Inputs { img: &img, txt: &txt, b, d, scale };
    let (lr, dir, dtr, _) = clip_loss_reference_f64(&to64(&img), &to64(&txt), b, d, scale as f64);
    for panel in [2, 4] {
        let defs = Defines::parse(&[format!("CLIP_BWD_PANEL={panel}")]).unwrap();
        let m = module_with("clip_loss.cu", &defs).unwrap_or_else(|e| panic!("{e}"));
        for prec in Precision::ALL {
            let (tol_loss, tol_grad) = loss_tols(prec, scale);
            for mode in LossMode::ALL {
                let what = format!("panel {panel}, {} {}", prec.name(), mode.name());
                let s = emu_clip_loss(&one, &none, &x, mode, prec, 1, Some(2));
                let p = emu_clip_loss(&m, &defs, &x, mode, prec, 1, Some(2));
                assert!(p.guards, "{what}: a kernel wrote outside its buffers");
                assert!(rel_err(&[p.loss], &[lr]) <= tol_loss, "{what}: loss");
                for (name, got, want) in [("dI", &p.d_img, &dir), ("dT", &p.d_txt, &dtr)] {
                    let e = rel_err(got, want);
                    assert!(e <= tol_grad, "{what}: {name} {e:.3e} > {tol_grad}");
                }
                let what = format!("{what} against one tile");
                if mode == LossMode::Deterministic {
                    assert_same_bits(&what, &p, &s);
                } else {
                    assert_close_grads(&what, &p, &s, 1e-5);
                }
            }
        }
    }
}

/// A GPU runs a grid's blocks in no defined order (and several at once): the fused loss must
/// give the same bits whatever the order in deterministic mode, and the same values up to the
/// atomics' rounding in fast mode. B = 200 with a block budget of 16: the forward's rows and
/// columns split among blocks, the backward's columns split (fast mode 4 ways, deterministic 2
/// per pass, with their shares folded), every precision, blocks run in two permuted orders
/// against the in-order run. Fast mode's results must move (its atomics' order does), which
/// shows the orders took effect. Sensitivity, tried by hand: deterministic mode's splits adding
/// into dA atomically, as fast mode's do (no shares, no fold), pass the one-split comparison of
/// `backward_column_splits_give_the_one_split_results` (the values are right) and fail here
/// (fp32 dI differs under the first permuted order). Not caught by either: a non-atomic
/// read-modify-write shared by blocks, since the emulation still runs one block at a time.
#[test]
fn deterministic_mode_gives_the_same_bits_whatever_the_block_order() {
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let none = Defines::default();
    let mut rng = Rng::new(41);
    let (b, d, scale, target) = (200usize, 40usize, 14.3f32, 16usize);
    assert_eq!(plan_bwd(LossMode::Fast, b, b, d, target, None).splits(), 4);
    assert_eq!(plan_bwd(LossMode::Deterministic, b, b, d, target, None).splits(), 2);
    let (img, txt) = (random_features(&mut rng, b, d), random_features(&mut rng, b, d));
    let x = Inputs { img: &img, txt: &txt, b, d, scale };
    let mut fast_moved = false;
    for prec in Precision::ALL {
        for mode in LossMode::ALL {
            let base = emu_clip_loss(&m, &none, &x, mode, prec, target, None);
            for seed in [1, 2] {
                let p = with_block_order(seed, || {
                    emu_clip_loss(&m, &none, &x, mode, prec, target, None)
                });
                let what = format!("{} {}, block order {seed}", prec.name(), mode.name());
                assert!(p.guards, "{what}: a kernel wrote outside its buffers");
                // The forward has no atomics: the loss is the same in both modes.
                assert_eq!(p.loss.to_bits(), base.loss.to_bits(), "{what}: loss");
                let what = format!("{what} against the in-order run");
                if mode == LossMode::Deterministic {
                    assert_same_bits(&what, &p, &base);
                } else {
                    fast_moved |= assert_close_grads(&what, &p, &base, 1e-5);
                }
            }
        }
    }
    assert!(fast_moved, "fast mode's atomics never changed order: the orders had no effect");
}

/// The translation unit makes every static `__shared__` array the running block's own (also
/// several on one line, and one declared with a trailing comment), maps `extern __shared__` to
/// the dynamic shared memory, and has a launcher for every kernel.
#[test]
fn translation_units_give_each_block_its_shared_memory_and_know_every_kernel() {
    use crate::device::cuda::nvrtc::SOURCES;
    for src in SOURCES {
        let tu = super::translation_unit(src);
        let lines = src.src.lines().filter(|l| l.trim_start().starts_with("__shared__ "));
        let arrays: usize = lines.map(|l| 1 + l.matches("], ").count()).sum();
        assert_eq!(tu.matches("emu::block_shared<").count(), arrays, "{}", src.name);
        let body = &tu[tu.find("#line 1 \"kernels/").expect("the sources' marks")..];
        assert!(
            !body.lines().any(|l| l.contains("__shared__ ") && !l.contains("//")),
            "{}",
            src.name
        );
        for k in src.kernels {
            assert!(tu.contains(&format!("emu::launch({k}, ")), "{}: {k}", src.name);
        }
    }
    let tu = super::translation_unit(SOURCES.iter().find(|s| s.name == "clip_loss.cu").unwrap());
    for decl in [
        "static char emu_sh_FG; auto& FG = *emu::block_shared<float[(FG_BYTES / 4)]>(&emu_sh_FG);  \
         // the stages",
        "auto& qrm = *emu::block_shared<float[(4)][(TM)]>(&emu_sh_qrm); static char emu_sh_qrz; \
         auto& qrz = *emu::block_shared<float[(4)][(TM)]>(&emu_sh_qrz);",
        "auto& AB = *emu::block_shared<typename Tiles<MODE>::Row[((MODE == 3 ? 4 : 2) * \
         Tiles<MODE>::ROWS)]>(&emu_sh_AB);",
        "auto& AB = *emu::block_shared<Row[(MODE == 3 && PT > 1 ? 1 : 2 * Tiles<MODE>::ROWS)]>(",
    ] {
        assert!(tu.contains(decl), "{decl}");
    }
    // Reports name the kernel file's own lines: its first line follows its `#line 1` mark, after
    // common.cuh's.
    let first = include_str!("kernels/clip_loss.cu").lines().next().unwrap();
    let common = tu.find("#line 1 \"kernels/common.cuh\"\n").expect("common.cuh's mark");
    let file = tu.find(&format!("#line 1 \"kernels/clip_loss.cu\"\n{first}\n")).expect("its mark");
    assert!(common < file);
}

/// The backward's column splits (grid z, `gpu::plan_bwd`): fast mode's splits adding dI by
/// atomicAdd, deterministic mode's writing their shares for `clip_fold_splits`, at 1 to 5
/// splits of 3 and 5 column tiles (4 asked of 5 tiles gives 3 of 2, 2 and 1), every precision:
/// the one-split results up to the order of the fp32 sums (relative 1e-5), the same loss, and
/// the f64 reference's tolerances. Sensitivity, tried by hand: with each split's range one tile
/// short (`ct_end` one less), deterministic dI is off by 0.50 at two splits; with the shares
/// not folded, by 0.50; and the first version, whose later tiles' jobs in a share started from
/// zero again (overwriting the earlier tiles'), by 0.48 wherever a share had two tiles.
#[test]
fn backward_column_splits_give_the_one_split_results() {
    let m = module("clip_loss.cu").unwrap_or_else(|e| panic!("{e}"));
    let none = Defines::default();
    let mut rng = Rng::new(29);
    for (b, d, scale, splits) in
        [(260usize, 40usize, 14.3f32, &[2usize, 4, 5][..]), (130, 72, 30.0, &[2, 3])]
    {
        let img = random_features(&mut rng, b, d);
        let txt = random_features(&mut rng, b, d);
        let (lr, dir, dtr, dtr_t) =
            clip_loss_reference_f64(&to64(&img), &to64(&txt), b, d, scale as f64);
        let x = Inputs { img: &img, txt: &txt, b, d, scale };
        for prec in Precision::ALL {
            let (tol_loss, tol_grad) = loss_tols(prec, scale);
            // The tensor-core precisions' emulation is slow: one split count each beyond one.
            let ns = if matches!(prec, Precision::Fp32 | Precision::Bf16) {
                splits
            } else {
                &splits[..1]
            };
            for mode in LossMode::ALL {
                let one = emu_clip_loss(&m, &none, &x, mode, prec, 1, Some(1));
                for &n in ns {
                    let plan = plan_bwd(mode, b, b, d, 1, Some(n));
                    let tiles = b.div_ceil(LOSS_TILE);
                    let per = tiles.div_ceil(n);
                    assert_eq!(plan.splits(), tiles.div_ceil(per), "B={b}: {n} splits evened");
                    let g = emu_clip_loss(&m, &none, &x, mode, prec, 1, Some(n));
                    let what = format!("B={b} d={d} {} {} {n} splits", prec.name(), mode.name());
                    assert!(g.guards, "{what}: a kernel wrote outside its buffers");
                    assert_eq!(g.loss.to_bits(), one.loss.to_bits(), "{what}: loss");
                    for (name, got, one, want) in
                        [("dI", &g.d_img, &one.d_img, &dir), ("dT", &g.d_txt, &one.d_txt, &dtr)]
                    {
                        let e1 = rel_err(got, &to64(one));
                        assert!(e1 <= 1e-5, "{what}: {name} {e1:.3e} from one split's");
                        let e = rel_err(got, want);
                        assert!(e <= tol_grad, "{what}: {name} {e:.3e} > {tol_grad}");
                    }
                    let e = rel_err(&[g.d_t], &[one.d_t]);
                    assert!(e <= 1e-12, "{what}: dt {e:.3e} from one split's");
                    assert!(rel_err(&[g.loss], &[lr]) <= tol_loss, "{what}: loss vs reference");
                    assert!(rel_err(&[g.d_t], &[dtr_t]) <= tol_grad, "{what}: dt vs reference");
                }
            }
        }
    }
}
