//! Training-mode forward pass: differentiable ops only, DLO's training routing (`dlo-method.md` §4.2, §5.1).
//!
//! Routed layers select tokens by **top-k over router scores** with a per-layer capacity (batch-level over the
//! micro-batch's real tokens, as the reference does, or per sequence), scale executed MLP outputs by the gate
//! `g(σ(z))` (so the LM loss reaches the router), and report, per routed layer, the scores, the selection and
//! — when asked — the per-token cosine similarity between the unit's input and its dense output, computed
//! without gradient in f32. Labels, the BCE routing loss and capacity re-allocation are the trainer's job.

use super::layers::{Exec, Kv};
use super::{Batch, Model};
use crate::error::{Error, Result};
use crate::weights::Weights;
use candle_core::{DType, Device, Tensor, Var, D};
use dlo_passes::ModelConfig;
use dlo_passes::SkipKind;
use std::collections::HashMap;

/// Routing settings for one training forward pass.
#[derive(Debug, Clone)]
pub struct TrainRouting {
    /// Capacity per layer (entries of dense layers are ignored); k = max(1, ⌈c·N⌉).
    pub capacity: Vec<f64>,
    /// Top-k within each sequence instead of over the whole micro-batch (§9.7 option).
    pub per_sequence: bool,
    /// Compute the similarity signal (needed by the `cos` and `cos-global` label types).
    pub similarity: bool,
}

/// What one routed layer did in a training forward pass.
#[derive(Debug, Clone)]
pub struct TrainLayerTrace {
    /// Router scores r = σ(z), `[b, t]`, f32 (f64 for f64 models), differentiable w.r.t. the router and everything below it.
    pub scores: Tensor,
    /// Top-k selection, `b*t` (padding never selected).
    pub exec: Vec<bool>,
    /// cos(unit input, dense unit output) per token, `b*t`, when requested.
    pub similarity: Option<Vec<f64>>,
}

/// Result of a training forward pass.
#[derive(Debug)]
pub struct TrainOutput {
    /// Logits `[b, t, vocab]`, f32 (f64 for f64 models), differentiable.
    pub logits: Tensor,
    /// Per layer: the trace of routed layers, `None` for dense ones.
    pub layers: Vec<Option<TrainLayerTrace>>,
}

impl Model {
    /// Loads a model whose tensors selected by `trainable(name)` are [`Var`]s, in `dtype` (f32 for training;
    /// f64 for gradient checks) on `device`.
    /// Returns the model and the variables by HF name; the optimiser updates them in place, so the model
    /// always computes with the current values.
    pub fn load_trainable(
        cfg: &ModelConfig,
        w: &Weights,
        trainable: impl Fn(&str) -> bool,
        dtype: DType,
        device: &Device,
    ) -> Result<(Model, Vec<(String, Var)>)> {
        let mut map = HashMap::new();
        let mut vars = Vec::new();
        for name in w.names() {
            let shape = w.shape_of(&name).unwrap_or_default();
            let t = w.get(&name, &shape, dtype, device)?;
            if trainable(&name) {
                let v = Var::from_tensor(&t)?;
                map.insert(name.clone(), v.as_tensor().clone());
                vars.push((name, v));
            } else {
                map.insert(name, t);
            }
        }
        let model = Model::load(cfg, &Weights::from_tensors(map, w.path()), dtype, device)?;
        Ok((model, vars))
    }

    /// The training forward pass over a right- or left-padded batch (no KV cache).
    ///
    /// # Shapes
    /// logits `[b, t, vocab]`; per routed layer scores `[b, t]`, exec and similarity `b*t`.
    pub fn forward_train(&self, batch: &Batch, routing: &TrainRouting) -> Result<TrainOutput> {
        if routing.capacity.len() < self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "{} capacities for {} layers",
                routing.capacity.len(),
                self.layers.len()
            )));
        }
        let ex = Exec { differentiable: true };
        let (mut h, step) = self.embed(batch)?;
        let (b, t) = (batch.b, batch.t);
        let mut traces = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let (Some(router), Some(dlo)) = (&self.routers[l], &self.cfg.dlo) else {
                let a = layer.attn_unit(&h, &step, Kv::Local(None), ex)?;
                h = (&a + layer.mlp_delta(&a, ex)?)?;
                traces.push(None);
                continue;
            };
            let z = router.logits(&h)?.to_dtype(self.wide_dtype())?;
            let scores = candle_nn::ops::sigmoid(&z)?;
            let r: Vec<f32> = scores.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let exec = top_k(&r, &batch.valid, b, t, routing.capacity[l], routing.per_sequence);
            let g = super::gate_of_scores(&scores, &dlo.gate_params())?
                .reshape((b, t, 1))?
                .to_dtype(h.dtype())?;
            let (next, similarity) = match dlo.skip {
                SkipKind::Mlp => {
                    // Attention for all tokens. The MLP's output reaches the loss only on selected rows, so
                    // only those run it with a gradient path (gathered into a dense tile: a skipped row's
                    // backward would multiply by 0). The similarity signal needs every row's MLP output; the
                    // skipped rows run it without one, and only when it is asked for.
                    let a = layer.attn_unit(&h, &step, Kv::Local(None), ex)?;
                    let (out, m_sel) = super::gated_mlp_rows(layer, &a, &exec, &g, ex)?;
                    let sim = if routing.similarity {
                        let d = a.dim(D::Minus1)?;
                        let ad = a.reshape((b * t, d))?.detach();
                        let mut m_all = ad.zeros_like()?;
                        if let (Some(idx), Some(m)) = (row_index(&exec, true, a.device())?, &m_sel) {
                            m_all = m_all.index_add(&idx, &m.detach(), 0)?;
                        }
                        if let Some(idx) = row_index(&exec, false, a.device())? {
                            let m = layer.mlp_delta(&ad.index_select(&idx, 0)?, ex)?.detach();
                            m_all = m_all.index_add(&idx, &m, 0)?;
                        }
                        let y = (&ad + m_all)?.reshape((b, t, d))?;
                        Some(cosine_rows(&ad.reshape((b, t, d))?, &y)?)
                    } else {
                        None
                    };
                    (out, sim)
                }
                SkipKind::Layer => {
                    let sel = Tensor::from_vec(
                        exec.iter().map(|&e| e as u8 as f32).collect::<Vec<_>>(),
                        (b, t, 1),
                        h.device(),
                    )?
                    .to_dtype(h.dtype())?;
                    // Selected tokens attend only among selected tokens (masking is the same as packing,
                    // positions are the original ones); the others pass unchanged.
                    let a = layer.attn_unit(&h, &step, Kv::Local(Some(&exec)), ex)?;
                    let y = (&a + layer.mlp_delta(&a, ex)?.broadcast_mul(&g)?)?;
                    let keep = (sel.ones_like()? - &sel)?;
                    let out = (y.broadcast_mul(&sel)? + h.broadcast_mul(&keep)?)?;
                    let sim = if routing.similarity {
                        // The dense layer (attention over every token) re-run without gradient.
                        let hd = h.detach();
                        let ad = layer.attn_unit(&hd, &step, Kv::Local(None), ex)?;
                        let yd = (&ad + layer.mlp_delta(&ad, ex)?)?;
                        Some(cosine_rows(&hd, &yd.detach())?)
                    } else {
                        None
                    };
                    (out, sim)
                }
            };
            h = next;
            traces.push(Some(TrainLayerTrace {
                scores,
                exec,
                similarity,
            }));
        }
        Ok(TrainOutput {
            logits: self.head(&h, ex)?,
            layers: traces,
        })
    }
}

/// [`super::rows_where`] as an index tensor on `dev`; `None` when no row qualifies.
fn row_index(exec: &[bool], want: bool, dev: &Device) -> candle_core::Result<Option<Tensor>> {
    let rows = super::rows_where(exec, want);
    if rows.is_empty() {
        return Ok(None);
    }
    let n = rows.len();
    Tensor::from_vec(rows, n, dev).map(Some)
}

/// Top-k selection over router scores (`dlo-method.md` §4.2): k = max(1, ⌈c·N⌉) over the real tokens of the
/// whole batch (or of each sequence), τ = the k-th largest score, selected = real ∧ r ≥ τ (ties pass).
pub fn top_k(r: &[f32], valid: &[bool], b: usize, t: usize, capacity: f64, per_sequence: bool) -> Vec<bool> {
    let c = capacity.min(1.0);
    let select = |range: std::ops::Range<usize>, out: &mut [bool]| {
        let mut vals: Vec<f32> = range.clone().filter(|&i| valid[i]).map(|i| r[i]).collect();
        if vals.is_empty() {
            return;
        }
        let k = ((c * vals.len() as f64).ceil() as usize).clamp(1, vals.len());
        vals.sort_unstable_by(|a, b| b.total_cmp(a));
        let tau = vals[k - 1];
        for i in range {
            out[i] = valid[i] && r[i] >= tau;
        }
    };
    let mut exec = vec![false; b * t];
    if per_sequence {
        for bi in 0..b {
            select(bi * t..(bi + 1) * t, &mut exec);
        }
    } else {
        select(0..b * t, &mut exec);
    }
    exec
}

/// Per-row cosine similarity of `[b, t, d]` tensors as a flat `b*t` vector, computed in f64.
///
/// f64, not the model dtype as the reference does: a unit whose output is tiny next to the residual (a
/// zero-initialised layer early in SFT, a massive-activation token) has 1 − s below f32's resolution, so in
/// f32 whole layers tie at s = 1. cos-global's labels pass ties (`s ≤ θ`), which pushes the realised capacity
/// above c̄; the annealing rescale then forces skips onto layers whose labels all say "execute".
pub(crate) fn cosine_rows(x: &Tensor, y: &Tensor) -> candle_core::Result<Vec<f64>> {
    let x = x.to_dtype(DType::F64)?;
    let y = y.to_dtype(DType::F64)?;
    let dot = (&x * &y)?.sum(D::Minus1)?;
    let nx = x.sqr()?.sum(D::Minus1)?.sqrt()?;
    let ny = y.sqr()?.sum(D::Minus1)?.sqrt()?;
    // torch's cosine_similarity clamps each norm's product from below by eps = 1e-8.
    let denom = (nx * ny)?.maximum(1e-8)?;
    (dot / denom)?.flatten_all()?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Forward, Routing};
    use crate::testing::{max_abs_diff, random_weights, routed, tiny_config};

    fn batch() -> Batch {
        // Two right-padded sequences.
        let mut b = Batch::left_padded(&[vec![5, 9, 14, 3, 77, 21], vec![8, 1, 40]], 0);
        // Turn the left padding of the second sequence into right padding.
        b.ids = vec![5, 9, 14, 3, 77, 21, 8, 1, 40, 0, 0, 0];
        b.pos = vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5];
        b.valid = vec![
            true, true, true, true, true, true, true, true, true, false, false, false,
        ];
        b
    }

    fn all_on(n: usize) -> TrainRouting {
        TrainRouting {
            capacity: vec![1.0; n],
            per_sequence: false,
            similarity: true,
        }
    }

    /// Training's `mlp` skipping runs the MLP with gradient on the selected rows only; it must compute the
    /// same function as the dense form (every row's MLP, masked by the selection), in value, similarity and
    /// every gradient. In f64 the two agree to rounding.
    #[test]
    fn gathered_mlp_training_equals_the_dense_masked_form() {
        let cfg = routed(tiny_config(false), SkipKind::Mlp);
        let w = random_weights(&cfg, 17);
        let (m, vars) = Model::load_trainable(&cfg, &w, |_| true, DType::F64, &Device::Cpu).unwrap();
        let b = batch();
        let routing = TrainRouting {
            capacity: vec![0.5; cfg.num_hidden_layers],
            per_sequence: false,
            similarity: true,
        };
        let out = m.forward_train(&b, &routing).unwrap();
        // The dense masked form, with the decisions the gathered pass made.
        let ex = Exec { differentiable: true };
        let (mut h, step) = m.embed(&b).unwrap();
        let mut sims = vec![];
        for (l, layer) in m.layers.iter().enumerate() {
            let a = layer.attn_unit(&h, &step, Kv::Local(None), ex).unwrap();
            let mm = layer.mlp_delta(&a, ex).unwrap();
            h = match (&m.routers[l], &out.layers[l]) {
                (Some(router), Some(tr)) => {
                    let z = router.logits(&h).unwrap();
                    let g = super::super::gate_of_scores(
                        &candle_nn::ops::sigmoid(&z).unwrap(),
                        &cfg.dlo.as_ref().unwrap().gate_params(),
                    )
                    .unwrap()
                    .reshape((b.b, b.t, 1))
                    .unwrap();
                    let sel: Vec<f64> = tr.exec.iter().map(|&e| e as u8 as f64).collect();
                    let sel = Tensor::from_vec(sel, (b.b, b.t, 1), &Device::Cpu).unwrap();
                    sims.push(cosine_rows(&a.detach(), &(a.detach() + mm.detach()).unwrap()).unwrap());
                    (&a + mm.broadcast_mul(&g).unwrap().broadcast_mul(&sel).unwrap()).unwrap()
                }
                _ => (&a + mm).unwrap(),
            };
        }
        let dense = m.head(&h, ex).unwrap();
        assert!(max_abs_diff(&out.logits, &dense) < 1e-12);
        let got: Vec<Vec<f64>> = out
            .layers
            .iter()
            .flatten()
            .map(|t| t.similarity.clone().unwrap())
            .collect();
        assert_eq!(got.len(), sims.len());
        for (g, d) in got.iter().zip(&sims) {
            assert!(g.iter().zip(d).all(|(x, y)| (x - y).abs() < 1e-12), "{g:?} vs {d:?}");
        }
        // Every gradient, of a loss that weighs each logit differently.
        let weights = Tensor::randn(0f64, 1.0, dense.dims(), &Device::Cpu).unwrap();
        let loss = |x: &Tensor| (x * &weights).unwrap().sum_all().unwrap();
        let (ga, gd) = (loss(&out.logits).backward().unwrap(), loss(&dense).backward().unwrap());
        for (name, v) in &vars {
            match (ga.get(v.as_tensor()), gd.get(v.as_tensor())) {
                (Some(a), Some(d)) => assert!(max_abs_diff(a, d) < 1e-12, "{name}: {}", max_abs_diff(a, d)),
                (None, None) => {}
                _ => panic!("{name}: a gradient in one form only"),
            }
        }
    }

    #[test]
    fn similarity_resolves_units_whose_output_is_below_f32_resolution() {
        // a residual row of norm ~1000 and a unit output of 1e-3 across it: 1 − s ≈ 5e-13, which f32 rounds
        // to s = 1 (a tie with every untouched row); the label threshold must still see it as a change
        let mut a = vec![0f32; 8];
        a[0] = 1000.0;
        let mut changed = a.clone();
        changed[3] = 1e-3;
        let rows = |r: [&[f32]; 2]| Tensor::from_vec(r.concat(), (1, 2, 8), &Device::Cpu).unwrap();
        let s = cosine_rows(&rows([&a, &a]), &rows([&changed, &a])).unwrap();
        assert!(s[0] < 1.0 && s[0] > 1.0 - 1e-11, "{}", s[0]);
        assert_eq!(s[1], 1.0);
    }

    #[test]
    fn training_forward_at_full_capacity_equals_inference_with_all_units_on() {
        for skip in [SkipKind::Mlp, SkipKind::Layer] {
            let cfg = routed(tiny_config(false), skip);
            let m = Model::load(&cfg, &random_weights(&cfg, 2), DType::F32, &Device::Cpu).unwrap();
            let bt = batch();
            let tr = m.forward_train(&bt, &all_on(3)).unwrap();
            let inf = m
                .forward(
                    &bt,
                    None,
                    &Forward {
                        routing: Routing::Force(true),
                        all_logits: true,
                    },
                )
                .unwrap();
            for i in [0usize, 1] {
                let n = if i == 0 { 6 } else { 3 };
                let a = tr.logits.get(i).unwrap().narrow(0, 0, n).unwrap();
                let b = inf.logits.get(i).unwrap().narrow(0, 0, n).unwrap();
                let d = max_abs_diff(&a, &b);
                assert!(
                    d < 1e-4,
                    "{skip:?} sequence {i}: train vs inference logits differ by {d}"
                );
            }
            let l1 = tr.layers[1].as_ref().unwrap();
            assert_eq!(
                l1.exec.iter().filter(|e| **e).count(),
                9,
                "all real tokens selected, padding not"
            );
            let sim = l1.similarity.as_ref().unwrap();
            assert!(sim
                .iter()
                .all(|s| s.is_finite() && *s <= 1.0 + 1e-5 && *s >= -1.0 - 1e-5));
        }
    }

    #[test]
    fn top_k_is_batch_level_by_default_and_ties_pass() {
        let r = [0.9, 0.1, 0.5, 0.7, 0.2, 0.3];
        let valid = [true, true, true, true, true, false];
        // N = 5 real tokens, c = 0.5 → k = 3: 0.9, 0.7, 0.5.
        assert_eq!(
            top_k(&r, &valid, 2, 3, 0.5, false),
            vec![true, false, true, true, false, false]
        );
        // Per sequence: seq 0 has 3 real (k=2: 0.9, 0.5), seq 1 has 2 real (k=1: 0.7).
        assert_eq!(
            top_k(&r, &valid, 2, 3, 0.5, true),
            vec![true, false, true, true, false, false]
        );
        assert_eq!(
            top_k(&r, &valid, 1, 6, 0.2, false),
            vec![true, false, false, false, false, false]
        );
        // Equal scores (zero-initialised routers) all pass.
        assert_eq!(top_k(&[0.5; 4], &[true; 4], 1, 4, 0.25, false), vec![true; 4]);
        // k is at least 1.
        assert_eq!(top_k(&r, &valid, 1, 6, 0.0, false).iter().filter(|e| **e).count(), 1);
    }

    #[test]
    fn every_trainable_tensor_gets_a_gradient() {
        for skip in [SkipKind::Mlp, SkipKind::Layer] {
            let cfg = routed(tiny_config(false), skip);
            let (m, vars) =
                Model::load_trainable(&cfg, &random_weights(&cfg, 4), |_| true, DType::F32, &Device::Cpu).unwrap();
            let routing = TrainRouting {
                capacity: vec![0.7; 3],
                per_sequence: false,
                similarity: true,
            };
            let out = m.forward_train(&batch(), &routing).unwrap();
            let mut loss = out.logits.sqr().unwrap().mean_all().unwrap();
            for tr in out.layers.iter().flatten() {
                loss = (loss + tr.scores.mean_all().unwrap()).unwrap();
            }
            let grads = loss.backward().unwrap();
            assert_eq!(vars.len(), m.named_tensors().len());
            for (name, v) in &vars {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{skip:?}: no gradient for {name}"));
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 0.0 && norm.is_finite(), "{skip:?}: zero gradient for {name}");
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // f64 model; loss = mean logit² over real positions + mean router score (reaches routers two ways).
        for skip in [SkipKind::Mlp, SkipKind::Layer] {
            let cfg = routed(tiny_config(false), skip);
            let w = random_weights(&cfg, 9);
            let (m, vars) = Model::load_trainable(&cfg, &w, |_| true, DType::F64, &Device::Cpu).unwrap();
            let routing = TrainRouting {
                capacity: vec![0.6; 3],
                per_sequence: false,
                similarity: false,
            };
            let bt = batch();
            let loss_of = |m: &Model| -> Tensor {
                let out = m.forward_train(&bt, &routing).unwrap();
                let mut loss = out.logits.sqr().unwrap().mean_all().unwrap();
                for tr in out.layers.iter().flatten() {
                    loss = (loss + tr.scores.mean_all().unwrap()).unwrap();
                }
                loss
            };
            let grads = loss_of(&m).backward().unwrap();
            for name in [
                "model.routers.2.weight",
                "model.layers.1.mlp.down_proj.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ] {
                let (_, var) = vars.iter().find(|(n, _)| n == name).unwrap();
                let g: Vec<f64> = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let orig = var.as_tensor().copy().unwrap();
                let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
                for idx in [0usize, 7, flat.len() - 1] {
                    let eps = 1e-5;
                    let eval = |delta: f64| {
                        let mut v = flat.clone();
                        v[idx] += delta;
                        var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                            .unwrap();
                        loss_of(&m).to_scalar::<f64>().unwrap()
                    };
                    let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
                    var.set(&orig).unwrap();
                    let tol = 1e-6 + 1e-4 * fd.abs().max(g[idx].abs());
                    assert!(
                        (fd - g[idx]).abs() < tol,
                        "{skip:?} {name}[{idx}]: autograd {} vs finite difference {fd}",
                        g[idx]
                    );
                }
            }
        }
    }
}
