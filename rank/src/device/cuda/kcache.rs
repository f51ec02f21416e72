//! The on-disk cache of compiled kernels: NVRTC's cubins, keyed by everything that decides
//! their bytes, so that a rank opening its GPU loads them instead of compiling every source
//! again (about 10 s of NVRTC per process on one core, for each rank of a job and each GPU
//! command; a few milliseconds from the cache). Triton's `~/.triton/cache` and the driver's
//! `~/.nv/ComputeCache` do the same for their kernels.
//!
//! - **Where:** `$TESSERA_KERNEL_CACHE_DIR`, else `$XDG_CACHE_HOME/tessera/kernels`, else
//!   `$HOME/.cache/tessera/kernels`. `TESSERA_KERNEL_CACHE_DISABLE=1` turns it off. The folder
//!   may be deleted at any time.
//! - **Key:** SHA-256 of a format version, the source's name and text (common.cuh included),
//!   the architecture, every NVRTC option (the kernel knobs' `-D`s among them) and NVRTC's
//!   version. A changed kernel, knob or NVRTC is a new entry, never a stale hit.
//! - **Safe to share:** an entry is written to a temporary file in the same folder and renamed
//!   into place, so ranks starting together on one node (or nodes sharing a home folder) never
//!   read half a file; the last writer of identical bytes wins. An entry holds the cubin after
//!   a magic and the cubin's SHA-256: one whose digest does not match (truncated, damaged) or
//!   that is not an ELF cubin naming every kernel of its source is ignored and rewritten, and
//!   the caller can [`KernelCache::forget`] one that the driver refuses to load.
//! - **Never fatal:** a folder that cannot be created or written costs the compile it would
//!   have saved, nothing else.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::CudaError;
use super::nvrtc::{Compiled, Defines, KernelSource, compile_with, contains, options, version};

/// Bumped when the key or the entry format changes.
const FORMAT: &str = "tessera-kernel-cache-1";
/// An entry's first bytes; the cubin's SHA-256 follows, then the cubin.
const MAGIC: &[u8; 8] = b"TSKC0001";

/// Where compiled kernels are kept (or nowhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

/// How [`KernelCache::compile`] got its cubin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache.
    Hit,
    /// Compiled, then written to the cache.
    Stored,
    /// Compiled; the cache is off or could not be written.
    Compiled,
}

impl KernelCache {
    /// The cache the environment asks for (see the module's documentation).
    pub fn from_env() -> KernelCache {
        KernelCache::resolve(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
    }

    /// [`KernelCache::from_env`] over any lookup of environment variables.
    pub fn resolve(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> KernelCache {
        if var("TESSERA_KERNEL_CACHE_DISABLE").is_some_and(|v| v != "0") {
            return KernelCache::disabled();
        }
        let dir = var("TESSERA_KERNEL_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tessera/kernels")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/tessera/kernels")));
        KernelCache { dir }
    }

    /// A cache in `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: Some(dir.into()) }
    }

    /// No cache: every compile is NVRTC's.
    pub fn disabled() -> KernelCache {
        KernelCache { dir: None }
    }

    /// The folder, when the cache is on.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The entry's file name for `src` compiled for `arch` with NVRTC options `opts` by NVRTC
    /// `nvrtc` (major, minor).
    pub fn entry_name(
        src: &KernelSource,
        arch: &str,
        opts: &[String],
        nvrtc: (i32, i32),
    ) -> String {
        let mut h = Sha256::new();
        for part in [FORMAT, src.name, src.src, arch, &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1)] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        for o in opts {
            h.update((o.len() as u64).to_le_bytes());
            h.update(o.as_bytes());
        }
        let hex: String = h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}.{arch}.{hex}.cubin", src.name.trim_end_matches(".cu"))
    }

    /// `src` compiled for `arch` with the knobs `defs`: from the cache when it holds a valid
    /// entry, else from NVRTC (and then stored). Errors are NVRTC's only.
    pub fn compile(
        &self,
        src: &KernelSource,
        arch: &str,
        defs: &Defines,
    ) -> Result<(Compiled, Origin), CudaError> {
        let extra = defs.options(src.name);
        let compile = || {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            compile_with(src, arch, &extra)
        };
        let Some(path) = self.entry_path(src, arch, defs)? else {
            return Ok((compile()?, Origin::Compiled));
        };
        if let Some(cubin) = std::fs::read(&path).ok().and_then(|e| unpack(&e, src)) {
            let c = Compiled { name: src.name, arch: arch.to_string(), cubin, log: String::new() };
            return Ok((c, Origin::Hit));
        }
        let c = compile()?;
        let origin = match store(&path, &pack(&c.cubin)) {
            Ok(()) => Origin::Stored,
            Err(e) => {
                tracing::debug!("kernel cache: cannot write {}: {e}", path.display());
                Origin::Compiled
            }
        };
        Ok((c, origin))
    }

    /// Removes the entry of `src` for `arch` and `defs` (for one the driver refused to load).
    pub fn forget(&self, src: &KernelSource, arch: &str, defs: &Defines) {
        if let Ok(Some(p)) = self.entry_path(src, arch, defs) {
            let _ = std::fs::remove_file(p);
        }
    }

    fn entry_path(
        &self,
        src: &KernelSource,
        arch: &str,
        defs: &Defines,
    ) -> Result<Option<PathBuf>, CudaError> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let mut opts = options(arch);
        opts.extend(defs.options(src.name));
        Ok(Some(dir.join(KernelCache::entry_name(src, arch, &opts, version()?))))
    }
}

/// An ELF file naming every kernel of `src`.
fn valid(cubin: &[u8], src: &KernelSource) -> bool {
    cubin.starts_with(b"\x7fELF") && src.kernels.iter().all(|k| contains(cubin, k.as_bytes()))
}

/// An entry: [`MAGIC`], the cubin's SHA-256, the cubin.
fn pack(cubin: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(MAGIC.len() + 32 + cubin.len());
    e.extend_from_slice(MAGIC);
    e.extend_from_slice(&Sha256::digest(cubin));
    e.extend_from_slice(cubin);
    e
}

/// The cubin of a whole, undamaged entry of `src`.
fn unpack(entry: &[u8], src: &KernelSource) -> Option<Vec<u8>> {
    let rest = entry.strip_prefix(MAGIC.as_slice())?;
    if rest.len() < 32 {
        return None;
    }
    let (digest, cubin) = rest.split_at(32);
    (Sha256::digest(cubin).as_slice() == digest && valid(cubin, src)).then(|| cubin.to_vec())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Unique among processes (pid) and among one process's threads (a counter).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::super::libs::Lib;
    use super::super::nvrtc::SOURCES;
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        let pairs: Vec<(String, String)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.into())
    }

    #[test]
    fn the_folder_comes_from_the_environment() {
        let at = |d: &str| KernelCache::at(d);
        let r = KernelCache::resolve;
        assert_eq!(r(env(&[("HOME", "/h")])), at("/h/.cache/tessera/kernels"));
        assert_eq!(r(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")])), at("/x/tessera/kernels"));
        let own = [("HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("TESSERA_KERNEL_CACHE_DIR", "/k")];
        assert_eq!(r(env(&own)), at("/k"));
        let off = [("TESSERA_KERNEL_CACHE_DIR", "/k"), ("TESSERA_KERNEL_CACHE_DISABLE", "1")];
        assert_eq!(r(env(&off)), KernelCache::disabled());
        let on = [("TESSERA_KERNEL_CACHE_DIR", "/k"), ("TESSERA_KERNEL_CACHE_DISABLE", "0")];
        assert_eq!(r(env(&on)), at("/k"));
        assert_eq!(r(env(&[])), KernelCache::disabled(), "no HOME: no cache");
    }

    #[test]
    fn the_key_covers_source_arch_options_and_nvrtc() {
        let s = SOURCES[0];
        let o = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let base = KernelCache::entry_name(&s, "sm_90", &o(&["-a"]), (13, 0));
        assert!(base.starts_with("elementwise.sm_90.") && base.ends_with(".cubin"), "{base}");
        assert_eq!(base, KernelCache::entry_name(&s, "sm_90", &o(&["-a"]), (13, 0)));
        let mut text = s;
        let edited = format!("{} ", s.src);
        text.src = Box::leak(edited.into_boxed_str());
        for other in [
            KernelCache::entry_name(&text, "sm_90", &o(&["-a"]), (13, 0)),
            KernelCache::entry_name(&s, "sm_80", &o(&["-a"]), (13, 0)),
            KernelCache::entry_name(&s, "sm_90", &o(&["-a", "-DX=1"]), (13, 0)),
            KernelCache::entry_name(&s, "sm_90", &o(&["-a-DX=1"]), (13, 0)),
            KernelCache::entry_name(&s, "sm_90", &o(&["-a"]), (13, 1)),
            KernelCache::entry_name(&SOURCES[2], "sm_90", &o(&["-a"]), (13, 0)),
        ] {
            assert_ne!(
                base[base.len() - 38..],
                other[other.len() - 38..],
                "{base} vs {other}: same hash"
            );
        }
    }

    /// NVRTC present, or (outside CI) skip: the same rule as nvrtc.rs's tests.
    fn nvrtc_or_skip() -> bool {
        if Lib::Nvrtc.present() {
            return true;
        }
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "CI=true but libnvrtc.so.13 cannot be loaded: run scripts/check-kernels.sh"
        );
        false
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn a_second_compile_is_a_hit_with_the_same_bytes_and_a_bad_entry_is_rewritten() {
        if !nvrtc_or_skip() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let cache = KernelCache::at(tmp.path().join("kernels"));
        let src = &SOURCES[0];
        let none = Defines::default();
        let (first, o1) = cache.compile(src, "sm_80", &none).unwrap();
        assert_eq!(o1, Origin::Stored);
        let names = files(&tmp.path().join("kernels"));
        assert_eq!(names.len(), 1, "one entry, no temporary file left: {names:?}");
        let t = std::time::Instant::now();
        let (second, o2) = cache.compile(src, "sm_80", &none).unwrap();
        let hit_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(o2, Origin::Hit);
        assert_eq!(first.cubin, second.cubin);
        eprintln!("kernel cache: {} from the cache in {hit_ms:.2} ms", src.name);
        // Another architecture is another entry.
        assert_eq!(cache.compile(src, "sm_90", &none).unwrap().1, Origin::Stored);
        // A truncated, damaged or foreign entry is not used: compiled again and rewritten.
        let entry = tmp.path().join("kernels").join(&names[0]);
        let good = std::fs::read(&entry).unwrap();
        assert_eq!(good, pack(&first.cubin));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let foreign = pack(b"\x7fELF but no kernel names");
        for bad in [&good[..good.len() - 1], &good[..20], &flipped[..], &first.cubin[..], &foreign]
        {
            std::fs::write(&entry, bad).unwrap();
            let (again, o) = cache.compile(src, "sm_80", &none).unwrap();
            assert_eq!(o, Origin::Stored);
            assert_eq!(again.cubin, first.cubin);
            assert_eq!(std::fs::read(&entry).unwrap(), good);
        }
        cache.forget(src, "sm_80", &none);
        assert!(!entry.exists());
        assert_eq!(files(&tmp.path().join("kernels")).len(), 1);
    }

    #[test]
    fn an_unwritable_or_disabled_cache_still_compiles() {
        if !nvrtc_or_skip() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let none = Defines::default();
        let (c, o) =
            KernelCache::at(file.join("kernels")).compile(&SOURCES[2], "sm_80", &none).unwrap();
        assert_eq!(o, Origin::Compiled);
        assert!(valid(&c.cubin, &SOURCES[2]));
        let (_, o) = KernelCache::disabled().compile(&SOURCES[2], "sm_80", &none).unwrap();
        assert_eq!(o, Origin::Compiled);
        assert_eq!(files(tmp.path()), ["a-file"]);
    }

    /// Ranks starting together: each gets a valid cubin and the folder ends with one entry.
    #[test]
    fn concurrent_ranks_share_one_entry() {
        if !nvrtc_or_skip() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let cache = KernelCache::at(tmp.path());
        let none = Defines::default();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.compile(&SOURCES[2], "sm_90", &none).unwrap().0.cubin))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|c| c == &got[0] && valid(c, &SOURCES[2])));
        let names = files(tmp.path());
        assert_eq!(names.len(), 1, "{names:?}");
        assert_eq!(std::fs::read(tmp.path().join(&names[0])).unwrap(), pack(&got[0]));
    }
}
