//! The lowered execution plan an engine carries: which unit each layer routes, the gate, and how router
//! logits become decisions (the reference rule, or calibrated per-layer thresholds for a compute budget).
//!
//! A budget R ∈ (0, 1] is a target mean execution rate over routed layers. Calibration
//! (the compiler's `calibrate` module) stores, per routed layer, the thresholds for the build budget and a table of
//! [`N_QUANTILES`] quantiles of the router-logit distribution it observed, so the runtime can map any
//! other budget to thresholds ([`EnginePlan::routing`]) without recalibrating: layer l executes a token
//! iff `z > q_l(1 − r_l)`, where r_l = R, or, for an engine calibrated to per-layer rates (its trained
//! capacities), the rates of the same proportions whose mean is R ([`spread_rates`]).

use crate::error::{Error, Result};
use crate::model::Routing;
use dlo_passes::ModelConfig;
pub use dlo_passes::{Gate, RoutedUnit};
use serde::{Deserialize, Serialize};

/// Quantiles stored per routed layer: probabilities 0, 0.01, …, 1.
pub const N_QUANTILES: usize = 101;

/// The threshold that executes every token (finite so it survives JSON).
pub const ALWAYS: f32 = f32::MIN;

/// The threshold that executes no token (a layer whose target rate is 0).
pub const NEVER: f32 = f32::MAX;

/// A calibrated compute budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Target mean execution rate over routed layers, in (0, 1].
    pub rate: f64,
    /// Per layer (all layers; ignored for dense ones): execute iff `z > threshold`.
    pub thresholds: Vec<f32>,
    /// Mean execution rate measured on the calibration text with these thresholds.
    pub calibration_rate: f64,
    /// Mean execution rate measured on held-out text, when there was some.
    pub heldout_rate: Option<f64>,
    /// Per layer, the target rate when the layers were calibrated to different rates (e.g. their trained
    /// capacities; `None` entries for dense layers); `None` when every routed layer targets `rate`. Other
    /// budgets keep these proportions ([`spread_rates`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_rates: Option<Vec<Option<f64>>>,
}

/// The lowered plan: layer schedule, gate, default routing and the quantile tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnginePlan {
    /// One entry per layer: the unit its router skips.
    pub schedule: Vec<RoutedUnit>,
    /// Gate parameters (`None` for dense models).
    pub gate: Option<Gate>,
    /// The default budget; `None` means the reference rule (`z > 0`).
    pub budget: Option<Budget>,
    /// Per layer: [`N_QUANTILES`] ascending quantiles of calibrated router logits (`None` for dense layers,
    /// or all `None` when no calibration was run).
    pub quantiles: Vec<Option<Vec<f32>>>,
    /// Number of calibration tokens the quantiles come from (0 without calibration).
    pub calibration_tokens: usize,
}

/// Checks `r` ∈ (0, 1].
pub fn check_budget(r: f64) -> Result<()> {
    if r > 0.0 && r <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "budget {r} is outside (0, 1] (it is the target fraction of routed units that execute)"
        )))
    }
}

/// Linear-interpolated quantile of ascending `sorted` at probability `p` ∈ [0, 1].
pub fn quantile(sorted: &[f32], p: f64) -> f32 {
    if sorted.is_empty() {
        return 0.0;
    }
    let x = p.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let i = x.floor() as usize;
    let j = (i + 1).min(sorted.len() - 1);
    let f = (x - i as f64) as f32;
    sorted[i] + (sorted[j] - sorted[i]) * f
}

/// The [`N_QUANTILES`]-entry table of ascending `sorted`.
pub fn quantile_table(sorted: &[f32]) -> Vec<f32> {
    (0..N_QUANTILES)
        .map(|i| quantile(sorted, i as f64 / (N_QUANTILES - 1) as f64))
        .collect()
}

/// The threshold under which a fraction `1 − rate` of ascending `sorted` falls, so that `rate` of them
/// are strictly above it: midway between the two values at the cut.
pub fn threshold_for_rate(sorted: &[f32], rate: f64) -> f32 {
    if rate <= 0.0 {
        return NEVER;
    }
    let n = sorted.len();
    let k = (rate * n as f64).round() as usize; // tokens that must execute
    if n == 0 || k >= n {
        return ALWAYS;
    }
    if k == 0 {
        return sorted[n - 1];
    }
    let (lo, hi) = (sorted[n - k - 1], sorted[n - k]);
    lo + (hi - lo) * 0.5
}

/// Per-layer rates with mean `r` over the routed layers (the `Some` entries of `profile`) that keep the
/// proportions of `profile`: r_l = min(1, s·p_l) with the scale s that gives mean r (layers that saturate
/// at 1 pass their share to the others). `r` ≥ 1 executes everything. A layer whose profile is 0 stays
/// off, so budgets above the fraction of layers with a positive profile cannot be met (an error).
pub fn spread_rates(profile: &[Option<f64>], r: f64) -> Result<Vec<Option<f64>>> {
    check_budget(r)?;
    let routed: Vec<f64> = profile.iter().flatten().copied().collect();
    if r >= 1.0 {
        return Ok(profile.iter().map(|p| p.map(|_| 1.0)).collect());
    }
    let reach = routed.iter().filter(|p| **p > 0.0).count() as f64 / routed.len().max(1) as f64;
    if r > reach {
        return Err(Error::InvalidArgument(format!(
            "budget {r} is out of reach: this engine's per-layer rates keep {:.0}% of its routed layers off, so \
             at most {reach:.3} of routed units can execute below budget 1",
            (1.0 - reach) * 100.0
        )));
    }
    let mean_at = |s: f64| routed.iter().map(|p| (s * p).min(1.0)).sum::<f64>() / routed.len() as f64;
    // mean_at is continuous and non-decreasing in s, from 0 at s = 0 to `reach` for large s: bisect
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while mean_at(hi) < r && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mean_at(mid) < r {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(profile.iter().map(|p| p.map(|p| (hi * p).min(1.0))).collect())
}

impl EnginePlan {
    /// The plan of `cfg` with the reference rule and no calibration.
    pub fn from_config(cfg: &ModelConfig) -> Self {
        EnginePlan {
            schedule: cfg.schedule(),
            gate: cfg.dlo.as_ref().map(|d| d.gate_params()),
            budget: None,
            quantiles: vec![None; cfg.num_hidden_layers],
            calibration_tokens: 0,
        }
    }

    /// Indices of routed layers.
    pub fn routed_layers(&self) -> Vec<usize> {
        (0..self.schedule.len())
            .filter(|&l| self.schedule[l] != RoutedUnit::None)
            .collect()
    }

    /// Checks the plan against `cfg`: the schedule and gate agree with it, budgets lie in (0, 1], the
    /// tables have one entry per layer and quantiles ascend. `Err` carries the problem.
    pub fn validate(&self, cfg: &ModelConfig) -> std::result::Result<(), String> {
        let want = EnginePlan::from_config(cfg);
        if self.schedule != want.schedule {
            return Err(format!(
                "layer schedule {:?} disagrees with the config ({:?})",
                self.schedule, want.schedule
            ));
        }
        if self.gate != want.gate {
            return Err(format!(
                "gate {:?} disagrees with the config ({:?})",
                self.gate, want.gate
            ));
        }
        if let Some(b) = &self.budget {
            if !(b.rate > 0.0 && b.rate <= 1.0) {
                return Err(format!("budget {} is outside (0, 1]", b.rate));
            }
            if b.thresholds.len() != self.schedule.len() {
                return Err(format!(
                    "{} thresholds for {} layers",
                    b.thresholds.len(),
                    self.schedule.len()
                ));
            }
            if b.thresholds.iter().any(|t| t.is_nan()) {
                return Err("a threshold is NaN".into());
            }
            if let Some(rates) = &b.layer_rates {
                if rates.len() != self.schedule.len() {
                    return Err(format!(
                        "{} per-layer rates for {} layers",
                        rates.len(),
                        self.schedule.len()
                    ));
                }
                for (l, r) in rates.iter().enumerate() {
                    match (self.schedule[l] == RoutedUnit::None, r) {
                        (true, None) => {}
                        (false, Some(r)) if (0.0..=1.0).contains(r) => {}
                        _ => return Err(format!("layer {l}: per-layer rate {r:?} does not fit the layer")),
                    }
                }
            }
        }
        if self.quantiles.len() != self.schedule.len() {
            return Err(format!(
                "{} quantile tables for {} layers",
                self.quantiles.len(),
                self.schedule.len()
            ));
        }
        for (l, q) in self.quantiles.iter().enumerate() {
            if let Some(q) = q {
                if self.schedule[l] == RoutedUnit::None {
                    return Err(format!("layer {l} is dense but has a quantile table"));
                }
                if q.len() != N_QUANTILES || q.iter().any(|x| !x.is_finite()) || q.windows(2).any(|w| w[0] > w[1]) {
                    return Err(format!(
                        "layer {l}: the quantile table must hold {N_QUANTILES} ascending numbers"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the quantile tables allow budgets other than the stored one.
    pub fn has_quantiles(&self) -> bool {
        let routed = self.routed_layers();
        !routed.is_empty() && routed.iter().all(|&l| self.quantiles[l].is_some())
    }

    /// Per-layer thresholds for budget `r` from the quantile tables: every routed layer at rate `r`, or,
    /// when the stored budget has per-layer rates, rates in the same proportions ([`spread_rates`]).
    pub fn thresholds_for(&self, r: f64) -> Result<Vec<f32>> {
        check_budget(r)?;
        if !self.has_quantiles() {
            return Err(Error::InvalidArgument(
                "this engine has no router-logit quantiles, so its budget cannot be changed at load time; \
                 rebuild it with --calibration FILE"
                    .into(),
            ));
        }
        let rates = match self.budget.as_ref().and_then(|b| b.layer_rates.as_ref()) {
            Some(profile) => spread_rates(profile, r)?,
            None => self.quantiles.iter().map(|q| q.as_ref().map(|_| r)).collect(),
        };
        Ok(self
            .quantiles
            .iter()
            .zip(rates)
            .map(|(q, r)| match (q, r) {
                (Some(_), Some(r)) if r >= 1.0 => ALWAYS,
                (Some(_), Some(r)) if r <= 0.0 => NEVER,
                (Some(q), Some(r)) => quantile(q, 1.0 - r),
                _ => 0.0,
            })
            .collect())
    }

    /// The routing rule for `budget`: `None` gives the engine's default (its calibrated thresholds, or the
    /// reference rule `z > 0` when it has none); `Some(r)` the stored thresholds when `r` is the stored
    /// budget, otherwise thresholds from the quantile tables.
    pub fn routing(&self, budget: Option<f64>) -> Result<Routing> {
        match (budget, &self.budget) {
            (None, None) => Ok(Routing::Reference),
            (None, Some(b)) => Ok(Routing::Thresholds(b.thresholds.clone())),
            (Some(r), Some(b)) if r == b.rate => Ok(Routing::Thresholds(b.thresholds.clone())),
            (Some(r), _) => Ok(Routing::Thresholds(self.thresholds_for(r)?)),
        }
    }
}
