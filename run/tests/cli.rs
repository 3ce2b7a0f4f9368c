//! `dlo-run`'s runtime options on the command line: bad values are clear errors, never a hang or a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn dlo_run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlo-run"))
        .arg(fixture("dlo_mlp"))
        .args(args)
        .output()
        .expect("spawn dlo-run")
}

fn fails_with(args: &[&str], needle: &str) {
    let o = dlo_run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn out_of_range_threads_are_refused_before_any_thread_starts() {
    fails_with(
        &["--token-ids", "1,2", "--threads", "0"],
        "0 threads: the thread count must be between 1 and 1024",
    );
    // 100000 used to hang creating threads.
    fails_with(&["--token-ids", "1,2", "--threads", "100000"], "100000 threads");
}

#[test]
fn devices_are_parsed_and_unavailable_ones_named() {
    fails_with(
        &["--token-ids", "1,2", "--device", "tpu"],
        "device `tpu` is not `cpu`, `cuda` or `cuda:N`",
    );
    fails_with(
        &["--token-ids", "1,2", "--device", "cuda:1"],
        "device cuda:1: cannot open it",
    );
    let o = dlo_run(&[
        "--token-ids",
        "1,2",
        "--max-tokens",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// f64 is a verification dtype; generation used to stop with "unexpected dtype, expected: F32, got: F64".
#[test]
fn f64_generates_the_f32_tokens() {
    let gen = |dtype: &str| {
        let o = dlo_run(&["--token-ids", "1,5,9,2,7", "--max-tokens", "6", "--dtype", dtype]);
        assert!(o.status.success(), "{dtype}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let f32_tokens = gen("f32");
    assert_eq!(f32_tokens.split_whitespace().count(), 6, "{f32_tokens}");
    assert_eq!(gen("f64"), f32_tokens);
}
