//! Expands a synthetic checkpoint with LLaMA2-7B shapes (d 4096, f 11008, vocab 32000), generated on the
//! fly by [`SyntheticSource`] (nothing is stored), and reports the output size and the peak RSS.
//! `scripts/bench-expand.sh` runs it under `/usr/bin/time -v`.
//!
//! Usage: `expand_synthetic [BASE_LAYERS [TARGET_LAYERS [DTYPE [INIT]]]]` (default `32 40 bf16 zeros`).
//! The output goes to a temporary directory under `$TMPDIR` and is deleted afterwards.

use dlo_passes::writer::write_model;
use dlo_passes::{ExpandPlan, ModelConfig, ModelSpec, Recipe, SyntheticSource, WriteOptions};
use std::path::Path;

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|x| x.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base: usize = args.first().map_or(Ok(32), |s| s.parse())?;
    let target: usize = args.get(1).map_or(Ok(40), |s| s.parse())?;
    let dtype = args.get(2).cloned().unwrap_or_else(|| "bf16".into());
    let init = args.get(3).cloned().unwrap_or_else(|| "zeros".into());
    let cfg = ModelConfig::from_hf_json(
        &serde_json::json!({
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": base, "num_attention_heads": 32, "num_key_value_heads": 32,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": false
        }),
        Path::new("synthetic-7b/config.json"),
    )?;
    let src = SyntheticSource::llama(&cfg);
    let mut spec = ModelSpec::from_base(cfg, Path::new("synthetic-7b"))?;
    let plan = ExpandPlan::from_recipe(&Recipe {
        layers: Some(target),
        dtype: Some(dtype),
        init: Some(init),
        ..Default::default()
    })?;
    plan.apply(&mut spec)?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let t = std::time::Instant::now();
    let rep = write_model(
        &spec,
        &src,
        &out,
        &WriteOptions {
            dtype: plan.dtype,
            extra_files: vec![],
        },
    )?;
    let secs = t.elapsed().as_secs_f64();
    // The embedding (and lm_head) is the largest tensor: vocab × d, held in f32 while it is written.
    let largest = 32000u64 * 4096 * 4;
    println!(
        "synthetic 7B-class {base} -> {target} layers ({} params in the base): output {} tensors, {:.2} GiB; {:.1}s; peak RSS {:.1} MiB (largest tensor in f32: {:.1} MiB)",
        src.numel(),
        rep.tensors,
        rep.safetensors_bytes as f64 / (1u64 << 30) as f64,
        secs,
        peak_rss_kb() as f64 / 1024.0,
        largest as f64 / (1u64 << 20) as f64
    );
    println!("OUTPUT_BYTES={}", rep.total_bytes);
    Ok(())
}
