//! Sampling and the generation loop.
//!
//! [`Generator`] owns a KV cache (of any [`Backend`]) and runs prefill then one decode step per token, streaming each token to a
//! callback that may stop generation. Routing statistics (tokens executed per routed layer) accumulate as it
//! goes, so callers can report the realised execution rate.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Batch, Forward, ForwardOutput, Model, Routing};
use candle_core::{DType, IndexOp, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability mass reaches p (1.0 = no limit).
    pub top_p: f32,
    /// RNG seed (sampling is deterministic for a given seed).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A seeded token sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its own RNG seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| ((l - max) / p.temperature).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let u: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, x) in probs.iter().enumerate() {
            acc += x;
            if u < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// At most this many new tokens; 0 = no limit (until a stop token, the callback, or the context is
    /// full), as in the C ABI.
    pub max_tokens: usize,
    /// Token ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Routing rule for routed layers.
    pub routing: Routing,
}

impl GenerateParams {
    /// Whether `n` new tokens reach [`Self::max_tokens`].
    fn reached_max(&self, n: usize) -> bool {
        self.max_tokens != 0 && n >= self.max_tokens
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            stop_tokens: vec![],
            sampling: SamplingParams::default(),
            routing: Routing::Reference,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced.
    StopToken,
    /// `max_tokens` reached.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
    /// The model's context length was reached.
    ContextFull,
}

/// Per-layer routing counters over a generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingStats {
    /// Per layer: (executed tokens, routed tokens); `None` for dense layers.
    pub layers: Vec<Option<(u64, u64)>>,
}

impl RoutingStats {
    /// Adds one forward pass's trace (real tokens only).
    pub fn add(&mut self, out: &ForwardOutput, valid: &[bool]) {
        self.add_rows(out, valid, 0..valid.len());
    }

    /// Adds the tokens `rows` (indices into the flattened batch) of one forward pass's trace.
    pub fn add_rows(&mut self, out: &ForwardOutput, valid: &[bool], rows: std::ops::Range<usize>) {
        let exec_of = |tr: &crate::model::LayerTrace| rows.clone().filter(|&r| valid[r] && tr.exec[r]).count() as u64;
        let n = rows.clone().filter(|&r| valid[r]).count() as u64;
        if self.layers.len() < out.trace.len() {
            self.layers.resize(out.trace.len(), None);
        }
        for (slot, tr) in self.layers.iter_mut().zip(&out.trace) {
            if let Some(tr) = tr {
                let (se, sn) = slot.unwrap_or((0, 0));
                *slot = Some((se + exec_of(tr), sn + n));
            }
        }
    }

    /// Per-layer execution rate (`None` for dense layers).
    pub fn rates(&self) -> Vec<Option<f64>> {
        self.layers
            .iter()
            .map(|s| s.map(|(e, n)| if n == 0 { 0.0 } else { e as f64 / n as f64 }))
            .collect()
    }

    /// Mean execution rate over routed layers (1.0 when there are none).
    pub fn mean_rate(&self) -> f64 {
        let r: Vec<f64> = self.rates().into_iter().flatten().collect();
        if r.is_empty() {
            1.0
        } else {
            r.iter().sum::<f64>() / r.len() as f64
        }
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens (without the prompt and without the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Wall time of the prefill.
    pub prefill_time: Duration,
    /// Wall time of the decode steps.
    pub decode_time: Duration,
    /// Routing counters over prompt and generated tokens.
    pub routing: RoutingStats,
    /// Routing counters of the prefill alone (the FLOPs counter needs the split, see [`crate::flops`]).
    pub prefill_routing: RoutingStats,
}

impl Generation {
    /// Decode steps run: every emitted token is fed back except the last, unless generation ended on a stop
    /// token (then the last emitted token was fed back and produced the stop token).
    pub fn decode_steps(&self) -> usize {
        match self.stop {
            StopReason::StopToken => self.tokens.len(),
            _ => self.tokens.len().saturating_sub(1),
        }
    }
}

/// Generates text for one sequence with a KV cache, on any [`Backend`] (the native [`Model`] by default).
pub struct Generator<'m, B: Backend = Model> {
    model: &'m B,
    cache: B::Cache,
    sampler: Sampler,
    params: GenerateParams,
    pos: u32,
    last_logits: Option<Tensor>,
    /// Every id processed so far (for the diagnosis after non-finite logits).
    history: Vec<u32>,
}

/// The most tokens the diagnosis after non-finite logits re-runs (the latest ones).
const DIAGNOSIS_WINDOW: usize = 1024;

/// `row` (the logits of position `position`) when every value is finite; otherwise the error naming the
/// position and, from a dense re-run over the end of `history` (the ids up to that position, at most
/// [`DIAGNOSIS_WINDOW`] of them), the first layer whose output is not finite. The check is one pass over a vocabulary-sized row per sampled token.
fn finite_row<B: Backend>(
    model: &B,
    row: Vec<f32>,
    position: usize,
    history: impl FnOnce() -> Vec<u32>,
) -> Result<Vec<f32>> {
    if row.iter().all(|x| x.is_finite()) {
        return Ok(row);
    }
    // A window of the latest tokens keeps the diagnosis's own (unchunked, dense) pass small.
    let ids = history();
    let layer = model.first_non_finite_layer(&ids[ids.len().saturating_sub(DIAGNOSIS_WINDOW)..])?;
    let cause = match layer {
        Some(l) => format!(
            "the output of decoder layer {l} is the first that is not finite (on a dense re-run of the latest \
             tokens); check that layer's weights and the model's norm and RoPE settings"
        ),
        None => "no decoder layer output is non-finite on a dense re-run: the final norm or lm_head produced \
                 them, or the routed path did"
            .into(),
    };
    Err(Error::NonFiniteLogits { position, layer, cause })
}

impl<'m, B: Backend> Generator<'m, B> {
    /// A generator with an empty cache.
    pub fn new(model: &'m B, params: GenerateParams) -> Result<Self> {
        params.sampling.validate()?;
        Ok(Generator {
            model,
            cache: model.new_cache(),
            sampler: Sampler::new(params.sampling.clone()),
            params,
            pos: 0,
            last_logits: None,
            history: Vec::new(),
        })
    }

    /// Logits of the last processed position (`[vocab]`, f32), if any.
    pub fn last_logits(&self) -> Option<&Tensor> {
        self.last_logits.as_ref()
    }

    fn step(&mut self, ids: &[u32], stats: &mut RoutingStats) -> Result<u32> {
        let ctx = self.model.config().max_position_embeddings;
        if self.pos as usize + ids.len() > ctx {
            return Err(Error::InvalidArgument(format!(
                "{} tokens exceed the context length {ctx}",
                self.pos as usize + ids.len()
            )));
        }
        let batch = Batch::single(ids, self.pos);
        let fwd = Forward {
            routing: self.params.routing.clone(),
            all_logits: false,
        };
        let out = self.model.forward(&batch, Some(&mut self.cache), &fwd)?;
        stats.add(&out, &batch.valid);
        self.pos += ids.len() as u32;
        self.history.extend_from_slice(ids);
        // f32 for sampling (an f64 verification model's logits are f64).
        let logits = out.logits.i((0, 0))?.to_dtype(DType::F32)?;
        let row = finite_row(self.model, logits.to_vec1()?, self.pos as usize - 1, || {
            self.history.clone()
        })?;
        self.last_logits = Some(logits);
        Ok(self.sampler.sample(&row))
    }

    /// Runs prefill on `prompt` and decodes until a stop condition; `on_token` sees each new token and may
    /// return `ControlFlow::Break(())` to stop.
    pub fn generate(&mut self, prompt: &[u32], mut on_token: impl FnMut(u32) -> ControlFlow<()>) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        let mut stats = RoutingStats::default();
        let ctx = self.model.config().max_position_embeddings;
        let t0 = Instant::now();
        let mut next = self.step(prompt, &mut stats)?;
        let prefill_time = t0.elapsed();
        let prefill_routing = stats.clone();
        let t1 = Instant::now();
        let mut tokens = Vec::new();
        let stop = loop {
            if self.params.stop_tokens.contains(&next) {
                break StopReason::StopToken;
            }
            tokens.push(next);
            if on_token(next).is_break() {
                break StopReason::Callback;
            }
            if self.params.reached_max(tokens.len()) {
                break StopReason::MaxTokens;
            }
            if self.pos as usize >= ctx {
                break StopReason::ContextFull;
            }
            next = self.step(&[next], &mut stats)?;
        };
        Ok(Generation {
            tokens,
            stop,
            prompt_tokens: prompt.len(),
            prefill_time,
            decode_time: t1.elapsed(),
            routing: stats,
            prefill_routing,
        })
    }
}

/// Generates for several prompts at once: one left-padded prefill, then batched decode steps in which each
/// sequence routes its own tokens. Finished sequences stop contributing (their slots are padding).
/// Sequence i samples with its own sampler seeded from `params.sampling.seed`, so each result equals
/// a single-sequence [`Generator`] run with the same parameters.
pub fn generate_batch<B: Backend>(model: &B, prompts: &[Vec<u32>], params: &GenerateParams) -> Result<Vec<Generation>> {
    params.sampling.validate()?;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidArgument("every prompt needs at least one token".into()));
    }
    let ctx = model.config().max_position_embeddings;
    if let Some(p) = prompts.iter().find(|p| p.len() > ctx) {
        return Err(Error::InvalidArgument(format!(
            "{} tokens exceed the context length {ctx}",
            p.len()
        )));
    }
    let n = prompts.len();
    let mut cache = model.new_cache();
    let mut samplers: Vec<Sampler> = (0..n).map(|_| Sampler::new(params.sampling.clone())).collect();
    let mut stats: Vec<RoutingStats> = vec![RoutingStats::default(); n];
    let fwd = Forward {
        routing: params.routing.clone(),
        all_logits: false,
    };
    let t0 = Instant::now();
    let batch = Batch::left_padded(prompts, 0);
    let out = model.forward(&batch, Some(&mut cache), &fwd)?;
    let t = batch.t;
    for (i, st) in stats.iter_mut().enumerate() {
        st.add_rows(&out, &batch.valid, i * t..(i + 1) * t);
    }
    let prefill_time = t0.elapsed();
    let mut prefill_stats = stats.clone();
    let t1 = Instant::now();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    // The logits row of prompt `i` at position `p`, checked to be finite.
    let row = |out: &ForwardOutput, i: usize, p: u32, tokens: &[u32]| -> Result<Vec<f32>> {
        let v = out.logits.i((i, 0))?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        finite_row(model, v, p as usize, || [&prompts[i][..], tokens].concat())
    };
    let mut next: Vec<u32> = (0..n)
        .map(|i| Ok(samplers[i].sample(&row(&out, i, prompts[i].len() as u32 - 1, &[])?)))
        .collect::<Result<_>>()?;
    let mut pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut stop: Vec<Option<StopReason>> = vec![None; n];
    loop {
        for i in 0..n {
            if stop[i].is_some() {
                continue;
            }
            if params.stop_tokens.contains(&next[i]) {
                stop[i] = Some(StopReason::StopToken);
                continue;
            }
            tokens[i].push(next[i]);
            if params.reached_max(tokens[i].len()) {
                stop[i] = Some(StopReason::MaxTokens);
            } else if pos[i] as usize >= ctx {
                stop[i] = Some(StopReason::ContextFull);
            }
        }
        if stop.iter().all(Option::is_some) {
            break;
        }
        let step = Batch {
            ids: next.clone(),
            b: n,
            t: 1,
            pos: pos.clone(),
            valid: stop.iter().map(Option::is_none).collect(),
        };
        let out = model.forward(&step, Some(&mut cache), &fwd)?;
        for i in 0..n {
            if stop[i].is_none() {
                stats[i].add_rows(&out, &step.valid, i..i + 1);
                next[i] = samplers[i].sample(&row(&out, i, pos[i], &tokens[i])?);
                pos[i] += 1;
            }
        }
    }
    let decode_time = t1.elapsed();
    Ok((0..n)
        .map(|i| Generation {
            tokens: std::mem::take(&mut tokens[i]),
            stop: stop[i].unwrap_or(StopReason::MaxTokens),
            prompt_tokens: prompts[i].len(),
            prefill_time,
            decode_time,
            routing: std::mem::take(&mut stats[i]),
            prefill_routing: std::mem::take(&mut prefill_stats[i]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_weights, tiny_config};
    use candle_core::{DType, Device};

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&logits), 1);
        let p = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let a: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(p.clone());
                move |_| s.sample(&logits)
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(p.clone());
                move |_| s.sample(&logits)
            })
            .collect();
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&x| x != 1),
            "temperature 1 should sometimes pick another token: {a:?}"
        );
        // top-k 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplingParams { top_k: 1, ..p.clone() });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
        // top-p small keeps only the most likely token.
        let mut s = Sampler::new(SamplingParams { top_p: 0.01, ..p });
        assert!((0..20).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn generation_matches_full_recompute_greedy_and_stops() {
        let cfg = tiny_config(false);
        let m = Model::load(&cfg, &random_weights(&cfg, 3), DType::F32, &Device::Cpu).unwrap();
        let prompt = [3u32, 14, 15, 92, 65];
        let mut g = Generator::new(
            &m,
            GenerateParams {
                max_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap();
        let mut streamed = vec![];
        let out = g
            .generate(&prompt, |t| {
                streamed.push(t);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(out.stop, StopReason::MaxTokens);
        assert_eq!(out.tokens, streamed);
        // Each greedy token is the argmax of a full recomputation over prompt + previous tokens.
        let mut seq = prompt.to_vec();
        for &tok in &out.tokens {
            let full = m.forward(&Batch::single(&seq, 0), None, &Forward::default()).unwrap();
            assert_eq!(argmax(&full.logits.i((0, 0)).unwrap().to_vec1::<f32>().unwrap()), tok);
            seq.push(tok);
        }
        // A callback can stop generation; a stop token ends it without being emitted.
        let mut g = Generator::new(
            &m,
            GenerateParams {
                max_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap();
        let out2 = g.generate(&prompt, |_| ControlFlow::Break(())).unwrap();
        assert_eq!((out2.stop, out2.tokens.len()), (StopReason::Callback, 1));
        let stop = out.tokens[2];
        let mut g = Generator::new(
            &m,
            GenerateParams {
                max_tokens: 8,
                stop_tokens: vec![stop],
                ..Default::default()
            },
        )
        .unwrap();
        let out3 = g.generate(&prompt, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(out3.stop, StopReason::StopToken);
        assert!(!out3.tokens.contains(&stop));
    }

    /// NaN weights in one layer stop generation with an error naming the position and that layer, instead
    /// of sampling blank text from NaN logits; a batch reports the same.
    #[test]
    fn non_finite_logits_stop_generation_naming_position_and_layer() {
        let cfg = tiny_config(true);
        let mut t = crate::testing::random_tensors(&cfg, 3);
        let w = &t["model.layers.1.mlp.down_proj.weight"];
        let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
        t.insert("model.layers.1.mlp.down_proj.weight".into(), nan);
        let w = crate::Weights::from_tensors(t, "nan");
        let m = Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
        let mut g = Generator::new(&m, GenerateParams::default()).unwrap();
        let e = g.generate(&[1, 2, 3], |_| ControlFlow::Continue(())).unwrap_err();
        assert!(
            matches!(
                e,
                Error::NonFiniteLogits {
                    position: 2,
                    layer: Some(1),
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("at position 2") && msg.contains("decoder layer 1"),
            "{msg}"
        );
        let e = generate_batch(&m, &[vec![1, 2], vec![3, 4, 5, 6]], &GenerateParams::default()).unwrap_err();
        assert!(matches!(e, Error::NonFiniteLogits { layer: Some(1), .. }), "{e:?}");
    }

    /// The real model with one infinite weight in layer 7: the error names the prompt's last position and
    /// layer 7.
    #[test]
    fn smollm2_with_an_infinite_weight_stops_naming_the_layer() {
        let Some(path) = crate::testing::smollm2_gguf() else {
            return;
        };
        let ck = crate::Checkpoint::open(&path).unwrap();
        let name = "model.layers.7.mlp.down_proj.weight";
        let mut t = std::collections::HashMap::new();
        for n in ck.weights.names() {
            let shape = ck.weights.shape_of(&n).unwrap();
            let mut x = ck.weights.get(&n, &shape, DType::F32, &Device::Cpu).unwrap();
            if n == name {
                let mut v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                v[5] = f32::INFINITY;
                x = candle_core::Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            }
            t.insert(n, x);
        }
        let w = crate::Weights::from_tensors(t, &path);
        let m = Model::load(&ck.config, &w, DType::F32, &Device::Cpu).unwrap();
        let tok = ck.tokenizer.as_ref().unwrap();
        let ids = tok.encode("The capital of France is", false).unwrap();
        let mut g = Generator::new(&m, GenerateParams::default()).unwrap();
        let e = g.generate(&ids, |_| ControlFlow::Continue(())).unwrap_err();
        let want = ids.len() - 1;
        assert!(
            matches!(e, Error::NonFiniteLogits { position, layer: Some(7), .. } if position == want),
            "{e}"
        );
    }

    #[test]
    fn context_length_is_enforced() {
        let mut cfg = tiny_config(true);
        cfg.max_position_embeddings = 8;
        let m = Model::load(&cfg, &random_weights(&cfg, 3), DType::F32, &Device::Cpu).unwrap();
        let mut g = Generator::new(&m, GenerateParams::default()).unwrap();
        let out = g.generate(&[1, 2, 3, 4, 5], |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(out.stop, StopReason::ContextFull);
        assert_eq!(out.tokens.len(), 4);
        let mut g = Generator::new(&m, GenerateParams::default()).unwrap();
        let e = g.generate(&[1; 9], |_| ControlFlow::Continue(())).unwrap_err();
        assert!(e.to_string().contains("exceed the context length 8"), "{e}");
        // max_tokens 0 = no limit: generation runs until the context is full, one step at a time and batched.
        let unlimited = GenerateParams {
            max_tokens: 0,
            ..Default::default()
        };
        let mut g = Generator::new(&m, unlimited.clone()).unwrap();
        let out = g.generate(&[1, 2], |_| ControlFlow::Continue(())).unwrap();
        assert_eq!((out.stop, out.tokens.len()), (StopReason::ContextFull, 7));
        let outs = generate_batch(&m, &[vec![1, 2], vec![3]], &unlimited).unwrap();
        assert_eq!((outs[0].stop, outs[0].tokens.len()), (StopReason::ContextFull, 7));
        assert_eq!(outs[0].tokens, out.tokens);
    }
}

#[cfg(test)]
mod backend_tests {
    use super::*;
    use crate::testing::{random_weights, routed, tiny_config};
    use candle_core::Device;
    use dlo_passes::{ModelConfig, SkipKind};
    use std::cell::Cell;

    /// A backend that forwards to a model and counts its forward passes: generation must run on it unchanged.
    struct Counting<'a> {
        model: &'a Model,
        calls: Cell<usize>,
    }

    impl Backend for Counting<'_> {
        type Cache = crate::model::cache::Cache;
        fn config(&self) -> &ModelConfig {
            self.model.config()
        }
        fn new_cache(&self) -> Self::Cache {
            self.model.new_cache()
        }
        fn forward(&self, batch: &Batch, cache: Option<&mut Self::Cache>, opts: &Forward) -> Result<ForwardOutput> {
            self.calls.set(self.calls.get() + 1);
            self.model.forward(batch, cache, opts)
        }
    }

    fn greedy<B: Backend>(b: &B, prompt: &[u32]) -> Generation {
        let params = GenerateParams {
            max_tokens: 6,
            ..Default::default()
        };
        Generator::new(b, params)
            .unwrap()
            .generate(prompt, |_| ControlFlow::Continue(()))
            .unwrap()
    }

    #[test]
    fn generation_runs_on_any_backend() {
        let cfg = routed(tiny_config(false), SkipKind::Layer);
        let m = Model::load(&cfg, &random_weights(&cfg, 5), DType::F32, &Device::Cpu).unwrap();
        let counting = Counting {
            model: &m,
            calls: Cell::new(0),
        };
        let prompt = [4u32, 8, 15, 16, 23];
        let direct = greedy(&m, &prompt);
        let through = greedy(&counting, &prompt);
        assert_eq!(through.tokens, direct.tokens);
        assert_eq!(through.routing, direct.routing);
        // one prefill, then one decode step per emitted token but the last
        assert_eq!(counting.calls.get(), 1 + direct.decode_steps());
        let batched = generate_batch(
            &counting,
            &[prompt.to_vec(), prompt[..3].to_vec()],
            &GenerateParams {
                max_tokens: 6,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(batched[0].tokens, direct.tokens);
    }

    /// f64 is a verification dtype; generation used to fail on its f64 logits ("expected F32, got F64").
    #[test]
    fn f64_models_generate_the_f32_tokens() {
        let cfg = routed(tiny_config(false), SkipKind::Mlp);
        let w = random_weights(&cfg, 9);
        let m32 = Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
        let m64 = Model::load(&cfg, &w, DType::F64, &Device::Cpu).unwrap();
        let prompt = [7u32, 1, 30, 2, 11, 5];
        let g64 = greedy(&m64, &prompt);
        assert_eq!(g64.tokens.len(), 6);
        assert_eq!(g64.tokens, greedy(&m32, &prompt).tokens);
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::testing::{random_weights, routed, tiny_config};
    use candle_core::{DType, Device};
    use dlo_passes::SkipKind;

    #[test]
    fn batched_generation_equals_one_sequence_at_a_time() {
        for cfg in [
            tiny_config(true),
            routed(tiny_config(false), SkipKind::Mlp),
            routed(tiny_config(false), SkipKind::Layer),
        ] {
            let m = Model::load(&cfg, &random_weights(&cfg, 21), DType::F32, &Device::Cpu).unwrap();
            let prompts = vec![vec![3u32, 14, 15, 92, 65, 35], vec![8, 9], vec![27, 18, 28, 18]];
            let params = GenerateParams {
                max_tokens: 6,
                stop_tokens: vec![],
                ..Default::default()
            };
            let batched = generate_batch(&m, &prompts, &params).unwrap();
            for (p, b) in prompts.iter().zip(&batched) {
                let mut g = Generator::new(&m, params.clone()).unwrap();
                let single = g.generate(p, |_| ControlFlow::Continue(())).unwrap();
                assert_eq!(b.tokens, single.tokens, "prompt {p:?}");
                assert_eq!(b.routing, single.routing, "prompt {p:?}: routing counters differ");
            }
        }
    }
}

#[cfg(test)]
mod long_prompt_tests {
    use super::*;
    use crate::model::PREFILL_CHUNK;
    use crate::testing::{random_weights, routed, tiny_config};
    use candle_core::Device;
    use dlo_passes::SkipKind;

    /// A prompt longer than [`PREFILL_CHUNK`] (so prefilled in chunks) generates each greedy token as the
    /// argmax of a one-shot recomputation, with the one-shot prefill's routing counters, alone and batched.
    #[test]
    fn long_prompts_generate_as_one_shot_recomputation() {
        for mut cfg in [
            tiny_config(true),
            routed(tiny_config(false), SkipKind::Mlp),
            routed(tiny_config(false), SkipKind::Layer),
        ] {
            cfg.max_position_embeddings = 1024;
            let m = Model::load(&cfg, &random_weights(&cfg, 17), DType::F32, &Device::Cpu).unwrap();
            let prompt: Vec<u32> = (0..PREFILL_CHUNK as u32 + 90).map(|i| (i * 31 + 7) % 97).collect();
            let params = GenerateParams {
                max_tokens: 4,
                ..Default::default()
            };
            let out = Generator::new(&m, params.clone())
                .unwrap()
                .generate(&prompt, |_| ControlFlow::Continue(()))
                .unwrap();
            assert_eq!(out.tokens.len(), 4);
            let one_shot = |seq: &[u32]| {
                m.forward_chunked(&Batch::single(seq, 0), None, &Forward::default(), usize::MAX)
                    .unwrap()
            };
            let mut seq = prompt.clone();
            for &tok in &out.tokens {
                let full = one_shot(&seq);
                assert_eq!(argmax(&full.logits.i((0, 0)).unwrap().to_vec1::<f32>().unwrap()), tok);
                seq.push(tok);
            }
            let mut want = RoutingStats::default();
            want.add(&one_shot(&prompt), &vec![true; prompt.len()]);
            assert_eq!(out.prefill_routing, want);
            let batched = generate_batch(&m, &[prompt.clone(), prompt[..100].to_vec()], &params).unwrap();
            assert_eq!(batched[0].tokens, out.tokens);
            assert_eq!(batched[0].prefill_routing, want);
        }
    }
}
