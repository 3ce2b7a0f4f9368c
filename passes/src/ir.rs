//! The model IR: a base configuration plus an explicit list of output layers, each with its provenance
//! (which base layer(s) it is built from and how) and its router.
//!
//! The IR never holds tensors. [`LayerSource`] is a closed enum that says how each output layer's tensors
//! are computed from the base checkpoint's layers; the streaming writer ([`crate::writer`]) materialises
//! them one tensor at a time. Every base-layer index in the IR refers to the **base** model's numbering.

use crate::config::{Capacity, DloConfig, LossType, ModelConfig, SkipKind};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Config key under which the writer records per-layer provenance (the reference ignores unknown keys).
pub const PROVENANCE_KEY: &str = "dlo_provenance";
/// Config key under which the writer records how the model was expanded.
pub const EXPANSION_KEY: &str = "dlo_expansion";

/// How a copied layer is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyInit {
    /// LLaMA-Pro identity: every tensor copied, `self_attn.o_proj.*` and `mlp.down_proj.*` zeroed, so the
    /// layer adds nothing to the residual stream at init.
    Zeros,
    /// Exact copy (the reference's `normal`).
    Exact,
}

/// Where an output layer's tensors come from. Indices are base-layer indices.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSource {
    /// Base layer `i`, unchanged.
    Original(usize),
    /// A new layer copied from base layer `from`.
    Copy { from: usize, init: CopyInit },
    /// A new layer with HF's default init: N(0, 0.02) for matrices, ones for norms, zeros for biases.
    /// Shapes and tensor names come from base layer `like`; `seed` makes it reproducible.
    Random { like: usize, seed: u64 },
    /// Element-wise mean of every tensor (norms included) of base layers `a` and `b`.
    MergeLinear { a: usize, b: usize },
    /// SLERP from layer `a` (t = 0) to layer `b` (t = 1), per whole flattened tensor, lerp when the two
    /// tensors are nearly colinear (|cos| > 0.9995). Applied to every tensor of the layer.
    MergeSlerp { a: usize, b: usize, t: f64 },
}

impl LayerSource {
    /// Whether this is a new (not original) layer.
    pub fn is_new(&self) -> bool {
        !matches!(self, LayerSource::Original(_))
    }
    /// The base layers this layer reads.
    pub fn base_layers(&self) -> Vec<usize> {
        match *self {
            LayerSource::Original(i) => vec![i],
            LayerSource::Copy { from, .. } => vec![from],
            LayerSource::Random { like, .. } => vec![like],
            LayerSource::MergeLinear { a, b } | LayerSource::MergeSlerp { a, b, .. } => vec![a, b],
        }
    }
    /// The base layer whose tensor names and shapes this layer has.
    pub fn template_layer(&self) -> usize {
        self.base_layers()[0]
    }
    /// Short human description, e.g. `orig 3`, `new: zeros copy of 3`, `new: slerp(3, 2, t=0.5)`.
    pub fn describe(&self) -> String {
        match *self {
            LayerSource::Original(i) => format!("orig {i}"),
            LayerSource::Copy {
                from,
                init: CopyInit::Zeros,
            } => format!("new: zeros copy of {from}"),
            LayerSource::Copy {
                from,
                init: CopyInit::Exact,
            } => format!("new: copy of {from}"),
            LayerSource::Random { like, seed } => format!("new: random like {like} (seed {seed})"),
            LayerSource::MergeLinear { a, b } => format!("new: mean({a}, {b})"),
            LayerSource::MergeSlerp { a, b, t } => format!("new: slerp({a}, {b}, t={t})"),
        }
    }
    fn provenance(&self) -> Value {
        match *self {
            LayerSource::Original(i) => json!({"source": "original", "from": [i]}),
            LayerSource::Copy { from, init } => json!({
                "source": "copy", "from": [from],
                "init": match init { CopyInit::Zeros => "zeros", CopyInit::Exact => "copy" },
            }),
            LayerSource::Random { like, seed } => {
                json!({"source": "random", "from": [like], "init": "random", "seed": seed})
            }
            LayerSource::MergeLinear { a, b } => {
                json!({"source": "merge-linear", "from": [a, b], "init": "merge-linear"})
            }
            LayerSource::MergeSlerp { a, b, t } => {
                json!({"source": "merge-slerp", "from": [a, b], "init": "merge-slerp", "t": t})
            }
        }
    }
}

/// How a router's weight vector is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterInit {
    /// All zeros (the reference's `gate_init_method: zero`).
    Zero,
    /// N(0, 0.02), reproducible from `seed`.
    Random { seed: u64 },
}

impl RouterInit {
    /// The reference's `gate_init_method` name.
    pub fn method_name(self) -> &'static str {
        match self {
            RouterInit::Zero => "zero",
            RouterInit::Random { .. } => "random",
        }
    }
}

/// One output layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// Where its tensors come from.
    pub source: LayerSource,
    /// Its router, if it is a DLO layer.
    pub router: Option<RouterInit>,
}

/// DLO hyper-parameters except the per-layer ones (`is_dlo`, router init), which live on the layers.
#[derive(Debug, Clone, PartialEq)]
pub struct DloParams {
    /// Skip granularity.
    pub skip: SkipKind,
    /// Training capacity.
    pub capacity: Capacity,
    /// λ.
    pub loss_coefficient: f64,
    /// Routing-loss labels.
    pub loss_type: LossType,
    /// Multiply the skipped unit's output by the gate.
    pub rescale_hidden_states: bool,
    /// α.
    pub scale_factor: f64,
    /// β.
    pub scale_gap: f64,
}

impl DloParams {
    /// The paper's defaults (`dlo-method.md` §3.1, "paper script" column).
    pub fn paper_default() -> Self {
        let d = DloConfig::paper_default(SkipKind::Mlp, 0);
        DloParams {
            skip: d.skip,
            capacity: d.capacity,
            loss_coefficient: d.loss_coefficient,
            loss_type: d.loss_type,
            rescale_hidden_states: d.rescale_hidden_states,
            scale_factor: d.scale_factor,
            scale_gap: d.scale_gap,
        }
    }

    /// Checks ranges: capacity in (0, 1], λ ≥ 0, α and β finite.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        let check_cap = |c: f64| -> Result<()> {
            if !(c > 0.0 && c <= 1.0) {
                return Err(Error::InvalidParam {
                    name: "capacity",
                    problem: format!("must be in (0, 1], found {c}"),
                });
            }
            Ok(())
        };
        match &self.capacity {
            Capacity::Scalar(c) => check_cap(*c)?,
            Capacity::PerLayer(v) => {
                if v.len() != n_layers {
                    return Err(Error::InvalidParam {
                        name: "capacity",
                        problem: format!("per-layer list has {} entries for {n_layers} layers", v.len()),
                    });
                }
                for c in v.iter().flatten() {
                    check_cap(*c)?;
                }
            }
        }
        if !(self.loss_coefficient.is_finite() && self.loss_coefficient >= 0.0) {
            return Err(Error::InvalidParam {
                name: "loss weight",
                problem: format!("must be a finite number ≥ 0, found {}", self.loss_coefficient),
            });
        }
        if !self.scale_factor.is_finite() {
            return Err(Error::InvalidParam {
                name: "gate scale",
                problem: format!("must be finite, found {}", self.scale_factor),
            });
        }
        if !self.scale_gap.is_finite() {
            return Err(Error::InvalidParam {
                name: "gate gap",
                problem: format!("must be finite, found {}", self.scale_gap),
            });
        }
        Ok(())
    }
}

/// How the model was expanded (recorded in the output config under [`EXPANSION_KEY`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpansionInfo {
    /// `interleave`, `stack-side` or `stack-manual`.
    pub method: String,
    /// `zeros`, `copy`, `random`, `merge-linear` or `merge-slerp`.
    pub init: String,
    /// Stack-manual ranges as given, if any.
    pub ranges: Option<String>,
}

/// The model IR.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The **base** model's configuration (`num_hidden_layers` is the base layer count L).
    pub config: ModelConfig,
    /// Output layers in order.
    pub layers: Vec<LayerSpec>,
    /// DLO hyper-parameters.
    pub dlo: DloParams,
    /// Set by the expand pass.
    pub expansion: Option<ExpansionInfo>,
}

impl ModelSpec {
    /// The identity spec of a plain base model: layer l = base layer l, no routers, paper defaults.
    /// `origin` names the base checkpoint in errors.
    pub fn from_base(config: ModelConfig, origin: &Path) -> Result<Self> {
        if let Some(d) = &config.dlo {
            return Err(Error::BaseIsDlo {
                path: origin.to_path_buf(),
                model_type: d.skip.model_type().to_string(),
            });
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| LayerSpec {
                source: LayerSource::Original(i),
                router: None,
            })
            .collect();
        Ok(ModelSpec {
            config,
            layers,
            dlo: DloParams::paper_default(),
            expansion: None,
        })
    }

    /// L, the base model's layer count.
    pub fn base_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    /// Whether the layers are still exactly the base layers in order.
    pub fn is_unexpanded(&self) -> bool {
        self.layers.len() == self.base_layers()
            && self
                .layers
                .iter()
                .enumerate()
                .all(|(l, s)| s.source == LayerSource::Original(l))
    }

    /// Checks every invariant; errors name the layer.
    pub fn validate(&self) -> Result<()> {
        let base = self.base_layers();
        if self.layers.is_empty() {
            return Err(Error::InvalidSpec {
                problem: "the model has no layers".into(),
            });
        }
        if self.config.dlo.is_some() {
            return Err(Error::InvalidSpec {
                problem: "the base config must be a plain (non-DLO) config; DLO settings live in ModelSpec::dlo".into(),
            });
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for i in layer.source.base_layers() {
                if i >= base {
                    return Err(Error::InvalidLayer {
                        layer: l,
                        problem: format!(
                            "built from base layer {i}, but the base model has {base} layers (0..{})",
                            base.saturating_sub(1)
                        ),
                    });
                }
            }
            match layer.source {
                LayerSource::MergeLinear { a, b } | LayerSource::MergeSlerp { a, b, .. } if a == b => {
                    return Err(Error::InvalidLayer {
                        layer: l,
                        problem: format!("merges base layer {a} with itself; use a copy"),
                    })
                }
                LayerSource::MergeSlerp { t, .. } if !(0.0..=1.0).contains(&t) => {
                    return Err(Error::InvalidLayer {
                        layer: l,
                        problem: format!("slerp t must be in [0, 1], found {t}"),
                    })
                }
                _ => {}
            }
        }
        self.dlo.validate(self.layers.len())
    }

    /// `is_dlo` for the output model.
    pub fn is_dlo(&self) -> Vec<bool> {
        self.layers.iter().map(|l| l.router.is_some()).collect()
    }

    /// The reference's `gate_init_method`: that of the first router (`zero` when there is none).
    pub fn gate_init_method(&self) -> &'static str {
        self.layers
            .iter()
            .find_map(|l| l.router)
            .map_or("zero", RouterInit::method_name)
    }

    /// Per-layer provenance, as recorded under [`PROVENANCE_KEY`].
    pub fn provenance(&self) -> Value {
        Value::Array(
            self.layers
                .iter()
                .enumerate()
                .map(|(l, s)| {
                    let mut v = s.source.provenance();
                    if let Value::Object(o) = &mut v {
                        o.insert("layer".into(), json!(l));
                        o.insert(
                            "router".into(),
                            s.router.map_or(Value::Null, |r| json!(r.method_name())),
                        );
                    }
                    v
                })
                .collect(),
        )
    }

    /// The output model's configuration: the base config with `num_hidden_layers = L'`, the DLO keys, and
    /// provenance in extra keys.
    pub fn output_config(&self) -> ModelConfig {
        let mut c = self.config.clone();
        c.num_hidden_layers = self.layers.len();
        c.dlo = Some(DloConfig {
            skip: self.dlo.skip,
            is_dlo: self.is_dlo(),
            capacity: self.dlo.capacity.clone(),
            loss_coefficient: self.dlo.loss_coefficient,
            loss_type: self.dlo.loss_type,
            rescale_hidden_states: self.dlo.rescale_hidden_states,
            scale_factor: self.dlo.scale_factor,
            scale_gap: self.dlo.scale_gap,
            gate_init_method: self.gate_init_method().to_string(),
        });
        c.extra.insert(PROVENANCE_KEY.into(), self.provenance());
        let mut e = Map::new();
        e.insert("base_layers".into(), json!(self.base_layers()));
        if let Some(x) = &self.expansion {
            e.insert("method".into(), json!(x.method));
            e.insert("init".into(), json!(x.init));
            if let Some(r) = &x.ranges {
                e.insert("ranges".into(), json!(r));
            }
        }
        c.extra.insert(EXPANSION_KEY.into(), Value::Object(e));
        c
    }

    /// One line per layer: `4 ← new: zeros copy of 3 [router: zero]`.
    pub fn layer_map(&self) -> Vec<String> {
        self.layers
            .iter()
            .enumerate()
            .map(|(l, s)| {
                let r = match s.router {
                    None => String::new(),
                    Some(r) => format!(" [router: {}]", r.method_name()),
                };
                format!("{l} ← {}{r}", s.source.describe())
            })
            .collect()
    }
}

/// Mixes a base seed with up to two indices into an independent 64-bit seed (splitmix64 finaliser).
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
