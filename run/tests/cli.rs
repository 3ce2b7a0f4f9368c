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
fn zero_threads_are_refused_and_too_many_capped_with_a_warning() {
    fails_with(
        &["--token-ids", "1,2", "--threads", "0"],
        "0 threads: the thread count must be at least 1",
    );
    // 100000 used to hang creating threads, 1000 to make a 0.8 s run take 56 s.
    let max = dlo_runtime::options::max_threads();
    let o = dlo_run(&["--token-ids", "1,2", "--max-tokens", "2", "--threads", "100000"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("warning: --threads: 100000 threads requested; using {max}")),
        "{err}"
    );
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

/// A dump whose rename fails (the destination is a directory) is an error naming it and leaves no temporary
/// file; one that succeeds leaves only the dump.
#[test]
fn dump_is_written_atomically() {
    let dir = std::env::temp_dir().join(format!("dlo-run-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("taken")).unwrap();
    let taken = dir.join("taken");
    let o = dlo_run(&["--token-ids", "1,2,3", "--dump", taken.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("taken"), "{err}");
    let ok = dir.join("d.safetensors");
    let o = dlo_run(&["--token-ids", "1,2,3", "--dump", ok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["d.safetensors", "taken"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_carry_no_backtrace_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    // A GGUF header with an absurd tensor count: candle's reader fails (and would attach a backtrace).
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dlo-run"))
        .arg(&path)
        .args(["--token-ids", "1,2"])
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("x.gguf: invalid GGUF file"), "{err}");
    assert!(!err.contains("candle_core::") && !err.contains("   0: "), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn max_tokens_zero_means_no_limit_and_bench_counts_must_be_positive() {
    // The fixture's context is short: with no limit, generation stops when it is full, not after 1 token.
    let o = dlo_run(&["--token-ids", "1,2", "--max-tokens", "0", "--stats"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("generated 255 tokens") && err.contains("stop: ContextFull"),
        "{err}"
    );
    for flag in ["--gen-tokens", "--prompt-tokens"] {
        fails_with(&["--bench", flag, "0"], "must be at least 1");
    }
}
