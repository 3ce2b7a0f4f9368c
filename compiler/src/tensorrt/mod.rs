//! `dlo-compile build --target tensorrt`: TensorRT engines with conditional layers, from the compiler itself.
//!
//! The model is lowered to ONNX in memory ([`crate::onnx::LoweredModels`], every tensor inline), then
//! TensorRT-RTX's ONNX parser and builder run in-process (cargo feature `tensorrt`: the `trtx` crate, which
//! loads NVIDIA's libraries at run time; nothing of NVIDIA's is linked or committed). The output directory
//! holds `prefill.engine`, `decode.engine`, the tokenizer, and the manifest the runtime reads
//! ([`dlo_runtime::tensorrt::Manifest`]).
//!
//! Routing must survive as conditional work. Before building, the parsed networks are inspected: the decode
//! network must hold one `IIfConditional` per routed layer, and the prefill network one `TopK` compaction
//! and a scatter back per routed layer. A network where TensorRT's parser folded them into dense compute
//! fails the build. Building needs no GPU; running an engine does, with a TensorRT runtime matching the
//! manifest's version.
//!
//! The library is found at run time ([`find_library`]): `--trt-lib DIR`, else `$DLO_TRT_LIB`, else the folder
//! `scripts/fetch-assets.sh` installs (`$DLO_CACHE/pkgs/trt-rtx/onnxruntime_ep_nv_tensorrt_rtx`).

#[cfg(feature = "tensorrt")]
mod driver;
#[cfg(test)]
mod tests;

use crate::onnx::{GraphKind, LoweredModels, OnnxError, OnnxOptions};
use dlo_passes::{ModelConfig, RoutedUnit};
pub use dlo_runtime::tensorrt::{find_library, LibDir, BUILDER_LIB, PARSER_LIB};
use dlo_runtime::tensorrt::{
    BuildInfo, Dim, EngineEntry, IoTensor, LayerEntry, Manifest, ModelShape, NetworkCounts, Profile, FORMAT,
    MANIFEST_FILE, VERSION,
};
use dlo_runtime::{Tokenizer, Weights};
use std::path::{Path, PathBuf};

/// Default prefill profile (prompt tokens), shortened to the model's context.
pub const DEFAULT_PROFILE: [usize; 3] = [1, 64, 256];
/// Default decode profile (KV-cache capacity), shortened to the model's context.
pub const DEFAULT_KV_PROFILE: [usize; 3] = [1, 512, 2048];

/// What a TensorRT build needs besides the model.
#[derive(Debug, Clone)]
pub struct TrtOptions {
    /// Prompt lengths the prefill engine takes (`seq`).
    pub prefill: Profile,
    /// KV-cache capacities the decode engine takes (`capacity`); every decoded position must be below it.
    pub decode: Profile,
    /// The directory with TensorRT-RTX's libraries; `None`: `$DLO_TRT_LIB` or the assets folder.
    pub lib: Option<PathBuf>,
    /// Per layer, the router-logit threshold of a calibrated budget; `None`: the reference rule (`z > 0`).
    pub thresholds: Option<Vec<f32>>,
}

impl TrtOptions {
    /// Options from `MIN,OPT,MAX` strings (`None`: the defaults, shortened to the model's context), checked
    /// against `cfg`'s context length and, for a routed model's prefill, TensorRT's TopK limit of
    /// [`dlo_runtime::tensorrt::TOPK_MAX`] rows.
    pub fn parse(cfg: &ModelConfig, prefill: Option<&str>, decode: Option<&str>) -> Result<TrtOptions, TrtError> {
        let limit = cfg.max_position_embeddings;
        let default = |[min, opt, max]: [usize; 3]| {
            let max = max.min(limit);
            let opt = opt.min(max);
            format!("{},{opt},{max}", min.min(opt))
        };
        let prefill = prefill.map_or_else(|| default(DEFAULT_PROFILE), str::to_string);
        let decode = decode.map_or_else(|| default(DEFAULT_KV_PROFILE), str::to_string);
        let prefill = Profile::parse("--profile", "seq", &prefill, limit)?;
        let decode = Profile::parse("--kv-profile", "capacity", &decode, limit)?;
        let routed = (0..cfg.num_hidden_layers).any(|l| cfg.is_routed(l));
        if let Some(p) = prefill.routed_prefill_problem().filter(|_| routed) {
            return Err(TrtError::InvalidOption(format!("--profile {p}")));
        }
        Ok(TrtOptions {
            prefill,
            decode,
            lib: None,
            thresholds: None,
        })
    }
}

/// Why a TensorRT build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrtError {
    /// This binary was built without the `tensorrt` feature.
    #[error(
        "this dlo-compile was built without TensorRT support; rebuild with `cargo build --release --features \
         tensorrt` (needs libclang: apt-get install libclang-dev)"
    )]
    NotCompiled,
    /// TensorRT's ONNX parser refused a model.
    #[error("{engine}: TensorRT's ONNX parser refused the model: {problem}")]
    Parse {
        /// `prefill` or `decode`.
        engine: String,
        /// The parser's error.
        problem: String,
    },
    /// The builder failed.
    #[error("{engine}: building the TensorRT engine failed: {problem}")]
    Build {
        /// `prefill` or `decode`.
        engine: String,
        /// The builder's errors.
        problem: String,
    },
    /// The parsed network lost the routing (folded into dense compute).
    #[error("{engine}: routing did not survive into the TensorRT network: {problem}")]
    RoutingFolded {
        /// `prefill` or `decode`.
        engine: String,
        /// What was expected and found.
        problem: String,
    },
    /// An option is out of range.
    #[error("invalid TensorRT build option: {0}")]
    InvalidOption(String),
    /// Lowering to ONNX failed.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// Finding or loading the library, reading the model or the tokenizer, or writing the output failed.
    #[error(transparent)]
    Runtime(#[from] dlo_runtime::Error),
}

/// What [`build_tensorrt`] wrote.
#[derive(Debug, Clone)]
pub struct TrtReport {
    /// The output directory.
    pub dir: PathBuf,
    /// The manifest written there.
    pub manifest: Manifest,
    /// Seconds from lowering to the last file written.
    pub seconds: f64,
}

/// Builds prefill and decode engines for `cfg`/`weights` into `out` (a directory, replaced as a whole once
/// everything is written; an existing directory must be an earlier TensorRT output or empty).
pub fn build_tensorrt(
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: Option<&Tokenizer>,
    out: &Path,
    opts: &TrtOptions,
) -> Result<TrtReport, TrtError> {
    let t0 = std::time::Instant::now();
    if !available() {
        return Err(TrtError::NotCompiled);
    }
    check_output(out)?;
    let lib = find_library(opts.lib.as_deref())?;
    let info = load(&lib)?;
    let max_positions = opts.prefill.max.max(opts.decode.max);
    let onnx_opts = OnnxOptions {
        thresholds: opts.thresholds.clone(),
        max_positions: Some(max_positions),
        ..Default::default()
    };
    let lowered = LoweredModels::new(cfg, weights, &onnx_opts)?;
    let mut engines = Vec::new();
    for (kind, profile) in [(GraphKind::Prefill, &opts.prefill), (GraphKind::Decode, &opts.decode)] {
        let onnx = lowered.encode(kind)?;
        let built = build_one(kind.as_str(), &onnx, profile)?;
        drop(onnx);
        check_routing(kind, cfg, &built.counts)?;
        let g = lowered.graph(kind);
        let entry = EngineEntry {
            file: format!("{}.engine", kind.as_str()),
            bytes: built.bytes.len() as u64,
            crc32: crc32fast::hash(&built.bytes),
            profile: profile.clone(),
            inputs: g.inputs.iter().map(io_tensor).collect(),
            outputs: g.outputs.iter().map(io_tensor).collect(),
            network: built.counts,
            build_ms: (built.seconds * 1e3).round() as u64,
        };
        engines.push((entry, built.bytes));
    }
    let [(prefill, prefill_bytes), (decode, decode_bytes)]: [(EngineEntry, Vec<u8>); 2] =
        engines.try_into().expect("two engines");
    let thresholds = opts.thresholds.as_deref();
    let layers = (0..cfg.num_hidden_layers)
        .map(|l| LayerEntry::new(cfg.routed_unit(l), thresholds.map(|t| t[l])))
        .collect();
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tensorrt: info,
        model: ModelShape {
            num_layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            max_positions,
            dtype: "float32".into(),
        },
        layers,
        prefill,
        decode,
        tokenizer: tokenizer.map(|_| "tokenizer.json".to_string()),
        chat_template: tokenizer
            .and_then(|t| t.chat_template.as_ref())
            .map(|c| c.source.clone()),
        stop_tokens: dlo_runtime::engine::stop_tokens(cfg, tokenizer),
        bos_token_id: tokenizer.filter(|t| t.add_bos).and_then(|t| t.bos_token_id),
    };
    manifest.check(&out.join(MANIFEST_FILE))?;
    let fs = |e: dlo_passes::fsutil::FsError| TrtError::Runtime(dlo_runtime::Error::io(&e.path, e.source));
    let dir = dlo_passes::fsutil::AtomicDir::create(out).map_err(fs)?;
    for (entry, bytes) in [(&manifest.prefill, prefill_bytes), (&manifest.decode, decode_bytes)] {
        let path = dir.path().join(&entry.file);
        std::fs::write(&path, bytes).map_err(|e| dlo_runtime::Error::io(&path, e))?;
    }
    if let Some(t) = tokenizer {
        t.write_hf_files(dir.path())?;
    }
    manifest.write(dir.path())?;
    dir.commit_replace().map_err(fs)?;
    Ok(TrtReport {
        dir: out.to_path_buf(),
        manifest,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// An existing output must be a directory that is empty or holds an earlier build (a manifest), so that
/// replacing it loses nothing of the user's.
fn check_output(out: &Path) -> Result<(), TrtError> {
    let bad = |problem: &str| Err(dlo_runtime::Error::format(out, problem).into());
    match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if out.exists() => bad("exists and is not a directory; give a directory for the TensorRT engines"),
        Err(e) => Err(dlo_runtime::Error::io(out, e).into()),
        Ok(mut entries) => {
            if entries.next().is_none() || out.join(MANIFEST_FILE).is_file() {
                Ok(())
            } else {
                bad(
                    "exists and is not an earlier TensorRT build (no manifest.json); it would be replaced, so \
                     give a new or empty directory",
                )
            }
        }
    }
}

/// The routing of `cfg`'s routed layers must show in the parsed network of `kind`: one `IIfConditional` per
/// routed layer in decode; one `TopK` compaction and at least its scatters per routed layer in prefill.
fn check_routing(kind: GraphKind, cfg: &ModelConfig, c: &NetworkCounts) -> Result<(), TrtError> {
    let count = |unit: RoutedUnit| {
        (0..cfg.num_hidden_layers)
            .filter(|&l| cfg.routed_unit(l) == unit)
            .count()
    };
    let (mlp_skip, layer_skip) = (count(RoutedUnit::Mlp), count(RoutedUnit::Layer));
    let routed = mlp_skip + layer_skip;
    // Scatters back per routed layer: the MLP rows, or the layer's rows and its K and V.
    let scatters = routed + 2 * layer_skip;
    let problem = match kind {
        GraphKind::Decode if c.conditionals != routed => Some(format!(
            "{routed} routed layers but {} IIfConditional blocks",
            c.conditionals
        )),
        GraphKind::Prefill if c.topk != routed || c.scatters < scatters => Some(format!(
            "{routed} routed layers need {routed} TopK compactions and {scatters} scatters; found {} and {}",
            c.topk, c.scatters
        )),
        _ => None,
    };
    match problem {
        Some(problem) => Err(TrtError::RoutingFolded {
            engine: kind.as_str().into(),
            problem,
        }),
        None => Ok(()),
    }
}

/// An ONNX graph input or output as a manifest entry.
fn io_tensor(v: &crate::onnx::proto::ValueInfoProto) -> IoTensor {
    use crate::onnx::proto::tensor_shape_proto::dimension::Value as D;
    use crate::onnx::proto::{data_type, type_proto::Value as T};
    let (elem, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(T::TensorType(t)) => (t.elem_type, t.shape.as_ref().map(|s| s.dim.clone()).unwrap_or_default()),
        _ => (0, Vec::new()),
    };
    IoTensor {
        name: v.name.clone(),
        dtype: match elem {
            data_type::FLOAT => "float32",
            data_type::DOUBLE => "float64",
            data_type::INT64 => "int64",
            data_type::BOOL => "bool",
            _ => "unknown",
        }
        .into(),
        shape: dims
            .iter()
            .map(|d| match &d.value {
                Some(D::DimValue(n)) => Dim::Fixed(*n as u64),
                Some(D::DimParam(s)) => Dim::Dynamic(s.clone()),
                None => Dim::Dynamic("?".into()),
            })
            .collect(),
    }
}

/// A built engine.
#[derive(Debug)]
#[cfg_attr(not(feature = "tensorrt"), allow(dead_code))]
struct Built {
    /// The serialized engine.
    bytes: Vec<u8>,
    /// What the parsed network contained.
    counts: NetworkCounts,
    /// Seconds the builder took (parsing excluded).
    seconds: f64,
}

#[cfg(feature = "tensorrt")]
fn load(lib: &LibDir) -> Result<BuildInfo, TrtError> {
    driver::load(lib)
}

#[cfg(not(feature = "tensorrt"))]
fn load(_: &LibDir) -> Result<BuildInfo, TrtError> {
    Err(TrtError::NotCompiled)
}

#[cfg(feature = "tensorrt")]
fn build_one(name: &str, onnx: &[u8], profile: &Profile) -> Result<Built, TrtError> {
    driver::build(name, onnx, profile)
}

#[cfg(not(feature = "tensorrt"))]
fn build_one(_: &str, _: &[u8], _: &Profile) -> Result<Built, TrtError> {
    Err(TrtError::NotCompiled)
}

/// Whether this binary can build TensorRT engines (the `tensorrt` feature).
pub fn available() -> bool {
    cfg!(feature = "tensorrt")
}
