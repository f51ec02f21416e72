//! `tessera bench loss`: time of one forward+backward of a contrastive loss (CLIP or SigLIP)
//! on synthetic features, naive (all-gathered) or tiled on the ring.

use std::time::Instant;

use tessera_collectives::{Communicator, ReduceOp};

use super::clip::clip_loss_local;
use super::ring::{
    LossError, RingLossOpts, RingLossWorkspace, clip_loss_ring_ws_owned, siglip_loss_ring_ws_owned,
};
use super::siglip::siglip_loss_local;
use crate::rng::Rng;

/// Which contrastive loss [`bench_loss`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchedLoss {
    /// The symmetric CLIP (InfoNCE) loss.
    Clip,
    /// The pairwise sigmoid loss (SigLIP), logit bias −10.
    Siglip,
}

impl BenchedLoss {
    /// `clip` or `siglip`, as the benchmarks' `--loss` lists and JSON rows name them.
    pub fn name(self) -> &'static str {
        match self {
            BenchedLoss::Clip => "clip",
            BenchedLoss::Siglip => "siglip",
        }
    }

    /// The loss named `name` (see [`Self::name`]).
    pub fn parse(name: &str) -> Option<Self> {
        [BenchedLoss::Clip, BenchedLoss::Siglip].into_iter().find(|l| l.name() == name)
    }

    /// B × B × d GEMM-equivalents of one forward+backward as a fused implementation does it:
    /// CLIP 4 (the forward's logits, their recomputation, ∂L/∂I, ∂L/∂T), SigLIP 3 (no forward:
    /// nothing normalises a row or a column).
    pub fn gemm_equivalents(self) -> f64 {
        match self {
            BenchedLoss::Clip => 4.0,
            BenchedLoss::Siglip => 3.0,
        }
    }
}

/// Which implementation of the loss [`bench_loss`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossImpl {
    /// All-gather the features, then [`clip_loss_local`] or [`siglip_loss_local`] (`b × B`
    /// logits per rank).
    Naive,
    /// The tiled ring: [`clip_loss_ring_ws_owned`] or [`siglip_loss_ring_ws_owned`].
    Tiled,
}

impl LossImpl {
    /// The `impl` name in `--json` output: `naive` or `tiled`.
    pub fn name(self) -> &'static str {
        match self {
            LossImpl::Naive => "naive",
            LossImpl::Tiled => "tiled",
        }
    }
}

/// One measurement of [`bench_loss`].
#[derive(Clone, Debug, PartialEq)]
pub struct LossBench {
    /// Wall-clock seconds of one forward+backward, the slowest rank (same on all ranks).
    pub seconds: f64,
    /// `n · 2·B²·d / seconds / 1e9`, `n` the loss's [`BenchedLoss::gemm_equivalents`] for
    /// every implementation (the naive one computes more): an inverse time on a flop scale.
    pub gflops: f64,
    /// The global loss value (a check that both implementations computed the same thing).
    pub loss: f32,
    /// The largest [`super::RingLossOut::workspace_bytes`] over the ranks (ring losses; 0 for
    /// the naive loss).
    pub workspace_bytes: usize,
}

use crate::data::local_rows;

fn unit_rows(seed: u64, stream: u64, rows: usize, d: usize) -> Vec<f32> {
    let mut rng = Rng::stream(seed, stream);
    let mut v: Vec<f32> = (0..rows * d).map(|_| rng.normal() as f32).collect();
    for r in v.chunks_exact_mut(d.max(1)) {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// Collective: runs one forward+backward of `loss` by `imp` over a global batch of `global_b`
/// random unit features of dimension `d` split evenly over the ranks of `comm`, timed between
/// two barriers. `opts` sets the tiling of the ring implementations; `threads` of the naive
/// one's GEMMs are its caller's (one thread).
pub fn bench_loss(
    comm: &mut dyn Communicator,
    global_b: usize,
    d: usize,
    loss: BenchedLoss,
    imp: LossImpl,
    opts: &RingLossOpts,
) -> Result<LossBench, LossError> {
    let (world, r) = (comm.world(), comm.rank());
    let (off, b) = local_rows(global_b, world, r);
    let img = unit_rows(1, r as u64 * 2, b, d);
    let txt = unit_rows(1, r as u64 * 2 + 1, b, d);
    let mut ws = RingLossWorkspace::new(opts)?;
    if r == 0 {
        // A line at most every 30 s (and after the last round of each pass) on long runs.
        let start = Instant::now();
        let mut said = Instant::now();
        ws.set_progress(Box::new(move |pass, done, rounds| {
            if said.elapsed().as_secs() >= 30 || done == rounds {
                said = Instant::now();
                let t = start.elapsed().as_secs_f64();
                eprintln!("bench loss: {pass} round {done}/{rounds} done after {t:.0} s");
            }
        }));
    }
    let (scale, bias) = (14.285_714f32, -10.0f32);
    comm.barrier()?;
    let t0 = Instant::now();
    // The ring losses take the text features by value and return ∂L/∂T in their place, as
    // training does (see `clip_loss_ring_ws_owned`).
    let (value, ws_bytes) = match (loss, imp) {
        (_, LossImpl::Naive) => {
            let mut img_all = vec![0.0f32; global_b * d];
            let mut txt_all = vec![0.0f32; global_b * d];
            gather_rows(comm, &img, &mut img_all, global_b, d)?;
            gather_rows(comm, &txt, &mut txt_all, global_b, d)?;
            let value = match loss {
                BenchedLoss::Clip => {
                    clip_loss_local(&img_all, &txt_all, global_b, d, off, b, scale).loss
                }
                BenchedLoss::Siglip => {
                    let o = siglip_loss_local(&img_all, &txt_all, global_b, d, off, b, scale, bias);
                    // The ranks' shares summed, as training sums them.
                    let mut v = [o.loss_partial];
                    if world > 1 {
                        comm.all_reduce_f64(&mut v, ReduceOp::Sum)?;
                    }
                    v[0] as f32
                }
            };
            (value, 0)
        }
        (BenchedLoss::Clip, LossImpl::Tiled) => {
            let o = clip_loss_ring_ws_owned(comm, &mut ws, &img, txt, b, d, scale, None)?;
            (o.loss, o.workspace_bytes)
        }
        (BenchedLoss::Siglip, LossImpl::Tiled) => {
            let o = siglip_loss_ring_ws_owned(comm, &mut ws, &img, txt, b, d, scale, bias, None)?;
            (o.loss, o.workspace_bytes)
        }
    };
    let mine = t0.elapsed().as_secs_f64();
    comm.barrier()?;
    // The slowest rank's time and the largest workspace.
    let (seconds, most) = if world > 1 {
        let mut msg = mine.to_le_bytes().to_vec();
        msg.extend_from_slice(&(ws_bytes as u64).to_le_bytes());
        comm.all_gather_bytes(&msg)?.iter().fold((0.0f64, 0u64), |(t, w), v| {
            let f = |i: usize| v.get(i..i + 8).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]);
            (t.max(f64::from_le_bytes(f(0))), w.max(u64::from_le_bytes(f(8))))
        })
    } else {
        (mine, ws_bytes as u64)
    };
    let flops = loss.gemm_equivalents() * 2.0 * (global_b as f64).powi(2) * d as f64;
    Ok(LossBench {
        seconds,
        gflops: flops / seconds.max(1e-12) / 1e9,
        loss: value,
        workspace_bytes: most as usize,
    })
}

/// All-gather of row blocks whose sizes differ by at most one (the split of [`local_rows`]).
fn gather_rows(
    comm: &mut dyn Communicator,
    mine: &[f32],
    out: &mut [f32],
    global_b: usize,
    d: usize,
) -> Result<(), LossError> {
    let world = comm.world();
    if world == 1 {
        out.copy_from_slice(mine);
        return Ok(());
    }
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let all = comm.all_gather_bytes(&bytes)?;
    for (q, v) in all.iter().enumerate() {
        let (o, b) = local_rows(global_b, world, q);
        if v.len() != b * d * 4 {
            return Err(LossError::Protocol {
                peer: q,
                detail: format!("{} feature bytes, expected {b} × {d} × 4", v.len()),
            });
        }
        for (dst, c) in out[o * d..(o + b) * d].iter_mut().zip(v.chunks_exact(4)) {
            *dst = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_collectives::threads::ThreadComm;

    #[test]
    fn bench_runs_and_implementations_agree() {
        assert_eq!(local_rows(10, 3, 0), (0, 4));
        assert_eq!(local_rows(10, 3, 2), (7, 3));
        let runs = [
            (BenchedLoss::Clip, LossImpl::Naive),
            (BenchedLoss::Clip, LossImpl::Tiled),
            (BenchedLoss::Siglip, LossImpl::Naive),
            (BenchedLoss::Siglip, LossImpl::Tiled),
        ];
        let outs = ThreadComm::run_group(2, |_, c| {
            runs.iter()
                .map(|&(l, i)| {
                    bench_loss(c, 301, 7, l, i, &RingLossOpts::default()).expect("bench")
                })
                .collect::<Vec<_>>()
        });
        for o in &outs {
            for pair in o.chunks_exact(2) {
                let (naive, tiled) = (pair[0].loss, pair[1].loss);
                assert!((naive - tiled).abs() <= 1e-5 * naive.abs(), "{naive} vs {tiled}");
            }
            assert!(o[0].loss != o[2].loss, "CLIP and SigLIP give different losses");
            assert!(o.iter().all(|b| b.seconds > 0.0 && b.gflops > 0.0 && b.loss.is_finite()));
            assert_eq!(o[1].seconds, outs[0][1].seconds, "time is the max over ranks");
            assert_eq!(o[2].loss, outs[0][2].loss, "the naive SigLIP loss is summed over ranks");
        }
    }
}
