//! DLO model IR and passes.
//!
//! This crate is the compiler's middle and has no tensor-library dependency, so its tests run in seconds:
//! - [`config`]: the Llama-family + DLO configuration, read from and written to HF `config.json`.
//! - `ir`, `passes`, `writer` (see issue 3): the model as a list of layers with provenance, the passes that
//!   expand it and insert routers, and the streaming writer that materialises the result.

pub mod config;

pub use config::{Arch, Capacity, ConfigError, DloConfig, LossType, ModelConfig, RopeScaling, SkipKind};
