//! `tessera data`: write synthetic shards, import .npy arrays, describe a shard.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tessera_rank::data::{self, NpyKind, SynthSpec};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write the synthetic latent-variable task (train.shard and eval.shard) to a folder.
    Synth(SynthArgs),
    /// Convert .npy arrays to a shard: paired features (--a, --b) or features + labels.
    Import(ImportArgs),
    /// Rebuild the digits shards (data/digits) from the raw .npy arrays that
    /// scripts/make-digits.py extracts from scikit-learn's bundled copy.
    Digits {
        /// Folder with digits-features.npy and digits-labels.npy.
        #[arg(long, default_value = "data/digits/raw")]
        raw: PathBuf,
        /// Output folder for the four shards.
        #[arg(long, default_value = "data/digits")]
        out: PathBuf,
    },
    /// Describe a shard: kind, rows, dimensions, classes, statistics, provenance.
    Inspect {
        /// The shard file.
        path: PathBuf,
    },
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub n_train: Option<usize>,
    #[arg(long)]
    pub n_eval: Option<usize>,
    #[arg(long)]
    pub latent_dim: Option<usize>,
    #[arg(long)]
    pub dim_a: Option<usize>,
    #[arg(long)]
    pub dim_b: Option<usize>,
    #[arg(long)]
    pub noise: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Args)]
pub struct ImportArgs {
    /// Paired data: the first view (n×d_a float array).
    #[arg(long, requires = "b", conflicts_with_all = ["features", "labels"])]
    pub a: Option<PathBuf>,
    /// Paired data: the second view (n×d_b float array).
    #[arg(long)]
    pub b: Option<PathBuf>,
    /// Labeled data: the features (n×d float array).
    #[arg(long, requires = "labels")]
    pub features: Option<PathBuf>,
    /// Labeled data: integer class labels (n).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Output shard file.
    #[arg(long)]
    pub out: PathBuf,
    /// Free text recorded in the shard (where the data came from, its license).
    #[arg(long, default_value = "")]
    pub provenance: String,
}

pub fn data(cmd: DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Synth(a) => {
            let mut spec = SynthSpec::default();
            if let Some(v) = a.n_train {
                spec.n_train = v;
            }
            if let Some(v) = a.n_eval {
                spec.n_eval = v;
            }
            if let Some(v) = a.latent_dim {
                spec.latent_dim = v;
            }
            if let Some(v) = a.dim_a {
                spec.dim_a = v;
            }
            if let Some(v) = a.dim_b {
                spec.dim_b = v;
            }
            if let Some(v) = a.noise {
                spec.noise = v;
            }
            if let Some(v) = a.seed {
                spec.seed = v;
            }
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            let (train, eval) = data::try_synth(&spec)?;
            let provenance = format!("tessera data synth {spec:?}");
            for (ds, name) in [(&train, "train.shard"), (&eval, "eval.shard")] {
                let path = a.out.join(name);
                let meta = data::ShardMeta { name: name.into(), provenance: provenance.clone() };
                data::write_shard(&path, ds, &meta)?;
                println!("wrote {} ({} rows)", path.display(), ds.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Import(a) => {
            let ds = match (&a.a, &a.b, &a.features, &a.labels) {
                (Some(x), Some(y), None, None) => data::import_npy(x, y, NpyKind::Paired)?,
                (None, None, Some(x), Some(y)) => data::import_npy(x, y, NpyKind::Labeled)?,
                _ => bail!(
                    "give either --a X.npy --b Y.npy (paired views) or --features X.npy \
                     --labels y.npy (classification)"
                ),
            };
            let name =
                a.out.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let meta = data::ShardMeta { name, provenance: a.provenance.clone() };
            data::write_shard(&a.out, &ds, &meta)?;
            println!("wrote {} ({} rows)", a.out.display(), ds.len());
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Digits { raw, out } => {
            for path in data::digits::build_digits(&raw, &out)? {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Inspect { path } => {
            let ds = data::open_shard(&path)?;
            println!("{}", data::describe(&ds));
            Ok(ExitCode::SUCCESS)
        }
    }
}
