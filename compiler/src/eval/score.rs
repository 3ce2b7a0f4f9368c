//! Log-likelihood scoring on any [`Backend`], with each context computed once for all its continuations.
//!
//! A request is split into tokens as lm-evaluation-harness splits it ([`encode`]). Requests that share a
//! context form a [`Group`]. Groups are scored in batches: the contexts of a batch run once, left-padded, into
//! a KV cache; the cache's rows are copied once per continuation ([`Backend::select_rows`]); the
//! continuations then run right-padded from there. Routing is causal per token, so a token's routing and
//! logits are those of the whole sequence scored alone (`dlo_runtime::model` tests this).

use dlo_runtime::generate::RoutingStats;
use dlo_runtime::model::{Batch, Forward, ForwardOutput, Routing};
use dlo_runtime::{Backend, Error, Result, Tokenizer};

/// A request's tokens: the context (never empty) and the scored continuation (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Context tokens.
    pub context: Vec<u32>,
    /// Continuation tokens.
    pub continuation: Vec<u32>,
}

/// The tokenizer's unknown-token id, when its model has one (a BPE, WordPiece or WordLevel `unk_token`, a
/// Unigram `unk_id`): a continuation that encodes to it cannot be scored faithfully.
pub fn unk_id(tok: &Tokenizer) -> Option<u32> {
    let model = serde_json::to_value(tok.inner().get_model()).ok()?;
    if let Some(t) = model["unk_token"].as_str() {
        return tok.token_to_id(t);
    }
    model["unk_id"].as_u64().map(|i| i as u32)
}

/// How the requests of one model are turned into tokens.
#[derive(Debug, Clone)]
pub struct Encoder<'a> {
    /// The model's tokenizer.
    pub tok: &'a Tokenizer,
    /// The one context token used when a context encodes to nothing (BOS, else the first stop token).
    pub prefix: u32,
    /// The model's vocabulary size.
    pub vocab: usize,
    /// The tokenizer's unknown token ([`unk_id`]).
    pub unk: Option<u32>,
}

impl Encoder<'_> {
    /// Splits a request as lm-evaluation-harness does: whitespace at the end of the context moves to the
    /// start of the continuation; the context is encoded alone, the continuation is what encoding context and
    /// continuation together adds after it. An empty context becomes [`Encoder::prefix`]. The tokenizer adds
    /// BOS to both when it is configured to. `Err` holds the problem, in words: a continuation that encodes
    /// to nothing, to the unknown token, or to ids outside the model's vocabulary.
    pub fn encode(&self, context: &str, continuation: &str) -> std::result::Result<Encoded, String> {
        let ctx = context.trim_end();
        let cont = format!("{}{continuation}", &context[ctx.len()..]);
        let run = |s: &str| self.tok.encode(s, true).map_err(|e| e.to_string());
        let whole = run(&format!("{ctx}{cont}"))?;
        let mut context = run(ctx)?;
        let continuation: Vec<u32> = whole[context.len().min(whole.len())..].to_vec();
        if context.is_empty() {
            context.push(self.prefix);
        }
        if continuation.is_empty() {
            return Err(format!(
                "the continuation {cont:?} encodes to no tokens after its context"
            ));
        }
        if let Some(&id) = whole.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(format!(
                "the tokenizer gives id {id}, outside the model's vocabulary of {}",
                self.vocab
            ));
        }
        if let Some(u) = self.unk.filter(|u| whole.contains(u)) {
            let text = self.tok.id_to_token(u).unwrap_or_default();
            return Err(format!(
                "the text {:?} needs the unknown token {text:?} (id {u}): this vocabulary cannot tokenize it",
                format!("{ctx}{cont}")
            ));
        }
        Ok(Encoded { context, continuation })
    }
}

/// Continuations scored after one shared context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Context tokens (non-empty).
    pub context: Vec<u32>,
    /// Continuation tokens of each request (each non-empty).
    pub continuations: Vec<Vec<u32>>,
}

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// log p(continuation | context), summed over the continuation's tokens (natural log).
    pub ll: f64,
    /// Whether every continuation token is the model's most likely next token.
    pub greedy: bool,
}

/// What scoring ran: routing counters and token counts.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Executed / routed tokens per layer.
    pub routing: RoutingStats,
    /// Tokens run through the model (contexts once, continuations).
    pub tokens: u64,
    /// Sum over those tokens of the keys each attended at a dense layer (position + 1).
    pub keys: u64,
    /// Continuation tokens scored.
    pub scored: u64,
}

impl Counters {
    fn add(&mut self, out: &ForwardOutput, batch: &Batch) {
        self.routing.add(out, &batch.valid);
        for (p, v) in batch.pos.iter().zip(&batch.valid) {
            if *v {
                self.tokens += 1;
                self.keys += *p as u64 + 1;
            }
        }
    }

    /// Mean keys per token (the attention length [`dlo_runtime::flops::per_token`] takes).
    pub fn mean_keys(&self) -> f64 {
        self.keys as f64 / self.tokens.max(1) as f64
    }
}

/// Batch limits: continuation rows per batch, and tokens per batched pass (rows × padded length, for the
/// contexts and for the continuations; this bounds the memory of the logits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most continuation rows in one batch.
    pub rows: usize,
    /// Most tokens (padding included) in one forward pass.
    pub tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { rows: 64, tokens: 1024 }
    }
}

/// log-softmax of `row` at `target`, and whether `target` is the first argmax (as `argmax` picks it).
fn log_prob(row: &[f32], target: u32) -> (f64, bool) {
    let (lse, arg) = dlo_runtime::kernels::exp::log_sum_exp(row);
    (row[target as usize] as f64 - lse, arg == target as usize)
}

fn host_logits(out: &ForwardOutput) -> Result<Vec<f32>> {
    Ok(out
        .logits
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Scores every group's continuations under `routing`; `progress` hears the number of requests finished
/// after each batch. Returns, per group, one [`Scored`] per continuation.
pub fn score<B: Backend>(
    model: &B,
    routing: &Routing,
    groups: &[Group],
    limits: Limits,
    counters: &mut Counters,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<Scored>>> {
    if let Some(g) = groups
        .iter()
        .find(|g| g.context.is_empty() || g.continuations.iter().any(Vec::is_empty))
    {
        return Err(Error::InvalidArgument(format!(
            "a scoring group with {} context tokens has an empty context or continuation",
            g.context.len()
        )));
    }
    // A group's continuations, shortest first, cut into pieces that fit the limits on their own.
    let mut pieces: Vec<Piece> = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let mut ks: Vec<usize> = (0..group.continuations.len()).collect();
        ks.sort_by_key(|&k| group.continuations[k].len());
        let mut piece = Piece {
            group: g,
            conts: vec![],
        };
        for k in ks {
            let len = group.continuations[k].len() - 1;
            let rows = piece.conts.len() + 1;
            if !piece.conts.is_empty() && (rows > limits.rows || rows * len > limits.tokens) {
                pieces.push(std::mem::replace(
                    &mut piece,
                    Piece {
                        group: g,
                        conts: vec![],
                    },
                ));
            }
            piece.conts.push(k);
        }
        pieces.push(piece);
    }
    // Contexts of similar lengths run together; their continuations then run in batches of similar lengths
    // (continuation rows pick their context's cache row, so the two passes batch independently).
    pieces.sort_by_key(|p| groups[p.group].context.len());
    let mut out: Vec<Vec<Option<Scored>>> = groups.iter().map(|g| vec![None; g.continuations.len()]).collect();
    let mut i = 0;
    while i < pieces.len() {
        let mut j = i + 1;
        while j < pieces.len() && groups[pieces[j].group].context.len() * (j - i + 1) <= limits.tokens {
            j += 1;
        }
        let rows = batch(model, routing, groups, &pieces[i..j], limits, counters, &mut out)?;
        progress(rows);
        i = j;
    }
    Ok(out
        .into_iter()
        .map(|g| {
            g.into_iter()
                .map(|s| s.expect("every continuation is scored"))
                .collect()
        })
        .collect())
}

/// Some continuations of one group, scored after one copy of its context.
#[derive(Debug, Clone)]
struct Piece {
    group: usize,
    /// Indices into the group's continuations.
    conts: Vec<usize>,
}

/// Scores `pieces`: one pass over their contexts (left-padded), then their continuations, shortest first, in
/// passes within `limits`, each from copies of its rows of the contexts' cache. Writes each score into
/// `out[group][continuation]` and returns the number of continuations scored.
fn batch<B: Backend>(
    model: &B,
    routing: &Routing,
    groups: &[Group],
    pieces: &[Piece],
    limits: Limits,
    counters: &mut Counters,
    out: &mut [Vec<Option<Scored>>],
) -> Result<usize> {
    let vocab = model.config().vocab_size;
    let contexts: Vec<Vec<u32>> = pieces.iter().map(|p| groups[p.group].context.clone()).collect();
    let mut cache = model.new_cache();
    let ctx_batch = Batch::left_padded(&contexts, 0);
    let opts = |all_logits| Forward {
        routing: routing.clone(),
        all_logits,
    };
    let ctx_out = model.forward(&ctx_batch, Some(&mut cache), &opts(false))?;
    counters.add(&ctx_out, &ctx_batch);
    let first = host_logits(&ctx_out)?;
    // Every continuation: (its context's row, group, index in the group), shortest first.
    let mut rows: Vec<(usize, usize, usize)> = pieces
        .iter()
        .enumerate()
        .flat_map(|(pi, p)| p.conts.iter().map(move |&k| (pi, p.group, k)))
        .collect();
    let cont = |&(_, g, k): &(usize, usize, usize)| &groups[g].continuations[k];
    rows.sort_by_key(|r| cont(r).len());
    let mut i = 0;
    while i < rows.len() {
        // Continuations of one token are scored from the contexts' logits alone.
        let mut j = i + 1;
        let mut rest = None;
        if cont(&rows[i]).len() > 1 {
            while j < rows.len() && j - i < limits.rows && (cont(&rows[j]).len() - 1) * (j - i + 1) <= limits.tokens {
                j += 1;
            }
            let picked: Vec<usize> = rows[i..j].iter().map(|r| r.0).collect();
            let inputs: Vec<Vec<u32>> = rows[i..j]
                .iter()
                .map(|r| cont(r)[..cont(r).len() - 1].to_vec())
                .collect();
            let start: Vec<u32> = rows[i..j]
                .iter()
                .map(|&(_, g, _)| groups[g].context.len() as u32)
                .collect();
            let mut forked = model.select_rows(&cache, &picked)?;
            let b = Batch::right_padded(&inputs, &start, 0);
            let o = model.forward(&b, Some(&mut forked), &opts(true))?;
            counters.add(&o, &b);
            rest = Some((host_logits(&o)?, b.t));
        } else {
            while j < rows.len() && cont(&rows[j]).len() == 1 {
                j += 1;
            }
        }
        for (r, row) in rows[i..j].iter().enumerate() {
            let (pi, g, k) = *row;
            let c = cont(row);
            let (mut ll, mut greedy) = (0.0, true);
            for (n, &target) in c.iter().enumerate() {
                let logits = match (n, &rest) {
                    (0, _) => &first[pi * vocab..(pi + 1) * vocab],
                    (_, Some((logits, t))) => &logits[(r * t + n - 1) * vocab..][..vocab],
                    (_, None) => unreachable!("continuations longer than one token make a pass"),
                };
                let (lp, best) = log_prob(logits, target);
                if !lp.is_finite() {
                    return Err(Error::NonFiniteLogits {
                        position: groups[g].context.len() + n,
                        layer: None,
                        cause: "while scoring a continuation".into(),
                    });
                }
                ll += lp;
                greedy &= best;
            }
            counters.scored += c.len() as u64;
            out[g][k] = Some(Scored { ll, greedy });
        }
        i = j;
    }
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use dlo_passes::SkipKind;
    use dlo_runtime::model::Model;
    use dlo_runtime::testing::{random_weights, routed, tiny_config};

    /// Each request scored alone, by one full forward pass over context + continuation.
    fn alone(m: &Model, routing: &Routing, ctx: &[u32], cont: &[u32]) -> Scored {
        let full: Vec<u32> = ctx.iter().chain(cont).copied().collect();
        let o = m
            .forward(
                &Batch::single(&full, 0),
                None,
                &Forward {
                    routing: routing.clone(),
                    all_logits: true,
                },
            )
            .unwrap();
        let v = host_logits(&o).unwrap();
        let vocab = m.config().vocab_size;
        let (mut ll, mut greedy) = (0.0, true);
        for (k, &t) in cont.iter().enumerate() {
            let (lp, b) = log_prob(&v[(ctx.len() - 1 + k) * vocab..][..vocab], t);
            ll += lp;
            greedy &= b;
        }
        Scored { ll, greedy }
    }

    #[test]
    fn shared_context_batches_score_as_each_request_alone() {
        for cfg in [
            tiny_config(false),
            routed(tiny_config(false), SkipKind::Mlp),
            routed(tiny_config(false), SkipKind::Layer),
        ] {
            let m = Model::load(&cfg, &random_weights(&cfg, 3), DType::F32, &Device::Cpu).unwrap();
            let groups: Vec<Group> = (0..7u32)
                .map(|g| Group {
                    context: (0..(2 + g * 3) % 11 + 1).map(|i| (i * 7 + g) % 90 + 1).collect(),
                    continuations: (0..(g % 4 + 1))
                        .map(|c| (0..(c * 2 + g) % 5 + 1).map(|i| (i * 13 + c + g) % 90 + 1).collect())
                        .collect(),
                })
                .collect();
            // small limits force several batches, one-group batches and mixed lengths
            for limits in [Limits { rows: 5, tokens: 40 }, Limits::default()] {
                let mut counters = Counters::default();
                let mut done = 0;
                let got = score(&m, &Routing::Reference, &groups, limits, &mut counters, |n| done += n).unwrap();
                let requests: usize = groups.iter().map(|g| g.continuations.len()).sum();
                assert_eq!(done, requests);
                for (g, s) in groups.iter().zip(&got) {
                    for (c, s) in g.continuations.iter().zip(s) {
                        let want = alone(&m, &Routing::Reference, &g.context, c);
                        assert!((s.ll - want.ll).abs() < 1e-4, "{} vs {}", s.ll, want.ll);
                        assert_eq!(s.greedy, want.greedy);
                    }
                }
                let ctx: usize = groups.iter().map(|g| g.context.len()).sum();
                let cont: usize = groups.iter().flat_map(|g| &g.continuations).map(|c| c.len() - 1).sum();
                assert_eq!(counters.tokens as usize, ctx + cont, "each context runs once");
                assert_eq!(counters.scored as usize, cont + requests);
                if cfg.dlo.is_some() {
                    let r = counters.routing.mean_rate();
                    assert!(r > 0.0 && r < 1.0, "routers are degenerate: {r}");
                }
            }
        }
    }

    #[test]
    fn log_prob_is_a_log_softmax_with_the_first_argmax() {
        let (lp, best) = log_prob(&[1.0, 3.0, 3.0], 1);
        let want = 3.0 - (1f64.exp() + 2.0 * 3f64.exp()).ln();
        assert!((lp - want).abs() < 1e-6 && best);
        assert!(!log_prob(&[1.0, 3.0, 3.0], 2).1, "ties go to the first index");
    }
}
