//! The adaptive global batch (`[gns.adaptive]`) through real rank processes: the batch follows
//! the measured noise scale, every rank agrees on it (every collective checked), the learning
//! rate follows the rule, a stopped and resumed run ends bitwise equal to an uninterrupted one,
//! and `tessera plot` draws the run.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{run, run_command, summary, tessera};
use tessera_rank::checkpoint::{checkpoint_file_name, load_checkpoint};

const LIMIT: Duration = Duration::from_secs(300);

/// A small contrastive job whose noise scale is measured every step and drives the batch.
const ADAPTIVE: &[&str] = &[
    "batch.global=48",
    "data.synth.n_train=4000",
    "data.synth.n_eval=200",
    "model.tower_a.width=64",
    "model.tower_b.width=64",
    "run.eval_every=0",
    "run.log_every=1",
    "optim.schedule=\"constant\"",
    "optim.warmup_steps=0",
    "optim.lr=0.3",
    "gns.reduce_every=1",
    "gns.ema_decay=0.6",
    "gns.adaptive.enabled=true",
    "gns.adaptive.min=24",
    "gns.adaptive.max=1200",
    "gns.adaptive.every=4",
    "gns.adaptive.start_step=3",
    "gns.adaptive.min_change=0.05",
    "gns.adaptive.lr_rule=\"sqrt\"",
];

fn with(base: &[&'static str], more: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(more).copied().collect()
}

fn train(nproc: usize, sets: &[&str], extra: &[&str], out: &Path) -> common::Finished {
    let f = run(run_command(nproc, None, sets, extra, out), LIMIT);
    assert!(f.status.success(), "tessera run --nproc {nproc} {extra:?} failed\n{}", f.all_output());
    f
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(step, batch, lr)` of every loss line.
fn loss_lines(m: &[serde_json::Value]) -> Vec<(u64, u64, f64)> {
    m.iter()
        .filter(|v| v.get("loss").is_some() && v.get("eval").is_none())
        .map(|v| {
            (v["step"].as_u64().unwrap(), v["batch"].as_u64().unwrap(), v["lr"].as_f64().unwrap())
        })
        .collect()
}

/// The `batch_change` objects, in order.
fn changes(m: &[serde_json::Value]) -> Vec<serde_json::Value> {
    m.iter().filter_map(|v| v.get("batch_change").cloned()).collect()
}

#[test]
fn the_batch_follows_the_noise_scale_on_three_ranks_that_agree_on_every_collective() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // run.check_collectives compares every collective's shape across ranks before it runs: a
    // rank that picked another batch would fail the run at once.
    let f = train(3, &with(ADAPTIVE, &["run.steps=24", "run.check_collectives=true"]), &[], &out);
    let s = summary(&f);
    let m = metrics(&out);
    let lines = loss_lines(&m);
    let ch = changes(&m);
    assert!(!ch.is_empty(), "the batch never changed\n{}", f.stderr);
    assert_eq!(s["batch_changes"].as_u64().unwrap(), ch.len() as u64, "{s}");
    assert_eq!(lines.len(), 24);
    // The batch of every step: 48 until the first change, then what each change says.
    let mut expect = 48u64;
    let mut next = ch.iter().peekable();
    let mut last_first = 0u64;
    for &(step, batch, lr) in &lines {
        if let Some(c) = next.peek()
            && c["first_step"].as_u64().unwrap() == step
        {
            assert_eq!(c["from"].as_u64().unwrap(), expect, "{c}");
            expect = c["to"].as_u64().unwrap();
            let first = c["first_step"].as_u64().unwrap();
            assert!(first >= 4, "a change before gns.adaptive.start_step: {c}");
            assert!(last_first == 0 || first >= last_first + 4, "changes closer than `every`");
            last_first = first;
            next.next();
        }
        assert_eq!(batch, expect, "step {step}");
        assert!(batch % 3 == 0 && (24..=1200).contains(&batch), "batch {batch} at step {step}");
        // The square-root rule on a constant schedule: lr = 0.3·√(B/48).
        let want = 0.3 * (batch as f64 / 48.0).sqrt();
        assert!((lr - want).abs() < 1e-6 * want, "step {step}: lr {lr}, expected {want}");
    }
    assert!(next.peek().is_none(), "a change after the last step: {ch:?}");
    // The examples seen are the sum of the per-step batches.
    let total: u64 = lines.iter().map(|l| l.1).sum();
    assert_eq!(s["samples"].as_u64().unwrap(), total, "{s}");
    assert_eq!(s["global_batch"].as_u64().unwrap(), lines.last().unwrap().1);
    assert!(s["b_simple"].as_f64().is_some(), "{s}");

    // `tessera plot` draws the run into a PNG of the asked size with the three curves.
    let png_path = dir.path().join("run.png");
    let p = run(
        {
            let mut c = tessera();
            c.arg("plot").arg(&out).arg("--out").arg(&png_path);
            c.args(["--width", "800", "--height", "600"]);
            c
        },
        LIMIT,
    );
    assert!(p.status.success(), "tessera plot failed\n{}", p.all_output());
    let decoder =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (800, 600));
    let px = &buf[..info.buffer_size()];
    let channels = px.len() / (800 * 600);
    let colored = px
        .chunks_exact(channels)
        .filter(|p| {
            let (mx, mn) = (p[..3].iter().max().unwrap(), p[..3].iter().min().unwrap());
            mx - mn > 60
        })
        .count();
    assert!(colored > 1000, "only {colored} colored pixels: no curves drawn");
    let white = px.chunks_exact(channels).filter(|p| p[..3] == [255, 255, 255]).count();
    assert!(white > 800 * 600 / 2, "the background is not mostly white ({white} pixels)");

    // Bad settings are errors that name the key and the fix.
    let bad = run(
        run_command(
            2,
            None,
            &with(ADAPTIVE, &["run.steps=2", "gns.adaptive.max=99999"]),
            &[],
            &dir.path().join("bad"),
        ),
        LIMIT,
    );
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("gns.adaptive.max = 99999"), "{}", bad.stderr);
    let off = run(
        run_command(
            2,
            None,
            &with(ADAPTIVE, &["run.steps=2", "gns.enabled=false"]),
            &[],
            &dir.path().join("off"),
        ),
        LIMIT,
    );
    assert!(!off.status.success());
    assert!(off.stderr.contains("gns.enabled = true"), "{}", off.stderr);
}

#[test]
fn an_adaptive_run_stopped_and_resumed_ends_bitwise_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, parts) = (dir.path().join("whole"), dir.path().join("parts"));
    // Statistics reduced every 2 steps (pending at some checkpoints), checkpoints every 5.
    let job = with(
        ADAPTIVE,
        &[
            "run.steps=20",
            "gns.reduce_every=2",
            "checkpoint.every=5",
            "batch.global=32",
            "gns.adaptive.min=16",
        ],
    );
    let reference = summary(&train(2, &job, &[], &whole));
    let ref_changes = changes(&metrics(&whole));
    let before = ref_changes.iter().filter(|c| c["first_step"].as_u64().unwrap() <= 10).count();
    assert!(
        before >= 1 && before < ref_changes.len(),
        "need changes before and after step 10: {ref_changes:?}"
    );

    let stopped = summary(&train(2, &with(&job, &["checkpoint.stop_after=10"]), &[], &parts));
    assert_eq!(stopped["steps"], 10, "{stopped}");
    let ck = load_checkpoint(&parts.join("checkpoints").join(checkpoint_file_name(10))).unwrap();
    assert_eq!(
        ck.batch_schedule.as_ref().map(|s| s.len()),
        Some(before),
        "{:?}",
        ck.batch_schedule
    );

    let resumed = summary(&train(2, &job, &["--resume", "auto"], &parts));
    for key in
        ["steps", "params_sha256", "loss", "logit_scale", "b_simple", "global_batch", "samples"]
    {
        assert_eq!(resumed[key], reference[key], "{key}: {resumed} vs {reference}");
    }
    // The metrics file continues where the checkpoint was: the same batches and changes.
    assert_eq!(changes(&metrics(&parts)), ref_changes);
    assert_eq!(loss_lines(&metrics(&parts)), loss_lines(&metrics(&whole)));
}
