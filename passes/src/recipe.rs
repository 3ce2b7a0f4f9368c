//! Expansion recipes: the whole `expand` pipeline as data.
//!
//! A [`Recipe`] has one optional field per `dlo-compile expand` flag (same names, kebab-case), and is read
//! from TOML or JSON. The CLI turns its flags into a `Recipe` too and [`Recipe::overlay`]s them on the
//! file's, so flags override the file. [`ExpandPlan::from_recipe`] fills in the paper defaults
//! (`dlo-method.md` §3.1, paper-script column) and validates everything into typed values;
//! [`ExpandPlan::to_recipe`] gives the complete recipe back, which the CLI stores next to the output so a
//! run can be reproduced exactly.
//!
//! ```toml
//! layers = 40
//! method = "interleave"      # interleave | stack-side | stack-manual
//! init = "zeros"             # zeros | copy | random | merge-linear | merge-slerp
//! skip = "mlp"               # mlp | layer
//! router-every = 1
//! router-skip-ends = 0
//! router-on-new = true
//! router-init = "zero"       # zero | random
//! capacity = 0.9
//! loss = "cos-global"        # cos-global | cos | self
//! loss-weight = 1.0
//! gate-scale = 2.0
//! gate-gap = 0.05
//! rescale = true
//! dtype = "f32"              # f32 | bf16
//! seed = 0
//! ```

use crate::config::{Capacity, LossType, SkipKind};
use crate::error::{Error, Result};
use crate::expand::{format_ranges, parse_ranges, Expand, ExpandMethod, NewLayerInit};
use crate::insert_routers::{InsertRouters, RouterInitKind};
use crate::ir::{DloParams, ModelSpec};
use crate::pass::Pipeline;
use crate::set_hparams::SetHparams;
use crate::writer::OutDtype;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One optional value per `expand` flag; `None` means "not given here".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Recipe {
    /// L', the output layer count (required, here or on the command line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
    /// `interleave` | `stack-side` | `stack-manual`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Stack-manual half-open ranges, `0-8,6-12,...`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges: Option<String>,
    /// `zeros` | `copy` | `random` | `merge-linear` | `merge-slerp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// `mlp` | `layer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip: Option<String>,
    /// Route original layer i iff (i+1) % k == 0 (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_every: Option<usize>,
    /// Never route the first/last n original layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_skip_ends: Option<usize>,
    /// Route the new layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_on_new: Option<bool>,
    /// `zero` | `random`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_init: Option<String>,
    /// Training capacity in (0, 1].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<f64>,
    /// `cos-global` | `cos` | `self`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
    /// λ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_weight: Option<f64>,
    /// α.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_scale: Option<f64>,
    /// β.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_gap: Option<f64>,
    /// Multiply the skipped unit's output by the gate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescale: Option<bool>,
    /// `f32` | `bf16`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Seed of random inits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

macro_rules! overlay_fields {
    ($self:ident, $other:ident, $($f:ident),*) => {
        Recipe { $($f: $other.$f.clone().or_else(|| $self.$f.clone())),* }
    };
}

impl Recipe {
    /// Reads a recipe: JSON if the file name ends in `.json`, TOML otherwise. Unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |problem: String| Error::Recipe {
            path: path.into(),
            problem,
        };
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
        } else {
            toml::from_str(&text).map_err(|e| bad(e.to_string()))
        }
    }
    /// TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
    /// JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
    /// `self` with every value given in `over` replaced by `over`'s.
    pub fn overlay(&self, over: &Recipe) -> Recipe {
        overlay_fields!(
            self,
            over,
            layers,
            method,
            ranges,
            init,
            skip,
            router_every,
            router_skip_ends,
            router_on_new,
            router_init,
            capacity,
            loss,
            loss_weight,
            gate_scale,
            gate_gap,
            rescale,
            dtype,
            seed
        )
    }
}

/// A validated expansion plan: what `dlo-compile expand` does, whether it came from flags or a recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpandPlan {
    /// Layer placement and new-layer init.
    pub expand: Expand,
    /// Router placement and init.
    pub routers: InsertRouters,
    /// DLO hyper-parameters.
    pub hparams: DloParams,
    /// Output dtype.
    pub dtype: OutDtype,
    /// Seed of random inits.
    pub seed: u64,
}

/// Parses `interleave|stack-side|stack-manual` (stack-manual needs `ranges`).
pub fn parse_method(s: &str, ranges: Option<&str>) -> Result<ExpandMethod> {
    let m = match s {
        "interleave" => ExpandMethod::Interleave,
        "stack-side" => ExpandMethod::StackSide,
        "stack-manual" => ExpandMethod::StackManual(parse_ranges(ranges.unwrap_or(""))?),
        other => {
            return Err(Error::Unknown {
                what: "method",
                value: other.into(),
                expected: "interleave, stack-side, stack-manual",
            })
        }
    };
    if ranges.is_some() && !matches!(m, ExpandMethod::StackManual(_)) {
        return Err(Error::InvalidParam {
            name: "ranges",
            problem: format!("only used by --method stack-manual, not {s}"),
        });
    }
    Ok(m)
}

/// Parses `mlp|layer`.
pub fn parse_skip(s: &str) -> Result<SkipKind> {
    SkipKind::parse(s).ok_or_else(|| Error::Unknown {
        what: "skip kind",
        value: s.into(),
        expected: "mlp, layer",
    })
}

/// Parses `cos-global|cos|self`.
pub fn parse_loss(s: &str) -> Result<LossType> {
    LossType::parse(s).ok_or_else(|| Error::Unknown {
        what: "loss type",
        value: s.into(),
        expected: "cos-global, cos, self",
    })
}

/// Parses `zero|random`.
pub fn parse_router_init(s: &str) -> Result<RouterInitKind> {
    match s {
        "zero" | "zeros" => Ok(RouterInitKind::Zero),
        "random" => Ok(RouterInitKind::Random),
        other => Err(Error::Unknown {
            what: "router init",
            value: other.into(),
            expected: "zero, random",
        }),
    }
}

impl ExpandPlan {
    /// Validates a recipe, filling the paper defaults for everything not given. `layers` is required.
    pub fn from_recipe(r: &Recipe) -> Result<Self> {
        let layers = r.layers.ok_or_else(|| Error::InvalidParam {
            name: "layers",
            problem: "the output layer count is required (--layers N or `layers = N` in the recipe)".into(),
        })?;
        if layers == 0 {
            return Err(Error::InvalidParam {
                name: "layers",
                problem: "must be positive".into(),
            });
        }
        let seed = r.seed.unwrap_or(0);
        let method = parse_method(r.method.as_deref().unwrap_or("interleave"), r.ranges.as_deref())?;
        let init = NewLayerInit::parse(r.init.as_deref().unwrap_or("zeros"))?;
        let def = DloParams::paper_default();
        let hparams = DloParams {
            skip: match &r.skip {
                Some(s) => parse_skip(s)?,
                None => def.skip,
            },
            capacity: r.capacity.map_or(def.capacity, Capacity::Scalar),
            loss_coefficient: r.loss_weight.unwrap_or(def.loss_coefficient),
            loss_type: match &r.loss {
                Some(s) => parse_loss(s)?,
                None => def.loss_type,
            },
            rescale_hidden_states: r.rescale.unwrap_or(def.rescale_hidden_states),
            scale_factor: r.gate_scale.unwrap_or(def.scale_factor),
            scale_gap: r.gate_gap.unwrap_or(def.scale_gap),
        };
        hparams.validate(layers)?;
        Ok(ExpandPlan {
            expand: Expand {
                method,
                target: layers,
                init,
                seed,
            },
            routers: InsertRouters {
                every: r.router_every.unwrap_or(1),
                skip_ends: r.router_skip_ends.unwrap_or(0),
                on_new: r.router_on_new.unwrap_or(true),
                init: parse_router_init(r.router_init.as_deref().unwrap_or("zero"))?,
                seed,
            },
            hparams,
            dtype: OutDtype::parse(r.dtype.as_deref().unwrap_or("f32"))?,
            seed,
        })
    }

    /// The complete recipe (every field set), which [`ExpandPlan::from_recipe`] turns back into `self`.
    pub fn to_recipe(&self) -> Recipe {
        Recipe {
            layers: Some(self.expand.target),
            method: Some(self.expand.method.name().into()),
            ranges: match &self.expand.method {
                ExpandMethod::StackManual(r) => Some(format_ranges(r)),
                _ => None,
            },
            init: Some(self.expand.init.as_str().into()),
            skip: Some(self.hparams.skip.as_str().into()),
            router_every: Some(self.routers.every),
            router_skip_ends: Some(self.routers.skip_ends),
            router_on_new: Some(self.routers.on_new),
            router_init: Some(
                match self.routers.init {
                    RouterInitKind::Zero => "zero",
                    RouterInitKind::Random => "random",
                }
                .into(),
            ),
            capacity: match self.hparams.capacity {
                Capacity::Scalar(c) => Some(c),
                Capacity::PerLayer(_) => None,
            },
            loss: Some(self.hparams.loss_type.as_str().into()),
            loss_weight: Some(self.hparams.loss_coefficient),
            gate_scale: Some(self.hparams.scale_factor),
            gate_gap: Some(self.hparams.scale_gap),
            rescale: Some(self.hparams.rescale_hidden_states),
            dtype: Some(self.dtype.as_str().into()),
            seed: Some(self.seed),
        }
    }

    /// expand → insert_routers → set_hparams.
    pub fn pipeline(&self) -> Pipeline {
        Pipeline::new()
            .with(self.expand.clone())
            .with(self.routers.clone())
            .with(SetHparams(self.hparams.clone()))
    }

    /// Runs the pipeline on `spec` (normally [`ModelSpec::from_base`]).
    pub fn apply(&self, spec: &mut ModelSpec) -> Result<Vec<(&'static str, bool)>> {
        self.pipeline().run(spec)
    }
}
