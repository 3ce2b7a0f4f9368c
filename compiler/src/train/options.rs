//! The validated settings of a training run, built from the command line by [`super::TrainArgs::options`].

use super::metrics::EvalRouting;
use super::optim::{AdamWConfig, Schedule, TrainSet};
use dlo_passes::LossType;
use dlo_runtime::DeviceSpec;

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
    /// Where the model trains.
    pub device: DeviceSpec,
}
