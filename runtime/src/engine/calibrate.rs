//! Compute-budget calibration (`dlo-method.md` §9.5): choose per-layer router thresholds on sample text so
//! that the mean execution rate over routed layers is a target R.
//!
//! Every routed layer gets the same rate R: its threshold is the (1 − R) quantile of the router logits it
//! sees. What a layer sees depends on the thresholds of the layers before it (skipped units change the
//! residual stream), so the thresholds are found by a fixed-point iteration: run with the current
//! thresholds (first round: the reference rule), set each layer's threshold from the logits of that run,
//! repeat until the measured rate is within `tolerance` of R (at most `max_rounds` runs). The logits of
//! the final run also give each layer's [`N_QUANTILES`](super::plan::N_QUANTILES)-entry quantile table,
//! from which the runtime derives thresholds for other budgets.

use super::plan::{check_budget, quantile_table, threshold_for_rate, Budget, EnginePlan};
use crate::error::{Error, Result};
use crate::model::{Batch, Forward, Model, Routing};

/// Settings of a calibration run.
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Target mean execution rate in (0, 1]; `None` keeps the reference rule and only records quantiles.
    pub budget: Option<f64>,
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
            budget: None,
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
    model: &Model,
    ids: &[u32],
    routing: &Routing,
    chunk_len: usize,
    batch: usize,
) -> Result<RoutingStats> {
    let n_layers = model.config().num_hidden_layers;
    let routed: Vec<usize> = (0..n_layers).filter(|&l| model.config().is_routed(l)).collect();
    if routed.is_empty() {
        return Err(Error::InvalidArgument(
            "the model has no routed layers, so it has no execution rate to calibrate".into(),
        ));
    }
    if ids.is_empty() {
        return Err(Error::InvalidArgument("calibration text has no tokens".into()));
    }
    let chunk_len = chunk_len.clamp(1, model.config().max_position_embeddings.max(1));
    let chunks: Vec<&[u32]> = ids.chunks(chunk_len).collect();
    let mut logits: Vec<Option<Vec<f32>>> = (0..n_layers)
        .map(|l| routed.contains(&l).then(|| Vec::with_capacity(ids.len())))
        .collect();
    let mut executed = vec![0usize; n_layers];
    let opts = Forward {
        routing: routing.clone(),
        all_logits: false,
    };
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
        let out = model.forward(&b, None, &opts)?;
        for &l in &routed {
            if let (Some(tr), Some(acc)) = (&out.trace[l], &mut logits[l]) {
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

/// Calibrates `model` on `ids`; with a budget, also measures the resulting rate on `heldout` text.
pub fn calibrate(
    model: &Model,
    ids: &[u32],
    heldout: Option<&[u32]>,
    opts: &CalibrationOptions,
) -> Result<Calibration> {
    if let Some(r) = opts.budget {
        check_budget(r)?;
    }
    let n_layers = model.config().num_hidden_layers;
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
        let Some(r) = opts.budget else { break };
        let first = round_rates.len() == 1; // the reference rule was just measured, not the budget
        if (!first && (stats.rate - r).abs() <= opts.tolerance) || round_rates.len() > opts.max_rounds {
            break;
        }
        thresholds = stats
            .logits
            .iter()
            .map(|z| z.as_ref().map_or(0.0, |z| threshold_for_rate(z, r)))
            .collect();
    }
    let quantiles = stats
        .logits
        .iter()
        .map(|z| z.as_ref().map(|z| quantile_table(z)))
        .collect();
    let budget = match opts.budget {
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
