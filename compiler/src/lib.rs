//! The `dlo-compile` library: each subcommand is a module.
//!
//! As in ripgrep, argv, plans and printing are apart: a command's clap arguments (`XArgs`) become a validated
//! plan, the library runs the plan and returns a report or a typed error, and only `dlo-compile`'s `main`
//! prints. [`import`], [`analyze`], [`expand`], [`build`] and [`eval`] work this way; [`train`] still takes its
//! arguments and prints from the library.
//!
//! | stage | module |
//! |---|---|
//! | import a checkpoint to an HF directory | [`import`] |
//! | per-layer similarity analysis on real text | [`analyze`] (the measure: [`analysis`]) |
//! | deepen a base model into a DLO model | [`expand`] |
//! | fine-tune with DLO routing | [`train`] |
//! | lower a model into a native engine | [`build`] |
//! | lower to ONNX (prefill + decode, `If` for routed layers) | [`onnx`] |
//! | accuracy against FLOPs on benchmark tasks | [`eval`] |
//!
//! Shared pieces: [`calibrate`] (router thresholds for a compute budget, used by `build` and by `train`'s
//! held-out rule), [`corpus`] (reading sample text), [`plot`] (PNG/SVG charts), [`runtime_args`] (`--device`, `--threads`).

pub mod analysis;
pub mod analyze;
pub mod build;
pub mod calibrate;
pub mod corpus;
pub mod eval;
pub mod expand;
pub mod import;
pub mod onnx;
pub mod plot;
pub mod runtime_args;
pub mod tensorrt;
pub mod train;
