//! The `set_hparams` pass: DLO hyper-parameters (skip granularity, capacity, routing loss, gate).

use crate::error::Result;
use crate::ir::{DloParams, ModelSpec};
use crate::pass::Pass;

/// Sets [`ModelSpec::dlo`]; ranges are checked by the validation that follows every pass.
#[derive(Debug, Clone, PartialEq)]
pub struct SetHparams(pub DloParams);

impl Pass for SetHparams {
    fn name(&self) -> &'static str {
        "set_hparams"
    }

    fn run(&self, spec: &mut ModelSpec) -> Result<bool> {
        let changed = spec.dlo != self.0;
        spec.dlo = self.0.clone();
        Ok(changed)
    }
}
