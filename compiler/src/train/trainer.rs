//! The trainer: the model it drives ([`TrainModel`]), one optimizer step over micro-batches (§5–§6),
//! held-out evaluation, and the state a checkpoint saves and a resume restores.

use super::checkpoint::{self, CapacityRecord, CheckpointContents, FileSink, TrainerState};
use super::data::{self, Example, Row};
use super::error::{Result, TrainError};
use super::loss::{self, CapacityState, LayerSignals};
use super::metrics::{self, EvalMetrics, EvalRouting, StepMetrics};
use super::optim::{self, AdamW, GradAccum};
use super::options::Options;
use crate::calibrate::{calibrate, CalibrationOptions, RateTarget};
use candle_core::{DType, Device, Tensor, Var};
use dlo_passes::{Capacity, LossType, ModelConfig};
use dlo_runtime::model::train::{TrainOutput, TrainRouting};
use dlo_runtime::model::{Batch, Forward, Model, Routing};
use dlo_runtime::Backend;
use dlo_runtime::Weights;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// A model the trainer can drive: built with some tensors as [`Var`]s, with a differentiable training
/// forward; its inference forward ([`Backend`]) serves held-out evaluation and calibration.
pub trait TrainModel: Sized + Backend {
    /// Builds the model; tensors for which `trainable(name)` holds become variables (f32).
    fn load_trainable(
        cfg: &ModelConfig,
        w: &Weights,
        trainable: &dyn Fn(&str) -> bool,
        device: &Device,
    ) -> dlo_runtime::Result<(Self, Vec<(String, Var)>)>;
    /// The training forward (`Model::forward_train`).
    fn forward_train(&self, batch: &Batch, routing: &TrainRouting) -> dlo_runtime::Result<TrainOutput>;
    /// Inference forward under `routing` ([`Backend::forward`]): logits `[b, t, V]` (f32) and each routed layer's
    /// execution flags.
    fn forward_eval(&self, batch: &Batch, routing: &Routing) -> dlo_runtime::Result<(Tensor, Vec<Option<Vec<bool>>>)> {
        let opts = Forward {
            routing: routing.clone(),
            all_logits: true,
        };
        let out = Backend::forward(self, batch, None, &opts)?;
        Ok((out.logits, out.trace.into_iter().map(|t| t.map(|t| t.exec)).collect()))
    }
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
        let device = opts.device.device()?;
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

impl CapacityState {
    /// The capacity of every layer (`None` for dense layers), for reports.
    pub fn capacity_list(&self) -> Vec<Option<f64>> {
        (0..self.is_dlo.len())
            .map(|l| self.is_dlo[l].then(|| self.capacity.of_layer(l)))
            .collect()
    }
}
