//! `tessera`: the command line of the Tessera data-parallel trainer.

mod bench_caveat;
mod bench_cmd;
mod bench_coord;
mod cuda_cmd;
mod data_cmd;
mod envdetect;
mod export_cmd;
mod hostlist;
mod launcher;
mod model_cmd;
mod plot_cmd;
mod rank_main;
mod selftest;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tessera",
    version = env!("TESSERA_VERSION"),
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
    /// Write a checkpoint's parameters in another format (safetensors).
    Export(export_cmd::ExportArgs),
    /// The model a config builds: every tensor's name, shape and size, and a dry run of its
    /// model.init_from (pretrained weights).
    Model(model_cmd::ModelArgs),
    /// CUDA: library discovery, NVRTC kernel check, GPU self-test and loss timing.
    #[command(subcommand)]
    Cuda(cuda_cmd::CudaCommand),
    /// Draw a run's loss, noise scale B_simple and batch size against examples seen (PNG).
    Plot(plot_cmd::PlotArgs),
}

/// The job's config: a TOML file and `--set` overrides (every command that reads a job's
/// config takes these two).
#[derive(Args, Clone, Debug, Default)]
pub struct JobArgs {
    /// TOML config file (default: the embedded default job).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. --set optim.lr=0.1 --set run.steps=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl JobArgs {
    /// The config file (or the embedded default) with the overrides applied, checked.
    pub fn load(&self) -> Result<tessera_rank::config::Config, tessera_rank::config::ConfigError> {
        tessera_rank::config::Config::load(self.config.as_deref(), &self.overrides)
    }

    /// The same arguments again, for a child process (`--config F --set K=V ...`).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = &self.config {
            out.push("--config".into());
            out.push(c.display().to_string());
        }
        for o in &self.overrides {
            out.push("--set".into());
            out.push(o.clone());
        }
        out
    }
}

/// How to train: the config and its overrides (shared by `run` and `rank`).
#[derive(Args, Clone, Debug, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Continue from a checkpoint: `auto` (the newest valid one in the run's checkpoint
    /// directory; a fresh start when there is none), a ckpt-*.tsr file, or a run directory.
    /// Shorthand for --set checkpoint.resume=...
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
}

impl TrainArgs {
    /// Turns `--resume` into the `checkpoint.resume` override it stands for.
    fn with_resume(mut self) -> TrainArgs {
        if let Some(spec) = self.resume.take() {
            let quoted: String = spec
                .chars()
                .flat_map(|c| match c {
                    '"' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            self.job.overrides.push(format!("checkpoint.resume=\"{quoted}\""));
        }
        self
    }
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
    /// Restart a failed job up to this many times, each time from its newest checkpoint and
    /// as a new generation (ranks of an earlier attempt are refused).
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
}

#[derive(Args)]
pub struct RankArgs {
    /// Join the coordinator running at HOST:PORT (`tessera coordinator`). Without it the
    /// address comes from the environment (TESSERA_COORDINATOR, MASTER_ADDR/MASTER_PORT or
    /// Slurm's node list), and under srun/mpirun rank 0 hosts the coordinator there.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Seconds to keep retrying to reach the coordinator before giving up.
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,
    /// Seconds without a heartbeat before a rank is declared dead (when rank 0 hosts the
    /// coordinator).
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat_timeout: f64,
    /// Send this node's heartbeats through one relay, its local rank 0, which forwards them
    /// to the coordinator as one message per interval (false: every rank heartbeats the
    /// coordinator itself).
    #[arg(long, env = "TESSERA_HEARTBEAT_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub heartbeat_relay: bool,
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
    /// Restart generation of the job: ranks started for another one (TESSERA_GENERATION) are
    /// refused.
    #[arg(long, default_value_t = 1)]
    generation: u64,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Model(_) | Command::Data(_) | Command::Export(_) | Command::Plot(_)
    ) {
        // These commands only read files and print: like other Unix tools, they end quietly
        // when their reader goes away (`tessera model | head`) instead of panicking on EPIPE.
        // The others keep Rust's ignored SIGPIPE: they supervise processes and sockets, and a
        // closed pipe or socket is an error they report.
        // SAFETY: signal(2) before any thread of ours exists, restoring the default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Run(a) => {
            let train = a.train.with_resume();
            launcher::run_training(a.nproc, &train, a.heartbeat_timeout, a.max_restarts)
        }
        Command::Rank(mut a) => {
            a.train = a.train.with_resume();
            rank_main::rank_main(&a)
        }
        Command::Coordinator(a) => launcher::standalone_coordinator(
            &a.bind,
            a.world,
            a.heartbeat_timeout,
            a.join_timeout,
            a.generation,
        ),
        Command::Bench(b) => bench_cmd::bench(b),
        Command::Data(d) => data_cmd::data(d),
        Command::Export(e) => export_cmd::export(&e),
        Command::Model(m) => model_cmd::model(&m),
        Command::Cuda(c) => cuda_cmd::cuda(c),
        Command::Plot(p) => plot_cmd::plot(&p),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: error: {}", launcher::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
