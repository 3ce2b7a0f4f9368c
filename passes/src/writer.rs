//! The streaming writer: materialises a [`ModelSpec`] from a [`TensorSource`] into an HF directory in the
//! DLO reference implementation's format (`config.json` with the DLO keys and our provenance,
//! `model.safetensors`, tokenizer files).
//!
//! Streaming: every output tensor's name, shape and dtype is known from the spec before any data is
//! computed ([`plan_tensors`]), so the safetensors header (with offsets) is written first and each tensor is
//! then computed from at most two source tensors, encoded and appended, and dropped. Peak memory is about
//! the largest tensor (three times, for merges), independent of the model's depth.
//!
//! Atomicity: everything is written to a hidden temporary directory next to the output and renamed into
//! place at the end; an existing output is refused; on any error the temporary directory is removed.
//!
//! Naming: output layer l is `model.layers.{l}.*`; routed layers get `model.routers.{l}.weight` of shape
//! (1, hidden); non-layer tensors (embeddings, final norm, lm_head) are copied unchanged.

use crate::error::{Error, Result};
use crate::fsutil::{AtomicDir, FsError};
use crate::init::{merge_linear, name_hash, normal, slerp};
use crate::ir::{mix_seed, CopyInit, LayerSource, ModelSpec, RouterInit};
use crate::source::TensorSource;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Standard deviation of HF's default Linear init and of random router init.
pub const INIT_STD: f64 = 0.02;

/// Tokenizer and generation files an HF directory usually carries next to the weights.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Storage dtype of the written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (round to nearest even), as the reference saves.
    Bf16,
}

impl OutDtype {
    /// Parses `f32` / `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(OutDtype::F32),
            "bf16" | "bfloat16" => Ok(OutDtype::Bf16),
            other => Err(Error::Unknown {
                what: "dtype",
                value: other.into(),
                expected: "f32, bf16",
            }),
        }
    }
    /// `f32` / `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutDtype::F32 => "f32",
            OutDtype::Bf16 => "bf16",
        }
    }
    /// HF `torch_dtype`.
    pub fn torch_dtype(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::Bf16 => "bfloat16",
        }
    }
    fn st_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "F32",
            OutDtype::Bf16 => "BF16",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 => 2,
        }
    }
}

/// A file to place in the output directory besides the weights and config.
#[derive(Debug, Clone, PartialEq)]
pub enum ExtraFile {
    /// Copy this file (under its own file name).
    Copy(PathBuf),
    /// Write these bytes under `name`.
    Bytes { name: String, data: Vec<u8> },
}

/// The [`TOKENIZER_FILES`] present in `dir`, as [`ExtraFile::Copy`] entries.
pub fn tokenizer_files(dir: &Path) -> Vec<ExtraFile> {
    TOKENIZER_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .map(ExtraFile::Copy)
        .collect()
}

/// Writer options.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOptions {
    /// Storage dtype.
    pub dtype: OutDtype,
    /// Tokenizer files and anything else to include.
    pub extra_files: Vec<ExtraFile>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReport {
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// Size of `model.safetensors` in bytes.
    pub safetensors_bytes: u64,
    /// Size of every file written, in bytes.
    pub total_bytes: u64,
    /// File names in the output directory.
    pub files: Vec<String>,
}

/// How one output tensor is computed.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorRecipe {
    /// Copy this source tensor.
    Read(String),
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// N(0, std²) from `seed`.
    Normal { seed: u64, std: f64 },
    /// Element-wise mean of two source tensors.
    Mean(String, String),
    /// SLERP from the first to the second source tensor at `t`.
    Slerp(String, String, f64),
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// Output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// How to compute it.
    pub recipe: TensorRecipe,
}

/// `model.layers.{i}.{suffix}` → `(i, suffix)`.
pub fn split_layer_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, suffix) = rest.split_once('.')?;
    Some((i.parse().ok()?, suffix))
}

/// Whether the zeros init zeroes this layer tensor (`self_attn.o_proj.*`, `mlp.down_proj.*`).
pub fn is_zeroed_by_zeros_init(suffix: &str) -> bool {
    suffix.starts_with("self_attn.o_proj.") || suffix.starts_with("mlp.down_proj.")
}

fn layer_name(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

/// Router tensor name of output layer `l`.
pub fn router_name(l: usize) -> String {
    format!("model.routers.{l}.weight")
}

/// Every output tensor with its shape and recipe, in file order (non-layer tensors, then layers, then
/// routers). Fails before anything is written if the source lacks a tensor the spec needs, a layer's
/// tensors differ from the others', or merged tensors disagree in shape.
pub fn plan_tensors(spec: &ModelSpec, source: &dyn TensorSource) -> Result<Vec<PlannedTensor>> {
    spec.validate()?;
    let origin = source.origin().to_path_buf();
    let base = spec.base_layers();
    let mut layers: Vec<BTreeMap<String, Vec<usize>>> = vec![BTreeMap::new(); base];
    let mut others = Vec::new();
    let shape_of = |name: &str| {
        source.shape(name).ok_or_else(|| Error::MissingTensor {
            origin: origin.clone(),
            name: name.into(),
        })
    };
    for name in source.names() {
        if name.starts_with("model.routers.") {
            return Err(Error::format(
                &origin,
                format!("holds router tensor `{name}`: the base is already a DLO model"),
            ));
        }
        match split_layer_name(&name) {
            Some((i, suffix)) => {
                if i >= base {
                    return Err(Error::format(
                        &origin,
                        format!("tensor `{name}` belongs to layer {i}, but the config has {base} layers"),
                    ));
                }
                let shape = shape_of(&name)?;
                layers[i].insert(suffix.to_string(), shape);
            }
            None => {
                let shape = shape_of(&name)?;
                others.push(PlannedTensor {
                    recipe: TensorRecipe::Read(name.clone()),
                    name,
                    shape,
                })
            }
        }
    }
    // Every layer must hold the same tensors (Llama layers are uniform); report the first missing one.
    let all: std::collections::BTreeSet<&String> = layers.iter().flat_map(|m| m.keys()).collect();
    if all.is_empty() {
        return Err(Error::MissingTensor {
            origin,
            name: "model.layers.0.*".into(),
        });
    }
    for (i, m) in layers.iter().enumerate() {
        if let Some(s) = all.iter().find(|s| !m.contains_key(s.as_str())) {
            return Err(Error::MissingTensor {
                origin,
                name: layer_name(i, s),
            });
        }
    }
    let mut out = others;
    for (l, layer) in spec.layers.iter().enumerate() {
        let src = &layer.source;
        let tpl = &layers[src.template_layer()];
        if let LayerSource::Copy {
            init: CopyInit::Zeros,
            from,
        } = *src
        {
            for need in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
                if !tpl.contains_key(need) {
                    return Err(Error::MissingTensor {
                        origin,
                        name: layer_name(from, need),
                    });
                }
            }
        }
        for (suffix, shape) in tpl {
            let recipe = match *src {
                LayerSource::Original(i)
                | LayerSource::Copy {
                    from: i,
                    init: CopyInit::Exact,
                } => TensorRecipe::Read(layer_name(i, suffix)),
                LayerSource::Copy {
                    from: i,
                    init: CopyInit::Zeros,
                } => {
                    if is_zeroed_by_zeros_init(suffix) {
                        TensorRecipe::Zeros
                    } else {
                        TensorRecipe::Read(layer_name(i, suffix))
                    }
                }
                LayerSource::Random { seed, .. } => {
                    if suffix.contains("norm") {
                        TensorRecipe::Ones
                    } else if shape.len() >= 2 {
                        TensorRecipe::Normal {
                            seed: mix_seed(seed, name_hash(suffix), 0),
                            std: INIT_STD,
                        }
                    } else {
                        TensorRecipe::Zeros
                    }
                }
                LayerSource::MergeLinear { a, b } | LayerSource::MergeSlerp { a, b, .. } => {
                    let other = &layers[b][suffix];
                    if other != shape {
                        return Err(Error::ShapeMismatch {
                            origin,
                            name: layer_name(b, suffix),
                            expected: shape.clone(),
                            found: other.clone(),
                        });
                    }
                    let (na, nb) = (layer_name(a, suffix), layer_name(b, suffix));
                    match *src {
                        LayerSource::MergeSlerp { t, .. } => TensorRecipe::Slerp(na, nb, t),
                        _ => TensorRecipe::Mean(na, nb),
                    }
                }
            };
            out.push(PlannedTensor {
                name: layer_name(l, suffix),
                shape: shape.clone(),
                recipe,
            });
        }
    }
    for (l, layer) in spec.layers.iter().enumerate() {
        if let Some(r) = layer.router {
            out.push(PlannedTensor {
                name: router_name(l),
                shape: vec![1, spec.config.hidden_size],
                recipe: match r {
                    RouterInit::Zero => TensorRecipe::Zeros,
                    RouterInit::Random { seed } => TensorRecipe::Normal { seed, std: INIT_STD },
                },
            });
        }
    }
    Ok(out)
}

/// Computes one planned tensor as `f32`.
pub fn materialize(t: &PlannedTensor, source: &dyn TensorSource) -> Result<Vec<f32>> {
    let n: usize = t.shape.iter().product();
    let read = |name: &str| -> Result<Vec<f32>> {
        let found = source.shape(name).ok_or_else(|| Error::MissingTensor {
            origin: source.origin().to_path_buf(),
            name: name.into(),
        })?;
        if found != t.shape {
            return Err(Error::ShapeMismatch {
                origin: source.origin().to_path_buf(),
                name: name.into(),
                expected: t.shape.clone(),
                found,
            });
        }
        let v = source.read_f32(name)?;
        if v.len() != n {
            return Err(Error::tensor_read(
                source.origin(),
                name,
                format!("source returned {} values for shape {:?}", v.len(), t.shape),
            ));
        }
        Ok(v)
    };
    Ok(match &t.recipe {
        TensorRecipe::Read(name) => read(name)?,
        TensorRecipe::Zeros => vec![0.0; n],
        TensorRecipe::Ones => vec![1.0; n],
        TensorRecipe::Normal { seed, std } => normal(*seed, n, *std),
        TensorRecipe::Mean(a, b) => merge_linear(&read(a)?, &read(b)?),
        TensorRecipe::Slerp(a, b, tt) => slerp(*tt, &read(a)?, &read(b)?),
    })
}

/// The safetensors header (JSON, padded with spaces to a multiple of 8) for these tensors, and the size of
/// the data section.
fn header(tensors: &[PlannedTensor], dtype: OutDtype) -> (Vec<u8>, u64) {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for t in tensors {
        let bytes = t.shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        m.insert(
            t.name.clone(),
            json!({"dtype": dtype.st_name(), "shape": t.shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut h = Value::Object(m).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    (h, off)
}

fn encode_into(values: &[f32], dtype: OutDtype, w: &mut impl Write) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::with_capacity(CHUNK * dtype.size());
    for c in values.chunks(CHUNK) {
        buf.clear();
        match dtype {
            OutDtype::F32 => c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
            OutDtype::Bf16 => c
                .iter()
                .for_each(|x| buf.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

fn fs_error(e: FsError) -> Error {
    Error::io(e.path, e.source)
}

/// Writes `model.safetensors` for the spec into `path`, streaming one tensor at a time.
/// Returns (number of tensors, file size).
pub fn write_safetensors(
    spec: &ModelSpec,
    source: &dyn TensorSource,
    path: &Path,
    dtype: OutDtype,
) -> Result<(usize, u64)> {
    let plan = plan_tensors(spec, source)?;
    let (h, data_len) = header(&plan, dtype);
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for t in &plan {
        let v = materialize(t, source)?;
        encode_into(&v, dtype, &mut w).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let expected = 8 + h.len() as u64 + data_len;
    if size != expected {
        return Err(Error::format(path, format!("wrote {size} bytes, expected {expected}")));
    }
    Ok((plan.len(), size))
}

/// Materialises `spec` into a new HF directory `out` (which must not exist): `model.safetensors`,
/// `config.json` (reference DLO keys + `dlo_provenance` / `dlo_expansion`), and `opts.extra_files`.
pub fn write_model(
    spec: &ModelSpec,
    source: &dyn TensorSource,
    out: &Path,
    opts: &WriteOptions,
) -> Result<WriteReport> {
    if out.exists() {
        return Err(Error::OutputExists { path: out.into() });
    }
    if out.file_name().is_none() {
        return Err(Error::format(out, "output path has no directory name"));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(
            &parent,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "parent directory of the output does not exist",
            ),
        ));
    }
    // Validate the plan before creating anything.
    plan_tensors(spec, source)?;
    let tmp = AtomicDir::create(out).map_err(fs_error)?;

    let st_path = tmp.path().join("model.safetensors");
    let (tensors, safetensors_bytes) = write_safetensors(spec, source, &st_path, opts.dtype)?;

    let mut cfg = spec.output_config();
    cfg.torch_dtype = Some(opts.dtype.torch_dtype().into());
    let json = cfg.to_hf_json();
    // The written config must read back (catches any inconsistency before the output appears).
    crate::config::ModelConfig::from_hf_json(&json, &out.join("config.json"))?;
    let cfg_path = tmp.path().join("config.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::io(&cfg_path, e))?;

    let mut files = vec!["model.safetensors".to_string(), "config.json".to_string()];
    for f in &opts.extra_files {
        let name = match f {
            ExtraFile::Copy(p) => p
                .file_name()
                .ok_or_else(|| Error::format(p, "extra file has no file name"))?
                .to_string_lossy()
                .into_owned(),
            ExtraFile::Bytes { name, .. } => name.clone(),
        };
        if name.contains('/') || files.contains(&name) {
            return Err(Error::InvalidParam {
                name: "extra file",
                problem: format!("`{name}` is not a plain file name or is already in the output"),
            });
        }
        let dest = tmp.path().join(&name);
        match f {
            ExtraFile::Copy(p) => {
                std::fs::copy(p, &dest).map_err(|e| Error::io(p, e))?;
            }
            ExtraFile::Bytes { data, .. } => std::fs::write(&dest, data).map_err(|e| Error::io(&dest, e))?,
        }
        files.push(name);
    }
    let mut total_bytes = 0;
    for f in &files {
        let p = tmp.path().join(f);
        total_bytes += std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
    }
    // An output created meanwhile is refused, not replaced.
    tmp.commit_new().map_err(|e| {
        if e.already_exists() {
            Error::OutputExists { path: out.into() }
        } else {
            fs_error(e)
        }
    })?;
    Ok(WriteReport {
        tensors,
        safetensors_bytes,
        total_bytes,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_padded_to_8_bytes_and_offsets_are_contiguous() {
        let t = |name: &str, shape: Vec<usize>| PlannedTensor {
            name: name.into(),
            shape,
            recipe: TensorRecipe::Zeros,
        };
        let plan = [t("a", vec![3]), t("bb", vec![2, 5])];
        let (h, data) = header(&plan, OutDtype::Bf16);
        assert_eq!(h.len() % 8, 0);
        assert_eq!(data, (3 + 10) * 2);
        let v: Value = serde_json::from_slice(&h).unwrap();
        assert_eq!(v["a"]["data_offsets"], json!([0, 6]));
        assert_eq!(v["bb"]["data_offsets"], json!([6, 26]));
        assert_eq!(v["bb"]["dtype"], "BF16");
    }

    #[test]
    fn layer_names_split_and_zeroed_suffixes() {
        assert_eq!(
            split_layer_name("model.layers.12.mlp.up_proj.weight"),
            Some((12, "mlp.up_proj.weight"))
        );
        assert_eq!(split_layer_name("model.norm.weight"), None);
        assert_eq!(split_layer_name("model.layers.x.mlp"), None);
        assert!(is_zeroed_by_zeros_init("self_attn.o_proj.weight"));
        assert!(is_zeroed_by_zeros_init("mlp.down_proj.bias"));
        assert!(!is_zeroed_by_zeros_init("mlp.up_proj.weight"));
    }
}
