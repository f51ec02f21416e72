use std::time::Duration;

use tessera_collectives::threads::ThreadComm;

use super::*;
use crate::gns::GlobalStats;
use crate::optim::TensorGroup;

fn small_config(extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "model.tower_a.width=8",
        "model.tower_a.depth=1",
        "model.tower_a.output_dim=4",
        "model.tower_b.width=8",
        "model.tower_b.depth=1",
        "model.tower_b.output_dim=4",
        "optim.name=\"lamb\"",
        "run.steps=10",
        "batch.global=16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &sets).unwrap()
}

/// A model, optimizer and noise-scale estimator after a few steps of made-up gradients.
struct Live {
    model: Model,
    opt: Optimizer,
    gns: GnsEstimator,
}

fn live(cfg: &Config, steps: u64) -> Live {
    let mut model = Model::new(&cfg.model, cfg.run.seed).unwrap();
    let groups: Vec<TensorGroup> = model
        .param_groups()
        .into_iter()
        .map(|g| TensorGroup::from_shape(g.name, g.offset, g.len, &g.shape, g.trainable))
        .collect();
    let spans: Vec<(usize, usize)> =
        model.param_groups().iter().map(|g| (g.offset, g.len)).collect();
    let mut opt = Optimizer::new(&cfg.optim, groups).unwrap();
    let mut gns = GnsEstimator::new(&cfg.gns, &spans).unwrap();
    for s in 0..steps {
        let n = model.num_params();
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32 + s as f32) * 0.37).sin() * 0.01).collect();
        let slots = if cfg.gns.per_group { spans.len() } else { 1 };
        let global = GlobalStats {
            samples: 4,
            examples: 16,
            weighted_sq: (0..slots).map(|k| 0.5 + k as f64 + s as f64).collect(),
        };
        gns.update(&global, &grads, 16).unwrap();
        opt.step(model.params_mut(), &grads, 0.01, s);
    }
    Live { model, opt, gns }
}

fn sample(cfg: &Config, step: u64) -> Checkpoint {
    let l = live(cfg, step);
    Checkpointer::new(cfg, 2, 7).capture(step, &l.model, &l.opt, Some(&l.gns), None, 1.25)
}

#[test]
fn round_trip_keeps_everything() {
    let cfg = small_config(&[]);
    let ck = sample(&cfg, 3);
    assert_eq!(ck.epoch, 0);
    assert_eq!(ck.epoch_step, 3);
    assert!(ck.gns.as_ref().unwrap().last.is_some());
    assert!(!ck.optimizer_state.is_empty());
    let bytes = encode(&ck).unwrap();
    assert_eq!(&bytes[..8], CHECKPOINT_MAGIC);
    let back = read_checkpoint(&bytes).unwrap();
    assert_eq!(back, ck);
    // Unaligned input reads the same (the archive is copied to an aligned buffer).
    let mut shifted = vec![0u8; 1];
    shifted.extend_from_slice(&bytes);
    assert_eq!(read_checkpoint(&shifted[1..]).unwrap(), ck);
}

#[test]
fn every_truncation_is_an_error_that_says_truncated() {
    let bytes = encode(&sample(&small_config(&[]), 1)).unwrap();
    let lens: Vec<usize> = (0..200).chain((200..bytes.len()).step_by(97)).collect();
    for n in lens {
        let err = read_checkpoint(&bytes[..n]).unwrap_err();
        if n < 8 {
            assert!(matches!(err, CheckpointError::BadMagic { .. }), "{n}: {err}");
        } else {
            assert!(matches!(err, CheckpointError::Truncated { .. }), "{n}: {err}");
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }
}

#[test]
fn flipped_bytes_are_caught_and_named() {
    let bytes = encode(&sample(&small_config(&[]), 1)).unwrap();
    let flip = |i: usize| {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        read_checkpoint(&b).unwrap_err()
    };
    assert!(matches!(flip(0), CheckpointError::BadMagic { .. }));
    let e = flip(8);
    let flipped = CHECKPOINT_FORMAT_VERSION ^ 0x40;
    assert!(
        matches!(e, CheckpointError::UnsupportedVersion { found, .. } if found == flipped),
        "{e}"
    );
    assert!(matches!(flip(12), CheckpointError::Invalid { .. }));
    assert!(matches!(flip(17), CheckpointError::Truncated { .. }));
    assert!(matches!(flip(30), CheckpointError::Checksum { .. }));
    assert!(matches!(flip(60), CheckpointError::Invalid { .. }));
    for i in (CHECKPOINT_HEADER_LEN..bytes.len()).step_by(31) {
        let e = flip(i);
        assert!(matches!(e, CheckpointError::Checksum { .. }), "byte {i}: {e}");
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
    // Trailing garbage.
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(read_checkpoint(&long), Err(CheckpointError::Invalid { .. })));
}

/// A header with a correct checksum around any payload: what a fuzzer past the checksum sees.
fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(CHECKPOINT_MAGIC);
    out.extend_from_slice(&CHECKPOINT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(CHECKPOINT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(payload);
    out
}

#[test]
fn garbage_with_a_valid_checksum_fails_validation_without_panicking() {
    let good = encode(&sample(&small_config(&[]), 1)).unwrap();
    let payload = &good[CHECKPOINT_HEADER_LEN..];
    let mut x: u64 = 0x1234_5678;
    for round in 0..300 {
        let mut p = payload.to_vec();
        for _ in 0..1 + round % 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % p.len();
            p[i] = (x >> 32) as u8;
        }
        // Either it is rejected, or what it decodes to passed every content check.
        if let Ok(ck) = read_checkpoint(&with_header(&p)) {
            assert_eq!(ck.tensors.iter().map(|t| t.len).sum::<u64>(), ck.params.len() as u64);
        }
    }
    for junk in [&[][..], &[0u8; 3][..], &[0xffu8; 64][..]] {
        assert!(read_checkpoint(&with_header(junk)).is_err());
    }
}

#[test]
fn contents_that_do_not_add_up_are_refused() {
    let mut ck = sample(&small_config(&[]), 1);
    ck.params.pop();
    let err = read_checkpoint(&encode(&ck).unwrap()).unwrap_err().to_string();
    assert!(err.contains("parameters are stored"), "{err}");
    let mut ck = sample(&small_config(&[]), 1);
    ck.tensors[1].shape.push(2);
    let err = read_checkpoint(&encode(&ck).unwrap()).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    let mut ck = sample(&small_config(&[]), 1);
    ck.step = ck.total_steps + 1;
    let err = read_checkpoint(&encode(&ck).unwrap()).unwrap_err().to_string();
    assert!(err.contains("past run.steps"), "{err}");
}

#[test]
fn writes_are_atomic_and_only_the_last_k_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(&[]);
    let ck = sample(&cfg, 1);
    for step in 1..=5 {
        let (path, size) =
            write_checkpoint(dir.path(), &Checkpoint { step, ..ck.clone() }, 2).unwrap();
        assert_eq!(path.file_name().unwrap().to_str().unwrap(), checkpoint_file_name(step));
        assert_eq!(size, fs::metadata(&path).unwrap().len());
    }
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, vec!["ckpt-00000004.tsr", "ckpt-00000005.tsr"]);
    // A temporary file from an interrupted write goes at the next save; keep = 0 keeps all.
    fs::write(dir.path().join(".ckpt-00000006.tsr.tmp999"), b"half").unwrap();
    write_checkpoint(dir.path(), &Checkpoint { step: 6, ..ck.clone() }, 0).unwrap();
    let steps: Vec<u64> = list_checkpoints(dir.path()).unwrap().iter().map(|s| s.0).collect();
    assert_eq!(steps, vec![4, 5, 6]);
    assert!(!dir.path().join(".ckpt-00000006.tsr.tmp999").exists());
    assert_eq!(load_checkpoint(&dir.path().join("ckpt-00000006.tsr")).unwrap().step, 6);
}

#[test]
fn latest_valid_skips_damaged_files_and_refuses_when_all_are() {
    let dir = tempfile::tempdir().unwrap();
    assert!(latest_valid(dir.path()).unwrap().is_none());
    assert!(latest_valid(&dir.path().join("missing")).unwrap().is_none());
    let ck = sample(&small_config(&[]), 1);
    for step in [2, 4] {
        write_checkpoint(dir.path(), &Checkpoint { step, ..ck.clone() }, 0).unwrap();
    }
    let newest = dir.path().join(checkpoint_file_name(4));
    let bytes = fs::read(&newest).unwrap();
    fs::write(&newest, &bytes[..bytes.len() - 10]).unwrap();
    let found = latest_valid(dir.path()).unwrap().unwrap();
    assert_eq!(found.checkpoint.step, 2);
    assert_eq!(found.skipped.len(), 1);
    assert!(found.skipped[0].contains("ckpt-00000004.tsr"), "{:?}", found.skipped);
    let oldest = dir.path().join(checkpoint_file_name(2));
    fs::write(&oldest, b"TSRACKPTjunk").unwrap();
    let err = latest_valid(dir.path()).err().unwrap().to_string();
    assert!(err.contains("damaged") && err.contains("ckpt-00000002.tsr"), "{err}");
}

#[test]
fn restore_brings_back_params_optimizer_and_noise_scale() {
    let cfg = small_config(&[]);
    let a = live(&cfg, 4);
    let ckpt = Checkpointer::new(&cfg, 1, 7);
    let ck = ckpt.capture(4, &a.model, &a.opt, Some(&a.gns), None, 0.5);
    let resumed = Resumed {
        origin: "mem".into(),
        checkpoint: read_checkpoint(&encode(&ck).unwrap()).unwrap(),
    };
    let mut b = live(&cfg, 0);
    let warnings = ckpt.restore(&resumed, &mut b.model, &mut b.opt, Some(&mut b.gns)).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(b.model.params(), a.model.params());
    assert_eq!(b.opt.state_bytes(), a.opt.state_bytes());
    assert_eq!(b.opt.steps(), 4);
    assert_eq!(b.gns.export_state(), a.gns.export_state());
    assert_eq!(b.gns.b_simple(), a.gns.b_simple());
    // The next step is the same from both.
    let g: Vec<f32> = (0..a.model.num_params()).map(|i| (i as f32 * 0.1).cos() * 0.01).collect();
    let (mut pa, mut pb) = (a.model.params().to_vec(), b.model.params().to_vec());
    let (mut oa, mut ob) = (a.opt.clone(), b.opt.clone());
    oa.step(&mut pa, &g, 0.01, 4);
    ob.step(&mut pb, &g, 0.01, 4);
    assert_eq!(pa, pb);
}

#[test]
fn a_different_config_or_model_is_refused_with_the_keys_and_the_fix() {
    let cfg = small_config(&[]);
    let a = live(&cfg, 2);
    let ck = Checkpointer::new(&cfg, 2, 7).capture(2, &a.model, &a.opt, Some(&a.gns), None, 0.5);
    let resumed = Resumed { origin: "ckpt-00000002.tsr".into(), checkpoint: ck };

    let other = small_config(&["optim.lr=0.125"]);
    let mut b = live(&other, 0);
    let err = Checkpointer::new(&other, 2, 7)
        .restore(&resumed, &mut b.model, &mut b.opt, Some(&mut b.gns))
        .unwrap_err()
        .to_string();
    for part in [
        "ckpt-00000002.tsr",
        &cfg.resume_hash()[..12],
        &other.resume_hash()[..12],
        "optim.lr",
        "allow_config_change",
    ] {
        assert!(err.contains(part), "{part:?} missing: {err}");
    }
    assert_eq!(b.model.params(), live(&other, 0).model.params(), "changed despite the error");

    let allowed = small_config(&["optim.lr=0.125", "checkpoint.allow_config_change=true"]);
    let mut c = live(&allowed, 0);
    let w = Checkpointer::new(&allowed, 3, 7)
        .restore(&resumed, &mut c.model, &mut c.opt, Some(&mut c.gns))
        .unwrap();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("optim.lr") && w[1].contains("2 ranks"), "{w:?}");
    assert_eq!(c.model.params(), a.model.params());

    // Written by an earlier version whose config lacked keys this one has (at their defaults
    // here): its hash differs, but its config read now is this run's, so it resumes.
    let mut older = resumed.checkpoint.clone();
    let before = older.config_toml.lines().count();
    older.config_toml = older
        .config_toml
        .lines()
        .filter(|l| !l.starts_with("cuda_loss_mode") && !l.starts_with("cuda_loss_precision"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(older.config_toml.lines().count(), before - 2, "the keys were in the TOML");
    older.config_hash = "0".repeat(64);
    let older = Resumed { origin: "old.tsr".into(), checkpoint: older };
    let mut g = live(&cfg, 0);
    let w = Checkpointer::new(&cfg, 2, 7)
        .restore(&older, &mut g.model, &mut g.opt, Some(&mut g.gns))
        .expect("an earlier version's checkpoint of the same config");
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(g.model.params(), a.model.params());
    // ... unless its config does not parse: then the hash decides.
    let mut broken = older.checkpoint.clone();
    broken.config_toml = "[run\n".into();
    let broken = Resumed { origin: "broken.tsr".into(), checkpoint: broken };
    let err = Checkpointer::new(&cfg, 2, 7)
        .restore(&broken, &mut g.model, &mut g.opt, Some(&mut g.gns))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not parse") && err.contains("allow_config_change"), "{err}");

    // Other shapes: refused even when config changes are allowed.
    let wide = small_config(&["model.tower_a.width=9", "checkpoint.allow_config_change=true"]);
    let mut d = live(&wide, 0);
    let err = Checkpointer::new(&wide, 2, 7)
        .restore(&resumed, &mut d.model, &mut d.opt, Some(&mut d.gns))
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameters but this model has"), "{err}");

    // Another optimizer: its state does not fit.
    let sgd = small_config(&["optim.name=\"sgd\"", "checkpoint.allow_config_change=true"]);
    let mut e = live(&sgd, 0);
    let err = Checkpointer::new(&sgd, 2, 7)
        .restore(&resumed, &mut e.model, &mut e.opt, Some(&mut e.gns))
        .unwrap_err()
        .to_string();
    assert!(err.contains("lamb"), "{err}");

    // Per-group noise-scale averages do not fit a total-only estimator.
    let total = small_config(&["gns.per_group=false", "checkpoint.allow_config_change=true"]);
    let mut f = live(&total, 0);
    let err = Checkpointer::new(&total, 2, 7)
        .restore(&resumed, &mut f.model, &mut f.opt, Some(&mut f.gns))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gns.per_group"), "{err}");
}

#[test]
fn schedule_of_saves_and_the_planned_stop() {
    let cfg = small_config(&["checkpoint.every=4", "checkpoint.stop_after=6"]);
    let c = Checkpointer::new(&cfg, 1, 7);
    let due: Vec<u64> = (1..=10).filter(|&s| c.due(s)).collect();
    assert_eq!(due, vec![4, 6, 8, 10]);
    assert!(c.stops_after(6) && !c.stops_after(10));
    let only_end = Checkpointer::new(&small_config(&[]), 1, 7);
    assert_eq!((1..=10).filter(|&s| only_end.due(s)).collect::<Vec<_>>(), vec![10]);
    let off = Checkpointer::new(&small_config(&["checkpoint.enabled=false"]), 1, 7);
    assert!(!(1..=10).any(|s| off.due(s)));
    let err =
        Config::load(None, &["checkpoint.enabled=false".into(), "checkpoint.stop_after=3".into()])
            .unwrap_err()
            .to_string();
    assert!(err.contains("checkpoint.stop_after"), "{err}");
}

#[test]
fn resume_spec_resolves_auto_dirs_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    fs::create_dir_all(out.join("checkpoints")).unwrap();
    let set_out = format!("run.out_dir={:?}", out.display().to_string());
    let with = |spec: &str| {
        let r = format!("checkpoint.resume={spec:?}");
        ResumeFrom::of(&small_config(&[&set_out, &r]))
    };
    assert_eq!(ResumeFrom::of(&small_config(&[&set_out])), ResumeFrom::Fresh);
    assert_eq!(with("auto"), ResumeFrom::Auto(out.join("checkpoints")));
    let out_s = out.display().to_string();
    assert_eq!(with(&out_s), ResumeFrom::Dir(out.join("checkpoints")));
    let f = out.join("checkpoints").join("ckpt-00000001.tsr");
    assert_eq!(with(&f.display().to_string()), ResumeFrom::File(f));
}

/// Runs `f(rank, comm)` on `world` thread ranks and returns their results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &mut ThreadComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = ThreadComm::group_with_timeout(world, Duration::from_secs(60))
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, &mut c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn rank_zero_reads_and_every_rank_gets_the_same_checkpoint_or_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(&[]);
    let ck = sample(&cfg, 3);
    let (path, _) = write_checkpoint(dir.path(), &ck, 0).unwrap();
    let set = format!("checkpoint.resume={:?}", path.display().to_string());
    let cfg = small_config(&[&set]);
    let got = on_ranks(3, move |_, c| {
        fetch_resume(&cfg, c).map(|r| r.map(|r| (r.origin, r.checkpoint.params)))
    });
    for g in got {
        let (origin, params) = g.unwrap().unwrap();
        assert_eq!(origin, path.display().to_string());
        assert_eq!(params, ck.params);
    }
    // A damaged file: every rank fails, naming it.
    let bad = dir.path().join("bad.tsr");
    fs::write(&bad, b"TSRACKPT").unwrap();
    let set = format!("checkpoint.resume={:?}", bad.display().to_string());
    let cfg = small_config(&[&set]);
    for e in on_ranks(2, move |_, c| fetch_resume(&cfg, c).err().map(|e| e.to_string())) {
        let e = e.expect("an error on every rank");
        assert!(e.contains("bad.tsr") && e.contains("truncated"), "{e}");
    }
    // auto without checkpoints: a fresh start everywhere.
    let set_out = format!("run.out_dir={:?}", dir.path().join("fresh").display().to_string());
    let cfg = small_config(&[&set_out, "checkpoint.resume=\"auto\""]);
    for r in on_ranks(2, move |_, c| fetch_resume(&cfg, c).unwrap().is_none()) {
        assert!(r);
    }
}

#[test]
fn a_failed_write_on_rank_zero_stops_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    // The checkpoint directory is a file: creating it fails.
    let blocker = dir.path().join("blocker");
    fs::write(&blocker, b"x").unwrap();
    let set = format!("checkpoint.dir={:?}", blocker.display().to_string());
    let cfg = small_config(&[&set]);
    let l = live(&cfg, 1);
    let errs = on_ranks(2, move |_, c| {
        Checkpointer::new(&cfg, 2, 7)
            .save(c, 1, &l.model, &l.opt, Some(&l.gns), None, 0.0)
            .err()
            .map(|e| e.to_string())
    });
    for e in errs {
        let e = e.expect("an error on every rank");
        assert!(e.contains("blocker") && e.contains("step 1"), "{e}");
    }
}

#[test]
fn safetensors_layout_matches_the_format() {
    let ck = sample(&small_config(&[]), 2);
    let bytes = safetensors_bytes(&ck).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    assert_eq!(data.len(), 4 * ck.params.len());
    assert_eq!(header["__metadata__"]["step"], "2");
    assert_eq!(header["__metadata__"]["config_hash"], ck.config_hash.as_str());
    for t in &ck.tensors {
        let h = &header[&t.name];
        assert_eq!(h["dtype"], "F32");
        assert_eq!(h["shape"], serde_json::json!(t.shape));
        let (s, e) =
            (h["data_offsets"][0].as_u64().unwrap(), h["data_offsets"][1].as_u64().unwrap());
        let vals: Vec<f32> = data[s as usize..e as usize]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, ck.params[t.offset as usize..(t.offset + t.len) as usize]);
    }
    assert!(ck.tensors.iter().any(|t| t.shape.is_empty()), "the logit scale is a scalar");
}

#[test]
fn trim_metrics_drops_lines_past_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    fs::write(&p, "{\"step\":1}\n{\"step\":2,\"eval\":true}\n{\"other\":1}\n{\"step\":3}\n")
        .unwrap();
    trim_metrics(&p, 2).unwrap();
    assert_eq!(
        fs::read_to_string(&p).unwrap(),
        "{\"step\":1}\n{\"step\":2,\"eval\":true}\n{\"other\":1}\n"
    );
    trim_metrics(&dir.path().join("none.jsonl"), 2).unwrap();
}

#[test]
fn the_batch_schedule_round_trips_and_version_1_files_still_read() {
    let cfg = small_config(&[]);
    let l = live(&cfg, 3);
    let schedule = BatchSchedule {
        changes: vec![
            BatchChange { step: 2, batch: 32, b_simple: 40.5, lr_factor: 1.5 },
            BatchChange { step: 3, batch: 16, b_simple: 9.0, lr_factor: 0.75 },
        ],
    };
    let ck = Checkpointer::new(&cfg, 2, 7).capture(
        3,
        &l.model,
        &l.opt,
        Some(&l.gns),
        Some(&schedule),
        0.5,
    );
    let back = read_checkpoint(&encode(&ck).unwrap()).unwrap();
    assert_eq!(back, ck);
    assert_eq!(schedule_of(back.batch_schedule.as_deref().unwrap()), schedule);

    // A schedule out of order is refused.
    let mut bad = ck.clone();
    bad.batch_schedule.as_mut().unwrap()[1].step = 2;
    let err = read_checkpoint(&encode(&bad).unwrap()).unwrap_err().to_string();
    assert!(err.contains("batch schedule"), "{err}");

    // A file of format version 1 (no schedule) reads as a fixed-batch checkpoint.
    let v1 = CheckpointV1 {
        step: ck.step,
        total_steps: ck.total_steps,
        world: ck.world,
        seed: ck.seed,
        global_batch: ck.global_batch,
        epoch: ck.epoch,
        epoch_step: ck.epoch_step,
        config_hash: ck.config_hash.clone(),
        config_toml: ck.config_toml.clone(),
        tensors: ck.tensors.clone(),
        params: ck.params.clone(),
        optimizer_name: ck.optimizer_name.clone(),
        optimizer_state: ck.optimizer_state.clone(),
        gns: ck.gns.clone(),
        last_loss: ck.last_loss,
    };
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&v1).unwrap();
    let mut file = with_header(&payload);
    file[8..12].copy_from_slice(&1u32.to_le_bytes());
    let old = read_checkpoint(&file).unwrap();
    assert_eq!(old, Checkpoint { batch_schedule: None, ..ck.clone() });
    file[8..12].copy_from_slice(&3u32.to_le_bytes());
    let e = read_checkpoint(&file).unwrap_err();
    assert!(matches!(e, CheckpointError::UnsupportedVersion { found: 3, .. }), "{e}");
}
