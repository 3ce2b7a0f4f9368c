//! Lowering of the Llama/DLO model definition to the two ONNX graphs (see the module doc of
//! [`super`] for the interface and the design of the conditional parts).
//!
//! Hidden states are kept as 2-D `[rows, d]` tensors (batch 1), so every projection is one `Gemm` with
//! `transB = 1` on the checkpoint's `[out, in]` weight, and gathering/scattering executed tokens is a
//! `GatherND`/`ScatterND` on the row axis. Attention uses the layout `[kv_heads, groups, rows, head_dim]`
//! for queries against `[kv_heads, 1, slots, head_dim]` keys/values: the `MatMul` broadcast over the
//! group axis implements grouped-query attention without repeating K/V.

use super::builder::{attr_g, attr_i, attr_ints, attr_t, raw_tensor, value_info, Builder, Dim};
use super::builder::{Registry, Source, TensorSpec};
use super::proto::{data_type, GraphProto, NodeProto, TensorProto, ValueInfoProto};
use dlo_passes::{ModelConfig, RoutedUnit};

/// Additive mask value of a hidden key slot: the runtime's `MASKED` (finite, so an all-masked row of a
/// discarded query stays finite).
const MASKED: f64 = dlo_runtime::model::cache::MASKED as f64;

/// Name of the RoPE cosine table initializer, `[max_positions, head_dim/2]`.
pub const ROPE_COS: &str = "rope.cos";
/// Name of the RoPE sine table initializer.
pub const ROPE_SIN: &str = "rope.sin";

/// A lowered graph before its large initializers are attached.
pub struct LoweredGraph {
    /// Graph name.
    pub name: String,
    /// Nodes, topologically ordered.
    pub nodes: Vec<NodeProto>,
    /// Small constants (always inline).
    pub consts: Vec<TensorProto>,
    /// Graph inputs.
    pub inputs: Vec<ValueInfoProto>,
    /// Graph outputs.
    pub outputs: Vec<ValueInfoProto>,
    /// Registry tensors this graph references, in first-use order.
    pub used: Vec<String>,
}

impl LoweredGraph {
    /// Nodes including those inside `If` branches.
    pub fn node_count(&self) -> usize {
        fn count(nodes: &[NodeProto]) -> usize {
            nodes
                .iter()
                .map(|n| {
                    1 + n
                        .attribute
                        .iter()
                        .filter_map(|a| a.g.as_ref())
                        .map(|g| count(&g.node))
                        .sum::<usize>()
                })
                .sum()
        }
        count(&self.nodes)
    }
}

/// The RoPE tables (`[max_positions, head_dim/2]` each), computed exactly as the runtime computes them (its
/// f32 angles, widened losslessly; the writer stores them in the export's element type).
pub fn register_rope_tables(cfg: &ModelConfig, reg: &mut Registry, max_pos: usize) -> dlo_runtime::Result<()> {
    let rope = dlo_runtime::model::rope::Rope::new(cfg);
    let positions: Vec<u32> = (0..max_pos as u32).collect();
    let dev = candle_core::Device::Cpu;
    let (cos, sin) = rope.cos_sin(&positions, 1, max_pos, candle_core::DType::F64, &dev)?;
    let half = cfg.head_dim / 2;
    for (name, t) in [(ROPE_COS, cos), (ROPE_SIN, sin)] {
        let v: Vec<f64> = t.flatten_all()?.to_vec1()?;
        reg.add(TensorSpec {
            name: name.into(),
            dims: vec![max_pos, half],
            source: Source::Generated(v),
        });
    }
    Ok(())
}

/// Lowers one graph of `cfg`, registering the tensors it uses in a registry shared by both graphs.
pub struct Lower<'a> {
    cfg: &'a ModelConfig,
    thresholds: Option<&'a [f32]>,
    b: Builder,
    reg: &'a mut Registry,
    used: Vec<String>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
}

/// K/V of one layer in the row layout `[rows, kv_heads, head_dim]` (RoPE applied to K).
struct Qkv {
    q: String,
    k: String,
    v: String,
}

impl<'a> Lower<'a> {
    /// A lowering of `cfg` into `reg`, computing in the registry's element type. A routed layer executes a
    /// token iff its router logit exceeds `thresholds[l]` (`None`: the reference rule, 0).
    pub fn new(cfg: &'a ModelConfig, reg: &'a mut Registry, thresholds: Option<&'a [f32]>) -> Self {
        Lower {
            cfg,
            thresholds,
            b: Builder::new(reg.elem),
            reg,
            used: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// The decision threshold of routed layer `l` as a graph constant.
    fn threshold(&mut self, l: usize) -> String {
        let t = self.thresholds.and_then(|t| t.get(l)).copied().unwrap_or(0.0);
        self.b.scalar(t as f64)
    }

    fn finish(self, name: &str) -> LoweredGraph {
        let (nodes, consts) = self.b.finish();
        LoweredGraph {
            name: name.into(),
            nodes,
            consts,
            inputs: self.inputs,
            outputs: self.outputs,
            used: self.used,
        }
    }

    // ---- small helpers -------------------------------------------------------------------------

    /// The ONNX element type of floating-point values.
    fn float(&self) -> i32 {
        self.b.elem.onnx()
    }

    fn use_tensor(&mut self, name: String) -> String {
        if !self.used.contains(&name) {
            self.used.push(name.clone());
        }
        name
    }

    /// A checkpoint tensor.
    fn w(&mut self, name: &str, dims: &[usize]) -> String {
        let n = self.reg.add(TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            source: Source::Checkpoint,
        });
        self.use_tensor(n)
    }

    fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        self.b.op(op, inputs, vec![])
    }

    fn op_a(&mut self, op: &str, inputs: &[&str], attrs: Vec<super::proto::AttributeProto>) -> String {
        self.b.op(op, inputs, attrs)
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.b.ints(shape);
        self.op("Reshape", &[x, &s])
    }

    fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.b.ints(axes);
        self.op("Unsqueeze", &[x, &a])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op_a("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    /// `Where(cond, 0, MASKED)`: an additive attention mask from a boolean "visible" tensor.
    fn additive_mask(&mut self, visible: &str) -> String {
        let zero = self.b.scalar(0.0);
        let masked = self.b.scalar(MASKED);
        self.op("Where", &[visible, &zero, &masked])
    }

    /// Additive causal mask `[n, n]` for rows at positions `pos` (`[n]`): row i sees keys with pos ≤ pos_i.
    fn causal_mask(&mut self, pos: &str) -> String {
        let keys = self.unsqueeze(pos, &[0]);
        let queries = self.unsqueeze(pos, &[1]);
        let vis = self.op("LessOrEqual", &[&keys, &queries]);
        self.additive_mask(&vis)
    }

    /// RoPE cos and sin `[n, 1, head_dim/2]` for positions `pos` (`[n]` int64).
    fn rope_at(&mut self, pos: &str) -> (String, String) {
        let cos_t = self.use_tensor(ROPE_COS.to_string());
        let sin_t = self.use_tensor(ROPE_SIN.to_string());
        let c = self.op_a("Gather", &[&cos_t, pos], vec![attr_i("axis", 0)]);
        let s = self.op_a("Gather", &[&sin_t, pos], vec![attr_i("axis", 0)]);
        (self.unsqueeze(&c, &[1]), self.unsqueeze(&s, &[1]))
    }

    // ---- model blocks --------------------------------------------------------------------------

    /// `x Wᵀ (+ b)` for `x: [rows, in]`.
    fn linear(&mut self, x: &str, name: &str, out: usize, inp: usize, bias: bool) -> String {
        let w = self.w(&format!("{name}.weight"), &[out, inp]);
        if bias {
            let bn = self.w(&format!("{name}.bias"), &[out]);
            self.op_a("Gemm", &[x, &w, &bn], vec![attr_i("transB", 1)])
        } else {
            self.op_a("Gemm", &[x, &w], vec![attr_i("transB", 1)])
        }
    }

    /// RMSNorm over the last axis with scale `{name}.weight`.
    fn rms(&mut self, x: &str, name: &str) -> String {
        let w = self.w(&format!("{name}.weight"), &[self.cfg.hidden_size]);
        let sq = self.op("Mul", &[x, x]);
        let mean = self.op_a(
            "ReduceMean",
            &[&sq],
            vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
        );
        let eps = self.b.scalar(self.cfg.rms_norm_eps);
        let var = self.op("Add", &[&mean, &eps]);
        let rms = self.op("Sqrt", &[&var]);
        let normed = self.op("Div", &[x, &rms]);
        self.op("Mul", &[&normed, &w])
    }

    /// Rotate-half RoPE on `x: [rows, heads, head_dim]` with `cos`/`sin: [rows, 1, head_dim/2]`.
    fn rope(&mut self, x: &str, cos: &str, sin: &str) -> String {
        let hd = self.cfg.head_dim as i64;
        let (z, half, full, last) = (
            self.b.ints(&[0]),
            self.b.ints(&[hd / 2]),
            self.b.ints(&[hd]),
            self.b.ints(&[-1]),
        );
        let x1 = self.op("Slice", &[x, &z, &half, &last]);
        let x2 = self.op("Slice", &[x, &half, &full, &last]);
        let (x1c, x2s) = (self.op("Mul", &[&x1, cos]), self.op("Mul", &[&x2, sin]));
        let r1 = self.op("Sub", &[&x1c, &x2s]);
        let (x2c, x1s) = (self.op("Mul", &[&x2, cos]), self.op("Mul", &[&x1, sin]));
        let r2 = self.op("Add", &[&x2c, &x1s]);
        self.op_a("Concat", &[&r1, &r2], vec![attr_i("axis", -1)])
    }

    /// Projections of layer `l` for normalised rows `x: [rows, d]`; q `[rows, heads, hd]` and k
    /// `[rows, kv, hd]` rotated, v `[rows, kv, hd]`.
    fn qkv(&mut self, l: usize, x: &str, cos: &str, sin: &str) -> Qkv {
        let c = self.cfg;
        let (d, h, kv, hd, bias) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.attention_bias,
        );
        let p = format!("model.layers.{l}.self_attn");
        let q = self.linear(x, &format!("{p}.q_proj"), h * hd, d, bias);
        let q = self.reshape(&q, &[0, h as i64, hd as i64]);
        let q = self.rope(&q, cos, sin);
        let k = self.linear(x, &format!("{p}.k_proj"), kv * hd, d, bias);
        let k = self.reshape(&k, &[0, kv as i64, hd as i64]);
        let k = self.rope(&k, cos, sin);
        let v = self.linear(x, &format!("{p}.v_proj"), kv * hd, d, bias);
        let v = self.reshape(&v, &[0, kv as i64, hd as i64]);
        Qkv { q, k, v }
    }

    /// Attention of queries `q: [rows, heads, hd]` over keys/values `ka`, `va: [kv, 1, slots, hd]` with
    /// an additive `mask` broadcastable to `[kv, groups, rows, slots]`, through `o_proj`: `[rows, d]`.
    fn attend(&mut self, l: usize, q: &str, ka: &str, va: &str, mask: &str) -> String {
        let c = self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let g = h / kv;
        let q4 = self.reshape(q, &[0, kv as i64, g as i64, hd as i64]);
        let qt = self.transpose(&q4, &[1, 2, 0, 3]); // [kv, g, rows, hd]
        let kt = self.transpose(ka, &[0, 1, 3, 2]); // [kv, 1, hd, slots]
        let scores = self.op("MatMul", &[&qt, &kt]);
        let scale = self.b.scalar(1.0 / (hd as f64).sqrt());
        let scores = self.op("Mul", &[&scores, &scale]);
        let scores = self.op("Add", &[&scores, mask]);
        let probs = self.op_a("Softmax", &[&scores], vec![attr_i("axis", -1)]);
        let out = self.op("MatMul", &[&probs, va]); // [kv, g, rows, hd]
        let out = self.transpose(&out, &[2, 0, 1, 3]);
        let out = self.reshape(&out, &[0, (h * hd) as i64]);
        self.linear(
            &out,
            &format!("model.layers.{l}.self_attn.o_proj"),
            c.hidden_size,
            h * hd,
            false,
        )
    }

    /// `[rows, kv, hd]` → `[kv, 1, rows, hd]` (attention layout) and `[1, kv, rows, hd]` (cache layout).
    fn kv_layouts(&mut self, x: &str) -> (String, String) {
        let t = self.transpose(x, &[1, 0, 2]);
        (self.unsqueeze(&t, &[1]), self.unsqueeze(&t, &[0]))
    }

    /// The MLP's contribution `MLP(RMSNorm₂(a))` for rows `a: [rows, d]`.
    fn mlp_delta(&mut self, l: usize, a: &str) -> String {
        let (d, f) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let p = format!("model.layers.{l}");
        let x = self.rms(a, &format!("{p}.post_attention_layernorm"));
        let gate = self.linear(&x, &format!("{p}.mlp.gate_proj"), f, d, false);
        let sig = self.op("Sigmoid", &[&gate]);
        let silu = self.op("Mul", &[&gate, &sig]);
        let up = self.linear(&x, &format!("{p}.mlp.up_proj"), f, d, false);
        let prod = self.op("Mul", &[&silu, &up]);
        self.linear(&prod, &format!("{p}.mlp.down_proj"), d, f, false)
    }

    /// `a + g·MLP(RMSNorm₂(a))` (g omitted when the model does not rescale).
    fn gated_mlp_residual(&mut self, l: usize, a: &str, gate: Option<&str>) -> String {
        let delta = self.mlp_delta(l, a);
        let delta = match gate {
            Some(g) => self.op("Mul", &[&delta, g]),
            None => delta,
        };
        self.op("Add", &[a, &delta])
    }

    /// Router logits `z: [rows, 1]` on the layer input and the gate `g = 0.5α + β(σ(z) − 0.5)` (`None` when
    /// `rescale_hidden_states` is off).
    fn router(&mut self, l: usize, h: &str) -> (String, Option<String>) {
        let w = self.w(&format!("model.routers.{l}.weight"), &[1, self.cfg.hidden_size]);
        let z = self.op_a("Gemm", &[h, &w], vec![attr_i("transB", 1)]);
        let dlo = self.cfg.dlo.as_ref().expect("routed layers have a DLO config");
        let Some(terms) = dlo.gate_params().terms() else {
            return (z, None);
        };
        let (half, beta, base) = (
            self.b.scalar(terms.centre),
            self.b.scalar(terms.gap),
            self.b.scalar(terms.base),
        );
        let r = self.op("Sigmoid", &[&z]);
        let centred = self.op("Sub", &[&r, &half]);
        let scaled = self.op("Mul", &[&centred, &beta]);
        let g = self.op("Add", &[&scaled, &base]);
        (z, Some(g))
    }

    fn output(&mut self, name: &str, elem: i32, dims: &[Dim]) {
        self.outputs.push(value_info(name, elem, dims));
    }

    fn kv_dims(&self, slots: Dim) -> Vec<Dim> {
        vec![
            Dim::Fixed(1),
            Dim::Fixed(self.cfg.num_key_value_heads),
            slots,
            Dim::Fixed(self.cfg.head_dim),
        ]
    }

    fn logits(&mut self, h: &str, shape: &[i64]) {
        let c = self.cfg;
        let hn = self.rms(h, "model.norm");
        let head = if c.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let w = self.w(head, &[c.vocab_size, c.hidden_size]);
        let l2 = self.op_a("Gemm", &[&hn, &w], vec![attr_i("transB", 1)]);
        let s = self.b.ints(shape);
        self.b.node("Reshape", &[&l2, &s], &["logits"], vec![]);
    }

    fn embed(&mut self, ids_input: &str) -> String {
        let c = self.cfg;
        let ids = self.reshape(ids_input, &[-1]);
        let table = self.w("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size]);
        self.op_a("Gather", &[&table, &ids], vec![attr_i("axis", 0)])
    }

    // ---- prefill -------------------------------------------------------------------------------

    /// The positions of the executed rows, ascending, as `[K, 1]` int64 indices for `GatherND`/`ScatterND`.
    ///
    /// A compaction by `TopK`, not `NonZero` (which TensorRT-RTX builds only through a CUDA plugin): each
    /// row gets the key `exec·T − pos` (`T − pos ∈ [1, T]` when executed, `−pos ≤ 0` when skipped, all
    /// distinct), and the largest `K = Σ exec` keys, sorted, are exactly the executed rows in order.
    /// Keys are in the graph's float type (f32 or f64), exact for any `T < 2^24`.
    fn executed_rows(&mut self, exec: &str, pos: &str, t: &str) -> String {
        let to_float = attr_i("to", self.float() as i64);
        let flat = self.reshape(exec, &[-1]); // [T]
        let exec_f = self.op_a("Cast", &[&flat], vec![to_float.clone()]);
        let pos_f = self.op_a("Cast", &[pos], vec![to_float.clone()]);
        let t_f = self.op_a("Cast", &[t], vec![to_float]);
        let scaled = self.op("Mul", &[&exec_f, &t_f]);
        let key = self.op("Sub", &[&scaled, &pos_f]);
        let exec_i = self.op_a("Cast", &[&flat], vec![attr_i("to", data_type::INT64 as i64)]);
        let k = self.op_a("ReduceSum", &[&exec_i], vec![attr_i("keepdims", 1)]); // [1]
        let values = self.b.fresh("topk_values");
        let indices = self.b.fresh("topk_indices");
        self.b.node(
            "TopK",
            &[&key, &k],
            &[&values, &indices],
            vec![attr_i("axis", 0), attr_i("largest", 1), attr_i("sorted", 1)],
        );
        self.unsqueeze(&indices, &[1]) // [K, 1]
    }

    /// The prefill graph: `input_ids [1, seq]` at positions `0..seq`, no past; logits for every position,
    /// each layer's K/V (`[1, kv, seq, hd]`), and the routing of routed layers. Routed layers use the
    /// gather/scatter form, or with `masked` a dense form that computes every row and selects with `Where`
    /// (no data-dependent shapes, nothing saved).
    pub fn prefill(mut self, masked: bool) -> LoweredGraph {
        let c = self.cfg;
        let (v, kv, hd) = (c.vocab_size, c.num_key_value_heads, c.head_dim);
        let float = self.float();
        self.inputs.push(value_info(
            "input_ids",
            data_type::INT64,
            &[Dim::Fixed(1), Dim::Sym("seq")],
        ));
        self.output("logits", float, &[Dim::Fixed(1), Dim::Sym("seq"), Dim::Fixed(v)]);
        let mut h = self.embed("input_ids");
        let shape = self.op("Shape", &["input_ids"]);
        let one = self.b.scalar_i64(1);
        let t = self.op_a("Gather", &[&shape, &one], vec![attr_i("axis", 0)]);
        let zero = self.b.scalar_i64(0);
        let pos = self.op("Range", &[&zero, &t, &one]);
        let (cos, sin) = self.rope_at(&pos);
        let mask = self.causal_mask(&pos);
        let t1 = self.unsqueeze(&t, &[0]);
        let kvhd = self.b.ints(&[kv as i64, hd as i64]);
        let kv_shape = self.op_a("Concat", &[&t1, &kvhd], vec![attr_i("axis", 0)]);
        let zeros_kv = self.op_a(
            "ConstantOfShape",
            &[&kv_shape],
            vec![attr_t("value", raw_tensor("", float, &[1], self.b.elem.bytes(&[0.0])))],
        );
        for l in 0..c.num_hidden_layers {
            self.b.prefix = format!("l{l}.");
            let kind = c.routed_unit(l);
            let (pk, pv) = (format!("present_key.{l}"), format!("present_value.{l}"));
            let k_rows;
            let v_rows;
            let routing = if kind == RoutedUnit::None {
                None
            } else {
                let (z, g) = self.router(l, &h);
                let threshold = self.threshold(l);
                let exec = self.op("Greater", &[&z, &threshold]); // [T, 1]
                let row = self.b.ints(&[1, -1]);
                self.b
                    .node("Reshape", &[&z, &row], &[&format!("router_logit.{l}")], vec![]);
                self.b.node("Reshape", &[&exec, &row], &[&format!("exec.{l}")], vec![]);
                let idx = if masked {
                    None
                } else {
                    Some(self.executed_rows(&exec, &pos, &t))
                };
                Some((g, exec, idx))
            };
            match (kind, routing) {
                (RoutedUnit::Layer, Some((g, _, Some(idx)))) => {
                    // Gather the executed rows, run the whole layer on them (attending among themselves,
                    // causally by original position), scatter back; skipped rows pass unchanged.
                    let h_e = self.op("GatherND", &[&h, &idx]);
                    let g_e = g.as_ref().map(|g| self.op("GatherND", &[g, &idx]));
                    let ax = self.b.ints(&[1]);
                    let pos_e = self.op("Squeeze", &[&idx, &ax]);
                    let (cos_e, sin_e) = self.rope_at(&pos_e);
                    let mask_e = self.causal_mask(&pos_e);
                    let x = self.rms(&h_e, &format!("model.layers.{l}.input_layernorm"));
                    let Qkv { q, k, v } = self.qkv(l, &x, &cos_e, &sin_e);
                    let (ka, _) = self.kv_layouts(&k);
                    let (va, _) = self.kv_layouts(&v);
                    let o = self.attend(l, &q, &ka, &va, &mask_e);
                    let a_e = self.op("Add", &[&h_e, &o]);
                    let y_e = self.gated_mlp_residual(l, &a_e, g_e.as_deref());
                    h = self.op("ScatterND", &[&h, &idx, &y_e]);
                    k_rows = self.op("ScatterND", &[&zeros_kv, &idx, &k]);
                    v_rows = self.op("ScatterND", &[&zeros_kv, &idx, &v]);
                    let exec_out = format!("exec.{l}");
                    self.b
                        .node("Identity", &[&exec_out], &[&format!("present_valid.{l}")], vec![]);
                }
                (RoutedUnit::Layer, Some((g, exec, None))) => {
                    // Masked dense form: every row runs the layer, keys of skipped rows are hidden, and
                    // skipped rows keep their input (their K/V slots are zeroed, as the gather form leaves them).
                    let x = self.rms(&h, &format!("model.layers.{l}.input_layernorm"));
                    let Qkv { q, k, v } = self.qkv(l, &x, &cos, &sin);
                    let exec_out = format!("exec.{l}");
                    let key_mask = self.additive_mask(&exec_out); // [1, T]
                    let mask_l = self.op("Add", &[&mask, &key_mask]);
                    let (ka, _) = self.kv_layouts(&k);
                    let (va, _) = self.kv_layouts(&v);
                    let o = self.attend(l, &q, &ka, &va, &mask_l);
                    let a = self.op("Add", &[&h, &o]);
                    let y = self.gated_mlp_residual(l, &a, g.as_deref());
                    h = self.op("Where", &[&exec, &y, &h]);
                    let exec3 = self.unsqueeze(&exec, &[2]); // [T, 1, 1]
                    let zero_f = self.b.scalar(0.0);
                    k_rows = self.op("Where", &[&exec3, &k, &zero_f]);
                    v_rows = self.op("Where", &[&exec3, &v, &zero_f]);
                    self.b
                        .node("Identity", &[&exec_out], &[&format!("present_valid.{l}")], vec![]);
                }
                (kind, routing) => {
                    let x = self.rms(&h, &format!("model.layers.{l}.input_layernorm"));
                    let Qkv { q, k, v } = self.qkv(l, &x, &cos, &sin);
                    let (ka, _) = self.kv_layouts(&k);
                    let (va, _) = self.kv_layouts(&v);
                    let o = self.attend(l, &q, &ka, &va, &mask);
                    let a = self.op("Add", &[&h, &o]);
                    h = match (kind, routing) {
                        (RoutedUnit::Mlp, Some((g, _, Some(idx)))) => {
                            // MLP only on the executed rows: gather, run, scatter back.
                            let a_e = self.op("GatherND", &[&a, &idx]);
                            let g_e = g.as_ref().map(|g| self.op("GatherND", &[g, &idx]));
                            let y_e = self.gated_mlp_residual(l, &a_e, g_e.as_deref());
                            self.op("ScatterND", &[&a, &idx, &y_e])
                        }
                        (RoutedUnit::Mlp, Some((g, exec, None))) => {
                            // Masked dense form: the MLP runs on every row, skipped rows keep `a`.
                            let y = self.gated_mlp_residual(l, &a, g.as_deref());
                            self.op("Where", &[&exec, &y, &a])
                        }
                        _ => self.gated_mlp_residual(l, &a, None),
                    };
                    k_rows = k;
                    v_rows = v;
                }
            }
            let (_, kc) = self.kv_layouts(&k_rows);
            let (_, vc) = self.kv_layouts(&v_rows);
            self.b.node("Identity", &[&kc], &[&pk], vec![]);
            self.b.node("Identity", &[&vc], &[&pv], vec![]);
            let kv_dims = self.kv_dims(Dim::Sym("seq"));
            self.output(&pk, float, &kv_dims);
            self.output(&pv, float, &kv_dims);
            if kind != RoutedUnit::None {
                let row = [Dim::Fixed(1), Dim::Sym("seq")];
                if kind == RoutedUnit::Layer {
                    self.output(&format!("present_valid.{l}"), data_type::BOOL, &row);
                }
                self.output(&format!("exec.{l}"), data_type::BOOL, &row);
                self.output(&format!("router_logit.{l}"), float, &row);
            }
        }
        self.b.prefix = String::new();
        self.logits(&h, &[1, -1, v as i64]);
        self.finish("dlo_prefill")
    }

    // ---- decode --------------------------------------------------------------------------------

    /// The decode graph: one token at `position_ids`, fixed-capacity position-indexed caches.
    pub fn decode(mut self) -> LoweredGraph {
        let c = self.cfg;
        let (v, kv, n) = (c.vocab_size, c.num_key_value_heads, c.num_hidden_layers);
        let float = self.float();
        let one_one = [Dim::Fixed(1), Dim::Fixed(1)];
        self.inputs.push(value_info("input_ids", data_type::INT64, &one_one));
        self.inputs.push(value_info("position_ids", data_type::INT64, &one_one));
        let cache_dims = self.kv_dims(Dim::Sym("capacity"));
        let valid_dims = [Dim::Fixed(1), Dim::Sym("capacity")];
        for l in 0..n {
            self.inputs
                .push(value_info(&format!("past_key.{l}"), float, &cache_dims));
            self.inputs
                .push(value_info(&format!("past_value.{l}"), float, &cache_dims));
            if c.routed_unit(l) == RoutedUnit::Layer {
                self.inputs
                    .push(value_info(&format!("past_valid.{l}"), data_type::BOOL, &valid_dims));
            }
        }
        self.output("logits", float, &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(v)]);

        let mut h = self.embed("input_ids"); // [1, d]
        let p = self.reshape("position_ids", &[1]);
        let (cos, sin) = self.rope_at(&p);
        let shape = self.op("Shape", &["past_key.0"]);
        let two = self.b.scalar_i64(2);
        let cap = self.op_a("Gather", &[&shape, &two], vec![attr_i("axis", 0)]);
        let (zero, one) = (self.b.scalar_i64(0), self.b.scalar_i64(1));
        let slots = self.op("Range", &[&zero, &cap, &one]); // [capacity]
        let seen = self.op("LessOrEqual", &[&slots, &p]);
        let dense_mask = self.additive_mask(&seen); // [capacity]
        let at_p = self.op("Equal", &[&slots, &p]);
        let onehot = self.unsqueeze(&at_p, &[0]); // [1, capacity]
                                                  // ScatterND indices [1, kv, 3] = (0, head, p): the slot of this token in every KV head.
        let base: Vec<i64> = (0..kv as i64).flat_map(|i| [0, i, 0]).collect();
        let base = self.b.ints_shaped(&base, &[1, kv as i64, 3]);
        let unit = self.b.ints(&[0, 0, 1]);
        let offs = self.op("Mul", &[&p, &unit]);
        let write_idx = self.op("Add", &[&base, &offs]);

        for l in 0..n {
            self.b.prefix = format!("l{l}.");
            let kind = c.routed_unit(l);
            let (past_k, past_v) = (format!("past_key.{l}"), format!("past_value.{l}"));
            let (pk, pv) = (format!("present_key.{l}"), format!("present_value.{l}"));
            let mut cond = None;
            let mut gate = None;
            if kind != RoutedUnit::None {
                let (z, g) = self.router(l, &h);
                self.b.node("Identity", &[&z], &[&format!("router_logit.{l}")], vec![]);
                let threshold = self.threshold(l);
                let exec = format!("exec.{l}");
                self.b.node("Greater", &[&z, &threshold], &[&exec], vec![]);
                let scalar = self.b.ints(&[]);
                cond = Some(self.op("Reshape", &[&exec, &scalar]));
                gate = g;
            }
            match kind {
                RoutedUnit::Layer => {
                    let cond = cond.expect("routed");
                    let (past_valid, present_valid) = (format!("past_valid.{l}"), format!("present_valid.{l}"));
                    // then: the whole layer runs, writing its K/V into slot p and marking the slot valid.
                    self.b.push_scope();
                    let x = self.rms(&h, &format!("model.layers.{l}.input_layernorm"));
                    let Qkv { q, k, v } = self.qkv(l, &x, &cos, &sin);
                    let kt = self.op("ScatterND", &[&past_k, &write_idx, &k]);
                    let vt = self.op("ScatterND", &[&past_v, &write_idx, &v]);
                    let valid_t = self.op("Or", &[&past_valid, &onehot]);
                    let ka = self.transpose(&kt, &[1, 0, 2, 3]);
                    let va = self.transpose(&vt, &[1, 0, 2, 3]);
                    let mask = self.additive_mask(&valid_t);
                    let o = self.attend(l, &q, &ka, &va, &mask);
                    let a = self.op("Add", &[&h, &o]);
                    let y = self.gated_mlp_residual(l, &a, gate.as_deref());
                    let then_nodes = self.b.pop_scope();
                    let then_out = [y, kt, vt, valid_t];
                    // else: the token passes through; the cache is returned unchanged (same shapes).
                    self.b.push_scope();
                    let else_out: Vec<String> = [&h, &past_k, &past_v, &past_valid]
                        .iter()
                        .map(|x| self.op("Identity", &[x]))
                        .collect();
                    let else_nodes = self.b.pop_scope();
                    let types = [
                        (float, vec![Dim::Fixed(1), Dim::Fixed(c.hidden_size)]),
                        (float, cache_dims.clone()),
                        (float, cache_dims.clone()),
                        (data_type::BOOL, valid_dims.to_vec()),
                    ];
                    let h_next = self.b.fresh("h");
                    self.if_node(
                        l,
                        &cond,
                        (then_nodes, &then_out),
                        (else_nodes, &else_out),
                        &types,
                        &[&h_next, &pk, &pv, &present_valid],
                    );
                    self.output(&present_valid, data_type::BOOL, &valid_dims);
                    h = h_next;
                }
                _ => {
                    let x = self.rms(&h, &format!("model.layers.{l}.input_layernorm"));
                    let Qkv { q, k, v } = self.qkv(l, &x, &cos, &sin);
                    self.b.node("ScatterND", &[&past_k, &write_idx, &k], &[&pk], vec![]);
                    self.b.node("ScatterND", &[&past_v, &write_idx, &v], &[&pv], vec![]);
                    let ka = self.transpose(&pk, &[1, 0, 2, 3]);
                    let va = self.transpose(&pv, &[1, 0, 2, 3]);
                    let o = self.attend(l, &q, &ka, &va, &dense_mask);
                    let a = self.op("Add", &[&h, &o]);
                    h = match cond {
                        None => self.gated_mlp_residual(l, &a, None),
                        Some(cond) => {
                            self.b.push_scope();
                            let y = self.gated_mlp_residual(l, &a, gate.as_deref());
                            let then_nodes = self.b.pop_scope();
                            self.b.push_scope();
                            let y_skip = self.op("Identity", &[&a]);
                            let else_nodes = self.b.pop_scope();
                            let h_next = self.b.fresh("h");
                            let types = [(float, vec![Dim::Fixed(1), Dim::Fixed(c.hidden_size)])];
                            self.if_node(
                                l,
                                &cond,
                                (then_nodes, &[y]),
                                (else_nodes, &[y_skip]),
                                &types,
                                &[&h_next],
                            );
                            h_next
                        }
                    };
                }
            }
            self.output(&pk, float, &cache_dims);
            self.output(&pv, float, &cache_dims);
            if kind != RoutedUnit::None {
                self.output(&format!("exec.{l}"), data_type::BOOL, &one_one);
                self.output(&format!("router_logit.{l}"), float, &one_one);
            }
        }
        self.b.prefix = String::new();
        self.logits(&h, &[1, 1, v as i64]);
        self.finish("dlo_decode")
    }

    /// An `If` node on the 0-D bool `cond`; both branches declare identical types and shapes.
    fn if_node(
        &mut self,
        l: usize,
        cond: &str,
        then_branch: (Vec<NodeProto>, &[String]),
        else_branch: (Vec<NodeProto>, &[String]),
        types: &[(i32, Vec<Dim>)],
        outputs: &[&str],
    ) {
        let graph = |name: String, nodes: Vec<NodeProto>, outs: &[String]| GraphProto {
            node: nodes,
            name,
            output: outs
                .iter()
                .zip(types)
                .map(|(o, (elem, dims))| value_info(o, *elem, dims))
                .collect(),
            ..Default::default()
        };
        let then_g = graph(format!("layer{l}_execute"), then_branch.0, then_branch.1);
        let else_g = graph(format!("layer{l}_skip"), else_branch.0, else_branch.1);
        self.b.node(
            "If",
            &[cond],
            outputs,
            vec![attr_g("then_branch", then_g), attr_g("else_branch", else_g)],
        );
    }
}
