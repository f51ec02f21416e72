//! Finding the CUDA shared libraries at run time.
//!
//! cudarc (`dynamic-loading`) opens each library by bare file name through `dlopen`, trying a
//! list of names built from the library's stem (see `cudarc::get_lib_name_candidates`): for
//! CUDA 13 that includes `libcuda.so` / `libcuda.so.1`, `libnvrtc.so` / `libnvrtc.so.13`,
//! `libcublas.so` / `libcublas.so.13`, and for NCCL `libnccl.so` but NOT `libnccl.so.2`, the
//! only name the `nvidia-nccl-cu13` wheel (and most distributions' runtime packages) ship.
//! `dlopen` searches `LD_LIBRARY_PATH` as it was when the process started, then the
//! ld.so cache and the default directories.
//!
//! [`plan_loader_path`] finds what is missing in the usual places (the pip wheels' `nvidia/*/lib`
//! folders under every `site-packages` of `python3`, the CUDA toolkit, the driver's folders,
//! folders named in `TESSERA_CUDA_LIB_DIRS`) and, for NCCL, makes a shim folder holding a
//! `libnccl.so` link to the `libnccl.so.2` it found. The binary then re-executes itself with
//! those folders in front of `LD_LIBRARY_PATH` (glibc reads the variable only at start-up).

use std::path::{Path, PathBuf};

use super::CudaError;

/// The libraries the CUDA layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lib {
    /// The CUDA driver API, `libcuda.so.1` (installed with the NVIDIA driver).
    Driver,
    /// The run-time compiler, `libnvrtc.so.13`.
    Nvrtc,
    /// cuBLAS, `libcublas.so.13` (with `libcublasLt.so.13` beside it).
    Cublas,
    /// NCCL, `libnccl.so.2`.
    Nccl,
}

impl Lib {
    /// All libraries, in the order they are probed.
    pub const ALL: [Lib; 4] = [Lib::Driver, Lib::Nvrtc, Lib::Cublas, Lib::Nccl];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Lib::Driver => "CUDA driver",
            Lib::Nvrtc => "NVRTC",
            Lib::Cublas => "cuBLAS",
            Lib::Nccl => "NCCL",
        }
    }

    /// The file a CUDA 13 installation provides.
    pub fn file(self) -> &'static str {
        match self {
            Lib::Driver => "libcuda.so.1",
            Lib::Nvrtc => "libnvrtc.so.13",
            Lib::Cublas => "libcublas.so.13",
            Lib::Nccl => "libnccl.so.2",
        }
    }

    /// File names searched for by [`plan_loader_path`], preferred first.
    pub fn search_names(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so.1", "libcuda.so"],
            Lib::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so"],
            Lib::Cublas => &["libcublas.so.13", "libcublas.so"],
            Lib::Nccl => &["libnccl.so", "libnccl.so.2"],
        }
    }

    /// What to do when the library is missing.
    pub fn fix(self) -> &'static str {
        match self {
            Lib::Driver => {
                "this machine has no NVIDIA driver (or no GPU is visible): run on a machine with \
                 an NVIDIA GPU and driver >= 580 (CUDA 13), or put the folder holding \
                 libcuda.so.1 on LD_LIBRARY_PATH"
            }
            Lib::Nvrtc => {
                "pip install nvidia-cuda-nvrtc==13.0.88 (or install the CUDA 13 toolkit), or set \
                 LD_LIBRARY_PATH / TESSERA_CUDA_LIB_DIRS to the folder holding libnvrtc.so.13 \
                 (for the wheel: <site-packages>/nvidia/cu13/lib)"
            }
            Lib::Cublas => {
                "pip install nvidia-cublas (CUDA 13), or set LD_LIBRARY_PATH / \
                 TESSERA_CUDA_LIB_DIRS to the folder holding libcublas.so.13"
            }
            Lib::Nccl => {
                "pip install nvidia-nccl-cu13, or set TESSERA_CUDA_LIB_DIRS to the folder \
                 holding libnccl.so.2 (tessera links it as libnccl.so in a shim folder and \
                 re-executes itself), or put a folder with a libnccl.so on LD_LIBRARY_PATH"
            }
        }
    }

    /// Whether cudarc can open the library now (by the names it tries).
    pub fn present(self) -> bool {
        // SAFETY: `is_culib_present` only dlopens (and closes) candidate file names; the
        // libraries' initialisers are the vendor's and run on any dlopen of them.
        unsafe {
            match self {
                Lib::Driver => cudarc::driver::sys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
                Lib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// `Ok` when `lib` loads, else [`CudaError::LibraryMissing`] with the fix. Call before any
/// cudarc function of that library (cudarc panics on a missing library).
pub fn require(lib: Lib) -> Result<(), CudaError> {
    if lib.present() {
        Ok(())
    } else {
        Err(CudaError::LibraryMissing { lib: lib.name(), file: lib.file(), fix: lib.fix() })
    }
}

/// What [`plan_loader_path`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderPlan {
    /// Folders to put in front of `LD_LIBRARY_PATH` (shim folder first), without duplicates.
    pub dirs: Vec<PathBuf>,
    /// For each library that did not load: where it was found, or `None`.
    pub found: Vec<(Lib, Option<PathBuf>)>,
}

impl LoaderPlan {
    /// True when re-executing with [`LoaderPlan::dirs`] could make a missing library loadable.
    pub fn helps(&self) -> bool {
        self.found.iter().any(|(_, p)| p.is_some())
    }

    /// `LD_LIBRARY_PATH` with the plan's folders in front of `old`.
    pub fn ld_library_path(&self, old: Option<&std::ffi::OsStr>) -> std::ffi::OsString {
        let mut parts: Vec<PathBuf> = self.dirs.clone();
        if let Some(old) = old {
            parts.extend(std::env::split_paths(old).filter(|p| !p.as_os_str().is_empty()));
        }
        std::env::join_paths(parts).unwrap_or_default()
    }
}

/// Folders where CUDA libraries are usually found, most specific first: `TESSERA_CUDA_LIB_DIRS`,
/// the pip wheels' `nvidia/*/lib` under `python3`'s site-packages (and under `PYTHONPATH`),
/// `CUDA_HOME`/`CUDA_PATH`, the toolkit and the driver folders.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("TESSERA_CUDA_LIB_DIRS") {
        dirs.extend(std::env::split_paths(&v));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("PYTHONPATH") {
        roots.extend(std::env::split_paths(&v));
    }
    roots.extend(python_site_dirs());
    for root in roots {
        dirs.extend(wheel_lib_dirs(&root));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            let p = PathBuf::from(v);
            dirs.push(p.join("lib64"));
            dirs.push(p.join("lib"));
        }
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// `<root>/nvidia/*/lib` (the layout of NVIDIA's pip wheels: `nvidia/cu13/lib`,
/// `nvidia/nccl/lib`, ...), sorted.
pub fn wheel_lib_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(root.join("nvidia")) else { return Vec::new() };
    let mut out: Vec<PathBuf> =
        rd.filter_map(|e| e.ok()).map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
    out.sort();
    out
}

/// `site-packages` folders of `python3` (empty when there is no python3 or it fails).
fn python_site_dirs() -> Vec<PathBuf> {
    let py = std::env::var_os("TESSERA_PYTHON").unwrap_or_else(|| "python3".into());
    let out = std::process::Command::new(py)
        .args([
            "-c",
            "import site, sys\n\
             for p in site.getsitepackages() + [site.getusersitepackages()] + sys.path: print(p)",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// The first of `names` that exists in the first folder of `dirs` holding any of them.
pub fn find_in(dirs: &[PathBuf], names: &[&str]) -> Option<PathBuf> {
    dirs.iter().find_map(|d| names.iter().map(|n| d.join(n)).find(|p| p.exists()))
}

/// For every library in `libs` that does not load now, looks for it in [`search_dirs`] and
/// returns the folders that would make it loadable. For NCCL found only as `libnccl.so.2`,
/// creates `shim_dir` (if needed) with a `libnccl.so` symlink to it and lists `shim_dir` first.
pub fn plan_loader_path(libs: &[Lib], shim_dir: &Path) -> Result<LoaderPlan, CudaError> {
    let missing: Vec<Lib> = libs.iter().copied().filter(|l| !l.present()).collect();
    let mut plan = LoaderPlan::default();
    if missing.is_empty() {
        return Ok(plan);
    }
    let dirs = search_dirs();
    for lib in missing {
        let found = find_in(&dirs, lib.search_names());
        if let Some(path) = &found {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let is_nccl_so2 = lib == Lib::Nccl
                && path.file_name().is_some_and(|n| n == "libnccl.so.2")
                && !dir.join("libnccl.so").exists();
            if is_nccl_so2 {
                make_link(shim_dir, "libnccl.so", path)?;
                push_unique(&mut plan.dirs, shim_dir.to_path_buf());
            }
            push_unique(&mut plan.dirs, dir);
        }
        plan.found.push((lib, found));
    }
    // The shim folder goes first.
    if let Some(i) = plan.dirs.iter().position(|d| d == shim_dir) {
        let d = plan.dirs.remove(i);
        plan.dirs.insert(0, d);
    }
    Ok(plan)
}

fn push_unique(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

/// `dir/name` -> `target` (replacing a stale link).
fn make_link(dir: &Path, name: &str, target: &Path) -> Result<(), CudaError> {
    let io = |what: &str, e: std::io::Error| {
        CudaError::Invalid(format!(
            "{what} {}: {e} (set TESSERA_CUDA_SHIM_DIR to a writable folder)",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("cannot create the NCCL shim folder", e))?;
    let link = dir.join(name);
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target, &link)
        .map_err(|e| io("cannot create the libnccl.so link in", e))
}

/// The default shim folder: `$TESSERA_CUDA_SHIM_DIR`, else `<tmp>/tessera-cuda-shim-<uid>`.
pub fn default_shim_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TESSERA_CUDA_SHIM_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("tessera-cuda-shim-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_layout_is_found_and_nccl_gets_a_shim_link() {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("nvidia/nccl/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(root.path().join("nvidia/cu13/lib")).unwrap();
        std::fs::write(lib.join("libnccl.so.2"), b"not really a library").unwrap();
        let dirs = wheel_lib_dirs(root.path());
        assert_eq!(dirs, vec![root.path().join("nvidia/cu13/lib"), lib.clone()]);
        assert_eq!(find_in(&dirs, Lib::Nccl.search_names()), Some(lib.join("libnccl.so.2")));
        let shim = root.path().join("shim");
        make_link(&shim, "libnccl.so", &lib.join("libnccl.so.2")).unwrap();
        assert_eq!(std::fs::read_link(shim.join("libnccl.so")).unwrap(), lib.join("libnccl.so.2"));
        // Idempotent, and a stale link is replaced.
        make_link(&shim, "libnccl.so", &lib.join("libnccl.so.2")).unwrap();
        make_link(&shim, "libnccl.so", &lib.join("other")).unwrap();
        assert_eq!(std::fs::read_link(shim.join("libnccl.so")).unwrap(), lib.join("other"));
    }

    #[test]
    fn ld_library_path_puts_plan_dirs_first() {
        let plan = LoaderPlan {
            dirs: vec![PathBuf::from("/a"), PathBuf::from("/b")],
            found: vec![(Lib::Nccl, Some(PathBuf::from("/b/libnccl.so.2")))],
        };
        assert!(plan.helps());
        assert_eq!(plan.ld_library_path(Some("/c::/d".as_ref())), "/a:/b:/c:/d");
        assert_eq!(plan.ld_library_path(None), "/a:/b");
    }

    #[test]
    fn missing_library_error_names_library_and_fix() {
        let e = CudaError::LibraryMissing {
            lib: Lib::Nccl.name(),
            file: Lib::Nccl.file(),
            fix: Lib::Nccl.fix(),
        };
        let s = e.to_string();
        assert!(s.contains("libnccl.so.2") && s.contains("pip install nvidia-nccl-cu13"), "{s}");
    }
}
