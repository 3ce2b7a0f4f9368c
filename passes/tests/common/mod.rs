//! Shared helpers: a tiny synthetic Llama checkpoint written as real safetensors files.
#![allow(dead_code)]

use dlo_passes::ModelConfig;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

pub const HIDDEN: usize = 8;
pub const INTER: usize = 12;
pub const VOCAB: usize = 16;

/// Per-layer tensor suffixes and shapes of the tiny model.
pub fn layer_tensors() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("input_layernorm.weight", vec![HIDDEN]),
        ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
        ("self_attn.k_proj.weight", vec![4, HIDDEN]),
        ("self_attn.v_proj.weight", vec![4, HIDDEN]),
        ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
        ("post_attention_layernorm.weight", vec![HIDDEN]),
        ("mlp.gate_proj.weight", vec![INTER, HIDDEN]),
        ("mlp.up_proj.weight", vec![INTER, HIDDEN]),
        ("mlp.down_proj.weight", vec![HIDDEN, INTER]),
    ]
}

/// Deterministic, distinct values for a tensor name.
pub fn values(name: &str, n: usize) -> Vec<f32> {
    let h = name.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ b as u64).wrapping_mul(1099511628211)
    });
    (0..n)
        .map(|i| {
            let x = h.wrapping_add((i as u64).wrapping_mul(0x9E3779B97F4A7C15));
            let x = (x ^ (x >> 29)).wrapping_mul(0xBF58476D1CE4E5B9);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

pub fn config_json(layers: usize) -> serde_json::Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32", "max_position_embeddings": 64
    })
}

/// All tensors of the tiny model, by name.
pub fn tensors(layers: usize) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut m = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        let v = values(&name, n);
        m.insert(name, (shape, v));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]);
    add("model.norm.weight".into(), vec![HIDDEN]);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN]);
    for l in 0..layers {
        for (s, shape) in layer_tensors() {
            add(format!("model.layers.{l}.{s}"), shape);
        }
    }
    m
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a tiny HF checkpoint (config, f32 safetensors minus `omit`, a tokenizer.json) into `dir`.
pub fn write_checkpoint(dir: &Path, layers: usize, omit: &[&str]) -> ModelConfig {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = config_json(layers);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"fake\": true}").unwrap();
    let t = tensors(layers);
    let bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = t
        .iter()
        .filter(|(n, _)| !omit.contains(&n.as_str()))
        .map(|(n, (s, v))| (n.clone(), (s.clone(), f32_bytes(v))))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, (s, b))| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    ModelConfig::from_hf_file(&dir.join("config.json")).unwrap()
}

/// A bare config with `layers` layers (for tests that need no tensors).
pub fn config(layers: usize) -> ModelConfig {
    ModelConfig::from_hf_json(&config_json(layers), Path::new("config.json")).unwrap()
}
