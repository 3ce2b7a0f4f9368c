//! Training-mode forward pass: differentiable ops only, DLO's training routing (`dlo-method.md` §4.2, §5.1).
//!
//! Routed layers select tokens by **top-k over router scores** with a per-layer capacity (batch-level over the
//! micro-batch's real tokens, as the reference does, or per sequence), scale executed MLP outputs by the gate
//! `g(σ(z))` (so the LM loss reaches the router), and report, per routed layer, the scores, the selection and
//! — when asked — the per-token cosine similarity between the unit's input and its dense output, computed
//! without gradient in f32. Labels, the BCE routing loss and capacity re-allocation are the trainer's job.

use super::{Batch, Model};
use crate::error::{Error, Result};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, Var};
use dlo_passes::ModelConfig;
use std::collections::HashMap;

/// Routing settings for one training forward pass.
#[derive(Debug, Clone)]
pub struct TrainRouting {
    /// Capacity per layer (entries of dense layers are ignored); k = max(1, ⌈c·N⌉).
    pub capacity: Vec<f64>,
    /// Top-k within each sequence instead of over the whole micro-batch (§9.7 option).
    pub per_sequence: bool,
    /// Compute the similarity signal (needed by the `cos` and `cos-global` label types).
    pub similarity: bool,
}

/// What one routed layer did in a training forward pass.
#[derive(Debug, Clone)]
pub struct TrainLayerTrace {
    /// Router scores r = σ(z), `[b, t]`, f32, differentiable w.r.t. the router and everything below it.
    pub scores: Tensor,
    /// Top-k selection, `b*t` (padding never selected).
    pub exec: Vec<bool>,
    /// cos(unit input, dense unit output) per token, `b*t`, when requested.
    pub similarity: Option<Vec<f32>>,
}

/// Result of a training forward pass.
#[derive(Debug)]
pub struct TrainOutput {
    /// Logits `[b, t, vocab]`, f32, differentiable.
    pub logits: Tensor,
    /// Per layer: the trace of routed layers, `None` for dense ones.
    pub layers: Vec<Option<TrainLayerTrace>>,
}

impl Model {
    /// Loads a model whose tensors selected by `trainable(name)` are [`Var`]s (in f32 on `device`).
    /// Returns the model and the variables by HF name; the optimiser updates them in place, so the model
    /// always computes with the current values.
    pub fn load_trainable(
        cfg: &ModelConfig,
        w: &Weights,
        trainable: impl Fn(&str) -> bool,
        device: &Device,
    ) -> Result<(Model, Vec<(String, Var)>)> {
        let mut map = HashMap::new();
        let mut vars = Vec::new();
        for name in w.names() {
            let shape = w.shape_of(&name).unwrap_or_default();
            let t = w.get(&name, &shape, DType::F32, device)?;
            if trainable(&name) {
                let v = Var::from_tensor(&t)?;
                map.insert(name.clone(), v.as_tensor().clone());
                vars.push((name, v));
            } else {
                map.insert(name, t);
            }
        }
        let model = Model::load(cfg, &Weights::from_tensors(map, w.path()), DType::F32, device)?;
        Ok((model, vars))
    }

    /// The training forward pass over a right- or left-padded batch (no KV cache).
    pub fn forward_train(&self, batch: &Batch, routing: &TrainRouting) -> Result<TrainOutput> {
        let _ = (batch, routing);
        Err(Error::InvalidArgument("training forward not implemented yet".into()))
    }
}
