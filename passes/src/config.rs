//! Model configuration: the Llama-family hyper-parameters and the DLO routing settings.
//!
//! [`ModelConfig`] is the internal, validated form. It is read from and written to HF `config.json`
//! (including the DLO reference implementation's keys, see `dlo-method.md` §3.6) by
//! [`ModelConfig::from_hf_json`] / [`ModelConfig::to_hf_json`]; unknown keys of the source file are kept
//! in [`ModelConfig::extra`] so that a round trip does not lose them.

use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Errors from reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required key is absent.
    #[error("{path}: missing config key `{key}`")]
    Missing { path: PathBuf, key: String },
    /// A key has the wrong JSON type or an impossible value.
    #[error("{path}: config key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
    /// Two keys disagree with each other.
    #[error("{path}: contradictory config: {problem}")]
    Contradiction { path: PathBuf, problem: String },
    /// `model_type` / `architectures` names something we cannot run.
    #[error(
        "{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, llama_dlo, llama_dlo_exattn)"
    )]
    UnknownArchitecture { path: PathBuf, arch: String },
    /// The file is not JSON.
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which Llama-family variant the checkpoint is. They share one model definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, SmolLM2, and everything else with `model_type: llama`.
    Llama,
    /// Mistral: Llama layout (sliding window is ignored: contexts we run fit in the window).
    Mistral,
    /// Qwen2: Llama layout plus biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    /// The HF `model_type` string for a plain (non-DLO) checkpoint.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
    /// The HF `architectures[0]` string for a plain checkpoint.
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling (`rope_type: llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation (`rope_type: linear`): positions divided by `factor`.
    Linear { factor: f64 },
}

/// What a router's "skip" removes for a token (`dlo-method.md` §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipKind {
    /// Only the MLP sub-block is skipped; attention always runs (`llama_dlo_exattn`, the paper default).
    Mlp,
    /// The whole layer is skipped, MoD-style (`llama_dlo`).
    Layer,
}

impl SkipKind {
    /// The reference implementation's `model_type` for this skip kind.
    pub fn model_type(self) -> &'static str {
        match self {
            SkipKind::Mlp => "llama_dlo_exattn",
            SkipKind::Layer => "llama_dlo",
        }
    }
    /// The reference implementation's `architectures[0]`.
    pub fn architecture(self) -> &'static str {
        match self {
            SkipKind::Mlp => "LlamaDLOExAttnForCausalLM",
            SkipKind::Layer => "LlamaDLOForCausalLM",
        }
    }
    /// Parses `mlp` / `layer`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mlp" => Some(SkipKind::Mlp),
            "layer" => Some(SkipKind::Layer),
            _ => None,
        }
    }
    /// `mlp` / `layer`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::Mlp => "mlp",
            SkipKind::Layer => "layer",
        }
    }
}

/// Routing-loss label type (`dlo-method.md` §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// Labels = own top-k membership (MoD's auxiliary predictor).
    SelfTopK,
    /// Per-layer similarity ranking.
    Cos,
    /// One similarity threshold pooled over all DLO layers (the paper's choice).
    CosGlobal,
}

impl LossType {
    /// Parses the reference's names `self`, `cos`, `cos-global`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "self" => Some(LossType::SelfTopK),
            "cos" => Some(LossType::Cos),
            "cos-global" => Some(LossType::CosGlobal),
            _ => None,
        }
    }
    /// The reference's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LossType::SelfTopK => "self",
            LossType::Cos => "cos",
            LossType::CosGlobal => "cos-global",
        }
    }
}

/// Training capacity: one scalar, or one value per layer (`null` for layers without a router).
#[derive(Debug, Clone, PartialEq)]
pub enum Capacity {
    /// The same capacity for every DLO layer.
    Scalar(f64),
    /// Per-layer capacities, as the reference saves after cos-global training.
    PerLayer(Vec<Option<f64>>),
}

impl Capacity {
    /// The capacity of layer `l` (1.0 where a per-layer list has `null`).
    pub fn of_layer(&self, l: usize) -> f64 {
        match self {
            Capacity::Scalar(c) => *c,
            Capacity::PerLayer(v) => v.get(l).copied().flatten().unwrap_or(1.0),
        }
    }
}

/// DLO routing settings, as the reference's `LlamaDLOConfig` records them (`dlo-method.md` §3.6).
#[derive(Debug, Clone, PartialEq)]
pub struct DloConfig {
    /// Skip granularity (from `model_type`).
    pub skip: SkipKind,
    /// Which layers have a router.
    pub is_dlo: Vec<bool>,
    /// Training capacity.
    pub capacity: Capacity,
    /// λ, the routing-loss weight.
    pub loss_coefficient: f64,
    /// Routing-loss label type.
    pub loss_type: LossType,
    /// Whether the MLP output is multiplied by the gate g.
    pub rescale_hidden_states: bool,
    /// α: the gate is 0.5α + β(r − 0.5).
    pub scale_factor: f64,
    /// β.
    pub scale_gap: f64,
    /// `zero` or `random`.
    pub gate_init_method: String,
}

impl DloConfig {
    /// The paper's defaults (`dlo-method.md` §3.1, "paper script" column) for `n_layers` routed layers.
    pub fn paper_default(skip: SkipKind, n_layers: usize) -> Self {
        DloConfig {
            skip,
            is_dlo: vec![true; n_layers],
            capacity: Capacity::Scalar(0.9),
            loss_coefficient: 1.0,
            loss_type: LossType::CosGlobal,
            rescale_hidden_states: true,
            scale_factor: 2.0,
            scale_gap: 0.05,
            gate_init_method: "zero".into(),
        }
    }

    /// The gate g for router score r (`dlo-method.md` §4.3; [`crate::Gate`]).
    pub fn gate(&self, r: f64) -> f64 {
        self.gate_params().of_score(r)
    }
}

/// The validated model configuration shared by every stage.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Variant.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// d, the residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2, or `attention_bias: true`).
    pub attention_bias: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    pub eos_token_ids: Vec<u32>,
    /// The dtype the weights are stored in (`torch_dtype`), if stated.
    pub torch_dtype: Option<String>,
    /// DLO routing, for routed checkpoints.
    pub dlo: Option<DloConfig>,
    /// Keys of the source config.json we do not interpret, kept for round trips (includes our provenance).
    pub extra: Map<String, Value>,
}

/// The most decoder layers a config may declare (the largest published models have a few hundred).
pub const MAX_LAYERS: usize = 1 << 16;
/// The largest vocabulary, width or context length a config may declare; keeps every product of two
/// sizes far from overflow.
pub const MAX_DIM: usize = 1 << 24;
/// The most attention heads, and the widest head, a config may declare.
pub const MAX_HEADS: usize = 1 << 16;

/// Keys [`ModelConfig`] interprets; everything else goes to `extra`.
const KNOWN_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "bos_token_id",
    "eos_token_id",
    "torch_dtype",
    "hidden_act",
    "is_dlo",
    "dlo_capacity",
    "dlo_loss_coefficient",
    "dlo_loss_type",
    "rescale_hidden_states",
    "scale_factor",
    "scale_gap",
    "gate_init_method",
];

struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            problem: problem.into(),
        }
    }
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.to_path_buf(),
            key: key.into(),
        }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.invalid(key, format!("expected a non-negative integer, found {v}"))),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key))
    }
    fn positive(&self, key: &str) -> Result<usize, ConfigError> {
        let v = self.usize(key)?;
        if v == 0 {
            return Err(self.invalid(key, "must be positive"));
        }
        Ok(v)
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a finite number, found {v}"))),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected true or false, found {v}"))),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.invalid(key, format!("expected a string, found {v}"))),
        }
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>, ConfigError> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| self.invalid(key, format!("expected token ids, found {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(|x| vec![x])
                .ok_or_else(|| self.invalid(key, format!("expected a token id, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hf_json(&value, path)
    }

    /// Validates an HF config object; `path` is only used in error messages.
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self, ConfigError> {
        let obj = value.as_object().ok_or_else(|| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            problem: "expected a JSON object".into(),
        })?;
        let r = Reader { path, obj };
        let model_type = r.str_opt("model_type")?.ok_or_else(|| r.missing("model_type"))?;
        let (arch, skip) = match model_type {
            "llama" => (Arch::Llama, None),
            "mistral" => (Arch::Mistral, None),
            "qwen2" => (Arch::Qwen2, None),
            "llama_dlo" => (Arch::Llama, Some(SkipKind::Layer)),
            "llama_dlo_exattn" => (Arch::Llama, Some(SkipKind::Mlp)),
            other => {
                return Err(ConfigError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                })
            }
        };
        let hidden_size = r.positive("hidden_size")?;
        let num_attention_heads = r.positive("num_attention_heads")?;
        let num_key_value_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ConfigError::Contradiction {
                path: path.to_path_buf(),
                problem: format!(
                    "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
                ),
            });
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(ConfigError::Contradiction {
                        path: path.to_path_buf(),
                        problem: format!(
                            "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"
                        ),
                    });
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(r.invalid("head_dim", format!("must be even and positive, found {head_dim}")));
        }
        let num_hidden_layers = r.positive("num_hidden_layers")?;
        if num_hidden_layers > MAX_LAYERS {
            // Before anything sized by it (the DLO per-layer lists) is read.
            return Err(r.invalid(
                "num_hidden_layers",
                format!("{num_hidden_layers} is larger than the supported maximum {MAX_LAYERS}"),
            ));
        }
        let rope_scaling = match r.get("rope_scaling") {
            None => None,
            Some(Value::Object(o)) => {
                let sr = Reader { path, obj: o };
                let ty = sr
                    .str_opt("rope_type")?
                    .or(sr.str_opt("type")?)
                    .ok_or_else(|| r.invalid("rope_scaling", "no `rope_type`"))?;
                let factor = sr
                    .f64_opt("factor")?
                    .ok_or_else(|| r.invalid("rope_scaling", "no `factor`"))?;
                match ty {
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: sr.f64_opt("low_freq_factor")?.unwrap_or(1.0),
                        high_freq_factor: sr.f64_opt("high_freq_factor")?.unwrap_or(4.0),
                        original_max_position_embeddings: sr
                            .usize_opt("original_max_position_embeddings")?
                            .unwrap_or(8192),
                    }),
                    "linear" => Some(RopeScaling::Linear { factor }),
                    "default" => None,
                    other => {
                        return Err(r.invalid(
                            "rope_scaling",
                            format!("unsupported rope_type `{other}` (supported: llama3, linear)"),
                        ))
                    }
                }
            }
            Some(v) => return Err(r.invalid("rope_scaling", format!("expected an object, found {v}"))),
        };
        match r.str_opt("hidden_act")? {
            None | Some("silu") | Some("swish") => {}
            Some(other) => {
                return Err(r.invalid(
                    "hidden_act",
                    format!("unsupported activation `{other}` (Llama-family models use silu)"),
                ))
            }
        }
        let eos = r.token_ids("eos_token_id")?;
        if eos.is_empty() && r.get("eos_token_id").is_some() {
            return Err(r.invalid(
                "eos_token_id",
                "is an empty list; give the end-of-sequence token id (or leave the key out)",
            ));
        }
        let bos = r.token_ids("bos_token_id")?.first().copied();
        let dlo = match skip {
            None => None,
            Some(skip) => Some(Self::read_dlo(&r, skip, num_hidden_layers)?),
        };
        let extra = obj
            .iter()
            .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let cfg = ModelConfig {
            arch,
            vocab_size: r.positive("vocab_size")?,
            hidden_size,
            intermediate_size: r.positive("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: r.f64_opt("rope_theta")?.unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: r.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: r.bool_opt("attention_bias")?.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: bos,
            eos_token_ids: eos,
            torch_dtype: r.str_opt("torch_dtype")?.map(str::to_string),
            dlo,
            extra,
        };
        cfg.check_ranges(path)?;
        Ok(cfg)
    }

    /// The value checks that keep every later computation finite and every allocation bounded: sizes
    /// within [`MAX_LAYERS`] / [`MAX_DIM`], RoPE and norm constants that give finite numbers, special tokens
    /// inside the vocabulary. Each failure names the key, the value and the allowed range.
    fn check_ranges(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            problem,
        };
        let bounded = |key: &str, v: usize, max: usize| {
            if v > max {
                return Err(invalid(key, format!("{v} is larger than the supported maximum {max}")));
            }
            Ok(())
        };
        // num_hidden_layers is bounded as soon as it is read (before the per-layer DLO lists).
        bounded("vocab_size", self.vocab_size, MAX_DIM)?;
        bounded("hidden_size", self.hidden_size, MAX_DIM)?;
        bounded("intermediate_size", self.intermediate_size, MAX_DIM)?;
        bounded("num_attention_heads", self.num_attention_heads, MAX_HEADS)?;
        bounded("head_dim", self.head_dim, MAX_HEADS)?;
        bounded("max_position_embeddings", self.max_position_embeddings, MAX_DIM)?;
        if self.max_position_embeddings == 0 {
            return Err(invalid("max_position_embeddings", "must be positive, found 0".into()));
        }
        if self.rope_theta <= 0.0 {
            return Err(invalid(
                "rope_theta",
                format!(
                    "must be positive (RoPE divides by its powers), found {}",
                    self.rope_theta
                ),
            ));
        }
        if self.rms_norm_eps < 0.0 {
            return Err(invalid(
                "rms_norm_eps",
                format!(
                    "must not be negative (it is added under a square root), found {}",
                    self.rms_norm_eps
                ),
            ));
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) if *factor <= 0.0 => {
                return Err(invalid(
                    "rope_scaling",
                    format!("`factor` must be positive (positions are divided by it), found {factor}"),
                ))
            }
            Some(RopeScaling::Linear { .. }) => {}
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                if *factor <= 0.0 || *low_freq_factor <= 0.0 || high_freq_factor <= low_freq_factor {
                    return Err(invalid(
                        "rope_scaling",
                        format!(
                            "llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, found \
                             factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor {high_freq_factor}"
                        ),
                    ));
                }
                if *original_max_position_embeddings == 0 {
                    return Err(invalid(
                        "rope_scaling",
                        "`original_max_position_embeddings` must be positive, found 0".into(),
                    ));
                }
            }
        }
        let vocab = self.vocab_size;
        if let Some(b) = self.bos_token_id.filter(|&b| b as usize >= vocab) {
            return Err(invalid(
                "bos_token_id",
                format!("{b} is outside the vocabulary (vocab_size {vocab})"),
            ));
        }
        if let Some(e) = self.eos_token_ids.iter().find(|&&e| e as usize >= vocab) {
            return Err(invalid(
                "eos_token_id",
                format!("{e} is outside the vocabulary (vocab_size {vocab})"),
            ));
        }
        if let Some(d) = &self.dlo {
            let caps: Vec<f64> = match &d.capacity {
                Capacity::Scalar(c) => vec![*c],
                Capacity::PerLayer(v) => v.iter().flatten().copied().collect(),
            };
            if let Some(c) = caps.iter().find(|c| !(0.0..=1.0).contains(*c)) {
                return Err(invalid(
                    "dlo_capacity",
                    format!("capacities are fractions of tokens in [0, 1], found {c}"),
                ));
            }
        }
        Ok(())
    }

    fn read_dlo(r: &Reader, skip: SkipKind, n_layers: usize) -> Result<DloConfig, ConfigError> {
        let is_dlo: Vec<bool> = match r.get("is_dlo") {
            None => return Err(r.missing("is_dlo")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_bool()
                        .ok_or_else(|| r.invalid("is_dlo", format!("expected booleans, found {v}")))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(r.invalid("is_dlo", format!("expected a list of booleans, found {v}"))),
        };
        if is_dlo.len() != n_layers {
            return Err(ConfigError::Contradiction {
                path: r.path.to_path_buf(),
                problem: format!(
                    "is_dlo has {} entries but num_hidden_layers is {n_layers}",
                    is_dlo.len()
                ),
            });
        }
        let capacity = match r.get("dlo_capacity") {
            None => Capacity::Scalar(0.5),
            Some(Value::Array(a)) => {
                if a.len() != n_layers {
                    return Err(ConfigError::Contradiction {
                        path: r.path.to_path_buf(),
                        problem: format!(
                            "dlo_capacity has {} entries but num_hidden_layers is {n_layers}",
                            a.len()
                        ),
                    });
                }
                Capacity::PerLayer(
                    a.iter()
                        .map(|v| match v {
                            Value::Null => Ok(None),
                            v => v.as_f64().map(Some).ok_or_else(|| {
                                r.invalid("dlo_capacity", format!("expected numbers or null, found {v}"))
                            }),
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
            Some(v) => Capacity::Scalar(
                v.as_f64()
                    .ok_or_else(|| r.invalid("dlo_capacity", format!("expected a number or a list, found {v}")))?,
            ),
        };
        let loss_type = match r.str_opt("dlo_loss_type")? {
            None => LossType::SelfTopK,
            Some(s) => LossType::parse(s).ok_or_else(|| {
                r.invalid(
                    "dlo_loss_type",
                    format!("unknown loss type `{s}` (self, cos, cos-global)"),
                )
            })?,
        };
        // Defaults are `LlamaDLOExAttnConfig`'s (dlo-method.md §3.6); the writer always records every key.
        Ok(DloConfig {
            skip,
            is_dlo,
            capacity,
            loss_coefficient: r.f64_opt("dlo_loss_coefficient")?.unwrap_or(1.0),
            loss_type,
            rescale_hidden_states: r.bool_opt("rescale_hidden_states")?.unwrap_or(true),
            scale_factor: r.f64_opt("scale_factor")?.unwrap_or(2.0),
            scale_gap: r.f64_opt("scale_gap")?.unwrap_or(0.05),
            gate_init_method: r.str_opt("gate_init_method")?.unwrap_or("zero").to_string(),
        })
    }

    /// The HF `config.json` object (reference-compatible for DLO models), with `extra` keys kept.
    pub fn to_hf_json(&self) -> Value {
        let mut o = Map::new();
        let (model_type, architecture) = match &self.dlo {
            Some(d) => (d.skip.model_type(), d.skip.architecture()),
            None => (self.arch.hf_model_type(), self.arch.hf_architecture()),
        };
        o.insert("architectures".into(), json!([architecture]));
        o.insert("model_type".into(), json!(model_type));
        o.insert("vocab_size".into(), json!(self.vocab_size));
        o.insert("hidden_size".into(), json!(self.hidden_size));
        o.insert("intermediate_size".into(), json!(self.intermediate_size));
        o.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        o.insert("num_attention_heads".into(), json!(self.num_attention_heads));
        o.insert("num_key_value_heads".into(), json!(self.num_key_value_heads));
        o.insert("head_dim".into(), json!(self.head_dim));
        o.insert("hidden_act".into(), json!("silu"));
        o.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        o.insert("rope_theta".into(), json!(self.rope_theta));
        o.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            },
        );
        o.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        o.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        o.insert("attention_bias".into(), json!(self.attention_bias));
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                o.insert("eos_token_id".into(), json!(one));
            }
            many => {
                o.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(t) = &self.torch_dtype {
            o.insert("torch_dtype".into(), json!(t));
        }
        if let Some(d) = &self.dlo {
            o.insert("is_dlo".into(), json!(d.is_dlo));
            o.insert(
                "dlo_capacity".into(),
                match &d.capacity {
                    Capacity::Scalar(c) => json!(c),
                    Capacity::PerLayer(v) => json!(v),
                },
            );
            o.insert("dlo_loss_coefficient".into(), json!(d.loss_coefficient));
            o.insert("dlo_loss_type".into(), json!(d.loss_type.as_str()));
            o.insert("rescale_hidden_states".into(), json!(d.rescale_hidden_states));
            o.insert("scale_factor".into(), json!(d.scale_factor));
            o.insert("scale_gap".into(), json!(d.scale_gap));
            o.insert("gate_init_method".into(), json!(d.gate_init_method));
        }
        for (k, v) in &self.extra {
            o.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(o)
    }

    /// Query-head groups per KV head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Whether layer `l` has a router.
    pub fn is_routed(&self, l: usize) -> bool {
        self.dlo
            .as_ref()
            .is_some_and(|d| d.is_dlo.get(l).copied().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
            "eos_token_id": 2, "some_extra": "kept"
        })
    }

    #[test]
    fn round_trip_keeps_values_and_extra_keys() {
        let p = Path::new("config.json");
        let c = ModelConfig::from_hf_json(&base(), p).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.gqa_groups(), 2);
        let back = ModelConfig::from_hf_json(&c.to_hf_json(), p).unwrap();
        assert_eq!(c, back);
        assert_eq!(back.extra["some_extra"], json!("kept"));
    }

    #[test]
    fn missing_and_contradictory_keys_name_the_key() {
        let p = Path::new("/m/config.json");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("/m/config.json") && e.contains("hidden_size"), "{e}");
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture `gpt2`"), "{e}");
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("gelu"), "{e}");
        let mut v = base();
        v["hidden_size"] = json!("wide");
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("integer"), "{e}");
    }

    #[test]
    fn dlo_keys_are_read_and_is_dlo_length_checked() {
        let p = Path::new("config.json");
        let mut v = base();
        v["model_type"] = json!("llama_dlo_exattn");
        v["is_dlo"] = json!([true, false]);
        v["dlo_capacity"] = json!([0.8, null]);
        v["dlo_loss_type"] = json!("cos-global");
        let c = ModelConfig::from_hf_json(&v, p).unwrap();
        let d = c.dlo.as_ref().unwrap();
        assert_eq!(d.skip, SkipKind::Mlp);
        assert_eq!(d.capacity.of_layer(0), 0.8);
        assert!(c.is_routed(0) && !c.is_routed(1));
        assert!((d.gate(0.5) - 1.0).abs() < 1e-12);
        assert_eq!(ModelConfig::from_hf_json(&c.to_hf_json(), p).unwrap(), c);
        v["is_dlo"] = json!([true]);
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("is_dlo has 1 entries but num_hidden_layers is 2"), "{e}");
    }

    #[test]
    fn llama3_rope_scaling_is_parsed() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_hf_json(&v, Path::new("c.json")).unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
    }

    /// Each value that would give NaN logits or an unbounded allocation is refused at load, naming the
    /// key and the value.
    #[test]
    fn values_that_break_the_model_are_refused_with_the_key() {
        let p = Path::new("/m/config.json");
        let cases: Vec<(&str, Value, &str)> = vec![
            ("rope_theta", json!(0.0), "must be positive"),
            ("rope_theta", json!(-5.0), "found -5"),
            ("rms_norm_eps", json!(-1e-5), "must not be negative"),
            ("max_position_embeddings", json!(0), "must be positive, found 0"),
            (
                "num_hidden_layers",
                json!(1_000_000_000u64),
                "larger than the supported maximum 65536",
            ),
            ("vocab_size", json!(1u64 << 40), "larger than the supported maximum"),
            (
                "bos_token_id",
                json!(100),
                "100 is outside the vocabulary (vocab_size 100)",
            ),
            ("eos_token_id", json!([2, 100_000]), "100000 is outside the vocabulary"),
            ("eos_token_id", json!([]), "empty list"),
            ("eos_token_id", json!(1u64 << 32), "expected a token id"),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 0.0}),
                "`factor` must be positive",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}),
                "high_freq_factor > low_freq_factor",
            ),
        ];
        for (key, value, want) in cases {
            let mut v = base();
            v[key] = value.clone();
            let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
            assert!(
                e.contains("/m/config.json") && e.contains(&format!("`{key}`")) && e.contains(want),
                "{key} = {value}: {e}"
            );
        }
        let mut v = base();
        v["model_type"] = json!("llama_dlo");
        v["is_dlo"] = json!([true, true]);
        v["dlo_capacity"] = json!([0.5, 1.5]);
        let e = ModelConfig::from_hf_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("dlo_capacity") && e.contains("1.5"), "{e}");
    }
}
