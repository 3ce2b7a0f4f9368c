//! Optimisation: AdamW with f32 moments and per-parameter learning-rate scales, HF's warmup + cosine and
//! constant schedules, gradient accumulation, global grad-norm clipping, and which tensors train.
//!
//! AdamW follows `torch.optim.AdamW` (PyTorch 2.3, single-tensor path) operation for operation, so that one
//! step can be compared with an independent PyTorch computation:
//! `p ← p·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − (lr/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + ε)`.

use super::error::{Result, TrainError};
use candle_core::{DType, Tensor, Var};
use dlo_passes::ModelConfig;
use std::collections::HashMap;

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schedule {
    /// Half-cosine from the peak to 0 at the last step (`get_cosine_schedule_with_warmup`).
    Cosine,
    /// Constant after warmup (`get_constant_schedule_with_warmup`).
    Constant,
}

/// HF's multiplier of the peak learning rate for optimizer step `step` (0-based), as `LambdaLR` applies it:
/// linear warmup `step / warmup` (so step 0 has lr 0 when warmup > 0), then the schedule.
pub fn lr_factor(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Cosine => {
            let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// HF's warmup length for a ratio: `⌈total·ratio⌉`.
pub fn warmup_steps(total: u64, ratio: f64) -> u64 {
    (total as f64 * ratio).ceil() as u64
}

/// Which tensors train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainSet {
    /// Everything (the reference's full fine-tune, §6.1).
    All,
    /// Router weights only (`model.routers.*`).
    Routers,
    /// The tensors of layers that expansion added (from the config's `dlo_provenance`).
    New,
    /// Routers and new layers.
    RoutersNew,
}

impl std::str::FromStr for TrainSet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all" => Ok(TrainSet::All),
            "routers" => Ok(TrainSet::Routers),
            "new" => Ok(TrainSet::New),
            "routers+new" => Ok(TrainSet::RoutersNew),
            o => Err(format!("unknown training set `{o}` (all, routers, new, routers+new)")),
        }
    }
}

/// The layer index of a tensor under `model.layers.{l}.`.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// Which layers expansion added, from `config.extra["dlo_provenance"]` (a list of `{layer, source, ...}`
/// where `source` is `original` for base layers).
pub fn new_layers(cfg: &ModelConfig) -> Result<Vec<bool>> {
    let prov = cfg.extra.get("dlo_provenance").ok_or_else(|| {
        TrainError::Invalid(
            "the model's config.json has no `dlo_provenance` (written by `dlo-compile expand`), so which layers \
             are new is unknown; use --train all or --train routers"
                .into(),
        )
    })?;
    let list = prov
        .as_array()
        .ok_or_else(|| TrainError::Invalid("config key `dlo_provenance` is not a list".into()))?;
    if list.len() != cfg.num_hidden_layers {
        return Err(TrainError::Invalid(format!(
            "config key `dlo_provenance` has {} entries but the model has {} layers",
            list.len(),
            cfg.num_hidden_layers
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let src = e.get("source").and_then(|s| s.as_str()).ok_or_else(|| {
                TrainError::Invalid(format!("config key `dlo_provenance`: entry {i} has no string `source`"))
            })?;
            Ok(src != "original")
        })
        .collect()
}

/// A predicate on tensor names.
pub type NameFilter = Box<dyn Fn(&str) -> bool>;

/// The predicate "does tensor `name` train" for `set` on this model.
pub fn trainable_filter(set: TrainSet, cfg: &ModelConfig) -> Result<NameFilter> {
    let is_router = |n: &str| n.starts_with("model.routers.");
    Ok(match set {
        TrainSet::All => Box::new(|_: &str| true),
        TrainSet::Routers => Box::new(move |n: &str| is_router(n)),
        TrainSet::New | TrainSet::RoutersNew => {
            let new = new_layers(cfg)?;
            if !new.iter().any(|x| *x) {
                return Err(TrainError::Invalid(
                    "`dlo_provenance` marks no layer as new; nothing to train with --train new".into(),
                ));
            }
            let routers = set == TrainSet::RoutersNew;
            Box::new(move |n: &str| {
                (routers && is_router(n)) || layer_of(n).is_some_and(|l| new.get(l).copied().unwrap_or(false))
            })
        }
    })
}

/// Whether a tensor gets weight decay: HF Trainer exempts biases and norm weights.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

/// One trainable tensor and its AdamW state.
#[derive(Debug)]
pub struct Param {
    /// HF name.
    pub name: String,
    /// The variable the model computes with (f32, updated in place).
    pub var: Var,
    /// First moment (f32, row-major like the tensor).
    pub m: Vec<f32>,
    /// Second moment (f32).
    pub v: Vec<f32>,
    /// Steps taken by this tensor (bias correction).
    pub steps: u64,
    /// Whether weight decay applies.
    pub decay: bool,
    /// `Some(l)` for tensors under `model.layers.{l}.` (layer-wise LR).
    pub layer: Option<usize>,
}

/// AdamW hyper-parameters (HF defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Trainable tensors, in a fixed order.
    pub params: Vec<Param>,
}

/// The fused AdamW update of one f32 tensor, applied in place to the variable's storage.
struct FusedUpdate<'a> {
    g: &'a [f32],
    m: std::cell::RefCell<&'a mut [f32]>,
    v: std::cell::RefCell<&'a mut [f32]>,
    /// Gradient scale (clipping).
    scale: f32,
    /// 1 − lr·wd.
    keep: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

impl FusedUpdate<'_> {
    fn apply(&self, p: &mut [f32]) {
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        for i in 0..p.len() {
            let g = self.g[i] * self.scale;
            let mi = self.b1 * m[i] + (1.0 - self.b1) * g;
            let vi = self.b2 * v[i] + (1.0 - self.b2) * g * g;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() / self.bc2_sqrt + self.eps;
            p[i] = p[i] * self.keep - self.step_size * mi / denom;
        }
    }
}

impl candle_core::InplaceOp1 for FusedUpdate<'_> {
    fn name(&self) -> &'static str {
        "dlo-adamw"
    }
    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::Msg("AdamW: parameter is not f32".into()));
        };
        let Some((lo, hi)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("AdamW: parameter is not contiguous".into()));
        };
        if hi - lo != self.g.len() {
            return Err(candle_core::Error::Msg(
                "AdamW: gradient size differs from the parameter".into(),
            ));
        }
        self.apply(&mut data[lo..hi]);
        Ok(())
    }
}

impl AdamW {
    /// Fresh state (zero moments) for `vars`, which must be f32.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                if var.dtype() != DType::F32 {
                    return Err(TrainError::Invalid(format!(
                        "trainable tensor `{name}` is {:?}, the optimizer needs f32",
                        var.dtype()
                    )));
                }
                let n = var.elem_count();
                Ok(Param {
                    decay: decays(&name),
                    layer: layer_of(&name),
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    steps: 0,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params })
    }

    /// One update. `grads[i]` is the gradient of `params[i]` (`None`: the tensor is left alone, as torch
    /// skips parameters without a gradient), multiplied by `scale` (the clipping factor) before use;
    /// `lr_of(param)` is its learning rate for this step.
    pub fn step(&mut self, grads: &[Option<Vec<f32>>], scale: f64, lr_of: impl Fn(&Param) -> f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(TrainError::Invalid(
                "gradient list does not match the parameters".into(),
            ));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            if g.len() != p.m.len() {
                return Err(TrainError::Invalid(format!(
                    "gradient of `{}` has the wrong size",
                    p.name
                )));
            }
            let lr = lr_of(p);
            p.steps += 1;
            let bc1 = 1.0 - beta1.powi(p.steps as i32);
            let bc2 = 1.0 - beta2.powi(p.steps as i32);
            let keep = if p.decay { 1.0 - lr * weight_decay } else { 1.0 };
            let upd = FusedUpdate {
                g,
                m: std::cell::RefCell::new(&mut p.m),
                v: std::cell::RefCell::new(&mut p.v),
                scale: scale as f32,
                keep: keep as f32,
                b1: beta1 as f32,
                b2: beta2 as f32,
                eps: eps as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
            };
            let t = p.var.as_tensor();
            if t.device().is_cpu() && t.is_contiguous() {
                t.inplace_op1(&upd)?;
            } else {
                // other devices or layouts: update a host copy and write it back
                let mut host: Vec<f32> = t.flatten_all()?.to_vec1()?;
                upd.apply(&mut host);
                p.var.set(&Tensor::from_vec(host, t.shape(), t.device())?)?;
            }
        }
        Ok(())
    }

    /// Moments by name, for checkpoints: `m.{name}`, `v.{name}` (shaped like the tensors).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            let shape = p.var.shape();
            let dev = candle_core::Device::Cpu;
            out.insert(format!("m.{}", p.name), Tensor::from_slice(&p.m, shape, &dev)?);
            out.insert(format!("v.{}", p.name), Tensor::from_slice(&p.v, shape, &dev)?);
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step counts.
    pub fn load_state(&mut self, t: &HashMap<String, Tensor>, steps: &HashMap<String, u64>) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                t.get(&k)
                    .cloned()
                    .ok_or_else(|| TrainError::Invalid(format!("optimizer state has no `{k}`")))
            };
            let m = get(format!("m.{}", p.name))?;
            let v = get(format!("v.{}", p.name))?;
            if m.dims() != p.var.dims() || v.dims() != p.var.dims() {
                return Err(TrainError::Invalid(format!(
                    "optimizer state of `{}` has shape {:?}, the tensor has {:?}",
                    p.name,
                    m.dims(),
                    p.var.dims()
                )));
            }
            p.m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            p.v = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            p.steps = steps.get(&p.name).copied().unwrap_or(0);
        }
        Ok(())
    }
}

/// Global L2 norm of all gradients (accumulated in f64).
pub fn global_norm(grads: &[Option<Vec<f32>>]) -> f64 {
    grads
        .iter()
        .flatten()
        .map(|g| g.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_`'s factor: `max_norm / (norm + 1e-6)` when that is below 1, else 1
/// (and 1 when clipping is off, `max_norm ≤ 0`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Sums gradients over the micro-batches of one optimizer step (host f32 vectors).
#[derive(Debug, Default)]
pub struct GradAccum {
    /// Summed gradient of each parameter, `None` until one arrives.
    pub grads: Vec<Option<Vec<f32>>>,
}

impl GradAccum {
    /// An empty accumulator for `n` parameters.
    pub fn new(n: usize) -> Self {
        GradAccum { grads: vec![None; n] }
    }

    /// Adds the gradients of one micro-batch's backward pass.
    pub fn add(&mut self, store: &candle_core::backprop::GradStore, params: &[Param]) -> Result<()> {
        for (slot, p) in self.grads.iter_mut().zip(params) {
            if let Some(g) = store.get(p.var.as_tensor()) {
                let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                match slot {
                    Some(s) => s.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                    None => *slot = Some(g),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_then_cosine_matches_hf_values() {
        // total 10, warmup ⌈10·0.2⌉ = 2
        let w = warmup_steps(10, 0.2);
        assert_eq!(w, 2);
        let f: Vec<f64> = (0..10).map(|s| lr_factor(Schedule::Cosine, s, w, 10)).collect();
        assert_eq!(f[0], 0.0);
        assert!((f[1] - 0.5).abs() < 1e-12);
        assert!((f[2] - 1.0).abs() < 1e-12);
        // step 6: progress (6-2)/8 = 0.5 → 0.5
        assert!((f[6] - 0.5).abs() < 1e-12);
        // step 4: progress 0.25 → 0.5(1+cos(π/4))
        assert!((f[4] - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12);
        assert!(f.windows(2).skip(2).all(|p| p[1] < p[0]));
        assert_eq!(lr_factor(Schedule::Constant, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Constant, 7, 2, 10), 1.0);
        assert_eq!(lr_factor(Schedule::Cosine, 0, 0, 10), 1.0);
        assert_eq!(warmup_steps(100, 0.03), 3);
    }

    #[test]
    fn adamw_step_matches_hand_computation() {
        let dev = Device::Cpu;
        let var = Var::from_slice(&[1.0f32, -2.0], 2, &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("model.layers.0.mlp.up_proj.weight".into(), var.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(opt.params[0].layer, Some(0));
        let (b1, b2, eps, lr, wd) = (0.9f64, 0.999f64, 1e-8f64, 0.01f64, 0.1f64);
        let mut p = [1.0f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5f64, -0.25], [0.1, 0.3]].iter().enumerate() {
            opt.step(&[Some(vec![g[0] as f32, g[1] as f32])], 1.0, |_| lr).unwrap();
            let t = t as i32 + 1;
            for i in 0..2 {
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
                p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        // None gradient: untouched
        let before = var.as_tensor().to_vec1::<f32>().unwrap();
        opt.step(&[None], 1.0, |_| lr).unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), before);
        assert_eq!(opt.params[0].steps, 2);
    }

    #[test]
    fn grad_clipping_scales_to_the_max_norm() {
        let g = vec![Some(vec![3f32, 0.0]), None, Some(vec![4f32])];
        let n = global_norm(&g);
        assert!((n - 5.0).abs() < 1e-12);
        assert!((clip_factor(n, 1.0) - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(50.0, 0.0), 1.0);
        // the factor scales the gradient the optimizer sees: with clipping, a step of AdamW on a gradient
        // g·c equals the unclipped step on g·c
        let dev = Device::Cpu;
        let a = Var::from_slice(&[1.0f32, 1.0], 2, &dev).unwrap();
        let b = Var::from_slice(&[1.0f32, 1.0], 2, &dev).unwrap();
        let mut oa = AdamW::new(vec![("w".into(), a.clone())], AdamWConfig::default()).unwrap();
        let mut ob = AdamW::new(vec![("w".into(), b.clone())], AdamWConfig::default()).unwrap();
        for _ in 0..3 {
            oa.step(&[Some(vec![3.0, -4.0])], 0.2, |_| 0.1).unwrap();
            ob.step(&[Some(vec![0.6, -0.8])], 1.0, |_| 0.1).unwrap();
        }
        assert_eq!(
            a.as_tensor().to_vec1::<f32>().unwrap(),
            b.as_tensor().to_vec1::<f32>().unwrap()
        );
        assert_ne!(a.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
    }

    #[test]
    fn train_sets_select_the_right_tensors() {
        let mut cfg = dlo_passes::ModelConfig::from_hf_json(
            &serde_json::json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2}),
            std::path::Path::new("c.json"),
        )
        .unwrap();
        let r = trainable_filter(TrainSet::Routers, &cfg).unwrap();
        assert!(r("model.routers.1.weight") && !r("model.layers.1.mlp.up_proj.weight"));
        let e = trainable_filter(TrainSet::New, &cfg).err().unwrap().to_string();
        assert!(e.contains("dlo_provenance"), "{e}");
        cfg.extra.insert(
            "dlo_provenance".into(),
            serde_json::json!([{"layer": 0, "source": "original"}, {"layer": 1, "source": "copy"},
                {"layer": 2, "source": "original"}]),
        );
        let n = trainable_filter(TrainSet::New, &cfg).unwrap();
        assert!(n("model.layers.1.mlp.up_proj.weight") && !n("model.layers.2.mlp.up_proj.weight"));
        assert!(!n("model.routers.1.weight") && !n("model.embed_tokens.weight"));
        let rn = trainable_filter(TrainSet::RoutersNew, &cfg).unwrap();
        assert!(rn("model.routers.2.weight") && rn("model.layers.1.input_layernorm.weight"));
        assert!(!rn("model.layers.11.mlp.up_proj.weight"));
        assert!(!decays("model.layers.1.input_layernorm.weight") && !decays("model.norm.weight"));
        assert!(decays("model.routers.1.weight") && !decays("model.layers.0.self_attn.q_proj.bias"));
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("model.routers.1.weight"), None);
    }
}
