//! Files written whole or not at all: checkpoints, shards, safetensors exports and the final
//! parameters. The bytes go to a temporary file beside the target (same directory, so the same
//! filesystem), are fsynced, and the temporary file is renamed over the target; then the
//! directory is fsynced so the rename survives a crash. A reader sees the old file or the new
//! one, never a part; a failed write removes its temporary file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What failed, on which file: `op` reads as "creating", "writing", "fsync of" or "renaming a
/// temporary file onto", followed by the path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct AtomicWriteError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// The temporary file a write to `path` uses: `.NAME.tmpPID` beside it. Stale ones (from a
/// process killed mid-write) start with `.NAME` and contain `.tmp`.
pub fn temporary_path(path: &Path) -> Result<PathBuf, AtomicWriteError> {
    let name = path.file_name().ok_or_else(|| AtomicWriteError {
        op: "writing",
        path: path.to_path_buf(),
        source: std::io::Error::other("the output path has no file name"),
    })?;
    let tmp = format!(".{}.tmp{}", name.to_string_lossy(), std::process::id());
    Ok(parent_dir(path).join(tmp))
}

/// The directory `path` is in ("." for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `path` atomically (see the module's documentation).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    write_atomic_with(path, bytes, || {})
}

/// [`write_atomic`], calling `halfway` after the first half of the bytes is written (where the
/// fault-injection tests kill a process writing a checkpoint).
pub fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    halfway: impl FnOnce(),
) -> Result<(), AtomicWriteError> {
    let tmp = temporary_path(path)?;
    let fail = |op: &'static str, at: &Path| {
        let path = at.to_path_buf();
        move |source| AtomicWriteError { op, path, source }
    };
    let result = (|| {
        let mut f = File::create(&tmp).map_err(fail("creating", &tmp))?;
        let (first, second) = bytes.split_at(bytes.len() / 2);
        f.write_all(first).map_err(fail("writing", &tmp))?;
        halfway();
        f.write_all(second).map_err(fail("writing", &tmp))?;
        f.sync_all().map_err(fail("fsync of", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(fail("renaming a temporary file onto", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&parent_dir(path));
    Ok(())
}

/// Makes renames and deletions in `dir` durable; not every platform lets a directory be opened
/// and synced, so a failure is ignored.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"first").unwrap();
        let mut seen = None;
        write_atomic_with(&path, b"second!", || seen = Some(fs::read(&path).unwrap())).unwrap();
        assert_eq!(seen.as_deref(), Some(&b"first"[..]), "halfway, the old file is still whole");
        assert_eq!(fs::read(&path).unwrap(), b"second!");
        let names: Vec<_> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.bin"], "no temporary file is left");
    }

    #[test]
    fn a_failed_write_names_the_step_and_the_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should go: the rename fails.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        let e = write_atomic(&path, b"x").unwrap_err();
        assert_eq!((e.op, e.path.as_path()), ("renaming a temporary file onto", path.as_path()));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is removed");
        let e = write_atomic(&dir.path().join("missing/x"), b"x").unwrap_err();
        assert_eq!(e.op, "creating");
        let e = write_atomic(Path::new("/"), b"x").unwrap_err();
        assert!(e.source.to_string().contains("no file name"), "{}", e.source);
    }
}
