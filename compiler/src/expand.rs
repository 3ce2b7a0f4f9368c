//! `dlo-compile expand`: deepen a base checkpoint into a DLO model (`dlo-method.md` §3).
//!
//! Flags and an optional recipe file (TOML/JSON, same keys as the flags) become one validated
//! [`ExpandPlan`]; flags override the recipe. The plan runs as a pass pipeline over the
//! [`ModelSpec`] IR, and the streaming writer materialises the result into a new HF directory in the
//! reference checkpoint format, with the complete recipe stored next to it as `dlo-expand-recipe.toml`.
//!
//! [`Expansion::prepare`] opens the base and applies the plan to the IR; its summary ([`Expansion`]'s
//! `Display`: passes, layer map, routers) is known before [`Expansion::write`] writes anything, which is
//! how `dlo-compile expand` prints it first (and all of it, for `--dry-run`).

use dlo_passes::writer::{tokenizer_files, write_model, ExtraFile, WriteOptions};
use dlo_passes::{ExpandPlan, ModelConfig, ModelSpec, OutDtype, Recipe, SafetensorsDir, TensorSource};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// File name of the recipe stored in the output directory.
pub const RECIPE_FILE: &str = "dlo-expand-recipe.toml";

/// Arguments of `dlo-compile expand`. Unset flags take the recipe's value, else the paper default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ExpandArgs {
    /// Base checkpoint: an HF directory (config.json + safetensors) or anything `import` reads (GGUF).
    pub base: PathBuf,
    /// Output directory (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Output layer count L'.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Layer placement: interleave (default) | stack-side | stack-manual.
    #[arg(long)]
    pub method: Option<String>,
    /// stack-manual half-open base-layer ranges, e.g. 0-8,6-12,10-22,20-26,24-32.
    #[arg(long)]
    pub ranges: Option<String>,
    /// New-layer init: zeros (default) | copy | random | merge-linear | merge-slerp.
    #[arg(long)]
    pub init: Option<String>,
    /// Skip granularity: mlp (default, llama_dlo_exattn) | layer (llama_dlo).
    #[arg(long)]
    pub skip: Option<String>,
    /// Route original layer i iff (i+1) % K == 0; 0 routes no original layer (default 1).
    #[arg(long)]
    pub router_every: Option<usize>,
    /// Never route the first/last N original layers (default 0).
    #[arg(long)]
    pub router_skip_ends: Option<usize>,
    /// Do not route the new layers (routed by default).
    #[arg(long)]
    pub no_router_on_new: bool,
    /// Router init: zero (default) | random (N(0, 0.02)).
    #[arg(long)]
    pub router_init: Option<String>,
    /// Training capacity in (0, 1] (default 0.9).
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Routing loss: cos-global (default) | cos | self.
    #[arg(long)]
    pub loss: Option<String>,
    /// Routing-loss weight λ (default 1.0).
    #[arg(long)]
    pub loss_weight: Option<f64>,
    /// Gate scale α (default 2.0).
    #[arg(long)]
    pub gate_scale: Option<f64>,
    /// Gate gap β (default 0.05).
    #[arg(long)]
    pub gate_gap: Option<f64>,
    /// Do not multiply the skipped unit's output by the gate (rescale is on by default).
    #[arg(long)]
    pub no_rescale: bool,
    /// Storage dtype: f32 (default) | bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Recipe file (TOML, or JSON if it ends in .json) with the same keys as these flags.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Seed of random inits (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the plan and layer map without writing anything.
    #[arg(long)]
    pub dry_run: bool,
}

impl ExpandArgs {
    /// The flags that were given, as a recipe (unset flags are `None`).
    pub fn flags_recipe(&self) -> Recipe {
        Recipe {
            layers: self.layers,
            method: self.method.clone(),
            ranges: self.ranges.clone(),
            init: self.init.clone(),
            skip: self.skip.clone(),
            router_every: self.router_every,
            router_skip_ends: self.router_skip_ends,
            router_on_new: self.no_router_on_new.then_some(false),
            router_init: self.router_init.clone(),
            capacity: self.capacity,
            loss: self.loss.clone(),
            loss_weight: self.loss_weight,
            gate_scale: self.gate_scale,
            gate_gap: self.gate_gap,
            rescale: self.no_rescale.then_some(false),
            dtype: self.dtype.clone(),
            seed: self.seed,
        }
    }

    /// The validated plan: recipe file (if any) overlaid with the flags, then paper defaults.
    pub fn plan(&self) -> Result<ExpandPlan, ExpandError> {
        let file = match &self.recipe {
            Some(p) => Recipe::from_file(p)?,
            None => Recipe::default(),
        };
        Ok(ExpandPlan::from_recipe(&file.overlay(&self.flags_recipe()))?)
    }
}

/// Why an expansion failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExpandError {
    /// The output directory already exists.
    #[error("{}: output already exists; choose a new directory or remove it", .0.display())]
    OutputExists(PathBuf),
    /// The base is a directory without `config.json`.
    #[error("{}: not an HF checkpoint directory (no config.json)", .0.display())]
    NotACheckpoint(PathBuf),
    /// The base cannot be opened by the runtime's loaders (GGUF and the rest).
    #[error("opening {}", path.display())]
    Open {
        /// The base.
        path: PathBuf,
        /// Why.
        #[source]
        source: dlo_runtime::Error,
    },
    /// Carrying the base's tokenizer into the output failed.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done (`creating`, `reading`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The recipe, the plan, the IR or the writer refused (every message names what is wrong).
    #[error(transparent)]
    Passes(#[from] dlo_passes::Error),
    /// Converting the base's tokenizer failed.
    #[error(transparent)]
    Runtime(#[from] dlo_runtime::Error),
}

/// A base checkpoint opened for expansion.
pub struct OpenedBase {
    /// Its validated configuration.
    pub config: ModelConfig,
    /// Its tensors, by HF name.
    pub source: Box<dyn TensorSource>,
    /// Tokenizer (and similar) files to carry into the output.
    pub extra_files: Vec<ExtraFile>,
}

/// Opens the base checkpoint: an HF directory through the passes crate's memory-mapped reader; anything
/// else (GGUF) through the runtime's [`dlo_runtime::Checkpoint`].
pub fn open_source(path: &Path) -> Result<OpenedBase, ExpandError> {
    if path.is_dir() && path.join("config.json").is_file() {
        let config = ModelConfig::from_hf_file(&path.join("config.json")).map_err(dlo_passes::Error::from)?;
        let source = SafetensorsDir::open(path)?;
        return Ok(OpenedBase {
            config,
            source: Box::new(source),
            extra_files: tokenizer_files(path),
        });
    }
    if path.is_dir() {
        return Err(ExpandError::NotACheckpoint(path.to_path_buf()));
    }
    let ckpt = dlo_runtime::Checkpoint::open(path).map_err(|source| ExpandError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut extra_files = Vec::new();
    if let Some(tok) = &ckpt.tokenizer {
        // The importer's tokenizer files (tokenizer.json + tokenizer_config.json with the chat template),
        // written to a scratch directory and carried as bytes.
        let scratch = std::env::temp_dir().join(format!("dlo-expand-tokenizer-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).map_err(|source| ExpandError::Io {
            action: "creating",
            path: scratch.clone(),
            source,
        })?;
        let written = crate::import::write_tokenizer_files(tok, ckpt.config.max_position_embeddings, &scratch)
            .map_err(ExpandError::from)
            .and_then(|()| {
                let mut files = Vec::new();
                for name in ["tokenizer.json", "tokenizer_config.json"] {
                    let p = scratch.join(name);
                    if p.is_file() {
                        let data = std::fs::read(&p).map_err(|source| ExpandError::Io {
                            action: "reading",
                            path: p.clone(),
                            source,
                        })?;
                        files.push(ExtraFile::Bytes {
                            name: name.into(),
                            data,
                        });
                    }
                }
                Ok(files)
            });
        let _ = std::fs::remove_dir_all(&scratch);
        extra_files.extend(written?);
    }
    Ok(OpenedBase {
        config: ckpt.config,
        source: Box::new(RuntimeSource {
            weights: ckpt.weights,
            path: path.to_path_buf(),
        }),
        extra_files,
    })
}

/// [`TensorSource`] over the runtime's [`dlo_runtime::Weights`] (GGUF and every other loader format).
pub struct RuntimeSource {
    /// The tensors.
    pub weights: dlo_runtime::Weights,
    /// Where they come from.
    pub path: PathBuf,
}

impl TensorSource for RuntimeSource {
    fn names(&self) -> Vec<String> {
        self.weights.names()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.weights.shape_of(name)
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, dlo_passes::Error> {
        let shape = self.shape(name).ok_or_else(|| dlo_passes::Error::MissingTensor {
            origin: self.path.clone(),
            name: name.into(),
        })?;
        let read = || -> dlo_runtime::Result<Vec<f32>> {
            let t = self
                .weights
                .get(name, &shape, candle_core::DType::F32, &candle_core::Device::Cpu)?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        read().map_err(|e| dlo_passes::Error::tensor_read(&self.path, name, e))
    }
    fn origin(&self) -> &Path {
        &self.path
    }
}

/// A size in MiB (or GiB from 1 GiB on), as the expand report shows it.
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// An expansion applied to the IR and not yet written. `Display` gives its summary: the passes, the layer
/// map and the routers.
pub struct Expansion {
    /// The validated plan.
    pub plan: ExpandPlan,
    /// The expanded model.
    pub spec: ModelSpec,
    /// Each pass that ran, and whether it changed the model.
    pub passes: Vec<(&'static str, bool)>,
    base_path: PathBuf,
    output: PathBuf,
    base: OpenedBase,
}

/// What an expansion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpandReport {
    /// The output directory.
    pub output: PathBuf,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Size of `model.safetensors` in bytes.
    pub safetensors_bytes: u64,
    /// Size of every file written, in bytes.
    pub total_bytes: u64,
    /// Storage dtype of the tensors.
    pub dtype: OutDtype,
    /// Time spent writing.
    pub elapsed: Duration,
}

impl Expansion {
    /// Checks that `output` does not exist, opens `base` ([`open_source`]) and applies `plan` to it.
    pub fn prepare(base: &Path, output: &Path, plan: ExpandPlan) -> Result<Expansion, ExpandError> {
        if output.exists() {
            return Err(ExpandError::OutputExists(output.to_path_buf()));
        }
        let opened = open_source(base)?;
        let mut spec = ModelSpec::from_base(opened.config.clone(), base)?;
        let passes = plan.apply(&mut spec)?;
        Ok(Expansion {
            plan,
            spec,
            passes,
            base_path: base.to_path_buf(),
            output: output.to_path_buf(),
            base: opened,
        })
    }

    /// Writes the expanded model, the base's tokenizer files and the recipe into the output directory.
    pub fn write(self) -> Result<ExpandReport, ExpandError> {
        let mut extra_files = self.base.extra_files;
        extra_files.push(ExtraFile::Bytes {
            name: RECIPE_FILE.into(),
            data: self.plan.to_recipe().to_toml().into_bytes(),
        });
        let start = Instant::now();
        let report = write_model(
            &self.spec,
            self.base.source.as_ref(),
            &self.output,
            &WriteOptions {
                dtype: self.plan.dtype,
                extra_files,
            },
        )?;
        Ok(ExpandReport {
            output: self.output,
            tensors: report.tensors,
            safetensors_bytes: report.safetensors_bytes,
            total_bytes: report.total_bytes,
            dtype: self.plan.dtype,
            elapsed: start.elapsed(),
        })
    }
}

impl fmt::Display for Expansion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (plan, spec) = (&self.plan, &self.spec);
        let l_in = spec.base_layers();
        let l_out = spec.layers.len();
        writeln!(
            f,
            "expand {} → {}: {l_in} → {l_out} layers ({}, init {}); passes: {}",
            self.base_path.display(),
            self.output.display(),
            plan.expand.method.name(),
            plan.expand.init.as_str(),
            self.passes
                .iter()
                .map(|(n, c)| format!("{n}{}", if *c { "" } else { " (no change)" }))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(f, "layer map:")?;
        for line in spec.layer_map() {
            writeln!(f, "  {line}")?;
        }
        let routed = spec.is_dlo().iter().filter(|&&r| r).count();
        write!(
            f,
            "routers: {routed}/{l_out} layers ({} init); skip {}; capacity {}; loss {} λ={}; gate α={} β={}; rescale {}",
            spec.gate_init_method(),
            spec.dlo.skip.as_str(),
            match &spec.dlo.capacity {
                dlo_passes::Capacity::Scalar(c) => c.to_string(),
                dlo_passes::Capacity::PerLayer(v) => format!("{v:?}"),
            },
            spec.dlo.loss_type.as_str(),
            spec.dlo.loss_coefficient,
            spec.dlo.scale_factor,
            spec.dlo.scale_gap,
            spec.dlo.rescale_hidden_states
        )?;
        if routed > 0 && spec.gate_init_method() == "zero" {
            write!(
                f,
                "\nnote: zero-initialised routers skip every routed layer at eval until trained (reference rule: execute iff logit > 0)"
            )?;
        }
        Ok(())
    }
}

/// Plans and prepares the expansion `args` ask for and, unless it is a dry run, writes it (`None` for a dry
/// run). Prints nothing: `dlo-compile expand` prints the [`Expansion`] summary and the report.
pub fn run(args: &ExpandArgs) -> Result<Option<ExpandReport>, ExpandError> {
    let e = Expansion::prepare(&args.base, &args.output, args.plan()?)?;
    if args.dry_run {
        return Ok(None);
    }
    e.write().map(Some)
}
