//! The writer streams: expanding a synthetic checkpoint much larger than any one tensor raises the
//! process's peak RSS by about one tensor, not by the model. (Alone in its test binary so that no other
//! test's allocations pollute the high-water mark.)

use dlo_passes::writer::write_model;
use dlo_passes::{
    ExpandPlan, ModelConfig, ModelSpec, OutDtype, Recipe, SafetensorsDir, SyntheticSource, TensorSource, WriteOptions,
};
use std::path::Path;

/// Peak resident set (VmHWM) in bytes, from /proc (Linux); None elsewhere.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn expanding_holds_about_one_tensor_not_the_model() {
    // d = 512, f = 2048: each layer is 3.1 M parameters (12.6 MB f32), the largest tensor 4 MB (embedding).
    let cfg = ModelConfig::from_hf_json(
        &serde_json::json!({
            "model_type": "llama", "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 2048,
            "num_hidden_layers": 16, "num_attention_heads": 8, "tie_word_embeddings": false
        }),
        Path::new("synthetic/config.json"),
    )
    .unwrap();
    let src = SyntheticSource::llama(&cfg);
    let mut spec = ModelSpec::from_base(cfg, Path::new("synthetic")).unwrap();
    ExpandPlan::from_recipe(&Recipe {
        layers: Some(24),
        init: Some("merge-slerp".into()),
        ..Default::default()
    })
    .unwrap()
    .apply(&mut spec)
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let Some(before) = peak_rss() else {
        eprintln!("skipped: /proc/self/status not available");
        return;
    };
    let rep = write_model(
        &spec,
        &src,
        &out,
        &WriteOptions {
            dtype: OutDtype::F32,
            extra_files: vec![],
        },
    )
    .unwrap();
    let grown = peak_rss().unwrap().saturating_sub(before);
    eprintln!(
        "output {} MB, peak RSS grew by {} MB",
        rep.safetensors_bytes >> 20,
        grown >> 20
    );
    assert!(
        rep.safetensors_bytes > 300 << 20,
        "output is {} bytes",
        rep.safetensors_bytes
    );
    // Slerp holds two 4 MiB inputs and one output; allow generous slack for allocator and I/O buffers.
    assert!(
        grown < 48 << 20,
        "peak RSS grew by {grown} bytes while writing {} bytes",
        rep.safetensors_bytes
    );

    // And the streamed file is right: spot-check a copied and a merged tensor.
    let o = SafetensorsDir::open(&out).unwrap();
    assert_eq!(
        o.read_f32("model.layers.0.mlp.up_proj.weight").unwrap(),
        src.read_f32("model.layers.0.mlp.up_proj.weight").unwrap()
    );
    let want = dlo_passes::init::slerp(
        0.5,
        &src.read_f32("model.layers.1.self_attn.q_proj.weight").unwrap(),
        &src.read_f32("model.layers.0.self_attn.q_proj.weight").unwrap(),
    );
    assert_eq!(o.read_f32("model.layers.2.self_attn.q_proj.weight").unwrap(), want);
}
