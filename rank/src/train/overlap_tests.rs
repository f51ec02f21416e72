//! The training loop's device-overlap path (`DeviceOverlap`, what NCCL does on a GPU) with a
//! host stand-in: the same calls in the same places, buckets planned by `BucketPlan` and
//! reduced by the thread communicator, so the result must be bitwise the plain all-reduce's.

use std::ops::Range;

use tessera_collectives::threads::ThreadComm;

use super::*;
use crate::overlap::BucketPlan;

/// A `DeviceOverlap` on the host: records the buckets as the plan hands them out and reduces
/// them at `finish` (it cannot read the gradient earlier), checking the call order.
#[derive(Default)]
struct HostOverlap {
    plan: Option<BucketPlan>,
    due: Vec<Range<usize>>,
    reduced: Vec<f32>,
    addr: usize,
    finished: bool,
    steps: usize,
    reports: usize,
}

impl DeviceOverlap for HostOverlap {
    fn begin(&mut self, _: &mut dyn Communicator, grads: &[f32]) -> Result<(), CommError> {
        assert!(self.plan.is_none(), "begin twice without take");
        self.plan = Some(BucketPlan::new(grads.len(), 256));
        self.addr = grads.as_ptr() as usize;
        self.reduced = vec![f32::NAN; grads.len()];
        self.finished = false;
        Ok(())
    }

    fn ready(
        &mut self,
        _: &mut dyn Communicator,
        offset: usize,
        len: usize,
    ) -> Result<(), CommError> {
        assert!(!self.finished, "ready after finish");
        let plan = self.plan.as_mut().expect("ready before begin");
        self.due.extend(plan.ready(offset, len));
        self.reports += 1;
        Ok(())
    }

    fn finish(&mut self, comm: &mut dyn Communicator, grads: &[f32]) -> Result<(), CommError> {
        assert_eq!(grads.as_ptr() as usize, self.addr, "finish on another buffer");
        let plan = self.plan.as_mut().expect("finish before begin");
        self.due.extend(plan.finish());
        let total = grads.len();
        for r in std::mem::take(&mut self.due) {
            let mut v = grads[r.clone()].to_vec();
            comm.all_reduce_f32_part(&mut v, r.start, total, ReduceOp::Sum)?;
            self.reduced[r].copy_from_slice(&v);
        }
        self.finished = true;
        Ok(())
    }

    fn take(&mut self, _: &mut dyn Communicator, grads: &mut [f32]) -> Result<(), CommError> {
        assert!(self.finished, "take before finish");
        assert_eq!(grads.as_ptr() as usize, self.addr, "take on another buffer");
        assert!(self.reduced.iter().all(|x| !x.is_nan()), "an element was never reduced");
        grads.copy_from_slice(&self.reduced);
        self.plan = None;
        self.steps += 1;
        Ok(())
    }
}

fn config(out: &std::path::Path, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "model.tower_a.width=16",
        "model.tower_a.depth=2",
        "model.tower_a.output_dim=8",
        "model.tower_b.width=16",
        "model.tower_b.depth=2",
        "model.tower_b.output_dim=8",
        "loss.name=\"clip_tiled\"",
        "gns.enabled=true",
        "run.steps=4",
        "run.log_every=1",
        "batch.global=32",
        "checkpoint.enabled=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("run.out_dir={:?}", out.display().to_string()));
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).expect("test config")
}

/// Trains on `world` thread ranks; with `overlap`, every rank gets a `HostOverlap`. Returns
/// rank 0's summary and, per rank, (steps, layer reports) of its overlap.
fn run(world: usize, cfg: Config, overlap: bool) -> (Summary, Vec<(usize, usize)>) {
    let cfg = std::sync::Arc::new(cfg);
    let hs: Vec<_> = ThreadComm::group(world)
        .into_iter()
        .enumerate()
        .map(|(rank, mut comm)| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let info = RankInfo { rank, world, local_size: world, local_rank: rank };
                let mut ov = HostOverlap::default();
                let dev = CpuDevice::new(1);
                let hook = overlap.then_some(&mut ov as &mut dyn DeviceOverlap);
                let s = train_on(&cfg, &mut comm, &info, &mut |_| {}, 1, &dev, None, hook)
                    .expect("training");
                (s, (ov.steps, ov.reports))
            })
        })
        .collect();
    let mut outs: Vec<_> = hs.into_iter().map(|h| h.join().expect("rank thread")).collect();
    let counts = outs.iter().map(|o| o.1).collect();
    (outs.swap_remove(0).0, counts)
}

/// The device path of the training loop (begin, layer reports while the backward is queued,
/// finish, take after the local readers) gives bitwise the plain all-reduce's training, with
/// and without micro-batches (only the last replay overlaps), at world sizes 1 (the path NCCL
/// checks on one GPU) and 2.
#[test]
fn device_overlap_trains_bitwise_like_the_plain_all_reduce() {
    for (world, micro) in [(1usize, 0usize), (2, 0), (2, 4)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let micro_set = format!("batch.micro={micro}");
        let plain = config(&dir.path().join("plain"), &[&micro_set]);
        let over = config(
            &dir.path().join("overlap"),
            &[&micro_set, "run.overlap_allreduce=true", "run.allreduce_bucket_bytes=256"],
        );
        let (want, _) = run(world, plain, false);
        let (got, counts) = run(world, over, true);
        let what = format!("world {world}, micro {micro}");
        assert_eq!(got.params_sha256, want.params_sha256, "{what}");
        assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{what}");
        assert_eq!(got.b_simple.map(f64::to_bits), want.b_simple.map(f64::to_bits), "{what}");
        for (steps, reports) in counts {
            assert_eq!(steps, 4, "{what}: one overlapped all-reduce per step");
            // Two towers of 2 blocks: head, 2 blocks, input layer each, every step.
            assert_eq!(reports, 4 * 2 * 4, "{what}: layer reports");
        }
    }
}
