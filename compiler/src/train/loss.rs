//! Training losses and DLO's training-time routing bookkeeping (`dlo-method.md` §4.2, §5, §6.2, §6.3).
//!
//! - [`cross_entropy`]: next-token CE on label positions only (mean over label tokens, f32).
//! - [`routing_labels`]: the router targets z (`self`, `cos`, `cos-global`), computed without gradient, plus
//!   the per-layer realised capacities that `cos-global` re-allocates for the next micro-batch.
//! - [`bce`], [`routing_loss`]: BCE on σ(z) over **all** b×t positions (padding has label 0), as
//!   `nn.BCELoss` computes it (logs clamped at −100).
//! - [`CapacityState`]: the reference's `dlo_capacity` (scalar or per-layer list) and
//!   `dlo_global_avg_capacity`, linear capacity annealing and the layer-wise learning-rate ratios.

use super::error::{Result, TrainError};
use candle_core::{DType, Tensor, D};
use dlo_passes::{Capacity, DloConfig, LossType};
use dlo_runtime::model::train::TrainLayerTrace;

/// Next-token cross-entropy over the positions that have a target.
///
/// `logits`: `[b, t, V]` (f32); `targets[i]` (row-major `b*t`) is the token position `i` must predict, or
/// `None` where no loss is taken. Returns the mean over target positions and their count; with no target
/// the loss is a zero scalar (kept in the graph) and the count is 0.
pub fn cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if targets.len() != b * t {
        return Err(TrainError::Invalid(format!(
            "{} targets for a {b}×{t} batch",
            targets.len()
        )));
    }
    let mut rows = Vec::new();
    let mut tgt = Vec::new();
    for (i, x) in targets.iter().enumerate() {
        if let Some(x) = x {
            if *x as usize >= v {
                return Err(TrainError::Invalid(format!(
                    "target token {x} outside the vocabulary ({v})"
                )));
            }
            rows.push(i as u32);
            tgt.push(*x);
        }
    }
    let dev = logits.device();
    if rows.is_empty() {
        return Ok(((logits.sum_all()? * 0.0)?, 0));
    }
    let n = rows.len();
    let flat = logits.reshape((b * t, v))?;
    if dlo_runtime::model::fused::supported(&flat) {
        // One pass forward and one backward over the logits, no gather of the target rows.
        return Ok((dlo_runtime::model::fused::cross_entropy(&flat, targets)?, n));
    }
    let idx = Tensor::from_vec(rows, n, dev)?;
    let picked_rows = flat.index_select(&idx, 0)?;
    let lsm = candle_nn::ops::log_softmax(&picked_rows.to_dtype(DType::F32)?, D::Minus1)?;
    let tgt = Tensor::from_vec(tgt, (n, 1), dev)?;
    let nll = lsm.gather(&tgt, 1)?.neg()?.mean_all()?;
    Ok((nll, n))
}

/// `nn.BCELoss` (mean): `−[z·log r + (1−z)·log(1−r)]` with both logs clamped at −100, over every entry.
///
/// The gradient is torch's, `(r − z) / max(r(1−r), 1e-12)` per entry (divided by the count), so a
/// saturated score (σ(z) rounding to exactly 0 or 1 in f32) gives a large but finite gradient instead of the
/// NaN that differentiating the clamped logarithms would give. Built as `value + grad·(r − detach(r))`, which
/// has the clamped value forward and exactly that gradient backward.
pub fn bce(scores: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let r = scores.to_dtype(DType::F32)?;
    let rd = r.detach();
    let z = labels.to_dtype(DType::F32)?.detach();
    let log_r = rd.log()?.maximum(-100f64)?;
    let log_1mr = rd.affine(-1.0, 1.0)?.log()?.maximum(-100f64)?;
    let value = (z.mul(&log_r)? + z.affine(-1.0, 1.0)?.mul(&log_1mr)?)?.neg()?;
    let denom = rd.mul(&rd.affine(-1.0, 1.0)?)?.maximum(1e-12f64)?;
    let grad = (rd.sub(&z)? / denom)?;
    let surrogate = (value + grad.mul(&(&r - &rd)?)?)?;
    Ok(surrogate.mean_all()?)
}

/// Tokens selected by top-k for capacity `c` over `n` real tokens: `max(1, ⌈n·min(1, c)⌉)` (reference).
pub fn topk_count(n: usize, c: f64) -> usize {
    let k = (n as f64 * c.min(1.0)).ceil();
    (k.max(1.0) as usize).min(n.max(1))
}

/// Batch-level (or per-sequence) top-k selection over real tokens (§4.2): k = [`topk_count`], τ = the k-th
/// largest score, selected = real and score ≥ τ (ties all pass). `t` is the sequence length.
pub fn topk_select(scores: &[f32], valid: &[bool], t: usize, capacity: f64, per_sequence: bool) -> Vec<bool> {
    let bt = valid.len().min(scores.len());
    let mut out = vec![false; bt];
    let groups: Vec<(usize, usize)> = if per_sequence && t > 0 {
        (0..bt / t).map(|bi| (bi * t, bi * t + t)).collect()
    } else {
        vec![(0, bt)]
    };
    for (lo, hi) in groups {
        let mut real: Vec<f32> = (lo..hi).filter(|&i| valid[i]).map(|i| scores[i]).collect();
        if real.is_empty() {
            continue;
        }
        let k = topk_count(real.len(), capacity);
        real.sort_by(|a, b| b.total_cmp(a));
        let tau = real[k - 1];
        for i in lo..hi {
            out[i] = valid[i] && scores[i] >= tau;
        }
    }
    out
}

/// The `k`-th smallest value (1-based) among `vals[i]` where `mask[i]`; NaN sorts last.
fn kth_smallest(vals: &[f64], mask: &[bool], k: usize) -> Option<f64> {
    let mut v: Vec<f64> = vals.iter().zip(mask).filter(|(_, m)| **m).map(|(x, _)| *x).collect();
    if v.is_empty() || k == 0 {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[(k - 1).min(v.len() - 1)])
}

/// Routing targets of one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// Per layer: z for every position (`b*t`, 0/1), `None` for dense layers.
    pub z: Vec<Option<Vec<f32>>>,
    /// `cos-global` only: the realised capacity of each layer, Σ_t z / N (`None` for dense layers).
    pub realised: Option<Vec<Option<f64>>>,
}

/// Inputs of [`routing_labels`] for one routed layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerSignals<'a> {
    /// Top-k selection of the forward pass, `b*t`.
    pub exec: &'a [bool],
    /// Similarity per token, `b*t` (required by `cos` and `cos-global`).
    pub similarity: Option<&'a [f64]>,
    /// This layer's routing capacity (before `min(1, ·)`).
    pub capacity: f64,
}

/// Computes the routing labels (`dlo-method.md` §5.2) without gradient.
///
/// - `self`: z = exec.
/// - `cos`: per layer, z = 1[real and s ≤ s₍ₖ₎], s₍ₖ₎ the k-th smallest similarity over real tokens, with the
///   routing k (`per_sequence`: per sequence, with that sequence's k).
/// - `cos-global`: K = ⌈N·L_dlo·c̄⌉ (at least 1), θ = the K-th smallest similarity over every (layer, real
///   token), z = 1[real and s ≤ θ]; also returns c_l = Σ_t z / N.
///
/// `layers[l]` is `None` for dense layers; `valid` flags real tokens (`b*t`, row-major, `t` per sequence).
pub fn routing_labels(
    layers: &[Option<LayerSignals>],
    valid: &[bool],
    t: usize,
    loss_type: LossType,
    per_sequence: bool,
    global_avg: f64,
) -> Result<Labels> {
    let bt = valid.len();
    let n = valid.iter().filter(|v| **v).count();
    for s in layers.iter().flatten() {
        if s.exec.len() != bt || s.similarity.is_some_and(|x| x.len() != bt) {
            return Err(TrainError::Invalid(
                "routing trace length differs from the batch".into(),
            ));
        }
    }
    let need_sim = |s: &LayerSignals| -> Result<Vec<f64>> {
        s.similarity.map(<[f64]>::to_vec).ok_or_else(|| {
            TrainError::Invalid(format!(
                "loss type `{}` needs the similarity signal, which the forward pass did not return",
                loss_type.as_str()
            ))
        })
    };
    match loss_type {
        LossType::SelfTopK => Ok(Labels {
            z: layers
                .iter()
                .map(|s| {
                    s.map(|s| {
                        s.exec
                            .iter()
                            .zip(valid)
                            .map(|(&e, &v)| if e && v { 1.0 } else { 0.0 })
                            .collect()
                    })
                })
                .collect(),
            realised: None,
        }),
        LossType::Cos => {
            let mut z = Vec::with_capacity(layers.len());
            for s in layers {
                let Some(s) = s else {
                    z.push(None);
                    continue;
                };
                let sim = need_sim(s)?;
                let mut out = vec![0f32; bt];
                let groups: Vec<(usize, usize)> = if per_sequence && t > 0 {
                    (0..bt / t).map(|bi| (bi * t, bi * t + t)).collect()
                } else {
                    vec![(0, bt)]
                };
                for (lo, hi) in groups {
                    let m = &valid[lo..hi];
                    let nn = m.iter().filter(|v| **v).count();
                    if nn == 0 {
                        continue;
                    }
                    let k = topk_count(nn, s.capacity);
                    if let Some(th) = kth_smallest(&sim[lo..hi], m, k) {
                        for i in lo..hi {
                            out[i] = if valid[i] && sim[i] <= th { 1.0 } else { 0.0 };
                        }
                    }
                }
                z.push(Some(out));
            }
            Ok(Labels { z, realised: None })
        }
        LossType::CosGlobal => {
            let mut sims = Vec::new();
            for s in layers.iter().flatten() {
                sims.push(need_sim(s)?);
            }
            let l_dlo = sims.len();
            let mut pooled = Vec::with_capacity(n * l_dlo);
            for s in &sims {
                pooled.extend(s.iter().zip(valid).filter(|(_, v)| **v).map(|(x, _)| *x));
            }
            let total = pooled.len();
            let k = ((n * l_dlo) as f64 * global_avg).ceil().max(1.0) as usize;
            let th = kth_smallest(&pooled, &vec![true; total], k.min(total.max(1)));
            let mut z = Vec::with_capacity(layers.len());
            let mut realised = Vec::with_capacity(layers.len());
            let mut it = sims.into_iter();
            for s in layers {
                if s.is_none() {
                    z.push(None);
                    realised.push(None);
                    continue;
                }
                let sim = it.next().unwrap_or_default();
                let out: Vec<f32> = sim
                    .iter()
                    .zip(valid)
                    .map(|(&x, &v)| match th {
                        Some(th) if v && x <= th => 1.0,
                        _ => 0.0,
                    })
                    .collect();
                let count: f32 = out.iter().sum();
                realised.push(Some(if n == 0 { 0.0 } else { count as f64 / n as f64 }));
                z.push(Some(out));
            }
            Ok(Labels {
                z,
                realised: Some(realised),
            })
        }
    }
}

/// The routing loss of one micro-batch and its parts.
#[derive(Debug)]
pub struct RouteLoss {
    /// L_route (scalar, differentiable through the scores).
    pub loss: Tensor,
    /// BCE of each routed layer (for logging), `None` for dense layers.
    pub per_layer: Vec<Option<f32>>,
}

/// L_route (`dlo-method.md` §5.4): `self`/`cos` average the per-layer BCEs, `cos-global` takes one BCE over
/// every (layer, position) entry. Each routed layer's `scores` is `[b, t]`.
pub fn routing_loss(traces: &[Option<TrainLayerTrace>], labels: &Labels, loss_type: LossType) -> Result<RouteLoss> {
    let mut scores = Vec::new();
    let mut zs = Vec::new();
    let mut per_layer = Vec::with_capacity(traces.len());
    for (tr, z) in traces.iter().zip(&labels.z) {
        match (tr, z) {
            (Some(tr), Some(z)) => {
                let dims = tr.scores.dims().to_vec();
                let zt = Tensor::from_slice(z, dims.as_slice(), tr.scores.device())?;
                let l = bce(&tr.scores, &zt)?;
                per_layer.push(Some(l.to_scalar::<f32>()?));
                scores.push(tr.scores.clone());
                zs.push((zt, l));
            }
            (None, None) => per_layer.push(None),
            _ => {
                return Err(TrainError::Invalid(
                    "routing labels do not match the routed layers".into(),
                ))
            }
        }
    }
    if scores.is_empty() {
        return Err(TrainError::Invalid("the model has no routed layer".into()));
    }
    let loss = match loss_type {
        LossType::CosGlobal => {
            let s = Tensor::stack(&scores, 0)?;
            let z = Tensor::stack(&zs.iter().map(|(z, _)| z.clone()).collect::<Vec<_>>(), 0)?;
            bce(&s, &z)?
        }
        _ => {
            let ls: Vec<Tensor> = zs.into_iter().map(|(_, l)| l).collect();
            (Tensor::stack(&ls, 0)?.sum_all()? / ls.len() as f64)?
        }
    };
    Ok(RouteLoss { loss, per_layer })
}

/// The reference's capacity bookkeeping: `dlo_capacity` (scalar or per-layer list), the global average
/// `dlo_global_avg_capacity` used by `cos-global`, and linear annealing from 1.0 to the target.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityState {
    /// Current `dlo_capacity`.
    pub capacity: Capacity,
    /// Current c̄ (`cos-global`'s K = ⌈N·L·c̄⌉).
    pub global_avg: f64,
    /// The target capacity c*.
    pub target: f64,
    /// Annealing length S in optimizer steps (0: off).
    pub anneal_steps: u64,
    /// Which layers are routed.
    pub is_dlo: Vec<bool>,
}

impl CapacityState {
    /// Initial state for a run: the config's capacity, or `override_c` (a scalar); with annealing
    /// (`anneal_steps > 0`) the capacity starts at 1.0 (`customized_trainer.py`).
    pub fn new(dlo: &DloConfig, override_c: Option<f64>, anneal_steps: u64) -> Result<Self> {
        let capacity = match override_c {
            Some(c) => Capacity::Scalar(c),
            None => dlo.capacity.clone(),
        };
        let routed: Vec<f64> = match &capacity {
            Capacity::Scalar(c) => vec![*c],
            Capacity::PerLayer(v) => v
                .iter()
                .zip(&dlo.is_dlo)
                .filter(|(_, r)| **r)
                .map(|(c, _)| c.unwrap_or(1.0))
                .collect(),
        };
        let mean = routed.iter().sum::<f64>() / routed.len().max(1) as f64;
        for c in &routed {
            if !(c.is_finite() && *c > 0.0 && *c <= 1.0) {
                return Err(TrainError::Invalid(format!("capacity {c} is not in (0, 1]")));
            }
        }
        let mut s = CapacityState {
            capacity,
            global_avg: mean,
            target: mean,
            anneal_steps,
            is_dlo: dlo.is_dlo.clone(),
        };
        if anneal_steps > 0 {
            s.capacity = Capacity::Scalar(1.0);
        }
        Ok(s)
    }

    /// Annealing at the start of every micro-batch while `global_step ≤ S` (§6.2): c̄ = 1 − ρ·step with
    /// ρ = (1 − c*)/S; a per-layer list is rescaled by c̄ / mean(c_prev), a scalar is set to c̄.
    pub fn anneal(&mut self, global_step: u64) {
        if self.anneal_steps == 0 || global_step > self.anneal_steps {
            return;
        }
        let rho = (1.0 - self.target) / self.anneal_steps as f64;
        let avg = 1.0 - rho * global_step as f64;
        self.capacity = match &self.capacity {
            Capacity::Scalar(_) => Capacity::Scalar(avg),
            Capacity::PerLayer(v) => {
                let vals: Vec<f64> = v.iter().flatten().copied().collect();
                let mean = vals.iter().sum::<f64>() / vals.len().max(1) as f64;
                Capacity::PerLayer(
                    v.iter()
                        .map(|c| c.map(|c| if mean > 0.0 { c * avg / mean } else { avg }))
                        .collect(),
                )
            }
        };
        self.global_avg = avg;
    }

    /// `cos-global` re-allocation (§5.3): the realised per-layer capacities become the next capacities.
    pub fn reallocate(&mut self, realised: &[Option<f64>]) {
        self.capacity = Capacity::PerLayer(realised.to_vec());
    }

    /// Capacity of every layer for the routing forward (1.0 for dense layers).
    pub fn per_layer(&self) -> Vec<f64> {
        (0..self.is_dlo.len())
            .map(|l| if self.is_dlo[l] { self.capacity.of_layer(l) } else { 1.0 })
            .collect()
    }

    /// Layer-wise learning-rate ratios (§6.3): c_l + 1 − mean(c) for routed layers of a per-layer list,
    /// 1 elsewhere (and everywhere for a scalar capacity).
    pub fn lr_ratios(&self) -> Vec<f64> {
        let n = self.is_dlo.len();
        match &self.capacity {
            Capacity::Scalar(_) => vec![1.0; n],
            Capacity::PerLayer(v) => {
                let vals: Vec<f64> = v.iter().flatten().copied().collect();
                if vals.is_empty() {
                    return vec![1.0; n];
                }
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                (0..n)
                    .map(|l| match v.get(l).copied().flatten() {
                        Some(c) => c + 1.0 - mean,
                        None => 1.0,
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use dlo_passes::SkipKind;

    fn sig(exec: &[bool], sim: &[f64], c: f64) -> (Vec<bool>, Vec<f64>, f64) {
        (exec.to_vec(), sim.to_vec(), c)
    }

    #[test]
    fn self_labels_are_the_selection_and_padding_is_zero() {
        let valid = [true, true, true, false];
        let exec = [true, false, true, true]; // a (buggy) selection of padding must not become a label
        let s = LayerSignals {
            exec: &exec,
            similarity: None,
            capacity: 0.5,
        };
        let l = routing_labels(&[None, Some(s)], &valid, 4, LossType::SelfTopK, false, 0.9).unwrap();
        assert_eq!(l.z[0], None);
        assert_eq!(l.z[1].as_deref(), Some(&[1.0, 0.0, 1.0, 0.0][..]));
        assert!(l.realised.is_none());
    }

    #[test]
    fn cos_labels_take_the_k_least_similar_real_tokens() {
        // 2 sequences × 3, last of the second is padding: N = 5; c = 0.5 → k = ⌈2.5⌉ = 3.
        let valid = [true, true, true, true, true, false];
        let (e, s, c) = sig(&[false; 6], &[0.9, 0.1, 0.5, 0.3, 0.95, -1.0], 0.5);
        let ls = LayerSignals {
            exec: &e,
            similarity: Some(&s),
            capacity: c,
        };
        let l = routing_labels(&[Some(ls)], &valid, 3, LossType::Cos, false, 1.0).unwrap();
        // smallest real similarities: 0.1, 0.3, 0.5 → threshold 0.5; padding (-1.0) excluded.
        assert_eq!(l.z[0].as_deref(), Some(&[0.0, 1.0, 1.0, 1.0, 0.0, 0.0][..]));
        // per sequence: seq 0 has N=3 → k=2 → {0.1, 0.5}; seq 1 has N=2 → k=1 → {0.3}.
        let l = routing_labels(&[Some(ls)], &valid, 3, LossType::Cos, true, 1.0).unwrap();
        assert_eq!(l.z[0].as_deref(), Some(&[0.0, 1.0, 1.0, 1.0, 0.0, 0.0][..]));
        let ls = LayerSignals { capacity: 0.2, ..ls };
        let l = routing_labels(&[Some(ls)], &valid, 3, LossType::Cos, true, 1.0).unwrap();
        assert_eq!(l.z[0].as_deref(), Some(&[0.0, 1.0, 0.0, 1.0, 0.0, 0.0][..]));
        // missing similarity is an error, not a panic
        let bad = LayerSignals { similarity: None, ..ls };
        let e = routing_labels(&[Some(bad)], &valid, 3, LossType::Cos, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("similarity"), "{e}");
    }

    #[test]
    fn cos_global_pools_layers_and_reallocates_capacity() {
        // 1 sequence of 4 tokens (last is padding): N = 3, two routed layers + one dense: L_dlo = 2.
        let valid = [true, true, true, false];
        let e = [false; 4];
        let s1 = [0.1f64, 0.2, 0.9, 0.0];
        let s2 = [0.8f64, 0.95, 0.3, 0.0];
        let l1 = LayerSignals {
            exec: &e,
            similarity: Some(&s1),
            capacity: 1.0,
        };
        let l2 = LayerSignals {
            similarity: Some(&s2),
            ..l1
        };
        // c̄ = 0.5 → K = ⌈3·2·0.5⌉ = 3 → θ = 3rd smallest of {0.1,0.2,0.9,0.8,0.95,0.3} = 0.3.
        let l = routing_labels(&[Some(l1), None, Some(l2)], &valid, 4, LossType::CosGlobal, false, 0.5).unwrap();
        assert_eq!(l.z[0].as_deref(), Some(&[1.0, 1.0, 0.0, 0.0][..]));
        assert_eq!(l.z[1], None);
        assert_eq!(l.z[2].as_deref(), Some(&[0.0, 0.0, 1.0, 0.0][..]));
        let r = l.realised.unwrap();
        assert!((r[0].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r[1], None);
        assert!((r[2].unwrap() - 1.0 / 3.0).abs() < 1e-12);
        // the realised list becomes the next per-layer capacity; its mean is c̄
        let dlo = DloConfig {
            is_dlo: vec![true, false, true],
            ..DloConfig::paper_default(SkipKind::Mlp, 3)
        };
        let mut st = CapacityState::new(&dlo, Some(0.5), 0).unwrap();
        st.reallocate(&r);
        let c = st.per_layer();
        assert!((c[0] - 2.0 / 3.0).abs() < 1e-12 && c[1] == 1.0 && (c[2] - 1.0 / 3.0).abs() < 1e-12);
        // dynamic LR: c_l + 1 − mean(c) = c_l + 0.5
        let r = st.lr_ratios();
        assert!((r[0] - (2.0 / 3.0 + 0.5)).abs() < 1e-12 && r[1] == 1.0 && (r[2] - (1.0 / 3.0 + 0.5)).abs() < 1e-12);
    }

    #[test]
    fn bce_matches_hand_computation_including_padding_entries() {
        let dev = Device::Cpu;
        let r = Tensor::new(&[[0.8f32, 0.3], [0.5, 1e-50]], &dev).unwrap();
        let z = Tensor::new(&[[1f32, 0.0], [1.0, 1.0]], &dev).unwrap();
        let got = bce(&r, &z).unwrap().to_scalar::<f32>().unwrap();
        // r = 1e-50 underflows to 0 in f32: −log 0 is clamped to 100, as nn.BCELoss does.
        let want = (-(0.8f64.ln()) - (0.7f64).ln() - (0.5f64).ln() + 100.0) / 4.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn bce_gradient_is_torchs_and_finite_when_scores_saturate() {
        let dev = Device::Cpu;
        let r = candle_core::Var::new(&[0.8f32, 0.3, 1.0, 0.0, 1.0], &dev).unwrap();
        let z = Tensor::new(&[1f32, 0.0, 0.0, 1.0, 1.0], &dev).unwrap();
        let l = bce(r.as_tensor(), &z).unwrap();
        // saturated entries cost 100 each when wrong, 0 when right
        let want = (-(0.8f64.ln()) - 0.7f64.ln() + 100.0 + 100.0 + 0.0) / 5.0;
        assert!((l.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-4);
        let g: Vec<f32> = l.backward().unwrap().get(r.as_tensor()).unwrap().to_vec1().unwrap();
        let want = [(0.8 - 1.0) / (0.8 * 0.2), 0.3 / (0.3 * 0.7), 1e12, -1e12, 0.0];
        for (a, b) in g.iter().zip(want) {
            let b = b / 5.0;
            assert!(
                a.is_finite() && ((*a as f64) - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{g:?}"
            );
        }
    }

    #[test]
    fn routing_loss_averages_layers_or_pools_them() {
        let dev = Device::Cpu;
        let tr = |v: &[f32]| TrainLayerTrace {
            scores: Tensor::from_slice(v, (1, 2), &dev).unwrap(),
            exec: vec![true, true],
            similarity: None,
        };
        let traces = vec![Some(tr(&[0.9, 0.2])), None, Some(tr(&[0.6, 0.6]))];
        let labels = Labels {
            z: vec![Some(vec![1.0, 0.0]), None, Some(vec![0.0, 1.0])],
            realised: None,
        };
        let l0 = -(0.9f64.ln() + 0.8f64.ln()) / 2.0;
        let l2 = -(0.4f64.ln() + 0.6f64.ln()) / 2.0;
        for lt in [LossType::SelfTopK, LossType::Cos, LossType::CosGlobal] {
            let rl = routing_loss(&traces, &labels, lt).unwrap();
            let got = rl.loss.to_scalar::<f32>().unwrap() as f64;
            assert!((got - (l0 + l2) / 2.0).abs() < 1e-6, "{lt:?}: {got}");
            assert!((rl.per_layer[0].unwrap() as f64 - l0).abs() < 1e-6);
            assert_eq!(rl.per_layer[1], None);
        }
    }

    #[test]
    fn cross_entropy_is_the_mean_over_target_positions() {
        let dev = Device::Cpu;
        // b=1, t=3, V=3
        let logits = Tensor::new(&[[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0]]], &dev).unwrap();
        let (l, n) = cross_entropy(&logits, &[Some(2), None, Some(1)]).unwrap();
        let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = ((lse([1.0, 2.0, 3.0]) - 3.0) + (lse([5.0, 1.0, 1.0]) - 1.0)) / 2.0;
        assert_eq!(n, 2);
        assert!((l.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        assert!(cross_entropy(&logits, &[Some(7), None, None]).is_err());
        let (z, n) = cross_entropy(&logits, &[None, None, None]).unwrap();
        assert_eq!((z.to_scalar::<f32>().unwrap(), n), (0.0, 0));
    }

    #[test]
    fn annealing_is_linear_in_optimizer_steps_and_keeps_layer_proportions() {
        let dlo = DloConfig {
            is_dlo: vec![true, false, true],
            ..DloConfig::paper_default(SkipKind::Mlp, 3)
        };
        let mut st = CapacityState::new(&dlo, Some(0.8), 4).unwrap();
        assert_eq!(st.capacity, Capacity::Scalar(1.0));
        let mut seen = vec![];
        for step in 0..7 {
            st.anneal(step);
            seen.push(st.global_avg);
        }
        let want = [1.0, 0.95, 0.9, 0.85, 0.8, 0.8, 0.8];
        for (g, w) in seen.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{seen:?}");
        }
        assert_eq!(st.capacity, Capacity::Scalar(0.8));
        // per-layer list: rescaled by c̄ / mean(prev), proportions kept
        let mut st = CapacityState::new(&dlo, Some(0.8), 4).unwrap();
        st.reallocate(&[Some(1.2), None, Some(0.8)]);
        st.anneal(2); // c̄ = 0.9, prev mean 1.0
        match &st.capacity {
            Capacity::PerLayer(v) => {
                assert!((v[0].unwrap() - 1.08).abs() < 1e-12 && v[1].is_none() && (v[2].unwrap() - 0.72).abs() < 1e-12)
            }
            c => panic!("{c:?}"),
        }
        // routing clamps to 1 through topk_count
        assert_eq!(topk_count(10, 1.08), 10);
        assert_eq!(topk_count(10, 0.72), 8);
        assert_eq!(topk_count(10, 0.0), 1);
        assert!(CapacityState::new(&dlo, Some(1.5), 0).is_err());
    }
}
