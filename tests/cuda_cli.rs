//! `tessera cuda ...` on whatever machine the tests run: without a GPU (CI) the self-test must
//! fail cleanly, naming the missing driver and the fix; with NVRTC loadable the kernel check
//! must pass, and without it fail cleanly naming NVRTC.

mod common;

use common::tessera;
use tessera_rank::device::cuda::libs::Lib;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = tessera().args(args).output().expect("spawn tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn selftest_without_a_driver_fails_cleanly() {
    let (code, stdout, stderr) = run(&["cuda", "selftest"]);
    assert!(!stderr.contains("panicked"), "tessera panicked:\n{stderr}");
    if Lib::Driver.present() {
        // A GPU machine: every check must pass.
        assert_eq!(code, 0, "selftest failed on a GPU machine:\n{stdout}\n{stderr}");
        assert!(stdout.contains("cuda selftest: PASS"), "{stdout}");
        return;
    }
    assert_ne!(code, 0, "selftest must fail without a driver:\n{stdout}\n{stderr}");
    assert!(stdout.contains("libcuda.so.1 MISSING"), "probe table missing:\n{stdout}");
    assert!(
        stderr.contains("CUDA driver not found")
            && stderr.contains("libcuda.so.1")
            && stderr.contains("NVIDIA driver"),
        "error must name the driver and the fix:\n{stderr}"
    );
}

#[test]
fn check_kernels_passes_with_nvrtc_or_names_it() {
    let (code, stdout, stderr) = run(&["cuda", "check-kernels"]);
    assert!(!stderr.contains("panicked"), "tessera panicked:\n{stderr}");
    if Lib::Nvrtc.present() {
        assert_eq!(code, 0, "kernel check failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains("check-kernels: OK"), "{stdout}");
        assert!(stdout.contains("sm_80") && stdout.contains("sm_90"), "{stdout}");
    } else {
        // (The binary may still find a wheel through python3 and re-execute itself.)
        if code == 0 {
            assert!(stdout.contains("check-kernels: OK"), "{stdout}");
        } else {
            assert!(
                stderr.contains("libnvrtc.so.13") && stderr.contains("pip install"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn bench_loss_rejects_bad_mode_before_touching_the_gpu() {
    let (code, _, stderr) = run(&["cuda", "bench-loss", "--mode", "sideways"]);
    assert_ne!(code, 0);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("sideways") || stderr.contains("libcuda.so.1"), "{stderr}");
}

/// A kernel knob that does not exist, or a value out of its range, is named with the knobs
/// and their ranges before any library is looked for (so the same answer with or without a
/// GPU).
#[test]
fn a_bad_kernel_define_is_named_before_touching_the_gpu() {
    for cmd in ["selftest", "bench-loss", "check-kernels"] {
        for (define, says) in [
            ("NOPE=1", "no knob named \"NOPE\"; the knobs are CLIP_FWD_MIN_BLOCKS (1..=8"),
            ("CLIP_BWD_MIN_BLOCKS=5", "CLIP_BWD_MIN_BLOCKS takes an integer in 1..=4"),
        ] {
            let (code, _, stderr) = run(&["cuda", cmd, "--define", define]);
            assert_eq!(code, 1, "{cmd} --define {define}:\n{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(stderr.contains(says) && stderr.contains("--define"), "{stderr}");
            assert!(!stderr.contains("libcuda") && !stderr.contains("libnvrtc"), "{stderr}");
        }
    }
}

/// A bad `--bwd-splits` is named before any library is looked for.
#[test]
fn a_bad_bwd_splits_is_named_before_touching_the_gpu() {
    for bad in ["0", "two", "1.5", ""] {
        let (code, _, stderr) = run(&["cuda", "bench-loss", "--bwd-splits", bad]);
        assert_eq!(code, 1, "--bwd-splits {bad:?}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains("expected auto or a number of splits (1 or more)"), "{stderr}");
        assert!(!stderr.contains("libcuda") && !stderr.contains("libnvrtc"), "{stderr}");
    }
}

/// A bad `--loss` of bench-loss is named with the choices before any library is looked for.
#[test]
fn a_bad_bench_loss_name_is_named_before_touching_the_gpu() {
    for bad in ["infonce", "clip,sigmoid", ""] {
        let (code, _, stderr) = run(&["cuda", "bench-loss", "--loss", bad]);
        assert_eq!(code, 1, "--loss {bad:?}:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains("expected a comma-separated list of clip, siglip"), "{stderr}");
        assert!(!stderr.contains("libcuda") && !stderr.contains("libnvrtc"), "{stderr}");
    }
}

/// `--help` of the commands that take `--define` names every knob with its default.
#[test]
fn define_help_names_every_knob() {
    for cmd in ["selftest", "bench-loss", "check-kernels", "warm-cache"] {
        let (code, stdout, _) = run(&["cuda", cmd, "--help"]);
        assert_eq!(code, 0);
        for k in tessera_rank::device::cuda::nvrtc::KNOBS {
            let want = format!("{} ({}..={}, default {})", k.name, k.min, k.max, k.default);
            assert!(stdout.contains(&want), "{cmd} --help lacks {want}:\n{stdout}");
        }
    }
}

/// The pinned NVRTC wheel that `scripts/check-kernels.sh --install-only` (called by
/// `scripts/ci/setup.sh`) installs under the repository's target/ folder.
fn nvrtc_wheel_lib() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/cuda-wheels/nvrtc-13.0.88/nvidia/cu13/lib")
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_with_the_pinned_nvrtc_wheel() {
    // No skipping: the wheel is part of the test set-up, on any machine, GPU or not.
    let lib = nvrtc_wheel_lib();
    assert!(
        lib.join("libnvrtc.so.13").exists(),
        "{} has no libnvrtc.so.13: run scripts/check-kernels.sh --install-only (scripts/ci/setup.sh \
         does) to install nvidia-cuda-nvrtc==13.0.88 there",
        lib.display()
    );
    let cubins = tempfile::tempdir().expect("tempdir");
    let out = tessera()
        .args(["cuda", "check-kernels", "--arch", "sm_80,sm_90", "--save-cubins"])
        .arg(cubins.path())
        .env("TESSERA_CUDA_LIB_DIRS", &lib)
        .output()
        .expect("spawn tessera");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kernel check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("check-kernels: OK"), "{stdout}");
    assert!(stdout.contains("sm_80") && stdout.contains("sm_90"), "{stdout}");
    assert!(stdout.contains("kernel knobs: defaults"), "{stdout}");
    // --save-cubins: each source's machine code per architecture, as ELF files that name its
    // kernels (what cuobjdump and nvdisasm read).
    for src in tessera_rank::device::cuda::nvrtc::SOURCES {
        for arch in ["sm_80", "sm_90"] {
            let stem = src.name.trim_end_matches(".cu");
            let path = cubins.path().join(format!("{stem}.{arch}.cubin"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(&bytes[..4], b"\x7fELF", "{} is not an ELF cubin", path.display());
            for k in src.kernels {
                let name = k.as_bytes();
                assert!(
                    bytes.windows(name.len()).any(|w| w == name),
                    "{} lacks kernel {k}",
                    path.display()
                );
            }
        }
    }
}

/// `tessera cuda warm-cache` fills the kernel cache once; a second run finds every source
/// there; an unwritable folder or a disabled cache is an error that says so.
#[test]
fn warm_cache_compiles_once_then_finds_every_kernel() {
    let lib = nvrtc_wheel_lib();
    assert!(lib.join("libnvrtc.so.13").exists(), "run scripts/check-kernels.sh --install-only");
    let dir = tempfile::tempdir().expect("tempdir");
    let warm = |cache: &std::path::Path, extra: &[(&str, &str)]| {
        let mut cmd = tessera();
        cmd.args(["cuda", "warm-cache", "--arch", "sm_90"])
            .env("TESSERA_CUDA_LIB_DIRS", &lib)
            .env("TESSERA_KERNEL_CACHE_DIR", cache)
            .env_remove("TESSERA_KERNEL_CACHE_DISABLE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("spawn tessera");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("panicked"), "{text}");
        (out.status.code().unwrap_or(-1), text)
    };
    let sources = tessera_rank::device::cuda::nvrtc::SOURCES;
    let cache = dir.path().join("kernels");
    for (round, origin) in [(1, "compiled"), (2, "cached")] {
        let (code, text) = warm(&cache, &[]);
        assert_eq!(code, 0, "round {round}:\n{text}");
        for src in sources {
            let row = text.lines().find(|l| l.starts_with(src.name)).unwrap_or("");
            assert!(row.contains(&format!("sm_90   {origin}")), "round {round}: {row}\n{text}");
        }
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), sources.len(), "{text}");
    }
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"x").unwrap();
    let (code, text) = warm(&blocked.join("kernels"), &[]);
    assert_ne!(code, 0);
    assert!(text.contains("cannot write elementwise.cu") && text.contains("writable"), "{text}");
    let (code, text) = warm(&cache, &[("TESSERA_KERNEL_CACHE_DISABLE", "1")]);
    assert_ne!(code, 0);
    assert!(text.contains("the kernel cache is off"), "{text}");
}

/// `run.device = "cuda"` (two ranks sharing a GPU over the TCP ring) and `run.collectives =
/// "nccl"` (one rank): without a driver the job stops at set-up with an error that names the
/// setting, the driver and the way back (no hang, no panic); on a GPU machine they train.
#[test]
fn training_on_cuda_fails_cleanly_without_a_driver() {
    let cases: [(usize, &[&str], &str); 2] = [
        (2, &["run.device=\"cuda\""], "run.device = \"cpu\""),
        (1, &["run.device=\"cuda\"", "run.collectives=\"nccl\""], "run.collectives = \"tcp\""),
    ];
    for (nproc, sets, fallback) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut all = vec!["run.steps=3", "run.log_every=1"];
        all.extend_from_slice(sets);
        let out = common::run_command(nproc, None, &all, &[], dir.path())
            .output()
            .expect("spawn tessera run");
        let (code, stderr) =
            (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr));
        assert!(!stderr.contains("panicked"), "{sets:?}: tessera panicked:\n{stderr}");
        if Lib::Driver.present() {
            assert_eq!(code, 0, "{sets:?}: training on the GPU failed:\n{stderr}");
            continue;
        }
        assert_ne!(code, 0, "{sets:?} must fail without a driver:\n{stderr}");
        assert!(
            stderr.contains("libcuda.so.1") && stderr.contains(fallback),
            "{sets:?}: the error must name the driver and {fallback}:\n{stderr}"
        );
    }
}
