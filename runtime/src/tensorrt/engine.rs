//! Opening a deployment's engines with TensorRT's runtime (cargo feature `tensorrt`). Deserializing an
//! engine needs a GPU and the TensorRT version that built it; on a machine without either this is where a
//! driver stops, with an error naming the engine file and the reason.

use super::{ErrorLog, LibDir, Manifest, Stage};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use trtx::{Logger, Runtime};

/// A deployment whose engines TensorRT deserialized on this machine, with I/O tensors as its manifest says.
#[derive(Debug)]
pub struct Engines {
    /// The deployment directory.
    pub dir: PathBuf,
    /// Its checked manifest.
    pub manifest: Manifest,
}

impl Engines {
    /// Reads and checks `dir`'s manifest, loads the library in `lib`, refuses one whose version differs from
    /// the one that built the engines, and deserializes both engines (each read once, checked against the
    /// manifest's size and CRC-32), checking their I/O tensors' names against the manifest.
    pub fn open(dir: &Path, lib: &LibDir) -> Result<Engines> {
        let manifest = Manifest::read_unverified(dir)?;
        let (version, _) = super::load_library(lib)?;
        if version != manifest.tensorrt.version {
            return Err(Error::format(
                &lib.builder,
                format!(
                    "TensorRT-RTX {version}, but the engines in {} were built by {}; rebuild them with this library",
                    dir.display(),
                    manifest.tensorrt.version
                ),
            ));
        }
        let log = ErrorLog::default();
        let logger = Logger::new(log.clone()).map_err(|e| Error::format(&lib.builder, e.to_string()))?;
        let mut runtime = Runtime::new(&logger).map_err(|e| Error::format(&lib.builder, e.to_string()))?;
        for stage in [Stage::Prefill, Stage::Decode] {
            let entry = manifest.engine(stage);
            let path = dir.join(&entry.file);
            let bytes = manifest.engine_bytes(dir, stage)?;
            let engine = runtime.deserialize_cuda_engine(&bytes).map_err(|e| {
                Error::format(
                    &path,
                    format!(
                        "TensorRT could not deserialize the engine (running engines needs an NVIDIA GPU that \
                         TensorRT-RTX supports, and its driver): {}",
                        log.errors_or(e.to_string())
                    ),
                )
            })?;
            let n = engine
                .nb_io_tensors()
                .map_err(|e| Error::format(&path, e.to_string()))?;
            let want = entry.inputs.len() + entry.outputs.len();
            if n as usize != want {
                return Err(Error::format(
                    &path,
                    format!("{n} I/O tensors, the manifest lists {want}: the engine does not match its manifest"),
                ));
            }
            for t in entry.inputs.iter().chain(&entry.outputs) {
                engine.tensor_data_type(&t.name).map_err(|e| {
                    Error::format(
                        &path,
                        format!(
                            "no I/O tensor `{}` ({e}): the engine does not match its manifest",
                            t.name
                        ),
                    )
                })?;
            }
        }
        Ok(Engines {
            dir: dir.to_path_buf(),
            manifest,
        })
    }
}
