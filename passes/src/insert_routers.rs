//! The `insert_routers` pass: decide which layers are DLO layers and how their routers start.
//!
//! Rules, as the reference's interleave and stack-side (`dlo-method.md` §3.1):
//! - an **original** layer (base index i) gets a router iff `every > 0`, `(i + 1) % every == 0`, and
//!   `skip_ends ≤ i < L − skip_ends` (indices in the base model's numbering);
//! - a **new** layer gets a router iff `on_new`.
//!
//! Divergence: the reference's stack-manual applies the every-k / skip-ends rule to the *output* index of
//! every layer, new or not; we apply the rule above in every method (identical for the paper defaults,
//! k = 1, n = 0, new routed).

use crate::error::Result;
use crate::ir::{mix_seed, LayerSource, ModelSpec, RouterInit};
use crate::pass::Pass;

/// Router init choice (the seed is derived per layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterInitKind {
    /// Zero weights.
    Zero,
    /// N(0, 0.02).
    Random,
}

/// The router-insertion pass.
#[derive(Debug, Clone, PartialEq)]
pub struct InsertRouters {
    /// k: route original layer i iff (i+1) % k == 0; 0 = no original layer is routed.
    pub every: usize,
    /// n: never route the first/last n original layers.
    pub skip_ends: usize,
    /// Route the new layers.
    pub on_new: bool,
    /// Router init.
    pub init: RouterInitKind,
    /// Seed for random init.
    pub seed: u64,
}

impl InsertRouters {
    /// Whether output layer with this source gets a router, in a model of `base` base layers.
    pub fn routes(&self, source: &LayerSource, base: usize) -> bool {
        match *source {
            LayerSource::Original(i) => {
                self.every > 0 && (i + 1) % self.every == 0 && i >= self.skip_ends && i + self.skip_ends < base
            }
            _ => self.on_new,
        }
    }
}

impl Pass for InsertRouters {
    fn name(&self) -> &'static str {
        "insert_routers"
    }

    fn run(&self, spec: &mut ModelSpec) -> Result<bool> {
        let base = spec.base_layers();
        let mut changed = false;
        for (l, layer) in spec.layers.iter_mut().enumerate() {
            let router = if self.routes(&layer.source, base) {
                Some(match self.init {
                    RouterInitKind::Zero => RouterInit::Zero,
                    RouterInitKind::Random => RouterInit::Random {
                        seed: mix_seed(self.seed, l as u64, 2),
                    },
                })
            } else {
                None
            };
            changed |= router != layer.router;
            layer.router = router;
        }
        Ok(changed)
    }
}
