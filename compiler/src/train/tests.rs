//! Trainer tests. Most drive a small stand-in model ([`Toy`]: embeddings, one tanh unit per layer, DLO
//! routers with the reference's top-k, gate and similarity) so that the loop, resume and checkpoints are
//! tested independently of the Llama model; those marked `needs Model::forward_train` run the real model.

use super::checkpoint::{FileSink, Fs};
use super::data::{Example, Row};
use super::*;
// What the tests used from train/mod.rs's imports before the split.
use super::metrics::{EvalMetrics, EvalRouting, Record};
use super::optim::{AdamWConfig, Schedule, TrainSet};
use candle_core::D;
use candle_core::{DType, Device, Tensor, Var};
use dlo_passes::{Capacity, ModelConfig};
use dlo_runtime::model::train::TrainLayerTrace;
use dlo_runtime::model::train::{TrainOutput, TrainRouting};
use dlo_runtime::model::LayerTrace;
use dlo_runtime::model::{Batch, Model, Routing};
use dlo_runtime::model::{Forward, ForwardOutput};
use dlo_runtime::Backend;
use dlo_runtime::Weights;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A tiny differentiable stand-in with DLO routing (see the module docs).
pub(crate) struct Toy {
    cfg: ModelConfig,
    emb: Tensor,
    head: Tensor,
    units: Vec<Tensor>,
    routers: Vec<Option<Tensor>>,
}

fn sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

impl Toy {
    /// Training routing with `routing`, else inference routing by `eval`; also returns each routed layer's
    /// router logits.
    fn run(
        &self,
        batch: &Batch,
        routing: Option<&TrainRouting>,
        eval: &Routing,
    ) -> dlo_runtime::Result<(TrainOutput, Vec<Option<Vec<f32>>>)> {
        let dev = Device::Cpu;
        let (b, t) = (batch.b, batch.t);
        let ids = Tensor::from_vec(batch.ids.clone(), b * t, &dev)?;
        let mut h = self.emb.index_select(&ids, 0)?; // [bt, d]
        let dlo = self.cfg.dlo.clone();
        let mut layers = Vec::new();
        let mut logits = Vec::new();
        for (l, w) in self.units.iter().enumerate() {
            let delta = h.matmul(&w.t()?)?.tanh()?;
            match (&self.routers[l], &dlo) {
                (Some(r), Some(dlo)) => {
                    let z = h.matmul(&r.t()?)?.reshape((b, t))?;
                    let s = sigmoid(&z)?;
                    let sv: Vec<f32> = s.flatten_all()?.to_vec1()?;
                    let zv: Vec<f32> = z.flatten_all()?.to_vec1()?;
                    let exec = match routing {
                        Some(rt) => loss::topk_select(&sv, &batch.valid, t, rt.capacity[l].min(1.0), rt.per_sequence),
                        None => zv
                            .iter()
                            .zip(&batch.valid)
                            .map(|(z, v)| *v && eval.decide(l, *z))
                            .collect(),
                    };
                    logits.push(Some(zv));
                    let similarity = if routing.is_some_and(|r| r.similarity) {
                        let x = h.detach();
                        let y = (&x + delta.detach())?;
                        let num = (&x * &y)?.sum(D::Minus1)?;
                        let den = (x.sqr()?.sum(D::Minus1)?.sqrt()? * y.sqr()?.sum(D::Minus1)?.sqrt()?)?;
                        Some(
                            (num / (den + 1e-8)?)?
                                .to_dtype(candle_core::DType::F64)?
                                .to_vec1::<f64>()?,
                        )
                    } else {
                        None
                    };
                    let g = ((&s - 0.5)? * dlo.scale_gap)?.affine(1.0, 0.5 * dlo.scale_factor)?;
                    let mask: Vec<f32> = exec.iter().map(|e| *e as u8 as f32).collect();
                    let mask = Tensor::from_vec(mask, (b * t, 1), &dev)?;
                    let gm = (g.reshape((b * t, 1))? * mask)?;
                    h = (&h + delta.broadcast_mul(&gm)?)?;
                    layers.push(Some(TrainLayerTrace {
                        scores: s,
                        exec,
                        similarity,
                    }));
                }
                _ => {
                    h = (&h + delta)?;
                    layers.push(None);
                    logits.push(None);
                }
            }
        }
        let out = h.matmul(&self.head.t()?)?.reshape((b, t, self.cfg.vocab_size))?;
        Ok((TrainOutput { logits: out, layers }, logits))
    }
}

impl Backend for Toy {
    type Cache = ();
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn new_cache(&self) {}
    fn forward(&self, batch: &Batch, _cache: Option<&mut ()>, opts: &Forward) -> dlo_runtime::Result<ForwardOutput> {
        let (out, logits) = self.run(batch, None, &opts.routing)?;
        let trace = out
            .layers
            .into_iter()
            .zip(logits)
            .map(|(l, z)| {
                Some(LayerTrace {
                    logits: z?,
                    exec: l?.exec,
                })
            })
            .collect();
        let t = batch.t;
        let logits = if opts.all_logits {
            out.logits
        } else {
            out.logits.narrow(1, t - 1, 1)?
        };
        Ok(ForwardOutput { logits, trace })
    }
}

impl TrainModel for Toy {
    fn load_trainable(
        cfg: &ModelConfig,
        w: &Weights,
        trainable: &dyn Fn(&str) -> bool,
        device: &Device,
    ) -> dlo_runtime::Result<(Self, Vec<(String, Var)>)> {
        let mut vars = Vec::new();
        let mut get = |name: &str| -> dlo_runtime::Result<Tensor> {
            let shape = w.shape_of(name).unwrap_or_default();
            let t = w.get(name, &shape, DType::F32, device)?;
            Ok(if trainable(name) {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                vars.push((name.to_string(), v));
                t
            } else {
                t
            })
        };
        let emb = get("model.embed_tokens.weight")?;
        let head = get("lm_head.weight")?;
        let mut units = Vec::new();
        let mut routers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            units.push(get(&format!("model.layers.{l}.mlp.up_proj.weight"))?);
            routers.push(if cfg.is_routed(l) {
                Some(get(&format!("model.routers.{l}.weight"))?)
            } else {
                None
            });
        }
        Ok((
            Toy {
                cfg: cfg.clone(),
                emb,
                head,
                units,
                routers,
            },
            vars,
        ))
    }
    fn forward_train(&self, batch: &Batch, routing: &TrainRouting) -> dlo_runtime::Result<TrainOutput> {
        Ok(self.run(batch, Some(routing), &Routing::Reference)?.0)
    }
}

const V: usize = 23;
const DIM: usize = 12;

fn toy_config(loss_type: &str, dlo: bool) -> ModelConfig {
    let mut j = json!({
        "model_type": "llama_dlo_exattn", "vocab_size": V, "hidden_size": DIM, "intermediate_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 2, "is_dlo": [false, true, true],
        "dlo_capacity": 0.8, "dlo_loss_type": loss_type, "dlo_loss_coefficient": 0.5,
        "rescale_hidden_states": true, "scale_factor": 2.0, "scale_gap": 0.05,
        "dlo_provenance": [{"layer": 0, "source": "original"}, {"layer": 1, "source": "copy"},
            {"layer": 2, "source": "original"}]
    });
    if !dlo {
        j["model_type"] = json!("llama");
    }
    ModelConfig::from_hf_json(&j, Path::new("toy/config.json")).unwrap()
}

fn normal(n: usize, std: f32, seed: &mut u64) -> Vec<f32> {
    let mut rng = data::Rng(*seed);
    let v = (0..n)
        .map(|_| {
            let u1 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 + 1e-12;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect();
    *seed = rng.0;
    v
}

fn toy_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    let dev = Device::Cpu;
    let mut s = seed;
    let mut m = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32| {
        let n = shape.iter().product();
        m.insert(name, Tensor::from_vec(normal(n, std, &mut s), shape, &dev).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[V, DIM], 1.0);
    put("lm_head.weight".into(), &[V, DIM], 0.3);
    for l in 0..cfg.num_hidden_layers {
        put(format!("model.layers.{l}.mlp.up_proj.weight"), &[DIM, DIM], 0.4);
        if cfg.is_routed(l) {
            put(format!("model.routers.{l}.weight"), &[1, DIM], 0.5);
        }
    }
    Weights::from_tensors(m, "toy")
}

/// Examples with a learnable pattern: tokens count up by a per-example stride; the second half is the
/// "assistant" part. Lengths vary so that batches need padding.
fn toy_examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let len = 6 + i % 5;
            let stride = 1 + i % 3;
            let ids: Vec<u32> = (0..len).map(|j| ((i + j * stride) % V) as u32).collect();
            let labels = (0..len).map(|j| j >= len / 2).collect();
            Example { ids, labels }
        })
        .collect()
}

fn opts(steps: u64) -> Options {
    Options {
        batch: 3,
        grad_accum: 2,
        seq_len: 32,
        lr: 0.02,
        warmup: 0.2,
        schedule: Schedule::Cosine,
        adamw: AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        max_grad_norm: 1.0,
        steps: Some(steps),
        epochs: 1.0,
        capacity: None,
        anneal_steps: 4,
        train: TrainSet::All,
        eval_every: 2,
        eval_split: 0.0,
        save_every: 3,
        seed: 7,
        per_sequence: false,
        loss_type: None,
        loss_weight: None,
        pack: false,
        dynamic_lr: true,
        router_lr_scale: 1.0,
        eval_routing: vec![EvalRouting::Reference],
        stop_after: None,
        progress: false,
        device: dlo_runtime::DeviceSpec::Cpu,
    }
}

fn setup(cfg: &ModelConfig, seed: u64, out: &Path, resume: Option<PathBuf>, o: Options) -> RunSetup {
    let ex = toy_examples(20);
    RunSetup {
        cfg: cfg.clone(),
        weights: toy_weights(cfg, seed),
        tokenizer_dir: None,
        train: ex[..16].to_vec(),
        eval: ex[16..].to_vec(),
        pad_id: 0,
        output: out.to_path_buf(),
        resume,
        opts: o,
        data_stats: Default::default(),
    }
}

/// Train records without the wall-clock field.
fn curve(dir: &Path) -> Vec<Record> {
    metrics::read_log(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| match r {
            Record::Train(mut s) => {
                s.tokens_per_s = 0.0;
                s.timing = Default::default();
                Record::Train(s)
            }
            e => e,
        })
        .collect()
}

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let cfg = toy_config("cos-global", true);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let sa = train_run::<Toy>(setup(&cfg, 1, &a, None, opts(6)), &mut Fs).unwrap();
    assert!(sa.finished && sa.steps == 6);
    // "killed" after step 4: checkpoint-3 exists, the log has step 4 too
    let sb = train_run::<Toy>(
        setup(
            &cfg,
            1,
            &b,
            None,
            Options {
                stop_after: Some(4),
                ..opts(6)
            },
        ),
        &mut Fs,
    )
    .unwrap();
    assert!(!sb.finished && sb.final_checkpoint.is_none());
    assert!(b.join("checkpoint-3").is_dir() && !b.join("final").exists());
    let sb = train_run::<Toy>(setup(&cfg, 1, &b, Some(b.join("checkpoint-3")), opts(6)), &mut Fs).unwrap();
    assert!(sb.finished);
    let (ca, cb) = (curve(&a), curve(&b));
    assert_eq!(ca.len(), 6 + 4, "6 steps and evals at 0 (before training), 2, 4, 6");
    assert!(matches!(&ca[0], Record::Eval(e) if e.step == 0), "{:?}", ca[0]);
    assert_eq!(ca, cb);
    // the final models are bit-identical, and cos-global saved a per-layer capacity list
    let fa = std::fs::read(a.join("final/model.safetensors")).unwrap();
    assert_eq!(fa, std::fs::read(b.join("final/model.safetensors")).unwrap());
    let cj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("final/config.json")).unwrap()).unwrap();
    let caps = cj["dlo_capacity"].as_array().unwrap();
    assert!(caps[0].is_null() && caps[1].is_f64() && caps[2].is_f64(), "{caps:?}");
    let mean = (caps[1].as_f64().unwrap() + caps[2].as_f64().unwrap()) / 2.0;
    assert!((mean - 0.8).abs() < 0.1, "annealed to 0.8 and re-allocated: {caps:?}");
    // the saved checkpoint is a loadable HF model of the same config
    let back = ModelConfig::from_hf_file(&a.join("final/config.json")).unwrap();
    assert_eq!(back.num_hidden_layers, 3);
    assert!(a.join("plot.svg").is_file() && a.join("summary.json").is_file());
    // a different seed gives a different curve (the comparison above can fail)
    let c = d.path().join("c");
    train_run::<Toy>(setup(&cfg, 1, &c, None, Options { seed: 8, ..opts(6) }), &mut Fs).unwrap();
    assert_ne!(curve(&c), ca);
}

#[test]
fn resume_refuses_another_model_other_data_and_an_occupied_output() {
    let d = tempfile::tempdir().unwrap();
    let cfg = toy_config("cos-global", true);
    let a = d.path().join("a");
    train_run::<Toy>(setup(&cfg, 1, &a, None, opts(3)), &mut Fs).unwrap();
    // same architecture, other weights
    let e = train_run::<Toy>(setup(&cfg, 2, &a, Some(a.join("final")), opts(3)), &mut Fs)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different model"), "{e}");
    // another architecture
    let other = toy_config("cos", false);
    let e = train_run::<Toy>(setup(&other, 1, &a, Some(a.join("final")), opts(3)), &mut Fs)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("different model") && e.contains("DLO"), "{e}");
    // other data settings
    let e = train_run::<Toy>(
        setup(&cfg, 1, &a, Some(a.join("final")), Options { batch: 2, ..opts(3) }),
        &mut Fs,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("data"), "{e}");
    // a fresh run into a directory holding a run
    let e = train_run::<Toy>(setup(&cfg, 1, &a, None, opts(3)), &mut Fs)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("already holds a training run"), "{e}");
}

/// Fails every write after the first `n` files, like a disk that fills up.
struct DiskFull(usize);
impl FileSink for DiskFull {
    fn write(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if self.0 == 0 {
            return Err(std::io::Error::other("No space left on device (simulated)"));
        }
        self.0 -= 1;
        Fs.write(path, bytes)
    }
}

#[test]
fn disk_full_during_a_run_keeps_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let cfg = toy_config("self", true);
    let out = d.path().join("run");
    // checkpoint-3 takes 4 files (config, model, state x2); the final save then fails
    let e = train_run::<Toy>(setup(&cfg, 1, &out, None, opts(6)), &mut DiskFull(5))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("No space left"), "{e}");
    assert!(!out.join("final").exists());
    let temps: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".final.tmp-"))
        .collect();
    assert!(temps.is_empty(), "temporary directories left behind: {temps:?}");
    let l = checkpoint::load(&out.join("checkpoint-3"), "x", "x")
        .err()
        .unwrap()
        .to_string();
    assert!(l.contains("different model"), "the checkpoint is readable: {l}");
    // and the run resumes from it
    let s = train_run::<Toy>(setup(&cfg, 1, &out, Some(out.join("checkpoint-3")), opts(6)), &mut Fs).unwrap();
    assert!(s.finished);
}

fn trainer(cfg: &ModelConfig, o: Options) -> Trainer<Toy> {
    Trainer::new(cfg.clone(), toy_weights(cfg, 3), toy_examples(16), 0, o).unwrap()
}

#[test]
fn training_lowers_held_out_loss_for_every_loss_type_and_dense() {
    for (lt, dlo) in [("self", true), ("cos", true), ("cos-global", true), ("self", false)] {
        let cfg = toy_config(lt, dlo);
        let mut t = trainer(
            &cfg,
            Options {
                steps: Some(40),
                lr: 0.05,
                anneal_steps: 0,
                ..opts(40)
            },
        );
        let held = toy_examples(24)[16..].to_vec();
        let before = t.evaluate(&held, EvalRouting::Reference).unwrap().loss;
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..40 {
            let m = t.train_step().unwrap();
            first.get_or_insert(m.ce);
            last = m.ce;
            if dlo {
                assert!(m.route > 0.0 && m.exec.iter().flatten().count() == 2);
            } else {
                assert_eq!(m.route, 0.0);
            }
        }
        let after = t.evaluate(&held, EvalRouting::Reference).unwrap().loss;
        assert!(after < before && last < first.unwrap(), "{lt}: {before} → {after}");
    }
}

/// Loss of one micro-batch with the capacities restored afterwards (labels must not drift).
fn loss_at(t: &mut Trainer<Toy>, batch: &Batch, tg: &[Option<u32>]) -> f64 {
    let caps = t.caps.clone();
    let v = t.micro(batch, tg).unwrap().total.to_scalar::<f32>().unwrap() as f64;
    t.caps = caps;
    v
}

#[test]
fn gradient_matches_finite_differences_for_lm_and_routing_loss() {
    for (lt, lambda) in [("cos-global", 0.0), ("cos-global", 1.0), ("self", 1.0)] {
        let cfg = toy_config(lt, true);
        let mut t = trainer(
            &cfg,
            Options {
                loss_weight: Some(lambda),
                anneal_steps: 0,
                ..opts(4)
            },
        );
        let rows: Vec<Row> = toy_examples(4)
            .into_iter()
            .map(|e| Row {
                ids: e.ids,
                labels: e.labels,
            })
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        let (batch, tg) = data::make_batch(&refs, 0);
        let caps = t.caps.clone();
        let out = t.micro(&batch, &tg).unwrap();
        t.caps = caps;
        let grads = out.total.backward().unwrap();
        for name in ["model.routers.1.weight", "model.embed_tokens.weight", "lm_head.weight"] {
            let p = t.opt.params.iter().find(|p| p.name == name).unwrap();
            let var = p.var.clone();
            let g: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let dims = var.dims().to_vec();
            // the three largest gradient entries
            let mut idx: Vec<usize> = (0..g.len()).collect();
            idx.sort_by(|a, b| g[*b].abs().total_cmp(&g[*a].abs()));
            for &i in &idx[..3] {
                let eps = 1e-2f32;
                let mut fd = [0f64; 2];
                for (k, sgn) in [1f32, -1.0].iter().enumerate() {
                    let mut w = base.clone();
                    w[i] += sgn * eps;
                    var.set(&Tensor::from_vec(w, dims.as_slice(), &Device::Cpu).unwrap())
                        .unwrap();
                    fd[k] = loss_at(&mut t, &batch, &tg);
                }
                var.set(&Tensor::from_vec(base.clone(), dims.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                let num = (fd[0] - fd[1]) / (2.0 * eps as f64);
                let ana = g[i] as f64;
                assert!(
                    (num - ana).abs() <= 0.03 * ana.abs().max(1e-3) + 2e-4,
                    "{lt} λ={lambda} {name}[{i}]: analytic {ana} vs numeric {num}"
                );
            }
        }
    }
}

#[test]
fn routers_only_training_leaves_everything_else_untouched() {
    let cfg = toy_config("cos-global", true);
    let mut t = trainer(
        &cfg,
        Options {
            train: TrainSet::Routers,
            ..opts(3)
        },
    );
    let names: Vec<&str> = t.opt.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["model.routers.1.weight", "model.routers.2.weight"]);
    let before: Vec<Vec<f32>> = t
        .opt
        .params
        .iter()
        .map(|p| p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    t.train_step().unwrap();
    t.train_step().unwrap();
    for (p, b) in t.opt.params.iter().zip(before) {
        assert_ne!(
            p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b,
            "{}",
            p.name
        );
    }
    let saved = t.tensors().unwrap();
    let emb = saved.iter().find(|(n, _)| n == "model.embed_tokens.weight").unwrap();
    let orig = toy_weights(&cfg, 3)
        .get("model.embed_tokens.weight", &[V, DIM], DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(
        emb.1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        orig.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let t = trainer(
        &cfg,
        Options {
            train: TrainSet::New,
            ..opts(3)
        },
    );
    let names: Vec<&str> = t.opt.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["model.layers.1.mlp.up_proj.weight"]);
}

#[test]
fn dlo_config_without_routed_layers_trains_as_dense() {
    let mut cfg = toy_config("cos-global", true);
    cfg.dlo.as_mut().unwrap().is_dlo = vec![false; 3];
    let mut t = trainer(&cfg, opts(2));
    assert!(t.caps.is_none());
    let m = t.train_step().unwrap();
    assert_eq!((m.route, m.exec_rate), (0.0, 1.0));
    assert!(m.exec.iter().all(Option::is_none));
    let e = Trainer::<Toy>::new(
        cfg.clone(),
        toy_weights(&cfg, 3),
        toy_examples(4),
        0,
        Options {
            loss_weight: Some(1.0),
            ..opts(2)
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("no routed layer"), "{e}");
}

#[test]
fn router_lr_scale_multiplies_only_the_routers_step() {
    let cfg = toy_config("cos-global", true);
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let deltas = |scale: f64| -> HashMap<String, f64> {
        let mut t = trainer(
            &cfg,
            Options {
                router_lr_scale: scale,
                warmup: 0.0,
                schedule: Schedule::Constant,
                ..opts(5)
            },
        );
        let before: Vec<Vec<f32>> = t.opt.params.iter().map(|p| flat(p.var.as_tensor())).collect();
        t.train_step().unwrap();
        t.opt
            .params
            .iter()
            .zip(before)
            .map(|(p, b)| {
                let a = flat(p.var.as_tensor());
                let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
                (p.name.clone(), d)
            })
            .collect()
    };
    let (one, ten) = (deltas(1.0), deltas(10.0));
    let mut routers = 0;
    for (name, d1) in &one {
        let d10 = ten[name];
        if name.starts_with("model.routers.") {
            routers += 1;
            assert!(*d1 > 0.0 && (d10 / d1 - 10.0).abs() < 1e-3, "{name}: {d1} vs {d10}");
        } else {
            assert_eq!(*d1, d10, "{name}");
        }
    }
    assert_eq!(routers, 2);
}

#[test]
fn dynamic_lr_scales_layers_by_their_capacity() {
    let cfg = toy_config("cos-global", true);
    let mut t = trainer(
        &cfg,
        Options {
            anneal_steps: 0,
            ..opts(5)
        },
    );
    assert_eq!(t.lr_ratios, vec![1.0; 3]);
    t.train_step().unwrap();
    let c = t.caps.as_ref().unwrap().capacity_list();
    let mean = (c[1].unwrap() + c[2].unwrap()) / 2.0;
    assert!((mean - 0.8).abs() < 0.05, "{c:?}");
    let want = [1.0, c[1].unwrap() + 1.0 - mean, c[2].unwrap() + 1.0 - mean];
    for (g, w) in t.lr_ratios.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{:?} vs {want:?}", t.lr_ratios);
    }
}

// ---- the real Llama/DLO model (Model::forward_train) ----

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train_step")
}

fn fixture_model() -> (ModelConfig, Weights) {
    let dir = fixture_dir();
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let f = dir.join("model.safetensors");
    let w = Weights::from_safetensors(std::slice::from_ref(&f), &f).unwrap();
    (cfg, w)
}

fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f64, |a, x| a.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale.max(1e-6),
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

/// `scripts/train_step_reference.py` computed one step in PyTorch (float64); we reproduce it in f32.
#[test]
fn one_training_step_reproduces_the_pytorch_reference() {
    let dir = fixture_dir();
    let batch_j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("batch.json")).unwrap()).unwrap();
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let pad = batch_j["pad_id"].as_u64().unwrap() as u32;
    let rows: Vec<Row> = batch_j["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Row {
            ids: r["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
            labels: r["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_bool().unwrap())
                .collect(),
        })
        .collect();
    let o = &batch_j["optimizer"];
    let (cfg, w) = fixture_model();
    let examples: Vec<Example> = rows
        .iter()
        .map(|r| Example {
            ids: r.ids.clone(),
            labels: r.labels.clone(),
        })
        .collect();
    let mut t: Trainer<Model> = Trainer::new(
        cfg,
        w,
        examples,
        pad,
        Options {
            batch: rows.len(),
            grad_accum: 1,
            lr: o["lr"].as_f64().unwrap(),
            warmup: 0.0,
            schedule: Schedule::Constant,
            adamw: AdamWConfig {
                weight_decay: o["weight_decay"].as_f64().unwrap(),
                ..Default::default()
            },
            max_grad_norm: o["max_grad_norm"].as_f64().unwrap(),
            anneal_steps: 0,
            ..opts(1)
        },
    )
    .unwrap();
    // forward, labels, losses and gradients of the micro-batch
    let refs: Vec<&Row> = rows.iter().collect();
    let (batch, targets) = data::make_batch(&refs, pad);
    let caps = t.caps.clone();
    let mo = t.micro(&batch, &targets).unwrap();
    t.caps = caps;
    assert!(
        (mo.ce - exp["ce"].as_f64().unwrap()).abs() < 1e-4,
        "CE {} vs {}",
        mo.ce,
        exp["ce"]
    );
    assert!(
        (mo.route - exp["route_loss"].as_f64().unwrap()).abs() < 1e-4,
        "BCE {} vs {}",
        mo.route,
        exp["route_loss"]
    );
    let labels = mo.labels.as_ref().unwrap();
    let grads = mo.total.backward().unwrap();
    let grad_of = |name: &str| -> Vec<f64> {
        let p = t.opt.params.iter().find(|p| p.name == name).unwrap();
        grads
            .get(p.var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| *x as f64)
            .collect()
    };
    for le in exp["layers"].as_array().unwrap() {
        let l = le["layer"].as_u64().unwrap() as usize;
        let want_z = json_f64s(&le["labels"]);
        let got_z: Vec<f64> = labels.z[l].as_ref().unwrap().iter().map(|x| *x as f64).collect();
        assert_eq!(got_z, want_z, "labels of layer {l}");
        let want_exec: Vec<bool> = le["exec"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_bool().unwrap())
            .collect();
        let rate = want_exec.iter().filter(|e| **e).count() as f64 / exp["n_real"].as_f64().unwrap();
        assert!(
            (mo.exec[l].unwrap() - rate).abs() < 1e-12,
            "selection size of layer {l}"
        );
        close(
            &grad_of(&format!("model.routers.{l}.weight")),
            &json_f64s(&le["router_grad"]),
            2e-3,
            "router grad",
        );
    }
    let lm: Vec<f64> = grad_of("lm_head.weight")[..cfg_hidden(&t)].to_vec();
    close(&lm, &json_f64s(&exp["lm_head_grad_row0"]), 2e-3, "lm_head grad row 0");
    let d = cfg_hidden(&t);
    let emb: Vec<f64> = grad_of("model.embed_tokens.weight")[d..2 * d].to_vec();
    close(&emb, &json_f64s(&exp["embed_grad_row1"]), 2e-3, "embedding grad row 1");
    // the optimizer step: grad norm, clipped AdamW update of the routers, re-allocated capacities
    let (m, _) = t.step_on(std::slice::from_ref(&rows)).unwrap();
    let gn = exp["grad_norm"].as_f64().unwrap();
    assert!(
        (m.grad_norm - gn).abs() < 1e-3 * gn,
        "grad norm {} vs {gn}",
        m.grad_norm
    );
    let caps = t.caps.as_ref().unwrap().capacity_list();
    for le in exp["layers"].as_array().unwrap() {
        let l = le["layer"].as_u64().unwrap() as usize;
        let p = t
            .opt
            .params
            .iter()
            .find(|p| p.name == format!("model.routers.{l}.weight"))
            .unwrap();
        let after: Vec<f64> = p
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| *x as f64)
            .collect();
        let want = json_f64s(&le["router_after"]);
        for (g, w) in after.iter().zip(&want) {
            assert!((g - w).abs() < 2e-6, "router {l} after the step: {g} vs {w}");
        }
        assert!((caps[l].unwrap() - le["realised_capacity"].as_f64().unwrap()).abs() < 1e-12);
    }
}

fn cfg_hidden(t: &Trainer<Model>) -> usize {
    t.cfg.hidden_size
}

#[test]
fn every_trainable_tensor_receives_a_gradient() {
    for skip in [dlo_passes::SkipKind::Mlp, dlo_passes::SkipKind::Layer] {
        for lt in ["self", "cos", "cos-global"] {
            let (mut cfg, w) = fixture_model();
            if let Some(d) = cfg.dlo.as_mut() {
                d.skip = skip;
            }
            let ex: Vec<Example> = toy_examples(8);
            let mut t: Trainer<Model> = Trainer::new(
                cfg,
                w,
                ex,
                2,
                Options {
                    loss_type: dlo_passes::LossType::parse(lt),
                    ..opts(1)
                },
            )
            .unwrap();
            let rows: Vec<Row> = toy_examples(3)
                .into_iter()
                .map(|e| Row {
                    ids: e.ids,
                    labels: e.labels,
                })
                .collect();
            let refs: Vec<&Row> = rows.iter().collect();
            let (batch, tg) = data::make_batch(&refs, 2);
            let mo = t.micro(&batch, &tg).unwrap();
            let grads = mo.total.backward().unwrap();
            let n_layers = t.cfg.num_hidden_layers;
            assert!(t.opt.params.len() >= 9 * n_layers + 3);
            for p in &t.opt.params {
                let g = grads
                    .get(p.var.as_tensor())
                    .unwrap_or_else(|| panic!("{skip:?} {lt}: no gradient for {}", p.name));
                let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(n > 0.0 && n.is_finite(), "{skip:?} {lt}: zero gradient for {}", p.name);
            }
        }
    }
}

#[test]
fn real_model_resume_continues_exactly() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, _) = fixture_model();
    let mk = |out: &Path, resume: Option<PathBuf>, o: Options| {
        let (cfg, w) = fixture_model();
        let ex = toy_examples(14);
        RunSetup {
            cfg,
            weights: w,
            tokenizer_dir: None,
            train: ex[..12].to_vec(),
            eval: ex[12..].to_vec(),
            pad_id: 2,
            output: out.to_path_buf(),
            resume,
            opts: o,
            data_stats: Default::default(),
        }
    };
    let o = Options {
        save_every: 2,
        eval_every: 2,
        lr: 5e-3,
        ..opts(4)
    };
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    train_run::<Model>(mk(&a, None, o.clone()), &mut Fs).unwrap();
    train_run::<Model>(
        mk(
            &b,
            None,
            Options {
                stop_after: Some(3),
                ..o.clone()
            },
        ),
        &mut Fs,
    )
    .unwrap();
    train_run::<Model>(mk(&b, Some(b.join("checkpoint-2")), o), &mut Fs).unwrap();
    assert_eq!(curve(&a), curve(&b));
    assert_eq!(
        std::fs::read(a.join("final/model.safetensors")).unwrap(),
        std::fs::read(b.join("final/model.safetensors")).unwrap()
    );
    // the written checkpoint loads as a model again, with the per-layer capacity list
    let back = ModelConfig::from_hf_file(&a.join("final/config.json")).unwrap();
    assert!(matches!(back.dlo.as_ref().unwrap().capacity, Capacity::PerLayer(_)));
    assert_eq!(back.num_hidden_layers, cfg.num_hidden_layers);
    let f = a.join("final/model.safetensors");
    let w = Weights::from_safetensors(std::slice::from_ref(&f), &f).unwrap();
    Model::load(&back, &w, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn out_of_range_settings_are_refused_with_the_flag_named() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }
    let parse = |extra: &[&str]| -> Result<Options> {
        use clap::Parser;
        let base = ["train", "model", "--data", "d.jsonl", "-o", "out"];
        Cli::try_parse_from(base.iter().chain(extra)).unwrap().args.options()
    };
    assert!(parse(&[]).is_ok());
    for (flags, named) in [
        (&["--batch", "0"][..], "--batch"),
        (&["--seq-len", "1"], "--seq-len"),
        (&["--lr=-1"], "--lr"),
        (&["--warmup", "1"], "--warmup"),
        (&["--capacity", "0"], "--capacity"),
        (&["--capacity", "1.5"], "--capacity"),
        (&["--steps", "0"], "--steps"),
        (&["--eval-split=-0.1"], "--eval-split"),
        (&["--router-lr-scale", "0"], "--router-lr-scale"),
        (&["--router-lr-scale", "inf"], "--router-lr-scale"),
        (&["--loss-type", "cosine"], "--loss-type"),
    ] {
        let e = parse(flags).unwrap_err().to_string();
        assert!(e.contains(named), "{flags:?}: {e}");
    }
    // --eval-routing: rules are listed once each, in order; unknown ones are refused by the parser, and an empty
    // list (which only a library caller can build) by options()
    let o = parse(&["--eval-routing", "capacity,reference,capacity"]).unwrap();
    assert_eq!(o.eval_routing, vec![EvalRouting::Capacity, EvalRouting::Reference]);
    use clap::Parser;
    let base = ["train", "model", "--data", "d.jsonl", "-o", "out"];
    let e = Cli::try_parse_from(base.iter().chain(&["--eval-routing", "sometimes"]));
    assert!(e.is_err_and(|e| e.to_string().contains("--eval-routing")));
    let mut a = Cli::try_parse_from(base).unwrap().args;
    a.eval_routing.clear();
    let e = a.options().unwrap_err().to_string();
    assert!(e.contains("--eval-routing needs at least one rule"), "{e}");
}

#[test]
fn capacity_eval_routing_executes_each_layers_capacity() {
    let cfg = toy_config("cos-global", true);
    let mut t = trainer(
        &cfg,
        Options {
            anneal_steps: 0,
            ..opts(4)
        },
    );
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    let caps = vec![None, Some(0.9), Some(0.4)];
    t.caps.as_mut().unwrap().capacity = Capacity::PerLayer(caps.clone());
    // The toy's routing is per token (no attention), so on the calibration tokens themselves (the training
    // examples) each layer executes its capacity up to rounding.
    let train = toy_examples(16);
    let e = t.evaluate(&train, EvalRouting::Capacity).unwrap();
    assert_eq!(e.routing, EvalRouting::Capacity);
    for (l, (r, c)) in e.exec.iter().zip(&caps).enumerate().skip(1) {
        let (r, c) = (r.unwrap(), c.unwrap());
        assert!((r - c).abs() <= 0.02, "layer {l}: rate {r}, capacity {c}");
    }
    // The reference rule follows the routers' signs instead, so it gives other rates.
    let r = t.evaluate(&train, EvalRouting::Reference).unwrap();
    assert_ne!(r.exec, e.exec);
    // A dense model has nothing to calibrate: the capacity rule is the reference rule.
    let dense = toy_config("self", false);
    let t = trainer(&dense, opts(4));
    let held = toy_examples(24)[16..].to_vec();
    assert_eq!(
        t.evaluate(&held, EvalRouting::Capacity).unwrap().loss,
        t.evaluate(&held, EvalRouting::Reference).unwrap().loss
    );
}

#[test]
fn run_logs_every_eval_routing_and_summarises_the_first() {
    let cfg = toy_config("cos-global", true);
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        eval_routing: vec![EvalRouting::Capacity, EvalRouting::Reference],
        ..opts(4)
    };
    let s = train_run::<Toy>(setup(&cfg, 1, dir.path(), None, o), &mut Fs).unwrap();
    let evals: Vec<EvalMetrics> = metrics::read_log(&dir.path().join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some(e),
            _ => None,
        })
        .collect();
    let of = |rule| -> Vec<u64> { evals.iter().filter(|e| e.routing == rule).map(|e| e.step).collect() };
    assert_eq!(of(EvalRouting::Capacity), vec![0, 2, 4]);
    assert_eq!(of(EvalRouting::Reference), vec![0, 2, 4]);
    assert_eq!(s.eval_routing, EvalRouting::Capacity);
    let last_cap = evals.iter().rfind(|e| e.routing == EvalRouting::Capacity).unwrap();
    assert_eq!(s.eval_loss_last, Some(last_cap.loss));
    let svg = std::fs::read_to_string(dir.path().join("plot.svg")).unwrap();
    assert!(svg.contains("held-out CE (capacity)") && svg.contains("held-out CE (reference)"));
}
