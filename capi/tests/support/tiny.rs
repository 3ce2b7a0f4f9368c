//! Tiny random Llama/DLO checkpoints (HF directory: config.json + model.safetensors) for tests and
//! examples: vocabulary 97, width 32, 3 layers (GQA 4/2 heads), routers on layers 1 and 2, with
//! `dlo_runtime::testing`'s seeded normal weights.

use dlo_passes::ModelConfig;
use dlo_runtime::testing::{random_tensors, write_hf_checkpoint};
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

/// Writes the checkpoint into `dir` (created if needed).
pub fn write(dir: &Path, t: Tiny) -> std::io::Result<()> {
    let config = serde_json::json!({
        "architectures": [if t.layer_skip { "LlamaDLOForCausalLM" } else { "LlamaDLOExAttnForCausalLM" }],
        "model_type": if t.layer_skip { "llama_dlo" } else { "llama_dlo_exattn" },
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": t.ctx,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "is_dlo": [false, true, true], "dlo_capacity": 0.9, "rescale_hidden_states": true,
        "scale_factor": 2.0, "scale_gap": 0.05, "gate_init_method": "random", "torch_dtype": "float32"
    });
    let cfg = ModelConfig::from_hf_json(&config, &dir.join("config.json")).map_err(std::io::Error::other)?;
    write_hf_checkpoint(dir, &config, &random_tensors(&cfg, t.seed))
}
