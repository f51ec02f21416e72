//! Tests of the ring losses against the f64 naive references.

use tessera_collectives::threads::ThreadComm;

use super::clip::clip_loss_reference_f64;
use super::ring::*;

const I: [f64; 6] = [1.0, 0.0, 0.6, 0.8, 0.0, 1.0];
const T: [f64; 6] = [0.8, 0.6, 1.0, 0.0, 0.0, -1.0];

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn random_unit(rng: &mut crate::rng::Rng, n: usize, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    for r in v.chunks_exact_mut(d) {
        let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        r.iter_mut().for_each(|x| *x /= nrm);
    }
    v
}

/// `max |got − want| ≤ rel · max(max |want|, floor)`.
fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(floor, |a, &v| a.max(v.abs()));
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{k}]: got {g}, want {w} (tolerance {} = {rel} × {scale})",
            rel * scale
        );
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Which {
    Clip,
    Siglip(f32),
}

struct Gathered {
    losses: Vec<f32>,
    di: Vec<f64>,
    dt_feat: Vec<f64>,
    dt: f64,
    db: f64,
    bytes: Vec<usize>,
}

/// Splits the global features by `split`, runs the ring loss on `split.len()` ranks and
/// concatenates the per-rank results.
fn run_split(
    which: Which,
    img: &[f32],
    txt: &[f32],
    d: usize,
    scale: f32,
    split: &[usize],
    opts: &RingLossOpts,
) -> Gathered {
    let offs: Vec<usize> = split
        .iter()
        .scan(0, |a, &b| {
            let o = *a;
            *a += b;
            Some(o)
        })
        .collect();
    let outs = ThreadComm::run_group(split.len(), |r, comm| {
        let (o, b) = (offs[r], split[r]);
        let (il, tl) = (&img[o * d..(o + b) * d], &txt[o * d..(o + b) * d]);
        match which {
            Which::Clip => clip_loss_ring(comm, il, tl, b, d, scale, opts),
            Which::Siglip(bias) => siglip_loss_ring(comm, il, tl, b, d, scale, bias, opts),
        }
        .expect("ring loss")
    });
    let mut g = Gathered {
        losses: Vec::new(),
        di: Vec::new(),
        dt_feat: Vec::new(),
        dt: 0.0,
        db: 0.0,
        bytes: Vec::new(),
    };
    for o in outs {
        g.losses.push(o.loss);
        g.di.extend(to64(&o.d_img_local));
        g.dt_feat.extend(to64(&o.d_txt_local));
        g.dt += o.d_t_partial as f64;
        g.db += o.d_bias_partial.unwrap_or(0.0) as f64;
        g.bytes.push(o.workspace_bytes);
    }
    g
}

fn check_against_reference(
    which: Which,
    img: &[f32],
    txt: &[f32],
    d: usize,
    scale: f32,
    split: &[usize],
    opts: &RingLossOpts,
) {
    let big_b: usize = split.iter().sum();
    let g = run_split(which, img, txt, d, scale, split, opts);
    let ctx = format!("{which:?} B={big_b} d={d} split={split:?} s={scale} opts={opts:?}");
    assert!(
        g.losses.iter().all(|&l| l.to_bits() == g.losses[0].to_bits()),
        "{ctx}: {:?}",
        g.losses
    );
    let (i64v, t64v) = (to64(img), to64(txt));
    let (l, di, dtf, dt, db) = match which {
        Which::Clip => {
            let (l, di, dtf, dt) = clip_loss_reference_f64(&i64v, &t64v, big_b, d, scale as f64);
            (l, di, dtf, dt, 0.0)
        }
        Which::Siglip(b) => {
            siglip_loss_reference_f64(&i64v, &t64v, big_b, d, scale as f64, b as f64)
        }
    };
    assert_close(&format!("{ctx}: loss"), &[g.losses[0] as f64], &[l], 1e-5, 1e-3);
    assert_close(&format!("{ctx}: dI"), &g.di, &di, 1e-5, 1e-6);
    assert_close(&format!("{ctx}: dT"), &g.dt_feat, &dtf, 1e-5, 1e-6);
    assert_close(&format!("{ctx}: d logit scale"), &[g.dt], &[dt], 1e-5, 1e-2);
    if let Which::Siglip(_) = which {
        assert_close(&format!("{ctx}: d bias"), &[g.db], &[db], 1e-5, 1e-2);
    }
}

#[test]
fn clip_ring_reproduces_algorithms_test_values() {
    let scale = (2.0f64.ln() as f32).exp();
    for split in [vec![3], vec![1, 2], vec![2, 0, 1]] {
        let g = run_split(
            Which::Clip,
            &to32(&I),
            &to32(&T),
            2,
            scale,
            &split,
            &RingLossOpts::default(),
        );
        assert!((g.losses[0] as f64 - 1.7144396774).abs() < 1e-6, "{split:?}: {}", g.losses[0]);
        assert!((g.dt - 0.8950392200).abs() < 1e-6, "{split:?}: {}", g.dt);
        let di =
            [0.0481219116, -0.5343793425, -0.1687836559, 0.1654409085, 0.3606535611, 0.8158347751];
        let dt =
            [-0.2112663547, 0.6180800842, 0.1158648018, -0.2688374310, 0.3083549846, -0.5773394514];
        assert_close("dI", &g.di, &di, 1e-6, 1.0);
        assert_close("dT", &g.dt_feat, &dt, 1e-6, 1.0);
    }
}

#[test]
fn siglip_ring_reproduces_algorithms_test_values() {
    let scale = (2.0f64.ln() as f32).exp();
    for split in [vec![3], vec![2, 1], vec![1, 1, 1]] {
        let g = run_split(
            Which::Siglip(-1.0),
            &to32(&I),
            &to32(&T),
            2,
            scale,
            &split,
            &RingLossOpts { tile_rows: 2, tile_cols: 2, threads: 0, chunk_rows: 1 },
        );
        assert!((g.losses[0] as f64 - 2.7163988814).abs() < 1e-6, "{split:?}: {}", g.losses[0]);
        assert!((g.db - 0.2819573738).abs() < 1e-6, "{split:?}: {}", g.db);
        let di =
            [0.2983890824, -0.3210317584, 0.0812451212, 0.2399245621, 0.4725390795, 0.8549830168];
        let dt =
            [0.0497877131, 0.7479117879, 0.3073059847, -0.0607942539, 0.2069496491, -0.5981755937];
        assert_close("dI", &g.di, &di, 1e-6, 1.0);
        assert_close("dT", &g.dt_feat, &dt, 1e-6, 1.0);
    }
}

#[test]
fn siglip_reference_matches_finite_differences() {
    let mut rng = crate::rng::Rng::new(21);
    let (n, d, s, b) = (4, 3, 2.5, -0.7);
    let img: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
    let txt: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
    let (_, di, dtf, dt, db) = siglip_loss_reference_f64(&img, &txt, n, d, s, b);
    let h = 1e-6;
    let l = |i: &[f64], t: &[f64], s: f64, b: f64| siglip_loss_reference_f64(i, t, n, d, s, b).0;
    for k in 0..n * d {
        let (mut p, mut m) = (img.clone(), img.clone());
        p[k] += h;
        m[k] -= h;
        assert!(((l(&p, &txt, s, b) - l(&m, &txt, s, b)) / (2.0 * h) - di[k]).abs() < 1e-6);
        let (mut p, mut m) = (txt.clone(), txt.clone());
        p[k] += h;
        m[k] -= h;
        assert!(((l(&img, &p, s, b) - l(&img, &m, s, b)) / (2.0 * h) - dtf[k]).abs() < 1e-6);
    }
    let fd_t =
        (l(&img, &txt, (s.ln() + h).exp(), b) - l(&img, &txt, (s.ln() - h).exp(), b)) / (2.0 * h);
    assert!((fd_t - dt).abs() < 1e-6, "{fd_t} vs {dt}");
    let fd_b = (l(&img, &txt, s, b + h) - l(&img, &txt, s, b - h)) / (2.0 * h);
    assert!((fd_b - db).abs() < 1e-6, "{fd_b} vs {db}");
}

/// Odd sizes: B not a multiple of the tile, d = 1, 3, 129, worlds 1, 2, 3, 5, uneven splits
/// (including an empty rank), several tilings.
#[test]
fn ring_losses_match_f64_reference_at_odd_sizes() {
    let mut rng = crate::rng::Rng::new(5);
    let cases: [(usize, &[usize]); 6] = [
        (1, &[37]),
        (3, &[20, 17]),
        (129, &[11, 0, 26]),
        (3, &[7, 1, 13, 9, 7]),
        (1, &[5, 9, 3, 12, 8]),
        (129, &[30, 19]),
    ];
    let tilings = [
        RingLossOpts { tile_rows: 4, tile_cols: 7, threads: 0, chunk_rows: 0 },
        RingLossOpts { tile_rows: 16, tile_cols: 5, threads: 3, chunk_rows: 0 },
        RingLossOpts::default(),
    ];
    for (ci, &(d, split)) in cases.iter().enumerate() {
        let big_b: usize = split.iter().sum();
        let img = random_unit(&mut rng, big_b, d);
        let txt = random_unit(&mut rng, big_b, d);
        let tiling = &tilings[ci % tilings.len()];
        // Whole blocks, and chunks of 4 rows (blocks of different lengths run out of chunks
        // in different rounds; a chunk is not a multiple of the panel).
        for opts in [tiling.clone(), RingLossOpts { chunk_rows: 4, ..tiling.clone() }] {
            for scale in [1.0f32, 14.285_714] {
                check_against_reference(Which::Clip, &img, &txt, d, scale, split, &opts);
                check_against_reference(Which::Siglip(-2.5), &img, &txt, d, scale, split, &opts);
            }
        }
    }
}

/// More row tiles than ∂L/∂T groups (70 and 33 one-row tiles: groups of 3 and 2 tiles, a
/// short last group): still the f64 reference, and bitwise the same for 1 and 3 threads.
#[test]
fn row_tiles_beyond_the_group_count() {
    let mut rng = crate::rng::Rng::new(11);
    let (d, split) = (5, [70usize, 33]);
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    let txt = random_unit(&mut rng, big_b, d);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for chunk_rows in [0, 8] {
        let mut seen = Vec::new();
        for threads in [1, 3] {
            let opts = RingLossOpts { tile_rows: 1, tile_cols: 3, threads, chunk_rows };
            check_against_reference(Which::Clip, &img, &txt, d, 8.0, &split, &opts);
            check_against_reference(Which::Siglip(-3.0), &img, &txt, d, 8.0, &split, &opts);
            let g = run_split(Which::Clip, &img, &txt, d, 8.0, &split, &opts);
            seen.push((g.losses[0].to_bits(), bits(&g.di), bits(&g.dt_feat), g.dt.to_bits()));
        }
        assert!(seen[0] == seen[1], "chunk_rows {chunk_rows}: 1 and 3 threads differ");
    }
}

/// Logit scale 100 (logits up to ±100): no overflow, still within 1e-5.
#[test]
fn scale_100_does_not_overflow() {
    let mut rng = crate::rng::Rng::new(6);
    let (d, split) = (8, [23usize, 18, 30]);
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    // Texts close to their images: large positive logits at s = 100.
    let mut txt = img.clone();
    for v in txt.iter_mut() {
        *v += 0.3 * rng.normal() as f32;
    }
    for r in txt.chunks_exact_mut(d) {
        let nrm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        r.iter_mut().for_each(|x| *x /= nrm);
    }
    let opts = RingLossOpts { tile_rows: 8, tile_cols: 16, threads: 0, chunk_rows: 5 };
    check_against_reference(Which::Clip, &img, &txt, d, 100.0, &split, &opts);
    check_against_reference(Which::Siglip(-10.0), &img, &txt, d, 100.0, &split, &opts);
    let g = run_split(Which::Clip, &img, &txt, d, 100.0, &split, &opts);
    assert!(g.losses[0].is_finite() && g.di.iter().chain(&g.dt_feat).all(|v| v.is_finite()));
}

/// Results do not depend on the tiling's thread count and repeat bitwise.
#[test]
fn deterministic_across_threads_and_runs() {
    let mut rng = crate::rng::Rng::new(7);
    let (d, split) = (5, [40usize, 27]);
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    let txt = random_unit(&mut rng, big_b, d);
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for which in [Which::Clip, Which::Siglip(-1.0)] {
        let mut seen = Vec::new();
        for threads in [1, 2, 3, 1] {
            let opts = RingLossOpts { tile_rows: 8, tile_cols: 8, threads, chunk_rows: 16 };
            let g = run_split(which, &img, &txt, d, 10.0, &split, &opts);
            seen.push((g.losses[0].to_bits(), bits(&g.di), bits(&g.dt_feat), g.dt.to_bits()));
        }
        assert!(seen.iter().all(|s| *s == seen[0]), "{which:?}: results differ between runs");
    }
}

/// Positives given by index equal the diagonal loss on permuted texts.
#[test]
fn positives_by_index() {
    let mut rng = crate::rng::Rng::new(8);
    let (d, split) = (4, [9usize, 6, 10]);
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    let txt = random_unit(&mut rng, big_b, d);
    // perm[i] = column of i's positive; a rotation by 7.
    let perm: Vec<usize> = (0..big_b).map(|i| (i + 7) % big_b).collect();
    // Diagonal reference: texts reordered so that row i's positive sits at column i.
    let mut txt_perm = vec![0.0f32; big_b * d];
    for i in 0..big_b {
        txt_perm[i * d..(i + 1) * d].copy_from_slice(&txt[perm[i] * d..(perm[i] + 1) * d]);
    }
    let opts = RingLossOpts { tile_rows: 4, tile_cols: 4, threads: 0, chunk_rows: 3 };
    for which in [Which::Clip, Which::Siglip(-1.5)] {
        let offs = [0usize, 9, 15];
        let outs = ThreadComm::run_group(3, |r, comm| {
            let mut ws = RingLossWorkspace::new(&opts).expect("workspace");
            let (o, b) = (offs[r], split[r]);
            let il = &img[o * d..(o + b) * d];
            let tl = &txt[o * d..(o + b) * d];
            let p = Some(&perm[o..o + b]);
            match which {
                Which::Clip => clip_loss_ring_ws(comm, &mut ws, il, tl, b, d, 5.0, p),
                Which::Siglip(bias) => {
                    siglip_loss_ring_ws(comm, &mut ws, il, tl, b, d, 5.0, bias, p)
                }
            }
            .expect("ring loss")
        });
        let (l, di, dtf, dt) = match which {
            Which::Clip => {
                let (l, di, dtf, dt) =
                    clip_loss_reference_f64(&to64(&img), &to64(&txt_perm), big_b, d, 5.0);
                (l, di, dtf, dt)
            }
            Which::Siglip(b) => {
                let (l, di, dtf, dt, _) = siglip_loss_reference_f64(
                    &to64(&img),
                    &to64(&txt_perm),
                    big_b,
                    d,
                    5.0,
                    b as f64,
                );
                (l, di, dtf, dt)
            }
        };
        // Un-permute the reference text gradient: column perm[i] got row i's gradient.
        let mut want_dt = vec![0.0f64; big_b * d];
        for i in 0..big_b {
            want_dt[perm[i] * d..(perm[i] + 1) * d].copy_from_slice(&dtf[i * d..(i + 1) * d]);
        }
        let got_di: Vec<f64> = outs.iter().flat_map(|o| to64(&o.d_img_local)).collect();
        let got_dt: Vec<f64> = outs.iter().flat_map(|o| to64(&o.d_txt_local)).collect();
        let got_t: f64 = outs.iter().map(|o| o.d_t_partial as f64).sum();
        assert_close("loss", &[outs[0].loss as f64], &[l], 1e-5, 1e-3);
        assert_close("dI", &got_di, &di, 1e-5, 1e-6);
        assert_close("dT", &got_dt, &want_dt, 1e-5, 1e-6);
        assert_close("dt", &[got_t], &[dt], 1e-5, 1e-2);
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let outs = ThreadComm::run_group(1, |_, comm| {
        let opts = RingLossOpts::default();
        let short = clip_loss_ring(comm, &[1.0; 5], &[1.0; 6], 3, 2, 1.0, &opts);
        let zero_d = clip_loss_ring(comm, &[], &[], 3, 0, 1.0, &opts);
        let bad_scale = siglip_loss_ring(comm, &[1.0; 6], &[1.0; 6], 3, 2, f32::NAN, 0.0, &opts);
        let mut ws = RingLossWorkspace::new(&opts).expect("workspace");
        let dup =
            clip_loss_ring_ws(comm, &mut ws, &[1.0; 6], &[1.0; 6], 3, 2, 1.0, Some(&[0, 0, 1]));
        let out_of_range = siglip_loss_ring_ws(
            comm,
            &mut ws,
            &[1.0; 6],
            &[1.0; 6],
            3,
            2,
            1.0,
            0.0,
            Some(&[0, 1, 3]),
        );
        let zero_tile = RingLossWorkspace::new(&RingLossOpts { tile_rows: 0, ..opts }).err();
        [
            short.err().map(|e| e.to_string()),
            zero_d.err().map(|e| e.to_string()),
            bad_scale.err().map(|e| e.to_string()),
            dup.err().map(|e| e.to_string()),
            out_of_range.err().map(|e| e.to_string()),
            zero_tile.map(|e| e.to_string()),
        ]
    });
    for (k, e) in outs[0].iter().enumerate() {
        let e = e.as_ref().unwrap_or_else(|| panic!("case {k} was accepted"));
        assert!(e.contains("invalid input"), "case {k}: {e}");
    }
    // Ranks disagreeing on d: every rank gets an error naming the mismatch.
    let outs = ThreadComm::run_group(2, |r, comm| {
        let d = if r == 0 { 2 } else { 3 };
        let opts = RingLossOpts::default();
        clip_loss_ring(comm, &vec![1.0; 2 * d], &vec![1.0; 2 * d], 2, d, 1.0, &opts)
            .err()
            .map(|e| e.to_string())
    });
    for e in outs {
        assert!(e.is_some_and(|e| e.contains("feature dimension")));
    }
    // A bad input on one rank fails every rank (no rank is left waiting in the ring), and
    // positives given on one rank only are checked by all.
    for case in 0..3 {
        let outs = ThreadComm::run_group(3, |r, comm| {
            let opts = RingLossOpts::default();
            let mut ws = RingLossWorkspace::new(&opts).expect("workspace");
            let (img, txt) = (vec![1.0f32; 4], vec![1.0f32; 4]);
            let res = match (case, r) {
                (0, 1) => clip_loss_ring_ws(comm, &mut ws, &img[..3], &txt, 2, 2, 1.0, None),
                (1, 2) => clip_loss_ring_ws(comm, &mut ws, &img, &txt, 2, 2, 1.0, Some(&[0, 1])),
                (2, 0) => {
                    siglip_loss_ring_ws(comm, &mut ws, &img, &txt, 2, 2, 1.0, 0.0, Some(&[9, 0]))
                }
                (0 | 1, _) => clip_loss_ring_ws(comm, &mut ws, &img, &txt, 2, 2, 1.0, None),
                _ => siglip_loss_ring_ws(comm, &mut ws, &img, &txt, 2, 2, 1.0, 0.0, None),
            };
            res.err().map(|e| e.to_string())
        });
        for (r, e) in outs.iter().enumerate() {
            let e = e.as_ref().unwrap_or_else(|| panic!("case {case}: rank {r} accepted"));
            assert!(e.contains("invalid input"), "case {case}, rank {r}: {e}");
        }
    }
}

/// B = 65,536 on 2 ranks (uneven): the loss runs at full size, matches the closed form of
/// one-hot features, and the bytes it allocates stay below a stated O(B·d) bound — far below
/// the 17 GB of one B×B f32 logit matrix.
///
/// Features: I_i = T_i = e_{i mod d}, so x_ij = s·[i ≡ j mod d]: row i has B/d logits equal
/// to s and the rest 0, `Z = (B/d)·e^s + B − B/d`, `ℓ_i = κ_j = ln Z`, `L = ln Z − s`,
/// `∂L/∂I_i = (s/B)·(Σ_j P_ij e_{j mod d} − e_{i mod d})` with `P_ij = e^{x_ij}/Z`, and
/// `∂L/∂t = (B/d)·s·e^s/Z − s`.
#[test]
fn memory_is_linear_in_batch_at_65536() {
    let (big_b, d) = (65_536usize, 4usize);
    let split = [32_768 + 1000, 32_768 - 1000];
    let s = 5.0f32;
    let feats: Vec<f32> =
        (0..big_b).flat_map(|i| (0..d).map(move |k| if i % d == k { 1.0 } else { 0.0 })).collect();
    // Whole blocks in flight (the default chunk at d = 4 is longer than a block), then chunks
    // of 1,024 rows.
    for opts in [RingLossOpts::default(), RingLossOpts { chunk_rows: 1024, ..Default::default() }] {
        let g = run_split(Which::Clip, &feats, &feats, d, s, &split, &opts);
        let (bf, sf) = (big_b as f64, s as f64);
        let per = bf / d as f64;
        let z = per * sf.exp() + bf - per;
        let loss = z.ln() - sf;
        assert!((g.losses[0] as f64 - loss).abs() <= 1e-5 * loss, "loss {} vs {loss}", g.losses[0]);
        let dt = per * sf * sf.exp() / z - sf;
        assert!((g.dt - dt).abs() <= 1e-5 * dt.abs().max(1.0), "dt {} vs {dt}", g.dt);
        let same = sf / bf * (per * sf.exp() / z - 1.0);
        let other = sf / bf * (per / z);
        let want: Vec<f64> = (0..big_b)
            .flat_map(|i| (0..d).map(move |k| if i % d == k { same } else { other }))
            .collect();
        // Relative to s/B, the size of one diagonal term of the sums (the result itself is a
        // difference of two nearly equal sums).
        assert_close("dI", &g.di, &want, 1e-5, sf / bf);
        assert_close("dT", &g.dt_feat, &want, 1e-5, sf / bf);
        let tiles = 64 * opts.tile_rows * opts.tile_cols * 4;
        for (r, &bytes) in g.bytes.iter().enumerate() {
            let b = split[r].max(split[(r + 1) % 2]);
            // Stated bounds per rank with b rows. Whole blocks: 16·b·(d + 4)·4 bytes
            // (features in flight, statistics, per-tile partials, outputs). Chunks of c rows:
            // the two b × d outputs, 80 bytes of statistics per row, 16·c·(d + 2)·4 in flight.
            let bound = if opts.chunk_rows == 0 {
                16 * b * (d + 4) * 4 + tiles
            } else {
                let c = opts.chunk_rows;
                2 * b * d * 4 + 80 * b + 16 * c * (d + 2) * 4 + tiles
            };
            eprintln!(
                "B = {big_b}, d = {d}, chunk_rows = {}, rank {r}: loss workspace {bytes} bytes, \
                 bound {bound}",
                opts.chunk_rows
            );
            assert!(bytes > 2 * b * d * 4, "rank {r}: {bytes} bytes is implausibly small");
            assert!(bytes <= bound, "rank {r}: {bytes} bytes > bound {bound}");
            assert!(bytes * 100 < big_b * big_b * 4 / 2, "rank {r}: not far below b × B logits");
        }
    }
}

/// The `_owned` variants return `∂L/∂T` in the features' buffer, bitwise equal to the
/// borrowing ones (whole blocks and chunks, an empty rank included), with one `b × d` buffer
/// less in their workspace.
#[test]
fn owned_variants_match_borrowing_ones_bitwise() {
    let mut rng = crate::rng::Rng::new(10);
    let (d, split) = (6, [13usize, 0, 9]);
    let offs = [0usize, 13, 13];
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    let txt = random_unit(&mut rng, big_b, d);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for chunk_rows in [0, 4] {
        // One loss thread and a fresh workspace per call: the same tile buffers get created,
        // so the workspaces differ by exactly the gradient buffer.
        let opts = RingLossOpts { tile_rows: 4, tile_cols: 4, threads: 1, chunk_rows };
        for which in [Which::Clip, Which::Siglip(-1.0)] {
            let outs = ThreadComm::run_group(3, |r, comm| {
                let mut ws1 = RingLossWorkspace::new(&opts).expect("workspace");
                let mut ws2 = RingLossWorkspace::new(&opts).expect("workspace");
                let (o, b) = (offs[r], split[r]);
                let (il, tl) = (&img[o * d..(o + b) * d], &txt[o * d..(o + b) * d]);
                let (ws1, ws2, owned) = (&mut ws1, &mut ws2, tl.to_vec());
                let pair = match which {
                    Which::Clip => (
                        clip_loss_ring_ws(comm, ws1, il, tl, b, d, 3.0, None),
                        clip_loss_ring_ws_owned(comm, ws2, il, owned, b, d, 3.0, None),
                    ),
                    Which::Siglip(bias) => (
                        siglip_loss_ring_ws(comm, ws1, il, tl, b, d, 3.0, bias, None),
                        siglip_loss_ring_ws_owned(comm, ws2, il, owned, b, d, 3.0, bias, None),
                    ),
                };
                (pair.0.expect("borrowing"), pair.1.expect("owned"))
            });
            for (r, (a, o)) in outs.iter().enumerate() {
                let ctx = format!("{which:?} chunk_rows {chunk_rows} rank {r}");
                assert_eq!(a.loss.to_bits(), o.loss.to_bits(), "{ctx}: loss");
                assert_eq!(bits(&a.d_img_local), bits(&o.d_img_local), "{ctx}: dI");
                assert_eq!(bits(&a.d_txt_local), bits(&o.d_txt_local), "{ctx}: dT");
                assert_eq!(a.d_t_partial.to_bits(), o.d_t_partial.to_bits(), "{ctx}: dt");
                assert_eq!(a.d_bias_partial.map(f32::to_bits), o.d_bias_partial.map(f32::to_bits));
                assert_eq!(a.d_txt_local.len(), split[r] * d, "{ctx}");
                assert_eq!(a.workspace_bytes - o.workspace_bytes, split[r] * d * 4, "{ctx}");
            }
        }
    }
}

/// The ring loss agrees with the naive all-gathered loss rank by rank (uneven split).
#[test]
fn clip_ring_matches_naive_loss_per_rank() {
    let mut rng = crate::rng::Rng::new(9);
    let (d, split) = (16, [70usize, 3, 128]);
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    let txt = random_unit(&mut rng, big_b, d);
    let offs = [0usize, 70, 73];
    let opts = RingLossOpts { tile_rows: 32, tile_cols: 48, threads: 2, chunk_rows: 0 };
    let outs = ThreadComm::run_group(3, |r, comm| {
        let (o, b) = (offs[r], split[r]);
        let il = &img[o * d..(o + b) * d];
        let tl = &txt[o * d..(o + b) * d];
        clip_loss_ring(comm, il, tl, b, d, 20.0, &opts).expect("ring loss")
    });
    for (r, ring) in outs.iter().enumerate() {
        let naive = super::clip_loss_local(&img, &txt, big_b, d, offs[r], split[r], 20.0);
        assert_close("loss", &[ring.loss as f64], &[naive.loss as f64], 1e-5, 1.0);
        assert_close("dt", &[ring.d_t_partial as f64], &[naive.d_t_partial as f64], 1e-5, 1e-2);
        assert_close("dI", &to64(&ring.d_img_local), &to64(&naive.d_img_local), 1e-5, 1e-6);
        assert_close("dT", &to64(&ring.d_txt_local), &to64(&naive.d_txt_local), 1e-5, 1e-6);
    }
}

/// The progress hook hears every round of every pass, in order (13 and 9 rows in chunks of 4:
/// 4 rounds).
#[test]
fn progress_reports_every_round() {
    let mut rng = crate::rng::Rng::new(12);
    let (d, split) = (3, [13usize, 9]);
    let big_b: usize = split.iter().sum();
    let img = random_unit(&mut rng, big_b, d);
    let txt = random_unit(&mut rng, big_b, d);
    let offs = [0usize, 13];
    let opts = RingLossOpts { tile_rows: 4, tile_cols: 4, threads: 1, chunk_rows: 4 };
    let heard = ThreadComm::run_group(2, |r, comm| {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut ws = RingLossWorkspace::new(&opts).expect("workspace");
        let log = seen.clone();
        ws.set_progress(Box::new(move |pass, done, rounds| {
            log.lock().unwrap().push((pass, done, rounds));
        }));
        let (o, b) = (offs[r], split[r]);
        let (il, tl) = (&img[o * d..(o + b) * d], &txt[o * d..(o + b) * d]);
        clip_loss_ring_ws(comm, &mut ws, il, tl, b, d, 2.0, None).expect("clip");
        siglip_loss_ring_ws(comm, &mut ws, il, tl, b, d, 2.0, -1.0, None).expect("siglip");
        seen.lock().unwrap().clone()
    });
    let want: Vec<(&str, usize, usize)> = ["forward", "backward", "pass"]
        .iter()
        .flat_map(|&p| (1..=4).map(move |k| (p, k, 4)))
        .collect();
    for h in heard {
        assert_eq!(h, want);
    }
}
