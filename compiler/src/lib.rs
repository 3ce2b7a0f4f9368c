//! The `dlo-compile` library: each subcommand is a module that takes validated arguments.
//!
//! | stage | module |
//! |---|---|
//! | import a checkpoint to an HF directory | [`import`] |
//! | per-layer similarity analysis on real text | [`analyze`] |
//!
//! Shared pieces: [`corpus`] (reading sample text), [`plot`] (PNG/SVG charts).

pub mod analyze;
pub mod corpus;
pub mod import;
pub mod plot;
