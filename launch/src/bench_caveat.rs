//! `tessera bench gns-contrastive`: how Tessera's noise-scale estimate on a contrastive loss
//! compares with one from independent repeated batches, at one parameter point
//! (`tessera_rank::gns::contrastive`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use tessera_rank::gns::contrastive::{CaveatOpts, measure};

#[derive(Args, Debug)]
pub struct CaveatArgs {
    /// The contrastive job.
    #[command(flatten)]
    pub job: crate::JobArgs,
    /// Measure at these parameters (a run's params.f32) instead of the initial ones.
    #[arg(long, value_name = "PARAMS_F32")]
    pub params: Option<PathBuf>,
    /// The global batch B.
    #[arg(long, default_value_t = 256)]
    pub global_batch: usize,
    /// Ranks sharing it (small batch b = B / ranks).
    #[arg(long, default_value_t = 4)]
    pub ranks: usize,
    /// Global batches drawn (as many independent batches of B, ranks times as many of b).
    #[arg(long, default_value_t = 200)]
    pub repeats: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads for the model (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &CaveatArgs) -> Result<ExitCode> {
    let cfg = a.job.load()?;
    let params = match &a.params {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<f32>>(),
            )
        }
        None => None,
    };
    let threads = if a.threads > 0 {
        a.threads
    } else {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    };
    let opts = CaveatOpts {
        global: a.global_batch,
        ranks: a.ranks,
        repeats: a.repeats,
        seed: a.seed,
        threads,
    };
    let r = measure(&cfg, params.as_deref(), &opts).map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "# contrastive noise scale at one parameter point: B = {}, {} ranks of b = {}, {} \
         repeats, loss {:.4}",
        r.global, r.ranks, r.local, r.repeats, r.loss
    );
    println!("{:<46} {:>12} {:>12} {:>10}", "estimate", "tr(Sigma)", "|G|^2", "B_simple");
    let row = |name: &str, s: f64, g: f64, b: f64| {
        println!("{name:<46} {s:>12.4e} {g:>12.4e} {b:>10.1}");
    };
    row(
        "tessera (rank shares of the global loss)",
        r.tessera_trace_sigma,
        r.tessera_grad_sq,
        r.tessera_b_simple,
    );
    let m = &r.tessera_local;
    row("  moments of the rank shares G_r (size b)", m.trace_sigma, m.grad_sq, m.b_simple);
    let m = &r.independent_local;
    row(&format!("independent batches of b = {}", m.batch), m.trace_sigma, m.grad_sq, m.b_simple);
    let m = &r.independent_global;
    row(&format!("independent batches of B = {}", m.batch), m.trace_sigma, m.grad_sq, m.b_simple);
    println!(
        "{:<46} {:>12} {:>12} {:>10.1}",
        "two-batch estimate from independent b and B", "", "", r.independent_two_batch_b_simple
    );
    Ok(ExitCode::SUCCESS)
}
