//! Stamps the git commit the binary is built from into `tessera --version` ("0.1.0 (c6a387c)",
//! "-dirty" when tracked files differ from it), so that a benchmark figure can name the build
//! that produced it. Outside a git checkout, or without git, the commit reads "unknown".
use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(root).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rev = git(&root, &["rev-parse", "--short=7", "HEAD"]);
    let dirty = git(&root, &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|s| !s.is_empty());
    let stamp = match rev {
        Some(r) if dirty => format!("{r}-dirty"),
        Some(r) => r,
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=TESSERA_VERSION={} ({stamp})", env!("CARGO_PKG_VERSION"));
    // Run again when HEAD moves or a tracked source changes (for the dirty mark). Only paths
    // that exist: cargo reruns a build script on every build for a missing one.
    let mut watch = Vec::new();
    if let Some(dir) = git(&root, &["rev-parse", "--git-dir"]) {
        watch.extend(["HEAD", "index"].map(|f| root.join(&dir).join(f)));
    }
    if let Some(dir) = git(&root, &["rev-parse", "--git-common-dir"]) {
        watch.extend(["refs/heads", "packed-refs"].map(|f| root.join(&dir).join(f)));
    }
    for p in watch.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    for d in ["Cargo.toml", "proto", "coordinator", "collectives", "rank", "launch/src"] {
        println!("cargo:rerun-if-changed={}", root.join(d).display());
    }
}
