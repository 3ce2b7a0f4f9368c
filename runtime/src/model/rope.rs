//! Rotary position embeddings (HF "rotate-half" convention), with Llama-3 and linear frequency scaling.
//!
//! The table holds the inverse frequencies; cos/sin are gathered per token from its **own** position id, so
//! left-padded batches and the packed tokens of layer-skip routing (which keep their original positions)
//! rotate correctly.

use candle_core::{DType, Device, Result, Tensor, D};
use dlo_passes::{ModelConfig, RopeScaling};

/// Inverse RoPE frequencies for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `cfg`'s head_dim, theta and scaling.
    pub fn new(cfg: &ModelConfig) -> Self {
        let hd = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        match &cfg.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen < high_wavelen {
                        // high frequency: unchanged
                    } else if wavelen > low_wavelen {
                        *f /= factor;
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// cos and sin for the given positions, each `[b, t, head_dim/2]` in `dtype`.
    pub fn cos_sin(
        &self,
        positions: &[u32],
        b: usize,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                // f32 angle, as HF computes it (positions · inv_freq in float32).
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Applies RoPE to `x: [b, heads, t, head_dim]` with `cos`/`sin: [b, t, head_dim/2]`.
///
/// `differentiable` selects the composed form (gradients flow); otherwise candle's fused kernel is used,
/// which has no backward pass.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
    if !differentiable {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    let hd = x.dim(D::Minus1)?;
    let cos = cos.unsqueeze(1)?; // [b, 1, t, hd/2]
    let sin = sin.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_and_composed_rope_agree_with_per_sequence_positions() {
        let dev = Device::Cpu;
        let cfg = crate::testing::tiny_config(false);
        let rope = Rope::new(&cfg);
        let (b, h, t, hd) = (2, 3, 4, cfg.head_dim);
        let x = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
        let pos = [0u32, 1, 2, 3, 7, 8, 9, 10];
        let (c, s) = rope.cos_sin(&pos, b, t, DType::F32, &dev).unwrap();
        let a = apply(&x, &c, &s, false).unwrap();
        let d = apply(&x, &c, &s, true).unwrap();
        let diff = crate::testing::max_abs_diff(&a, &d);
        assert!(diff < 1e-5, "{diff}");
    }
}
