//! The pass abstraction: a named rewrite of a [`ModelSpec`], and a [`Pipeline`] that runs passes in order
//! and validates the IR after each one.

use crate::error::{Error, Result};
use crate::ir::ModelSpec;

/// One rewrite of the IR.
pub trait Pass {
    /// Stable name, used in error context and summaries.
    fn name(&self) -> &'static str;
    /// Rewrites `spec`; returns whether anything changed.
    fn run(&self, spec: &mut ModelSpec) -> Result<bool>;
}

/// Passes run in order, each followed by [`ModelSpec::validate`].
#[derive(Default)]
pub struct Pipeline {
    passes: Vec<Box<dyn Pass>>,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a pass.
    pub fn with(mut self, pass: impl Pass + 'static) -> Self {
        self.passes.push(Box::new(pass));
        self
    }
    /// The pass names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }
    /// Runs every pass; returns `(name, changed)` per pass. Validation failures are reported
    /// "after pass X".
    pub fn run(&self, spec: &mut ModelSpec) -> Result<Vec<(&'static str, bool)>> {
        spec.validate().map_err(|e| Error::AfterPass {
            pass: "(input)",
            source: Box::new(e),
        })?;
        let mut out = Vec::with_capacity(self.passes.len());
        for p in &self.passes {
            let changed = p.run(spec)?;
            spec.validate().map_err(|e| Error::AfterPass {
                pass: p.name(),
                source: Box::new(e),
            })?;
            out.push((p.name(), changed));
        }
        Ok(out)
    }
}
