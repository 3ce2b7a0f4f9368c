//! Tiny random Llama/DLO checkpoints (HF directory: config.json + model.safetensors) for tests and
//! examples: vocabulary 97, width 32, 3 layers (GQA 4/2 heads), routers on layers 1 and 2.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct Tiny {
    /// `llama_dlo_exattn` (MLP skipping) when false, `llama_dlo` (layer skipping) when true.
    pub layer_skip: bool,
    /// `max_position_embeddings`.
    pub ctx: usize,
    /// Weight seed.
    pub seed: u64,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny {
            layer_skip: false,
            ctx: 256,
            seed: 1,
        }
    }
}

pub const VOCAB: usize = 97;
const D: usize = 32;
const F: usize = 64;
const LAYERS: usize = 3;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;

/// Writes the checkpoint into `dir` (created if needed).
pub fn write(dir: &Path, t: Tiny) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "architectures": [if t.layer_skip { "LlamaDLOForCausalLM" } else { "LlamaDLOExAttnForCausalLM" }],
        "model_type": if t.layer_skip { "llama_dlo" } else { "llama_dlo_exattn" },
        "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": t.ctx,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "is_dlo": [false, true, true], "dlo_capacity": 0.9, "rescale_hidden_states": true,
        "scale_factor": 2.0, "scale_gap": 0.05, "gate_init_method": "random", "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap())?;
    let mut state = t.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| normal(&mut state) * std + mean).collect();
        m.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, D], 1.0, 0.0);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        put(format!("{p}.self_attn.q_proj.weight"), &[HEADS * HEAD_DIM, D], 0.2, 0.0);
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[KV_HEADS * HEAD_DIM, D],
            0.2,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[KV_HEADS * HEAD_DIM, D],
            0.2,
            0.0,
        );
        put(format!("{p}.self_attn.o_proj.weight"), &[D, HEADS * HEAD_DIM], 0.2, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), &[F, D], 0.2, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[F, D], 0.2, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[D, F], 0.2, 0.0);
        put(format!("{p}.input_layernorm.weight"), &[D], 0.1, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[D], 0.1, 1.0);
        if l > 0 {
            // Scaled so that roughly half the tokens execute.
            put(format!("model.routers.{l}.weight"), &[1, D], 0.5, 0.0);
        }
    }
    put("model.norm.weight".into(), &[D], 0.1, 1.0);
    put("lm_head.weight".into(), &[VOCAB, D], 0.2, 0.0);
    candle_core::safetensors::save(&m, dir.join("model.safetensors")).map_err(std::io::Error::other)
}

/// A standard-normal sample (xorshift + Box–Muller).
fn normal(s: &mut u64) -> f32 {
    let mut uniform = || {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        ((*s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let (u1, u2) = (uniform(), uniform());
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
