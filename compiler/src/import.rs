//! `dlo-compile import`: any supported checkpoint → an HF directory (safetensors + config.json +
//! tokenizer.json + tokenizer_config.json) that HF transformers can load. Written to a temporary directory
//! and renamed into place, so a failed import leaves nothing behind.
//!
//! The output holds exactly the tensors the config needs ([`expected_tensors`]), in HF names and layout:
//! GGUF tensors arrive dequantized with llama.cpp's Q/K permutation undone; tied embeddings are written once
//! (no `lm_head.weight`, `tie_word_embeddings: true`); DLO routers pass through.
//!
//! OWNER: loader work (issue 2).

use candle_core::{DType, Device, Tensor};
use dlo_passes::fsutil::AtomicDir;
use dlo_passes::ModelConfig;
use dlo_runtime::weights::expected_tensors;
use dlo_runtime::{Checkpoint, Error, Result, Tokenizer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arguments of `dlo-compile import`; [`ImportArgs::plan`] validates them.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Source checkpoint: an HF directory or a GGUF file.
    pub src: PathBuf,
    /// Output directory (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Storage dtype of the written tensors.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

impl ImportArgs {
    /// The import these arguments ask for.
    pub fn plan(&self) -> Result<ImportPlan, ImportError> {
        Ok(ImportPlan {
            src: self.src.clone(),
            output: self.output.clone(),
            dtype: parse_dtype(&self.dtype)?,
        })
    }
}

/// What to import: a source checkpoint, the output directory and the storage dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportPlan {
    /// Source checkpoint: an HF directory or a GGUF file.
    pub src: PathBuf,
    /// Output directory (must not exist).
    pub output: PathBuf,
    /// Storage dtype of the written tensors: f32, bf16 or f16.
    pub dtype: DType,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// A setting is invalid (an unsupported storage dtype).
    #[error("{0}")]
    Invalid(String),
    /// The source cannot be opened as a checkpoint.
    #[error("cannot import {}", path.display())]
    Open {
        /// The source.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: Error,
    },
    /// Converting or writing the output failed (nothing is left behind), or the output already exists.
    #[error(transparent)]
    Write(#[from] Error),
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    /// The output directory.
    pub output: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Their storage dtype.
    pub dtype: DType,
}

/// An import whose source is open and not yet written: [`Import::warnings`] are known before
/// [`Import::write`] runs (the command prints them first).
pub struct Import {
    plan: ImportPlan,
    ck: Checkpoint,
}

impl Import {
    /// Opens the source of `plan`.
    pub fn open(plan: ImportPlan) -> Result<Import, ImportError> {
        let ck = Checkpoint::open(&plan.src).map_err(|source| ImportError::Open {
            path: plan.src.clone(),
            source,
        })?;
        Ok(Import { plan, ck })
    }

    /// What the output will lack: source tensors the config does not use, a missing tokenizer.
    pub fn warnings(&self) -> Vec<String> {
        let path = self.ck.path.display();
        let mut w: Vec<String> = (self.ck.report.warnings().iter())
            .map(|w| format!("{path}: {w} (not written)"))
            .collect();
        if self.ck.tokenizer.is_none() {
            w.push(format!("{path}: no tokenizer; the output will have none"));
        }
        w
    }

    /// Writes the output directory ([`import_checkpoint`]).
    pub fn write(self) -> Result<ImportReport, ImportError> {
        import_checkpoint(&self.ck, &self.plan.output, self.plan.dtype)?;
        Ok(ImportReport {
            output: self.plan.output,
            tensors: expected_tensors(&self.ck.config).len(),
            dtype: self.plan.dtype,
        })
    }
}

/// Opens and writes the import `plan` asks for, ignoring warnings (see [`Import`] to see them first).
pub fn run(plan: ImportPlan) -> Result<ImportReport, ImportError> {
    Import::open(plan)?.write()
}

/// `f32` / `bf16` / `f16` → the candle dtype.
pub fn parse_dtype(s: &str) -> Result<DType, ImportError> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(ImportError::Invalid(format!(
            "unsupported --dtype `{other}` (f32, bf16, f16)"
        ))),
    }
}

/// The HF `torch_dtype` name of a storage dtype.
fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Writes `ck` as an HF directory at `out` (which must not exist), tensors stored as `dtype`.
pub fn import_checkpoint(ck: &Checkpoint, out: &Path, dtype: DType) -> Result<()> {
    write_dir_atomically(out, |dir| {
        let mut cfg: ModelConfig = ck.config.clone();
        cfg.torch_dtype = Some(torch_dtype(dtype).to_string());
        write_weights(ck, &cfg, dtype, &dir.join("model.safetensors"))?;
        write_json(&dir.join("config.json"), &cfg.to_hf_json())?;
        // The safetensors writer creates its file owner-only; give it the same mode as our other files.
        let mode = std::fs::metadata(dir.join("config.json"))
            .map_err(|e| Error::io(dir, e))?
            .permissions();
        let st = dir.join("model.safetensors");
        std::fs::set_permissions(&st, mode).map_err(|e| Error::io(&st, e))?;
        write_generation_config(&cfg, dir)?;
        if let Some(tok) = &ck.tokenizer {
            write_tokenizer_files(tok, cfg.max_position_embeddings, dir)?;
        }
        Ok(())
    })
}

/// Creates `out` by running `fill` on a fresh temporary directory next to it ([`AtomicDir`]) and renaming
/// that into place. Refuses an existing `out`; on any error the temporary directory is removed and `out` is
/// not created.
pub fn write_dir_atomically(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.symlink_metadata().is_ok() {
        return Err(already_exists(out));
    }
    if out.file_name().is_none() {
        return Err(Error::InvalidArgument(format!(
            "{}: not a directory name",
            out.display()
        )));
    }
    let tmp = AtomicDir::create(out)?;
    fill(tmp.path())?;
    tmp.commit_new().map_err(|e| {
        if e.already_exists() {
            already_exists(out)
        } else {
            e.into()
        }
    })
}

fn already_exists(out: &Path) -> Error {
    Error::io(
        out,
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "output already exists (refusing to overwrite it)",
        ),
    )
}

/// Writes every tensor `cfg` needs, converted to `dtype`, as one safetensors file with the
/// `{"format": "pt"}` metadata transformers expects.
fn write_weights(ck: &Checkpoint, cfg: &ModelConfig, dtype: DType, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, shape) in expected_tensors(cfg) {
        let t = ck.weights.get(&name, &shape, dtype, &Device::Cpu)?.contiguous()?;
        tensors.push((name, t));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(meta), path)
        .map_err(|e| Error::format(path, format!("cannot write safetensors: {e}")))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::format(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// `generation_config.json` with the special-token ids, so `generate` in transformers stops at EOS.
fn write_generation_config(cfg: &ModelConfig, dir: &Path) -> Result<()> {
    let mut g = serde_json::Map::new();
    if let Some(b) = cfg.bos_token_id {
        g.insert("bos_token_id".into(), json!(b));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            g.insert("eos_token_id".into(), json!(one));
        }
        many => {
            g.insert("eos_token_id".into(), json!(many));
        }
    }
    write_json(&dir.join("generation_config.json"), &Value::Object(g))
}

/// Writes `tokenizer.json` and `tokenizer_config.json` for `tok` into `dir`, in the form transformers loads
/// ([`Tokenizer::to_hf_tokenizer_json`], [`Tokenizer::hf_tokenizer_config`]) plus `model_max_length`.
pub fn write_tokenizer_files(tok: &Tokenizer, model_max_length: usize, dir: &Path) -> Result<()> {
    let tj_path = dir.join("tokenizer.json");
    let tj: Value =
        serde_json::from_str(&tok.to_hf_tokenizer_json()?).map_err(|e| Error::format(&tj_path, e.to_string()))?;
    write_json(&tj_path, &tj)?;
    let mut tc = tok.hf_tokenizer_config();
    tc["model_max_length"] = json!(model_max_length);
    write_json(&dir.join("tokenizer_config.json"), &tc)
}

#[cfg(test)]
#[path = "import_tests.rs"]
mod tests;
