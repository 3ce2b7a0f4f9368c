//! Layer-similarity analysis: how much each unit changes each token (ShortGPT's block influence, per token).
//!
//! For every layer and token: cos(a, a + MLP(RMSNorm₂(a))) for the MLP unit and cos(h, layer(h)) for the
//! whole layer, on a dense forward pass (routers ignored, every unit runs). A high similarity means the unit
//! is nearly an identity for that token: the signal DLO's `cos` labels are built from (`dlo-method.md` §5.1).
//! `dlo-compile analyze` ([`crate::analyze`]) summarises and plots it.

use dlo_runtime::model::activations::cosine_rows;
use dlo_runtime::model::{Batch, Model};
use dlo_runtime::Result;

/// Per-token similarities of one layer, over the real tokens of the batch (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSimilarity {
    /// cos(MLP-unit input, MLP-unit output) per real token.
    pub mlp: Vec<f32>,
    /// cos(layer input, layer output) per real token.
    pub layer: Vec<f32>,
}

/// Dense forward of `model` over `batch`, returning per-layer, per-token unit similarities (padding dropped).
pub fn similarity_profile(model: &Model, batch: &Batch) -> Result<Vec<LayerSimilarity>> {
    let keep = |v: Vec<f64>| -> Vec<f32> {
        v.into_iter()
            .zip(&batch.valid)
            .filter(|(_, ok)| **ok)
            .map(|(x, _)| x as f32)
            .collect()
    };
    let mut out = Vec::with_capacity(model.layers.len());
    model.visit_dense_units(batch, |_, u| {
        out.push(LayerSimilarity {
            mlp: keep(cosine_rows(u.attn_out, u.output)?),
            layer: keep(cosine_rows(u.input, u.output)?),
        });
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use dlo_runtime::testing::{random_weights, tiny_config};
    use dlo_runtime::Weights;

    #[test]
    fn identity_layers_have_similarity_one() {
        // Zero down_proj and o_proj (LLaMA-Pro identity init): layer 1 leaves every token unchanged.
        let cfg = tiny_config(true);
        let w = random_weights(&cfg, 3);
        let mut m = std::collections::HashMap::new();
        for n in w.names() {
            let s = w.shape_of(&n).unwrap();
            let mut t = w.get(&n, &s, DType::F32, &Device::Cpu).unwrap();
            if n == "model.layers.1.mlp.down_proj.weight" || n == "model.layers.1.self_attn.o_proj.weight" {
                t = Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).unwrap();
            }
            m.insert(n, t);
        }
        let model = Model::load(&cfg, &Weights::from_tensors(m, "t"), DType::F32, &Device::Cpu).unwrap();
        let batch = Batch::left_padded(&[vec![3, 5, 7, 9], vec![4, 6]], 0);
        let prof = similarity_profile(&model, &batch).unwrap();
        assert_eq!(prof.len(), 3);
        assert_eq!(prof[1].layer.len(), 6, "padding dropped");
        assert!(prof[1].layer.iter().chain(&prof[1].mlp).all(|s| (s - 1.0).abs() < 1e-5));
        assert!(
            prof[0].layer.iter().any(|s| *s < 0.99),
            "a random layer changes tokens: {:?}",
            prof[0].layer
        );
    }
}
