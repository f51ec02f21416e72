//! `tessera cuda ...`: library discovery, the NVRTC kernel check (CI), the GPU self-test and
//! the fused-loss timing. See docs/GPU.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tessera_rank::device::cuda::gpu::{Gpu, LossMode, Precision};
use tessera_rank::device::cuda::libs::{self, Lib};
use tessera_rank::device::cuda::{kcache, nccl, nvrtc, selftest};
use tessera_rank::loss::BenchedLoss;

/// Set in the environment of the re-executed process (so it re-executes at most once).
const REEXEC_ENV: &str = "TESSERA_CUDA_REEXEC";

#[derive(Subcommand)]
pub enum CudaCommand {
    /// Print which CUDA libraries load, where they were looked for and what was found.
    Probe,
    /// Compile every .cu kernel with NVRTC (no GPU needed); any error or warning fails.
    CheckKernels(CheckArgs),
    /// Compile every .cu kernel into the kernel cache (no GPU needed), so that ranks that
    /// start later load them instead of compiling: e.g. once per node before a job.
    WarmCache(WarmCacheArgs),
    /// On a GPU: every kernel vs the CPU device and an f64 reference, cuBLAS, every method of
    /// the CUDA Device vs the CPU device, the fused loss, NCCL at world size 1. Exits non-zero
    /// on any failure.
    Selftest(SelftestArgs),
    /// On a GPU: time the fused CLIP loss (forward + backward).
    BenchLoss(BenchLossArgs),
    /// On GPUs 0..world: all-reduce bus bandwidth through raw NCCL and through Tessera's
    /// NcclComm in the same run (one thread per GPU; runs at world size 1 too).
    NcclBench(NcclBenchArgs),
}

#[derive(Args)]
pub struct NcclBenchArgs {
    /// Message sizes in bytes, comma-separated; K, M, G suffixes are powers of 1024.
    #[arg(long, default_value = "1M,16M,128M", value_delimiter = ',')]
    pub bytes: Vec<String>,
    /// Ranks (GPUs 0..world); 0 means every visible GPU.
    #[arg(long, default_value_t = 0)]
    pub world: usize,
    /// Timed all-reduces per size and path.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed all-reduces before each timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Watchdog timeout of each collective and of the communicator's set-up, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Also write the rows as JSON lines to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `--define`: the kernel knobs (rank/src/device/cuda/nvrtc.rs, `KNOBS`).
#[derive(Args)]
pub struct KnobArgs {
    /// Kernel tuning knob, NAME=VALUE (repeat, or comma-separate, for several); the others keep
    /// their defaults, which training uses. Knobs: CLIP_FWD_MIN_BLOCKS (1..=8, default 4) and
    /// CLIP_BWD_MIN_BLOCKS (1..=4, default 2), the blocks per multiprocessor in the fused loss
    /// kernels' launch bounds; CLIP_BWD_PANEL (1..=4, default 1), column tiles per G panel of
    /// the bf16 backward (docs/GPU.md, "Kernel knobs").
    #[arg(long = "define", value_name = "NAME=VALUE")]
    pub define: Vec<String>,
}

#[derive(Args)]
pub struct CheckArgs {
    /// Architectures, comma-separated.
    #[arg(long, default_value = "sm_80,sm_90", value_delimiter = ',')]
    pub arch: Vec<String>,
    /// Also print ptxas's registers / shared memory / spills per kernel.
    #[arg(long)]
    pub resource_usage: bool,
    /// Also write each source's cubin, as DIR/<source>.<arch>.cubin, for reading the machine
    /// code (`cuobjdump -sass`, `nvdisasm`: PyPI wheels nvidia-cuda-cuobjdump,
    /// nvidia-cuda-nvdisasm; no GPU needed).
    #[arg(long, value_name = "DIR")]
    pub save_cubins: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

#[derive(Args)]
pub struct WarmCacheArgs {
    /// Architectures of the GPUs that will load them, comma-separated (an H100 or H200 is
    /// sm_90, an A100 sm_80).
    #[arg(long, default_value = "sm_90", value_delimiter = ',')]
    pub arch: Vec<String>,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

#[derive(Args)]
pub struct SelftestArgs {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0x7e55e7a)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

#[derive(Args)]
pub struct BenchLossArgs {
    /// The losses, comma-separated: clip (the fused CLIP loss, forward and backward) and
    /// siglip (SigLIP's one pass, `siglip_bwd*` over the batch as one block).
    #[arg(long, default_value = "clip", value_delimiter = ',')]
    pub loss: Vec<String>,
    /// Global batch B (comma-separated for several).
    #[arg(long, default_value = "16384", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Feature dimension d (comma-separated for several).
    #[arg(long, default_value = "512", value_delimiter = ',')]
    pub dim: Vec<usize>,
    /// det, fast or both.
    #[arg(long, default_value = "both")]
    pub mode: String,
    /// Logit-tile arithmetic, comma-separated: fp32, tf32x3, tf32, bf16 (bf16: the features
    /// are converted to bf16 on the GPU; inputs and outputs stay fp32).
    #[arg(long, default_value = "fp32,tf32x3,tf32,bf16", value_delimiter = ',')]
    pub precision: Vec<String>,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Column splits of the backward's grid: `auto` (as training plans them: enough to fill
    /// one wave of blocks when the row tiles alone do not) or a number (1: no splits), for
    /// timing the choice.
    #[arg(long, default_value = "auto")]
    pub bwd_splits: String,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Also write the rows as JSON lines to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

/// `--bwd-splits`: `auto` (None) or a positive number.
fn parse_bwd_splits(s: &str) -> Result<Option<usize>> {
    match s.trim() {
        "auto" => Ok(None),
        n => match n.parse::<usize>() {
            Ok(v) if v >= 1 => Ok(Some(v)),
            _ => bail!("--bwd-splits {s:?}: expected auto or a number of splits (1 or more)"),
        },
    }
}

pub fn cuda(cmd: CudaCommand) -> Result<ExitCode> {
    match cmd {
        CudaCommand::Probe => probe(),
        CudaCommand::CheckKernels(a) => {
            defines(&a.knobs.define)?; // bad input is named before any library is looked for
            ensure_loadable(&[Lib::Nvrtc])?;
            check_kernels(&a)
        }
        CudaCommand::WarmCache(a) => {
            defines(&a.knobs.define)?;
            ensure_loadable(&[Lib::Nvrtc])?;
            warm_cache(&a)
        }
        CudaCommand::Selftest(a) => {
            defines(&a.knobs.define)?; // bad input is named before any library is looked for
            ensure_loadable(&Lib::ALL)?;
            run_selftest(&a)
        }
        CudaCommand::BenchLoss(a) => {
            defines(&a.knobs.define)?; // bad input is named before any library is looked for
            parse_bwd_splits(&a.bwd_splits)?;
            crate::bench_cmd::parse_losses(&a.loss)?;
            ensure_loadable(&[Lib::Driver, Lib::Nvrtc])?;
            bench_loss(&a)
        }
        CudaCommand::NcclBench(a) => {
            ensure_loadable(&[Lib::Driver, Lib::Nccl])?;
            nccl_bench(&a)
        }
    }
}

fn nccl_bench(a: &NcclBenchArgs) -> Result<ExitCode> {
    let sizes = a
        .bytes
        .iter()
        .map(|b| {
            nccl::parse_bytes(b.trim())
                .with_context(|| format!("--bytes {b:?}: expected e.g. 4096, 64K, 16M or 1G"))
        })
        .collect::<Result<Vec<_>>>()?;
    if a.iters == 0 || a.timeout_s == 0 {
        bail!("--iters and --timeout-s must be positive");
    }
    let t = std::time::Duration::from_secs(a.timeout_s);
    let opts = nccl::NcclOpts { timeout: t, init_timeout: t, ..nccl::NcclOpts::default() };
    let rows = nccl::bench_local(a.world, &sizes, a.iters, a.warmup, opts)
        .context("cuda nccl-bench failed")?;
    let world = rows.first().map_or(a.world, |r| r.world);
    println!("NCCL all-reduce f32 sum, world {world}, {} iters; busbw = algbw * 2(n-1)/n", a.iters);
    print!("{}", nccl::bench_table(&rows));
    if let Some(p) = &a.json {
        let mut out = String::new();
        for r in &rows {
            out += &serde_json::to_string(r)?;
            out.push('\n');
        }
        std::fs::write(p, out).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if rows.iter().all(|r| r.check) {
        println!("cuda nccl-bench: PASS (every result equals the exact sum)");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("cuda nccl-bench: FAIL (a result differs from the exact sum)");
        Ok(ExitCode::FAILURE)
    }
}

/// If some of `need` do not load but can be found, re-executes this binary with their folders
/// (and the NCCL shim folder) in front of LD_LIBRARY_PATH; returns when nothing would change.
fn ensure_loadable(need: &[Lib]) -> Result<()> {
    if std::env::var_os(REEXEC_ENV).is_some() {
        return Ok(());
    }
    let plan = libs::plan_loader_path(need, &libs::default_shim_dir())?;
    if !plan.helps() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot find this executable to re-execute it")?;
    let path = plan.ld_library_path(std::env::var_os("LD_LIBRARY_PATH").as_deref());
    for (lib, found) in &plan.found {
        if let Some(p) = found {
            eprintln!("tessera cuda: {} found at {}", lib.name(), p.display());
        }
    }
    eprintln!("tessera cuda: re-executing with LD_LIBRARY_PATH={}", path.to_string_lossy());
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", &path)
        .env(REEXEC_ENV, "1")
        .exec();
    Err(err).with_context(|| format!("cannot re-execute {}", exe.display()))
}

fn probe() -> Result<ExitCode> {
    println!("{:<12} {:<18} {:<7}", "library", "file", "loads");
    for lib in Lib::ALL {
        println!(
            "{:<12} {:<18} {:<7}",
            lib.name(),
            lib.file(),
            if lib.present() { "yes" } else { "NO" }
        );
    }
    println!("LD_LIBRARY_PATH={}", std::env::var("LD_LIBRARY_PATH").unwrap_or_default());
    let dirs = libs::search_dirs();
    println!("searched folders ({}):", dirs.len());
    for d in &dirs {
        println!("  {}", d.display());
    }
    for lib in Lib::ALL {
        match libs::find_in(&dirs, lib.search_names()) {
            Some(p) => println!("found {:<12} {}", lib.name(), p.display()),
            None => println!("found {:<12} (nothing in the searched folders)", lib.name()),
        }
    }
    if Lib::Nvrtc.present() {
        let (maj, min) = nvrtc::version()?;
        println!("NVRTC version {maj}.{min}");
    }
    match kcache::KernelCache::from_env().dir() {
        Some(d) => println!(
            "kernel cache: {} (from TESSERA_KERNEL_CACHE_DIR, XDG_CACHE_HOME or HOME)",
            d.display()
        ),
        None => println!("kernel cache: off (TESSERA_KERNEL_CACHE_DISABLE, or no HOME)"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--define` items, checked (before any library or GPU is touched).
fn defines(items: &[String]) -> Result<nvrtc::Defines> {
    nvrtc::Defines::parse(items).context("--define")
}

fn check_kernels(a: &CheckArgs) -> Result<ExitCode> {
    let defs = defines(&a.knobs.define)?;
    let archs: Vec<&str> = a.arch.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
    if archs.is_empty() {
        bail!("--arch needs at least one architecture, e.g. sm_90");
    }
    let (maj, min) = nvrtc::version()?;
    println!(
        "NVRTC {maj}.{min}; compiling {} sources for {}; kernel knobs: {defs}",
        nvrtc::SOURCES.len(),
        archs.join(", ")
    );
    let rows = nvrtc::check_all(&archs, &defs)?;
    println!("{:<18} {:<7} {:>11} {:>9}", "source", "arch", "cubin bytes", "ms");
    for r in &rows {
        println!("{:<18} {:<7} {:>11} {:>9.0}", r.source, r.arch, r.cubin.len(), r.millis);
    }
    if a.resource_usage {
        for arch in &archs {
            for src in nvrtc::SOURCES {
                for line in nvrtc::resource_usage(src, arch, &defs)? {
                    println!("{arch} {}: {line}", src.name);
                }
            }
        }
    }
    if let Some(dir) = &a.save_cubins {
        // The cubins just checked, not compiled again.
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for r in &rows {
            let stem = r.source.trim_end_matches(".cu");
            let path = dir.join(format!("{stem}.{}.cubin", r.arch));
            std::fs::write(&path, &r.cubin)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {} ({} bytes)", path.display(), r.cubin.len());
        }
    }
    let kernels: usize = nvrtc::SOURCES.iter().map(|s| s.kernels.len()).sum();
    println!(
        "check-kernels: OK ({kernels} kernels in {} sources, no errors or warnings)",
        nvrtc::SOURCES.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn warm_cache(a: &WarmCacheArgs) -> Result<ExitCode> {
    let defs = defines(&a.knobs.define)?;
    let cache = kcache::KernelCache::from_env();
    let Some(dir) = cache.dir() else {
        bail!(
            "the kernel cache is off (TESSERA_KERNEL_CACHE_DISABLE is set, or HOME is not): unset \
             it, or set TESSERA_KERNEL_CACHE_DIR"
        );
    };
    let (maj, min) = nvrtc::version()?;
    println!("kernel cache: {}; NVRTC {maj}.{min}; kernel knobs: {defs}", dir.display());
    println!("{:<18} {:<7} {:<9} {:>10}", "source", "arch", "origin", "ms");
    for arch in a.arch.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        for src in nvrtc::SOURCES {
            let t = std::time::Instant::now();
            let (_, origin) = cache.compile(src, arch, &defs)?;
            let origin = match origin {
                kcache::Origin::Hit => "cached",
                kcache::Origin::Stored => "compiled",
                kcache::Origin::Compiled => bail!(
                    "cannot write {} to the kernel cache {}: check that it is writable",
                    src.name,
                    dir.display()
                ),
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            println!("{:<18} {arch:<7} {origin:<9} {ms:>10.1}", src.name);
        }
    }
    println!("warm-cache: OK");
    Ok(ExitCode::SUCCESS)
}

fn run_selftest(a: &SelftestArgs) -> Result<ExitCode> {
    for r in selftest::probe_rows() {
        println!("{:<12} {}", r.name, r.detail);
    }
    let defs = defines(&a.knobs.define)?;
    let rep = selftest::run(a.device, a.seed, &defs).context("cuda selftest cannot start")?;
    println!("device: {} ({})", rep.device, rep.arch);
    print!("{}", rep.table());
    if let Some(p) = &a.json {
        let s = serde_json::to_string_pretty(&rep)?;
        std::fs::write(p, s).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if rep.passed() {
        println!("cuda selftest: PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("cuda selftest: FAIL");
        Ok(ExitCode::FAILURE)
    }
}

fn bench_loss(a: &BenchLossArgs) -> Result<ExitCode> {
    let modes: Vec<LossMode> = match a.mode.as_str() {
        "det" | "deterministic" => vec![LossMode::Deterministic],
        "fast" => vec![LossMode::Fast],
        "both" => vec![LossMode::Deterministic, LossMode::Fast],
        m => bail!("--mode {m:?}: expected det, fast or both"),
    };
    let precisions = parse_precisions(&a.precision)?;
    let losses = crate::bench_cmd::parse_losses(&a.loss)?;
    if a.batch.contains(&0) || a.dim.contains(&0) {
        bail!("--batch and --dim must be positive");
    }
    let defs = defines(&a.knobs.define)?;
    let splits = parse_bwd_splits(&a.bwd_splits)?;
    let gpu = Gpu::open_with(a.device, &defs).context("cuda bench-loss cannot start")?;
    println!(
        "device: {} ({}), fused CLIP loss fwd+bwd (siglip: SigLIP's one pass), fp32 in and out, \
         prec = logit tiles, median of {} runs; kernel knobs: {defs}; backward column splits: \
         {} (siglip: auto)",
        gpu.name, gpu.arch, a.reps, a.bwd_splits
    );
    println!(
        "{:>8} {:>5} {:<6} {:<7} {:>10} {:>10} {:>9} {:>9} {:>8} {:>12} {:>12} {:>6} {:<6}",
        "B",
        "d",
        "mode",
        "prec",
        "ms(med)",
        "ms(min)",
        "fwd(med)",
        "bwd(med)",
        "TFLOP/s",
        "ws MiB",
        "loss",
        "splits",
        "kind"
    );
    let mut out = String::new();
    for &b in &a.batch {
        for &d in &a.dim {
            for &p in &precisions {
                for (&m, &loss) in modes.iter().flat_map(|m| losses.iter().map(move |l| (m, l))) {
                    let r = if loss == BenchedLoss::Siglip {
                        selftest::bench_siglip(&gpu, b, d, m, p, a.reps, 1)?
                    } else {
                        selftest::bench_loss(&gpu, b, d, m, p, a.reps, 1, splits)?
                    };
                    println!(
                        "{:>8} {:>5} {:<6} {:<7} {:>10.3} {:>10.3} {:>9.3} {:>9.3} {:>8.2} \
                         {:>12.1} {:>12.6} {:>6} {:<6}",
                        r.b,
                        r.d,
                        r.mode,
                        r.precision,
                        r.ms_median,
                        r.ms_min,
                        r.fwd_ms_median,
                        r.bwd_ms_median,
                        r.tflops,
                        r.workspace_bytes as f64 / (1 << 20) as f64,
                        r.loss,
                        r.bwd_splits,
                        r.loss_name
                    );
                    out += &serde_json::to_string(&r)?;
                    out.push('\n');
                }
            }
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, out).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--precision` list of `bench-loss`.
fn parse_precisions(list: &[String]) -> Result<Vec<Precision>> {
    list.iter()
        .map(|p| {
            Precision::parse(p.trim()).with_context(|| {
                format!(
                    "--precision {p:?}: expected a comma-separated list of {}",
                    Precision::names()
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_list_parses_bf16_and_names_every_choice() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let got = parse_precisions(&list(&["fp32", " bf16", "tf32"])).unwrap();
        assert_eq!(got, [Precision::Fp32, Precision::Bf16, Precision::Tf32]);
        let e = format!("{:#}", parse_precisions(&list(&["bf16", "fp16"])).unwrap_err());
        assert!(e.contains("\"fp16\"") && e.contains("fp32, tf32x3, tf32, bf16"), "{e}");
    }
}
