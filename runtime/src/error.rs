//! The runtime's error type: every variant names the file (and tensor or key) it is about.

use std::path::PathBuf;

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors from loading checkpoints, tokenizers and engines, and from running models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// config.json (or GGUF metadata translated into a config) is missing keys or contradicts itself.
    #[error(transparent)]
    Config(#[from] dlo_passes::ConfigError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not in the format it claims (truncated, corrupt header, offsets past the end, ...).
    #[error("{path}: {problem}")]
    Format { path: PathBuf, problem: String },
    /// A tensor the model needs is absent.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor's shape disagrees with the config.
    #[error("{path}: tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// The config declares a different number of decoder layers than the tensors describe.
    #[error(
        "{path}: the config declares {config} decoder layers (num_hidden_layers) but the tensors describe {found} \
         (layer indices 0..{found}); the config does not belong to these weights"
    )]
    LayerCount { path: PathBuf, config: usize, found: usize },
    /// Several tensors disagree with the config; the report lists each (and unused tensors).
    #[error("{path}: the tensors do not match the config:{report}")]
    Tensors {
        path: PathBuf,
        report: Box<crate::weights::LoadReport>,
    },
    /// A dtype or quantization type we cannot read.
    #[error(
        "{path}: tensor `{name}`: unsupported type {dtype} (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, \
         q2_k, q3_k, q4_k, q5_k, q6_k)"
    )]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer ({path}): {problem}")]
    Tokenizer { path: PathBuf, problem: String },
    /// The operation needs a tokenizer and the model has none.
    #[error("{path}: no tokenizer (no tokenizer.json, tokenizer.model or GGUF vocabulary); use --token-ids")]
    NoTokenizer { path: PathBuf },
    /// Chat-template rendering failed.
    #[error("chat template: {0}")]
    Template(String),
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A tensor operation failed (the error carries no backtrace: see [`without_backtrace`]).
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),
    /// The model produced NaN or infinite logits; generation stops instead of sampling from them.
    #[error("non-finite logits (NaN or infinity) at position {position}: {cause}")]
    NonFiniteLogits {
        /// The position (0-based, in the sequence) whose logits are not finite.
        position: usize,
        /// The first decoder layer whose output is not finite, when the backend could tell.
        layer: Option<usize>,
        /// What the diagnosis found, in words.
        cause: String,
    },
    /// An engine file was written by a newer format version than this runtime reads.
    #[error(
        "{path}: engine format version {found} is newer than this runtime supports ({supported}); \
         rebuild the engine or upgrade dlo"
    )]
    EngineVersion { path: PathBuf, found: u16, supported: u16 },
    /// An engine file's checksum does not match its contents (`what` is the manifest or a tensor).
    #[error("{path}: integrity check failed for {what}: stored crc32 {expected:08x}, computed {found:08x}")]
    Integrity {
        path: PathBuf,
        what: String,
        expected: u32,
        found: u32,
    },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(without_backtrace(e))
    }
}

/// `e` without the backtraces candle attaches when `RUST_BACKTRACE` is set: they belong in a debugger, not
/// in an error message (or `dlo_last_error()`). Context and path wrappers are kept.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => without_backtrace(*inner),
        E::Context { inner, context } => E::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        e => e,
    }
}

/// For programs that own their process (`dlo-run`, `dlo-compile`, `dlo-fuzz`): keeps library backtraces out
/// of error values (`RUST_LIB_BACKTRACE=0` unless the user set it), so that `RUST_BACKTRACE` serves panics only.
/// Call it first thing in `main`, before any thread starts.
pub fn quiet_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// The message of a candle error, without backtraces ([`without_backtrace`]).
pub fn candle_message(e: candle_core::Error) -> String {
    without_backtrace(e).to_string()
}

impl From<dlo_passes::fsutil::FsError> for Error {
    fn from(e: dlo_passes::fsutil::FsError) -> Self {
        Error::io(e.path, e.source)
    }
}

impl Error {
    /// Builds an [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            problem: problem.into(),
        }
    }
    /// Builds an [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// One line for a command-line report: the error and each cause in its chain, leaving out a cause whose text
/// the line already holds (our errors print their I/O source inline, so `{:#}` would say it twice).
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod report_tests {
    use super::*;

    #[test]
    fn report_names_each_cause_once() {
        let e = Error::io("/x/model.gguf", std::io::Error::from(std::io::ErrorKind::NotFound));
        let line = report(&e);
        assert_eq!(line.matches("not found").count(), 1, "{line}");
        assert!(line.starts_with("/x/model.gguf: "), "{line}");
        let wrapped = anyhow::Error::new(e).context("loading the model");
        let line = report(wrapped.as_ref());
        assert_eq!(line, "loading the model: /x/model.gguf: entity not found");
    }
}

#[cfg(test)]
mod backtrace_tests {
    use super::*;

    #[test]
    fn candle_backtraces_stay_out_of_messages() {
        let traced = |e: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = traced(candle_core::Error::Msg("shape mismatch".into()).context("loading `w`"));
        let e = traced(e);
        assert!(e.to_string().contains("candle_backtraces_stay_out_of_messages"), "{e}");
        let msg = Error::from(e).to_string();
        assert_eq!(msg, "tensor operation failed: loading `w`\nshape mismatch");
        let e = traced(candle_core::Error::Msg("bad".into())).with_path("/m/x");
        assert_eq!(candle_message(e), "path: \"/m/x\" bad");
    }
}
