//! Compute-budget calibration (`dlo-method.md` §9.5): choose per-layer router thresholds on sample text so
//! that routed layers execute target fractions of tokens.
//!
//! The target ([`RateTarget`]) is either one rate R for every routed layer (a compute budget), or one rate
//! per layer, such as the per-layer capacities training ended with. Inference then executes, layer by
//! layer, the fraction of tokens the model was trained to execute, where the reference's rule (`z > 0`)
//! executes whatever fraction the sign of a bias-free router gives. A layer's threshold is the (1 − r_l)
//! quantile of the router logits it sees (rate 1: every token; rate 0: none).
//!
//! What a layer sees depends on the thresholds of the layers before it (skipped units change the residual
//! stream), so the thresholds are found by a fixed-point iteration: run with the current thresholds (first
//! round: the reference rule), set each layer's threshold from the logits of that run, repeat until the
//! measured rates are within `tolerance` of the target (at most `max_rounds` runs). The logits of the final
//! run also give each layer's [`N_QUANTILES`](dlo_runtime::engine::plan::N_QUANTILES)-entry quantile table, from
//! which the runtime derives thresholds for other budgets ([`EnginePlan::routing`]).
//!
//! Only the compiler calibrates (`dlo-compile build`, and training's `capacity` held-out rule); the runtime
//! reads the result from an engine's plan.

use dlo_passes::{Capacity, ModelConfig};
use dlo_runtime::engine::plan::{check_budget, quantile_table, threshold_for_rate, Budget, EnginePlan};
use dlo_runtime::model::{Batch, Forward, Routing};
use dlo_runtime::{Backend, Error, Result};

/// The execution rates calibration aims for.
#[derive(Debug, Clone, PartialEq)]
pub enum RateTarget {
    /// The same rate R ∈ (0, 1] in every routed layer: a compute budget.
    Uniform(f64),
    /// One rate in [0, 1] per layer (`None` for dense layers), e.g. the trained per-layer capacities.
    PerLayer(Vec<Option<f64>>),
}

impl RateTarget {
    /// Per routed layer of `cfg`, its target rate; checks the ranges and the layer count.
    pub fn layer_rates(&self, cfg: &ModelConfig) -> Result<Vec<Option<f64>>> {
        let n = cfg.num_hidden_layers;
        match self {
            RateTarget::Uniform(r) => {
                check_budget(*r)?;
                Ok((0..n).map(|l| cfg.is_routed(l).then_some(*r)).collect())
            }
            RateTarget::PerLayer(v) => {
                if v.len() != n {
                    return Err(Error::InvalidArgument(format!(
                        "{} per-layer target rates for a model with {n} layers",
                        v.len()
                    )));
                }
                (0..n)
                    .map(|l| match (cfg.is_routed(l), v[l]) {
                        (false, _) => Ok(None),
                        (true, Some(r)) if (0.0..=1.0).contains(&r) => Ok(Some(r)),
                        (true, Some(r)) => Err(Error::InvalidArgument(format!(
                            "layer {l}: target rate {r} is outside [0, 1]"
                        ))),
                        (true, None) => Err(Error::InvalidArgument(format!(
                            "layer {l} is routed but has no target rate"
                        ))),
                    })
                    .collect()
            }
        }
    }

    /// The per-layer target of `cfg`'s training capacity (`dlo_capacity`: one value for every routed layer,
    /// or the per-layer list that cos-global training leaves); see [`RateTarget::of_capacity`].
    pub fn trained_capacity(cfg: &ModelConfig) -> Result<RateTarget> {
        let Some(d) = &cfg.dlo else {
            return Err(Error::InvalidArgument(
                "the model has no DLO config, so it has no trained capacity to follow".into(),
            ));
        };
        Ok(RateTarget::of_capacity(&d.capacity, &d.is_dlo))
    }

    /// Each routed layer (`is_routed[l]`) at the fraction of tokens training's top-k executes at capacity
    /// `capacity`: its capacity clamped to [0, 1] (annealing's rescale can leave a per-layer value above 1).
    pub fn of_capacity(capacity: &Capacity, is_routed: &[bool]) -> RateTarget {
        RateTarget::PerLayer(
            is_routed
                .iter()
                .enumerate()
                .map(|(l, r)| r.then(|| capacity.of_layer(l).clamp(0.0, 1.0)))
                .collect(),
        )
    }
}

/// Settings of a calibration run.
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// The rates to calibrate for; `None` keeps the reference rule and only records quantiles.
    pub target: Option<RateTarget>,
    /// Tokens per sequence the text is cut into (clamped to the model's context).
    pub chunk_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
    /// Most threshold re-estimations (each one more forward pass over the calibration text).
    pub max_rounds: usize,
    /// Stop when the measured rate is this close to the budget.
    pub tolerance: f64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            target: None,
            chunk_len: 128,
            batch: 8,
            max_rounds: 5,
            tolerance: 0.004,
        }
    }
}

/// Router logits and decisions of one pass over some text.
#[derive(Debug, Clone)]
pub struct RoutingStats {
    /// Mean execution rate over routed layers.
    pub rate: f64,
    /// Per layer: the execution rate (`None` for dense layers).
    pub layer_rates: Vec<Option<f64>>,
    /// Per layer: the router logits of every token, ascending (`None` for dense layers).
    pub logits: Vec<Option<Vec<f32>>>,
    /// Tokens seen.
    pub tokens: usize,
}

/// Runs `model` over `ids` (cut into `chunk_len`-token sequences, `batch` at a time, each starting at
/// position 0) with `routing`, collecting router logits and execution rates.
pub fn routing_stats(
    model: &(impl Backend + ?Sized),
    ids: &[u32],
    routing: &Routing,
    chunk_len: usize,
    batch: usize,
) -> Result<RoutingStats> {
    let cfg = model.config();
    let n_layers = cfg.num_hidden_layers;
    let routed: Vec<usize> = (0..n_layers).filter(|&l| cfg.is_routed(l)).collect();
    if routed.is_empty() {
        return Err(Error::InvalidArgument(
            "the model has no routed layers, so it has no execution rate to calibrate".into(),
        ));
    }
    if ids.is_empty() {
        return Err(Error::InvalidArgument("calibration text has no tokens".into()));
    }
    let chunk_len = chunk_len.clamp(1, cfg.max_position_embeddings.max(1));
    let chunks: Vec<&[u32]> = ids.chunks(chunk_len).collect();
    let mut logits: Vec<Option<Vec<f32>>> = (0..n_layers)
        .map(|l| routed.contains(&l).then(|| Vec::with_capacity(ids.len())))
        .collect();
    let mut executed = vec![0usize; n_layers];
    // Full-length chunks go in batches; a shorter tail chunk runs alone (no padding needed).
    let (full, tail): (Vec<&[u32]>, Vec<&[u32]>) = chunks.into_iter().partition(|c| c.len() == chunk_len);
    let mut groups: Vec<Vec<&[u32]>> = full.chunks(batch.max(1)).map(|g| g.to_vec()).collect();
    groups.extend(tail.into_iter().map(|c| vec![c]));
    for g in groups {
        let t = g[0].len();
        let flat: Vec<u32> = g.concat();
        let b = Batch {
            ids: flat,
            b: g.len(),
            t,
            pos: (0..g.len()).flat_map(|_| 0..t as u32).collect(),
            valid: vec![true; g.len() * t],
        };
        let opts = Forward {
            routing: routing.clone(),
            all_logits: false,
        };
        let trace = model.forward(&b, None, &opts)?.trace;
        for &l in &routed {
            if let (Some(tr), Some(acc)) = (trace.get(l).and_then(|t| t.as_ref()), &mut logits[l]) {
                acc.extend_from_slice(&tr.logits);
                executed[l] += tr.exec.iter().filter(|e| **e).count();
            }
        }
    }
    let n = ids.len() as f64;
    let layer_rates: Vec<Option<f64>> = (0..n_layers)
        .map(|l| routed.contains(&l).then(|| executed[l] as f64 / n))
        .collect();
    let rate = layer_rates.iter().flatten().sum::<f64>() / routed.len() as f64;
    for z in logits.iter_mut().flatten() {
        if z.iter().any(|x| x.is_nan()) {
            return Err(Error::InvalidArgument(
                "a router produced NaN logits during calibration".into(),
            ));
        }
        z.sort_by(f32::total_cmp);
    }
    Ok(RoutingStats {
        rate,
        layer_rates,
        logits,
        tokens: ids.len(),
    })
}

/// The outcome of [`calibrate`].
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The calibrated budget (`None` when only quantiles were recorded).
    pub budget: Option<Budget>,
    /// Per layer: the quantile table of the final run's router logits.
    pub quantiles: Vec<Option<Vec<f32>>>,
    /// Calibration tokens.
    pub tokens: usize,
    /// Measured mean execution rate of each round.
    pub round_rates: Vec<f64>,
}

impl Calibration {
    /// Stores the budget and quantile tables in `plan`.
    pub fn apply(&self, plan: &mut EnginePlan) {
        plan.budget = self.budget.clone();
        plan.quantiles = self.quantiles.clone();
        plan.calibration_tokens = self.tokens;
    }
}

/// Calibrates `model` on `ids`; with a target, also measures the resulting rate on `heldout` text.
///
/// Stops when the measured rates are within `tolerance` of the target: the mean rate for a uniform
/// target, every layer's rate for a per-layer one.
pub fn calibrate(
    model: &(impl Backend + ?Sized),
    ids: &[u32],
    heldout: Option<&[u32]>,
    opts: &CalibrationOptions,
) -> Result<Calibration> {
    let cfg = model.config();
    let n_layers = cfg.num_hidden_layers;
    let targets = match &opts.target {
        Some(t) => Some(t.layer_rates(cfg)?),
        None => None,
    };
    let target_mean = match &targets {
        Some(r) => {
            let routed: Vec<f64> = r.iter().flatten().copied().collect();
            let mean = routed.iter().sum::<f64>() / routed.len().max(1) as f64;
            if mean <= 0.0 {
                return Err(Error::InvalidArgument(
                    "the target rates execute nothing in any routed layer".into(),
                ));
            }
            Some(mean)
        }
        None => None,
    };
    let mut thresholds = vec![0.0f32; n_layers];
    let mut round_rates = Vec::new();
    let mut stats;
    loop {
        stats = routing_stats(
            model,
            ids,
            &Routing::Thresholds(thresholds.clone()),
            opts.chunk_len,
            opts.batch,
        )?;
        round_rates.push(stats.rate);
        let (Some(targets), Some(mean)) = (&targets, target_mean) else {
            break;
        };
        let miss = match opts.target {
            Some(RateTarget::PerLayer(_)) => targets
                .iter()
                .zip(&stats.layer_rates)
                .filter_map(|(t, r)| Some((t.as_ref()? - r.as_ref()?).abs()))
                .fold(0.0, f64::max),
            _ => (stats.rate - mean).abs(),
        };
        let first = round_rates.len() == 1; // the reference rule was just measured, not the target
        if (!first && miss <= opts.tolerance) || round_rates.len() > opts.max_rounds {
            break;
        }
        thresholds = stats
            .logits
            .iter()
            .zip(targets)
            .map(|(z, r)| match (z, r) {
                (Some(z), Some(r)) => threshold_for_rate(z, *r),
                _ => 0.0,
            })
            .collect();
    }
    let quantiles = stats
        .logits
        .iter()
        .map(|z| z.as_ref().map(|z| quantile_table(z)))
        .collect();
    let budget = match target_mean {
        None => None,
        Some(rate) => {
            let heldout_rate = match heldout {
                Some(h) if !h.is_empty() => Some(
                    routing_stats(
                        model,
                        h,
                        &Routing::Thresholds(thresholds.clone()),
                        opts.chunk_len,
                        opts.batch,
                    )?
                    .rate,
                ),
                _ => None,
            };
            Some(Budget {
                rate,
                thresholds,
                calibration_rate: stats.rate,
                heldout_rate,
                layer_rates: match &opts.target {
                    Some(RateTarget::PerLayer(_)) => targets,
                    _ => None,
                },
            })
        }
    };
    Ok(Calibration {
        budget,
        quantiles,
        tokens: ids.len(),
        round_rates,
    })
}

#[cfg(test)]
#[path = "calibrate_tests.rs"]
mod tests;
