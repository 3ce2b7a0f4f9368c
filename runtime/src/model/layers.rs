//! The building blocks of a Llama decoder layer, named as the checkpoint tensors are.
//!
//! Every block has an inference form (candle's fused kernels) and a differentiable form for training (ours,
//! [`super::fused`], on the CPU in f32/f64; composed from elementwise ops elsewhere),
//! chosen by [`Exec::differentiable`]; they compute the same function (tests compare them).

use super::blocked;
use super::cache::{build_mask, LayerCache};
use super::fused;
use super::rope;
use super::weight::Weight;
use crate::error::Result;
use crate::weights::Weights;
use candle_core::{DType, Device, Module, Tensor, D};
use dlo_passes::ModelConfig;

/// How a forward pass executes its blocks.
#[derive(Debug, Clone, Copy)]
pub struct Exec {
    /// Use only ops with a backward pass (training); otherwise fused inference kernels.
    pub differentiable: bool,
}

/// The precision of norms and softmax: f32, or f64 for f64 models (gradient checks).
pub fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A projection `y = x Wᵀ (+ b)` with `W: [out, in]` ([`Weight`]: the weight owns how it multiplies).
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Weight,
    /// `[out]`, if the projection has a bias.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias` when `bias`).
    pub fn load(w: &Weights, name: &str, out: usize, inp: usize, bias: bool, ld: &Load) -> Result<Self> {
        let weight = w.weight(&format!("{name}.weight"), &[out, inp], ld)?;
        let bias = if bias {
            Some(w.get(&format!("{name}.bias"), &[out], ld.dtype, ld.device)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x: [.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = self.weight.matmul(&x.reshape((rows, inp))?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.out_features()?;
        y.reshape(out_dims)
    }

    /// Concatenates projections that read the same input into one `[Σ out, in]` projection and turns each part
    /// into a row view of it, so inference runs one matvec / GEMM instead of several. Skipped (`None`) when a
    /// part is a training variable (the optimiser updates variables in place, which a copy would not see) or
    /// the weights' kinds cannot be stacked.
    pub fn fuse(parts: &mut [&mut Linear]) -> candle_core::Result<Option<Linear>> {
        let tracked = |l: &Linear| l.weight.is_variable() || l.bias.as_ref().is_some_and(Tensor::is_variable);
        let has_bias = parts.iter().filter(|l| l.bias.is_some()).count();
        if parts.iter().any(|l| tracked(l)) || (has_bias != 0 && has_bias != parts.len()) {
            return Ok(None);
        }
        let Some(weight) = Weight::cat_rows(&parts.iter().map(|l| &l.weight).collect::<Vec<_>>())? else {
            return Ok(None);
        };
        let bias = if has_bias == 0 {
            None
        } else {
            Some(Tensor::cat(
                &parts.iter().filter_map(|l| l.bias.as_ref()).collect::<Vec<_>>(),
                0,
            )?)
        };
        let mut off = 0;
        for l in parts.iter_mut() {
            let n = l.weight.out_features()?;
            l.weight = weight.narrow_rows(off, n)?;
            if let Some(b) = &bias {
                l.bias = Some(b.narrow(0, off, n)?);
            }
            off += n;
        }
        Ok(Some(Linear { weight, bias }))
    }
}

/// How the model's tensors are loaded: compute dtype, device and kernel choices (from
/// [`crate::RuntimeOptions`]).
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    /// Compute dtype the weights are converted to.
    pub dtype: DType,
    /// Device they are placed on.
    pub device: &'a Device,
    /// Whether dense projections may use the CPU decode matvec.
    pub matvec: bool,
    /// Whether block-quantized projections and embeddings stay in their blocks ([`Weight::Quantized`]);
    /// otherwise they are dequantized to `dtype`.
    pub quantized: bool,
    /// Storage dtype of the KV caches the model makes (`None`: the compute dtype).
    pub kv_dtype: Option<DType>,
}

/// RMSNorm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[d]`.
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `{name}.weight`.
    pub fn load(w: &Weights, name: &str, d: usize, eps: f64, ld: &Load) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&format!("{name}.weight"), &[d], ld.dtype, ld.device)?,
            eps,
        })
    }

    /// Normalises over the last dimension (in f32, as HF does, then back to the input dtype; in f64 for f64
    /// models).
    pub fn forward(&self, x: &Tensor, ex: Exec) -> candle_core::Result<Tensor> {
        // candle's fused kernel drops gradients and has no f64 (it sums in f32): training and f64 models (reference
        // checks) take ours, other devices/dtypes the composed form.
        if !ex.differentiable && x.dtype() != DType::F64 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        if fused::supported(x) && self.weight.dtype() == x.dtype() {
            return fused::rms_norm(x, &self.weight, self.eps);
        }
        let dt = x.dtype();
        let xf = x.to_dtype(wide(dt))?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.to_dtype(dt)?.broadcast_mul(&self.weight)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// W_gate.
    pub gate_proj: Linear,
    /// W_up.
    pub up_proj: Linear,
    /// W_down.
    pub down_proj: Linear,
    /// `[W_gate; W_up]` when fused for inference ([`Linear::fuse`]); `gate_proj`/`up_proj` are then views of it.
    gate_up: Option<Linear>,
}

impl Mlp {
    fn load(w: &Weights, p: &str, cfg: &ModelConfig, ld: &Load) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let mut m = Mlp {
            gate_proj: Linear::load(w, &format!("{p}.gate_proj"), f, d, false, ld)?,
            up_proj: Linear::load(w, &format!("{p}.up_proj"), f, d, false, ld)?,
            down_proj: Linear::load(w, &format!("{p}.down_proj"), d, f, false, ld)?,
            gate_up: None,
        };
        m.gate_up = Linear::fuse(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        Ok(m)
    }

    /// `x: [.., d]` → `[.., d]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (g, u) = match &self.gate_up {
            Some(f) => {
                let y = f.forward(x)?;
                let n = self.gate_proj.weight.out_features()?;
                (y.narrow(D::Minus1, 0, n)?, y.narrow(D::Minus1, n, n)?)
            }
            None => (self.gate_proj.forward(x)?, self.up_proj.forward(x)?),
        };
        // One fused pass (vectorized exp) for inference and training alike on the CPU; candle's composed form
        // elsewhere.
        let h = if fused::supported(&g) {
            fused::swiglu(&g, &u)?
        } else {
            (candle_nn::Activation::Silu.forward(&g)? * u)?
        };
        self.down_proj.forward(&h)
    }
}

/// Per-token step context shared by every layer of one forward pass.
pub struct Step<'a> {
    /// Batch size.
    pub b: usize,
    /// Tokens per sequence in this step.
    pub t: usize,
    /// Position id of each token, `b*t` row-major.
    pub pos: &'a [u32],
    /// Whether each token is real (not padding), `b*t`.
    pub valid: &'a [bool],
    /// RoPE cos for these positions, `[b, t, hd/2]`.
    pub cos: Tensor,
    /// RoPE sin, `[b, t, hd/2]`.
    pub sin: Tensor,
    /// Attend over the KV cache with [`blocked::attend`] (a chunk of a long prefill) where it applies.
    pub blocked: bool,
}

/// Grouped-query self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    /// W_q.
    pub q_proj: Linear,
    /// W_k.
    pub k_proj: Linear,
    /// W_v.
    pub v_proj: Linear,
    /// W_o.
    pub o_proj: Linear,
    /// `[W_q; W_k; W_v]` when fused for inference ([`Linear::fuse`]); q/k/v are then views of it.
    qkv: Option<Linear>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, p: &str, cfg: &ModelConfig, ld: &Load) -> Result<Self> {
        let (d, h, kv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        let mut a = Attention {
            q_proj: Linear::load(w, &format!("{p}.q_proj"), h * hd, d, bias, ld)?,
            k_proj: Linear::load(w, &format!("{p}.k_proj"), kv * hd, d, bias, ld)?,
            v_proj: Linear::load(w, &format!("{p}.v_proj"), kv * hd, d, bias, ld)?,
            o_proj: Linear::load(w, &format!("{p}.o_proj"), d, h * hd, false, ld)?,
            n_heads: h,
            n_kv: kv,
            qkv: None,
            head_dim: hd,
        };
        a.qkv = Linear::fuse(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
        Ok(a)
    }

    /// `x: [b, t, d]` (already normalised) → attention output `[b, t, d]`.
    ///
    /// Keys: with a cache, this step's K/V are appended and attention covers the cache; without one
    /// (training), only this step's tokens, restricted to those with `keys[i]` when given (layer-skip
    /// training: only executed tokens produce keys).
    pub fn forward(&self, x: &Tensor, st: &Step, kv: Kv, ex: Exec) -> candle_core::Result<Tensor> {
        let (b, t, hd, g) = (st.b, st.t, self.head_dim, self.n_heads / self.n_kv);
        let (q, k, v) = match &self.qkv {
            Some(f) => {
                let y = f.forward(x)?;
                let (nq, nk) = (self.n_heads * hd, self.n_kv * hd);
                (
                    y.narrow(D::Minus1, 0, nq)?,
                    y.narrow(D::Minus1, nq, nk)?,
                    y.narrow(D::Minus1, nq + nk, nk)?,
                )
            }
            None => (
                self.q_proj.forward(x)?,
                self.k_proj.forward(x)?,
                self.v_proj.forward(x)?,
            ),
        };
        let q = q.reshape((b, t, self.n_heads, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, self.n_kv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, self.n_kv, hd))?.transpose(1, 2)?;
        let q = rope::apply(&q, &st.cos, &st.sin, ex.differentiable)?;
        let k = rope::apply(&k, &st.cos, &st.sin, ex.differentiable)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let kv = match kv {
            // Chunks of a long prefill, and any step over a cache stored narrower than the compute dtype (an f16
            // cache under f32: the blocked kernel reads it as it is, block by block, where the general path
            // would convert the whole cache at every decode step).
            Kv::Cache(cache)
                if (st.blocked || cache.storage_dtype().is_some_and(|d| d != q.dtype()))
                    && !ex.differentiable
                    && blocked::supported(&q) =>
            {
                let (k, v) = cache.append_stored(&k, &v.contiguous()?, st.pos, st.valid)?;
                let keys: Vec<_> = (0..b).map(|bi| cache.keys(bi)).collect();
                let out = blocked::attend(&q, &k, &v, st.pos, &keys, scale)?;
                return self.o_proj.forward(&out);
            }
            kv => kv,
        };
        let (k, v, mask) = match kv {
            Kv::Cache(cache) => {
                let (k, v) = cache.append(&k, &v.contiguous()?, st.pos, st.valid)?;
                let mask = cache.mask(st.pos, b, t, wide(x.dtype()), x.device())?;
                (k, v, mask)
            }
            Kv::Local(keys) => {
                let ok = |bi: usize, s: usize| {
                    let i = bi * t + s;
                    (st.valid[i] && keys.is_none_or(|k| k[i])).then_some(st.pos[i])
                };
                let mask = build_mask(b, t, t, st.pos, ok, wide(x.dtype()), x.device())?;
                (k, v, Some(mask))
            }
        };
        let n = k.dim(2)?;
        // Query heads sharing a KV head are stacked along the row axis: no K/V repetition needed.
        let q = q.contiguous()?.reshape((b, self.n_kv, g * t, hd))?;
        let raw = q.matmul(&k.contiguous()?.t()?)?;
        let probs = if fused::supported(&raw) {
            // scale, mask and softmax in one pass (and one pass backward)
            fused::masked_softmax(&raw.reshape((b, self.n_kv, g, t, n))?, mask.as_ref(), scale)?
        } else if !ex.differentiable && raw.device().is_cpu() {
            // bf16/f16 inference: the same pass on the widened scores
            let wide_raw = raw.to_dtype(wide(x.dtype()))?;
            fused::masked_softmax(&wide_raw.reshape((b, self.n_kv, g, t, n))?, mask.as_ref(), scale)?
        } else {
            let scores = (raw * scale)?;
            let scores = scores.to_dtype(wide(x.dtype()))?.reshape((b, self.n_kv, g, t, n))?;
            let scores = match &mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            if ex.differentiable {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            }
        };
        let probs = probs.to_dtype(x.dtype())?.reshape((b, self.n_kv, g * t, n))?;
        let out = probs.matmul(&v.contiguous()?)?; // [b, kv, g*t, hd]
        let out = out
            .reshape((b, self.n_heads, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * hd))?;
        self.o_proj.forward(&out)
    }
}

/// Where attention's keys and values come from.
pub enum Kv<'a> {
    /// Append to this KV cache and attend over all of it (inference).
    Cache(&'a mut LayerCache),
    /// Attend over this step's tokens only; `Some(keys)` restricts keys to the flagged tokens (`b*t`).
    Local(Option<&'a [bool]>),
}

/// One decoder layer: attention unit then MLP unit, both residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// RMSNorm₁.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// RMSNorm₂.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// Loads `model.layers.{i}`.
    pub fn load(w: &Weights, i: usize, cfg: &ModelConfig, ld: &Load) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm"), d, eps, ld)?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg, ld)?,
            post_attention_layernorm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm"), d, eps, ld)?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg, ld)?,
        })
    }

    /// The attention unit: `a = h + Attn(RMSNorm₁(h))`.
    pub fn attn_unit(&self, h: &Tensor, st: &Step, kv: Kv, ex: Exec) -> candle_core::Result<Tensor> {
        h + self.attn_delta(h, st, kv, ex)?
    }

    /// The attention unit's contribution `Attn(RMSNorm₁(h))` (without the residual).
    pub fn attn_delta(&self, h: &Tensor, st: &Step, kv: Kv, ex: Exec) -> candle_core::Result<Tensor> {
        self.self_attn
            .forward(&self.input_layernorm.forward(h, ex)?, st, kv, ex)
    }

    /// The MLP's contribution `MLP(RMSNorm₂(a))` (without the residual).
    pub fn mlp_delta(&self, a: &Tensor, ex: Exec) -> candle_core::Result<Tensor> {
        self.mlp.forward(&self.post_attention_layernorm.forward(a, ex)?)
    }
}

/// A DLO router: one logit `z = wᵀh` per token, no bias, on the layer-input residual.
#[derive(Debug, Clone)]
pub struct Router {
    /// `[1, d]`, as `model.routers.{l}.weight`.
    pub weight: Tensor,
}

impl Router {
    /// Loads `model.routers.{l}.weight`.
    pub fn load(w: &Weights, l: usize, d: usize, ld: &Load) -> Result<Self> {
        Ok(Router {
            weight: w.get(&format!("model.routers.{l}.weight"), &[1, d], ld.dtype, ld.device)?,
        })
    }

    /// `h: [b, t, d]` → logits `[b, t]`, in the model dtype (as the reference computes them).
    pub fn logits(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        h.reshape((b * t, d))?.matmul(&self.weight.t()?)?.reshape((b, t))
    }
}
