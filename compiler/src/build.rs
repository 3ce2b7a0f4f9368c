//! `dlo-compile build`: lower a checkpoint into a native engine file (`runtime/src/engine`).
//!
//! The checkpoint's config becomes the engine's plan (layer schedule, routed unit per layer, gate); its
//! tensors are written in the chosen storage dtype, with the tokenizer and chat template. With
//! `--calibration FILE` the model is run over that text to record each routed layer's router-logit
//! quantiles (so the runtime can set a budget at load time); with `--budget R` as well, per-layer thresholds
//! are calibrated so that every routed layer executes a fraction R of tokens, and checked on held-out text
//! (the last fifth of the calibration tokens, or `--heldout FILE`). `--budget capacity` instead calibrates
//! each layer to its trained capacity (the config's `dlo_capacity`), so inference executes what training
//! did, layer by layer. Without a budget the engine follows the reference rule (`z > 0`) bit for bit. ONNX
//! exports take a budget too: the calibrated thresholds become constants of the graphs (no load-time budget).
//!
//! [`Build::prepare`] opens the source and calibrates, so its warnings and budget are known before
//! [`Build::write`] writes the engine or the ONNX models; `dlo-compile build` prints them in that order.

use crate::calibrate::{calibrate, Calibration, CalibrationOptions, RateTarget};
use crate::onnx::{OnnxError, OnnxReport};
use crate::runtime_args::RuntimeArgs;
use candle_core::{DType, Device};
use dlo_passes::ModelConfig;
use dlo_runtime::engine::format::StorageDtype;
use dlo_runtime::engine::{open_any, write_engine_file_as, Budget, EnginePlan, Opened, Provenance, WeightsDtype};
use dlo_runtime::RuntimeOptions;
use dlo_runtime::{Error, Model, Result, Tokenizer, Weights};
use std::path::{Path, PathBuf};

/// Arguments of `dlo-compile build`; [`BuildPlan::from_args`] validates them.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Source: an HF directory, a GGUF file, or an existing engine.
    pub model: PathBuf,
    /// Output: the engine file (`--target native`) or a directory (`--target onnx|tensorrt`).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// What to build: a native engine file, ONNX models (prefill + decode) for onnxruntime / TensorRT, or
    /// TensorRT engines (prefill + decode, with a manifest for the runtime).
    #[arg(long, default_value = "native", value_parser = ["native", "onnx", "tensorrt"])]
    pub target: String,
    /// TensorRT: prompt lengths the prefill engine takes, MIN,OPT,MAX (OPT is what TensorRT tunes for).
    /// Default 1,64,256, shortened to the model's context.
    #[arg(long)]
    pub profile: Option<String>,
    /// TensorRT: KV-cache capacities the decode engine takes, MIN,OPT,MAX (a sequence can reach MAX tokens).
    /// Default 1,512,2048, shortened to the model's context.
    #[arg(long)]
    pub kv_profile: Option<String>,
    /// TensorRT: the directory with TensorRT-RTX 1.7.1's libraries (default: $DLO_TRT_LIB, else the folder
    /// scripts/fetch-assets.sh fills).
    #[arg(long)]
    pub trt_lib: Option<PathBuf>,
    /// Storage of the engine's weights: f32, bf16, f16, or a ggml block format (q8_0, q4_0, q4_1, q5_0, q5_1,
    /// q2_k … q6_k) for the projections (embeddings then q8_0, norms and routers f32). Default: as the source
    /// stores them (a quantized GGUF's blocks are copied, floats become f32). For ONNX the element type of
    /// the models: f32 (deployment, the default) or f64 (verification against the runtime computing in f64).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Execution rate of routed units: a number in (0, 1] (the same rate in every routed layer), or
    /// `capacity` (each layer its trained capacity, `dlo_capacity`); needs --calibration.
    #[arg(long, value_parser = parse_budget)]
    pub budget: Option<BudgetArg>,
    /// Text file to calibrate router thresholds on (also records quantiles for load-time budgets).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Held-out text to check the calibrated rate on (default: the last fifth of the calibration text).
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// Most calibration tokens to use.
    #[arg(long, default_value_t = 32768)]
    pub calibration_tokens: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 128)]
    pub chunk_len: usize,
    /// Where calibration runs the model, and with how many threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The `--budget` of a build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetArg {
    /// The same execution rate in every routed layer.
    Rate(f64),
    /// Each routed layer at its trained capacity.
    Capacity,
}

fn parse_budget(s: &str) -> std::result::Result<BudgetArg, String> {
    match s {
        "capacity" => Ok(BudgetArg::Capacity),
        _ => s
            .parse()
            .map(BudgetArg::Rate)
            .map_err(|_| format!("expected a rate in (0, 1] or `capacity`, found `{s}`")),
    }
}

/// What `dlo-compile build` produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A native engine file (`runtime/src/engine`).
    Native,
    /// ONNX models in a directory ([`crate::onnx`]; reference routing) computing in this element type.
    Onnx(crate::onnx::Elem),
    /// TensorRT engines and their manifest in a directory ([`crate::tensorrt`]).
    TensorRt {
        /// Prefill profile, `MIN,OPT,MAX` (checked against the model once it is open); `None`: the default.
        profile: Option<String>,
        /// Decode profile; `None`: the default.
        kv_profile: Option<String>,
        /// Library directory.
        lib: Option<PathBuf>,
    },
}

/// A validated build request.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    /// Source checkpoint.
    pub source: PathBuf,
    /// What to build.
    pub target: Target,
    /// Output engine file.
    pub output: PathBuf,
    /// Storage of a native engine's weights; `None`: as the source stores them (f32 for ONNX, whose element type is
    /// in [`Target::Onnx`]).
    pub dtype: Option<StorageDtype>,
    /// Target execution rates.
    pub budget: Option<BudgetArg>,
    /// Calibration text file.
    pub calibration: Option<PathBuf>,
    /// Held-out text file.
    pub heldout: Option<PathBuf>,
    /// Most calibration tokens.
    pub calibration_tokens: usize,
    /// Tokens per calibration sequence.
    pub chunk_len: usize,
    /// How calibration runs the model (f32 compute; device and threads from the flags).
    pub runtime: RuntimeOptions,
}

impl BuildPlan {
    /// Validates command-line arguments.
    pub fn from_args(a: &BuildArgs) -> Result<Self> {
        let (target, dtype) = match a.target.as_str() {
            "native" => {
                let dtype = match a.dtype.as_deref() {
                    None => None,
                    // Packed storage (`q4_1_x8`) is the builder's choice per tensor, not a --dtype.
                    Some(d) => Some(
                        StorageDtype::parse(d)
                            .filter(|s| !matches!(s, StorageDtype::Packed(_)))
                            .ok_or_else(|| {
                                Error::InvalidArgument(match d {
                                    "f64" => {
                                        "--dtype f64: native engines store f32, bf16, f16 or ggml blocks; f64 is a \
                                      verification target of --target onnx"
                                            .into()
                                    }
                                    d => format!(
                                        "--dtype {d}: expected f32, bf16, f16 or one of {}",
                                        dlo_runtime::model::weight::QUANT_TYPES
                                            .iter()
                                            .map(|(_, n)| *n)
                                            .collect::<Vec<_>>()
                                            .join(", ")
                                    ),
                                })
                            })?,
                    ),
                };
                (Target::Native, dtype)
            }
            "onnx" => {
                let elem = match a.dtype.as_deref().unwrap_or("f32") {
                    "f32" => crate::onnx::Elem::F32,
                    "f64" => crate::onnx::Elem::F64,
                    d => {
                        return Err(Error::InvalidArgument(format!(
                            "--dtype {d}: --target onnx writes f32 (deployment) or f64 (verification) models"
                        )))
                    }
                };
                (Target::Onnx(elem), Some(StorageDtype::F32))
            }
            "tensorrt" => {
                if let Some(d) = a.dtype.as_deref().filter(|&d| d != "f32") {
                    return Err(Error::InvalidArgument(format!(
                        "--dtype {d}: --target tensorrt builds f32 engines (TensorRT chooses kernels' precision \
                         itself)"
                    )));
                }
                let target = Target::TensorRt {
                    profile: a.profile.clone(),
                    kv_profile: a.kv_profile.clone(),
                    lib: a.trt_lib.clone(),
                };
                (target, Some(StorageDtype::F32))
            }
            t => {
                return Err(Error::InvalidArgument(format!(
                    "--target {t}: expected native, onnx or tensorrt"
                )))
            }
        };
        if let Some(b) = a.budget {
            if let BudgetArg::Rate(r) = b {
                dlo_runtime::engine::plan::check_budget(r)?;
            }
            if a.calibration.is_none() {
                return Err(Error::InvalidArgument(
                    "--budget needs --calibration FILE (sample text to calibrate the thresholds on)".into(),
                ));
            }
        }
        if a.heldout.is_some() && a.budget.is_none() {
            return Err(Error::InvalidArgument(
                "--heldout only makes sense with --budget".into(),
            ));
        }
        if !matches!(target, Target::TensorRt { .. })
            && (a.profile.is_some() || a.kv_profile.is_some() || a.trt_lib.is_some())
        {
            return Err(Error::InvalidArgument(
                "--profile, --kv-profile and --trt-lib only apply to --target tensorrt".into(),
            ));
        }
        if !matches!(target, Target::Native) && a.calibration.is_some() && a.budget.is_none() {
            return Err(Error::InvalidArgument(
                "--calibration without --budget records quantiles for load-time budgets, which only native engines \
                 have; ONNX models and TensorRT engines take a fixed budget (--budget) or follow the reference rule \
                 (z > 0)"
                    .into(),
            ));
        }
        if a.calibration_tokens == 0 || a.chunk_len == 0 {
            return Err(Error::InvalidArgument(
                "--calibration-tokens and --chunk-len must be positive".into(),
            ));
        }
        Ok(BuildPlan {
            source: a.model.clone(),
            target,
            output: a.output.clone(),
            dtype,
            budget: a.budget,
            calibration: a.calibration.clone(),
            heldout: a.heldout.clone(),
            calibration_tokens: a.calibration_tokens,
            chunk_len: a.chunk_len,
            runtime: a.runtime.options(DType::F32)?,
        })
    }
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The source cannot be opened, or (for ONNX) calibration failed.
    #[error(transparent)]
    Runtime(#[from] Error),
    /// Calibrating or writing the native engine failed.
    #[error("building {} from {}", output.display(), source_path.display())]
    Engine {
        /// The engine file.
        output: PathBuf,
        /// The source checkpoint.
        source_path: PathBuf,
        /// Why (boxed: keeps results small).
        #[source]
        source: Box<Error>,
    },
    /// Building TensorRT engines failed.
    #[error("building TensorRT engines of {} in {}", source_path.display(), output.display())]
    TensorRt {
        /// The source checkpoint.
        source_path: PathBuf,
        /// The output directory.
        output: PathBuf,
        /// Why (boxed: keeps results small).
        #[source]
        source: Box<crate::tensorrt::TrtError>,
    },
    /// Lowering to ONNX failed.
    #[error("lowering {} to ONNX in {}", source_path.display(), output.display())]
    Onnx {
        /// The source checkpoint.
        source_path: PathBuf,
        /// The output directory.
        output: PathBuf,
        /// Why (boxed: keeps results small).
        #[source]
        source: Box<OnnxError>,
    },
}

/// What [`Build::write`] wrote.
#[derive(Debug)]
pub enum BuildOutput {
    /// A native engine file.
    Native(BuildReport),
    /// ONNX models.
    Onnx {
        /// What the export wrote.
        report: OnnxReport,
        /// Their element type.
        elem: crate::onnx::Elem,
    },
    /// TensorRT engines and their manifest.
    TensorRt(Box<crate::tensorrt::TrtReport>),
}

/// A build whose source is open and calibrated (when the plan asks), not yet written.
pub struct Build {
    plan: BuildPlan,
    src: Opened,
    /// The TensorRT options, checked against the model (TensorRT target only).
    trt: Option<crate::tensorrt::TrtOptions>,
    calibration: Option<Calibration>,
    warnings: Vec<String>,
}

impl Build {
    /// Opens the source (an engine is a valid source too, e.g. to recalibrate its budget or change its
    /// dtype) and runs the calibration `plan` asks for.
    pub fn prepare(plan: BuildPlan) -> Result<Build, BuildError> {
        let src = open_any(&plan.source)?;
        // TensorRT profiles are checked against the model before calibration spends any time.
        let trt = match &plan.target {
            Target::TensorRt {
                profile,
                kv_profile,
                lib,
            } => {
                let mut o = crate::tensorrt::TrtOptions::parse(&src.config, profile.as_deref(), kv_profile.as_deref())
                    .map_err(|e| plan.trt_error(e))?;
                o.lib = lib.clone();
                Some(o)
            }
            _ => None,
        };
        let calibrated = router_warnings(&src.config, &src.weights).and_then(|mut warnings| {
            let cal = calibrate_plan(&plan, &src.config, &src.weights, src.tokenizer.as_ref(), &mut warnings)?;
            Ok((warnings, cal))
        });
        let (warnings, calibration) = match plan.target {
            Target::Native => calibrated.map_err(|e| plan.engine_error(e))?,
            Target::Onnx(_) | Target::TensorRt { .. } => calibrated?,
        };
        Ok(Build {
            plan,
            src,
            trt,
            calibration,
            warnings,
        })
    }

    /// Things the user should know (all-zero routers, a budget the routers cannot meet, ...).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The calibrated budget, when the plan has one.
    pub fn budget(&self) -> Option<&Budget> {
        self.calibration.as_ref().and_then(|c| c.budget.as_ref())
    }

    /// Writes the engine, or the ONNX models with the calibrated thresholds as constants.
    pub fn write(self) -> Result<BuildOutput, BuildError> {
        let Build {
            plan,
            src,
            trt,
            calibration,
            warnings,
        } = self;
        match plan.target {
            Target::Native => {
                let (bytes, routed_layers) = write_native(
                    &plan,
                    &src.config,
                    &src.weights,
                    src.tokenizer.as_ref(),
                    calibration.as_ref(),
                )
                .map_err(|e| plan.engine_error(e))?;
                Ok(BuildOutput::Native(BuildReport {
                    bytes,
                    routed_layers,
                    calibration,
                    warnings,
                }))
            }
            Target::Onnx(elem) => {
                let opts = crate::onnx::OnnxOptions {
                    elem,
                    thresholds: calibration.and_then(|c| c.budget).map(|b| b.thresholds),
                    ..Default::default()
                };
                crate::onnx::export_onnx(&src.config, &src.weights, &plan.output, &opts)
                    .map(|report| BuildOutput::Onnx { report, elem })
                    .map_err(|source| BuildError::Onnx {
                        source_path: plan.source.clone(),
                        output: plan.output.clone(),
                        source: Box::new(source),
                    })
            }
            Target::TensorRt { .. } => {
                let opts = crate::tensorrt::TrtOptions {
                    thresholds: calibration.and_then(|c| c.budget).map(|b| b.thresholds),
                    ..trt.expect("prepared for the TensorRT target")
                };
                crate::tensorrt::build_tensorrt(&src.config, &src.weights, src.tokenizer.as_ref(), &plan.output, &opts)
                    .map(|r| BuildOutput::TensorRt(Box::new(r)))
                    .map_err(|e| plan.trt_error(e))
            }
        }
    }
}

impl BuildPlan {
    /// A [`BuildError::TensorRt`] for this plan.
    fn trt_error(&self, source: crate::tensorrt::TrtError) -> BuildError {
        BuildError::TensorRt {
            source_path: self.source.clone(),
            output: self.output.clone(),
            source: Box::new(source),
        }
    }

    /// A [`BuildError::Engine`] for this plan.
    fn engine_error(&self, source: Error) -> BuildError {
        BuildError::Engine {
            output: self.output.clone(),
            source_path: self.source.clone(),
            source: Box::new(source),
        }
    }
}

/// Builds what `plan` asks for ([`Build::prepare`], then [`Build::write`]), printing nothing.
pub fn run(plan: BuildPlan) -> Result<BuildOutput, BuildError> {
    Build::prepare(plan)?.write()
}

/// What a native build did.
#[derive(Debug)]
pub struct BuildReport {
    /// Engine size in bytes.
    pub bytes: u64,
    /// Routed layers in the plan.
    pub routed_layers: usize,
    /// The calibration, when one ran.
    pub calibration: Option<Calibration>,
    /// Things the user should know (all-zero routers, a budget the routers cannot meet, ...).
    pub warnings: Vec<String>,
}

/// Routed layers whose router weights are all zero.
pub fn zero_routers(cfg: &ModelConfig, w: &Weights) -> Result<Vec<usize>> {
    let mut zero = Vec::new();
    for l in (0..cfg.num_hidden_layers).filter(|&l| cfg.is_routed(l)) {
        let t = w.get(
            &format!("model.routers.{l}.weight"),
            &[1, cfg.hidden_size],
            DType::F32,
            &Device::Cpu,
        )?;
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        if v.iter().all(|&x| x == 0.0) {
            zero.push(l);
        }
    }
    Ok(zero)
}

/// The calibration text's tokens (plain text or JSONL(.gz) documents, see [`crate::corpus`]), at most `limit`.
fn tokenize(tok: &Tokenizer, path: &Path, limit: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for doc in crate::corpus::read_documents(path)? {
        if ids.len() >= limit {
            break;
        }
        ids.extend(tok.encode(&doc, false)?);
    }
    ids.truncate(limit);
    if ids.is_empty() {
        return Err(Error::format(path, "calibration text has no tokens"));
    }
    Ok(ids)
}

/// Lowers a loaded model (config, weights, tokenizer) into an engine as `plan` asks.
pub fn build_from(plan: &BuildPlan, cfg: &ModelConfig, w: &Weights, tok: Option<&Tokenizer>) -> Result<BuildReport> {
    let mut warnings = router_warnings(cfg, w)?;
    let calibration = calibrate_plan(plan, cfg, w, tok, &mut warnings)?;
    let (bytes, routed_layers) = write_native(plan, cfg, w, tok, calibration.as_ref())?;
    Ok(BuildReport {
        bytes,
        routed_layers,
        calibration,
        warnings,
    })
}

/// Writes the engine with `calibration`'s budget and quantiles; returns its size and routed layer count.
fn write_native(
    plan: &BuildPlan,
    cfg: &ModelConfig,
    w: &Weights,
    tok: Option<&Tokenizer>,
    calibration: Option<&Calibration>,
) -> Result<(u64, usize)> {
    let mut engine_plan = EnginePlan::from_config(cfg);
    let routed = engine_plan.routed_layers();
    if let Some(cal) = calibration {
        cal.apply(&mut engine_plan);
    }
    let (dtype, storage) = match plan.dtype {
        Some(d) => (d, WeightsDtype::Storage(d)),
        None => {
            // Name the engine after its projections' storage (what decides its size and speed).
            let probe = "model.layers.0.mlp.down_proj.weight";
            let d = w.quant_type(probe).map_or(StorageDtype::F32, StorageDtype::Blocks);
            (d, WeightsDtype::Source)
        }
    };
    let bytes = write_engine_file_as(
        &plan.output,
        cfg,
        w,
        tok,
        &engine_plan,
        Provenance::now(&plan.source, dtype),
        storage,
    )?;
    Ok((bytes, routed.len()))
}

/// Warnings about zero routers, which the reference rule reads as "always skip".
fn router_warnings(cfg: &ModelConfig, w: &Weights) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let routed: Vec<usize> = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_routed(l)).collect();
    if !routed.is_empty() {
        let zero = zero_routers(cfg, w)?;
        if zero.len() == routed.len() {
            warnings.push(format!(
                "all {} routers are zero: under the reference rule (execute iff z > 0) every routed unit is \
                 skipped (dlo-method §9.4); fine-tune the model first",
                routed.len()
            ));
        } else if !zero.is_empty() {
            warnings.push(format!(
                "the routers of layers {zero:?} are zero: those layers always skip their routed unit"
            ));
        }
    }
    Ok(warnings)
}

/// Runs the calibration `plan` asks for (none without `--calibration`), adding warnings when the budget is
/// missed on the calibration or held-out text.
fn calibrate_plan(
    plan: &BuildPlan,
    cfg: &ModelConfig,
    w: &Weights,
    tok: Option<&Tokenizer>,
    warnings: &mut Vec<String>,
) -> Result<Option<Calibration>> {
    let Some(cal_path) = &plan.calibration else {
        return Ok(None);
    };
    if !(0..cfg.num_hidden_layers).any(|l| cfg.is_routed(l)) {
        return Err(Error::InvalidArgument(format!(
            "{}: the model has no routed layers, so there is nothing to calibrate",
            plan.source.display()
        )));
    }
    let tok = tok.ok_or_else(|| Error::NoTokenizer {
        path: plan.source.clone(),
    })?;
    let mut ids = tokenize(tok, cal_path, plan.calibration_tokens)?;
    let heldout = match (&plan.heldout, plan.budget) {
        (Some(h), _) => Some(tokenize(tok, h, plan.calibration_tokens)?),
        (None, Some(_)) if ids.len() >= 5 * plan.chunk_len => {
            // Hold out the last fifth, cut at a sequence boundary.
            let keep = ids.len() * 4 / 5 / plan.chunk_len * plan.chunk_len;
            Some(ids.split_off(keep))
        }
        _ => None,
    };
    let model = Model::load_opts(cfg, w, &plan.runtime)?;
    let target = match plan.budget {
        None => None,
        Some(BudgetArg::Rate(r)) => Some(RateTarget::Uniform(r)),
        Some(BudgetArg::Capacity) => Some(
            RateTarget::trained_capacity(cfg)
                .map_err(|e| Error::InvalidArgument(format!("{}: --budget capacity: {e}", plan.source.display())))?,
        ),
    };
    let opts = CalibrationOptions {
        target,
        chunk_len: plan.chunk_len,
        ..Default::default()
    };
    let cal = calibrate(&model, &ids, heldout.as_deref(), &opts)?;
    if let Some(b) = &cal.budget {
        if (b.calibration_rate - b.rate).abs() > 0.02 {
            warnings.push(format!(
                "the calibrated rate {:.3} misses the budget {:.3}: the router logits tie too much to split \
                 them finely",
                b.calibration_rate, b.rate
            ));
        }
        match b.heldout_rate {
            Some(h) if (h - b.rate).abs() > 0.02 => warnings.push(format!(
                "on held-out text the execution rate is {h:.3}, more than 0.02 from the budget {:.3}; use \
                 more (or more representative) calibration text",
                b.rate
            )),
            None => warnings.push(format!(
                "no held-out check: the calibration text has fewer than {} tokens",
                5 * plan.chunk_len
            )),
            _ => {}
        }
    }
    Ok(Some(cal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use dlo_passes::SkipKind;
    use dlo_runtime::engine::Engine;
    use dlo_runtime::testing::{self, max_abs_diff, XorShift};
    use dlo_runtime::Checkpoint;
    use std::collections::HashMap;

    /// The runtime tests' tiny GQA model with a 64-token vocabulary and tied embeddings; routers on layers 1
    /// and 2 when `skip` is given.
    fn tiny(skip: Option<SkipKind>) -> ModelConfig {
        let cfg = ModelConfig {
            vocab_size: 64,
            ..testing::tiny_config(true)
        };
        match skip {
            Some(skip) => testing::routed(cfg, skip),
            None => cfg,
        }
    }

    /// Seeded uniform weights for `cfg`, in the engine's tensor order; routers scaled by `router_scale` (0
    /// gives zero routers).
    fn weights(cfg: &ModelConfig, router_scale: f32) -> Weights {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let mut m = HashMap::new();
        for (name, shape) in dlo_runtime::engine::model_tensors(cfg) {
            let (scale, mean) = if name.contains("norm") {
                (0.1, 1.0)
            } else if name.contains("routers") {
                (router_scale, 0.0)
            } else {
                (0.3, 0.0)
            };
            let v = rng.symmetric_vec(shape.iter().product(), scale, mean);
            m.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
        }
        Weights::from_tensors(m, "tiny")
    }

    /// A character-level tokenizer (letters, space, punctuation) over the tiny vocabulary.
    fn char_tokenizer() -> Tokenizer {
        let chars = "abcdefghijklmnopqrstuvwxyz .,;'";
        let mut vocab = serde_json::Map::new();
        vocab.insert("[UNK]".into(), 0.into());
        for (i, c) in chars.chars().enumerate() {
            vocab.insert(c.to_string(), (3 + i).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        Tokenizer::from_json_str(&json.to_string(), Path::new("chars"), false, Some(1), vec![2], None).unwrap()
    }

    fn args(dir: &Path) -> BuildArgs {
        BuildArgs {
            model: dir.join("src"),
            output: dir.join("m.dlo"),
            target: "native".into(),
            dtype: Some("f32".into()),
            budget: None,
            calibration: None,
            heldout: None,
            calibration_tokens: 32768,
            chunk_len: 64,
            runtime: Default::default(),
            profile: None,
            kv_profile: None,
            trt_lib: None,
        }
    }

    #[test]
    fn runtime_flags_are_checked_in_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        for (device, threads, needle) in [
            ("tpu", None, "device `tpu`"),
            ("cpu", Some(0), "0 threads"),
            ("cuda:1", None, "device cuda:1: cannot open it"),
        ] {
            let a = BuildArgs {
                runtime: RuntimeArgs {
                    device: device.into(),
                    threads,
                    dequantize: false,
                },
                ..args(dir.path())
            };
            let e = BuildPlan::from_args(&a).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let plan = BuildPlan::from_args(&BuildArgs {
            runtime: RuntimeArgs {
                device: "cpu".into(),
                threads: Some(1),
                dequantize: false,
            },
            ..args(dir.path())
        })
        .unwrap();
        assert_eq!(plan.runtime.threads, Some(1));
    }

    #[test]
    fn build_writes_an_engine_that_opens() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(Some(SkipKind::Mlp));
        let w = weights(&cfg, 0.5);
        let a = BuildArgs {
            dtype: Some("bf16".into()),
            ..args(dir.path())
        };
        let r = build_from(&BuildPlan::from_args(&a).unwrap(), &cfg, &w, Some(&char_tokenizer())).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.routed_layers, 2);
        let e = Engine::open(&a.output).unwrap();
        e.verify().unwrap();
        assert_eq!(std::fs::metadata(&a.output).unwrap().len(), r.bytes);
        assert_eq!(e.manifest().provenance.dtype, StorageDtype::Bf16);
        assert!(e.manifest().provenance.source.ends_with("src"));
        assert!(matches!(
            e.routing(None).unwrap(),
            dlo_runtime::model::Routing::Reference
        ));
        assert_eq!(e.tokenizer().unwrap().unwrap().encode("ab", false).unwrap(), vec![3, 4]);
    }

    /// The CLI path: an HF directory on disk → `run` → an engine whose model matches the checkpoint's.
    #[test]
    fn run_builds_from_an_hf_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let cfg = tiny(Some(SkipKind::Layer));
        let w = weights(&cfg, 0.5);
        let tensors: HashMap<String, Tensor> = dlo_runtime::engine::model_tensors(&cfg)
            .into_iter()
            .map(|(n, s)| {
                let t = w.get(&n, &s, DType::F32, &Device::Cpu).unwrap();
                (n, t)
            })
            .collect();
        candle_core::safetensors::save(&tensors, src.join("model.safetensors")).unwrap();
        std::fs::write(src.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
        let a = args(dir.path());
        run(BuildPlan::from_args(&a).unwrap()).unwrap();
        let e = Engine::open(&a.output).unwrap();
        let ck = Checkpoint::open(&src).unwrap();
        let m1 = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
        let m2 = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu).unwrap();
        let batch = dlo_runtime::model::Batch::single(&[5, 9, 13, 2, 40, 41, 7], 0);
        let opts = dlo_runtime::model::Forward {
            all_logits: true,
            ..Default::default()
        };
        let (a1, a2) = (
            m1.forward(&batch, None, &opts).unwrap(),
            m2.forward(&batch, None, &opts).unwrap(),
        );
        assert_eq!(max_abs_diff(&a1.logits, &a2.logits), 0.0);
        // An engine is a valid source: rebuilding it in bf16 keeps the plan and the tensors (rounded).
        let again = BuildArgs {
            model: a.output.clone(),
            output: dir.path().join("again.dlo"),
            dtype: Some("bf16".into()),
            ..args(dir.path())
        };
        run(BuildPlan::from_args(&again).unwrap()).unwrap();
        let e2 = Engine::open(&again.output).unwrap();
        assert_eq!(e2.plan(), e.plan());
        assert_eq!(e2.manifest().provenance.dtype, StorageDtype::Bf16);
        // --target onnx lowers the same source into a directory of ONNX models.
        let onnx = BuildArgs {
            target: "onnx".into(),
            output: dir.path().join("onnx"),
            ..args(dir.path())
        };
        run(BuildPlan::from_args(&onnx).unwrap()).unwrap();
        assert!(onnx.output.join("prefill.onnx").is_file() && onnx.output.join("decode.onnx").is_file());
        // --dtype f64 makes the whole ONNX pair f64: weights, caches and logits.
        let onnx64 = BuildArgs {
            target: "onnx".into(),
            dtype: Some("f64".into()),
            output: dir.path().join("onnx64"),
            ..args(dir.path())
        };
        run(BuildPlan::from_args(&onnx64).unwrap()).unwrap();
        let elem_types = |dir: &Path| {
            use prost::Message;
            let bytes = std::fs::read(dir.join("decode.onnx")).unwrap();
            let g = crate::onnx::proto::ModelProto::decode(bytes.as_slice())
                .unwrap()
                .graph
                .unwrap();
            let weight = g.initializer.iter().find(|t| t.name == "model.norm.weight").unwrap();
            let io = |v: &crate::onnx::proto::ValueInfoProto| match v.r#type.as_ref().and_then(|t| t.value.clone()) {
                Some(crate::onnx::proto::type_proto::Value::TensorType(t)) => t.elem_type,
                None => panic!("{} has no tensor type", v.name),
            };
            let cache = g.input.iter().find(|v| v.name == "past_key.0").map(io);
            let logits = g.output.iter().find(|v| v.name == "logits").map(io);
            (weight.data_type, cache.unwrap(), logits.unwrap())
        };
        use crate::onnx::proto::data_type::{DOUBLE, FLOAT};
        assert_eq!(elem_types(&onnx.output), (FLOAT, FLOAT, FLOAT));
        assert_eq!(elem_types(&onnx64.output), (DOUBLE, DOUBLE, DOUBLE));
        // A missing source is an error naming it, and leaves no output.
        let bad = BuildArgs {
            model: dir.path().join("nope"),
            output: dir.path().join("nope.dlo"),
            ..args(dir.path())
        };
        let err = dlo_runtime::error::report(&run(BuildPlan::from_args(&bad).unwrap()).unwrap_err());
        assert!(err.contains("nope"), "{err}");
        assert!(!bad.output.exists());
    }

    #[test]
    fn zero_routers_warn() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(Some(SkipKind::Layer));
        let r = build_from(
            &BuildPlan::from_args(&args(dir.path())).unwrap(),
            &cfg,
            &weights(&cfg, 0.0),
            None,
        )
        .unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("all 2 routers are zero"), "{}", r.warnings[0]);
        // A dense model has no routers to warn about.
        let dense = tiny(None);
        let r = build_from(
            &BuildPlan::from_args(&args(dir.path())).unwrap(),
            &dense,
            &weights(&dense, 0.0),
            None,
        )
        .unwrap();
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn budget_arguments_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [0.0, 1.5, -1.0, f64::NAN] {
            let a = BuildArgs {
                budget: Some(BudgetArg::Rate(bad)),
                calibration: Some(dir.path().join("c.txt")),
                ..args(dir.path())
            };
            let e = BuildPlan::from_args(&a).unwrap_err().to_string();
            assert!(e.contains("outside (0, 1]"), "{bad}: {e}");
        }
        let a = BuildArgs {
            budget: Some(BudgetArg::Rate(0.5)),
            ..args(dir.path())
        };
        let e = BuildPlan::from_args(&a).unwrap_err().to_string();
        assert!(e.contains("--budget needs --calibration"), "{e}");
        let a = BuildArgs {
            dtype: Some("q4".into()),
            ..args(dir.path())
        };
        assert!(BuildPlan::from_args(&a).is_err());
        // Packed storage is chosen per tensor by the builder, not asked for.
        let a = BuildArgs {
            dtype: Some("q4_1_x8".into()),
            ..args(dir.path())
        };
        let e = BuildPlan::from_args(&a).unwrap_err().to_string();
        assert!(
            e.contains("--dtype q4_1_x8: expected f32, bf16, f16 or one of") && e.contains("q4_1,"),
            "{e}"
        );
        // f64 is an ONNX verification type only; ONNX models are f32 or f64.
        let a = BuildArgs {
            dtype: Some("f64".into()),
            ..args(dir.path())
        };
        let e = BuildPlan::from_args(&a).unwrap_err().to_string();
        assert!(
            e.contains("native engines store f32, bf16, f16 or ggml blocks") && e.contains("--target onnx"),
            "{e}"
        );
        for (dtype, ok) in [("f32", true), ("f64", true), ("bf16", false), ("f16", false)] {
            let a = BuildArgs {
                target: "onnx".into(),
                dtype: Some(dtype.into()),
                ..args(dir.path())
            };
            match BuildPlan::from_args(&a) {
                Ok(p) => assert!(
                    ok && matches!(p.target, Target::Onnx(e) if e.as_str() == dtype),
                    "{dtype}"
                ),
                Err(e) => assert!(!ok && e.to_string().contains("f32 (deployment) or f64"), "{dtype}: {e}"),
            }
        }
        let a = BuildArgs {
            target: "onnx".into(),
            calibration: Some(dir.path().join("c.txt")),
            ..args(dir.path())
        };
        let e = BuildPlan::from_args(&a).unwrap_err().to_string();
        assert!(e.contains("which only native engines"), "{e}");
        // ONNX takes a fixed budget: its thresholds become graph constants
        let a = BuildArgs {
            budget: Some(BudgetArg::Capacity),
            ..a
        };
        assert!(BuildPlan::from_args(&a).is_ok());
        // TensorRT builds f32 engines; its profiles and library only go with --target tensorrt.
        for (dtype, ok) in [("f32", true), ("bf16", false), ("q8_0", false), ("f64", false)] {
            let a = BuildArgs {
                target: "tensorrt".into(),
                dtype: Some(dtype.into()),
                ..args(dir.path())
            };
            match BuildPlan::from_args(&a) {
                Ok(p) => assert!(ok && matches!(p.target, Target::TensorRt { .. }), "{dtype}"),
                Err(e) => assert!(
                    !ok && e.to_string().contains("--target tensorrt builds f32 engines"),
                    "{dtype}: {e}"
                ),
            }
        }
        for a in [
            BuildArgs {
                profile: Some("1,2,3".into()),
                ..args(dir.path())
            },
            BuildArgs {
                target: "onnx".into(),
                kv_profile: Some("1,2,3".into()),
                ..args(dir.path())
            },
            BuildArgs {
                trt_lib: Some(dir.path().into()),
                ..args(dir.path())
            },
        ] {
            let e = BuildPlan::from_args(&a).unwrap_err().to_string();
            assert!(e.contains("only apply to --target tensorrt"), "{e}");
        }
    }

    /// English-like calibration text (60 repeats of two sentences) written to `dir/cal.txt`.
    fn calibration_text(dir: &Path) -> (String, PathBuf) {
        let text = "the quick brown fox jumps over the lazy dog, and then it runs into the woods; \
                    the dog, who is not so lazy after all, follows it. "
            .repeat(60);
        let cal = dir.join("cal.txt");
        std::fs::write(&cal, &text).unwrap();
        (text, cal)
    }

    #[test]
    fn budget_build_calibrates_and_stores_thresholds() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(Some(SkipKind::Mlp));
        let w = weights(&cfg, 0.5);
        let (_, cal) = calibration_text(dir.path());
        let a = BuildArgs {
            budget: Some(BudgetArg::Rate(0.5)),
            calibration: Some(cal.clone()),
            ..args(dir.path())
        };
        let r = build_from(&BuildPlan::from_args(&a).unwrap(), &cfg, &w, Some(&char_tokenizer())).unwrap();
        let b = r.calibration.as_ref().unwrap().budget.as_ref().unwrap();
        assert!((b.calibration_rate - 0.5).abs() <= 0.02, "{b:?}");
        assert!(b.heldout_rate.is_some());
        let e = Engine::open(&a.output).unwrap();
        let stored = e.plan().budget.as_ref().unwrap();
        assert_eq!(stored, b);
        assert!(e.plan().has_quantiles());
        assert!(matches!(
            e.routing(None).unwrap(),
            dlo_runtime::model::Routing::Thresholds(_)
        ));
        // Without a tokenizer there is no way to read the calibration text.
        let e = build_from(&BuildPlan::from_args(&a).unwrap(), &cfg, &w, None).unwrap_err();
        assert!(e.to_string().contains("no tokenizer"), "{e}");
        // Calibrating a dense model is refused.
        let dense = tiny(None);
        let a2 = BuildArgs {
            calibration: Some(cal),
            ..args(dir.path())
        };
        let e = build_from(&BuildPlan::from_args(&a2).unwrap(), &dense, &weights(&dense, 0.0), None).unwrap_err();
        assert!(e.to_string().contains("no routed layers"), "{e}");
    }

    #[test]
    fn budget_capacity_calibrates_each_layer_to_its_trained_capacity() {
        assert_eq!(parse_budget("capacity"), Ok(BudgetArg::Capacity));
        assert_eq!(parse_budget("0.25"), Ok(BudgetArg::Rate(0.25)));
        assert!(parse_budget("most").unwrap_err().contains("`capacity`"));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny(Some(SkipKind::Mlp));
        let n = cfg.num_hidden_layers;
        let caps: Vec<Option<f64>> = (0..n)
            .map(|l| cfg.is_routed(l).then_some(if l % 2 == 1 { 1.0 } else { 0.3 }))
            .collect();
        cfg.dlo.as_mut().unwrap().capacity = dlo_passes::Capacity::PerLayer(caps.clone());
        let w = weights(&cfg, 0.5);
        let (text, cal) = calibration_text(dir.path());
        let a = BuildArgs {
            budget: Some(BudgetArg::Capacity),
            calibration: Some(cal),
            ..args(dir.path())
        };
        let tok = char_tokenizer();
        let r = build_from(&BuildPlan::from_args(&a).unwrap(), &cfg, &w, Some(&tok)).unwrap();
        let b = r.calibration.as_ref().unwrap().budget.as_ref().unwrap();
        assert_eq!(
            b.layer_rates.as_ref(),
            Some(&caps),
            "the engine keeps the per-layer targets"
        );
        let mean = caps.iter().flatten().sum::<f64>() / caps.iter().flatten().count() as f64;
        assert!((b.rate - mean).abs() < 1e-12);
        // The engine's default routing executes each layer's capacity on the calibration text.
        let e = Engine::open(&a.output).unwrap();
        let model = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu).unwrap();
        let ids = tok.encode(&text, false).unwrap();
        let stats = crate::calibrate::routing_stats(&model, &ids, &e.routing(None).unwrap(), 64, 8).unwrap();
        for (l, (c, r)) in caps.iter().zip(&stats.layer_rates).enumerate() {
            match (c, r) {
                (Some(c), Some(r)) => assert!((r - c).abs() <= 0.03, "layer {l}: rate {r}, capacity {c}"),
                (None, None) => {}
                other => panic!("layer {l}: {other:?}"),
            }
        }
        // A model without a DLO config has no capacity to follow.
        let dense = tiny(None);
        let e = build_from(
            &BuildPlan::from_args(&a).unwrap(),
            &dense,
            &weights(&dense, 0.0),
            Some(&tok),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no routed layers"), "{e}");
    }
}
