//! The forward seam: what generation, the C ABI, calibration and evaluation need from a model.
//!
//! [`Backend`] is one forward pass over a [`Batch`] with a decoding state of the backend's own, returning
//! logits and the routing trace. The native [`Model`] is one backend, on any candle device; a TensorRT engine
//! (issue 15) or a test double is another. Code written against the trait ([`crate::generate::Generator`],
//! [`crate::generate::generate_batch`], the compiler's calibration and evaluation) runs on all of them.

use crate::error::Result;
use crate::model::cache::Cache;
use crate::model::{Batch, Forward, ForwardOutput, Model};
use dlo_passes::ModelConfig;

/// A model that runs forward passes with DLO routing.
pub trait Backend {
    /// The decoding state one generation keeps between steps (the native model's KV caches).
    type Cache;

    /// The model's configuration (layers, vocabulary, context length, DLO settings).
    fn config(&self) -> &ModelConfig;

    /// A fresh decoding state.
    fn new_cache(&self) -> Self::Cache;

    /// Runs `batch` under `opts.routing`, appending to `cache` (a fresh state when `None`). Logits are f32
    /// (f64 for an f64 model), `[b, t, vocab]` with `opts.all_logits`, else `[b, 1, vocab]`; the trace has one
    /// entry per layer (`None` for dense layers).
    fn forward(&self, batch: &Batch, cache: Option<&mut Self::Cache>, opts: &Forward) -> Result<ForwardOutput>;
}

impl Backend for Model {
    type Cache = Cache;

    fn config(&self) -> &ModelConfig {
        Model::config(self)
    }

    fn new_cache(&self) -> Cache {
        Model::new_cache(self)
    }

    fn forward(&self, batch: &Batch, cache: Option<&mut Cache>, opts: &Forward) -> Result<ForwardOutput> {
        Model::forward(self, batch, cache, opts)
    }
}
