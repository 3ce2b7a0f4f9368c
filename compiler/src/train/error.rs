//! The trainer's error type: every variant names the file (and line) or the setting it is about.

use std::path::PathBuf;

/// Result alias for the trainer.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Errors from reading training data, running training steps and writing or resuming checkpoints.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A line of a data file is malformed (bad JSON, missing fields, unknown roles, ...).
    #[error("{path}:{line}: {problem}")]
    Data {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    /// A file is unusable as a whole (wrong format, empty, unreadable archive, ...).
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A resume directory does not fit this run.
    #[error("cannot resume from {path}: {problem}")]
    Resume { path: PathBuf, problem: String },
    /// A command-line setting is out of range or contradicts the model.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// Loading or running the model failed.
    #[error(transparent)]
    Runtime(#[from] dlo_runtime::Error),
    /// A tensor operation failed (without candle's backtrace).
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Candle(dlo_runtime::error::without_backtrace(e))
    }
}

impl TrainError {
    /// An [`TrainError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
    /// A [`TrainError::File`] for `path`.
    pub fn file(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        TrainError::File {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
