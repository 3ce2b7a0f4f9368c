//! ONNX lowering (`dlo-compile build --target onnx -o DIR`): a dense or DLO-routed Llama-family model
//! becomes two ONNX models (IR 9, opset 17, f32) that onnxruntime runs and TensorRT can build engines from.
//! With [`Elem::F64`] (`--dtype f64`) every floating-point tensor is f64 instead: a verification target, not a
//! deployment one (see Numerics below).
//!
//! # Files
//! - `prefill.onnx`: a prompt, no past.
//! - `decode.onnx`: one token with a KV cache.
//! - `weights.bin` (external-data mode only): the weights and RoPE tables, shared by both models, each
//!   tensor at a 4096-byte-aligned offset (`TensorProto.data_location = EXTERNAL`).
//!
//! External data is used when the tensors total more than 1.5 GB ([`ExternalData::Auto`]) or always
//! on request; otherwise each model carries its tensors inline. Weight initializers keep their HF names
//! and `[out, in]` layout (projections are `Gemm` with `transB = 1`).
//!
//! # Interface
//! Names use the layer index `l`; `kv` = KV heads, `hd` = head dim, `V` = vocabulary.
//!
//! | model | inputs | outputs |
//! |---|---|---|
//! | prefill | `input_ids [1, seq]` i64 (positions `0..seq`) | `logits [1, seq, V]`, `present_key.l`/`present_value.l [1, kv, seq, hd]`, routed: `exec.l [1, seq]` bool, `router_logit.l [1, seq]`, layer-skip: `present_valid.l [1, seq]` bool |
//! | decode | `input_ids [1, 1]`, `position_ids [1, 1]` i64, `past_key.l`/`past_value.l [1, kv, capacity, hd]`, layer-skip: `past_valid.l [1, capacity]` bool | `logits [1, 1, V]`, `present_key.l`/`present_value.l [1, kv, capacity, hd]`, routed: `exec.l`, `router_logit.l [1, 1]`, layer-skip: `present_valid.l [1, capacity]` |
//!
//! # KV cache: fixed capacity, indexed by position
//! Every layer's cache is a fixed-capacity buffer `[1, kv, capacity, hd]` whose slot `s` holds the token
//! at position `s`. A decode step at position `p` writes slot `p` (`ScatterND`) and attends over slots
//! `≤ p`. `capacity` is a dynamic dimension chosen by the caller (any value `> p`); after prefill the
//! caller copies the `seq` prefill slots into buffers of that capacity (zero / `false` padding), and
//! feeds each step's `present_*` back as the next step's `past_*`.
//!
//! Why not the usual growing `[1, kv, P, hd]` cache: with `layer` skipping the token that skips a layer
//! must not add a key to that layer's cache, so the present cache would be `P + 1` long in one `If`
//! branch and `P` long in the other, and TensorRT requires both branches of an `If` to produce the
//! **same shape**. With fixed capacity both branches return the same buffers; a per-layer validity mask
//! (`past_valid.l` → `present_valid.l`) records which slots hold keys of tokens that executed the layer,
//! and attention of a layer-skip layer sees exactly its valid slots. This is the runtime's per-layer
//! ragged cache (`dlo-method.md` §8.2) laid out densely: logits and decisions are the same; the memory
//! of skipped slots and their masked attention work are not saved (the projections and MLP are).
//!
//! # Conditional execution
//! Routed layers compute the router logit `z = wᵀh` on the layer-input residual and the gate
//! `g = 0.5α + β(σ(z) − 0.5)`; a token executes iff `z > 0` (the reference rule, `dlo-method.md` §4.2).
//!
//! - **decode** (one token): an `If` on the 0-D bool `z > 0`. `mlp` skipping: attention always runs; the
//!   then-branch returns `a + g·MLP(RMSNorm₂(a))`, the else-branch `Identity(a)`. `layer` skipping: the
//!   then-branch runs the whole layer, writes K/V into slot `p` and sets `valid[p]`; the else-branch
//!   returns `h`, K, V and the mask unchanged (`Identity`). Branch outputs have identical types and
//!   shapes and distinct names, as TensorRT requires; skipped work is really skipped.
//! - **prefill** (many tokens): gather/scatter ([`PrefillForm::GatherScatter`], the default; a masked dense
//!   form, [`PrefillForm::Masked`], computes every row and selects with `Where` instead). The router runs on every row; a `TopK`
//!   compaction gives the executed rows in order (not `NonZero`, which TensorRT builds only as a plugin); `mlp` skipping gathers their post-attention rows (`GatherND`), runs the MLP on that
//!   dense tile and scatters the results back (`ScatterND`). `layer` skipping gathers the executed rows
//!   of the layer input, runs the whole layer on them (they attend only among themselves, causally by
//!   their original positions, RoPE at those positions), scatters the outputs back, and scatters their
//!   K/V into zeroed position-indexed cache rows (`present_valid.l` = the decisions).
//!
//! # Numerics
//! The graphs follow the runtime's forward (RMSNorm, rotate-half RoPE from the runtime's own tables, additive
//! mask −1e30, gate constants); `scripts/check_onnx.py` compares logits and routing against a runtime
//! reference with onnxruntime. In f32, real models' logits move by 1e-4–1e-3 with summation order alone (the
//! runtime's cached decode differs from its own one-pass forward by as much), which would hide a small
//! lowering error. In f64 (weights, RoPE tables, constants, caches, logits and router logits all `DOUBLE`; no
//! `Cast`) against the runtime computing in f64, that noise drops to ~1e-12: agreement within 1e-4 there shows
//! that the lowering itself is exact.

pub mod builder;
pub mod lower;
pub mod proto;
#[cfg(test)]
mod tests;

pub use builder::Elem;
use builder::{raw_tensor, Registry, Source, TensorSpec};
use dlo_passes::{ModelConfig, RoutedUnit};
use dlo_runtime::Weights;
use lower::LoweredGraph;
use prost::Message;
use proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto};
use std::io::Write;
use std::path::{Path, PathBuf};

/// ONNX IR version written.
pub const IR_VERSION: i64 = 9;
/// Default-domain opset written.
pub const OPSET: i64 = 17;
/// [`ExternalData::Auto`] switches to external data above this many bytes of tensors.
pub const AUTO_EXTERNAL_BYTES: u64 = 1_500_000_000;
/// Alignment of tensors in `weights.bin` (a page, so that runtimes can map it).
pub const EXTERNAL_ALIGN: u64 = 4096;
/// File name of the external weights.
pub const WEIGHTS_FILE: &str = "weights.bin";
/// Protobuf's hard message-size limit: inline models must stay below it.
const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// Where the tensors go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// External above [`AUTO_EXTERNAL_BYTES`], inline below.
    #[default]
    Auto,
    /// Always `weights.bin`.
    Always,
    /// Always inline (fails above protobuf's 2 GiB limit).
    Never,
}

/// How `prefill.onnx` lowers routed layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrefillForm {
    /// `TopK` compaction + `GatherND`/`ScatterND`: skipped rows cost nothing (data-dependent shapes).
    #[default]
    GatherScatter,
    /// Every row computed, results selected with `Where`: static shapes, no savings; for backends without
    /// data-dependent shapes.
    Masked,
}

/// Options of [`export_onnx`].
#[derive(Debug, Clone, Default)]
pub struct OnnxOptions {
    /// Inline or external tensors.
    pub external_data: ExternalData,
    /// Lowering of routed layers in prefill.
    pub prefill: PrefillForm,
    /// Positions covered by the RoPE tables (the longest context the models accept); default
    /// `max_position_embeddings`.
    pub max_positions: Option<usize>,
    /// Element type of every floating-point tensor: f32 (deployment) or f64 (verification of the lowering
    /// against the runtime computing in f64).
    pub elem: Elem,
    /// Per layer, the router-logit threshold above which a routed unit executes (a calibrated budget, see
    /// `dlo-compile build --budget`); `None` is the reference rule, `z > 0`.
    pub thresholds: Option<Vec<f32>>,
}

/// What [`export_onnx`] wrote.
#[derive(Debug, Clone)]
pub struct OnnxReport {
    /// The files written (`prefill.onnx`, `decode.onnx`, and `weights.bin` in external mode).
    pub files: Vec<PathBuf>,
    /// Whether tensors are in `weights.bin`.
    pub external_data: bool,
    /// Bytes of tensor data (weights and RoPE tables, in the export's element type).
    pub tensor_bytes: u64,
    /// Nodes of the prefill graph.
    pub prefill_nodes: usize,
    /// Nodes of the decode graph, `If` branches included.
    pub decode_nodes: usize,
    /// Routed layers (each an `If` in the decode graph).
    pub routed_layers: usize,
    /// Positions the RoPE tables cover.
    pub max_positions: usize,
}

/// Errors of the ONNX export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// Reading the checkpoint's tensors failed (missing tensor, wrong shape, ...).
    #[error(transparent)]
    Weights(#[from] dlo_runtime::Error),
    /// Writing an output file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An option is out of range.
    #[error("invalid ONNX export option: {0}")]
    InvalidOption(String),
    /// An inline model would exceed protobuf's 2 GiB limit.
    #[error(
        "{path}: {bytes} bytes of tensors do not fit an inline ONNX model (protobuf's 2 GiB limit); use external data"
    )]
    TooLarge { path: PathBuf, bytes: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OnnxError + '_ {
    move |source| OnnxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Both graphs of a model, lowered and checked against its weights, not yet encoded: [`export_onnx`] writes
/// them to files, [`LoweredModels::encode`] encodes one in memory with its tensors inline (for consumers that
/// take model bytes, such as TensorRT's parser).
pub struct LoweredModels<'a> {
    cfg: &'a ModelConfig,
    weights: &'a Weights,
    reg: Registry,
    prefill: LoweredGraph,
    decode: LoweredGraph,
    max_positions: usize,
}

/// One of the two graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    /// `prefill.onnx`: the prompt, no past.
    Prefill,
    /// `decode.onnx`: one token against the caches.
    Decode,
}

impl GraphKind {
    /// `prefill` or `decode`.
    pub fn as_str(self) -> &'static str {
        match self {
            GraphKind::Prefill => "prefill",
            GraphKind::Decode => "decode",
        }
    }
}

impl<'a> LoweredModels<'a> {
    /// Lowers both graphs for `cfg` as `opts` asks (its `external_data` is not used here) and checks every
    /// checkpoint tensor they need against the config.
    pub fn new(cfg: &'a ModelConfig, weights: &'a Weights, opts: &OnnxOptions) -> Result<Self, OnnxError> {
        let max_positions = opts.max_positions.unwrap_or(cfg.max_position_embeddings);
        if max_positions == 0 || max_positions > u32::MAX as usize {
            return Err(OnnxError::InvalidOption(format!(
                "max_positions must be between 1 and {}, found {max_positions}",
                u32::MAX
            )));
        }
        if let Some(t) = &opts.thresholds {
            if t.len() != cfg.num_hidden_layers || t.iter().any(|x| x.is_nan()) {
                return Err(OnnxError::InvalidOption(format!(
                    "{} router thresholds (NaN-free) are needed, one per layer; found {} ({} NaN)",
                    cfg.num_hidden_layers,
                    t.len(),
                    t.iter().filter(|x| x.is_nan()).count()
                )));
            }
        }
        let thresholds = opts.thresholds.as_deref();
        let mut reg = Registry::new(opts.elem);
        lower::register_rope_tables(cfg, &mut reg, max_positions)?;
        let prefill = lower::Lower::new(cfg, &mut reg, thresholds).prefill(opts.prefill == PrefillForm::Masked);
        let decode = lower::Lower::new(cfg, &mut reg, thresholds).decode();
        for spec in &reg.specs {
            if let Source::Checkpoint = spec.source {
                check_tensor(weights, spec)?;
            }
        }
        Ok(LoweredModels {
            cfg,
            weights,
            reg,
            prefill,
            decode,
            max_positions,
        })
    }

    /// The lowered graph of that kind.
    pub fn graph(&self, kind: GraphKind) -> &LoweredGraph {
        match kind {
            GraphKind::Prefill => &self.prefill,
            GraphKind::Decode => &self.decode,
        }
    }

    /// Bytes of tensor data (weights and RoPE tables, in the element type).
    pub fn tensor_bytes(&self) -> u64 {
        self.reg.total_bytes()
    }

    /// Positions the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Routed layers (each an `If` in the decode graph, a compaction in the prefill graph).
    pub fn routed_layers(&self) -> usize {
        (0..self.cfg.num_hidden_layers)
            .filter(|&l| self.cfg.routed_unit(l).is_routed())
            .count()
    }

    /// The serialized `ModelProto` of one graph with every tensor inline; an error above protobuf's 2 GiB.
    pub fn encode(&self, kind: GraphKind) -> Result<Vec<u8>, OnnxError> {
        if self.tensor_bytes() > PROTOBUF_LIMIT {
            return Err(OnnxError::TooLarge {
                path: PathBuf::from(format!("{}.onnx", kind.as_str())),
                bytes: self.tensor_bytes(),
            });
        }
        let refs = std::collections::HashMap::new();
        Ok(self.model(self.graph(kind), &refs)?.encode_to_vec())
    }

    /// The `ModelProto` of `g`: tensors in `external_refs` point into `weights.bin`, the others are inline.
    fn model(
        &self,
        g: &LoweredGraph,
        external_refs: &std::collections::HashMap<String, (u64, u64)>,
    ) -> Result<ModelProto, OnnxError> {
        let reg = &self.reg;
        let mut initializers: Vec<TensorProto> = Vec::with_capacity(g.used.len() + g.consts.len());
        for name in &g.used {
            let spec = reg
                .specs
                .iter()
                .find(|s| &s.name == name)
                .expect("graphs only use registered tensors");
            let dims: Vec<i64> = spec.dims.iter().map(|&d| d as i64).collect();
            initializers.push(match external_refs.get(name) {
                Some(&(offset, length)) => TensorProto {
                    dims,
                    data_type: reg.elem.onnx(),
                    name: name.clone(),
                    data_location: proto::DATA_LOCATION_EXTERNAL,
                    external_data: [
                        ("location", WEIGHTS_FILE.to_string()),
                        ("offset", offset.to_string()),
                        ("length", length.to_string()),
                    ]
                    .into_iter()
                    .map(|(k, v)| StringStringEntryProto {
                        key: k.into(),
                        value: v,
                    })
                    .collect(),
                    ..Default::default()
                },
                None => raw_tensor(
                    name,
                    reg.elem.onnx(),
                    &dims,
                    tensor_bytes(self.weights, spec, reg.elem)?,
                ),
            });
        }
        initializers.extend(g.consts.iter().cloned());
        Ok(model_proto(self.cfg, g, initializers))
    }
}

/// Writes `prefill.onnx` and `decode.onnx` (and `weights.bin` in external mode) for `cfg` into `out_dir`,
/// which is created if missing. Every tensor is checked against the config before anything is written;
/// files are written under temporary names and renamed at the end, so a failure leaves no partial model.
pub fn export_onnx(
    cfg: &ModelConfig,
    weights: &Weights,
    out_dir: &Path,
    opts: &OnnxOptions,
) -> Result<OnnxReport, OnnxError> {
    let lowered = LoweredModels::new(cfg, weights, opts)?;
    let total = lowered.tensor_bytes();
    let external = match opts.external_data {
        ExternalData::Auto => total > AUTO_EXTERNAL_BYTES,
        ExternalData::Always => true,
        ExternalData::Never => false,
    };
    if !external && total > PROTOBUF_LIMIT {
        return Err(OnnxError::TooLarge {
            path: out_dir.join("prefill.onnx"),
            bytes: total,
        });
    }
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let mut pending = Pending::default();
    let result = write_all(&lowered, out_dir, external, &mut pending);
    if let Err(e) = result {
        pending.discard();
        return Err(e);
    }
    let files = pending.commit()?;
    Ok(OnnxReport {
        files,
        external_data: external,
        tensor_bytes: total,
        prefill_nodes: lowered.prefill.node_count(),
        decode_nodes: lowered.decode.node_count(),
        routed_layers: lowered.routed_layers(),
        max_positions: lowered.max_positions,
    })
}

/// A checkpoint tensor the graphs need must exist with the shape the config implies.
fn check_tensor(weights: &Weights, spec: &TensorSpec) -> Result<(), OnnxError> {
    match weights.shape_of(&spec.name) {
        None => Err(dlo_runtime::Error::MissingTensor {
            path: weights.path().to_path_buf(),
            name: spec.name.clone(),
        }
        .into()),
        Some(found) if found != spec.dims => Err(dlo_runtime::Error::ShapeMismatch {
            path: weights.path().to_path_buf(),
            name: spec.name.clone(),
            expected: spec.dims.clone(),
            found,
        }
        .into()),
        Some(_) => Ok(()),
    }
}

/// The little-endian bytes of a registered tensor in `elem`. Checkpoint tensors are read in `elem` (as the
/// runtime loads them for a model of that dtype), then widened losslessly to f64 for [`Elem::bytes`].
fn tensor_bytes(weights: &Weights, spec: &TensorSpec, elem: Elem) -> Result<Vec<u8>, OnnxError> {
    let values: Vec<f64> = match &spec.source {
        Source::Generated(v) => return Ok(elem.bytes(v)),
        Source::Checkpoint => weights
            .get(&spec.name, &spec.dims, elem.dtype(), &candle_core::Device::Cpu)?
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F64))
            .and_then(|t| t.to_vec1())
            .map_err(dlo_runtime::Error::from)?,
    };
    Ok(elem.bytes(&values))
}

/// Temporary files written so far and their final names.
#[derive(Default)]
struct Pending {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Pending {
    fn temp_for(&mut self, dir: &Path, name: &str) -> Result<PathBuf, OnnxError> {
        let dst = dir.join(name);
        let tmp = dlo_passes::fsutil::temp_sibling(&dst).map_err(|e| io_err(&e.path)(e.source))?;
        self.files.push((tmp.clone(), dst));
        Ok(tmp)
    }
    fn discard(&self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
    fn commit(self) -> Result<Vec<PathBuf>, OnnxError> {
        let mut done = Vec::new();
        for (tmp, dst) in &self.files {
            if let Err(source) = std::fs::rename(tmp, dst) {
                self.discard();
                return Err(OnnxError::Io {
                    path: dst.clone(),
                    source,
                });
            }
            done.push(dst.clone());
        }
        Ok(done)
    }
}

fn write_all(lowered: &LoweredModels, dir: &Path, external: bool, pending: &mut Pending) -> Result<(), OnnxError> {
    // External mode: stream every tensor once into weights.bin; both models point into it.
    let reg = &lowered.reg;
    let mut external_refs = std::collections::HashMap::new();
    if external {
        let tmp = pending.temp_for(dir, WEIGHTS_FILE)?;
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut w = std::io::BufWriter::new(file);
        let mut offset = 0u64;
        for spec in &reg.specs {
            let pad = offset.next_multiple_of(EXTERNAL_ALIGN) - offset;
            w.write_all(&vec![0u8; pad as usize]).map_err(io_err(&tmp))?;
            offset += pad;
            let bytes = tensor_bytes(lowered.weights, spec, reg.elem)?;
            w.write_all(&bytes).map_err(io_err(&tmp))?;
            external_refs.insert(spec.name.clone(), (offset, bytes.len() as u64));
            offset += bytes.len() as u64;
        }
        w.into_inner()
            .map_err(|e| io_err(&tmp)(e.into_error()))?
            .sync_all()
            .map_err(io_err(&tmp))?;
    }
    for kind in [GraphKind::Prefill, GraphKind::Decode] {
        let model = lowered.model(lowered.graph(kind), &external_refs)?;
        let tmp = pending.temp_for(dir, &format!("{}.onnx", kind.as_str()))?;
        let bytes = model.encode_to_vec();
        drop(model);
        std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    }
    Ok(())
}

fn model_proto(cfg: &ModelConfig, g: &LoweredGraph, initializer: Vec<TensorProto>) -> ModelProto {
    let kinds = cfg.schedule();
    let list = |k: RoutedUnit| {
        kinds
            .iter()
            .enumerate()
            .filter(|(_, &x)| x == k)
            .map(|(l, _)| l.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let meta = [
        ("dlo.interface", "1".to_string()),
        ("dlo.num_layers", cfg.num_hidden_layers.to_string()),
        ("dlo.kv_heads", cfg.num_key_value_heads.to_string()),
        ("dlo.head_dim", cfg.head_dim.to_string()),
        ("dlo.vocab_size", cfg.vocab_size.to_string()),
        ("dlo.mlp_skip_layers", list(RoutedUnit::Mlp)),
        ("dlo.layer_skip_layers", list(RoutedUnit::Layer)),
        ("dlo.cache", "fixed-capacity, slot = position".to_string()),
    ];
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "dlo-compile".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: 1,
        doc_string: format!(
            "{} of a {}-layer Llama-family model, lowered by dlo",
            g.name, cfg.num_hidden_layers
        ),
        graph: Some(proto::GraphProto {
            node: g.nodes.clone(),
            name: g.name.clone(),
            initializer,
            input: g.inputs.clone(),
            output: g.outputs.clone(),
            ..Default::default()
        }),
        metadata_props: meta
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v,
            })
            .collect(),
    }
}
