//! The `dlo-compile` library: each subcommand is a module that takes a validated plan.
//!
//! | stage | module |
//! |---|---|
//! | import a checkpoint to an HF directory | [`import`] |

pub mod import;
