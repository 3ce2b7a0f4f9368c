//! The `dlo-compile` library: each subcommand is a module that takes a validated plan.
//!
//! | stage | module |
//! |---|---|
//! | import a checkpoint to an HF directory | [`import`] |
//! | fine-tune with DLO routing | [`train`] |

pub mod import;
pub mod train;
