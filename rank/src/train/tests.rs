//! The training loop in one process, ranks as threads: on a device shaped like a GPU
//! (`Tracked`: buffers that are not `Vec`s, counted waits and staged arguments), and its two
//! device hooks with host stand-ins: the loss on the device (`DeviceLoss`, what the fused CLIP
//! kernels are on a GPU) and the overlapped all-reduce (`DeviceOverlap`, what NCCL does).

use std::ops::Range;

use tessera_collectives::threads::ThreadComm;

use super::*;
use crate::device::tracked::Tracked;
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
    /// Elements reduced, over all steps.
    values: usize,
}

impl DeviceOverlap for HostOverlap {
    fn begin(
        &mut self,
        _: &mut dyn Communicator,
        grads: &[f32],
        spans: &[Range<usize>],
    ) -> Result<(), CommError> {
        assert!(self.plan.is_none(), "begin twice without take");
        self.plan = Some(BucketPlan::new(grads.len(), spans, 256));
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
            self.values += r.len();
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
        let plan = self.plan.take().expect("take before begin");
        for (i, x) in self.reduced.iter().enumerate() {
            let inside = plan.spans().iter().any(|s| s.contains(&i));
            assert_eq!(x.is_nan(), !inside, "element {i}: reduced {x}, inside a span: {inside}");
        }
        for s in plan.spans() {
            grads[s.clone()].copy_from_slice(&self.reduced[s.clone()]);
        }
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

/// Runs `f(info, comm, cfg)` on `world` thread ranks; returns the results in rank order.
fn on_ranks<T: Send>(
    world: usize,
    cfg: Config,
    f: impl Fn(RankInfo, &mut ThreadComm, &Config) -> T + Sync,
) -> Vec<T> {
    ThreadComm::run_group(world, |rank, comm| {
        let info = RankInfo { rank, world, local_size: world, local_rank: rank };
        f(info, comm, &cfg)
    })
}

/// Trains on `world` thread ranks; with `overlap`, every rank gets a `HostOverlap`. Returns
/// rank 0's summary and, per rank, (steps, layer reports, elements reduced) of its overlap.
fn run(world: usize, cfg: Config, overlap: bool) -> (Summary, Vec<(usize, usize, usize)>) {
    let mut outs = on_ranks(world, cfg, move |info, comm, cfg| {
        let mut ov = HostOverlap::default();
        let dev = CpuDevice::new(1);
        let hook = overlap.then_some(&mut ov as &mut dyn DeviceOverlap);
        let s = train_on(cfg, comm, &info, &mut |_| {}, 1, &dev, None, hook).expect("training");
        (s, (ov.steps, ov.reports, ov.values))
    });
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
        let n = Model::new(&model_config(&over), 0).expect("model").num_params();
        let (got, counts) = run(world, over, true);
        let what = format!("world {world}, micro {micro}");
        assert_eq!(got.params_sha256, want.params_sha256, "{what}");
        assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{what}");
        assert_eq!(got.b_simple.map(f64::to_bits), want.b_simple.map(f64::to_bits), "{what}");
        for (steps, reports, values) in counts {
            assert_eq!(steps, 4, "{what}: one overlapped all-reduce per step");
            assert_eq!(values, 4 * n, "{what}: every element reduced once per step");
            // Two towers of 2 blocks: head, 2 blocks, input layer each, every step.
            assert_eq!(reports, 4 * 2 * 4, "{what}: layer reports");
        }
    }
}

/// The training loop on a device whose buffers are not `Vec`s (the shape of `run.device =
/// "cuda"`: model, optimizer state and activations in device memory) trains bitwise like the
/// CPU device, for the kinds of job the loop distinguishes; and a step's host waits and
/// staged kernel arguments stay what a GPU step is meant to cost.
#[test]
fn training_on_device_buffers_matches_the_cpu() {
    // (job, ranks, settings, (host waits, staged kernel arguments) per step). The waits: the
    // forward, the backward, the noise scale's norms of the local and of the reduced gradient
    // (one set at one rank; the non-finite checks read them), the optimizer's passes (SGD
    // and, on this device, LAMB one; LARS two); with micro-batches the embedding and the
    // replay wait per micro-batch and the local norms are the host's, so the
    // local non-finite check looks itself; the host-thread overlap waits once per layer (8).
    // Staged: the two views and the two feature gradients, per micro-batch with GradCache
    // (embedding, then replay).
    type Job<'a> = (&'a str, usize, &'a [&'a str], (usize, usize));
    let jobs: [Job; 6] = [
        ("clip_tiled, one rank", 1, &[], (4, 4)),
        ("clip_tiled, micro-batches, 2 ranks", 2, &["batch.micro=8"], (11, 12)),
        // The frozen tower b: not run in the replay (its view is not staged there, nor its
        // feature gradient); the noise scale's norms skip it, so the non-finite check reads the
        // gradient itself (one wait more).
        ("LiT, micro-batches, 2 ranks", 2, &["batch.micro=8", "model.freeze_b=true"], (12, 8)),
        ("clip, 2 ranks, lars", 2, &["loss.name=\"clip\"", "optim.name=\"lars\""], (6, 4)),
        ("siglip, 2 ranks, lamb", 2, &["loss.name=\"siglip\"", "optim.name=\"lamb\""], (5, 4)),
        ("overlapped all-reduce, 2 ranks", 2, &["run.overlap_allreduce=true"], (13, 4)),
    ];
    for (what, world, extra, cost) in jobs {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpu_cfg = config(&dir.path().join("cpu"), extra);
        let dev_cfg = config(&dir.path().join("dev"), extra);
        let steps = cpu_cfg.run.steps as usize;
        let want = on_ranks(world, cpu_cfg, |info, comm, cfg| {
            train_on(cfg, comm, &info, &mut |_| {}, 1, &CpuDevice::new(1), None, None)
                .expect("training on the CPU device")
        });
        let got = on_ranks(world, dev_cfg, |info, comm, cfg| {
            let dev = Tracked::new();
            // (waits, staged arguments) when each step reports.
            let mut marks = Vec::new();
            let mut on_step = |_: StepReport| {
                let l = dev.ledger();
                marks.push((l.syncs, l.foreign));
            };
            let s = train_on(cfg, comm, &info, &mut on_step, 1, &dev, None, None)
                .expect("training on the tracked device");
            let per_step: Vec<(usize, usize)> =
                marks.windows(2).map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1)).collect();
            (s, per_step)
        });
        for (w, (g, per_step)) in want.iter().zip(&got) {
            assert_eq!(g.params_sha256, w.params_sha256, "{what}");
            assert_eq!(g.loss.to_bits(), w.loss.to_bits(), "{what}");
            assert_eq!(*per_step, vec![cost; steps - 1], "{what}: (waits, staged) per step");
        }
    }
}

/// A loss on the device (what the fused CLIP kernels are on a GPU) gets the features where
/// the forward left them and may hand back gradients in device buffers: then a step stages
/// only its two views, and trains bitwise like the host path. The stand-in computes the ring
/// loss on the host after a wait and returns its gradients in fresh device buffers. SigLIP
/// (with the logit bias passed in, its gradient handed back) as CLIP.
#[test]
fn a_device_loss_keeps_features_and_gradients_on_the_device() {
    // (ranks, settings, staged arguments per step): the two views, per micro-batch twice with
    // GradCache (embedding, replay).
    type Job<'a> = (usize, &'a [&'a str], usize);
    let jobs: [Job; 5] = [
        (1, &[], 2),
        (2, &[], 2),
        (2, &["batch.micro=4"], 16),
        (1, &["loss.name=\"siglip\""], 2),
        (2, &["loss.name=\"siglip\"", "batch.micro=4"], 16),
    ];
    for (world, extra, want_staged) in jobs {
        let dir = tempfile::tempdir().expect("tempdir");
        let want = on_ranks(world, config(&dir.path().join("cpu"), extra), |info, comm, cfg| {
            train_on(cfg, comm, &info, &mut |_| {}, 1, &CpuDevice::new(1), None, None)
                .expect("training on the CPU device")
        });
        let got = on_ranks(world, config(&dir.path().join("dev"), extra), |info, comm, cfg| {
            let dev = Tracked::new();
            let opts = loss::RingLossOpts { threads: 1, ..cfg.loss.ring_opts() };
            let mut ws = loss::RingLossWorkspace::new(&opts).expect("workspace");
            let mut calls = 0;
            let mut on_dev = |comm: &mut dyn Communicator,
                              img: &[f32],
                              txt: &[f32],
                              b: usize,
                              d: usize,
                              scale: f32,
                              bias: Option<f32>| {
                calls += 1;
                let l = dev.ledger();
                let in_device = l.containing(img).is_some() && l.containing(txt).is_some();
                drop(l);
                assert!(in_device, "the features reached the loss through the host");
                dev.synchronize();
                let (ws, txt) = (&mut ws, txt.to_vec());
                let o = match bias {
                    None => loss::clip_loss_ring_ws_owned(comm, ws, img, txt, b, d, scale, None)?,
                    Some(bias) => loss::siglip_loss_ring_ws_owned(
                        comm, ws, img, txt, b, d, scale, bias, None,
                    )?,
                };
                let (mut gi, mut gt) = (dev.alloc(b * d), dev.alloc(b * d));
                dev.synchronize();
                gi.copy_from_slice(&o.d_img_local);
                gt.copy_from_slice(&o.d_txt_local);
                Ok((o.loss, Vals::Device(gi), Vals::Device(gt), o.d_t_partial, o.d_bias_partial))
            };
            let mut marks = Vec::new();
            let mut on_step = |_: StepReport| marks.push(dev.ledger().foreign);
            let loss_hook: &mut DeviceLoss<_> = &mut on_dev;
            let s = train_on(cfg, comm, &info, &mut on_step, 1, &dev, Some(loss_hook), None)
                .expect("training on the tracked device");
            let staged: Vec<usize> = marks.windows(2).map(|w| w[1] - w[0]).collect();
            (s, staged, calls)
        });
        let steps = 4;
        for (w, (g, staged, calls)) in want.iter().zip(&got) {
            let what = format!("world {world} {extra:?}");
            assert_eq!(g.params_sha256, w.params_sha256, "{what}");
            assert_eq!(g.loss.to_bits(), w.loss.to_bits(), "{what}");
            assert_eq!(*calls, steps, "{what}: the device loss ran every step");
            assert_eq!(*staged, vec![want_staged; steps - 1], "{what}: staged arguments per step");
        }
    }
}

/// The all-reduce sends the trainable tensors only: a frozen tower b, and SigLIP's fixed
/// bias, are left out; adjacent trainable tensors merge into one range.
#[test]
fn the_all_reduce_spans_leave_out_frozen_tensors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spans = |extra: &[&str]| {
        let cfg = config(dir.path(), extra);
        let model = Model::new(&model_config(&cfg), 0).expect("model");
        let groups = model.param_groups();
        let offset = |name: &str| groups.iter().find(|g| g.name == name).expect(name).offset;
        (trainable_spans(&groups), model.num_params(), offset("b.in.weight"), offset("logit_scale"))
    };
    let (all, n, _, _) = spans(&[]);
    assert_eq!(all, vec![0..n]);
    let (lit, n, b0, t) = spans(&["model.freeze_b=true"]);
    assert_eq!(t, n - 1);
    assert_eq!(lit, vec![0..b0, t..n]);
    let fixed_bias = ["loss.name=\"siglip\"", "loss.learnable_bias=false", "model.freeze_b=true"];
    let (sig, n, b0, t) = spans(&fixed_bias);
    assert_eq!((t, n), (n - 2, t + 2));
    assert_eq!(sig, vec![0..b0, t..t + 1]);
}

/// The trainable ranges' all-reduce sums each range bitwise as the whole buffer's all-reduce
/// does, and leaves the rest as it was on each rank (its values differ by rank here, so a range
/// that was sent would show).
#[test]
fn all_reduce_spans_sum_the_spans_like_the_whole_buffer() {
    let total = 1_001;
    let spans = [0..300, 420..421, 700..1_001];
    let local = |r: usize| -> Vec<f32> {
        (0..total).map(|i| ((r * 31 + i * 17) % 101) as f32 * 0.37 - 18.0).collect()
    };
    let outs = ThreadComm::run_group(3, |r, c| {
        let mut got = local(r);
        all_reduce_spans(c, &mut got, &spans).expect("spans");
        let mut whole = local(r);
        c.all_reduce_f32(&mut whole, ReduceOp::Sum).expect("whole");
        (got, whole)
    });
    for (r, (got, whole)) in outs.iter().enumerate() {
        let mine = local(r);
        for i in 0..total {
            let want = if spans.iter().any(|s| s.contains(&i)) { whole[i] } else { mine[i] };
            assert_eq!(got[i].to_bits(), want.to_bits(), "rank {r}, element {i}");
        }
    }
}

/// Frozen tensors on three ranks (LiT's tower b; `model.freeze` of a layer in each tower and of
/// the temperature; a frozen tower a under GradCache's replay): the trainable ranges'
/// all-reduce, the host buckets over them (`run.overlap_allreduce`) and the device path's
/// buckets (whose stand-in checks at `take` that no frozen element was reduced) train bitwise
/// alike.
#[test]
fn frozen_tensors_train_bitwise_alike_on_every_all_reduce_path() {
    // Layer reports per step: LiT's tower a (head, 2 blocks, input layer); with a frozen input
    // layer of tower a and block 1 of tower b, 3 of each tower's 4 layers; with tower a frozen,
    // tower b's 4 (in the last micro-batch's replay, the one that overlaps).
    let cases: [(&str, &str, usize); 3] = [
        ("model.freeze_b=true", "batch.micro=0", 4),
        (r#"model.freeze=["a.in", "b.blocks.1", "logit_scale"]"#, "batch.micro=0", 6),
        (r#"model.freeze=["a"]"#, "batch.micro=4", 4),
    ];
    for (freeze, micro, layers) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let lit = [freeze, micro, "batch.global=30"];
        let mut over = lit.to_vec();
        over.extend(["run.overlap_allreduce=true", "run.allreduce_bucket_bytes=256"]);
        let (want, _) = run(3, config(&dir.path().join("plain"), &lit), false);
        let (host, _) = run(3, config(&dir.path().join("host"), &over), false);
        let device_cfg = config(&dir.path().join("device"), &over);
        let groups = Model::new(&model_config(&device_cfg), 0).expect("model").param_groups();
        let trainable: usize = groups.iter().filter(|g| g.trainable).map(|g| g.len).sum();
        assert!(trainable < groups.iter().map(|g| g.len).sum::<usize>());
        let (device, counts) = run(3, device_cfg, true);
        for (what, got) in [("host buckets", &host), ("device buckets", &device)] {
            assert_eq!(got.params_sha256, want.params_sha256, "{freeze}: {what}");
            assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{freeze}: {what}");
        }
        for (steps, reports, values) in counts {
            assert_eq!(steps, 4, "{freeze}: one overlapped all-reduce per step");
            assert_eq!(values, 4 * trainable, "{freeze}: the trainable elements, once per step");
            assert_eq!(reports, 4 * layers, "{freeze}: layer reports");
        }
    }
}

/// Data that does not fit the model is named in words, with the keys to change.
#[test]
fn data_that_does_not_fit_the_model_is_described() {
    let dir = tempfile::tempdir().unwrap();
    let spec =
        crate::data::SynthSpec { n_train: 8, n_eval: 4, dim_a: 5, dim_b: 6, ..Default::default() };
    let (train, _) = crate::data::synth(&spec);
    let cfg = config(dir.path(), &[]);
    let e = check_dims(&cfg, &train, "training").unwrap_err().to_string();
    assert!(
        e.starts_with(
            "the training data holds paired views of dims 5 and 6 but model.kind = \"dual\" expects \
             paired views of dims 32 (model.tower_a.input_dim) and 32"
        ),
        "{e}"
    );
    let cfg = config(dir.path(), &["model.kind=\"classifier\"", "model.tower_a.input_dim=5"]);
    let e = check_dims(&cfg, &train, "training").unwrap_err().to_string();
    assert!(e.contains("but model.kind = \"classifier\" expects labeled features of dim 5"), "{e}");
}

/// `optim.lr_scale` reaches the optimizer through the training loop: tower b at factor 0 keeps
/// its initial values (its gradient is still computed and all-reduced), so the run ends with
/// the parameters of a run with tower b frozen, bitwise; at factor 0.5 it moves, and differently.
#[test]
fn lr_scale_zero_on_a_tower_trains_like_freezing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (frozen, _) = run(2, config(&dir.path().join("frozen"), &["model.freeze_b=true"]), false);
    let zero = config(&dir.path().join("zero"), &[r#"optim.lr_scale={"b" = 0.0}"#]);
    let (still, _) = run(2, zero, false);
    assert_eq!(still.params_sha256, frozen.params_sha256);
    let half = config(&dir.path().join("half"), &[r#"optim.lr_scale={"b" = 0.5}"#]);
    let (half, _) = run(2, half, false);
    let (full, _) = run(2, config(&dir.path().join("full"), &[]), false);
    let hashes = [&frozen.params_sha256, &half.params_sha256, &full.params_sha256];
    assert!(hashes[0] != hashes[1] && hashes[1] != hashes[2], "{hashes:?}");
}
