//! The `dlo-compile` library: each subcommand is a module that takes a validated plan.
//!
//! | stage | module |
//! |---|---|
//! | import a checkpoint to an HF directory | [`import`] |
//! | lower a model into a native engine | [`build`] |

pub mod build;
pub mod import;
