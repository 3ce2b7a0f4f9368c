//! Looking inside a forward pass: the residual stream at each layer's unit boundaries on a dense pass, for
//! analyses that live outside the runtime (the compiler's layer-similarity analysis, `dlo_compiler::analysis`).

use super::layers::{Exec, Kv};
use super::{Batch, Model};
use crate::error::Result;
use candle_core::Tensor;

/// One decoder layer's residual stream at its unit boundaries, each `[b, t, d]` in the model dtype.
#[derive(Debug, Clone, Copy)]
pub struct UnitStates<'a> {
    /// The layer's input `h`.
    pub input: &'a Tensor,
    /// After the attention unit, `a = h + Attn(RMSNorm₁(h))`: the MLP unit's input.
    pub attn_out: &'a Tensor,
    /// The layer's output, `a + MLP(RMSNorm₂(a))`.
    pub output: &'a Tensor,
}

impl Model {
    /// Dense inference forward over `batch` (routers ignored, every unit runs), calling `visit` with each
    /// layer's index and unit states, first layer first. Padding positions are included.
    pub fn visit_dense_units(
        &self,
        batch: &Batch,
        mut visit: impl FnMut(usize, UnitStates<'_>) -> Result<()>,
    ) -> Result<()> {
        let ex = Exec { differentiable: false };
        let (mut h, step) = self.embed(batch)?;
        let mut cache = self.new_cache();
        for (l, layer) in self.layers.iter().enumerate() {
            let a = layer.attn_unit(&h, &step, Kv::Cache(&mut cache.layers[l]), ex)?;
            let y = (&a + layer.mlp_delta(&a, ex)?)?;
            visit(
                l,
                UnitStates {
                    input: &h,
                    attn_out: &a,
                    output: &y,
                },
            )?;
            h = y;
        }
        Ok(())
    }
}

/// Per-row cosine similarity of `[b, t, d]` tensors as a flat `b*t` vector, computed in f64: the measure
/// behind training's `cos` labels ([`super::train`]), for analyses outside the runtime.
pub fn cosine_rows(x: &Tensor, y: &Tensor) -> candle_core::Result<Vec<f64>> {
    super::train::cosine_rows(x, y)
}
