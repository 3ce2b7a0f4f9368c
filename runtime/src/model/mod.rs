//! The one Llama/DLO model definition, for inference and training alike.
//!
//! A forward pass takes a [`Batch`] (token ids, per-token positions and padding flags), an optional
//! [`Cache`], and a [`Routing`] rule, and returns logits plus a routing [`LayerTrace`] per routed layer.
//! Routed layers follow the reference implementation's eval semantics (`dlo-method.md` §4.2–4.4, §8):
//!
//! - the router logit `z = wᵀh` is taken on the residual that enters the layer;
//! - `mlp` skipping: attention runs for every token; the MLP runs only for executed tokens (gathered into a
//!   dense tile, then scattered back), its output scaled by the gate `g = 0.5α + β(σ(z) − 0.5)`;
//! - `layer` skipping: executed tokens of each sequence are packed (original positions kept), attend only
//!   to the layer's earlier executed tokens (its own ragged KV cache), and skipped tokens pass unchanged.

pub mod activations;
pub mod blocked;
pub mod cache;
pub mod fused;
pub mod layers;
pub mod rope;
pub mod train;
pub mod weight;

use crate::error::{Error, Result};
use crate::options::RuntimeOptions;
use crate::weights::Weights;
use cache::{Cache, LayerCache};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use dlo_passes::{Gate, ModelConfig, RoutedUnit};
use layers::{DecoderLayer, Exec, Kv, Linear, Load, RmsNorm, Router, Step};
use weight::Weight;

/// A batch of token sequences for one forward step.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `b*t` row-major.
    pub ids: Vec<u32>,
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence in this step.
    pub t: usize,
    /// Position id of each token, `b*t`.
    pub pos: Vec<u32>,
    /// False for padding tokens, `b*t`.
    pub valid: Vec<bool>,
}

impl Batch {
    /// One sequence whose first token sits at position `start`.
    pub fn single(ids: &[u32], start: u32) -> Self {
        Batch {
            ids: ids.to_vec(),
            b: 1,
            t: ids.len(),
            pos: (start..start + ids.len() as u32).collect(),
            valid: vec![true; ids.len()],
        }
    }

    /// Several sequences, left-padded with `pad_id` to the longest; positions count from each sequence's
    /// first real token. Returns the batch and each sequence's length.
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32) -> Self {
        Self::padded(seqs, |_, s, i, t| {
            let pad = t - s.len();
            match i.checked_sub(pad) {
                Some(j) => (s[j], j as u32, true),
                None => (pad_id, 0, false),
            }
        })
    }

    /// Several sequences that continue a cache, right-padded with `pad_id` to the longest: sequence `i`'s
    /// first token sits at position `start[i]`. Padding comes after every real token, so none of them sees it.
    pub fn right_padded(seqs: &[Vec<u32>], start: &[u32], pad_id: u32) -> Self {
        Self::padded(seqs, |k, s, i, _| {
            (s.get(i).copied().unwrap_or(pad_id), start[k] + i as u32, i < s.len())
        })
    }

    /// Sequences padded to the longest (`t`): `slot(k, seqs[k], i, t)` gives column `i`'s (id, position,
    /// valid).
    fn padded(seqs: &[Vec<u32>], slot: impl Fn(usize, &[u32], usize, usize) -> (u32, u32, bool)) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = Batch {
            ids: Vec::with_capacity(seqs.len() * t),
            b: seqs.len(),
            t,
            pos: Vec::with_capacity(seqs.len() * t),
            valid: Vec::with_capacity(seqs.len() * t),
        };
        for (k, s) in seqs.iter().enumerate() {
            for i in 0..t {
                let (id, p, v) = slot(k, s, i, t);
                batch.ids.push(id);
                batch.pos.push(p);
                batch.valid.push(v);
            }
        }
        batch
    }

    /// Tokens `start..start + len` of every sequence.
    pub fn columns(&self, start: usize, len: usize) -> Self {
        fn cols<T: Copy>(v: &[T], b: usize, t: usize, start: usize, len: usize) -> Vec<T> {
            (0..b).flat_map(|bi| v[bi * t + start..][..len].to_vec()).collect()
        }
        Batch {
            ids: cols(&self.ids, self.b, self.t, start, len),
            b: self.b,
            t: len,
            pos: cols(&self.pos, self.b, self.t, start, len),
            valid: cols(&self.valid, self.b, self.t, start, len),
        }
    }

    /// One new token per sequence at the given positions (a decode step).
    pub fn next_tokens(ids: &[u32], pos: &[u32]) -> Self {
        Batch {
            ids: ids.to_vec(),
            b: ids.len(),
            t: 1,
            pos: pos.to_vec(),
            valid: vec![true; ids.len()],
        }
    }
}

/// How routed layers decide which tokens execute.
#[derive(Debug, Clone, Default)]
pub enum Routing {
    /// The reference's eval rule: execute iff `z > 0` (strict).
    #[default]
    Reference,
    /// Execute iff `z > threshold[l]` (calibrated compute budget); one entry per layer.
    Thresholds(Vec<f32>),
    /// Every routed unit executes (`true`) or is skipped (`false`), whatever the router says.
    Force(bool),
}

impl Routing {
    /// Whether layer `l` executes a token whose router logit is `z`.
    pub fn decide(&self, l: usize, z: f32) -> bool {
        match self {
            Routing::Reference => z > 0.0,
            Routing::Thresholds(t) => z > t.get(l).copied().unwrap_or(0.0),
            Routing::Force(on) => *on,
        }
    }
}

/// Steps longer than this many tokens (long prompts) run through the KV cache in chunks of this many, with
/// [`blocked::attend`]: memory then grows with the chunk and the cache, not with the square of the prompt.
/// Shorter steps take the one-shot path unchanged.
pub const PREFILL_CHUNK: usize = 512;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position of each sequence: `[b, 1, vocab]`.
    Last,
    /// Every position: `[b, t, vocab]`.
    All,
}

/// Routing of one routed layer during one forward pass.
#[derive(Debug, Clone)]
pub struct LayerTrace {
    /// Router logits `z`, `b*t` (f32).
    pub logits: Vec<f32>,
    /// Whether each token executed the routed unit, `b*t` (padding never executes).
    pub exec: Vec<bool>,
}

impl LayerTrace {
    /// Fraction of real tokens that executed.
    pub fn rate(&self, valid: &[bool]) -> f64 {
        let n = valid.iter().filter(|v| **v).count();
        let e = self.exec.iter().zip(valid).filter(|(e, v)| **e && **v).count();
        if n == 0 {
            0.0
        } else {
            e as f64 / n as f64
        }
    }
}

/// Result of a forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Logits in f32, `[b, t or 1, vocab]`.
    pub logits: Tensor,
    /// Per layer: the routing trace of routed layers, `None` for dense ones.
    pub trace: Vec<Option<LayerTrace>>,
}

/// Options of a forward pass.
#[derive(Debug, Clone, Default)]
pub struct Forward {
    /// The routing rule.
    pub routing: Routing,
    /// Logits for every position (otherwise only the last).
    pub all_logits: bool,
}

/// A loaded Llama-family model, dense or DLO-routed.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    /// `model.embed_tokens.weight`, `[vocab, d]`: looked up by row, and the lm_head when tied.
    pub embed_tokens: Weight,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Routers, `Some` for routed layers.
    pub routers: Vec<Option<Router>>,
    /// Final norm.
    pub norm: RmsNorm,
    /// `lm_head`; `None` when tied to the embeddings.
    pub lm_head: Option<Linear>,
    rope: rope::Rope,
    dtype: DType,
    device: Device,
    /// Storage dtype of the KV caches of [`Self::new_cache`] (`None`: the compute dtype).
    kv_dtype: Option<DType>,
}

impl Model {
    /// Builds the model from weights in HF naming, converting them to `dtype` on `device` (quantized weights
    /// are dequantized: every tensor is dense).
    pub fn load(cfg: &ModelConfig, w: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(
            cfg,
            w,
            &Load {
                dtype,
                device,
                matvec: true,
                quantized: false,
                kv_dtype: None,
            },
        )
    }

    /// Builds the model from weights in HF naming as `opts` says ([`RuntimeOptions::load`]).
    pub fn load_opts(cfg: &ModelConfig, w: &Weights, opts: &RuntimeOptions) -> Result<Self> {
        let device = opts.device.device()?;
        Self::load_with(cfg, w, &opts.load(&device))
    }

    fn load_with(cfg: &ModelConfig, w: &Weights, ld: &Load) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let (dtype, device) = (ld.dtype, ld.device);
        let embed_tokens = w.weight("model.embed_tokens.weight", &[v, d], ld)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, i, cfg, ld))
            .collect::<Result<Vec<_>>>()?;
        let routers = (0..cfg.num_hidden_layers)
            .map(|l| {
                if cfg.is_routed(l) {
                    Router::load(w, l, d, ld).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(w, "model.norm", d, cfg.rms_norm_eps, ld)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(w, "lm_head", v, d, false, ld)?)
        };
        Ok(Model {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            routers,
            norm,
            lm_head,
            rope: rope::Rope::new(cfg),
            dtype,
            device: device.clone(),
            kv_dtype: ld.kv_dtype,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh KV cache for this model (its growth stops doubling at the context length).
    pub fn new_cache(&self) -> Cache {
        Cache::with_soft_cap(self.layers.len(), self.cfg.max_position_embeddings).with_dtype(self.kv_dtype)
    }

    /// Runs the model over `batch`, appending to `cache` (a fresh one is used when `None`).
    ///
    /// # Shapes
    /// logits: `[b, t, vocab]` with `all_logits`, else `[b, 1, vocab]` (the last position).
    ///
    /// Steps longer than [`PREFILL_CHUNK`] tokens run in chunks ([`Self::forward_chunked`]).
    pub fn forward(&self, batch: &Batch, cache: Option<&mut Cache>, opts: &Forward) -> Result<ForwardOutput> {
        self.forward_chunked(batch, cache, opts, PREFILL_CHUNK)
    }

    /// [`Self::forward`] with steps longer than `chunk` tokens run through the cache in chunks of `chunk`
    /// (`usize::MAX`: always one shot).
    pub fn forward_chunked(
        &self,
        batch: &Batch,
        cache: Option<&mut Cache>,
        opts: &Forward,
        chunk: usize,
    ) -> Result<ForwardOutput> {
        // Run on a worker of the rayon pool, so that the parallel kernels inside (matvec, GEMM) start their
        // work there instead of handing every call from an outside thread to the pool and waiting.
        rayon::scope(|_| self.forward_on_pool(batch, cache, opts, chunk.max(1)))
    }

    fn forward_on_pool(
        &self,
        batch: &Batch,
        cache: Option<&mut Cache>,
        opts: &Forward,
        chunk: usize,
    ) -> Result<ForwardOutput> {
        self.check(batch)?;
        let mut own_cache;
        let cache = match cache {
            Some(c) => c,
            None => {
                own_cache = self.new_cache();
                &mut own_cache
            }
        };
        let ex = Exec { differentiable: false };
        let (b, t) = (batch.b, batch.t);
        if t <= chunk {
            let (h, trace) = self.run_layers(batch, cache, &opts.routing, false)?;
            let h = if opts.all_logits { h } else { h.i((.., t - 1..t, ..))? };
            return Ok(ForwardOutput {
                logits: self.head(&h, ex)?,
                trace,
            });
        }
        // Chunked prefill: routing is causal per token and attention reads the cache, so chunk by chunk gives
        // the one-shot result; only the chunks' logits that are asked for are computed.
        let mut logits = Vec::new();
        let mut trace: Vec<Option<LayerTrace>> = vec![None; self.layers.len()];
        for s0 in (0..t).step_by(chunk) {
            let c = chunk.min(t - s0);
            let (h, part) = self.run_layers(&batch.columns(s0, c), cache, &opts.routing, true)?;
            if opts.all_logits {
                logits.push(self.head(&h, ex)?);
            } else if s0 + c == t {
                logits.push(self.head(&h.i((.., c - 1..c, ..))?, ex)?);
            }
            for (whole, part) in trace.iter_mut().zip(part) {
                let Some(part) = part else { continue };
                let whole = whole.get_or_insert_with(|| LayerTrace {
                    logits: vec![0.0; b * t],
                    exec: vec![false; b * t],
                });
                for bi in 0..b {
                    let (dst, src) = (bi * t + s0..bi * t + s0 + c, bi * c..(bi + 1) * c);
                    whole.logits[dst.clone()].copy_from_slice(&part.logits[src.clone()]);
                    whole.exec[dst].copy_from_slice(&part.exec[src]);
                }
            }
        }
        Ok(ForwardOutput {
            logits: Tensor::cat(&logits, 1)?,
            trace,
        })
    }

    /// Embeds `batch` and runs every layer over it with `cache`: the final hidden states `[b, t, d]` and the
    /// routing traces. `blocked`: attention takes [`blocked::attend`] (chunks of a long prefill).
    fn run_layers(
        &self,
        batch: &Batch,
        cache: &mut Cache,
        routing: &Routing,
        blocked: bool,
    ) -> Result<(Tensor, Vec<Option<LayerTrace>>)> {
        let (mut h, mut step) = self.embed(batch)?;
        step.blocked = blocked;
        let ex = Exec { differentiable: false };
        let mut trace = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let lc = &mut cache.layers[l];
            let (next, tr) = match (&self.routers[l], self.cfg.routed_unit(l), &self.cfg.dlo) {
                (Some(router), unit, Some(dlo)) if unit.is_routed() => {
                    let z = router.logits(&h)?;
                    let tr = decide_on_host(l, &z, &batch.valid, routing)?;
                    let (b, t) = z.dims2()?;
                    let gate = gate_of_scores(&candle_nn::ops::sigmoid(&z)?, &dlo.gate_params())?.reshape((b, t, 1))?;
                    let next = if unit == RoutedUnit::Layer {
                        layer_skip(layer, &h, &step, lc, &tr.exec, &gate, ex)?
                    } else {
                        mlp_skip(layer, &h, &step, lc, &tr.exec, &gate, ex)?
                    };
                    (next, Some(tr))
                }
                _ => {
                    let a = layer.attn_unit(&h, &step, Kv::Cache(lc), ex)?;
                    let y = (&a + layer.mlp_delta(&a, ex)?)?;
                    (y, None)
                }
            };
            h = next;
            trace.push(tr);
        }
        Ok((h, trace))
    }

    /// Checks that the batch's arrays agree with its shape and its ids are in the vocabulary.
    fn check(&self, batch: &Batch) -> Result<()> {
        let (b, t) = (batch.b, batch.t);
        if batch.ids.len() != b * t || batch.pos.len() != b * t || batch.valid.len() != b * t || t == 0 {
            return Err(Error::InvalidArgument(format!(
                "batch of {b}×{t} has {} ids, {} positions, {} flags",
                batch.ids.len(),
                batch.pos.len(),
                batch.valid.len()
            )));
        }
        if let Some(&bad) = batch.ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// Checks the batch and embeds it: hidden states `[b, t, d]` and the step context (RoPE tables).
    fn embed<'b>(&self, batch: &'b Batch) -> Result<(Tensor, Step<'b>)> {
        let (b, t) = (batch.b, batch.t);
        self.check(batch)?;
        let ids = Tensor::from_vec(batch.ids.clone(), b * t, &self.device)?;
        let h = self
            .embed_tokens
            .rows(&ids, self.dtype)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let (cos, sin) = self.rope.cos_sin(&batch.pos, b, t, self.dtype, &self.device)?;
        let step = Step {
            b,
            t,
            pos: &batch.pos,
            valid: &batch.valid,
            cos,
            sin,
            blocked: false,
        };
        Ok((h, step))
    }

    /// Final norm and lm_head: `[b, t, d]` → logits `[b, t, vocab]` in [`Self::wide_dtype`].
    fn head(&self, h: &Tensor, ex: Exec) -> Result<Tensor> {
        let h = self.norm.forward(h, ex)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => Linear {
                weight: self.embed_tokens.clone(),
                bias: None,
            }
            .forward(&h)?,
        };
        Ok(logits.to_dtype(self.wide_dtype())?)
    }

    /// The dtype of logits and router scores: f32, or f64 for an f64 model (gradient checks).
    pub fn wide_dtype(&self) -> DType {
        layers::wide(self.dtype)
    }

    /// The projection and embedding weights by storage kind: `(kind, tensors, bytes)`, sorted by bytes
    /// (largest first).
    pub fn weight_kinds(&self) -> Vec<(weight::WeightKind, usize, usize)> {
        let mut all: Vec<&Weight> = vec![&self.embed_tokens];
        all.extend(self.lm_head.iter().map(|h| &h.weight));
        all.extend(self.projections());
        let mut kinds: Vec<(weight::WeightKind, usize, usize)> = Vec::new();
        for w in all {
            let k = w.kind();
            match kinds.iter_mut().find(|(kk, _, _)| *kk == k) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += w.storage_bytes();
                }
                None => kinds.push((k, 1, w.storage_bytes())),
            }
        }
        kinds.sort_by_key(|&(_, _, b)| std::cmp::Reverse(b));
        kinds
    }

    /// Weight bytes one decode step reads with every unit executing: every projection and the lm_head (the
    /// embedding table when tied); an embedding lookup reads one row, which is left out.
    pub fn bytes_per_token(&self) -> usize {
        let head = match &self.lm_head {
            Some(h) => h.weight.storage_bytes(),
            None => self.embed_tokens.storage_bytes(),
        };
        head + self.projections().map(Weight::storage_bytes).sum::<usize>()
    }

    /// The seven projection weights of every decoder layer.
    pub(crate) fn projections(&self) -> impl Iterator<Item = &Weight> {
        self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
            .map(|lin| &lin.weight)
        })
    }

    /// All dense tensors of the model by HF name (a tied lm_head is not repeated), e.g. to save a checkpoint.
    /// Quantized weights are not listed: they have no dense tensor.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if let Some(e) = self.embed_tokens.as_dense() {
            v.push(("model.embed_tokens.weight".to_string(), e.clone()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (n, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &l.mlp.gate_proj),
                ("mlp.up_proj", &l.mlp.up_proj),
                ("mlp.down_proj", &l.mlp.down_proj),
            ] {
                if let Some(w) = lin.weight.as_dense() {
                    v.push((format!("{p}.{n}.weight"), w.clone()));
                }
                if let Some(b) = &lin.bias {
                    v.push((format!("{p}.{n}.bias"), b.clone()));
                }
            }
            v.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.weight.clone()));
            v.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.clone(),
            ));
        }
        for (l, r) in self.routers.iter().enumerate() {
            if let Some(r) = r {
                v.push((format!("model.routers.{l}.weight"), r.weight.clone()));
            }
        }
        v.push(("model.norm.weight".into(), self.norm.weight.clone()));
        if let Some(w) = self.lm_head.as_ref().and_then(|h| h.weight.as_dense()) {
            v.push(("lm_head.weight".into(), w.clone()));
        }
        v
    }
}

/// The routing decisions of routed layer `l`, made on the host: its router logits `z` (`[b, t]`) are copied
/// there — the one host synchronisation of a routed layer; dense layers have none — and each real token
/// executes iff `rule` says so. Gathering executed rows needs their indices on the host anyway.
fn decide_on_host(l: usize, z: &Tensor, valid: &[bool], rule: &Routing) -> Result<LayerTrace> {
    let logits: Vec<f32> = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let exec = logits
        .iter()
        .zip(valid)
        .map(|(&z, &v)| v && rule.decide(l, z))
        .collect();
    Ok(LayerTrace { logits, exec })
}

/// The gate ([`Gate`]: `g = 0.5α + β(r − 0.5)`, or 1 when rescaling is off) of router scores `r = σ(z)`,
/// elementwise: same shape and dtype as `r`. The eval and training forwards both call it.
pub(crate) fn gate_of_scores(r: &Tensor, gate: &Gate) -> candle_core::Result<Tensor> {
    match gate.terms() {
        Some(t) => ((r - t.centre)? * t.gap)?.affine(1.0, t.base),
        None => r.ones_like(),
    }
}

/// Row indices (into the flattened `b*t` axis) of the tokens whose flag is `want`.
pub(crate) fn rows_where(flags: &[bool], want: bool) -> Vec<u32> {
    flags
        .iter()
        .enumerate()
        .filter(|(_, &f)| f == want)
        .map(|(i, _)| i as u32)
        .collect()
}

/// `base` with rows `rows` (of the flattened `[b*t, d]` view) replaced by `vals`.
fn scatter_rows(base: &Tensor, rows: &[u32], vals: &Tensor, exec: &[bool]) -> candle_core::Result<Tensor> {
    let (b, t, d) = base.dims3()?;
    let dev = base.device();
    let idx = Tensor::from_slice(rows, rows.len(), dev)?;
    let placed = Tensor::zeros((b * t, d), base.dtype(), dev)?.index_add(&idx, vals, 0)?;
    let mask: Vec<u8> = exec.iter().map(|&e| e as u8).collect();
    let mask = Tensor::from_vec(mask, (b * t, 1), dev)?.broadcast_as((b * t, d))?;
    mask.where_cond(&placed, &base.reshape((b * t, d))?)?.reshape((b, t, d))
}

/// `mlp` skipping: attention for every token, the MLP only on executed rows.
fn mlp_skip(
    layer: &DecoderLayer,
    h: &Tensor,
    st: &Step,
    cache: &mut LayerCache,
    exec: &[bool],
    gate: &Tensor,
    ex: Exec,
) -> candle_core::Result<Tensor> {
    let a = layer.attn_unit(h, st, Kv::Cache(cache), ex)?;
    Ok(gated_mlp_rows(layer, &a, exec, gate, ex)?.0)
}

/// The MLP unit of `mlp` skipping, shared by the eval and training forwards: `a + g·MLP(a)` on the rows of
/// `a: [b, t, d]` that `exec` flags (gathered into a dense tile, so the work is in proportion to them), `a` on
/// the others. Also returns the MLP's output on the executed rows, `[k, d]` in row order (`None` when none
/// executes), for training's similarity signal.
pub(crate) fn gated_mlp_rows(
    layer: &DecoderLayer,
    a: &Tensor,
    exec: &[bool],
    gate: &Tensor,
    ex: Exec,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let rows = rows_where(exec, true);
    if rows.is_empty() {
        return Ok((a.clone(), None));
    }
    let (b, t, d) = a.dims3()?;
    if rows.len() == exec.len() {
        let m = layer.mlp_delta(a, ex)?;
        let out = (a + m.broadcast_mul(gate)?)?;
        return Ok((out, Some(m.reshape((b * t, d))?)));
    }
    let idx = Tensor::from_slice(&rows, rows.len(), a.device())?;
    let a = a.reshape((b * t, d))?;
    let m = layer.mlp_delta(&a.index_select(&idx, 0)?, ex)?;
    let g_rows = gate.reshape((b * t, 1))?.index_select(&idx, 0)?;
    // One pass: executed rows get a + g·MLP(a) (the same sum as the dense path), the others stay a.
    let out = a.index_add(&idx, &m.broadcast_mul(&g_rows)?, 0)?.reshape((b, t, d))?;
    Ok((out, Some(m)))
}

/// `layer` skipping: executed tokens are packed per sequence and run the whole layer; the rest pass.
fn layer_skip(
    layer: &DecoderLayer,
    h: &Tensor,
    st: &Step,
    cache: &mut LayerCache,
    exec: &[bool],
    gate: &Tensor,
    ex: Exec,
) -> candle_core::Result<Tensor> {
    let (b, t, d) = h.dims3()?;
    let rows = rows_where(exec, true);
    if rows.is_empty() {
        return Ok(h.clone());
    }
    let per_seq: Vec<Vec<u32>> = (0..b)
        .map(|bi| rows.iter().copied().filter(|&r| r as usize / t == bi).collect())
        .collect();
    let k = per_seq.iter().map(Vec::len).max().unwrap_or(0);
    // Packed layout [b, k]: sequence bi's executed rows first (order kept), then invalid filler slots.
    let mut gather = Vec::with_capacity(b * k);
    let mut pos = Vec::with_capacity(b * k);
    let mut valid = Vec::with_capacity(b * k);
    let mut packed_src = Vec::with_capacity(rows.len());
    for (bi, seq) in per_seq.iter().enumerate() {
        for j in 0..k {
            match seq.get(j) {
                Some(&r) => {
                    gather.push(r);
                    pos.push(st.pos[r as usize]);
                    valid.push(true);
                    packed_src.push((bi * k + j) as u32);
                }
                None => {
                    gather.push(seq.first().copied().unwrap_or(rows[0]));
                    pos.push(0);
                    valid.push(false);
                }
            }
        }
    }
    let dev = h.device();
    let gidx = Tensor::from_slice(&gather, b * k, dev)?;
    let hp = h.reshape((b * t, d))?.index_select(&gidx, 0)?.reshape((b, k, d))?;
    let gp = gate.reshape((b * t, 1))?.index_select(&gidx, 0)?.reshape((b, k, 1))?;
    let (cos, sin) = {
        // Gather this layer's packed cos/sin from the step's tables.
        let half = st.cos.dim(D::Minus1)?;
        let c = st
            .cos
            .reshape((b * t, half))?
            .index_select(&gidx, 0)?
            .reshape((b, k, half))?;
        let s = st
            .sin
            .reshape((b * t, half))?
            .index_select(&gidx, 0)?
            .reshape((b, k, half))?;
        (c, s)
    };
    let pst = Step {
        b,
        t: k,
        pos: &pos,
        valid: &valid,
        cos,
        sin,
        blocked: st.blocked,
    };
    let a = layer.attn_unit(&hp, &pst, Kv::Cache(cache), ex)?;
    let y = (&a + layer.mlp_delta(&a, ex)?.broadcast_mul(&gp)?)?;
    let src = Tensor::from_slice(&packed_src, packed_src.len(), dev)?;
    let y_rows = y.reshape((b * k, d))?.index_select(&src, 0)?;
    let dst: Vec<u32> = per_seq.concat();
    scatter_rows(h, &dst, &y_rows, exec)
}

#[cfg(test)]
mod tests;
