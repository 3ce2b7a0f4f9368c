//! The DLO runtime: load a checkpoint, run the one model definition (with DLO routing), generate text.
//!
//! | module | what it is for |
//! |---|---|
//! | [`checkpoint`] | open HF directories and GGUF files |
//! | [`weights`] | named tensors behind one interface |
//! | [`engine`] | native engine files: format, plan (the thresholds a budget gives) |
//! | [`gguf`] | GGUF files → config + dequantized weights |
//! | [`tokenizer`], [`chat`] | text ↔ ids, chat templates |
//! | [`sentencepiece`] | `tokenizer.model` files and SentencePiece → `tokenizers` conversion |
//! | [`model`] | the Llama/DLO model definition: eval and training routing, KV caches, projection weights |
//! | [`options`] | [`RuntimeOptions`]: device, dtype, threads and kernels of a run, in one value |
//! | [`backend`] | [`Backend`]: the forward seam generation, the C ABI and calibration run on |
//! | [`generate`] | sampling and the generation loop |
//! | [`flops`] | executed matmul FLOPs, counted as the reference does |
//!
//! Compiler-only work lives in `dlo-compiler`: budget calibration (`dlo_compiler::calibrate`), which the
//! runtime reads back from an engine's plan, and layer-similarity analysis (`dlo_compiler::analysis`, on
//! [`model::activations`]). The `dlo-run` command is its own crate (`run/`).

pub mod alloc;
pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod flops;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod options;
pub mod sentencepiece;
pub mod tensorrt;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod golden_tests;

pub use backend::Backend;
pub use checkpoint::{Checkpoint, SourceFormat};
pub use error::{Error, Result};
pub use model::Model;
pub use options::{cache_dir, DeviceSpec, RuntimeOptions};
pub use tokenizer::{TextStream, Tokenizer};
pub use weights::Weights;
