//! The DLO routing rules every stage shares (`dlo-method.md` §2, §4.3): which unit a layer's router skips
//! and the gate applied to an executed unit's output.
//!
//! The runtime's eval and training forwards, the engine plan and the ONNX lowering all read these rather
//! than restating them, so a change to the rule is made once.

use crate::config::{DloConfig, ModelConfig, SkipKind};
use serde::{Deserialize, Serialize};

/// What layer `l`'s router skips: the one per-layer routing type of every stage (model, engine plan, ONNX).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutedUnit {
    /// A dense layer (no router): attention and MLP run for every token.
    None,
    /// The MLP sub-block (`llama_dlo_exattn`); attention runs for every token.
    Mlp,
    /// The whole layer (`llama_dlo`).
    Layer,
}

impl RoutedUnit {
    /// The unit a router of skip kind `skip` removes.
    pub fn of_skip(skip: SkipKind) -> Self {
        match skip {
            SkipKind::Mlp => RoutedUnit::Mlp,
            SkipKind::Layer => RoutedUnit::Layer,
        }
    }

    /// Whether the layer has a router.
    pub fn is_routed(self) -> bool {
        self != RoutedUnit::None
    }
}

impl ModelConfig {
    /// What layer `l`'s router skips ([`RoutedUnit::None`] for dense layers and dense models).
    pub fn routed_unit(&self, l: usize) -> RoutedUnit {
        match &self.dlo {
            Some(d) if self.is_routed(l) => RoutedUnit::of_skip(d.skip),
            _ => RoutedUnit::None,
        }
    }

    /// [`Self::routed_unit`] of every layer.
    pub fn schedule(&self) -> Vec<RoutedUnit> {
        (0..self.num_hidden_layers).map(|l| self.routed_unit(l)).collect()
    }
}

/// The gate `g = 0.5α + β(r − 0.5)` on an executed unit's output, `r = σ(z)` the router score
/// (`dlo-method.md` §4.3); `g = 1` when rescaling is off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Whether the gate is applied at all (`rescale_hidden_states`).
    pub rescale: bool,
    /// α (`scale_factor`).
    pub alpha: f64,
    /// β (`scale_gap`).
    pub beta: f64,
}

/// The gate as the operations every implementation evaluates, in this order: `g = (r − centre)·gap + base`.
/// Keeping the order (rather than, say, `β·r + const`) keeps f32 results identical across the runtime, the
/// trainer and the ONNX graphs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateTerms {
    /// Subtracted from the score first: 0.5.
    pub centre: f64,
    /// Then multiplied: β.
    pub gap: f64,
    /// Then added: 0.5α.
    pub base: f64,
}

impl Gate {
    /// The terms of the rescaling gate; `None` when rescaling is off (`g = 1`).
    pub fn terms(&self) -> Option<GateTerms> {
        self.rescale.then_some(GateTerms {
            centre: 0.5,
            gap: self.beta,
            base: 0.5 * self.alpha,
        })
    }

    /// The gate for router score `r`.
    pub fn of_score(&self, r: f64) -> f64 {
        match self.terms() {
            Some(t) => (r - t.centre) * t.gap + t.base,
            None => 1.0,
        }
    }
}

impl DloConfig {
    /// The gate of this model.
    pub fn gate_params(&self) -> Gate {
        Gate {
            rescale: self.rescale_hidden_states,
            alpha: self.scale_factor,
            beta: self.scale_gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_is_the_papers_formula_and_one_when_off() {
        let mut d = DloConfig::paper_default(SkipKind::Mlp, 2);
        let g = d.gate_params();
        for r in [0.0, 0.25, 0.5, 0.9, 1.0] {
            let want = 0.5 * 2.0 + 0.05 * (r - 0.5);
            assert!((g.of_score(r) - want).abs() < 1e-15, "r = {r}");
        }
        d.rescale_hidden_states = false;
        assert_eq!(d.gate_params().of_score(0.3), 1.0);
        assert!(d.gate_params().terms().is_none());
    }

    #[test]
    fn routed_unit_follows_skip_kind_and_router_placement() {
        let mut cfg = ModelConfig::from_hf_json(
            &serde_json::json!({
                "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 3, "num_attention_heads": 2}),
            "config.json".as_ref(),
        )
        .unwrap();
        assert_eq!(cfg.schedule(), [RoutedUnit::None; 3]);
        let mut d = DloConfig::paper_default(SkipKind::Layer, 3);
        d.is_dlo = vec![true, false, true];
        cfg.dlo = Some(d.clone());
        assert_eq!(cfg.schedule(), [RoutedUnit::Layer, RoutedUnit::None, RoutedUnit::Layer]);
        d.skip = SkipKind::Mlp;
        cfg.dlo = Some(d);
        assert_eq!(cfg.routed_unit(0), RoutedUnit::Mlp);
        assert_eq!(
            cfg.routed_unit(7),
            RoutedUnit::None,
            "a layer past the end has no router"
        );
        assert!(!RoutedUnit::None.is_routed() && RoutedUnit::Mlp.is_routed());
        assert_eq!(
            serde_json::to_string(&[RoutedUnit::None, RoutedUnit::Mlp, RoutedUnit::Layer]).unwrap(),
            r#"["none","mlp","layer"]"#
        );
    }
}
