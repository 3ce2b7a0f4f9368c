//! Helpers for the end-to-end tests: the workspace's binaries and committed fixtures (real assets are found with
//! `dlo_runtime::testing`, like the libraries' own tests do).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
