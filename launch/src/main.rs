//! `tessera`: the command line of the Tessera data-parallel trainer.

mod bench_cmd;
mod data_cmd;
mod launcher;
mod rank_main;
mod selftest;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Data-parallel trainer for large-batch contrastive learning",
    long_about = "Data-parallel trainer for large-batch contrastive learning.\n\n\
                  `tessera run --nproc 4` trains the embedded default job on 4 local rank \
                  processes; `tessera rank` is one rank of a job started by srun, mpirun or \
                  another launcher."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a coordinator and N rank processes on this machine, and train.
    Run(RunArgs),
    /// Run one rank of a job: join the coordinator, train (or benchmark), report.
    Rank(RankArgs),
    /// Run a standalone coordinator for a job of --world ranks.
    Coordinator(CoordinatorArgs),
    /// Benchmarks: collectives (nccl-tests vocabulary) and kernels.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// Make, import and inspect data shards.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
}

/// How to train: the config and its overrides (shared by `run` and `rank`).
#[derive(Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// TOML config file (default: the embedded default job).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set optim.lr=0.1 --set run.steps=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    /// Number of rank processes to start on this machine.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    #[command(flatten)]
    train: TrainArgs,
    /// Seconds without a heartbeat before a rank is declared dead.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout: f64,
}

#[derive(Args)]
pub struct RankArgs {
    /// Coordinator address host:port (default: $TESSERA_COORDINATOR).
    #[arg(long, env = "TESSERA_COORDINATOR")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub train: TrainArgs,
    /// Internal: the job a launcher asked for (train, or a benchmark).
    #[arg(long, hide = true, default_value = "train")]
    pub job: String,
    /// Internal: job arguments for benchmark jobs, as JSON.
    #[arg(long, hide = true)]
    pub job_args: Option<String>,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address to listen on, e.g. 0.0.0.0:29400.
    #[arg(long)]
    bind: String,
    /// Number of ranks in the job.
    #[arg(long)]
    world: usize,
    /// Seconds without a heartbeat before a rank is declared dead.
    #[arg(long, default_value_t = 10.0)]
    heartbeat_timeout: f64,
    /// Seconds to wait for all ranks to join.
    #[arg(long, default_value_t = 300.0)]
    join_timeout: f64,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => launcher::run_training(a.nproc, &a.train, a.heartbeat_timeout),
        Command::Rank(a) => rank_main::rank_main(&a),
        Command::Coordinator(a) => {
            launcher::standalone_coordinator(&a.bind, a.world, a.heartbeat_timeout, a.join_timeout)
        }
        Command::Bench(b) => bench_cmd::bench(b),
        Command::Data(d) => data_cmd::data(d),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
