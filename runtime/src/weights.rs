//! Named tensors behind one interface, whatever the file format.
//!
//! Loaders (HF safetensors directories, GGUF files, engine files) produce a [`Weights`]: tensors keyed by
//! their **HF names** (`model.layers.3.self_attn.q_proj.weight`), in HF layout (GGUF's Q/K row permutation
//! already undone, tied embeddings not duplicated). The model asks for a tensor by name and expected shape;
//! a missing tensor or wrong shape is an error naming the file and the tensor.
//!
//! OWNER: loader work (issue 2). The API below is what the model definition uses; keep it.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where tensors come from.
enum Store {
    /// Memory-mapped safetensors files (one or several shards).
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// Tensors already materialised (GGUF dequantised at load, tests, passes).
    Loaded(HashMap<String, Tensor>),
    /// A memory-mapped engine file; tensors are copied out (and checksummed) when first loaded.
    Engine(std::sync::Arc<crate::engine::format::EngineFile>),
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
            .map_err(|e| Error::format(&path, format!("invalid safetensors: {e}")))?;
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
        }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.store {
            Store::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Store::Loaded(m) => m.keys().cloned().collect(),
            Store::Engine(e) => e.tensors().iter().map(|t| t.name.clone()).collect(),
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
        }
    }

    /// Loads `name`, checks it has `shape`, converts it to `dtype` on `device`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
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
        let t = match &self.store {
            Store::Safetensors(st) => st
                .load(name, device)
                .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))?,
            Store::Loaded(m) => m[name].to_device(device)?,
            Store::Engine(e) => e.load(name, device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }
}
