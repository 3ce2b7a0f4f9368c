//! Where the writer reads base tensors from: the [`TensorSource`] trait, and [`SafetensorsDir`], a
//! memory-mapped HF safetensors checkpoint (single file or sharded with an index).

use crate::error::{Error, Result};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A read-only set of named tensors in HF naming and layout, read one tensor at a time as `f32`.
pub trait TensorSource {
    /// All tensor names.
    fn names(&self) -> Vec<String>;
    /// The shape of `name`, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Reads `name` as row-major `f32` (converting from the stored dtype).
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// The file or directory these tensors come from, for error messages.
    fn origin(&self) -> &Path;
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors files of one checkpoint. Reading a tensor touches only its pages.
pub struct SafetensorsDir {
    origin: PathBuf,
    maps: Vec<memmap2::Mmap>,
    files: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
}

/// The index file of a sharded safetensors checkpoint directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A sharded checkpoint's index (`model.safetensors.index.json`): which shard holds each tensor. The one
/// reader of the format, for the compiler's sources and the runtime's checkpoints alike.
#[derive(Debug, Clone)]
pub struct SafetensorsIndex {
    /// The index file.
    pub path: PathBuf,
    /// Tensor name → shard, a plain file name in the index's directory.
    pub weight_map: HashMap<String, String>,
}

impl SafetensorsIndex {
    /// Reads and checks `index`: JSON with a `weight_map` object whose values are plain file names of
    /// shards that exist beside it. Every problem is an error naming the index file.
    pub fn read(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
        let mut weight_map = HashMap::with_capacity(map.len());
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| Error::format(index, format!("`weight_map` entry `{name}` is not a file name")))?;
            let plain = Path::new(file).file_name().and_then(|f| f.to_str()) == Some(file);
            if !plain {
                return Err(Error::format(index, format!("shard `{file}` is not a plain file name")));
            }
            weight_map.insert(name.clone(), file.to_string());
        }
        let read = SafetensorsIndex {
            path: index.to_path_buf(),
            weight_map,
        };
        let dir = read.dir();
        for s in read.shards() {
            if !dir.join(s).is_file() {
                return Err(Error::format(
                    index,
                    format!("names shard `{s}`, which does not exist in {}", dir.display()),
                ));
            }
        }
        Ok(read)
    }

    /// The directory the index and its shards are in.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The distinct shard file names, sorted.
    pub fn shards(&self) -> Vec<&str> {
        let mut shards: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// The distinct shards as paths beside the index, sorted.
    pub fn shard_files(&self) -> Vec<PathBuf> {
        self.shards().into_iter().map(|s| self.dir().join(s)).collect()
    }
}

/// The safetensors files of a checkpoint: a `.safetensors` file itself; a directory's
/// `model.safetensors.index.json` shards; or every `*.safetensors` in the directory.
pub fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let index = path.join(INDEX_FILE);
    if index.is_file() {
        return Ok(SafetensorsIndex::read(&index)?.shard_files());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(path, "no .safetensors files in this directory"));
    }
    Ok(files)
}

impl SafetensorsDir {
    /// Maps the checkpoint at `path` (a directory or one `.safetensors` file) and reads its headers.
    pub fn open(path: &Path) -> Result<Self> {
        let files = safetensors_files(path)?;
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
            // SAFETY: mapped read-only and never handed out mutably; truncation by another process while
            // mapped is outside what an mmap-based reader can defend against.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(f, e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| Error::format(f, format!("invalid safetensors: {e}")))?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > map.len() || s > e {
                    return Err(Error::format(f, format!("tensor `{name}` lies outside the file")));
                }
                if entries.contains_key(&name) {
                    return Err(Error::format(
                        f,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            maps.push(map);
        }
        Ok(SafetensorsDir {
            origin: path.to_path_buf(),
            maps,
            files,
            entries,
        })
    }
}

/// Decodes little-endian `f32`/`f16`/`bf16` bytes.
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

impl TensorSource for SafetensorsDir {
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            origin: self.origin.clone(),
            name: name.into(),
        })?;
        let map = &self.maps[e.file];
        let n: usize = e.shape.iter().product();
        let decoded = decode_f32(e.dtype, &map[e.start..e.end]);
        // Streaming: drop the tensor's mapped pages from our resident set once decoded, so reading a whole
        // checkpoint does not grow RSS by the file size (the kernel re-reads them if ever touched again).
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed; no slice into this range outlives this point
        // (the data was copied into `decoded`), so discarding the pages cannot invalidate any borrow.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, e.start, e.end - e.start) };
        let v = decoded.ok_or_else(|| {
            Error::tensor_read(
                &self.files[e.file],
                name,
                format!("unsupported dtype {:?} (supported: F32, F16, BF16)", e.dtype),
            )
        })?;
        if v.len() != n {
            return Err(Error::tensor_read(
                &self.files[e.file],
                name,
                format!("holds {} values but its shape {:?} needs {n}", v.len(), e.shape),
            ));
        }
        Ok(v)
    }
    fn origin(&self) -> &Path {
        &self.origin
    }
}

/// A [`TensorSource`] that synthesises a Llama checkpoint's tensors on demand from their names (nothing is
/// stored), for memory benchmarks and tests at any scale. Values are deterministic, distinct per tensor,
/// and roughly in [-0.05, 0.05); norms are near 1.
pub struct SyntheticSource {
    origin: PathBuf,
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
}

impl SyntheticSource {
    /// The tensors a Llama-family checkpoint with `cfg` holds (lm_head only when embeddings are untied,
    /// q/k/v biases when `attention_bias`).
    pub fn llama(cfg: &crate::ModelConfig) -> Self {
        let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let mut shapes = std::collections::BTreeMap::new();
        shapes.insert("model.embed_tokens.weight".to_string(), vec![v, d]);
        shapes.insert("model.norm.weight".to_string(), vec![d]);
        if !cfg.tie_word_embeddings {
            shapes.insert("lm_head.weight".to_string(), vec![v, d]);
        }
        for l in 0..cfg.num_hidden_layers {
            let mut add = |s: &str, shape: Vec<usize>| {
                shapes.insert(format!("model.layers.{l}.{s}"), shape);
            };
            add("input_layernorm.weight", vec![d]);
            add("post_attention_layernorm.weight", vec![d]);
            add("self_attn.q_proj.weight", vec![q, d]);
            add("self_attn.k_proj.weight", vec![kv, d]);
            add("self_attn.v_proj.weight", vec![kv, d]);
            add("self_attn.o_proj.weight", vec![d, q]);
            add("mlp.gate_proj.weight", vec![f, d]);
            add("mlp.up_proj.weight", vec![f, d]);
            add("mlp.down_proj.weight", vec![d, f]);
            if cfg.attention_bias {
                add("self_attn.q_proj.bias", vec![q]);
                add("self_attn.k_proj.bias", vec![kv]);
                add("self_attn.v_proj.bias", vec![kv]);
            }
        }
        SyntheticSource {
            origin: PathBuf::from("<synthetic>"),
            shapes,
        }
    }

    /// Element `i` of tensor `name`.
    pub fn value(name: &str, i: usize) -> f32 {
        Self::value_with(crate::init::name_hash(name), name.contains("norm"), i)
    }

    fn value_with(h: u64, norm: bool, i: usize) -> f32 {
        let mut z = h ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let u = ((z >> 40) as f32) / (1u64 << 24) as f32 - 0.5;
        if norm {
            1.0 + 0.1 * u
        } else {
            0.1 * u
        }
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.shapes.values().map(|s| s.iter().product::<usize>()).sum()
    }
}

impl TensorSource for SyntheticSource {
    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self.shapes.get(name).ok_or_else(|| Error::MissingTensor {
            origin: self.origin.clone(),
            name: name.into(),
        })?;
        let n: usize = shape.iter().product();
        let (h, norm) = (crate::init::name_hash(name), name.contains("norm"));
        Ok((0..n).map(|i| Self::value_with(h, norm, i)).collect())
    }
    fn origin(&self) -> &Path {
        &self.origin
    }
}
