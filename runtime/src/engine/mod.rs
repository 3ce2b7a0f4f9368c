//! Native engines: one memory-mappable, integrity-checked file holding a lowered DLO model.
//!
//! - [`format`](mod@format): the file layout (the spec), the reader [`format::EngineFile`] and the streaming writer.
//! - [`plan`]: the lowered plan (layer schedule, gate, budget thresholds, quantile tables).
//!
//! Choosing the thresholds and quantile tables on sample text (budget calibration) is the compiler's job
//! (`dlo_compiler::calibrate`); the runtime only reads them from the plan.
//!
//! [`Engine::open`] opens a file, checks its header and plan, and hands out [`Weights`] that read tensors
//! from it on demand (each checksummed as it is read). [`write_engine_file`] lowers a model
//! (config + weights + tokenizer + plan) into an engine. [`open_any`] opens an engine or a checkpoint by
//! looking at the file's magic.

pub mod format;
pub mod plan;

#[cfg(test)]
mod tests;

use crate::chat::ChatTemplate;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::Routing;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use dlo_passes::ModelConfig;
use format::{EngineFile, StorageDtype, TensorSpec};
pub use plan::{Budget, EnginePlan, Gate, RoutedUnit};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The chat template as stored in an engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTemplateSpec {
    /// Jinja source.
    pub source: String,
    /// `bos_token` string the template sees.
    pub bos_token: String,
    /// `eos_token` string the template sees.
    pub eos_token: String,
}

/// The tokenizer as stored in an engine: HF `tokenizer.json` text plus special tokens and chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// The `tokenizer.json` document.
    pub json: String,
    /// Prepend BOS when encoding a prompt.
    pub add_bos: bool,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The chat template, if any.
    pub chat_template: Option<ChatTemplateSpec>,
}

impl TokenizerSpec {
    /// Captures `tok` (serialising its `tokenizer.json`).
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let json = tok.inner().to_string(false).map_err(|e| Error::Tokenizer {
            path: PathBuf::from("<tokenizer>"),
            problem: format!("cannot serialise tokenizer.json: {e}"),
        })?;
        Ok(TokenizerSpec {
            json,
            add_bos: tok.add_bos,
            bos_token_id: tok.bos_token_id,
            eos_token_ids: tok.eos_token_ids.clone(),
            chat_template: tok.chat_template.as_ref().map(|c| ChatTemplateSpec {
                source: c.source.clone(),
                bos_token: c.bos_token.clone(),
                eos_token: c.eos_token.clone(),
            }),
        })
    }
}

/// Where an engine came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The checkpoint it was built from.
    pub source: String,
    /// A hash of the source, when one was computed.
    pub source_hash: Option<String>,
    /// Version of the dlo tool that built it.
    pub dlo_version: String,
    /// Build time, seconds since the Unix epoch.
    pub build_time_unix: u64,
    /// Storage dtype of the tensors.
    pub dtype: StorageDtype,
}

impl Provenance {
    /// Provenance for an engine built now from `source` with this crate's version.
    pub fn now(source: &Path, dtype: StorageDtype) -> Self {
        Provenance {
            source: source.display().to_string(),
            source_hash: None,
            dlo_version: env!("CARGO_PKG_VERSION").to_string(),
            build_time_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            dtype,
        }
    }
}

/// The manifest: everything in an engine except the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model config in HF `config.json` form ([`ModelConfig::to_hf_json`]).
    pub config: serde_json::Value,
    /// The lowered plan.
    pub plan: EnginePlan,
    /// Tokenizer, special tokens and chat template, when the source had one.
    pub tokenizer: Option<TokenizerSpec>,
    /// Where the engine came from.
    pub provenance: Provenance,
}

/// Every tensor a model of `cfg` needs, by HF name, with its shape, in the order engines store them
/// ([`crate::weights::expected_tensors`]).
pub fn model_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    crate::weights::expected_tensors(cfg)
}

/// How an engine stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsDtype {
    /// Each tensor as the source stores it: block-quantized tensors copied block for block (a GGUF's
    /// Q4_1 stays Q4_1), everything else f32.
    Source,
    /// [`tensor_storage`] of this dtype: a float dtype for all tensors, or a block format for the projections.
    Storage(StorageDtype),
}

/// Lowers a model into an engine at `path`: the tensors `cfg` needs (stored as [`tensor_storage`] of
/// `provenance.dtype` says), the plan, the tokenizer and provenance. Tensors are read from `weights` one at a
/// time. Returns the file size.
pub fn write_engine_file(
    path: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: Option<&Tokenizer>,
    plan: &EnginePlan,
    provenance: Provenance,
) -> Result<u64> {
    let dtype = WeightsDtype::Storage(provenance.dtype);
    write_engine_file_as(path, cfg, weights, tokenizer, plan, provenance, dtype)
}

/// [`write_engine_file`] with the weights stored as `dtype` says.
pub fn write_engine_file_as(
    path: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: Option<&Tokenizer>,
    plan: &EnginePlan,
    provenance: Provenance,
    dtype: WeightsDtype,
) -> Result<u64> {
    plan.validate(cfg)
        .map_err(|p| Error::InvalidArgument(format!("engine plan: {p}")))?;
    let manifest = Manifest {
        config: cfg.to_hf_json(),
        plan: plan.clone(),
        tokenizer: tokenizer.map(TokenizerSpec::from_tokenizer).transpose()?,
        provenance: provenance.clone(),
    };
    let tensors = model_tensors(cfg);
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(name, shape)| {
            let dtype = match dtype {
                WeightsDtype::Source => match weights.quant_type(name) {
                    Some(t) => StorageDtype::Blocks(t),
                    None => StorageDtype::F32,
                },
                WeightsDtype::Storage(d) => tensor_storage(name, shape, d),
            };
            TensorSpec {
                name: name.clone(),
                dtype: packed_storage(dtype, shape),
                shape: shape.clone(),
            }
        })
        .collect();
    let json = serde_json::to_value(&manifest).map_err(|e| Error::InvalidArgument(format!("manifest: {e}")))?;
    format::write_engine(path, &json, &specs, |i| {
        let (name, shape) = &tensors[i];
        let want = specs[i].dtype;
        // Blocks already in the wanted format are copied (or repacked), not requantized.
        if let Some((t, bytes)) = weights.raw_blocks(name)? {
            if want.blocks() == Some(t) {
                return Ok(want.pack_rows(bytes, shape));
            }
        }
        let t = weights.get(name, shape, want.dtype(), &Device::Cpu)?;
        want.tensor_bytes(&t)
    })
}

/// Block storage in its packed form ([`StorageDtype::Packed`]) where the type has one and the shape allows it
/// (its [`StorageDtype::byte_len`]: 2-D, rows a multiple of eight): then the packed kernels run the weight in
/// place from the engine's map, with no repacking at load. The layout does not depend on the CPU; one without
/// the packed kernels unpacks it at load.
fn packed_storage(dtype: StorageDtype, shape: &[usize]) -> StorageDtype {
    match dtype.packed() {
        Some(p) if p.byte_len(shape).is_ok() => p,
        _ => dtype,
    }
}

/// The storage of tensor `name` (of `shape`) in an engine whose weights are `dtype`:
/// - a float dtype: every tensor in it;
/// - a block format: the decoder layers' projections in it (a k-quant whose 256-element super block does not
///   divide the rows falls back as llama.cpp's quantizer does: Q4_K → Q5_0, Q6_K → Q8_0, …, see
///   [`crate::model::weight::quant_for_row`]), the embeddings and an untied lm_head in Q8_0 (llama.cpp keeps
///   its output and embedding tensors at higher precision too), and norms, routers and biases in f32.
pub fn tensor_storage(name: &str, shape: &[usize], dtype: StorageDtype) -> StorageDtype {
    let StorageDtype::Blocks(t) = dtype else { return dtype };
    let cols = shape.last().copied().unwrap_or(0);
    let block = |t| match crate::model::weight::quant_for_row(t, cols) {
        Some(t) => StorageDtype::Blocks(t),
        None => StorageDtype::F32,
    };
    if shape.len() != 2 || name.starts_with("model.routers.") || !name.ends_with(".weight") {
        return StorageDtype::F32;
    }
    if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        return block(GgmlDType::Q8_0);
    }
    if name.contains(".self_attn.") || name.contains(".mlp.") {
        return block(t);
    }
    StorageDtype::F32
}

/// An opened engine.
#[derive(Debug, Clone)]
pub struct Engine {
    file: Arc<EngineFile>,
    manifest: Manifest,
    config: ModelConfig,
}

impl Engine {
    /// Maps the engine at `path` and validates its header, manifest, plan and tensor table. Tensor
    /// checksums are verified as tensors are first read (see [`format`](mod@format)); [`Engine::verify`] checks all.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = EngineFile::open(path)?;
        let manifest: Manifest = serde_json::from_value(file.take_manifest_json())
            .map_err(|e| Error::format(path, format!("manifest is invalid: {e}")))?;
        let config = ModelConfig::from_hf_json(&manifest.config, path)?;
        manifest
            .plan
            .validate(&config)
            .map_err(|p| Error::format(path, format!("manifest plan: {p}")))?;
        let file = Arc::new(file);
        // The layer count against the tensor table first, then every tensor's name and shape.
        crate::weights::Weights::from_engine(file.clone())
            .check(&config)
            .into_result(path)?;
        Ok(Engine { file, manifest, config })
    }

    /// The engine file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The validated model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The lowered plan.
    pub fn plan(&self) -> &EnginePlan {
        &self.manifest.plan
    }

    /// The open file (tensor table, raw bytes).
    pub fn file(&self) -> &EngineFile {
        &self.file
    }

    /// The weights, read from the file on demand (nothing is read until a tensor is loaded).
    pub fn weights(&self) -> Weights {
        Weights::from_engine(self.file.clone())
    }

    /// The stored tokenizer, if the engine has one.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let Some(t) = &self.manifest.tokenizer else {
            return Ok(None);
        };
        let chat = t.chat_template.as_ref().map(|c| ChatTemplate {
            source: c.source.clone(),
            bos_token: c.bos_token.clone(),
            eos_token: c.eos_token.clone(),
        });
        Tokenizer::from_json_str(
            &t.json,
            self.path(),
            t.add_bos,
            t.bos_token_id,
            t.eos_token_ids.clone(),
            chat,
        )
        .map(Some)
    }

    /// The routing rule for `budget` (`None`: the engine's default); see [`EnginePlan::routing`].
    pub fn routing(&self, budget: Option<f64>) -> Result<Routing> {
        self.manifest.plan.routing(budget)
    }

    /// Verifies every tensor checksum now.
    pub fn verify(&self) -> Result<()> {
        self.file.verify()
    }
}

/// Whether `path` is a file that starts with the engine magic.
pub fn is_engine(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == format::MAGIC
}

/// A model opened from an engine or a checkpoint.
pub struct Opened {
    /// Validated config.
    pub config: ModelConfig,
    /// Weights by HF name.
    pub weights: Weights,
    /// Tokenizer, when present.
    pub tokenizer: Option<Tokenizer>,
    /// The engine's plan; `None` for a checkpoint (reference routing).
    pub plan: Option<EnginePlan>,
    /// Load-report warnings (unused tensors in a checkpoint).
    pub warnings: Vec<String>,
}

impl Opened {
    /// The routing rule for an optional budget override ([`routing_for`] with this model's plan).
    pub fn routing(&self, budget: Option<f64>) -> Result<Routing> {
        routing_for(self.plan.as_ref(), budget)
    }

    /// Token ids that end generation ([`stop_tokens`] of this model's config and tokenizer).
    pub fn stop_tokens(&self) -> Vec<u32> {
        stop_tokens(&self.config, self.tokenizer.as_ref())
    }
}

/// The routing rule of a model for an optional budget override — the one budget → routing rule of every
/// front end (dlo-run, the C ABI, evaluation): an engine's plan decides ([`EnginePlan::routing`]); a model
/// without one (a checkpoint) follows the reference rule and refuses a budget.
pub fn routing_for(plan: Option<&EnginePlan>, budget: Option<f64>) -> Result<Routing> {
    match (plan, budget) {
        (Some(p), b) => p.routing(b),
        (None, None) => Ok(Routing::Reference),
        (None, Some(r)) => {
            plan::check_budget(r)?;
            Err(Error::InvalidArgument(
                "a budget needs an engine (dlo-compile build --calibration FILE); checkpoints follow the \
                 reference rule"
                    .into(),
            ))
        }
    }
}

/// Token ids that end generation: the config's EOS ids, then the tokenizer's that are not among them.
pub fn stop_tokens(cfg: &ModelConfig, tokenizer: Option<&Tokenizer>) -> Vec<u32> {
    let mut ids = cfg.eos_token_ids.clone();
    for &t in tokenizer.map(|t| t.eos_token_ids.as_slice()).unwrap_or_default() {
        if !ids.contains(&t) {
            ids.push(t);
        }
    }
    ids
}

/// [`open_any`], then builds the model with `opts`. An engine's tokenizer (SmolLM2's is 2 MB of JSON) is read on
/// a second thread while the weights load, so that it adds nothing to the time to the first forward pass.
pub fn load_any(path: &Path, opts: &crate::RuntimeOptions) -> Result<(Opened, crate::Model)> {
    if !is_engine(path) {
        let opened = open_any(path)?;
        let model = crate::Model::load_opts(&opened.config, &opened.weights, opts)?;
        return Ok((opened, model));
    }
    let e = Engine::open(path)?;
    let weights = e.weights();
    let (model, tokenizer) = std::thread::scope(|s| {
        let tokenizer = s.spawn(|| e.tokenizer());
        let model = crate::Model::load_opts(e.config(), &weights, opts);
        let tokenizer = tokenizer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (model, tokenizer)
    });
    Ok((engine_opened(&e, weights, tokenizer?), model?))
}

/// What [`open_any`] returns for an engine.
fn engine_opened(e: &Engine, weights: Weights, tokenizer: Option<Tokenizer>) -> Opened {
    Opened {
        config: e.config().clone(),
        weights,
        tokenizer,
        plan: Some(e.plan().clone()),
        warnings: vec![],
    }
}

/// Opens `path` as an engine when it starts with the engine magic, otherwise as a checkpoint
/// ([`Checkpoint::open`]: HF directory or GGUF).
pub fn open_any(path: &Path) -> Result<Opened> {
    if crate::tensorrt::is_deployment(path) {
        return Err(crate::tensorrt::cannot_run(path));
    }
    if is_engine(path) {
        let e = Engine::open(path)?;
        Ok(engine_opened(&e, e.weights(), e.tokenizer()?))
    } else {
        let c = Checkpoint::open(path)?;
        Ok(Opened {
            warnings: c.report.warnings(),
            config: c.config,
            weights: c.weights,
            tokenizer: c.tokenizer,
            plan: None,
        })
    }
}
