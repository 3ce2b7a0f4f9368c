//! The C example (examples/c/main.c), built with the system C compiler against libdlo.a, and the Python
//! ctypes example (examples/python/generate.py) against libdlo.so, print what `dlo-run` prints with the
//! same settings. `dlo-run`'s printing is reproduced in-process here; when `DLO_RUN` names a dlo-run
//! binary (scripts/check-c-example.sh sets it), its output is compared too.

use crate::generation::reference;
use crate::support::tiny::Tiny;
use crate::support::*;
use dlo_runtime::chat::Message;
use dlo_runtime::generate::{GenerateParams, Generator, SamplingParams};
use dlo_runtime::model::Routing;
use dlo_runtime::testing::{found_or_skip, smollm2_gguf};
use dlo_runtime::{Checkpoint, Model, RuntimeOptions, Tokenizer};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;

/// target/<profile>/deps: where `cargo test` builds libdlo.a and libdlo.so next to this test binary (it
/// copies them up to target/<profile> only for `cargo build`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compiles examples/c/main.c into `dir` (static link) and returns the executable.
pub fn build_c_example(dir: &Path) -> PathBuf {
    let lib = lib_dir().join("libdlo.a");
    assert!(
        lib.is_file(),
        "{} is missing: cargo builds it with the dlo-capi tests",
        lib.display()
    );
    let exe = dir.join("dlo-example");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root().join("include"))
        .arg("-o")
        .arg(&exe)
        .arg(root().join("examples/c/main.c"))
        .arg(&lib)
        // libstdc++ only where libdlo was built with the `tensorrt` feature (its TensorRT bindings are C++)
        .args(["-lpthread", "-ldl", "-lm", "-Wl,--as-needed", "-lstdc++"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        out.status.success(),
        "compiling examples/c/main.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a command and returns its stdout, asserting success.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `dlo-run`'s output for the same arguments, when `DLO_RUN` names the binary.
fn dlo_run(args: &[&str]) -> Option<String> {
    let bin = std::env::var_os("DLO_RUN")?;
    Some(run(Command::new(bin).args(args)))
}

/// The Python example's output, when python3 is installed (see `found_or_skip`).
fn python(args: &[&str]) -> Option<String> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let installed = Command::new(&py).arg("--version").output().is_ok().then_some(());
    found_or_skip(
        installed,
        &format!("{py} for the Python example (set PYTHON)"),
        "apt-get install python3",
    )?;
    Some(run(Command::new(py)
        .arg(root().join("examples/python/generate.py"))
        .args(args)
        .env("DLO_LIB", lib_dir().join("libdlo.so"))))
}

#[test]
fn c_and_python_examples_print_what_dlo_run_prints_on_a_tiny_routed_model() {
    let (_d, path) = tiny_checkpoint(Tiny {
        layer_skip: true,
        seed: 9,
        ..Default::default()
    });
    let tmp = tempfile::tempdir().unwrap();
    let exe = build_c_example(tmp.path());
    let p = path.to_str().unwrap();
    let ids = "4,8,15,16,23,42";
    let args = [p, "--token-ids", ids, "--max-tokens", "24"];
    // dlo-run without a tokenizer prints each id followed by a space, then a newline.
    let (want, _) = reference(
        &path,
        &[4, 8, 15, 16, 23, 42],
        24,
        SamplingParams::default(),
        Routing::Reference,
    );
    let want: String = want.tokens.iter().map(|t| format!("{t} ")).collect::<String>() + "\n";
    assert_eq!(run(Command::new(&exe).args(args)), want);
    if let Some(got) = dlo_run(&args) {
        assert_eq!(got, want, "dlo-run");
    }
    if let Some(got) = python(&args) {
        assert_eq!(got, want, "examples/python/generate.py");
    }
    // With --stats: counters on stderr, the same stdout.
    let out = Command::new(&exe).args(args).arg("--stats").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("matmul FLOPs") && err.contains("layer execution rates"),
        "{err}"
    );
    // A file that is not a model: exit status 1 and the library's message.
    let out = Command::new(&exe).arg(root().join("Cargo.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Cargo.toml") && err.contains("DLO_ERR_FORMAT"), "{err}");
}

/// `dlo-run MODEL --prompt TEXT --chat --max-tokens N`, reproduced: render one user turn, encode without
/// special tokens, generate greedily with the config's and tokenizer's EOS ids, print the decoded text as
/// it completes, then a newline.
fn dlo_run_chat(path: &Path, text: &str, max_tokens: usize) -> String {
    let ck = Checkpoint::open(path).unwrap();
    let tok = ck.tokenizer.as_ref().expect("tokenizer");
    let rendered = tok
        .chat_template
        .as_ref()
        .expect("chat template")
        .render(&[Message::new("user", text)], true)
        .unwrap();
    let prompt = tok.encode(&rendered, false).unwrap();
    // As dlo-run and the C ABI load it by default: a quantized GGUF runs in its blocks.
    let m = Model::load_opts(&ck.config, &ck.weights, &RuntimeOptions::default()).unwrap();
    let mut stop_tokens = ck.config.eos_token_ids.clone();
    stop_tokens.extend(&tok.eos_token_ids);
    let params = GenerateParams {
        max_tokens,
        stop_tokens,
        ..Default::default()
    };
    let out = Generator::new(&m, params)
        .unwrap()
        .generate(&prompt, |_| ControlFlow::Continue(()))
        .unwrap();
    dlo_run_print(Some(tok), &out.tokens)
}

/// What dlo-run prints for generated `tokens`: without a tokenizer each id and a space; with one, the text
/// as streamed (decode everything so far, print the new part unless it ends in U+FFFD); then a newline.
fn dlo_run_print(tok: Option<&Tokenizer>, tokens: &[u32]) -> String {
    let Some(tok) = tok else {
        return tokens.iter().map(|t| format!("{t} ")).collect::<String>() + "\n";
    };
    let (mut printed, mut text) = (0, String::new());
    for i in 1..=tokens.len() {
        let t = tok.decode(&tokens[..i], true).unwrap();
        if !t.ends_with('\u{fffd}') && t.len() >= printed {
            text.push_str(&t[printed..]);
            printed = t.len();
        }
    }
    text + "\n"
}

#[test]
fn c_example_prints_what_dlo_run_prints_on_smollm2_token_ids() {
    let Some(gguf) = smollm2_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let exe = build_c_example(tmp.path());
    let ck = Checkpoint::open(&gguf).unwrap();
    let ids = [3000u32, 4000, 5000, 600, 700, 800, 9000];
    let m = Model::load_opts(&ck.config, &ck.weights, &RuntimeOptions::default()).unwrap();
    let mut stop_tokens = ck.config.eos_token_ids.clone();
    if let Some(t) = &ck.tokenizer {
        stop_tokens.extend(&t.eos_token_ids);
    }
    let params = GenerateParams {
        max_tokens: 24,
        stop_tokens,
        ..Default::default()
    };
    let out = Generator::new(&m, params)
        .unwrap()
        .generate(&ids, |_| ControlFlow::Continue(()))
        .unwrap();
    assert!(
        out.tokens.len() >= 8,
        "a longer continuation makes a stronger check: {:?}",
        out.tokens
    );
    let want = dlo_run_print(ck.tokenizer.as_ref(), &out.tokens);
    let id_arg = "3000,4000,5000,600,700,800,9000";
    let args = [gguf.to_str().unwrap(), "--token-ids", id_arg, "--max-tokens", "24"];
    assert_eq!(run(Command::new(&exe).args(args)), want);
    assert_eq!(run(Command::new(&exe).args(args).args(["--threads", "2"])), want);
    if let Some(got) = dlo_run(&args) {
        assert_eq!(got, want, "dlo-run");
    }
}

#[test]
fn c_and_python_examples_print_what_dlo_run_prints_on_smollm2_gguf() {
    let Some(gguf) = smollm2_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let exe = build_c_example(tmp.path());
    let q = "What is the capital of France?";
    let args = [gguf.to_str().unwrap(), q, "--chat", "--max-tokens", "32"];
    let want = dlo_run_chat(&gguf, q, 32);
    // The Q4_1 file's own weights, run in their blocks, start llama.cpp's greedy answer (llama-completion
    // --temp 0 on the same file and prompt: "L'Étoile, la Marseillaise, …"; later tokens follow the float
    // summation order); the same weights dequantized say "Paris" by a margin of 0.08 logits, which 8-bit
    // activations flip.
    assert!(want.starts_with("L'Étoile"), "{want}");
    assert_eq!(run(Command::new(&exe).args(args)), want);
    if let Some(got) = dlo_run(&[args[0], "--prompt", q, "--chat", "--max-tokens", "32"]) {
        assert_eq!(got, want, "dlo-run");
    }
    if let Some(got) = python(&args) {
        assert_eq!(got, want, "examples/python/generate.py");
    }
}
