//! Tests for `dlo-compile import`: round trips through the written HF directory, dtype conversion, tied and
//! routed checkpoints, refusal to overwrite, no output on failure, and the real SmolLM2 GGUF.

use super::*;
use dlo_runtime::testing::{
    max_abs_diff, randn_tensors, smollm2_gguf, tiny_hf_config_json, write_hf_checkpoint, Tensors,
};

/// The runtime tests' tiny HF config plus a key the import does not know and must keep.
fn tiny_config_json() -> Value {
    let mut v = tiny_hf_config_json();
    v["source_note"] = json!("kept");
    v
}

/// Writes a random HF checkpoint for `v` into `dir`; returns its tensors.
fn write_hf(dir: &Path, v: &Value) -> Tensors {
    let t = randn_tensors(&ModelConfig::from_hf_json(v, Path::new("config.json")).unwrap());
    write_hf_checkpoint(dir, v, &t).unwrap();
    t
}

/// The config as it should come back from an import (only `torch_dtype` is set by the import).
fn same_config(src: &ModelConfig, out: &ModelConfig, dtype: DType) {
    let mut want = src.clone();
    want.torch_dtype = Some(torch_dtype(dtype).to_string());
    assert_eq!(&want, out);
}

/// Imports `src` to `out` and asserts the reopened output has the same config and exactly the same
/// tensors (after conversion to `dtype`).
fn import_and_compare(src: &Path, out: &Path, dtype: DType) -> Checkpoint {
    let a = Checkpoint::open(src).unwrap();
    import_checkpoint(&a, out, dtype).unwrap();
    let b = Checkpoint::open(out).unwrap();
    same_config(&a.config, &b.config, dtype);
    let names = b.weights.names();
    assert_eq!(names.len(), expected_tensors(&a.config).len(), "{names:?}");
    for (name, shape) in expected_tensors(&a.config) {
        assert_eq!(
            b.weights.storage_dtype(&name).as_deref(),
            Some(dtype.as_str()),
            "{name}"
        );
        let x = a
            .weights
            .get(&name, &shape, dtype, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let y = b.weights.get(&name, &shape, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&x, &y), 0.0, "{name}");
    }
    b
}

/// The `__metadata__` of a safetensors file.
fn st_metadata(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn import_hf_round_trip_f32_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config_json());
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let out = tmp.path().join(format!("out-{}", dtype.as_str()));
        let b = import_and_compare(&src, &out, dtype);
        assert_eq!(b.config.extra["source_note"], json!("kept"));
        assert_eq!(st_metadata(&out.join("model.safetensors")), json!({"format": "pt"}));
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], json!(torch_dtype(dtype)));
        assert_eq!(cfg["architectures"], json!(["LlamaForCausalLM"]));
    }
    // Converting really happened: bf16 differs from f32 for random values.
    let a = Checkpoint::open(&tmp.path().join("out-f32")).unwrap();
    let b = Checkpoint::open(&tmp.path().join("out-bf16")).unwrap();
    let n = "model.norm.weight";
    let x = a.weights.get(n, &[16], DType::F32, &Device::Cpu).unwrap();
    let y = b.weights.get(n, &[16], DType::F32, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&x, &y) > 0.0);
}

#[test]
fn import_tied_writes_no_lm_head() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut v = tiny_config_json();
    v["tie_word_embeddings"] = json!(true);
    let mut t = write_hf(&src, &v);
    // A stray copy of the head in the source is dropped, not written.
    t.insert("lm_head.weight".into(), t["model.embed_tokens.weight"].clone());
    candle_core::safetensors::save(&t, src.join("model.safetensors")).unwrap();
    let out = tmp.path().join("out");
    let b = import_and_compare(&src, &out, DType::F32);
    assert!(b.config.tie_word_embeddings);
    assert!(!b.weights.contains("lm_head.weight"));
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], json!(true));
}

#[test]
fn import_passes_dlo_routers_through() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut v = tiny_config_json();
    v["model_type"] = json!("llama_dlo_exattn");
    v["is_dlo"] = json!([true, true]);
    v["dlo_capacity"] = json!([0.7, 0.9]);
    write_hf(&src, &v);
    let b = import_and_compare(&src, &tmp.path().join("out"), DType::F32);
    assert!(b.weights.contains("model.routers.0.weight") && b.weights.contains("model.routers.1.weight"));
    assert_eq!(b.config.dlo.as_ref().unwrap().capacity.of_layer(1), 0.9);
}

#[test]
fn import_refuses_an_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config_json());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let plan = ImportPlan {
        src: src.clone(),
        output: out.clone(),
        dtype: DType::F32,
    };
    let msg = dlo_runtime::error::report(&run(plan).unwrap_err());
    assert!(
        msg.contains(&out.display().to_string()) && msg.contains("already exists"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn failing_midway_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut seen = None;
    let err = write_dir_atomically(&out, |dir| {
        std::fs::write(dir.join("model.safetensors"), b"half").unwrap();
        seen = Some(dir.to_path_buf());
        Err(Error::format(
            dir.join("model.safetensors"),
            "simulated failure while writing",
        ))
    })
    .unwrap_err();
    assert!(err.to_string().contains("simulated failure"), "{err}");
    let seen = seen.unwrap();
    assert!(
        seen.file_name().unwrap().to_str().unwrap().starts_with(".out.tmp-"),
        "{}",
        seen.display()
    );
    assert!(!seen.exists() && !out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // The same helper does create the directory when `fill` succeeds.
    write_dir_atomically(&out, |dir| {
        std::fs::write(dir.join("a"), b"x").map_err(|e| Error::io(dir, e))
    })
    .unwrap();
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"x");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn import_of_a_bad_source_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config_json());
    let st = src.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = tmp.path().join("out");
    let plan = ImportPlan {
        src,
        output: out.clone(),
        dtype: DType::BF16,
    };
    let msg = dlo_runtime::error::report(&run(plan).unwrap_err());
    assert!(
        msg.contains(&st.display().to_string()) && msg.contains("truncated"),
        "{msg}"
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn import_smollm2_gguf_reopens_identically() {
    let Some(gguf) = smollm2_gguf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let b = import_and_compare(&gguf, &out, DType::F32);
    assert!(b.config.tie_word_embeddings && !b.weights.contains("lm_head.weight"));
    assert_eq!((b.config.num_hidden_layers, b.config.vocab_size), (30, 49152));
    let tok = b.tokenizer.as_ref().expect("the GGUF's tokenizer is imported");
    let a = Checkpoint::open(&gguf).unwrap();
    let text = "The capital of France is Paris. 1234 <|im_start|>";
    let want = a.tokenizer.as_ref().unwrap().encode(text, true).unwrap();
    assert_eq!(tok.encode(text, true).unwrap(), want);
    assert!(out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file());
}

#[test]
fn import_writes_tokenizer_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config_json());
    let special = |id: u32, s: &str| {
        json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4},
                  "unk_token": "[UNK]"}
    });
    std::fs::write(src.join("tokenizer.json"), tj.to_string()).unwrap();
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}";
    let tc = json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true, "chat_template": template});
    std::fs::write(src.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let a = Checkpoint::open(&src).unwrap();
    let tok = a
        .tokenizer
        .as_ref()
        .expect("Tokenizer::from_hf_dir reads tokenizer.json");
    let out = tmp.path().join("out");
    import_checkpoint(&a, &out, DType::F32).unwrap();
    let tc: Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["bos_token"], json!("<s>"));
    assert_eq!(tc["eos_token"], json!("</s>"));
    assert_eq!(tc["add_bos_token"], json!(true));
    assert_eq!(tc["chat_template"], json!(template));
    assert_eq!(tc["model_max_length"], json!(64));
    // transformers' PreTrainedTokenizerFast adds BOS through the post-processor.
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tj["post_processor"]["type"], json!("TemplateProcessing"));
    let b = Checkpoint::open(&out).unwrap();
    let tok_b = b.tokenizer.as_ref().expect("the imported directory has a tokenizer");
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(tok_b.encode("hello world", true).unwrap(), ids);
    assert_eq!(tok_b.eos_token_ids, tok.eos_token_ids);
}

#[test]
fn import_args_become_a_plan_and_warnings_come_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config_json());
    let out = tmp.path().join("out");
    let args = ImportArgs {
        src: src.clone(),
        output: out.clone(),
        dtype: "bf16".into(),
    };
    let plan = args.plan().unwrap();
    assert_eq!(plan.dtype, DType::BF16);
    let bad = ImportArgs {
        dtype: "q4".into(),
        ..args
    };
    assert!(bad.plan().unwrap_err().to_string().contains("unsupported --dtype `q4`"));
    let import = Import::open(plan).unwrap();
    let w = import.warnings();
    assert!(
        w.len() == 1 && w[0].ends_with("no tokenizer; the output will have none"),
        "{w:?}"
    );
    assert!(!out.exists(), "opening writes nothing");
    let r = import.write().unwrap();
    assert_eq!((r.output.as_path(), r.dtype), (out.as_path(), DType::BF16));
    assert_eq!(r.tensors, Checkpoint::open(&out).unwrap().weights.names().len());
    let e = Import::open(ImportPlan {
        src: tmp.path().join("missing"),
        output: tmp.path().join("out2"),
        dtype: DType::F32,
    })
    .err()
    .unwrap();
    assert!(matches!(e, ImportError::Open { .. }), "{e}");
    assert!(e.to_string().starts_with("cannot import "), "{e}");
}
