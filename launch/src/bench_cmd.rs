//! `tessera bench`: collective benchmarks in nccl-tests terms, and the GEMM benchmark.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tessera_collectives::bench as cbench;
use tessera_collectives::{Communicator, ReduceOp};

use crate::launcher::{JobSpec, launch};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// All-reduce over N local rank processes (TCP ring): size, count, time, algbw, busbw.
    Allreduce(AllreduceArgs),
    /// Contrastive loss (CLIP, SigLIP) forward+backward over N local rank processes: naive
    /// (all-gathered, b×B logits per rank) vs tiled (Inf-CL ring), with time, GFLOP/s and peak
    /// memory.
    Loss(LossArgs),
    /// The noise-scale estimator through real rank processes on problems whose B_simple is
    /// known exactly (mean estimation, isotropic linear regression), parameters frozen.
    Gns(GnsArgs),
    /// The noise scale on a contrastive loss at one parameter point: Tessera's estimate (rank
    /// shares of the global loss's gradient) against independent repeated batches.
    GnsContrastive(crate::bench_caveat::CaveatArgs),
    /// Every collective in N local rank processes, checked against a naive reference.
    CollectivesSelftest {
        /// Rank processes to start on this machine.
        #[arg(long, default_value_t = 2)]
        nproc: usize,
    },
    /// One optimizer step over a flat buffer, against a copy of the same traffic.
    Optim {
        /// Parameters in the buffer.
        #[arg(long, default_value_t = 16 << 20)]
        params: usize,
        /// Optimizers to time.
        #[arg(long, value_delimiter = ',', default_value = "sgd,lars,tvlars-code,lamb")]
        names: Vec<String>,
    },
    /// Single-precision GEMM throughput of the CPU device, beside numpy (OpenBLAS) when present.
    Gemm(GemmArgs),
    /// Load on a coordinator process from in-process simulated ranks: join time of
    /// --join-ranks, and coordinator CPU while --heartbeat-ranks heartbeat.
    Coordinator(crate::bench_coord::CoordinatorBenchArgs),
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
pub struct AllreduceArgs {
    /// Rank processes to start on this machine.
    #[arg(long, default_value_t = 2)]
    #[serde(skip)]
    pub nproc: usize,
    /// Sizes in bytes: a range MIN..MAX doubling (e.g. 1K..256M), or a list (64M,128M).
    #[arg(long, default_value = "1K..64M")]
    pub sizes: String,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed warm-up iterations per size.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Check every result element against the exact expected sum.
    #[arg(long)]
    pub check: bool,
    /// One JSON object per size instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
pub struct LossArgs {
    /// Rank processes to start on this machine.
    #[arg(long, default_value_t = 2)]
    #[serde(skip)]
    pub nproc: usize,
    /// The losses, comma-separated: clip (symmetric InfoNCE) and siglip (pairwise sigmoid,
    /// logit bias −10).
    #[arg(long, default_value = "clip", value_delimiter = ',')]
    pub loss: Vec<String>,
    /// Global batch B (rows of image and of text features over all ranks).
    #[arg(long, default_value_t = 16384)]
    pub batch: usize,
    /// Feature dimension d.
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    /// Do not run the naive loss (it needs b×B floats of logits per rank).
    #[arg(long)]
    pub skip_naive: bool,
    /// Rows per tile of the tiled loss (0: the library default).
    #[arg(long, default_value_t = 0)]
    pub tile_rows: usize,
    /// Columns per tile of the tiled loss (0: the library default).
    #[arg(long, default_value_t = 0)]
    pub tile_cols: usize,
    /// Rows of a feature block that travel the ring together (0: about 2 MiB of features).
    #[arg(long, default_value_t = 0)]
    pub chunk_rows: usize,
    /// One JSON object per implementation instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Serialize, Deserialize, Clone, Debug)]
pub struct GnsArgs {
    /// Rank processes to start on this machine.
    #[arg(long, default_value_t = 2)]
    #[serde(skip)]
    pub nproc: usize,
    /// Frozen steps per problem.
    #[arg(long, default_value_t = 6000)]
    pub steps: u64,
    /// Examples per step over all ranks (split as evenly as possible).
    #[arg(long, default_value_t = 128)]
    pub global_batch: usize,
    /// Micro-batches per rank and step (0: 4 on one rank, else 1).
    #[arg(long, default_value_t = 0)]
    pub micro: usize,
    /// EMA decay of the two estimates.
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    /// One JSON object per problem instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GemmArgs {
    /// Square sizes n (C = A·B with n×n matrices).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub sizes: Vec<usize>,
    /// Threads for the GEMM (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Repetitions per size (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Skip the numpy comparison.
    #[arg(long)]
    pub no_peer: bool,
}

/// The rank processes' arguments for benchmark job `job`, its options passed as JSON.
fn benchmark_job(job: &str, args: &impl Serialize) -> Result<JobSpec> {
    Ok(JobSpec {
        rank_args: vec![
            "--job".into(),
            job.into(),
            "--job-args".into(),
            serde_json::to_string(args)?,
        ],
        total_steps: None,
        label: job.trim_start_matches("bench-").into(),
        max_restarts: 0,
        restart_args: Vec::new(),
        restart_note: String::new(),
        restart_when: None,
    })
}

pub fn bench(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Allreduce(a) => {
            // Validate sizes here so a typo fails before any process starts.
            cbench::parse_sizes(&a.sizes).map_err(|e| anyhow::anyhow!("--sizes: {e}"))?;
            launch(a.nproc, &benchmark_job("bench-allreduce", &a)?, 30.0)
        }
        BenchCommand::Loss(a) => {
            // Named here, before any rank starts.
            parse_losses(&a.loss)?;
            if a.batch < a.nproc || a.dim == 0 {
                bail!(
                    "--batch {} and --dim {}: the batch must be at least the number of ranks \
                     (--nproc {}) and --dim at least 1",
                    a.batch,
                    a.dim,
                    a.nproc
                );
            }
            if !a.skip_naive {
                check_naive_fits(a.batch, a.dim, a.nproc, mem_available_bytes())?;
            }
            launch(a.nproc, &benchmark_job("bench-loss", &a)?, 30.0)
        }
        BenchCommand::Gns(a) => {
            if a.global_batch < a.nproc || a.steps == 0 {
                bail!(
                    "--global-batch {} and --steps {}: the batch must be at least the number of \
                     ranks (--nproc {}) and --steps at least 1",
                    a.global_batch,
                    a.steps,
                    a.nproc
                );
            }
            launch(a.nproc, &benchmark_job("bench-gns", &a)?, 30.0)
        }
        BenchCommand::GnsContrastive(a) => crate::bench_caveat::run(&a),
        BenchCommand::CollectivesSelftest { nproc } => {
            launch(nproc, &benchmark_job("collectives-selftest", &())?, 30.0)
        }
        BenchCommand::Gemm(g) => gemm(&g),
        BenchCommand::Coordinator(c) => crate::bench_coord::bench_coordinator(&c),
        BenchCommand::Optim { params, names } => {
            println!(
                "# optimizer step over {params} f32 parameters (one thread); bound: a copy of \
                 the same bytes; step and copy timed in turn, fastest of `runs` each"
            );
            println!(
                "{:>12} {:>10} {:>12} {:>10} {:>12} {:>8} {:>6}",
                "optimizer", "ms/step", "bytes/step", "GB/s", "copy GB/s", "ratio", "runs"
            );
            for name in &names {
                let r = tessera_rank::optim::bench_step(params, name)
                    .map_err(|e| anyhow::anyhow!("--names {name}: {e}"))?;
                println!(
                    "{:>12} {:>10.2} {:>12} {:>10.2} {:>12.2} {:>8.2} {:>6}",
                    r.name,
                    r.seconds_per_step * 1e3,
                    r.bytes_moved,
                    r.gbps,
                    r.memcpy_gbps,
                    r.gbps / r.memcpy_gbps,
                    r.runs
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The part of `bench allreduce` that runs inside each rank; returns rank 0's report.
pub fn allreduce_rank(comm: &mut dyn Communicator, job_args: &str) -> Result<String> {
    let a: AllreduceArgs =
        serde_json::from_str(job_args).context("decoding benchmark arguments")?;
    let sizes = cbench::parse_sizes(&a.sizes).map_err(|e| anyhow::anyhow!("--sizes: {e}"))?;
    let rows = cbench::bench_all_reduce(comm, &sizes, a.iters, a.warmup, a.check)?;
    if a.check && rows.iter().any(|r| r.check == Some(false)) {
        bail!("all-reduce results were wrong (see the check column)");
    }
    let world = comm.world();
    if a.json {
        let mut out = String::new();
        for r in &rows {
            out += &serde_json::to_string(&serde_json::json!({
                "op": "all_reduce",
                "ranks": world,
                "size_bytes": r.size_bytes,
                "count": r.count,
                "time_us": r.time_us,
                "algbw": r.algbw_gbs,
                "busbw": r.busbw_gbs,
                "check": r.check,
            }))?;
            out.push('\n');
        }
        Ok(out)
    } else {
        Ok(format!(
            "# tessera all_reduce (f32, sum), TCP ring, {world} ranks, {} timed iterations per \
             size\n{}",
            a.iters,
            cbench::format_table(&rows)
        ))
    }
}

/// This process's peak resident set size (VmHWM), in bytes.
fn peak_rss_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb * 1024.0)
}

/// The part of `bench loss` that runs inside each rank; returns rank 0's report. The tiled
/// losses run first: peak RSS only grows, so each figure is the peak up to that point.
pub fn loss_rank(comm: &mut dyn Communicator, local_size: usize, job_args: &str) -> Result<String> {
    use tessera_rank::loss::{LossImpl, RingLossOpts, bench_loss};
    let a: LossArgs = serde_json::from_str(job_args).context("decoding benchmark arguments")?;
    let losses = parse_losses(&a.loss)?;
    if a.batch < comm.world() || a.dim == 0 {
        bail!("--batch must be at least the number of ranks and --dim at least 1");
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let dflt = RingLossOpts::default();
    let opts = RingLossOpts {
        threads: (cores / local_size.max(1)).max(1),
        tile_rows: if a.tile_rows == 0 { dflt.tile_rows } else { a.tile_rows },
        tile_cols: if a.tile_cols == 0 { dflt.tile_cols } else { a.tile_cols },
        chunk_rows: a.chunk_rows,
    };
    let mut impls = vec![LossImpl::Tiled];
    if !a.skip_naive {
        impls.push(LossImpl::Naive);
    }
    let mut out = String::new();
    if !a.json {
        out += &format!(
            "# contrastive loss forward+backward, B = {}, d = {}, {} ranks, {} thread(s) each, \
             tiles {}×{}, chunks of {} rows; GFLOP/s counts B×B×d GEMM-equivalents, 4 for clip, \
             3 for siglip, whichever the implementation; tiled/naive: the tiled loss's time over \
             the naive one's, same run\n\
             #{:>6} {:>8} {:>10} {:>9} {:>16} {:>12} {:>12}\n",
            a.batch,
            a.dim,
            comm.world(),
            opts.threads,
            opts.tile_rows,
            opts.tile_cols,
            opts.chunk_rows_for(a.dim),
            "loss",
            "impl",
            "time (s)",
            "GFLOP/s",
            "peak RSS (all)",
            "value",
            "tiled/naive"
        );
    }
    // Every tiled run before any naive one (see above); the tiled times, by loss, for the ratio.
    let mut tiled_s = std::collections::HashMap::new();
    for (imp, loss) in impls.iter().flat_map(|&i| losses.iter().map(move |&l| (i, l))) {
        let r = bench_loss(comm, a.batch, a.dim, loss, imp, &opts)?;
        // The peer's ratio: on the naive row, the tiled loss's time over this one.
        let ratio = match imp {
            LossImpl::Tiled => {
                tiled_s.insert(loss.name(), r.seconds);
                None
            }
            LossImpl::Naive => tiled_s.get(loss.name()).map(|t| t / r.seconds.max(1e-12)),
        };
        let mut rss = [peak_rss_bytes()];
        comm.all_reduce_f64(&mut rss, ReduceOp::Sum)?;
        if a.json {
            out += &serde_json::to_string(&serde_json::json!({
                "loss_name": loss.name(),
                "impl": imp.name(),
                "ranks": comm.world(),
                "batch": a.batch,
                "dim": a.dim,
                "time_s": r.seconds,
                "gflops": r.gflops,
                "peak_rss_total_bytes": rss[0],
                "loss_workspace_bytes_max": r.workspace_bytes,
                "chunk_rows": opts.chunk_rows_for(a.dim),
                "loss": r.loss,
                "tiled_time_over_naive": ratio,
            }))?;
            out.push('\n');
        } else {
            out += &format!(
                " {:>6} {:>8} {:>10.3} {:>9.1} {:>13.1} MB {:>12.6} {:>12}\n",
                loss.name(),
                imp.name(),
                r.seconds,
                r.gflops,
                rss[0] / 1e6,
                r.loss,
                ratio.map_or("-".to_string(), |v| format!("{v:.2}"))
            );
        }
    }
    Ok(out)
}

/// Bytes the naive loss holds over `nproc` ranks on one machine at global batch `batch` and
/// dimension `d`: per rank the all-gathered image and text features (2·B·d), one block of
/// `b × B` logits at a time (`b` the largest rank's rows) and its two gradient blocks (2·b·d),
/// in f32.
fn naive_loss_bytes(batch: usize, d: usize, nproc: usize) -> f64 {
    let (big, d) = (batch as f64, d as f64);
    let b = batch.div_ceil(nproc.max(1)) as f64;
    4.0 * nproc as f64 * (2.0 * big * d + b * big + 2.0 * b * d)
}

/// `bench loss` refuses, before any rank starts, a naive loss that would not fit in
/// `available` bytes (`None`: unknown, no check), rather than let the kernel's OOM killer end a
/// rank.
fn check_naive_fits(batch: usize, d: usize, nproc: usize, available: Option<f64>) -> Result<()> {
    let need = naive_loss_bytes(batch, d, nproc);
    match available {
        Some(avail) if need > 0.9 * avail => {
            let gib = |v: f64| v / (1u64 << 30) as f64;
            bail!(
                "--batch {batch}: the naive loss would hold about {:.1} GiB over the {nproc} \
                 ranks (each rank's b × B logits and the all-gathered features), more than the \
                 {:.1} GiB this machine has available; pass --skip-naive to time the tiled loss \
                 alone, or a smaller --batch",
                gib(need),
                gib(avail)
            )
        }
        _ => Ok(()),
    }
}

/// `MemAvailable` of /proc/meminfo in bytes, where the system says.
fn mem_available_bytes() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|kb| kb * 1024.0)
}

/// The `--loss` list of `bench loss` (and of `cuda bench-loss`).
pub fn parse_losses(list: &[String]) -> Result<Vec<tessera_rank::loss::BenchedLoss>> {
    list.iter()
        .map(|l| {
            tessera_rank::loss::BenchedLoss::parse(l.trim()).with_context(|| {
                format!("--loss {l:?}: expected a comma-separated list of clip, siglip")
            })
        })
        .collect()
}

/// The part of `bench gns` that runs inside each rank; returns rank 0's report.
pub fn gns_rank(comm: &mut dyn Communicator, job_args: &str) -> Result<String> {
    use tessera_rank::gns::GnsConfig;
    use tessera_rank::gns::problems::{FrozenProblem, FrozenRun, MeanEstimation, Regression};
    let a: GnsArgs = serde_json::from_str(job_args).context("decoding benchmark arguments")?;
    let world = comm.world();
    if a.global_batch < world || a.steps == 0 {
        bail!("--global-batch must be at least the number of ranks and --steps at least 1");
    }
    let micro = match a.micro {
        0 if world == 1 => 4,
        0 => 1,
        m => m,
    };
    let (_, local_batch) = tessera_rank::data::local_rows(a.global_batch, world, comm.rank());
    let cfg = GnsConfig { ema_decay: a.ema_decay, ..GnsConfig::default() };
    cfg.validate()?;
    let problems: [(&str, Box<dyn FrozenProblem>); 2] = [
        (
            "mean-estimation d=100 sigma=1 |theta-mu|=1",
            Box::new(MeanEstimation { d: 100, sigma: 1.0, dist: 1.0 }),
        ),
        ("linear-regression d=30 sigma=0.5 |e|=1", Box::new(Regression::isotropic(30, 0.5, 1.0))),
    ];
    let mut out = String::new();
    if !a.json {
        out += &format!(
            "# gradient noise scale, parameters frozen: {world} ranks x {micro} micro-batches, \
             global batch {}, {} steps, EMA decay {}\n#{:>44} {:>10} {:>10} {:>9}\n",
            a.global_batch, a.steps, a.ema_decay, "problem", "true", "estimate", "error"
        );
    }
    for (k, (name, problem)) in problems.iter().enumerate() {
        let run = FrozenRun {
            steps: a.steps,
            local_batch,
            micro_batches: micro,
            global_batch: a.global_batch,
            seed: 1000 + k as u64,
        };
        let groups = [(0, problem.dim())];
        let reports =
            tessera_rank::gns::problems::run_frozen(&**problem, comm, &groups, &cfg, &run)?;
        let truth = problem.true_b_simple();
        let estimate = reports.last().and_then(|r| r.b_simple);
        let error = estimate.map(|e| e / truth - 1.0);
        if a.json {
            out += &serde_json::to_string(&serde_json::json!({
                "problem": name,
                "ranks": world,
                "micro_batches": micro,
                "global_batch": a.global_batch,
                "steps": a.steps,
                "true_b_simple": truth,
                "estimate": estimate,
                "relative_error": error,
            }))?;
            out.push('\n');
        } else {
            let fmt = |v: Option<f64>, pct: bool| match v {
                Some(x) if pct => format!("{:+.2}%", 100.0 * x),
                Some(x) => format!("{x:.2}"),
                None => "n/a".into(),
            };
            out += &format!(
                " {name:>44} {truth:>10.2} {:>10} {:>9}\n",
                fmt(estimate, false),
                fmt(error, true)
            );
        }
    }
    Ok(out)
}

fn gemm(g: &GemmArgs) -> Result<ExitCode> {
    let threads = if g.threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        g.threads
    };
    let peer = if g.no_peer { None } else { numpy_gflops(&g.sizes, g.reps) };
    println!("# sgemm C = A·B, n×n f32, {threads} thread(s); GFLOP/s = 2n³/t, best of {}", g.reps);
    println!("{:>6} {:>12} {:>14} {:>8}", "n", "tessera", "numpy(BLAS)", "ratio");
    for (i, &n) in g.sizes.iter().enumerate() {
        let ours = tessera_rank::device::sgemm_gflops(n, threads, g.reps);
        match peer.as_ref().and_then(|p| p.get(i)) {
            Some(&theirs) => {
                println!("{n:>6} {ours:>12.1} {theirs:>14.1} {:>8.2}", ours / theirs)
            }
            None => println!("{n:>6} {ours:>12.1} {:>14} {:>8}", "-", "-"),
        }
    }
    if peer.is_none() && !g.no_peer {
        eprintln!("(no peer figure: python3 with numpy was not found; pip install numpy)");
    }
    Ok(ExitCode::SUCCESS)
}

/// numpy's float32 matmul GFLOP/s at the same sizes, measured now, if python3 and numpy exist.
fn numpy_gflops(sizes: &[usize], reps: usize) -> Option<Vec<f64>> {
    let script = format!(
        "import numpy as np, time\n\
         for n in {sizes:?}:\n\
         \x20   a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)\n\
         \x20   a @ b\n\
         \x20   best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range({reps}))\n\
         \x20   print(2 * n**3 / best / 1e9)\n"
    );
    let out = std::process::Command::new("python3").arg("-c").arg(script).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let vals: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    (vals.len() == sizes.len()).then_some(vals)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive loss's bytes by hand at the recorded size (B = 16384, d = 256, 2 ranks:
    /// 1.17 GB, beside the 1.3 GB peak RSS measured with the processes themselves), and the
    /// check's three outcomes.
    #[test]
    fn the_naive_loss_is_refused_only_where_it_cannot_fit() {
        let want = 4.0 * 2.0 * (2.0 * 16384.0 * 256.0 + 8192.0 * 16384.0 + 2.0 * 8192.0 * 256.0);
        assert_eq!(naive_loss_bytes(16384, 256, 2), want);
        assert_eq!(want, 1_174_405_120.0);
        // Uneven splits count the largest rank's rows.
        assert_eq!(naive_loss_bytes(5, 1, 2), 4.0 * 2.0 * (2.0 * 5.0 + 3.0 * 5.0 + 2.0 * 3.0));
        assert!(check_naive_fits(16384, 256, 2, Some(24e9)).is_ok());
        assert!(check_naive_fits(16384, 256, 2, None).is_ok(), "unknown memory: no check");
        let e = check_naive_fits(16384, 256, 2, Some(1e9)).unwrap_err().to_string();
        assert!(e.contains("--batch 16384") && e.contains("--skip-naive"), "{e}");
        assert!(e.contains("1.1 GiB") && e.contains("0.9 GiB"), "{e}");
    }
}
