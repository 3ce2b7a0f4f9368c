//! Tests for checkpoint ingest: HF directories and GGUF files written by the tests themselves, every
//! bad-input case the loader promises to report, and the real SmolLM2 GGUF when it is present.

use super::*;
use crate::testing::{
    self, max_abs_diff, randn_tensors, smollm2_gguf, tiny_hf_config_json, write_hf_checkpoint, Tensors,
};
use crate::weights::expected_tensors;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

fn config_of(v: &serde_json::Value) -> ModelConfig {
    ModelConfig::from_hf_json(v, Path::new("config.json")).unwrap()
}

/// Asserts every tensor of `want` is in `ck` with the same shape and values within `tol`.
fn assert_tensors(ck: &Checkpoint, want: &Tensors, tol: f32) {
    assert_eq!(ck.weights.names().len(), want.len(), "{:?}", ck.weights.names());
    for (name, t) in want {
        let got = ck.weights.get(name, t.dims(), DType::F32, &Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &t.to_dtype(DType::F32).unwrap());
        assert!(d <= f64::from(tol), "{name}: max abs diff {d} > {tol}");
    }
}

fn open_err(path: &Path) -> (Error, String) {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened but should not have", path.display()),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

// ---------------------------------------------------------------- HF directories

#[test]
fn hf_dir_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let cfg = config_of(&v);
    let t = randn_tensors(&cfg);
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.format, SourceFormat::HfDir);
    assert_eq!(ck.config.num_key_value_heads, 2);
    assert_eq!(ck.config.head_dim, 4);
    assert!(ck.report.unused.is_empty(), "{:?}", ck.report.unused);
    assert_tensors(&ck, &t, 0.0);
}

#[test]
fn hf_dir_tied_and_routed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = tiny_hf_config_json();
    v["tie_word_embeddings"] = json!(true);
    v["model_type"] = json!("llama_dlo_exattn");
    v["is_dlo"] = json!([false, true]);
    let cfg = config_of(&v);
    let t = randn_tensors(&cfg);
    assert!(!t.contains_key("lm_head.weight") && t.contains_key("model.routers.1.weight"));
    assert!(!t.contains_key("model.routers.0.weight"));
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_tensors(&ck, &t, 0.0);
    assert!(ck.config.tie_word_embeddings && ck.config.is_routed(1));
}

#[test]
fn hf_dir_sharded_index() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let cfg = config_of(&v);
    let t = randn_tensors(&cfg);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let (mut a, mut b) = (Tensors::new(), Tensors::new());
    let mut map = serde_json::Map::new();
    for (n, x) in &t {
        let shard = if n.contains("layers.1") || n.starts_with("lm_head") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        if shard.contains("00001-") {
            a.insert(n.clone(), x.clone())
        } else {
            b.insert(n.clone(), x.clone())
        };
        map.insert(n.clone(), json!(shard));
    }
    candle_core::safetensors::save(&a, tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_tensors(&ck, &t, 0.0);
}

#[test]
fn hf_dir_index_naming_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let t = randn_tensors(&config_of(&v));
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let map: serde_json::Map<_, _> = t
        .keys()
        .map(|n| {
            (
                n.clone(),
                json!(if n.contains("layers.1") {
                    "model-00002.safetensors"
                } else {
                    "model.safetensors"
                }),
            )
        })
        .collect();
    let index = tmp.path().join("model.safetensors.index.json");
    std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(msg.contains(&index.display().to_string()), "{msg}");
    assert!(msg.contains("`model-00002.safetensors`, which does not exist"), "{msg}");
}

#[test]
fn hf_dir_index_pointing_at_wrong_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let t = randn_tensors(&config_of(&v));
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let mut map: serde_json::Map<_, _> = t.keys().map(|n| (n.clone(), json!("model.safetensors"))).collect();
    map.insert("model.extra.weight".into(), json!("model.safetensors"));
    let index = tmp.path().join("model.safetensors.index.json");
    std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains("model.safetensors.index.json") && msg.contains("`model.extra.weight`"),
        "{msg}"
    );
}

#[test]
fn hf_dir_f16_and_bf16_storage() {
    for dt in [DType::F16, DType::BF16] {
        let tmp = tempfile::tempdir().unwrap();
        let mut v = tiny_hf_config_json();
        v["torch_dtype"] = json!(if dt == DType::F16 { "float16" } else { "bfloat16" });
        let t: Tensors = randn_tensors(&config_of(&v))
            .into_iter()
            .map(|(n, x)| (n, x.to_dtype(dt).unwrap()))
            .collect();
        write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
        let ck = Checkpoint::open(tmp.path()).unwrap();
        assert_eq!(
            ck.weights.storage_dtype("model.norm.weight").as_deref(),
            Some(dt.as_str())
        );
        // Exact: f16/bf16 → f32 is lossless.
        assert_tensors(&ck, &t, 0.0);
    }
}

#[test]
fn hf_dir_unused_tensor_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let mut t = randn_tensors(&config_of(&v));
    t.insert(
        "model.rotary_emb.inv_freq".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let ck = Checkpoint::open(tmp.path()).unwrap();
    assert_eq!(ck.report.unused, vec!["model.rotary_emb.inv_freq".to_string()]);
    assert_eq!(
        ck.report.warnings(),
        vec!["unused tensor `model.rotary_emb.inv_freq`".to_string()]
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    write_hf_checkpoint(tmp.path(), &v, &randn_tensors(&config_of(&v))).unwrap();
    let st = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (e, msg) = open_err(tmp.path());
    assert!(matches!(e, Error::Format { .. }), "{e:?}");
    assert!(
        msg.contains(&st.display().to_string()) && msg.contains("truncated"),
        "{msg}"
    );
    // Truncated inside the header too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(20)
        .unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains(&st.display().to_string()) && msg.contains("past the end of the file"),
        "{msg}"
    );
}

#[test]
fn corrupt_safetensors_header_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), tiny_hf_config_json().to_string()).unwrap();
    let garbage = b"{\"model.norm.weight\": {\"dtype\": nope";
    let mut bytes = (garbage.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(garbage);
    let st = tmp.path().join("model.safetensors");
    std::fs::write(&st, bytes).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains(&st.display().to_string()) && msg.contains("corrupt header"),
        "{msg}"
    );
}

#[test]
fn safetensors_offsets_past_end_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), tiny_hf_config_json().to_string()).unwrap();
    let header = json!({"model.norm.weight": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}});
    let h = header.to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    let st = tmp.path().join("model.safetensors");
    std::fs::write(&st, bytes).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(msg.contains(&st.display().to_string()), "{msg}");
    assert!(
        msg.contains("end at data byte 4000 but the file holds 64 data bytes"),
        "{msg}"
    );
}

#[test]
fn missing_config_key_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let t = randn_tensors(&config_of(&v));
    let mut bad = v.clone();
    bad.as_object_mut().unwrap().remove("intermediate_size");
    write_hf_checkpoint(tmp.path(), &bad, &t).unwrap();
    let (e, msg) = open_err(tmp.path());
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(
        msg.contains("config.json") && msg.contains("missing config key `intermediate_size`"),
        "{msg}"
    );
}

#[test]
fn contradictory_config_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let t = randn_tensors(&config_of(&v));
    let mut bad = v.clone();
    bad["num_key_value_heads"] = json!(3);
    write_hf_checkpoint(tmp.path(), &bad, &t).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(msg.contains("config.json") && msg.contains("contradictory"), "{msg}");
    assert!(msg.contains("num_key_value_heads (3)"), "{msg}");
}

#[test]
fn unknown_hf_architecture_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let t = randn_tensors(&config_of(&v));
    let mut bad = v.clone();
    bad["model_type"] = json!("gpt2");
    write_hf_checkpoint(tmp.path(), &bad, &t).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains("config.json") && msg.contains("unsupported architecture `gpt2`"),
        "{msg}"
    );
}

#[test]
fn tensor_shape_not_matching_config_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let mut t = randn_tensors(&config_of(&v));
    let name = "model.layers.1.self_attn.k_proj.weight";
    t.insert(name.into(), Tensor::zeros((16, 16), DType::F32, &Device::Cpu).unwrap());
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let (e, msg) = open_err(tmp.path());
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    assert!(
        msg.contains(&format!("`{name}` has shape [16, 16], the config implies [8, 16]")),
        "{msg}"
    );
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
}

#[test]
fn missing_tensor_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let mut t = randn_tensors(&config_of(&v));
    t.remove("model.layers.0.mlp.up_proj.weight");
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let (e, msg) = open_err(tmp.path());
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(
        msg.contains("missing tensor `model.layers.0.mlp.up_proj.weight`"),
        "{msg}"
    );
}

#[test]
fn several_problems_are_listed_together_with_a_suggestion() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let mut t = randn_tensors(&config_of(&v));
    let x = t.remove("model.layers.0.mlp.up_proj.weight").unwrap();
    t.insert("model.layers.0.mlp.upproj.weight".into(), x);
    t.remove("model.norm.weight");
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let (e, msg) = open_err(tmp.path());
    assert!(matches!(e, Error::Tensors { .. }), "{e:?}");
    assert!(msg.contains("missing tensor `model.norm.weight`"), "{msg}");
    assert!(
        msg.contains(
            "missing tensor `model.layers.0.mlp.up_proj.weight` (did you mean `model.layers.0.mlp.upproj.weight`?)"
        ),
        "{msg}"
    );
}

#[test]
fn unsupported_safetensors_dtype_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let v = tiny_hf_config_json();
    let mut t = randn_tensors(&config_of(&v));
    t.insert(
        "model.norm.weight".into(),
        Tensor::zeros(16, DType::I64, &Device::Cpu).unwrap(),
    );
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let (e, msg) = open_err(tmp.path());
    assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e:?}");
    assert!(msg.contains("`model.norm.weight`") && msg.contains("i64"), "{msg}");
}

#[test]
fn not_a_checkpoint_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains("not a checkpoint") && msg.contains("no config.json"),
        "{msg}"
    );
    let f = tmp.path().join("weights.bin");
    std::fs::write(&f, b"PK\x03\x04 a zip").unwrap();
    let (_, msg) = open_err(&f);
    assert!(msg.contains("weights.bin") && msg.contains("not a checkpoint"), "{msg}");
    let (e, _) = open_err(&tmp.path().join("absent"));
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    std::fs::write(tmp.path().join("config.json"), tiny_hf_config_json().to_string()).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains("no model.safetensors or model.safetensors.index.json"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- GGUF

/// llama.cpp's HF→GGUF permutation of Q/K rows, written independently of `gguf::permute_qk`:
/// per head, rows (2, head_dim/2) → (head_dim/2, 2).
fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let mut rows = Vec::with_capacity(out);
    let hd = out / n_head;
    for h in 0..n_head {
        for i in 0..hd / 2 {
            rows.push(w.get(h * hd + i).unwrap());
            rows.push(w.get(h * hd + hd / 2 + i).unwrap());
        }
    }
    let t = Tensor::stack(&rows, 0).unwrap();
    assert_eq!(t.dims(), &[out, inp]);
    t
}

/// GGUF names and tensors of `cfg` (Q/K permuted by the independent [`llama_cpp_permute`]).
fn to_gguf_tensors(cfg: &ModelConfig, t: &Tensors, ty: GgmlDType) -> Vec<(String, QTensor)> {
    testing::gguf_tensors(cfg, t, ty, llama_cpp_permute).unwrap()
}

fn llama_metadata(cfg: &ModelConfig) -> Vec<(String, Value)> {
    testing::gguf_metadata(cfg)
}

fn write_gguf(path: &Path, md: &[(String, Value)], tensors: &[(String, QTensor)]) {
    std::fs::write(path, testing::gguf_file_bytes(md, tensors).unwrap()).unwrap();
}

/// A tiny llama GGUF (f32 tensors) plus the HF tensors and config it encodes.
fn tiny_gguf(path: &Path, tied: bool) -> (ModelConfig, Tensors) {
    let mut v = tiny_hf_config_json();
    v["tie_word_embeddings"] = json!(tied);
    // head_dim 8, not 4: with head_dim/2 == 2 the permutation is its own inverse and a mix-up would pass.
    v["head_dim"] = json!(8);
    let cfg = config_of(&v);
    let t = randn_tensors(&cfg);
    write_gguf(path, &llama_metadata(&cfg), &to_gguf_tensors(&cfg, &t, GgmlDType::F32));
    (cfg, t)
}

#[test]
fn gguf_round_trip_undoes_the_qk_permutation() {
    for tied in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        // No .gguf extension: detection is by magic bytes.
        let path = tmp.path().join("model.bin");
        let (cfg, t) = tiny_gguf(&path, tied);
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.format, SourceFormat::Gguf);
        assert_eq!(ck.config.tie_word_embeddings, tied);
        assert_eq!(ck.config, cfg);
        assert_tensors(&ck, &t, 0.0);
    }
}

#[test]
fn gguf_qwen2_keeps_qk_order_and_reads_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qwen.gguf");
    let mut v = tiny_hf_config_json();
    v["model_type"] = json!("qwen2");
    v["tie_word_embeddings"] = json!(true);
    let cfg = config_of(&v);
    assert!(cfg.attention_bias);
    let t = randn_tensors(&cfg);
    let mut ts: Vec<(String, QTensor)> = Vec::new();
    for (name, x) in &t {
        // Qwen2 GGUFs are not permuted: map names only (inverse of `hf_name`).
        let g = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("model.layers.", "blk.")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.o_proj", "attn_output")
            .replace("mlp.gate_proj", "ffn_gate")
            .replace("mlp.up_proj", "ffn_up")
            .replace("mlp.down_proj", "ffn_down")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("input_layernorm", "attn_norm");
        assert_eq!(crate::gguf::hf_name(&g).as_deref(), Some(name.as_str()));
        ts.push((g, QTensor::quantize(x, GgmlDType::F32).unwrap()));
    }
    let md: Vec<(String, Value)> = llama_metadata(&cfg)
        .into_iter()
        .map(|(k, v)| (k.replacen("llama.", "qwen2.", 1), v))
        .map(|(k, v)| {
            if k == "general.architecture" {
                (k, Value::String("qwen2".into()))
            } else {
                (k, v)
            }
        })
        .collect();
    write_gguf(&path, &md, &ts);
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.config, cfg);
    assert_tensors(&ck, &t, 0.0);
}

#[test]
fn permute_and_unpermute_are_inverse_and_match_llama_cpp() {
    let w = Tensor::randn(0f32, 1.0, (3 * 8, 5), &Device::Cpu).unwrap();
    let p = crate::gguf::permute_qk(&w, 3).unwrap();
    assert_eq!(max_abs_diff(&p, &llama_cpp_permute(&w, 3)), 0.0);
    assert!(max_abs_diff(&p, &w) > 0.0);
    assert_eq!(max_abs_diff(&crate::gguf::unpermute_qk(&p, 3).unwrap(), &w), 0.0);
    assert!(crate::gguf::unpermute_qk(&w, 5).is_err());
}

/// A quantized GGUF loaded with the runtime's defaults keeps its projections and embeddings in their blocks
/// (Q/K rows unpermuted like the dense path), and its logits follow the dequantized model's up to the
/// activations' 8-bit quantization; with `dequantize` every weight is dense.
#[test]
fn gguf_quantized_weights_run_in_their_blocks() {
    use crate::model::weight::WeightKind;
    use crate::model::{Batch, Forward};
    use crate::{Model, RuntimeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q.gguf");
    let mut v = tiny_hf_config_json();
    v["hidden_size"] = json!(256);
    v["intermediate_size"] = json!(512);
    v["num_attention_heads"] = json!(4);
    v["num_key_value_heads"] = json!(2);
    v["head_dim"] = json!(64);
    let cfg = config_of(&v);
    let t = randn_tensors(&cfg);
    let t: Tensors = t.into_iter().map(|(n, x)| (n, (x * 0.05).unwrap())).collect();
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    for ty in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        write_gguf(&path, &llama_metadata(&cfg), &to_gguf_tensors(&cfg, &t, ty));
        let ck = Checkpoint::open(&path).unwrap();
        let q = Model::load_opts(&ck.config, &ck.weights, &RuntimeOptions::default()).unwrap();
        let dense = Model::load_opts(
            &ck.config,
            &ck.weights,
            &RuntimeOptions {
                dequantize: true,
                ..RuntimeOptions::default()
            },
        )
        .unwrap();
        assert_eq!(q.layers[0].self_attn.q_proj.weight.kind(), WeightKind::Quantized(ty));
        assert_eq!(q.embed_tokens.kind(), WeightKind::Quantized(ty));
        assert_eq!(
            dense.layers[0].self_attn.q_proj.weight.kind(),
            WeightKind::Dense(DType::F32)
        );
        // The quantized weight holds exactly the values the dense path dequantized (rows in HF order).
        let wq = q.layers[1].self_attn.k_proj.weight.to_dense(DType::F32).unwrap();
        let wd = dense.layers[1].self_attn.k_proj.weight.to_dense(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&wq, &wd), 0.0, "{ty:?}");
        let fwd = Forward {
            all_logits: true,
            ..Forward::default()
        };
        let a = q.forward(&Batch::single(&ids, 0), None, &fwd).unwrap().logits;
        let b = dense.forward(&Batch::single(&ids, 0), None, &fwd).unwrap().logits;
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let d = max_abs_diff(&a, &b);
        assert!(
            d > 0.0 && d < 0.03 * scale,
            "{ty:?}: max |Δlogit| {d} (logit scale {scale})"
        );
    }
}

#[test]
fn gguf_quantized_tensors_dequantize() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q.gguf");
    let mut v = tiny_hf_config_json();
    // Quantized rows need 32 (Q8_0, Q4_*) or 256 (K-quants) elements.
    v["hidden_size"] = json!(256);
    v["intermediate_size"] = json!(256);
    v["num_attention_heads"] = json!(4);
    v["head_dim"] = json!(64);
    let cfg = config_of(&v);
    let t = randn_tensors(&cfg);
    for (ty, tol) in [
        (GgmlDType::Q8_0, 0.05),
        (GgmlDType::Q4_1, 0.6),
        (GgmlDType::Q6K, 0.15),
        (GgmlDType::F16, 0.01),
    ] {
        write_gguf(&path, &llama_metadata(&cfg), &to_gguf_tensors(&cfg, &t, ty));
        let ck = Checkpoint::open(&path).unwrap();
        assert_tensors(&ck, &t, tol);
        let w = &t["model.layers.0.self_attn.k_proj.weight"];
        let got = ck
            .weights
            .get(
                "model.layers.0.self_attn.k_proj.weight",
                w.dims(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let d = max_abs_diff(&got, w);
        assert!(d > 0.0, "{ty:?} should be lossy");
    }
}

#[test]
fn gguf_unknown_architecture_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let cfg = config_of(&tiny_hf_config_json());
    let mut md = llama_metadata(&cfg);
    md[0].1 = Value::String("gpt2".into());
    write_gguf(&path, &md, &to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::F32));
    let (_, msg) = open_err(&path);
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("unknown architecture `gpt2`"), "{msg}");
}

#[test]
fn gguf_missing_metadata_key_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let cfg = config_of(&tiny_hf_config_json());
    let md: Vec<_> = llama_metadata(&cfg)
        .into_iter()
        .filter(|(k, _)| k != "llama.block_count")
        .collect();
    write_gguf(&path, &md, &to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::F32));
    let (_, msg) = open_err(&path);
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("missing GGUF metadata key `llama.block_count`"),
        "{msg}"
    );
}

#[test]
fn gguf_contradictory_metadata_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let cfg = config_of(&tiny_hf_config_json());
    let mut md = llama_metadata(&cfg);
    md.retain(|(k, _)| k != "llama.rope.dimension_count");
    md.push(("llama.attention.head_count_kv".into(), Value::U32(3)));
    md.retain(|(k, v)| !(k == "llama.attention.head_count_kv" && matches!(v, Value::U32(2))));
    write_gguf(&path, &md, &to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::F32));
    let (_, msg) = open_err(&path);
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("num_key_value_heads (3)"),
        "{msg}"
    );
}

#[test]
fn gguf_tensor_shape_not_matching_metadata_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let cfg = config_of(&tiny_hf_config_json());
    let mut md = llama_metadata(&cfg);
    md.push(("llama.feed_forward_length".into(), Value::U32(40)));
    md.retain(|(k, v)| !(k == "llama.feed_forward_length" && matches!(v, Value::U32(24))));
    write_gguf(&path, &md, &to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::F32));
    let (e, msg) = open_err(&path);
    assert!(matches!(e, Error::Tensors { .. }), "{e:?}");
    assert!(
        msg.contains("`model.layers.0.mlp.gate_proj.weight` has shape [24, 16], the config implies [40, 16]"),
        "{msg}"
    );
}

#[test]
fn gguf_unsupported_quantization_type_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let mut v = tiny_hf_config_json();
    v["hidden_size"] = json!(32);
    v["head_dim"] = json!(4);
    let cfg = config_of(&v);
    let mut ts = to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::F32);
    // A type candle knows but cannot dequantize.
    let i = ts.iter().position(|(n, _)| n == "blk.1.ffn_up.weight").unwrap();
    let x = ts[i].1.dequantize(&Device::Cpu).unwrap();
    ts[i].1 = QTensor::quantize(&x, GgmlDType::Q8_1).unwrap();
    write_gguf(&path, &llama_metadata(&cfg), &ts);
    let (e, msg) = open_err(&path);
    assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e:?}");
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("`blk.1.ffn_up.weight`")
            && msg.contains("Q8_1")
            && msg.contains("supported: f32, f16, bf16, q4_0"),
        "{msg}"
    );
}

#[test]
fn gguf_unknown_ggml_type_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let (cfg, _) = tiny_gguf(&path, false);
    // Patch the type of `blk.0.ffn_down.weight` to 16 (IQ2_XXS), which candle does not know.
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.ffn_down.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    assert_eq!(n_dims, 2);
    let ty = at + 4 + 8 * n_dims;
    assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 0);
    bytes[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let (e, msg) = open_err(&path);
    assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e:?}");
    assert!(
        msg.contains("`blk.0.ffn_down.weight`") && msg.contains("IQ2_XXS"),
        "{msg}"
    );
    let _ = cfg;
}

#[test]
fn truncated_gguf_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    tiny_gguf(&path, false);
    let len = std::fs::metadata(&path).unwrap().len();
    // In the tensor data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 200)
        .unwrap();
    let (e, msg) = open_err(&path);
    assert!(matches!(e, Error::Format { .. }), "{e:?}");
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("truncated"),
        "{msg}"
    );
    // In the header.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(300)
        .unwrap();
    let (e, msg) = open_err(&path);
    assert!(matches!(e, Error::Format { .. }), "{e:?}");
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("invalid GGUF file"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- the real model

#[test]
fn smollm2_gguf_opens() {
    let Some(path) = smollm2_gguf() else { return };
    let ck = Checkpoint::open(&path).unwrap();
    let c = &ck.config;
    assert_eq!(ck.format, SourceFormat::Gguf);
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(ck.report.unused.is_empty(), "{:?}", ck.report.unused);
    assert_eq!(ck.weights.names().len(), expected_tensors(c).len());
    assert_eq!(
        ck.weights.shape_of("model.layers.0.self_attn.k_proj.weight"),
        Some(vec![192, 576])
    );
}

#[test]
fn router_tensor_with_wrong_shape_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = tiny_hf_config_json();
    v["model_type"] = json!("llama_dlo_exattn");
    v["is_dlo"] = json!([false, true]);
    let cfg = config_of(&v);
    let mut t = randn_tensors(&cfg);
    // The reference stores routers as nn.Linear(d, 1): (1, hidden). A transposed (hidden, 1) router is wrong.
    t.insert(
        "model.routers.1.weight".into(),
        Tensor::zeros((16, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    write_hf_checkpoint(tmp.path(), &v, &t).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains("model.routers.1.weight") && msg.contains("[16, 1]") && msg.contains("[1, 16]"),
        "{msg}"
    );
}

#[test]
fn is_dlo_length_disagreeing_with_the_layers_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = tiny_hf_config_json();
    v["model_type"] = json!("llama_dlo");
    v["is_dlo"] = json!([true, true, true]);
    write_hf_checkpoint(tmp.path(), &v, &Tensors::new()).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(
        msg.contains("config.json") && msg.contains("is_dlo has 3 entries but num_hidden_layers is 2"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- hostile headers (hardening)

#[test]
fn config_layer_count_disagreeing_with_the_tensors_is_an_error() {
    for (declared, found) in [(1, 2), (3, 2)] {
        let tmp = tempfile::tempdir().unwrap();
        let v = tiny_hf_config_json();
        write_hf_checkpoint(tmp.path(), &v, &randn_tensors(&config_of(&v))).unwrap();
        let mut v2 = v.clone();
        v2["num_hidden_layers"] = json!(declared);
        std::fs::write(tmp.path().join("config.json"), v2.to_string()).unwrap();
        let (e, msg) = open_err(tmp.path());
        assert!(
            matches!(e, Error::LayerCount { config, found: f, .. } if config == declared && f == found),
            "{e:?}"
        );
        assert!(
            msg.contains(&tmp.path().display().to_string())
                && msg.contains(&format!("declares {declared} decoder layers"))
                && msg.contains(&format!("the tensors describe {found}")),
            "{msg}"
        );
    }
}

#[test]
fn huge_layer_count_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = tiny_hf_config_json();
    write_hf_checkpoint(tmp.path(), &v, &randn_tensors(&config_of(&v))).unwrap();
    v["num_hidden_layers"] = json!(1_000_000_000u64);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let (_, msg) = open_err(tmp.path());
    assert!(msg.contains("`num_hidden_layers`: 1000000000 is larger than"), "{msg}");
    // Within the limit but far beyond the tensor table: the count is compared before any list is built.
    v["num_hidden_layers"] = json!(60_000);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let t0 = std::time::Instant::now();
    let (e, msg) = open_err(tmp.path());
    assert!(
        matches!(
            e,
            Error::LayerCount {
                config: 60_000,
                found: 2,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg.len() < 400 && t0.elapsed().as_secs_f64() < 1.0, "{msg}");
}

#[test]
fn many_tensor_problems_are_listed_with_a_bounded_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = tiny_hf_config_json();
    write_hf_checkpoint(tmp.path(), &v, &randn_tensors(&config_of(&v))).unwrap();
    // Every projection now has the wrong shape: far more problems than lines printed.
    v["intermediate_size"] = json!(40);
    v["hidden_size"] = json!(24);
    v["head_dim"] = json!(4);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let (e, msg) = open_err(tmp.path());
    let Error::Tensors { report, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(report.mismatched.len() > 20, "{}", report.mismatched.len());
    assert!(
        msg.contains("… and ") && msg.contains("more tensors with the wrong shape"),
        "{msg}"
    );
    assert!(msg.lines().count() <= 24, "{msg}");
}

/// The byte offset of the `offset` field of tensor `name`'s info in a GGUF v3 file.
fn gguf_info_offset_field(bytes: &[u8], name: &str) -> usize {
    let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims + 4
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn gguf_unaligned_and_overlapping_tensor_data_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    tiny_gguf(&path, false);
    let clean = std::fs::read(&path).unwrap();
    // Unaligned: move one tensor's data 4 bytes on.
    let mut bytes = clean.clone();
    let at = gguf_info_offset_field(&bytes, "blk.1.ffn_up.weight");
    let off = read_u64(&bytes, at);
    bytes[at..at + 8].copy_from_slice(&(off + 4).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (_, msg) = open_err(&path);
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("`blk.1.ffn_up.weight`")
            && msg.contains("not a multiple of the alignment 32"),
        "{msg}"
    );
    // Overlapping: point one tensor at another's bytes.
    let mut bytes = clean.clone();
    let a = read_u64(&bytes, gguf_info_offset_field(&bytes, "blk.0.ffn_up.weight"));
    let at = gguf_info_offset_field(&bytes, "blk.0.ffn_gate.weight");
    bytes[at..at + 8].copy_from_slice(&a.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (_, msg) = open_err(&path);
    assert!(
        msg.contains("overlap") && msg.contains("`blk.0.ffn_gate.weight`") && msg.contains("`blk.0.ffn_up.weight`"),
        "{msg}"
    );
}

#[test]
fn gguf_nan_block_scale_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let mut v = tiny_hf_config_json();
    // Q8_0 rows need a multiple of 32 elements.
    v["hidden_size"] = json!(32);
    v["intermediate_size"] = json!(64);
    v["head_dim"] = json!(8);
    let cfg = config_of(&v);
    write_gguf(
        &path,
        &llama_metadata(&cfg),
        &to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::Q8_0),
    );
    assert!(Checkpoint::open(&path).is_ok());
    // A Q8_0 block is an f16 scale then 32 int8 values; make the first block's scale NaN.
    let mut bytes = std::fs::read(&path).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let info = &content.tensor_infos["blk.1.attn_v.weight"];
    assert_eq!(info.ggml_dtype, GgmlDType::Q8_0);
    let at = (content.tensor_data_offset + info.offset) as usize;
    bytes[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (_, msg) = open_err(&path);
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains("`blk.1.attn_v.weight`")
            && msg.contains("not finite after dequantization"),
        "{msg}"
    );
}

#[test]
fn gguf_bad_header_values_are_reported_with_the_gguf_key() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    let cfg = config_of(&tiny_hf_config_json());
    let tensors = to_gguf_tensors(&cfg, &randn_tensors(&cfg), GgmlDType::F32);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("llama.rope.freq_base", Value::F32(f32::NAN), "expected a finite number"),
        ("llama.rope.freq_base", Value::F32(0.0), "must be positive"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(-1.0),
            "must not be negative",
        ),
        (
            "llama.block_count",
            Value::U32(1_000_000_000),
            "larger than the supported maximum",
        ),
        ("llama.block_count", Value::U32(3), "declares 3 decoder layers"),
        ("llama.context_length", Value::U32(0), "must be positive"),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(5000),
            "outside the vocabulary",
        ),
        ("general.alignment", Value::U32(0), "must be a power of two"),
    ];
    for (key, value, want) in cases {
        let mut md = llama_metadata(&cfg);
        md.retain(|(k, _)| k != key);
        md.push((key.into(), value.clone()));
        write_gguf(&path, &md, &tensors);
        let (_, msg) = open_err(&path);
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(want),
            "{key} = {value:?}: {msg}"
        );
        if !want.contains("declares") {
            assert!(msg.contains(&format!("`{key}`")), "{key}: {msg}");
        }
    }
    // A linear RoPE scaling factor of 0.
    let mut md = llama_metadata(&cfg);
    md.push(("llama.rope.scaling.type".into(), Value::String("linear".into())));
    md.push(("llama.rope.scaling.factor".into(), Value::F32(0.0)));
    write_gguf(&path, &md, &tensors);
    let (_, msg) = open_err(&path);
    assert!(
        msg.contains("`llama.rope.scaling.factor`") && msg.contains("must be positive"),
        "{msg}"
    );
}

#[test]
fn gguf_version_1_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.gguf");
    tiny_gguf(&path, false);
    let mut bytes = std::fs::read(&path).unwrap();
    for version in [1u32, 4] {
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let (_, msg) = open_err(&path);
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(&format!("unsupported GGUF version {version}")),
            "{msg}"
        );
        assert!(!msg.contains('\0'), "{msg:?}");
    }
}
