//! The passes crate's error type: every variant names what is wrong (file, layer, tensor, flag) and
//! what was expected, so a user can fix the input without reading the source.

use crate::config::ConfigError;
use std::path::PathBuf;

/// Errors from building, transforming, validating or writing a [`crate::ModelSpec`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The requested layer count cannot be produced by the expansion method.
    #[error("{method}: cannot expand {base} layers to {target}: {problem}")]
    LayerCount {
        method: &'static str,
        base: usize,
        target: usize,
        problem: String,
    },
    /// A `--ranges` / recipe `ranges` entry is malformed, empty or out of bounds.
    #[error("stack-manual range `{range}`: {problem}")]
    Range { range: String, problem: String },
    /// The stack-manual ranges do not add up to the target layer count.
    #[error("stack-manual ranges `{ranges}` hold {sum} layers in total, but --layers is {target}")]
    RangeSum { ranges: String, sum: usize, target: usize },
    /// An option has a value outside its vocabulary (method, init, skip kind, loss type, dtype, ...).
    #[error("unknown {what} `{value}` (expected one of: {expected})")]
    Unknown {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A numeric option is out of range or inconsistent with other options.
    #[error("invalid {name}: {problem}")]
    InvalidParam { name: &'static str, problem: String },
    /// The IR breaks an invariant at one layer.
    #[error("layer {layer}: {problem}")]
    InvalidLayer { layer: usize, problem: String },
    /// The IR breaks a model-wide invariant.
    #[error("invalid model spec: {problem}")]
    InvalidSpec { problem: String },
    /// `validate()` failed after a pass ran.
    #[error("after pass `{pass}`: {source}")]
    AfterPass {
        pass: &'static str,
        #[source]
        source: Box<Error>,
    },
    /// The base checkpoint is already a DLO model; expanding routed models is not supported.
    #[error("{path}: the base model is already a DLO model (model_type {model_type}); expand a plain Llama-family checkpoint")]
    BaseIsDlo { path: PathBuf, model_type: String },
    /// A recipe file could not be parsed.
    #[error("{path}: invalid recipe: {problem}")]
    Recipe { path: PathBuf, problem: String },
    /// A tensor the spec needs is absent from the source.
    #[error("{origin}: missing tensor `{name}`")]
    MissingTensor { origin: PathBuf, name: String },
    /// Two tensors that must agree in shape do not (merges), or a tensor has an unexpected shape.
    #[error("{origin}: tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        origin: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor could not be read or decoded.
    #[error("{origin}: tensor `{name}`: {problem}")]
    TensorRead {
        origin: PathBuf,
        name: String,
        problem: String,
    },
    /// A file is not valid safetensors (or an index is inconsistent).
    #[error("{path}: {problem}")]
    Format { path: PathBuf, problem: String },
    /// The output directory already exists (we never overwrite).
    #[error("{path}: output already exists; choose a new directory or remove it")]
    OutputExists { path: PathBuf },
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The base config.json is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A format error about `path`.
    pub fn format(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            problem: problem.into(),
        }
    }
    /// A read/decode error for tensor `name` of `origin` (for [`crate::TensorSource`] implementations).
    pub fn tensor_read(origin: impl Into<PathBuf>, name: &str, problem: impl std::fmt::Display) -> Self {
        Error::TensorRead {
            origin: origin.into(),
            name: name.to_string(),
            problem: problem.to_string(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
