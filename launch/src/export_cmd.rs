//! `tessera export`: a checkpoint's parameters as a safetensors file, for Python and other
//! frameworks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use tessera_rank::checkpoint::{self, Checkpoint};

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["checkpoint", "dir"])))]
pub struct ExportArgs {
    /// Write the parameters as a safetensors file here (named F32 tensors; the step, the config
    /// hash and the resolved config in its metadata).
    #[arg(long, value_name = "OUT")]
    pub safetensors: PathBuf,
    /// The checkpoint file to export.
    #[arg(long, value_name = "PATH")]
    pub checkpoint: Option<PathBuf>,
    /// A run's output directory (or checkpoint directory): export its newest valid checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    pub dir: Option<PathBuf>,
}

/// The newest valid checkpoint under `dir` (its `checkpoints/` folder, or `dir` itself).
fn newest_in(dir: &Path) -> Result<(PathBuf, Checkpoint)> {
    if !dir.is_dir() {
        bail!("{} is not a directory; pass a run's output directory to --dir", dir.display());
    }
    let search = checkpoint::checkpoints_in(dir);
    match checkpoint::latest_valid(&search)? {
        Some(found) => {
            for s in &found.skipped {
                eprintln!("tessera export: warning: skipped a damaged checkpoint: {s}");
            }
            Ok((found.path, found.checkpoint))
        }
        None => bail!(
            "no checkpoint (ckpt-*.tsr) in {}; train with checkpoints enabled (the default) or \
             pass --checkpoint FILE",
            search.display()
        ),
    }
}

pub fn export(args: &ExportArgs) -> Result<ExitCode> {
    let (path, ck) = match (&args.checkpoint, &args.dir) {
        (Some(p), _) => (p.clone(), checkpoint::load_checkpoint(p)?),
        (None, Some(d)) => newest_in(d)?,
        (None, None) => bail!("pass --checkpoint FILE or --dir RUN_DIR"),
    };
    let size = checkpoint::write_safetensors(&args.safetensors, &ck)
        .with_context(|| format!("exporting {}", path.display()))?;
    eprintln!(
        "tessera export: {} (step {}) -> {}: {} tensors, {} parameters, {} bytes",
        path.display(),
        ck.step,
        args.safetensors.display(),
        ck.tensors.len(),
        ck.params.len(),
        size
    );
    Ok(ExitCode::SUCCESS)
}
