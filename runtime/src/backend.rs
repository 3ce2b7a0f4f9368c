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

    /// A decoding state whose sequence `i` continues sequence `rows[i]` of `cache`: a shared prefix (an
    /// evaluation context) computed once and continued several ways. Backends that cannot copy their state
    /// say so ([`crate::Error::InvalidArgument`]).
    fn select_rows(&self, cache: &Self::Cache, rows: &[usize]) -> Result<Self::Cache> {
        let _ = (cache, rows);
        Err(crate::Error::InvalidArgument(
            "this backend cannot copy a decoding state to continue it several ways".into(),
        ))
    }

    /// A diagnosis after non-finite logits: the first decoder layer whose output has a NaN or infinite value
    /// on a dense pass over `ids` (from position 0), when the backend can look inside; `None` when no layer
    /// output is non-finite (then the final norm or lm_head produced them) or the backend cannot tell.
    fn first_non_finite_layer(&self, ids: &[u32]) -> Result<Option<usize>> {
        let _ = ids;
        Ok(None)
    }
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

    fn select_rows(&self, cache: &Cache, rows: &[usize]) -> Result<Cache> {
        Ok(cache.select_rows(rows)?)
    }

    fn first_non_finite_layer(&self, ids: &[u32]) -> Result<Option<usize>> {
        let mut first = None;
        self.visit_dense_units(&Batch::single(ids, 0), |l, s| {
            if first.is_none() {
                let v: Vec<f32> = s.output.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                if v.iter().any(|x| !x.is_finite()) {
                    first = Some(l);
                }
            }
            Ok(())
        })?;
        Ok(first)
    }
}
