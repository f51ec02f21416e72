//! The kernel sources (`kernels/*.cu`, embedded in the binary) and their compilation by NVRTC.

use std::ffi::{CStr, CString};

use cudarc::nvrtc::{result, sys};

use super::CudaError;
use super::libs::{Lib, require};

/// One `.cu` file and the `extern "C"` kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `rank/src/device/cuda/kernels/`.
    pub name: &'static str,
    /// The source text: `kernels/common.cuh`, then the file.
    pub src: &'static str,
    /// Kernel entry points (unmangled names).
    pub kernels: &'static [&'static str],
}

/// Every kernel source of the CUDA layer.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "elementwise.cu",
        src: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/elementwise.cu")),
        kernels: &[
            "bias_add",
            "bias_grad",
            "gelu_fwd",
            "gelu_bwd",
            "relu_fwd",
            "relu_bwd",
            "add_inplace",
            "axpy",
            "scale",
            "sq_norm_partial",
            "layernorm_fwd",
            "layernorm_bwd_dx",
            "layernorm_bwd_params",
            "l2_normalize_fwd",
            "l2_normalize_bwd",
            "softmax_xent",
        ],
    },
    KernelSource {
        name: "clip_loss.cu",
        src: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/clip_loss.cu")),
        kernels: &[
            "clip_fwd",
            "clip_fwd_tf32x3",
            "clip_fwd_tf32",
            "clip_fwd_bf16",
            "clip_to_bf16",
            "clip_lse",
            "clip_fold_rows",
            "clip_fold_cols",
            "clip_merge_cols",
            "sum_f64",
            "clip_fold_splits",
            "clip_bwd",
            "clip_bwd_tf32x3",
            "clip_bwd_tf32",
            "clip_bwd_bf16",
            "clip_bwd_pair",
            "clip_bwd_pair_tf32x3",
            "clip_bwd_pair_tf32",
            "clip_bwd_pair_bf16",
            "siglip_bwd",
            "siglip_bwd_tf32x3",
            "siglip_bwd_tf32",
            "siglip_bwd_bf16",
            "siglip_bwd_pair",
            "siglip_bwd_pair_tf32x3",
            "siglip_bwd_pair_tf32",
            "siglip_bwd_pair_bf16",
        ],
    },
    KernelSource {
        name: "optim.cu",
        src: concat!(include_str!("kernels/common.cuh"), include_str!("kernels/optim.cu")),
        kernels: &["optim_reduce", "optim_momentum", "optim_lamb_moments", "optim_lamb_apply"],
    },
];

/// A compile-time tuning knob of a kernel source: a macro that the `.cu` file defines with its
/// default (`#ifndef NAME` / `#define NAME DEFAULT`) and that NVRTC can be given another value
/// of (`-DNAME=VALUE`), so that one binary can time the choices on a GPU.
#[derive(Debug, PartialEq, Eq)]
pub struct Knob {
    /// The macro.
    pub name: &'static str,
    /// The source that reads it (`SOURCES[..].name`).
    pub source: &'static str,
    /// The value in the source.
    pub default: i64,
    /// The valid values, inclusive.
    pub min: i64,
    pub max: i64,
}

/// Every tuning knob of the kernel sources.
pub const KNOBS: &[Knob] = &[
    // Blocks per multiprocessor in the launch bounds of the fused forward (clip_fwd*): the
    // register budget is 65,536 / (256 x blocks) per thread.
    Knob { name: "CLIP_FWD_MIN_BLOCKS", source: "clip_loss.cu", default: 4, min: 1, max: 8 },
    // Blocks per multiprocessor in the launch bounds of the fused backward (clip_bwd*,
    // clip_bwd_pair*): the register budget is 65,536 / (256 x blocks) per thread.
    Knob { name: "CLIP_BWD_MIN_BLOCKS", source: "clip_loss.cu", default: 2, min: 1, max: 4 },
    // Column tiles per G panel of the backward (every precision): a dA job contracts over 64 x
    // panel columns,
    // reading and writing its accumulators once per panel (above 1: dynamic shared memory,
    // gpu::bwd_shared_bytes).
    Knob { name: "CLIP_BWD_PANEL", source: "clip_loss.cu", default: 1, min: 1, max: 4 },
];

/// Values for some of [`KNOBS`], given as `NAME=VALUE`; the others keep their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defines(Vec<(&'static Knob, i64)>);

impl Defines {
    /// Parses `NAME=VALUE` items (each may also be a comma-separated list). Unknown names,
    /// values out of range and a name given twice are errors that list the knobs.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Defines, CudaError> {
        let mut out: Vec<(&'static Knob, i64)> = Vec::new();
        let list = || {
            KNOBS
                .iter()
                .map(|k| format!("{} ({}..={}, default {})", k.name, k.min, k.max, k.default))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for item in items.iter().flat_map(|s| s.as_ref().split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some((name, value)) = item.split_once('=') else {
                return Err(CudaError::Invalid(format!(
                    "kernel define {item:?}: expected NAME=VALUE, with NAME one of {}",
                    list()
                )));
            };
            let (name, value) = (name.trim(), value.trim());
            let Some(knob) = KNOBS.iter().find(|k| k.name == name) else {
                return Err(CudaError::Invalid(format!(
                    "kernel define {item:?}: no knob named {name:?}; the knobs are {}",
                    list()
                )));
            };
            let v = value.parse::<i64>().ok().filter(|v| (knob.min..=knob.max).contains(v));
            let Some(v) = v else {
                return Err(CudaError::Invalid(format!(
                    "kernel define {item:?}: {name} takes an integer in {}..={} (default {})",
                    knob.min, knob.max, knob.default
                )));
            };
            if out.iter().any(|(k, _)| k.name == name) {
                return Err(CudaError::Invalid(format!(
                    "kernel define {name} is given twice; give it once"
                )));
            }
            out.push((knob, v));
        }
        Ok(Defines(out))
    }

    /// The value of knob `name` (its default when not given).
    pub fn value(&self, name: &str) -> i64 {
        self.0
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|&(_, v)| v)
            .or_else(|| KNOBS.iter().find(|k| k.name == name).map(|k| k.default))
            .unwrap_or_else(|| panic!("no kernel knob named {name}"))
    }

    /// True when every knob keeps its default.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The NVRTC options (`-DNAME=VALUE`) for `source`.
    pub fn options(&self, source: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k.source == source)
            .map(|(k, v)| format!("-D{}={v}", k.name))
            .collect()
    }
}

impl std::fmt::Display for Defines {
    /// `NAME=VALUE, ...`, or `defaults`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("defaults");
        }
        let items: Vec<String> = self.0.iter().map(|(k, v)| format!("{}={v}", k.name)).collect();
        f.write_str(&items.join(", "))
    }
}

/// The architectures CI compiles for (A100 and H100/H200).
pub const CHECK_ARCHS: &[&str] = &["sm_80", "sm_90"];

/// A compiled source.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The source's file name.
    pub name: &'static str,
    /// `sm_XY`.
    pub arch: String,
    /// The cubin (device code for exactly `arch`), loadable with `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings), trimmed; empty when clean.
    pub log: String,
}

/// NVRTC's version `(major, minor)`.
pub fn version() -> Result<(i32, i32), CudaError> {
    require(Lib::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Invalid(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// The options every kernel is compiled with.
pub fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()]
}

/// Compiles `src` for `arch` (`sm_80`, `sm_90`, ...) to a cubin. Errors carry NVRTC's log;
/// warnings are returned in [`Compiled::log`] (see [`check_all`] for warnings-as-errors).
/// Also checks that every listed kernel name is in the cubin's symbol table.
pub fn compile(src: &KernelSource, arch: &str) -> Result<Compiled, CudaError> {
    compile_with(src, arch, &[])
}

/// [`compile`] with the knob values `defs` (see [`Defines`]).
pub fn compile_defined(
    src: &KernelSource,
    arch: &str,
    defs: &Defines,
) -> Result<Compiled, CudaError> {
    let opts = defs.options(src.name);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    compile_with(src, arch, &opts)
}

/// [`compile`] with extra NVRTC options (e.g. `-Xptxas=-v`, whose report lands in the log).
pub fn compile_with(src: &KernelSource, arch: &str, extra: &[&str]) -> Result<Compiled, CudaError> {
    require(Lib::Nvrtc)?;
    let valid_arch = arch.strip_prefix("sm_").is_some_and(|n| {
        let n = n.trim_end_matches('a');
        !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
    });
    if !valid_arch {
        return Err(CudaError::Invalid(format!("architecture {arch:?} must look like sm_90")));
    }
    let fail = |log: String| CudaError::Compile {
        source_name: src.name.to_string(),
        arch: arch.to_string(),
        log,
    };
    let c_src = CString::new(src.src).map_err(|_| fail("source contains a NUL byte".into()))?;
    let c_name = CString::new(src.name).map_err(|_| fail("name contains a NUL byte".into()))?;
    let prog = result::create_program(&c_src, Some(&c_name))
        .map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}")))?;
    let mut opts = options(arch);
    opts.extend(extra.iter().map(|o| o.to_string()));
    // SAFETY: `prog` is a live program until destroy_program below.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|v| {
            let bytes: Vec<u8> = v.iter().map(|&c| c as u8).collect();
            CStr::from_bytes_until_nul(&bytes)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
        })
        .unwrap_or_default()
        .trim()
        .to_string();
    let cubin = compiled.map_err(|e| format!("{e:?}")).and_then(|()| get_cubin(prog));
    // SAFETY: destroyed once, after the last use.
    let _ = unsafe { result::destroy_program(prog) };
    let cubin = cubin.map_err(|e| fail(if log.is_empty() { e } else { format!("{e}\n{log}") }))?;
    for k in src.kernels {
        if !contains(&cubin, k.as_bytes()) {
            return Err(fail(format!("kernel {k} is not in the compiled module")));
        }
    }
    Ok(Compiled { name: src.name, arch: arch.to_string(), cubin, log })
}

fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: `prog` was compiled successfully; the buffer has the size NVRTC reported.
    unsafe {
        let r = sys::nvrtcGetCUBINSize(prog, &mut size);
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcGetCUBINSize: {r:?}"));
        }
        let mut buf = vec![0u8; size];
        let r = sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast());
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcGetCUBIN: {r:?}"));
        }
        if buf.is_empty() {
            return Err("NVRTC returned an empty cubin".to_string());
        }
        Ok(buf)
    }
}

/// Whether `hay` (a cubin) holds `needle` as a NUL-terminated symbol name.
pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len() + 2)
        .any(|w| w[0] == 0 && &w[1..=needle.len()] == needle && w[needle.len() + 1] == 0)
}

/// ptxas's resource report for every kernel of `src` on `arch`: one line per kernel,
/// `name: Used N registers, ... [, spills]`.
/// `defs`: knob values (see [`Defines`]).
pub fn resource_usage(
    src: &KernelSource,
    arch: &str,
    defs: &Defines,
) -> Result<Vec<String>, CudaError> {
    let mut extra = defs.options(src.name);
    extra.push("-Xptxas=-v".to_string());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let c = compile_with(src, arch, &extra)?;
    let mut out = Vec::new();
    let mut name = String::new();
    let mut spill = String::new();
    for line in c.log.lines() {
        let info = line.split("info    : ").nth(1).unwrap_or(line).trim();
        if let Some(rest) = info.strip_prefix("Compiling entry function '") {
            name = rest.split('\'').next().unwrap_or("").to_string();
            spill.clear();
        } else if info.contains("bytes spill") {
            spill = info.trim_start_matches(|c: char| !c.is_ascii_digit()).to_string();
        } else if info.starts_with("Used ") {
            out.push(format!("{name}: {info}; {spill}"));
        }
    }
    Ok(out)
}

/// One row of [`check_all`].
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub source: &'static str,
    pub arch: String,
    /// The cubin (as [`Compiled::cubin`]).
    pub cubin: Vec<u8>,
    pub millis: f64,
}

/// Compiles every source for every arch in `archs`, with the knob values `defs`; fails on the
/// first error or warning.
pub fn check_all(archs: &[&str], defs: &Defines) -> Result<Vec<CheckRow>, CudaError> {
    let mut rows = Vec::new();
    for arch in archs {
        for src in SOURCES {
            let t = std::time::Instant::now();
            let c = compile_defined(src, arch, defs)?;
            if !c.log.is_empty() {
                return Err(CudaError::Warnings {
                    source_name: src.name.to_string(),
                    arch: arch.to_string(),
                    log: c.log,
                });
            }
            rows.push(CheckRow {
                source: src.name,
                arch: arch.to_string(),
                cubin: c.cubin,
                millis: t.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles every kernel with the NVRTC that can be loaded. Under CI (`CI=true`) NVRTC
    /// must be present (scripts/check-kernels.sh installs the PyPI wheel and sets
    /// LD_LIBRARY_PATH); elsewhere, without NVRTC, the test checks that the error names the
    /// library and the fix instead.
    #[test]
    fn all_kernels_compile_without_warnings() {
        if !Lib::Nvrtc.present() {
            assert!(
                std::env::var("CI").map(|v| v != "true").unwrap_or(true),
                "CI=true but libnvrtc.so.13 cannot be loaded: run scripts/check-kernels.sh \
                 (it installs nvidia-cuda-nvrtc==13.0.88 and sets LD_LIBRARY_PATH)"
            );
            let e = check_all(CHECK_ARCHS, &Defines::default()).unwrap_err().to_string();
            assert!(e.contains("libnvrtc.so.13") && e.contains("pip install"), "{e}");
            return;
        }
        let rows = check_all(CHECK_ARCHS, &Defines::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.len(), SOURCES.len() * CHECK_ARCHS.len());
        assert!(rows.iter().all(|r| !r.cubin.is_empty()));
    }

    #[test]
    fn bad_source_reports_the_log() {
        if !Lib::Nvrtc.present() {
            return assert!(compile(&SOURCES[0], "sm_90").is_err());
        }
        let bad = KernelSource {
            name: "bad.cu",
            src: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
            kernels: &["k"],
        };
        let e = compile(&bad, "sm_90").unwrap_err().to_string();
        assert!(e.contains("bad.cu") && e.contains("undefined_name"), "{e}");
        let warn = KernelSource {
            name: "warn.cu",
            src: "extern \"C\" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }",
            kernels: &["k"],
        };
        let c = compile(&warn, "sm_80").unwrap();
        assert!(c.log.contains("unused"), "expected a warning, got {:?}", c.log);
    }

    #[test]
    fn resource_usage_lists_every_kernel() {
        if !Lib::Nvrtc.present() {
            let e =
                resource_usage(&SOURCES[1], "sm_90", &Defines::default()).unwrap_err().to_string();
            return assert!(e.contains("libnvrtc.so.13"), "{e}");
        }
        let lines = resource_usage(&SOURCES[1], "sm_90", &Defines::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for k in SOURCES[1].kernels {
            assert!(lines.iter().any(|l| l.starts_with(&format!("{k}: Used "))), "{k}: {lines:?}");
        }
        // The knobs reach ptxas: at 8 forward and 4 backward blocks per multiprocessor the
        // register budgets are 32 and 64, where the defaults (4 and 2) give 64 and 128.
        let defs = Defines::parse(&["CLIP_FWD_MIN_BLOCKS=8,CLIP_BWD_MIN_BLOCKS=4"]).unwrap();
        let tuned = resource_usage(&SOURCES[1], "sm_90", &defs).unwrap_or_else(|e| panic!("{e}"));
        let regs = |lines: &[String], k: &str| -> u32 {
            let l = lines.iter().find(|l| l.starts_with(&format!("{k}: Used "))).unwrap();
            l[k.len() + 7..].split(' ').next().unwrap().parse().unwrap()
        };
        assert!(regs(&lines, "clip_fwd_tf32") <= 64 && regs(&tuned, "clip_fwd_tf32") <= 32);
        assert!(regs(&lines, "clip_bwd_bf16") > 64, "{lines:?}");
        assert!(regs(&tuned, "clip_bwd_bf16") <= 64, "{tuned:?}");
        assert!(regs(&tuned, "clip_bwd_pair") <= 64, "{tuned:?}");
    }

    /// Each knob's default is the one its source defines, and the source uses it.
    #[test]
    fn knobs_match_their_sources() {
        for k in KNOBS {
            let src = SOURCES.iter().find(|s| s.name == k.source).expect(k.source);
            let def = format!("#ifndef {0}\n#define {0} {1}\n#endif\n", k.name, k.default);
            assert!(src.src.contains(&def), "{}: expected {def:?}", k.name);
            assert!(src.src.matches(k.name).count() > 3, "{} is never used", k.name);
            assert!(k.min <= k.default && k.default <= k.max, "{}", k.name);
        }
    }

    #[test]
    fn defines_are_checked_against_the_knobs() {
        let d = Defines::parse(&["CLIP_FWD_MIN_BLOCKS=3", " CLIP_BWD_MIN_BLOCKS = 1 "]).unwrap();
        assert_eq!(d.to_string(), "CLIP_FWD_MIN_BLOCKS=3, CLIP_BWD_MIN_BLOCKS=1");
        assert_eq!(
            d.options("clip_loss.cu"),
            ["-DCLIP_FWD_MIN_BLOCKS=3", "-DCLIP_BWD_MIN_BLOCKS=1"]
        );
        assert!(d.options("elementwise.cu").is_empty());
        assert_eq!(Defines::parse::<&str>(&[]).unwrap().to_string(), "defaults");
        assert!(Defines::parse(&[""]).unwrap().is_empty());
        for (bad, says) in [
            ("CLIP_FWD_MIN_BLOCKS", "expected NAME=VALUE"),
            ("NO_SUCH=1", "no knob named \"NO_SUCH\""),
            ("CLIP_FWD_MIN_BLOCKS=0", "integer in 1..=8"),
            ("CLIP_BWD_MIN_BLOCKS=x", "integer in 1..=4"),
            ("CLIP_FWD_MIN_BLOCKS=3,CLIP_FWD_MIN_BLOCKS=4", "given twice"),
        ] {
            let e = Defines::parse(&[bad]).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            if !e.contains("twice") {
                assert!(e.contains("CLIP_"), "{bad}: the error names the knobs: {e}");
            }
        }
    }

    #[test]
    fn arch_is_validated() {
        let e = compile(&SOURCES[0], "90").unwrap_err().to_string();
        assert!(e.contains("sm_90") || e.contains("libnvrtc"), "{e}");
    }
}
