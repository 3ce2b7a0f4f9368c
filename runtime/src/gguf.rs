//! GGUF files (llama.cpp's format) → [`ModelConfig`] + [`Weights`] in HF names and layout.
//!
//! - Hyperparameters come from the `{arch}.*` metadata keys (`arch` = `general.architecture`, `llama` or
//!   `qwen2`); a missing key is an error naming the key and the file.
//! - Tensors are read when the model loads them, one at a time: block-quantized ones (Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0 and the K-quants Q2_K…Q6_K) stay in their blocks for [`crate::model::weight::Weight::Quantized`],
//!   or are dequantized when the caller asks for dense tensors; F32/F16/BF16 load as floats. Any other type is
//!   [`Error::UnsupportedDtype`]. Opening the file checks every tensor's layout and that its values (block
//!   scales) are finite.
//! - Names are mapped to HF names (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`, see
//!   [`hf_name`]); no `output.weight` means tied embeddings.
//! - **RoPE convention.** llama.cpp's HF→GGUF converter permutes the rows of `attn_q`/`attn_k` for the
//!   `llama` architecture so that RoPE rotates adjacent pairs (GPT-J style). Our model (like HF) rotates
//!   halves, so [`unpermute_qk`] undoes it per head. `qwen2` GGUFs are stored unpermuted (llama.cpp runs
//!   them with NEOX RoPE), so nothing is undone there.
//! - GGUF stores dimensions fastest-first; candle's reader already reverses them, so a matrix arrives as
//!   `[out, in]` like HF.

use crate::error::{candle_message, Error, Result};
use crate::model::weight::qtensor_from_bytes;
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadReport, Weights};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use dlo_passes::ModelConfig;
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufReader, Seek};
use std::path::Path;
use std::path::PathBuf;

/// What [`load`] returns: the parts of a [`crate::Checkpoint`].
pub struct GgufCheckpoint {
    /// Hyperparameters translated into an HF-style config.
    pub config: ModelConfig,
    /// The tensors by HF name, read from the file when loaded (in their blocks or dequantized).
    pub weights: Weights,
    /// The tokenizer built from the GGUF vocabulary, if any.
    pub tokenizer: Option<Tokenizer>,
    /// Tensor check; `unused` holds GGUF tensors with no HF counterpart (by GGUF name).
    pub report: LoadReport,
}

/// Architectures we read, with whether their Q/K rows are permuted by llama.cpp's converter.
const ARCHS: &[(&str, bool)] = &[("llama", true), ("qwen2", false)];

/// Opens a GGUF file: config from metadata, tensors dequantized and renamed, tokenizer from metadata.
pub fn load(path: &Path) -> Result<GgufCheckpoint> {
    // What candle's reader does not check (or panics on): the version, and an alignment it divides by.
    let header = scan::header(path).map_err(|e| Error::io(path, e))?;
    let alignment = match header {
        Some(h) if !(2..=3).contains(&h.version) => {
            return Err(Error::format(
                path,
                format!(
                    "unsupported GGUF version {} (versions 2 and 3 are supported; version 1 files predate \
                     August 2023: convert the model again with a current llama.cpp)",
                    h.version
                ),
            ))
        }
        Some(h) => match h.alignment {
            None => DEFAULT_ALIGNMENT,
            Some(a) if a > 0 && a.is_power_of_two() => a,
            Some(a) => {
                return Err(Error::format(
                    path,
                    format!("GGUF metadata key `general.alignment` is {a}; it must be a power of two"),
                ))
            }
        },
        None => DEFAULT_ALIGNMENT,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let content = match Content::read(&mut reader) {
        Ok(c) => c,
        Err(e) => {
            // candle rejects ggml types it does not know while reading the header, without naming the
            // tensor; find it ourselves so the error can.
            if let Ok(Some((name, ty))) = scan::first_unknown_type(path) {
                return Err(Error::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: ggml_type_name(ty),
                });
            }
            return Err(Error::format(path, format!("invalid GGUF file: {}", candle_message(e))));
        }
    };
    let md = Meta::new(&content.metadata, path)?;
    let permuted = ARCHS
        .iter()
        .find(|(a, _)| *a == md.arch)
        .map(|(_, p)| *p)
        .unwrap_or(false);
    let tied = !content.tensor_infos.contains_key("output.weight");
    let embed_rows = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|i| i.shape.dims().first().copied());
    let config = md.config(tied, embed_rows)?;

    // Check every tensor before dequantizing anything: aligned, inside the file, not overlapping another;
    // and for those we use: type and name.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    check_layout(path, &content, alignment, file_len)?;
    let mut report = LoadReport::default();
    let mut wanted = Vec::new();
    for name in names {
        let info = &content.tensor_infos[name];
        let Some(hf) = hf_name(name) else {
            if name == "rope_freqs.weight" {
                return Err(Error::format(
                    path,
                    "has `rope_freqs.weight` (Llama 3.1-style RoPE scaling baked into GGUF), which is not \
                     supported; import the HF checkpoint instead",
                ));
            }
            report.unused.push(name.clone());
            continue;
        };
        if !DEQUANTIZABLE.contains(&info.ggml_dtype) {
            return Err(Error::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: format!("{:?}", info.ggml_dtype),
            });
        }
        wanted.push((name.clone(), hf));
    }

    let mut tensors = HashMap::with_capacity(wanted.len());
    for (name, hf) in wanted {
        let info = &content.tensor_infos[&name];
        let shape = info.shape.dims().to_vec();
        let qk_heads = if permuted && (hf.contains(".self_attn.q_proj.") || hf.contains(".self_attn.k_proj.")) {
            let n_head = if hf.contains(".q_proj.") {
                md.n_head
            } else {
                md.n_head_kv
            };
            let rows = shape.first().copied().unwrap_or(0);
            if n_head == 0 || rows % (2 * n_head) != 0 {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: {rows} rows cannot be split into {n_head} heads of even size"),
                ));
            }
            Some(n_head)
        } else {
            None
        };
        let bytes = tensor_bytes(info).unwrap_or(0) as usize; // check_layout proved it exists
        tensors.insert(
            hf,
            GgufTensor {
                gguf_name: name,
                dtype: info.ggml_dtype,
                shape,
                start: content.tensor_data_offset + info.offset,
                bytes,
                qk_heads,
            },
        );
    }
    let file = reader.into_inner();
    let store = GgufTensors {
        file: std::sync::Mutex::new(file),
        path: path.to_path_buf(),
        tensors,
    };
    store.check_finite()?;
    let weights = Weights::from_gguf(std::sync::Arc::new(store));
    let mut checked = weights.check(&config);
    checked.unused.append(&mut report.unused);
    let report = checked.into_result(path)?;
    let tokenizer = Tokenizer::from_gguf(&content.metadata, path)?;
    Ok(GgufCheckpoint {
        config,
        weights,
        tokenizer,
        report,
    })
}

/// A GGUF file's tensors by HF name, read on demand: one positioned read per tensor, so that a model built
/// from it holds each tensor once (in its blocks, or dequantized when asked) and nothing else of the file.
pub(crate) struct GgufTensors {
    file: std::sync::Mutex<std::fs::File>,
    path: PathBuf,
    tensors: HashMap<String, GgufTensor>,
}

/// Where one tensor lies and how to read it.
struct GgufTensor {
    gguf_name: String,
    dtype: GgmlDType,
    /// HF order (`[out, in]`).
    shape: Vec<usize>,
    /// Absolute byte offset of the data.
    start: u64,
    bytes: usize,
    /// `Some(heads)` for Q/K weights whose rows llama.cpp's converter permuted (undone when read).
    qk_heads: Option<usize>,
}

impl GgufTensors {
    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// HF names of the tensors.
    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Shape (HF order) of `hf`.
    pub(crate) fn shape(&self, hf: &str) -> Option<&[usize]> {
        self.tensors.get(hf).map(|t| t.shape.as_slice())
    }

    /// ggml type of `hf`.
    pub(crate) fn dtype(&self, hf: &str) -> Option<GgmlDType> {
        self.tensors.get(hf).map(|t| t.dtype)
    }

    /// The raw bytes of `hf`, rows in HF order.
    fn bytes(&self, t: &GgufTensor) -> Result<Vec<u8>> {
        let mut bytes = self.read(t)?;
        if let Some(heads) = t.qk_heads {
            unpermute_rows(&mut bytes, t.shape[0], heads).map_err(|e| self.tensor_error(t, candle_message(e)))?;
        }
        Ok(bytes)
    }

    /// The stored bytes of `hf`, rows in HF order.
    pub(crate) fn raw(&self, hf: &str) -> Result<Vec<u8>> {
        self.bytes(self.entry(hf)?)
    }

    /// `hf` dequantized to f32 on `device`, rows in HF order.
    pub(crate) fn dequantized(&self, hf: &str, device: &Device) -> Result<Tensor> {
        let t = self.entry(hf)?;
        let bytes = self.bytes(t)?;
        qtensor_from_bytes(&bytes, t.dtype, &t.shape, &Device::Cpu)
            .and_then(|q| q.dequantize(device))
            .map_err(|e| self.tensor_error(t, format!("cannot dequantize: {}", candle_message(e))))
    }

    fn entry(&self, hf: &str) -> Result<&GgufTensor> {
        self.tensors.get(hf).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: hf.to_string(),
        })
    }

    fn tensor_error(&self, t: &GgufTensor, msg: impl std::fmt::Display) -> Error {
        Error::format(&self.path, format!("tensor `{}`: {msg}", t.gguf_name))
    }

    /// The tensor's bytes as stored.
    fn read(&self, t: &GgufTensor) -> Result<Vec<u8>> {
        use std::io::{Read, SeekFrom};
        let mut bytes = vec![0u8; t.bytes];
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.seek(SeekFrom::Start(t.start))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(bytes)
    }

    /// Every tensor's values are finite: float tensors element by element, block formats by their scales (the
    /// quants are integers, so finite scales give finite values). One read of the file, one tensor at a time.
    fn check_finite(&self) -> Result<()> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for hf in names {
            let t = &self.tensors[hf];
            let bytes = self.read(t)?;
            if let Some(i) = first_non_finite(t.dtype, &bytes) {
                return Err(self.tensor_error(
                    t,
                    format!(
                        "element {i} is not finite after dequantization (a NaN or infinite value or block scale \
                         in the file)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Undoes llama.cpp's Q/K permutation on raw rows (`rows` rows of equal byte length): the row order of
/// [`unpermute_qk`], applied to whole rows, so that it works for block formats as for floats.
fn unpermute_rows(bytes: &mut [u8], rows: usize, heads: usize) -> candle_core::Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let ids = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.reshape((rows, 1))?;
    let order: Vec<u32> = unpermute_qk(&ids, heads)?.flatten_all()?.to_vec1()?;
    let row = bytes.len() / rows;
    let src = bytes.to_vec();
    for (dst, &from) in order.iter().enumerate() {
        let from = from as usize;
        bytes[dst * row..(dst + 1) * row].copy_from_slice(&src[from * row..(from + 1) * row]);
    }
    Ok(())
}

/// The element index of the first value that would not be finite after dequantizing `bytes` of type `t`.
fn first_non_finite(t: GgmlDType, bytes: &[u8]) -> Option<usize> {
    let f16_at = |b: &[u8], o: usize| half::f16::from_le_bytes([b[o], b[o + 1]]).is_finite();
    match t {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        GgmlDType::F16 => bytes.chunks_exact(2).position(|c| !f16_at(c, 0)),
        GgmlDType::BF16 => bytes
            .chunks_exact(2)
            .position(|c| !half::bf16::from_le_bytes([c[0], c[1]]).is_finite()),
        _ => {
            let offsets = scale_offsets(t)?;
            let size = t.type_size();
            bytes
                .chunks_exact(size)
                .position(|b| offsets.iter().any(|&o| !f16_at(b, o)))
                .map(|blk| blk * t.block_size())
        }
    }
}

/// Byte offsets of the f16 scales inside one block of a ggml block type (ggml's block layouts).
fn scale_offsets(t: GgmlDType) -> Option<&'static [usize]> {
    Some(match t {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[0],
        GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
        GgmlDType::Q2K => &[80, 82],
        GgmlDType::Q3K => &[108],
        GgmlDType::Q6K => &[208],
        _ => return None,
    })
}

/// GGUF's alignment of tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// The byte size of a tensor of `info`'s shape and type, if it is a whole number of blocks.
fn tensor_bytes(info: &candle_core::quantized::gguf_file::TensorInfo) -> Option<u64> {
    let n = info.shape.dims().iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let block = info.ggml_dtype.block_size();
    if n % block != 0 {
        return None;
    }
    u64::try_from((n / block).checked_mul(info.ggml_dtype.type_size())?).ok()
}

/// Every tensor's data is aligned, inside the file and disjoint from every other tensor's.
fn check_layout(path: &Path, content: &Content, alignment: u64, file_len: u64) -> Result<()> {
    let mut ranges = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let bytes = tensor_bytes(info).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "tensor `{name}`: impossible shape {:?} for type {:?}",
                    info.shape.dims(),
                    info.ggml_dtype
                ),
            )
        })?;
        if info.offset % alignment != 0 {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}`: data offset {} is not a multiple of the alignment {alignment}",
                    info.offset
                ),
            ));
        }
        let start = content.tensor_data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => ranges.push((start, end, name)),
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` needs {bytes} bytes at offset {} but the file has only {file_len} bytes \
                         (truncated, or offsets past the end)",
                        content.tensor_data_offset.saturating_add(info.offset)
                    ),
                ))
            }
        }
    }
    ranges.retain(|(s, e, _)| e > s);
    ranges.sort();
    for w in ranges.windows(2) {
        let ((s0, e0, a), (s1, e1, b)) = (w[0], w[1]);
        if s1 < e0 {
            return Err(Error::format(
                path,
                format!("tensors `{a}` (bytes {s0}..{e0}) and `{b}` (bytes {s1}..{e1}) overlap"),
            ));
        }
    }
    Ok(())
}

/// ggml types candle can dequantize on the CPU.
const DEQUANTIZABLE: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The HF name of a GGUF tensor, or `None` for tensors without one.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's Q/K row permutation: per head, rows (head_dim/2, 2) → (2, head_dim/2).
///
/// `w` is `[n_head * head_dim, in]` (or `[n_head * head_dim]` for a bias); `n_head` is the number of
/// query heads for Q and of key/value heads for K.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    regroup_rows(w, n_head, true)
}

/// llama.cpp's converter permutation (HF → GGUF), the inverse of [`unpermute_qk`]; for tests and writers.
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    regroup_rows(w, n_head, false)
}

fn regroup_rows(w: &Tensor, n_head: usize, undo: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    if n_head == 0 || out % (2 * n_head) != 0 {
        candle_core::bail!("{out} rows cannot be split into {n_head} heads of even size");
    }
    let cols: usize = dims[1..].iter().product();
    let half = out / n_head / 2;
    let split = if undo {
        (n_head, half, 2, cols)
    } else {
        (n_head, 2, half, cols)
    };
    w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// A readable name for a raw ggml type id.
fn ggml_type_name(ty: u32) -> String {
    let name = match ty {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    format!("ggml type {ty} ({name})")
}

/// Typed getters for GGUF metadata, shared by the config translation here and the tokenizer conversion
/// ([`crate::tokenizer`]): an absent key is `Ok(None)`, a value of the wrong type an error naming the key,
/// what was expected and the file.
pub(crate) struct Metadata<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    /// Getters over the metadata `md` of the GGUF file `path`.
    pub(crate) fn new(md: &'a HashMap<String, Value>, path: &'a Path) -> Self {
        Metadata { md, path }
    }

    /// The raw value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.md.get(key)
    }

    /// The error for a required key that is absent.
    pub(crate) fn missing(&self, key: &str) -> Error {
        Error::format(self.path, format!("missing GGUF metadata key `{key}`"))
    }

    /// The error for a value of `key` that is not `expected`.
    pub(crate) fn invalid(&self, key: &str, expected: &str, v: &Value) -> Error {
        Error::format(
            self.path,
            format!("GGUF metadata key `{key}`: expected {expected}, found {}", describe(v)),
        )
    }

    /// A string value.
    pub(crate) fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(key, "a string", v)),
        }
    }

    /// A bool value.
    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(key, "a bool", v)),
        }
    }

    /// An integer value (of any integer type) that fits a `usize`.
    pub(crate) fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.int_as(key, "a non-negative integer")
    }

    /// An integer value (of any integer type) that fits a `u32`, such as a token id.
    pub(crate) fn u32(&self, key: &str) -> Result<Option<u32>> {
        self.int_as(key, "an integer in 0..=4294967295")
    }

    fn int_as<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<Option<T>> {
        let Some(v) = self.md.get(key) else { return Ok(None) };
        int(v)
            .and_then(|i| T::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| self.invalid(key, expected, v))
    }

    /// An array value.
    pub(crate) fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.invalid(key, "an array", v)),
        }
    }

    /// An array of strings.
    pub(crate) fn string_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.array_of(key, "strings", |v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })
    }

    /// An array of floats (f32, or f64 narrowed to f32).
    pub(crate) fn f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.array_of(key, "floats", |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    /// An array of integers (of any integer type).
    pub(crate) fn int_array(&self, key: &str) -> Result<Option<Vec<i128>>> {
        self.array_of(key, "integers", int)
    }

    fn array_of<T>(&self, key: &str, what: &str, elem: impl Fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                elem(v).ok_or_else(|| {
                    Error::format(
                        self.path,
                        format!(
                            "GGUF metadata key `{key}`: expected an array of {what}, element {i} is {}",
                            describe(v)
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// An integer metadata value, whatever its width and sign.
fn int(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => i128::from(*x),
        Value::I8(x) => i128::from(*x),
        Value::U16(x) => i128::from(*x),
        Value::I16(x) => i128::from(*x),
        Value::U32(x) => i128::from(*x),
        Value::I32(x) => i128::from(*x),
        Value::U64(x) => i128::from(*x),
        Value::I64(x) => i128::from(*x),
        _ => return None,
    })
}

/// A metadata value for error messages: scalars as they are, strings and arrays by type (they can be long).
fn describe(v: &Value) -> String {
    match v {
        Value::String(_) => "a string".into(),
        Value::Array(a) => match a.first() {
            Some(first) => format!("an array of {:?} ({} elements)", first.value_type(), a.len()),
            None => "an empty array".into(),
        },
        v => format!("{v:?}"),
    }
}

/// Prefix-scoped hyperparameter getters over [`Metadata`]: every error names the full key and the file.
struct Meta<'a> {
    get: Metadata<'a>,
    path: &'a Path,
    arch: String,
    n_head: usize,
    n_head_kv: usize,
}

impl<'a> Meta<'a> {
    /// Reads `general.architecture` and checks we support it.
    fn new(md: &'a HashMap<String, Value>, path: &'a Path) -> Result<Self> {
        let mut m = Meta {
            get: Metadata::new(md, path),
            path,
            arch: String::new(),
            n_head: 0,
            n_head_kv: 0,
        };
        let arch = m.string("general.architecture")?.to_string();
        if !ARCHS.iter().any(|(a, _)| *a == arch) {
            let known: Vec<&str> = ARCHS.iter().map(|(a, _)| *a).collect();
            return Err(Error::format(
                path,
                format!(
                    "unknown architecture `{arch}` in GGUF key `general.architecture` (supported: {})",
                    known.join(", ")
                ),
            ));
        }
        m.arch = arch;
        m.n_head = m.uint(&m.key("attention.head_count"))?;
        m.n_head_kv = m.uint_opt(&m.key("attention.head_count_kv"))?.unwrap_or(m.n_head);
        Ok(m)
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn missing(&self, key: &str) -> Error {
        self.get.missing(key)
    }

    fn invalid(&self, key: &str, want: &str, v: &Value) -> Error {
        self.get.invalid(key, want, v)
    }

    fn string(&self, key: &str) -> Result<&'a str> {
        self.get.string(key)?.ok_or_else(|| self.missing(key))
    }

    fn uint_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get.usize(key)
    }

    fn uint(&self, key: &str) -> Result<usize> {
        self.uint_opt(key)?.ok_or_else(|| self.missing(key))
    }

    fn float_opt(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get.get(key) else { return Ok(None) };
        let x = match v {
            // The shortest decimal that rounds to this f32 (1e-5, not 9.999999747378752e-6): GGUF stores
            // f32 what config.json wrote as a decimal.
            Value::F32(x) => x.to_string().parse::<f64>().unwrap_or(f64::from(*x)),
            Value::F64(x) => *x,
            _ => match self.uint_opt(key) {
                Ok(Some(n)) => n as f64,
                _ => return Err(self.invalid(key, "a number", v)),
            },
        };
        if !x.is_finite() {
            return Err(self.invalid(key, "a finite number", v));
        }
        Ok(Some(x))
    }

    /// Translates the hyperparameters into an HF config and validates it like a config.json.
    fn config(&self, tied: bool, embed_rows: Option<usize>) -> Result<ModelConfig> {
        let k = |s: &str| self.key(s);
        let hidden = self.uint(&k("embedding_length"))?;
        let head_dim = match self.uint_opt(&k("attention.key_length"))? {
            Some(h) => h,
            None if self.n_head > 0 && hidden % self.n_head == 0 => hidden / self.n_head,
            None => {
                return Err(Error::format(
                    self.path,
                    format!(
                        "`{}` ({hidden}) is not divisible by `{}` ({}) and there is no `{}`",
                        k("embedding_length"),
                        k("attention.head_count"),
                        self.n_head,
                        k("attention.key_length")
                    ),
                ))
            }
        };
        if let Some(rot) = self.uint_opt(&k("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(Error::format(
                    self.path,
                    format!(
                        "`{}` is {rot} but head_dim is {head_dim}: partial RoPE is not supported",
                        k("rope.dimension_count")
                    ),
                ));
            }
        }
        let vocab = match (
            self.uint_opt(&k("vocab_size"))?,
            self.get.get("tokenizer.ggml.tokens"),
            embed_rows,
        ) {
            (Some(v), _, _) => v,
            (None, Some(Value::Array(toks)), _) => toks.len(),
            (None, _, Some(rows)) => rows,
            (None, _, None) => return Err(self.missing(&k("vocab_size"))),
        };
        let rope_scaling = match self.get.get(&k("rope.scaling.type")) {
            None => None,
            Some(Value::String(s)) if s == "none" => None,
            Some(Value::String(s)) if s == "linear" => {
                let f = self
                    .float_opt(&k("rope.scaling.factor"))?
                    .ok_or_else(|| self.missing(&k("rope.scaling.factor")))?;
                Some(json!({"rope_type": "linear", "factor": f}))
            }
            Some(v) => return Err(self.invalid(&k("rope.scaling.type"), "`none` or `linear`", v)),
        };
        let mut cfg = json!({
            "model_type": self.arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.uint(&k("feed_forward_length"))?,
            "num_hidden_layers": self.uint(&k("block_count"))?,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "head_dim": head_dim,
            "rms_norm_eps": self.float_opt(&k("attention.layer_norm_rms_epsilon"))?
                .ok_or_else(|| self.missing(&k("attention.layer_norm_rms_epsilon")))?,
            "rope_theta": self.float_opt(&k("rope.freq_base"))?.unwrap_or(10000.0),
            "max_position_embeddings": self.uint(&k("context_length"))?,
            "tie_word_embeddings": tied,
            "rope_scaling": rope_scaling,
        });
        if let Some(b) = self.uint_opt("tokenizer.ggml.bos_token_id")? {
            cfg["bos_token_id"] = json!(b);
        }
        if let Some(e) = self.uint_opt("tokenizer.ggml.eos_token_id")? {
            cfg["eos_token_id"] = json!(e);
        }
        ModelConfig::from_hf_json(&cfg, self.path).map_err(|e| self.name_gguf_key(e))
    }

    /// A config error names the HF key it checked; say which GGUF key the value came from.
    fn name_gguf_key(&self, e: dlo_passes::ConfigError) -> Error {
        let dlo_passes::ConfigError::Invalid { path, key, problem } = e else {
            return e.into();
        };
        let gguf = match key.as_str() {
            "num_hidden_layers" => self.key("block_count"),
            "hidden_size" => self.key("embedding_length"),
            "intermediate_size" => self.key("feed_forward_length"),
            "num_attention_heads" => self.key("attention.head_count"),
            "head_dim" => self.key("attention.key_length"),
            "rms_norm_eps" => self.key("attention.layer_norm_rms_epsilon"),
            "rope_theta" => self.key("rope.freq_base"),
            "rope_scaling" => self.key("rope.scaling.factor"),
            "max_position_embeddings" => self.key("context_length"),
            "vocab_size" => self.key("vocab_size"),
            "bos_token_id" => "tokenizer.ggml.bos_token_id".into(),
            "eos_token_id" => "tokenizer.ggml.eos_token_id".into(),
            _ => return dlo_passes::ConfigError::Invalid { path, key, problem }.into(),
        };
        Error::format(path, format!("GGUF metadata key `{gguf}`: {problem}"))
    }
}

/// A minimal, bounds-checked walk over a GGUF header: the version and alignment checked before candle's
/// reader runs, and the tensor whose ggml type candle does not know (candle's reader fails without
/// saying which).
mod scan {
    use std::path::Path;

    /// The header facts [`super::load`] checks first.
    pub(super) struct Header {
        /// The format version (candle reads 1 to 3).
        pub version: u32,
        /// `general.alignment`, when present as an integer.
        pub alignment: Option<u64>,
    }

    /// The version and `general.alignment` of a GGUF file; `None` when the magic is not `GGUF` or the
    /// header ends early (candle's reader reports those).
    pub(super) fn header(path: &Path) -> std::io::Result<Option<Header>> {
        walk(path, |c| {
            if c.take(4)? != b"GGUF" {
                return None;
            }
            let version = c.u32()?;
            if !(2..=3).contains(&version) {
                return Some(Header {
                    version,
                    alignment: None,
                });
            }
            let _n_tensors = c.u64()?;
            let n_kv = c.u64()?;
            let mut alignment = None;
            for _ in 0..n_kv {
                let n = c.u64()?;
                let key = c.take(n)?.to_vec();
                let ty = c.u32()?;
                if key == b"general.alignment" {
                    let at = c.pos;
                    alignment = match ty {
                        0 | 1 => c.take(1).map(|b| u64::from(b[0])),
                        2 | 3 => c.take(2).map(|b| u64::from(u16::from_le_bytes([b[0], b[1]]))),
                        4 | 5 => c.u32().map(u64::from),
                        10 | 11 => c.u64(),
                        _ => None,
                    };
                    c.pos = at;
                }
                c.skip_value(ty, false, 0)?;
            }
            Some(Header { version, alignment })
        })
    }

    /// Runs `f` over the bytes of `path` (mapped read-only for the call).
    fn walk<T>(path: &Path, f: impl FnOnce(&mut Cur) -> Option<T>) -> std::io::Result<Option<T>> {
        let file = std::fs::File::open(path)?;
        // SAFETY: read-only map, dropped before returning.
        let bytes = unsafe { memmap2::Mmap::map(&file)? };
        Ok(f(&mut Cur { b: &bytes, pos: 0 }))
    }

    struct Cur<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl Cur<'_> {
        fn take(&mut self, n: u64) -> Option<&[u8]> {
            let n = usize::try_from(n).ok()?;
            let end = self.pos.checked_add(n)?;
            let s = self.b.get(self.pos..end)?;
            self.pos = end;
            Some(s)
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn len(&mut self, v1: bool) -> Option<u64> {
            if v1 {
                self.u32().map(u64::from)
            } else {
                self.u64()
            }
        }
        fn skip_value(&mut self, ty: u32, v1: bool, depth: usize) -> Option<()> {
            match ty {
                0 | 1 | 7 => self.take(1).map(|_| ()),
                2 | 3 => self.take(2).map(|_| ()),
                4..=6 => self.take(4).map(|_| ()),
                10..=12 => self.take(8).map(|_| ()),
                8 => {
                    let n = self.len(v1)?;
                    self.take(n).map(|_| ())
                }
                9 if depth < 8 => {
                    let ety = self.u32()?;
                    let n = self.len(v1)?;
                    (0..n).try_for_each(|_| self.skip_value(ety, v1, depth + 1))
                }
                _ => None,
            }
        }
    }

    /// The first tensor whose ggml type candle cannot represent, as (name, type id).
    pub(super) fn first_unknown_type(path: &Path) -> std::io::Result<Option<(String, u32)>> {
        walk(path, |c| {
            if c.take(4)? != b"GGUF" {
                return None;
            }
            let v1 = c.u32()? == 1;
            let n_tensors = c.len(v1)?;
            let n_kv = c.len(v1)?;
            for _ in 0..n_kv {
                let n = c.len(v1)?;
                c.take(n)?;
                let ty = c.u32()?;
                c.skip_value(ty, v1, 0)?;
            }
            for _ in 0..n_tensors {
                let n = c.len(v1)?;
                let name = String::from_utf8_lossy(c.take(n)?).into_owned();
                let n_dims = c.u32()?;
                for _ in 0..n_dims {
                    c.len(v1)?;
                }
                let ty = c.u32()?;
                c.u64()?;
                if !matches!(ty, 0..=3 | 6..=15 | 30) {
                    return Some((name, ty));
                }
            }
            None
        })
    }
}
