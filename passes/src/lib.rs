//! DLO model IR and passes.
//!
//! This crate is the compiler's middle and has no tensor-library dependency, so its tests run in seconds:
//! - [`config`]: the Llama-family + DLO configuration, read from and written to HF `config.json`.
//! - [`ir`]: the model as a list of output layers with provenance and routers ([`ModelSpec`]).
//! - [`pass`], [`expand`], [`insert_routers`], [`set_hparams`]: the passes and the pipeline that runs them.
//! - [`fsutil`]: atomic writes of output files and directories (temporary sibling, then rename).
//! - [`recipe`]: the expansion pipeline as data ([`Recipe`] file ↔ validated [`ExpandPlan`]).
//! - [`routing`]: the DLO rules every stage shares: the routed unit of each layer and the gate.
//! - [`source`], [`writer`]: reading base tensors ([`TensorSource`]) and streaming the result to an HF
//!   directory in the DLO reference format.
//!
//! ```
//! use dlo_passes::{ExpandPlan, ModelSpec, ModelConfig, Recipe};
//! let cfg = ModelConfig::from_hf_json(&serde_json::json!({
//!     "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
//!     "num_hidden_layers": 32, "num_attention_heads": 2}), "config.json".as_ref()).unwrap();
//! let mut spec = ModelSpec::from_base(cfg, "base".as_ref()).unwrap();
//! let plan = ExpandPlan::from_recipe(&Recipe { layers: Some(40), ..Recipe::default() }).unwrap();
//! plan.apply(&mut spec).unwrap();
//! let new: Vec<usize> = (0..40).filter(|&l| spec.layers[l].source.is_new()).collect();
//! assert_eq!(new, [4, 9, 14, 19, 24, 29, 34, 39]);
//! ```

pub mod config;
pub mod error;
pub mod expand;
pub mod fsutil;
pub mod init;
pub mod insert_routers;
pub mod ir;
pub mod pass;
pub mod recipe;
pub mod routing;
pub mod set_hparams;
pub mod source;
pub mod writer;

pub use config::{Arch, Capacity, ConfigError, DloConfig, LossType, ModelConfig, RopeScaling, SkipKind};
pub use error::Error;
pub use expand::{Expand, ExpandMethod, NewLayerInit};
pub use insert_routers::{InsertRouters, RouterInitKind};
pub use ir::{CopyInit, DloParams, LayerSource, LayerSpec, ModelSpec, RouterInit};
pub use pass::{Pass, Pipeline};
pub use recipe::{ExpandPlan, Recipe};
pub use routing::{Gate, GateTerms, RoutedUnit};
pub use set_hparams::SetHparams;
pub use source::{SafetensorsDir, SafetensorsIndex, SyntheticSource, TensorSource};
pub use writer::{write_model, ExtraFile, OutDtype, WriteOptions, WriteReport};
