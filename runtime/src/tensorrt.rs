//! TensorRT deployments, host side: the manifest that `dlo-compile build --target tensorrt` writes beside
//! its serialized engines, and the bookkeeping a driver needs around them (which profile admits a prompt,
//! how large a decode cache to allocate, which cache slots each layer has filled).
//!
//! A deployment directory holds `manifest.json`, `prefill.engine`, `decode.engine`, and the tokenizer
//! (`tokenizer.json`, `tokenizer_config.json`) when the source had one. The engines are the ONNX graphs of
//! `dlo_compiler::onnx` (batch 1) built by TensorRT: `prefill` takes the prompt (`input_ids [1, seq]`, no
//! past) and `decode` one token against fixed-capacity, position-indexed KV caches
//! (`past_key.l [1, kv, capacity, hd]`; layer-skip layers also `past_valid.l [1, capacity]`), so a layer that
//! a token skips leaves its slot empty: the per-layer ragged cache, laid out densely.
//!
//! [`Manifest::read`] checks a manifest against its engines (sizes and CRC-32s) and against itself (one
//! entry per layer, the I/O tensors the routed layers imply, sane profiles) before anything is
//! deserialized. Running the engines needs TensorRT and a GPU, neither of which this crate links.

#[cfg(feature = "tensorrt")]
mod engine;
mod library;

#[cfg(feature = "tensorrt")]
pub use engine::Engines;
pub use library::{find_library, LibDir, BUILDER_LIB, PARSER_LIB};
#[cfg(feature = "tensorrt")]
pub use library::{load_library, ErrorLog};

use crate::{Error, Result};
use dlo_passes::RoutedUnit;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the manifest in a deployment directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest's `format` field.
pub const FORMAT: &str = "dlo-tensorrt";
/// The manifest version this crate reads and writes.
pub const VERSION: u32 = 1;
/// The most rows TensorRT's `TopK` selects (`K ≤ 3840`, checked when an engine runs): the most prompt
/// tokens a routed prefill engine (which compacts executed rows with `TopK`) accepts.
pub const TOPK_MAX: usize = 3840;

/// Everything a runtime needs to drive a deployment's engines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`] for this crate.
    pub version: u32,
    /// The TensorRT library that built the engines, and how.
    pub tensorrt: BuildInfo,
    /// The model's shape.
    pub model: ModelShape,
    /// One entry per decoder layer.
    pub layers: Vec<LayerEntry>,
    /// The prompt engine.
    pub prefill: EngineEntry,
    /// The one-token engine.
    pub decode: EngineEntry,
    /// `tokenizer.json` in the same directory (with `tokenizer_config.json`), when the source had one.
    pub tokenizer: Option<String>,
    /// The chat template's source (also in `tokenizer_config.json`).
    pub chat_template: Option<String>,
    /// Token ids that end generation.
    pub stop_tokens: Vec<u32>,
    /// The beginning-of-sequence id, when the tokenizer prepends one.
    pub bos_token_id: Option<u32>,
}

/// Which library built the engines, and with which settings: an engine runs only on the library version that
/// built it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildInfo {
    /// `TensorRT-RTX` or `TensorRT`.
    pub library: String,
    /// `major.minor.patch`.
    pub version: String,
    /// The library's build number (`getInferLibBuildVersion`).
    pub build: i32,
    /// Builder settings that change the engine (flags, precision).
    pub flags: Vec<String>,
}

/// The model dimensions a driver needs to allocate buffers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Vocabulary size (logits' last dimension).
    pub vocab_size: usize,
    /// Positions the engines' RoPE tables cover: no token may sit at this position or beyond.
    pub max_positions: usize,
    /// Element type of activations, caches and logits (`float32`).
    pub dtype: String,
}

/// What a layer routes and how its cache is laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    /// `none`, `mlp` or `layer`.
    pub routed: String,
    /// The router-logit threshold above which the unit executes (`0` is the reference rule); `None` for an
    /// unrouted layer.
    pub threshold: Option<f32>,
    /// `ragged` when tokens that skip the layer leave their cache slot empty (a validity mask travels with
    /// the cache), else `dense`.
    pub kv: String,
}

impl LayerEntry {
    /// The routed unit this entry names.
    pub fn unit(&self) -> Option<RoutedUnit> {
        match self.routed.as_str() {
            "none" => Some(RoutedUnit::None),
            "mlp" => Some(RoutedUnit::Mlp),
            "layer" => Some(RoutedUnit::Layer),
            _ => None,
        }
    }

    /// The entry of a layer with `unit` and `threshold`.
    pub fn new(unit: RoutedUnit, threshold: Option<f32>) -> LayerEntry {
        let (routed, kv) = match unit {
            RoutedUnit::None => ("none", "dense"),
            RoutedUnit::Mlp => ("mlp", "dense"),
            RoutedUnit::Layer => ("layer", "ragged"),
        };
        LayerEntry {
            routed: routed.into(),
            threshold: if unit == RoutedUnit::None {
                None
            } else {
                Some(threshold.unwrap_or(0.0))
            },
            kv: kv.into(),
        }
    }
}

/// One serialized engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineEntry {
    /// File name in the deployment directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of its bytes.
    pub crc32: u32,
    /// The optimisation profile of its one dynamic dimension.
    pub profile: Profile,
    /// Input tensors, in binding order.
    pub inputs: Vec<IoTensor>,
    /// Output tensors, in binding order.
    pub outputs: Vec<IoTensor>,
    /// What the parsed network contained (the evidence that routing survived as conditional work).
    pub network: NetworkCounts,
    /// Milliseconds the builder took (an integer: the manifest reads back exactly).
    pub build_ms: u64,
}

/// An engine input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoTensor {
    /// Binding name.
    pub name: String,
    /// `float32`, `int64` or `bool`.
    pub dtype: String,
    /// Dimensions: a number, or the name of the profile's dynamic dimension.
    pub shape: Vec<Dim>,
}

/// A tensor dimension in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// The dynamic dimension of that name (`seq`, `capacity`).
    Dynamic(String),
}

/// An optimisation profile: the sizes one dynamic dimension may take, and the size TensorRT tunes for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The dimension (`seq` for prefill, `capacity` for decode).
    pub dim: String,
    /// Smallest size.
    pub min: usize,
    /// Size the builder optimises for.
    pub opt: usize,
    /// Largest size.
    pub max: usize,
}

impl Profile {
    /// Parses `MIN,OPT,MAX` for dimension `dim` and checks `1 ≤ MIN ≤ OPT ≤ MAX ≤ limit`, where `limit` is the
    /// longest context the model takes (`what` names the option in errors).
    pub fn parse(what: &str, dim: &str, s: &str, limit: usize) -> Result<Profile> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let nums: Option<Vec<usize>> = parts.iter().map(|p| p.parse().ok()).collect();
        let p = match nums.as_deref() {
            Some(&[min, opt, max]) => Profile {
                dim: dim.into(),
                min,
                opt,
                max,
            },
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{what} `{s}`: expected three sizes MIN,OPT,MAX, e.g. 1,64,256"
                )))
            }
        };
        p.check(what, limit)?;
        Ok(p)
    }

    /// Checks `1 ≤ min ≤ opt ≤ max ≤ limit`.
    pub fn check(&self, what: &str, limit: usize) -> Result<()> {
        match self.problem(limit) {
            Some(p) => Err(Error::InvalidArgument(format!("{what} {p}"))),
            None => Ok(()),
        }
    }

    /// What is wrong with the profile for a model of `limit` positions, if anything.
    fn problem(&self, limit: usize) -> Option<String> {
        let Profile { min, opt, max, .. } = *self;
        if min == 0 || min > opt || opt > max {
            Some(format!("{min},{opt},{max}: need 1 ≤ MIN ≤ OPT ≤ MAX"))
        } else if max > limit {
            Some(format!(
                "{min},{opt},{max}: MAX {max} is longer than the model's context ({limit} positions)"
            ))
        } else {
            None
        }
    }

    /// What is wrong with this as the prefill profile of a routed model, if anything: routed prefill engines
    /// compact the executed rows with TensorRT's `TopK`, which selects at most [`TOPK_MAX`] rows.
    pub fn routed_prefill_problem(&self) -> Option<String> {
        let Profile { min, opt, max, .. } = *self;
        (max > TOPK_MAX).then(|| {
            format!(
                "{min},{opt},{max}: TensorRT's TopK takes at most {TOPK_MAX} rows, and a routed prefill engine \
                 compacts its executed rows with it; use MAX ≤ {TOPK_MAX}"
            )
        })
    }

    /// Whether the profile admits size `n`.
    pub fn admits(&self, n: usize) -> bool {
        (self.min..=self.max).contains(&n)
    }
}

/// Layer counts of a parsed TensorRT network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCounts {
    /// All layers.
    pub layers: usize,
    /// `IIfConditional` blocks (one condition layer each).
    pub conditionals: usize,
    /// `TopK` layers (each compacts one routed layer's executed rows).
    pub topk: usize,
    /// Gather layers (routed layers gather their executed rows into a dense tile; embeddings gather too).
    pub gathers: usize,
    /// Scatter layers (executed rows written back).
    pub scatters: usize,
}

impl Manifest {
    /// Reads `dir/manifest.json` and checks it: format and version, one layer entry per layer with a known
    /// unit, the I/O tensors each engine needs for that schedule, sane profiles, and each engine file's size
    /// and CRC-32. Errors name the file and the problem.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let m = Manifest::read_unverified(dir)?;
        for stage in [Stage::Prefill, Stage::Decode] {
            m.engine_bytes(dir, stage)?;
        }
        Ok(m)
    }

    /// [`Manifest::read`] without the engine files: the manifest parsed and checked against itself.
    fn read_unverified(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not a dlo TensorRT manifest: {e}")))?;
        m.check(&path)?;
        Ok(m)
    }

    /// The bytes of `stage`'s engine file in `dir`, checked against the manifest's size and CRC-32.
    pub fn engine_bytes(&self, dir: &Path, stage: Stage) -> Result<Vec<u8>> {
        let e = self.engine(stage);
        let path = dir.join(&e.file);
        let bytes = std::fs::read(&path).map_err(|err| Error::io(&path, err))?;
        if bytes.len() as u64 != e.bytes {
            return Err(Error::format(
                &path,
                format!(
                    "{} bytes, the manifest says {}: the engine does not match its manifest",
                    bytes.len(),
                    e.bytes
                ),
            ));
        }
        let crc = crc32fast::hash(&bytes);
        if crc != e.crc32 {
            return Err(Error::format(
                &path,
                format!(
                    "CRC-32 {crc:08x}, the manifest says {:08x}: the engine does not match its manifest",
                    e.crc32
                ),
            ));
        }
        Ok(bytes)
    }

    /// Checks the manifest's own consistency (not its engine files); `path` names it in errors.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::format(path, msg));
        if self.format != FORMAT {
            return bad(format!("format `{}`, expected `{FORMAT}`", self.format));
        }
        if self.version != VERSION {
            return bad(format!(
                "manifest version {}, this runtime reads version {VERSION}",
                self.version
            ));
        }
        let n = self.model.num_layers;
        if self.layers.len() != n {
            return bad(format!("{} layer entries for a {n}-layer model", self.layers.len()));
        }
        for (l, e) in self.layers.iter().enumerate() {
            let Some(unit) = e.unit() else {
                return bad(format!("layer {l}: routed `{}`, expected none, mlp or layer", e.routed));
            };
            let want = LayerEntry::new(unit, e.threshold);
            if e.kv != want.kv || e.threshold.is_some() != want.threshold.is_some() {
                return bad(format!(
                    "layer {l}: routed `{}` needs kv `{}` and {} threshold",
                    e.routed,
                    want.kv,
                    if unit == RoutedUnit::None { "no" } else { "a" }
                ));
            }
        }
        for (e, dim) in [(&self.prefill, "seq"), (&self.decode, "capacity")] {
            if e.profile.dim != dim {
                return bad(format!("{}: profile of `{}`, expected `{dim}`", e.file, e.profile.dim));
            }
            if let Some(p) = e.profile.problem(self.model.max_positions) {
                return bad(format!("{}: profile {p}", e.file));
            }
            if let Some(name) = self.missing_io(e, dim == "capacity") {
                return bad(format!(
                    "{}: no I/O tensor `{name}`, which this model's layers need",
                    e.file
                ));
            }
        }
        for i in &self.decode.inputs {
            let Some(rest) = i.name.strip_prefix("past_") else {
                continue;
            };
            let fed = self.decode.outputs.iter().find(|o| o.name == format!("present_{rest}"));
            if fed.is_none_or(|o| o.shape != i.shape || o.dtype != i.dtype) {
                return bad(format!(
                    "{}: input `{}` has no output `present_{rest}` of the same dtype and shape to feed it",
                    self.decode.file, i.name
                ));
            }
        }
        if self.routed_layers() > 0 {
            if let Some(p) = self.prefill.profile.routed_prefill_problem() {
                return bad(format!("{}: profile {p}", self.prefill.file));
            }
        }
        Ok(())
    }

    /// Routed layers.
    pub fn routed_layers(&self) -> usize {
        self.layers.iter().filter(|e| e.routed != "none").count()
    }

    /// The first I/O tensor that `e` lacks for this model's layers.
    fn missing_io(&self, e: &EngineEntry, decode: bool) -> Option<String> {
        let has = |list: &[IoTensor], name: &str| list.iter().any(|t| t.name == name);
        let (need_in, need_out) = self.required_io(decode);
        let missing_in = need_in.into_iter().find(|n| !has(&e.inputs, n));
        missing_in.or_else(|| need_out.into_iter().find(|n| !has(&e.outputs, n)))
    }

    /// The names of the inputs and outputs the prefill (or `decode`) engine must have for these layers.
    pub fn required_io(&self, decode: bool) -> (Vec<String>, Vec<String>) {
        let mut inputs = vec!["input_ids".to_string()];
        let mut outputs = vec!["logits".to_string()];
        if decode {
            inputs.push("position_ids".into());
        }
        for (l, entry) in self.layers.iter().enumerate() {
            if decode {
                inputs.extend([format!("past_key.{l}"), format!("past_value.{l}")]);
            }
            outputs.extend([format!("present_key.{l}"), format!("present_value.{l}")]);
            if entry.routed != "none" {
                outputs.extend([format!("exec.{l}"), format!("router_logit.{l}")]);
            }
            if entry.routed == "layer" {
                outputs.push(format!("present_valid.{l}"));
                if decode {
                    inputs.push(format!("past_valid.{l}"));
                }
            }
        }
        (inputs, outputs)
    }

    /// The decode cache capacity to allocate for a sequence that will reach `tokens` tokens: the next power
    /// of two at or above it, clamped into the decode profile. An error when the profile cannot hold it.
    pub fn decode_capacity(&self, tokens: usize) -> Result<usize> {
        let p = &self.decode.profile;
        if tokens > p.max {
            return Err(Error::InvalidArgument(format!(
                "{tokens} tokens do not fit the decode engine's cache (at most {}; rebuild with a larger \
                 --kv-profile)",
                p.max
            )));
        }
        Ok(tokens.max(1).next_power_of_two().clamp(p.min, p.max))
    }

    /// Checks that the prefill engine takes a prompt of `seq` tokens.
    pub fn check_prompt(&self, seq: usize) -> Result<()> {
        let p = &self.prefill.profile;
        if p.admits(seq) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "a prompt of {seq} tokens is outside the prefill engine's profile ({}..={} tokens)",
                p.min, p.max
            )))
        }
    }

    /// Bytes of one decode KV cache (keys, values and validity masks of every layer) at `capacity` slots.
    pub fn kv_bytes(&self, capacity: usize) -> u64 {
        let m = &self.model;
        let per_layer = 2 * (m.kv_heads * capacity * m.head_dim * 4) as u64;
        let masks = self.layers.iter().filter(|e| e.kv == "ragged").count() as u64 * capacity as u64;
        per_layer * m.num_layers as u64 + masks
    }

    /// Writes the manifest as pretty JSON to `dir/manifest.json` (a temporary file, then renamed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::format(&path, e.to_string()))?;
        dlo_passes::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| Error::io(&e.path, e.source))
    }
}

/// Which engine of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The prompt engine (dynamic `seq`).
    Prefill,
    /// The one-token engine (dynamic `capacity`).
    Decode,
}

/// One I/O tensor of an engine at concrete sizes: what a driver allocates and binds by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Tensor name.
    pub name: String,
    /// Whether the engine reads it.
    pub input: bool,
    /// `float32`, `int64` or `bool`.
    pub dtype: String,
    /// Concrete dimensions.
    pub shape: Vec<usize>,
    /// Bytes of a dense buffer of that shape.
    pub bytes: usize,
}

impl Manifest {
    /// The engine of `stage`.
    pub fn engine(&self, stage: Stage) -> &EngineEntry {
        match stage {
            Stage::Prefill => &self.prefill,
            Stage::Decode => &self.decode,
        }
    }

    /// Every input and output of `stage`'s engine with its dynamic dimension set to `size` (prompt tokens for
    /// prefill, cache capacity for decode); an error when the profile does not admit `size`, or a tensor has
    /// a dtype or dimension the runtime does not know.
    pub fn bindings(&self, stage: Stage, size: usize) -> Result<Vec<Binding>> {
        let e = self.engine(stage);
        if !e.profile.admits(size) {
            return Err(Error::InvalidArgument(format!(
                "{}: {} {size} is outside the engine's profile ({}..={})",
                e.file, e.profile.dim, e.profile.min, e.profile.max
            )));
        }
        let inputs = e.inputs.iter().map(|t| (t, true));
        let outputs = e.outputs.iter().map(|t| (t, false));
        inputs
            .chain(outputs)
            .map(|(t, input)| {
                let elem = match t.dtype.as_str() {
                    "float32" => 4,
                    "int64" => 8,
                    "bool" => 1,
                    d => {
                        return Err(Error::InvalidArgument(format!(
                            "{}: `{}` has dtype `{d}`",
                            e.file, t.name
                        )))
                    }
                };
                let shape = t
                    .shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => Ok(*n as usize),
                        Dim::Dynamic(name) if *name == e.profile.dim => Ok(size),
                        Dim::Dynamic(name) => Err(Error::InvalidArgument(format!(
                            "{}: `{}` has dimension `{name}`, not the profile's `{}`",
                            e.file, t.name, e.profile.dim
                        ))),
                    })
                    .collect::<Result<Vec<usize>>>()?;
                Ok(Binding {
                    bytes: elem * shape.iter().product::<usize>(),
                    name: t.name.clone(),
                    input,
                    dtype: t.dtype.clone(),
                    shape,
                })
            })
            .collect()
    }

    /// The decode outputs that are the next step's inputs, as `(present, past)` name pairs: every layer's
    /// keys and values, and the validity mask of each ragged layer. Each pair has the same dtype and shape.
    pub fn decode_feedback(&self) -> Vec<(String, String)> {
        self.decode
            .outputs
            .iter()
            .filter_map(|o| {
                let past = o.name.strip_prefix("present_").map(|rest| format!("past_{rest}"))?;
                self.decode
                    .inputs
                    .iter()
                    .any(|i| i.name == past && i.shape == o.shape && i.dtype == o.dtype)
                    .then(|| (o.name.clone(), past))
            })
            .collect()
    }
}

/// Whether `path` is a TensorRT deployment directory (it holds a manifest).
pub fn is_deployment(path: &Path) -> bool {
    path.join(MANIFEST_FILE).is_file()
}

/// Why the deployment in `dir` cannot run as a model here: its manifest or engines are wrong, the library
/// or a GPU is missing, or (all present) this runtime does not execute TensorRT engines yet.
pub fn cannot_run(dir: &Path) -> Error {
    #[cfg(feature = "tensorrt")]
    {
        match find_library(None).and_then(|lib| Engines::open(dir, &lib)) {
            Err(e) => e,
            Ok(_) => Error::format(
                dir,
                "its TensorRT engines deserialize here, but this runtime does not execute TensorRT engines yet; \
                 run the native engine (dlo-compile build --target native)",
            ),
        }
    }
    #[cfg(not(feature = "tensorrt"))]
    {
        Error::format(
            dir.join(MANIFEST_FILE),
            "a TensorRT deployment, but this build has no TensorRT support (cargo feature `tensorrt`); run the \
             native engine (dlo-compile build --target native)",
        )
    }
}

/// Host-side state of a decode KV cache: its capacity, the next position, and for each ragged layer which
/// slots hold a key (the `past_valid.l` inputs). The device buffers themselves belong to the driver.
#[derive(Debug, Clone, PartialEq)]
pub struct KvBook {
    capacity: usize,
    len: usize,
    /// Per layer: `Some(valid)` for a ragged layer, `None` for a dense one (every slot below `len` valid).
    valid: Vec<Option<Vec<bool>>>,
}

impl KvBook {
    /// An empty cache of `capacity` slots for `m`'s layers.
    pub fn new(m: &Manifest, capacity: usize) -> KvBook {
        KvBook {
            capacity,
            len: 0,
            valid: m
                .layers
                .iter()
                .map(|e| (e.kv == "ragged").then(|| vec![false; capacity]))
                .collect(),
        }
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records a prefill of `seq` tokens; `executed(l)` gives a ragged layer's `present_valid.l` row.
    pub fn after_prefill(&mut self, seq: usize, mut executed: impl FnMut(usize) -> Vec<bool>) -> Result<()> {
        if self.len != 0 {
            return Err(Error::InvalidArgument("prefill into a cache that is not empty".into()));
        }
        self.reserve(seq)?;
        for (l, v) in self.valid.iter_mut().enumerate() {
            if let Some(v) = v {
                let row = executed(l);
                if row.len() != seq {
                    return Err(Error::InvalidArgument(format!(
                        "layer {l}: {} validity flags for a prompt of {seq} tokens",
                        row.len()
                    )));
                }
                v[..seq].copy_from_slice(&row);
            }
        }
        self.len = seq;
        Ok(())
    }

    /// Records one decoded token; `executed(l)` gives a ragged layer's decision for it.
    pub fn after_decode(&mut self, mut executed: impl FnMut(usize) -> bool) -> Result<()> {
        self.reserve(self.len + 1)?;
        let p = self.len;
        for (l, v) in self.valid.iter_mut().enumerate() {
            if let Some(v) = v {
                v[p] = executed(l);
            }
        }
        self.len += 1;
        Ok(())
    }

    /// Whether ragged layer `l` holds a key at `slot`; `None` for a dense layer.
    pub fn valid(&self, l: usize, slot: usize) -> Option<bool> {
        self.valid.get(l)?.as_ref().map(|v| v[slot])
    }

    /// Keys layer `l` holds.
    pub fn keys_in(&self, l: usize) -> usize {
        match &self.valid[l] {
            Some(v) => v[..self.len].iter().filter(|&&x| x).count(),
            None => self.len,
        }
    }

    /// The cache must hold `tokens` tokens.
    fn reserve(&self, tokens: usize) -> Result<()> {
        if tokens > self.capacity {
            Err(Error::InvalidArgument(format!(
                "the KV cache holds {} tokens; {tokens} do not fit (allocate a larger capacity)",
                self.capacity
            )))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
