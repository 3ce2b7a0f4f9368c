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
//! | `args` | the command line ([`TrainArgs`]) → validated [`Options`] (`options`) |
//! | `trainer` | [`TrainModel`], [`Trainer`]: one optimizer step, evaluation, checkpoint state |
//! | `fingerprint` | [`model_fingerprint`], [`data_fingerprint`]: what a resume must match |
//! | `run` | [`train_run`] (the run loop: resume, train, evaluate, save, summarise) and [`run()`] (the command) |

mod args;
pub mod checkpoint;
pub mod data;
pub mod error;
mod fingerprint;
pub mod loss;
pub mod metrics;
pub mod optim;
mod options;
mod run;
mod trainer;

#[cfg(test)]
mod tests;

pub use args::TrainArgs;
pub use error::{Result, TrainError};
pub use fingerprint::{data_fingerprint, model_fingerprint};
pub use options::Options;
pub use run::{run, train_run, RunSetup, Summary};
pub use trainer::{MicroOutput, TrainModel, Trainer, CAPACITY_CALIBRATION_TOKENS};
