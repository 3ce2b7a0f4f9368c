//! Matmul FLOPs counters, with the reference implementation's convention (`dlo-method.md` §7).
//!
//! The reference measures one forward pass under PyTorch's `FlopCounterMode`, which counts only matmul-like
//! ops, 2 FLOPs per multiply-accumulate: the q/k/v/o projections, the attention score and value matmuls
//! (the **full** score matrix, causal masking does not halve it), the MLP projections of tokens that ran the
//! MLP, the routers, and `lm_head`. Norms, RoPE, activations, softmax and the embedding lookup are not
//! counted. Skipped units are not counted, so routing lowers the count.
//!
//! Per routed layer `l` with `k` of `t` tokens executing:
//!
//! | skip kind | projections | attention pairs | MLP | router |
//! |---|---|---|---|---|
//! | dense layer | `t` | `t·t` | `t` | — |
//! | `mlp` (ExAttn) | `t` | `t·t` | `k` | `t` |
//! | `layer` | `k` | `k·k` | `k` | `t` |
//!
//! With a KV cache, a decode token at position `p` attends over `p + 1` keys (`layer` skipping: over the
//! layer's executed tokens so far, itself included). [`prefill`] is the reference's benchmark (one pass, no
//! cache, logits for every position when asked); [`generation`] counts a cached generation as
//! [`crate::generate::Generator`] runs it (logits for the last position of each step only).
//!
//! ```
//! use dlo_runtime::flops;
//! # let cfg = dlo_passes::ModelConfig::from_hf_json(&serde_json::json!({
//! #   "model_type": "llama", "vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
//! #   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
//! #   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true}),
//! #   std::path::Path::new("c")).unwrap();
//! // One dense layer (d = 8, 2 query heads and 1 KV head of width 4, MLP width 16, vocab 100), 3 tokens.
//! let f = flops::prefill(&cfg, 3, &[None], 3);
//! assert_eq!(f.projections, 3 * 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8));
//! assert_eq!(f.attention, 3 * 3 * 4 * 8);
//! assert_eq!(f.mlp, 3 * 3 * 2 * 8 * 16);
//! assert_eq!(f.lm_head, 3 * 2 * 8 * 100);
//! ```

use crate::generate::Generation;
use dlo_passes::{ModelConfig, SkipKind};

/// Matmul FLOPs by component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flops {
    /// q, k, v and o projections.
    pub projections: u64,
    /// Attention scores (`QKᵀ`) and the weighted sum of values.
    pub attention: u64,
    /// MLP gate, up and down projections.
    pub mlp: u64,
    /// Router dot products.
    pub routers: u64,
    /// The output projection to the vocabulary.
    pub lm_head: u64,
}

impl Flops {
    /// The sum over components.
    pub fn total(&self) -> u64 {
        self.projections + self.attention + self.mlp + self.routers + self.lm_head
    }
}

impl std::ops::Add for Flops {
    type Output = Flops;
    fn add(self, o: Flops) -> Flops {
        Flops {
            projections: self.projections + o.projections,
            attention: self.attention + o.attention,
            mlp: self.mlp + o.mlp,
            routers: self.routers + o.routers,
            lm_head: self.lm_head + o.lm_head,
        }
    }
}

/// FLOPs per unit of work for one model.
struct Costs {
    /// q/k/v/o projections of one token.
    proj: u64,
    /// One (query, key) pair: the score and the value product.
    pair: u64,
    /// The MLP of one token.
    mlp: u64,
    /// One router dot product.
    router: u64,
    /// One row of logits.
    lm_head: u64,
}

impl Costs {
    fn of(cfg: &ModelConfig) -> Self {
        let d = cfg.hidden_size as u64;
        let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
        let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
        Costs {
            proj: 2 * (d * q + 2 * d * kv + q * d),
            pair: 2 * 2 * q,
            mlp: 3 * 2 * d * cfg.intermediate_size as u64,
            router: 2 * d,
            lm_head: 2 * d * cfg.vocab_size as u64,
        }
    }
}

fn layer_skip(cfg: &ModelConfig, l: usize) -> bool {
    cfg.is_routed(l) && cfg.dlo.as_ref().is_some_and(|d| d.skip == SkipKind::Layer)
}

/// Executed count of layer `l` out of `n` tokens: `exec[l]` for routed layers, `n` for dense ones (or when
/// `exec` has no entry: every unit executed).
fn executed(cfg: &ModelConfig, exec: &[Option<u64>], l: usize, n: u64) -> u64 {
    if cfg.is_routed(l) {
        exec.get(l).copied().flatten().unwrap_or(n).min(n)
    } else {
        n
    }
}

/// One forward pass over `t` tokens of one sequence without a cache (the reference's FLOPs benchmark):
/// `exec[l]` is how many of the `t` tokens executed routed layer `l` (`None`, or a missing entry, counts
/// every token as executed); `lm_head_rows` is the number of positions that get logits (`t` in the
/// reference, 1 when only the last position is needed).
pub fn prefill(cfg: &ModelConfig, t: u64, exec: &[Option<u64>], lm_head_rows: u64) -> Flops {
    let c = Costs::of(cfg);
    let mut f = Flops {
        lm_head: lm_head_rows * c.lm_head,
        ..Flops::default()
    };
    for l in 0..cfg.num_hidden_layers {
        let k = executed(cfg, exec, l, t);
        let q = if layer_skip(cfg, l) { k } else { t };
        f.projections += q * c.proj;
        f.attention += q * q * c.pair;
        f.mlp += k * c.mlp;
        if cfg.is_routed(l) {
            f.routers += t * c.router;
        }
    }
    f
}

/// A cached generation of one sequence: a prefill of `prompt` tokens, then `decode` one-token steps (the
/// token fed at step `i` sits at position `prompt + i`), logits for the last position of each step.
/// `prefill_exec[l]` / `total_exec[l]`: tokens that executed routed layer `l` in the prefill / in prefill
/// and decode steps together (`None`: all of them).
pub fn generation(
    cfg: &ModelConfig,
    prompt: u64,
    decode: u64,
    prefill_exec: &[Option<u64>],
    total_exec: &[Option<u64>],
) -> Flops {
    let c = Costs::of(cfg);
    let mut f = prefill(cfg, prompt, prefill_exec, 1);
    f.lm_head += decode * c.lm_head;
    for l in 0..cfg.num_hidden_layers {
        let kp = executed(cfg, prefill_exec, l, prompt);
        let e = executed(cfg, total_exec, l, prompt + decode)
            .saturating_sub(kp)
            .min(decode);
        let (q, pairs) = if layer_skip(cfg, l) {
            // The j-th executed decode token (j = 1..e) attends over the kp prefill tokens and j decode tokens.
            (e, e * kp + e * (e + 1) / 2)
        } else {
            // The decode token at position prompt + i attends over prompt + i + 1 keys.
            (decode, decode * prompt + decode * (decode + 1) / 2)
        };
        f.projections += q * c.proj;
        f.attention += pairs * c.pair;
        f.mlp += e * c.mlp;
        if cfg.is_routed(l) {
            f.routers += decode * c.router;
        }
    }
    f
}

/// Matmul FLOPs of one average token of cached passes (an evaluation's): `rates[l]` is the fraction of
/// tokens that executed routed layer `l` (`None`, or a missing entry: all of them), `keys` the mean number
/// of keys a token attends at a dense layer (its position + 1), and every token gets logits. Under `layer`
/// skipping an executing token attends over the layer's executed keys, counted as `rate × keys`.
pub fn per_token(cfg: &ModelConfig, rates: &[Option<f64>], keys: f64) -> f64 {
    let c = Costs::of(cfg);
    let mut f = c.lm_head as f64;
    for l in 0..cfg.num_hidden_layers {
        let r = if cfg.is_routed(l) {
            rates.get(l).copied().flatten().unwrap_or(1.0).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let (q, pairs) = if layer_skip(cfg, l) {
            (r, r * r * keys)
        } else {
            (1.0, keys)
        };
        f += q * c.proj as f64 + pairs * c.pair as f64 + r * c.mlp as f64;
        if cfg.is_routed(l) {
            f += c.router as f64;
        }
    }
    f
}

/// Executed counts of routed layers from routing counters (`None` for dense layers).
fn exec_counts(stats: &crate::generate::RoutingStats) -> Vec<Option<u64>> {
    stats.layers.iter().map(|s| s.map(|(e, _)| e)).collect()
}

/// The executed matmul FLOPs of a finished [`Generation`] (see [`generation`]).
pub fn of_generation(cfg: &ModelConfig, g: &Generation) -> Flops {
    generation(
        cfg,
        g.prompt_tokens as u64,
        g.decode_steps() as u64,
        &exec_counts(&g.prefill_routing),
        &exec_counts(&g.routing),
    )
}

/// What [`of_generation`] would count had every routed unit executed (the same model run densely).
pub fn of_generation_dense(cfg: &ModelConfig, g: &Generation) -> Flops {
    generation(cfg, g.prompt_tokens as u64, g.decode_steps() as u64, &[], &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_token_is_a_one_token_prefill_at_full_rate_and_scales_the_skipped_units() {
        let cfg = crate::testing::routed(crate::testing::tiny_config(false), SkipKind::Mlp);
        let one = prefill(&cfg, 1, &[], 1).total() as f64;
        assert_eq!(per_token(&cfg, &[], 1.0), one);
        let c = Costs::of(&cfg);
        let routed = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_routed(l)).count() as f64;
        let half: Vec<Option<f64>> = (0..cfg.num_hidden_layers)
            .map(|l| cfg.is_routed(l).then_some(0.5))
            .collect();
        let saved = one - per_token(&cfg, &half, 1.0);
        assert!((saved - routed * 0.5 * c.mlp as f64).abs() < 1e-6, "{saved}");
        // 9 more keys per token cost 9 more (query, key) pairs in every layer
        let more = per_token(&cfg, &[], 10.0) - one;
        assert!((more - 9.0 * cfg.num_hidden_layers as f64 * c.pair as f64).abs() < 1e-6);
        let lcfg = crate::testing::routed(crate::testing::tiny_config(false), SkipKind::Layer);
        let off: Vec<Option<f64>> = (0..lcfg.num_hidden_layers)
            .map(|l| lcfg.is_routed(l).then_some(0.0))
            .collect();
        let dense_layers = (0..lcfg.num_hidden_layers).filter(|&l| !lcfg.is_routed(l)).count() as f64;
        let rest = per_token(&lcfg, &off, 4.0);
        let want = c.lm_head as f64
            + dense_layers * (c.proj + 4 * c.pair + c.mlp) as f64
            + (lcfg.num_hidden_layers as f64 - dense_layers) * c.router as f64;
        assert!((rest - want).abs() < 1e-6, "{rest} vs {want}");
    }
    use crate::generate::{GenerateParams, Generator};
    use crate::model::{Batch, Forward, Model};
    use crate::testing::{random_weights, routed, tiny_config};
    use candle_core::{DType, Device};
    use std::ops::ControlFlow;

    /// Naive count: recompute every step's cost from its own forward trace, with explicit per-layer cache
    /// lengths, and compare with the closed forms.
    fn naive(cfg: &ModelConfig, m: &Model, prompt: &[u32], steps: &[u32]) -> Flops {
        let c = Costs::of(cfg);
        let mut cache = m.new_cache();
        let mut lens = vec![0u64; cfg.num_hidden_layers];
        let mut f = Flops::default();
        let mut pos = 0u32;
        let mut feed: Vec<Vec<u32>> = vec![prompt.to_vec()];
        feed.extend(steps.iter().map(|&t| vec![t]));
        for ids in feed {
            let out = m
                .forward(&Batch::single(&ids, pos), Some(&mut cache), &Forward::default())
                .unwrap();
            pos += ids.len() as u32;
            let n = ids.len() as u64;
            f.lm_head += c.lm_head;
            for (l, len) in lens.iter_mut().enumerate() {
                let k = match &out.trace[l] {
                    Some(tr) => tr.exec.iter().filter(|e| **e).count() as u64,
                    None => n,
                };
                if cfg.is_routed(l) {
                    f.routers += n * c.router;
                }
                let q = if layer_skip(cfg, l) { k } else { n };
                *len += q;
                f.projections += q * c.proj;
                f.mlp += k * c.mlp;
                // Prefill counts the full q×q matrix; a decode query attends to the whole cache.
                f.attention += if n > 1 { q * q } else { q * *len } * c.pair;
            }
        }
        f
    }

    #[test]
    fn generation_count_matches_a_step_by_step_count() {
        for cfg in [
            tiny_config(false),
            routed(tiny_config(false), SkipKind::Mlp),
            routed(tiny_config(true), SkipKind::Layer),
        ] {
            let m = Model::load(&cfg, &random_weights(&cfg, 5), DType::F32, &Device::Cpu).unwrap();
            let prompt = [5u32, 17, 33, 2, 61, 9, 40];
            let mut g = Generator::new(
                &m,
                GenerateParams {
                    max_tokens: 9,
                    ..Default::default()
                },
            )
            .unwrap();
            let out = g.generate(&prompt, |_| ControlFlow::Continue(())).unwrap();
            let steps = &out.tokens[..out.decode_steps()];
            let want = naive(&cfg, &m, &prompt, steps);
            assert_eq!(of_generation(&cfg, &out), want, "{:?}", cfg.dlo.map(|d| d.skip));
            let dense = of_generation_dense(&cfg, &out);
            assert!(dense.total() >= want.total());
            if cfg.dlo.is_some() {
                // Random routers skip some tokens, so routing must save something.
                assert!(dense.mlp > want.mlp, "{dense:?} vs {want:?}");
                assert_eq!(dense.routers, want.routers);
            } else {
                assert_eq!(dense, want);
            }
        }
    }

    #[test]
    fn prefill_matches_the_reference_convention() {
        // 7B-like shapes from dlo-method.md §7.2: the MLP is 61.7 % of a layer's FLOPs at T = 2048.
        let mut cfg = tiny_config(false);
        cfg.hidden_size = 4096;
        cfg.intermediate_size = 11008;
        cfg.num_attention_heads = 32;
        cfg.num_key_value_heads = 32;
        cfg.head_dim = 128;
        cfg.num_hidden_layers = 1;
        cfg.vocab_size = 32000;
        let f = prefill(&cfg, 2048, &[], 2048);
        assert_eq!(f.projections, 274_877_906_944); // 2.749e11
        assert_eq!(f.attention, 68_719_476_736); // 6.87e10
        assert_eq!(f.mlp, 554_050_781_184); // 5.541e11
        assert_eq!(f.lm_head, 536_870_912_000); // 5.37e11
        let share = f.mlp as f64 / (f.projections + f.attention + f.mlp) as f64;
        assert!((share - 0.617).abs() < 5e-4, "{share}");
        // Layer skipping with half the tokens: a quarter of the attention pairs, half the rest.
        let cfg = routed(tiny_config(false), SkipKind::Layer);
        let full = prefill(&cfg, 8, &[None, Some(8), Some(8)], 1);
        let half = prefill(&cfg, 8, &[None, Some(4), Some(4)], 1);
        let c = Costs::of(&cfg);
        assert_eq!(full.attention - half.attention, 2 * (64 - 16) * c.pair);
        assert_eq!(full.mlp - half.mlp, 2 * 4 * c.mlp);
        assert_eq!(full.routers, 2 * 8 * c.router);
    }
}
