//! Named tensors behind one interface, whatever the file format.
//!
//! Loaders (HF safetensors directories, GGUF files, engine files) produce a [`Weights`]: tensors keyed by
//! their **HF names** (`model.layers.3.self_attn.q_proj.weight`), in HF layout (GGUF's Q/K row permutation
//! already undone, tied embeddings not duplicated). The model asks for a tensor by name and expected shape;
//! a missing tensor or wrong shape is an error naming the file and the tensor.
//!
//! [`expected_tensors`] lists every tensor a config needs (name and shape); [`Weights::check`] compares a
//! checkpoint against it and returns a [`LoadReport`] (missing, mismatched, unsupported, unused), which
//! loaders turn into an error with [`LoadReport::into_result`].
//!
//! OWNER: loader work (issue 2). The API below is what the model definition uses; keep it.

use crate::engine::format::StorageDtype;
use crate::error::{candle_message, Error, Result};
use crate::model::layers::Load;
use crate::model::weight::{ggml_name, BlockBytes, DenseWeight, Weight, QUANT_TYPES};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use dlo_passes::ModelConfig;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where tensors come from.
enum Store {
    /// Memory-mapped safetensors files (one or several shards).
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// Tensors already materialised (tests, passes, training).
    Loaded(HashMap<String, Tensor>),
    /// A memory-mapped engine file; tensors are copied out (and checksummed) when first loaded.
    Engine(std::sync::Arc<crate::engine::format::EngineFile>),
    /// A GGUF file, read tensor by tensor (in ggml blocks or dequantized).
    Gguf(std::sync::Arc<crate::gguf::GgufTensors>),
}

/// A set of named tensors from one checkpoint.
pub struct Weights {
    store: Store,
    path: PathBuf,
}

impl Weights {
    /// Wraps tensors already in memory; `path` names their origin in errors.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, path: impl Into<PathBuf>) -> Self {
        Weights {
            store: Store::Loaded(tensors),
            path: path.into(),
        }
    }

    /// Maps safetensors files without reading them; `path` names the checkpoint in errors.
    pub fn from_safetensors(files: &[PathBuf], path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        // SAFETY: the files are mapped read-only; we never hand out mutable views. Truncation of a
        // mapped file by another process is outside what any mmap-based loader can defend against.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| Error::format(&path, format!("invalid safetensors: {}", candle_message(e))))?;
        Ok(Weights {
            store: Store::Safetensors(st),
            path,
        })
    }

    /// Reads tensors from a mapped engine file.
    pub(crate) fn from_engine(file: std::sync::Arc<crate::engine::format::EngineFile>) -> Self {
        let path = file.path().to_path_buf();
        Weights {
            store: Store::Engine(file),
            path,
        }
    }

    /// Reads tensors from a GGUF file on demand.
    pub(crate) fn from_gguf(g: std::sync::Arc<crate::gguf::GgufTensors>) -> Self {
        let path = g.path().to_path_buf();
        Weights {
            store: Store::Gguf(g),
            path,
        }
    }

    /// The checkpoint these weights come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.store {
            Store::Safetensors(st) => st.get(name).is_ok(),
            Store::Loaded(m) => m.contains_key(name),
            Store::Engine(e) => e.entry(name).is_some(),
            Store::Gguf(g) => g.shape(name).is_some(),
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.store {
            Store::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Store::Loaded(m) => m.keys().cloned().collect(),
            Store::Engine(e) => e.tensors().iter().map(|t| t.name.clone()).collect(),
            Store::Gguf(g) => g.names().cloned().collect(),
        };
        v.sort();
        v
    }

    /// Shape of a tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Safetensors(st) => st.get(name).ok().map(|v| v.shape().to_vec()),
            Store::Loaded(m) => m.get(name).map(|t| t.dims().to_vec()),
            Store::Engine(e) => e.entry(name).map(|t| t.shape.clone()),
            Store::Gguf(g) => g.shape(name).map(<[usize]>::to_vec),
        }
    }

    /// The storage dtype of a tensor (lower-case, e.g. `bf16`, `i64`, `q4_1`), if present.
    pub fn storage_dtype(&self, name: &str) -> Option<String> {
        match &self.store {
            Store::Safetensors(st) => st.get(name).ok().map(|v| format!("{:?}", v.dtype()).to_lowercase()),
            Store::Loaded(m) => m.get(name).map(|t| t.dtype().as_str().to_string()),
            Store::Engine(e) => e.entry(name).map(|t| t.dtype.as_str().to_string()),
            Store::Gguf(g) => g.dtype(name).map(|t| ggml_name(t).to_string()),
        }
    }

    /// The number of decoder layers the tensor names describe: one more than the highest index `N` of a
    /// `model.layers.N.` or `model.routers.N.` tensor (0 when there is none). Bounded by the tensor table,
    /// unlike a layer count read from a config.
    pub fn layer_count(&self) -> usize {
        self.names()
            .iter()
            .filter_map(|n| {
                let rest = n
                    .strip_prefix("model.layers.")
                    .or_else(|| n.strip_prefix("model.routers."))?;
                rest.split('.').next()?.parse::<usize>().ok()
            })
            .max()
            .map_or(0, |m| m.saturating_add(1))
    }

    /// Compares these weights with what `cfg` needs: first the layer count (so that a config's number
    /// is checked against the tensor table before anything is built from it), then missing tensors,
    /// wrong shapes, storage dtypes other than f32/f16/bf16, and tensors nothing uses.
    pub fn check(&self, cfg: &ModelConfig) -> LoadReport {
        let found = self.layer_count();
        if found != cfg.num_hidden_layers {
            return LoadReport {
                layer_count: Some((cfg.num_hidden_layers, found)),
                ..LoadReport::default()
            };
        }
        let expected = expected_tensors(cfg);
        let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut report = LoadReport::default();
        for (name, shape) in &expected {
            match self.shape_of(name) {
                None => report.missing.push(name.clone()),
                Some(found) if &found != shape => report.mismatched.push(Mismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    found,
                }),
                Some(_) => {
                    let dt = self.storage_dtype(name).unwrap_or_default();
                    if !SUPPORTED_DTYPES.contains(&dt.as_str()) && self.quant_type(name).is_none() {
                        report.unsupported.push((name.clone(), dt));
                    }
                }
            }
        }
        report.unused = self
            .names()
            .into_iter()
            .filter(|n| !wanted.contains(n.as_str()))
            .collect();
        report
    }

    /// Loads `name`, checks it has `shape`, converts it to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.check_shape(name, shape)?;
        let t = match &self.store {
            Store::Safetensors(st) => st
                .load(name, device)
                .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {}", candle_message(e))))?,
            Store::Loaded(m) => m[name].to_device(device)?,
            Store::Engine(e) => e.load(name, device)?,
            Store::Gguf(g) => g.dequantized(name, device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// `name` exists and has `shape`.
    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let found = self.shape_of(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(())
    }

    /// The block type of `name` when it is stored block-quantized (a [`QUANT_TYPES`] type).
    pub fn quant_type(&self, name: &str) -> Option<GgmlDType> {
        match &self.store {
            Store::Gguf(g) => g.dtype(name).filter(|t| QUANT_TYPES.iter().any(|(q, _)| q == t)),
            Store::Engine(e) => e.entry(name).and_then(|t| t.dtype.blocks()),
            _ => None,
        }
    }

    /// The stored blocks of a block-quantized tensor (rows in HF order), to copy them without requantizing.
    pub fn raw_blocks(&self, name: &str) -> Result<Option<(GgmlDType, Vec<u8>)>> {
        let Some(t) = self.quant_type(name) else {
            return Ok(None);
        };
        let bytes = match &self.store {
            Store::Gguf(g) => g.raw(name)?,
            Store::Engine(e) => e.tensor_bytes(name)?,
            _ => return Ok(None),
        };
        Ok(Some((t, bytes)))
    }

    /// The projection (or embedding) weight `name` of shape `[out, in]` in the form its storage calls for
    /// ([`Weight`]): block-quantized storage stays in its blocks when `ld.quantized` (on the CPU), everything
    /// else becomes a dense tensor in `ld.dtype` on `ld.device`. `ld` also says whether the CPU decode kernel
    /// may serve few-row products.
    pub fn weight(&self, name: &str, shape: &[usize], ld: &Load) -> Result<Weight> {
        if ld.quantized && ld.device.is_cpu() && self.quant_type(name).is_some() {
            self.check_shape(name, shape)?;
            let in_blocks = |r: candle_core::Result<Weight>| {
                r.map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {}", candle_message(e))))
            };
            if let (Store::Engine(e), [out, inp]) = (&self.store, shape) {
                // Engines are used in place from their memory map.
                let (dtype, bytes) = e.tensor_mapped(name)?;
                let t = dtype.blocks().expect("quant_type said block storage");
                return in_blocks(match dtype {
                    StorageDtype::Packed(_) => Weight::from_packed(t, *out, *inp, bytes),
                    _ => Weight::from_blocks(t, *out, *inp, bytes),
                });
            }
            if let (Some((t, bytes)), [out, inp]) = (self.raw_blocks(name)?, shape) {
                return in_blocks(Weight::from_blocks(t, *out, *inp, BlockBytes::Owned(bytes)));
            }
        }
        let tensor = self.get(name, shape, ld.dtype, ld.device)?;
        Ok(Weight::Dense(DenseWeight {
            tensor,
            matvec: ld.matvec,
        }))
    }
}

/// Storage dtypes the model can load (converted to the compute dtype at load).
const SUPPORTED_DTYPES: &[&str] = &["f32", "f16", "bf16"];

/// Every tensor `cfg` needs, by HF name, with its shape, in checkpoint order.
///
/// Biases appear when `cfg.attention_bias`; `lm_head.weight` unless the embeddings are tied; routers
/// (`model.routers.{l}.weight`, `[1, d]`) for the layers `cfg.is_routed(l)`.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, d, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    for l in 0..cfg.num_hidden_layers {
        if cfg.is_routed(l) {
            out.push((format!("model.routers.{l}.weight"), vec![1, d]));
        }
    }
    out
}

/// A tensor whose shape disagrees with the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// HF name.
    pub name: String,
    /// Shape the config implies.
    pub expected: Vec<usize>,
    /// Shape in the checkpoint.
    pub found: Vec<usize>,
}

/// What comparing a checkpoint with its config found. Missing, mismatched and unsupported tensors are
/// errors; unused tensors are only worth a warning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// `(config, tensors)` when the config's layer count differs from the tensors' (nothing else is
    /// checked then).
    pub layer_count: Option<(usize, usize)>,
    /// Tensors the config needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Tensors with the wrong shape.
    pub mismatched: Vec<Mismatch>,
    /// Tensors stored in a dtype we cannot load: (name, dtype).
    pub unsupported: Vec<(String, String)>,
    /// Tensors in the checkpoint that nothing uses.
    pub unused: Vec<String>,
}

impl LoadReport {
    /// No missing, mismatched or unsupported tensors.
    pub fn is_ok(&self) -> bool {
        self.layer_count.is_none()
            && self.missing.is_empty()
            && self.mismatched.is_empty()
            && self.unsupported.is_empty()
    }

    /// `Ok(self)` when [`is_ok`](Self::is_ok); otherwise the error for `path`: the specific variant
    /// ([`Error::MissingTensor`], [`Error::ShapeMismatch`], [`Error::UnsupportedDtype`]) when there is one
    /// problem, [`Error::Tensors`] listing all of them when there are several.
    pub fn into_result(self, path: &Path) -> Result<Self> {
        if let Some((config, found)) = self.layer_count {
            return Err(Error::LayerCount {
                path: path.to_path_buf(),
                config,
                found,
            });
        }
        let n = self.missing.len() + self.mismatched.len() + self.unsupported.len();
        if n == 0 {
            return Ok(self);
        }
        let path = path.to_path_buf();
        if n > 1 {
            return Err(Error::Tensors {
                path,
                report: Box::new(self),
            });
        }
        if let Some(name) = self.missing.into_iter().next() {
            return Err(Error::MissingTensor { path, name });
        }
        if let Some(m) = self.mismatched.into_iter().next() {
            return Err(Error::ShapeMismatch {
                path,
                name: m.name,
                expected: m.expected,
                found: m.found,
            });
        }
        let (name, dtype) = self.unsupported.into_iter().next().unwrap_or_default();
        Err(Error::UnsupportedDtype { path, name, dtype })
    }

    /// One line per unused tensor, for callers that print warnings.
    pub fn warnings(&self) -> Vec<String> {
        self.unused.iter().map(|n| format!("unused tensor `{n}`")).collect()
    }

    /// The unused tensor most similar to `missing`, if one is close enough to be a likely typo.
    fn suggestion(&self, missing: &str) -> Option<&str> {
        if self.unused.len() * self.missing.len() > 20_000 {
            return None;
        }
        self.unused
            .iter()
            .map(|u| (edit_distance(missing, u), u))
            .filter(|(d, _)| *d <= missing.len() / 4)
            .min_by_key(|(d, _)| *d)
            .map(|(_, u)| u.as_str())
    }
}

/// The most lines of one kind a [`LoadReport`] prints; the rest are counted.
const REPORT_LINES: usize = 20;

/// Writes "… and N more" when `total` lines exceed what was printed.
fn more(f: &mut fmt::Formatter<'_>, total: usize, what: &str) -> fmt::Result {
    if total > REPORT_LINES {
        write!(f, "\n  … and {} more {what}", total - REPORT_LINES)?;
    }
    Ok(())
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((config, found)) = self.layer_count {
            write!(
                f,
                "\n  the config declares {config} layers, the tensors describe {found}"
            )?;
        }
        for name in self.missing.iter().take(REPORT_LINES) {
            write!(f, "\n  missing tensor `{name}`")?;
            if let Some(s) = self.suggestion(name) {
                write!(f, " (did you mean `{s}`?)")?;
            }
        }
        more(f, self.missing.len(), "missing tensors")?;
        for m in self.mismatched.iter().take(REPORT_LINES) {
            write!(
                f,
                "\n  tensor `{}` has shape {:?}, the config implies {:?}",
                m.name, m.found, m.expected
            )?;
        }
        more(f, self.mismatched.len(), "tensors with the wrong shape")?;
        for (name, dtype) in self.unsupported.iter().take(REPORT_LINES) {
            write!(
                f,
                "\n  tensor `{name}` has unsupported dtype {dtype} (supported: f32, f16, bf16)"
            )?;
        }
        more(f, self.unsupported.len(), "tensors of unsupported dtypes")?;
        if !self.unused.is_empty() {
            write!(f, "\n  {} unused tensor(s)", self.unused.len())?;
            for name in self.unused.iter().take(5) {
                write!(f, " `{name}`")?;
            }
        }
        Ok(())
    }
}

/// Levenshtein distance over bytes (names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}
