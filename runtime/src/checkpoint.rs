//! Opening a checkpoint: an HF directory (config.json + safetensors, sharded or not) or a GGUF file.
//!
//! [`Checkpoint::open`] detects the format (a directory, or a file starting with the GGUF magic) and returns
//! the validated config, the weights (HF names and layout) and the tokenizer if one is present. Everything
//! about file formats stops here: the model only sees [`ModelConfig`] and [`Weights`].
//!
//! Validation happens at open time: corrupt or truncated files, a shard index naming a missing file, and
//! tensors that are missing or disagree with the config are errors naming the file; tensors nothing uses are
//! recorded in [`Checkpoint::report`] as warnings.
//!
//! OWNER: loader work (issue 2). Keep the public API.

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadReport, Weights};
use dlo_passes::source::INDEX_FILE;
use dlo_passes::{ModelConfig, SafetensorsIndex};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The on-disk format a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// HF directory with config.json and safetensors.
    HfDir,
    /// A GGUF file.
    Gguf,
}

/// A loaded checkpoint: config, weights and (optional) tokenizer.
pub struct Checkpoint {
    /// Validated model configuration.
    pub config: ModelConfig,
    /// Tensors by HF name.
    pub weights: Weights,
    /// Tokenizer and chat template, when the checkpoint ships one.
    pub tokenizer: Option<Tokenizer>,
    /// What was opened.
    pub path: PathBuf,
    /// Its format.
    pub format: SourceFormat,
    /// The tensor check done at open time (always [`LoadReport::is_ok`]; `unused` lists tensors that
    /// nothing needs, by their name in the source file).
    pub report: LoadReport,
}

/// The first bytes of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const NOT_A_CHECKPOINT: &str = "not a checkpoint: expected an HF directory with config.json or a GGUF file";

impl Checkpoint {
    /// Opens an HF directory or a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(Error::format(
                    path,
                    format!("{NOT_A_CHECKPOINT} (the directory has no config.json)"),
                ));
            }
            return Self::open_hf_dir(path);
        }
        match detect_file(path)? {
            SourceFormat::Gguf => {
                let g = crate::gguf::load(path)?;
                Ok(Checkpoint {
                    config: g.config,
                    weights: g.weights,
                    tokenizer: g.tokenizer,
                    path: path.to_path_buf(),
                    format: SourceFormat::Gguf,
                    report: g.report,
                })
            }
            SourceFormat::HfDir => unreachable!("detect_file only returns file formats"),
        }
    }

    /// Opens an HF directory: config.json, safetensors (single or sharded), tokenizer files.
    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
        let files = safetensors_files(dir)?;
        let weights = Weights::from_safetensors(&files, dir)?;
        let report = weights.check(&config).into_result(dir)?;
        let tokenizer = Tokenizer::from_hf_dir(dir)?;
        Ok(Checkpoint {
            config,
            weights,
            tokenizer,
            path: dir.to_path_buf(),
            format: SourceFormat::HfDir,
            report,
        })
    }
}

/// Decides what a (non-directory) file is from its first bytes.
fn detect_file(path: &Path) -> Result<SourceFormat> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = read_up_to(&mut f, &mut magic).map_err(|e| Error::io(path, e))?;
    if n == 4 && &magic == GGUF_MAGIC {
        return Ok(SourceFormat::Gguf);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let hint = if name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".index.json") {
        " (pass the directory that contains it)"
    } else {
        ""
    };
    Err(Error::format(path, format!("{NOT_A_CHECKPOINT}{hint}")))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The safetensors files of an HF directory, each checked to be a valid safetensors file; for a sharded
/// checkpoint, the index is checked too (every shard exists, every tensor is where the index says, no tensor
/// in two shards).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    let single = dir.join("model.safetensors");
    if index.is_file() {
        let read = SafetensorsIndex::read(&index).map_err(passes_error)?;
        let files = read.shard_files();
        let mut location: HashMap<String, &str> = HashMap::new();
        for (file, shard) in files.iter().zip(read.shards()) {
            for name in safetensors_names(file)? {
                if let Some(other) = location.insert(name.clone(), shard) {
                    return Err(Error::format(
                        &index,
                        format!("tensor `{name}` is stored in both `{other}` and `{shard}`"),
                    ));
                }
            }
        }
        let mut names: Vec<&String> = read.weight_map.keys().collect();
        names.sort();
        for name in names {
            let shard = &read.weight_map[name];
            if location.get(name) != Some(&shard.as_str()) {
                return Err(Error::format(
                    &index,
                    format!("maps tensor `{name}` to `{shard}`, which does not contain it"),
                ));
            }
        }
        Ok(files)
    } else if single.is_file() {
        safetensors_names(&single)?;
        Ok(vec![single])
    } else {
        let hint = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
            " (PyTorch .bin checkpoints are not supported: convert them to safetensors)"
        } else {
            ""
        };
        Err(Error::format(
            dir,
            format!("no model.safetensors or model.safetensors.index.json{hint}"),
        ))
    }
}

/// A file error from [`dlo_passes`] (the index reader) as the runtime's error.
fn passes_error(e: dlo_passes::Error) -> Error {
    match e {
        dlo_passes::Error::Io { path, source } => Error::Io { path, source },
        dlo_passes::Error::Format { path, problem } => Error::Format { path, problem },
        other => Error::InvalidArgument(other.to_string()),
    }
}

/// Validates one safetensors file (header, offsets, length) and returns its tensor names.
fn safetensors_names(file: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    // SAFETY: mapped read-only and dropped before returning; see `Weights::from_safetensors`.
    let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(file, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        Error::format(
            file,
            format!("invalid safetensors file: {}", describe_st_error(&e, &mmap)),
        )
    })?;
    Ok(st.names().into_iter().map(str::to_string).collect())
}

/// A readable description of a safetensors error (its Display is terse for some variants).
fn describe_st_error(e: &safetensors::SafeTensorError, bytes: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file too short for a safetensors header (truncated?)".into(),
        E::HeaderTooLarge => "header length is implausibly large (corrupt, or not a safetensors file)".into(),
        E::InvalidHeaderLength => "the header length points past the end of the file (truncated?)".into(),
        E::InvalidHeader(_) | E::InvalidHeaderDeserialization(_) => format!("corrupt header: {e}"),
        E::MetadataIncompleteBuffer => match data_end(bytes) {
            Some((end, have)) => format!(
                "the header's tensor offsets end at data byte {end} but the file holds {have} data bytes \
                 (truncated, or offsets past the end)"
            ),
            None => "tensor offsets do not match the file length (truncated, or offsets past the end)".into(),
        },
        E::InvalidOffset(name) => format!("tensor `{name}` has offsets that are not contiguous"),
        E::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".into(),
        _ => e.to_string(),
    }
}

/// (largest end offset in the header, data bytes present) for a file whose header parses.
fn data_end(bytes: &[u8]) -> Option<(u64, u64)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let header = bytes.get(8..8usize.checked_add(usize::try_from(n).ok()?)?)?;
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let end = v
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    Some((end, bytes.len() as u64 - 8 - n))
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
