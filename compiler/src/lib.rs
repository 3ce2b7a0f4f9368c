//! The `dlo-compile` library: each subcommand is a module that takes a validated plan.
//!
//! | stage | module |
//! |---|---|
//! | import a checkpoint to an HF directory | [`import`] |
//! | lower to ONNX (prefill + decode, `If` for routed layers) | [`onnx`] |

pub mod import;
pub mod onnx;
