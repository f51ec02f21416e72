//! The kernel sources of [`super::nvrtc::SOURCES`], unchanged, run on the CPU (tests only).
//!
//! Each source is compiled by the host's C++ compiler (`$CXX`, else `c++`) behind
//! `emu/cuda_emu.h`, which gives the CUDA C++ the kernels use a host meaning: every CUDA thread
//! of a block is an OS thread, `__syncthreads` a barrier, `__shared__` a static (blocks run one
//! after another), and the tensor-core instructions (`mma.sync` m16n8k8 TF32, m16n8k16 BF16) a
//! warp-wide exchange of fragments laid out as the PTX ISA specifies them, written there
//! independently of the kernels. The few inline-assembly helpers of the kernels call that
//! emulation under `#ifdef TESSERA_EMU`; nothing else in the sources changes.
//!
//! What this checks without a GPU: the kernels' indexing (tiles, fragments, masks, padding,
//! grid planning, the host's argument lists). What it cannot: timing, the hardware's rounding
//! inside a tensor-core product, memory ordering beyond barriers; `tessera cuda selftest` on a
//! GPU remains the check of those.
//!
//! Launches take arguments as `cuLaunchKernel` does: one pointer per parameter, to its value.
//! Buffers are host memory; a wrong index reads or writes the wrong host element (or faults);
//! the tests surround every buffer with poisoned guards (`emu_support.rs`).
//!
//! The tests, each mirroring the host code that launches the kernels on a GPU:
//! - `emu_tests.rs`: the fused loss as `gpu::clip_loss_launch` runs it, every precision and
//!   mode, against the f64 reference;
//! - `emu_ring_tests.rs`: the ring's block work as `ring::GpuClipBlocks` runs it, inside the
//!   ring's own schedule, against the CPU ring and the f64 reference;
//! - `emu_kernel_tests.rs`: elementwise.cu as `CudaDevice` launches it, against `CpuDevice`;
//!   optim.cu's passes and whole optimizer steps against the host optimizer (bitwise where the
//!   GPU is documented to be).

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use super::nvrtc::{Defines, KernelSource, SOURCES};

const HEADER: &str = include_str!("emu/cuda_emu.h");
const CXX_FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    // The _rn intrinsics and fmaf must stay single rounded operations.
    "-ffp-contract=off",
    // The kernels type-pun through reinterpret_cast, as CUDA allows.
    "-fno-strict-aliasing",
    "-fPIC",
    "-shared",
    "-pthread",
    "-Wall",
    "-Wno-unknown-pragmas",
];

type LaunchFn = unsafe extern "C" fn(
    name: *const c_char,
    grid: *const c_uint,
    block: *const c_uint,
    shared: c_uint,
    args: *mut *mut c_void,
    order: u64,
    token: *mut c_void,
) -> c_int;

std::thread_local! {
    /// The block order of this thread's launches (see [`with_block_order`]).
    static BLOCK_ORDER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The block order of this thread's launches (0: linear); for handing it to helper threads.
pub fn block_order() -> u64 {
    BLOCK_ORDER.with(|o| o.get())
}

/// Runs `f` with this thread's launches running their blocks in an order drawn from `seed`
/// (0: by linear index, x fastest, the default). A GPU runs a grid's blocks in no defined
/// order, and blocks may run at once: a deterministic kernel must give the same bits whatever
/// the order, and the emulation's sequential blocks alone would not show one that does not.
pub fn with_block_order<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    let old = BLOCK_ORDER.with(|o| o.replace(seed));
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            BLOCK_ORDER.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(old);
    f()
}

/// One kernel source built for the CPU.
pub struct EmuModule {
    pub name: &'static str,
    launch: LaunchFn,
    kernels: &'static [&'static str],
}

// SAFETY: the library stays loaded for the process; launch is re-entrant (each call owns its
// threads), though two launches of one module must not run at once (shared statics): `lock`.
unsafe impl Send for EmuModule {}
unsafe impl Sync for EmuModule {}

/// The C++ translation unit for `src`: the emulation header, the source as NVRTC gets it
/// (`extern __shared__ T name[];` becoming the launch's dynamic shared memory, and each
/// `__shared__ ... name[...];` the running block's own arrays, see [`block_shared`]), and a
/// launcher that finds a kernel by name.
pub fn translation_unit(src: &KernelSource) -> String {
    // `#line` marks, so that the compiler's and the sanitizer's reports name the kernel file and
    // line (the source is common.cuh, then the file).
    const COMMON: &str = include_str!("kernels/common.cuh");
    let common_lines = if src.src.starts_with(COMMON) { COMMON.lines().count() } else { 0 };
    let mut body = String::new();
    if common_lines > 0 {
        body.push_str("#line 1 \"kernels/common.cuh\"\n");
    }
    for (i, line) in src.src.lines().enumerate() {
        if i == common_lines {
            body.push_str(&format!("#line 1 \"kernels/{}\"\n", src.name));
        }
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("extern __shared__ ") {
            // "double name[];" -> "double* name = emu::dyn_shared<double>();"
            let rest = rest.trim_end().trim_end_matches(';').trim_end_matches("[]");
            let (ty, name) = rest.rsplit_once(' ').expect("extern __shared__ <type> <name>[]");
            let indent = &line[..line.len() - t.len()];
            body.push_str(&format!("{indent}{ty}* {name} = emu::dyn_shared<{ty}>();\n"));
        } else if let Some(decl) = t.strip_prefix("__shared__ ") {
            let indent = &line[..line.len() - t.len()];
            body.push_str(indent);
            body.push_str(&block_shared(decl));
            body.push('\n');
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    let mut out = String::with_capacity(HEADER.len() + body.len() + 4096);
    out.push_str("#line 1 \"emu/cuda_emu.h\"\n");
    out.push_str(HEADER);
    out.push('\n');
    out.push_str(&body);
    out.push_str(
        "\n#line 1 \"emu.rs: the launcher\"\nextern \"C\" int tessera_emu_launch(const char* name, const unsigned* grid, \
         const unsigned* block, unsigned shared, void** args, unsigned long long order, \
         void* token) {\n    emu::LaunchOrder in_order(token);\n",
    );
    for k in src.kernels {
        out.push_str(&format!(
            "    if (!std::strcmp(name, \"{k}\")) {{ emu::cp_leak = false; \
             emu::launch({k}, grid, block, shared, args, order); return emu::cp_leak ? -2 : 0; }}\n"
        ));
    }
    out.push_str("    return -1;\n}\n");
    out
}

/// A `__shared__` declaration (what follows the keyword, on one line) as the emulation's
/// per-block arrays: `[__align__(N)] T a[X][Y], b[Z];  // c` becomes
/// `static char emu_sh_a; auto& a = *emu::block_shared<T[(X)][(Y)]>(&emu_sh_a); ...  // c`, each
/// array the running block's own (blocks may run at once), poisoned when the block starts.
fn block_shared(decl: &str) -> String {
    let (code, comment) = decl.split_once("//").map_or((decl, None), |(c, r)| (c, Some(r)));
    let code = code.trim().trim_end_matches(';').trim_end();
    // (Every array is 128-byte aligned, so an __align__ asks for nothing more.)
    let code = match code.strip_prefix("__align__(") {
        Some(rest) => rest.split_once(')').map_or(rest, |(_, r)| r).trim_start(),
        None => code,
    };
    // The type ends where the first declarator's name begins: the identifier before its '['.
    let first = code.find('[').expect("__shared__ <type> <name>[...]");
    let name_at = code[..first].trim_end().rfind(' ').expect("__shared__ <type> <name>[...]") + 1;
    let ty = code[..name_at].trim_end();
    // Declarators, split at the commas outside brackets and parentheses.
    let mut decls = vec![];
    let (mut depth, mut start) = (0i32, name_at);
    for (i, c) in code.char_indices().skip(name_at) {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth -= 1,
            ',' if depth == 0 => {
                decls.push(code[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    decls.push(code[start..].trim());
    let mut out = String::new();
    for d in decls {
        let (name, dims) = d.split_at(d.find('[').expect("<name>[...]"));
        let name = name.trim();
        // Each bound in parentheses: a `>` in one would end the template argument list.
        let dims = dims.replace("][", ")][(").replacen('[', "[(", 1);
        let dims = format!("{})]", dims.trim_end().strip_suffix(']').expect("<name>[...]"));
        out.push_str(&format!(
            "static char emu_sh_{name}; auto& {name} = *emu::block_shared<{ty}{dims}>(&emu_sh_{name}); "
        ));
    }
    let mut out = out.trim_end().to_string();
    if let Some(c) = comment {
        out.push_str(&format!("  //{c}"));
    }
    out
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100000001b3);
    }
    h
}

/// The C++ compiler that builds the emulation: `$CXX`, else `c++`.
pub fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Compiles `src` with the kernel knobs `defs` (cached by content in the temp directory) and
/// loads it.
fn build(src: &'static KernelSource, defs: &Defines) -> Result<EmuModule, String> {
    let cxx = cxx();
    let tu = translation_unit(src);
    let mut knobs = defs.options(src.name);
    if sanitizing() {
        knobs.extend(["-fsanitize=thread".to_string(), "-g".to_string()]);
    }
    let flags = format!("{} {}", CXX_FLAGS.join(" "), knobs.join(" "));
    let key = fnv1a(&[tu.as_bytes(), flags.as_bytes(), cxx.as_bytes()]);
    let dir = std::env::temp_dir().join("tessera-cuda-emu");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let stem = format!("{}-{key:016x}", src.name.trim_end_matches(".cu"));
    let lib = dir.join(format!("{stem}.so"));
    if !lib.exists() {
        let unique = format!("{stem}.{}.{:?}", std::process::id(), std::thread::current().id())
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.', "_");
        let cpp = dir.join(format!("{unique}.cpp"));
        let tmp = dir.join(format!("{unique}.so"));
        std::fs::write(&cpp, &tu).map_err(|e| format!("write {}: {e}", cpp.display()))?;
        let out = std::process::Command::new(&cxx)
            .args(CXX_FLAGS)
            .args(&knobs)
            .arg("-o")
            .arg(&tmp)
            .arg(&cpp)
            .output()
            .map_err(|e| {
                format!(
                    "cannot run the C++ compiler `{cxx}` ({e}); install g++ (Debian: apt-get \
                     install g++) or set CXX"
                )
            })?;
        let _ = std::fs::remove_file(&cpp);
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "{cxx} failed on {} (emulation):\n{}",
                src.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::rename(&tmp, &lib).map_err(|e| format!("rename to {}: {e}", lib.display()))?;
    }
    load(src, &lib)
}

/// The environment variable that builds the emulation with ThreadSanitizer
/// (`TESSERA_EMU_SANITIZE=thread`); its runtime must then be loaded before anything else
/// (`LD_PRELOAD`), as `race_tests` runs it.
pub const SANITIZE_ENV: &str = "TESSERA_EMU_SANITIZE";

/// Whether this process builds the emulation with ThreadSanitizer ([`SANITIZE_ENV`]).
pub fn sanitizing() -> bool {
    std::env::var(SANITIZE_ENV).as_deref() == Ok("thread")
}

fn load(src: &'static KernelSource, lib: &Path) -> Result<EmuModule, String> {
    let path = CString::new(lib.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen/dlsym with NUL-terminated strings; the handle is kept for the process.
    unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            let err = std::ffi::CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned();
            let hint = if sanitizing() {
                format!(
                    " ({SANITIZE_ENV}=thread needs ThreadSanitizer's runtime loaded first: \
                     LD_PRELOAD=$({} -print-file-name=libtsan.so))",
                    cxx()
                )
            } else {
                String::new()
            };
            return Err(format!("dlopen {}: {err}{hint}", lib.display()));
        }
        let sym = libc::dlsym(h, c"tessera_emu_launch".as_ptr());
        if sym.is_null() {
            return Err(format!("{}: no tessera_emu_launch", lib.display()));
        }
        Ok(EmuModule {
            name: src.name,
            launch: std::mem::transmute::<*mut c_void, LaunchFn>(sym),
            kernels: src.kernels,
        })
    }
}

/// The emulation of the source named `name` (e.g. `clip_loss.cu`), built once per process.
pub fn module(name: &str) -> Result<Arc<EmuModule>, String> {
    module_with(name, &Defines::default())
}

/// [`module`] with the kernel knobs `defs` (as `Gpu::open_with` compiles them).
pub fn module_with(name: &str, defs: &Defines) -> Result<Arc<EmuModule>, String> {
    type Built = Vec<(&'static str, Defines, Arc<EmuModule>)>;
    static MODULES: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut mods = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, m)) = mods.iter().find(|(n, d, _)| *n == name && d == defs) {
        return Ok(m.clone());
    }
    let src = SOURCES.iter().find(|s| s.name == name).ok_or_else(|| format!("no source {name}"))?;
    let m = Arc::new(build(src, defs)?);
    mods.push((src.name, defs.clone(), m.clone()));
    Ok(m)
}

/// A kernel's arguments, each kept in an 8-byte slot (`kernelParams` points at the slots,
/// taken when the launch starts).
#[derive(Default)]
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Args {
        Args::default()
    }
    fn raw(&mut self, bytes: &[u8]) -> &mut Args {
        let mut v = [0u8; 8];
        v[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(u64::from_le_bytes(v));
        self
    }
    /// A device pointer to `v`'s first element (read or written by the kernel).
    pub fn buf<T>(&mut self, v: &[T]) -> &mut Args {
        self.raw(&(v.as_ptr() as u64).to_le_bytes())
    }
    pub fn buf_mut<T>(&mut self, v: &mut [T]) -> &mut Args {
        self.raw(&(v.as_mut_ptr() as u64).to_le_bytes())
    }
    pub fn null(&mut self) -> &mut Args {
        self.raw(&0u64.to_le_bytes())
    }
    pub fn i64(&mut self, x: i64) -> &mut Args {
        self.raw(&x.to_le_bytes())
    }
    pub fn i32(&mut self, x: i32) -> &mut Args {
        self.raw(&x.to_le_bytes())
    }
    pub fn f32(&mut self, x: f32) -> &mut Args {
        self.raw(&x.to_le_bytes())
    }
}

impl EmuModule {
    /// Runs kernel `name` over `grid` blocks of `block` threads with `shared` bytes of dynamic
    /// shared memory.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, and every buffer must be as large as the
    /// kernel indexes it (as for a real launch).
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        args: &mut Args,
    ) -> Result<(), String> {
        if !self.kernels.contains(&name) {
            return Err(format!("{}: no kernel {name}", self.name));
        }
        static ONE_AT_A_TIME: Mutex<u8> = Mutex::new(0);
        let mut guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        // The launches' order, for ThreadSanitizer: one address for every module.
        let token: *mut u8 = &mut *guard;
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        let g = [grid.0, grid.1, grid.2];
        let b = [block.0, block.1, block.2];
        let mut ptrs: Vec<*mut c_void> =
            args.slots.iter_mut().map(|s| (s as *mut u64).cast()).collect();
        // SAFETY: per the caller; the launcher only reads `ptrs.len()` entries (the kernel's
        // parameter count, which the caller matched).
        let order = BLOCK_ORDER.with(|o| o.get());
        let rc = unsafe {
            (self.launch)(
                cname.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                shared,
                ptrs.as_mut_ptr(),
                order,
                token.cast(),
            )
        };
        match rc {
            0 => {}
            -2 => {
                return Err(format!(
                    "{}: {name} ended with cp.async copies it never waited for",
                    self.name
                ));
            }
            _ => return Err(format!("{}: launcher does not know {name}", self.name)),
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "emu_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "emu_support.rs"]
mod support;

#[cfg(test)]
#[path = "emu_ring_tests.rs"]
mod ring_tests;

#[cfg(test)]
#[path = "emu_kernel_tests.rs"]
mod kernel_tests;

#[cfg(test)]
#[path = "emu_race_tests.rs"]
mod race_tests;
