//! The run loop of `dlo-compile train`: open or resume a run, train with periodic held-out evaluation and
//! checkpoints, and write the summary ([`train_run`]); and the command itself ([`run`]), which reads and
//! tokenizes the data for it.

use super::args::TrainArgs;
use super::checkpoint::{self, FileSink, Loaded};
use super::data::{self, Example};
use super::error::{Result, TrainError};
use super::fingerprint::{data_fingerprint, model_fingerprint};
use super::metrics::{self, EvalMetrics, EvalRouting, MetricsLog, Record};
use super::options::Options;
use super::trainer::{TrainModel, Trainer};
use dlo_passes::ModelConfig;
use dlo_runtime::model::Model;
use dlo_runtime::{Tokenizer, Weights};
use std::path::{Path, PathBuf};

/// Everything a run needs besides the model type.
pub struct RunSetup {
    /// Source model configuration.
    pub cfg: ModelConfig,
    /// Source model tensors.
    pub weights: Weights,
    /// Where to copy tokenizer files from.
    pub tokenizer_dir: Option<PathBuf>,
    /// Training examples.
    pub train: Vec<Example>,
    /// Held-out examples.
    pub eval: Vec<Example>,
    /// Padding token.
    pub pad_id: u32,
    /// Output directory.
    pub output: PathBuf,
    /// Checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Settings.
    pub opts: Options,
    /// Data statistics (for the summary).
    pub data_stats: data::DataStats,
}

/// The end-of-run summary (`summary.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Steps done.
    pub steps: u64,
    /// Whether the run reached its planned end (false when stopped early).
    pub finished: bool,
    /// Mean training loss over the last (up to) 10 steps.
    pub final_train_loss: f64,
    /// First and last held-out CE.
    pub eval_loss_first: Option<f64>,
    /// Last held-out CE.
    pub eval_loss_last: Option<f64>,
    /// Last held-out execution rate.
    pub eval_exec_rate: Option<f64>,
    /// The routing rule of the held-out numbers above (the first of `--eval-routing`).
    #[serde(default)]
    pub eval_routing: EvalRouting,
    /// Mean tokens per second.
    pub tokens_per_s: f64,
    /// Final per-layer capacity.
    pub capacity: Vec<Option<f64>>,
    /// Tokenization counts.
    pub data: data::DataStats,
    /// Where the final model is.
    pub final_checkpoint: Option<PathBuf>,
}

/// What identifies a run's source model and data in its checkpoints (see [`super::fingerprint`]).
struct Identity {
    model_fp: String,
    model_summary: String,
    data_fp: String,
}

/// Runs (or resumes) training and writes checkpoints, logs, summary and plot to `setup.output`.
pub fn train_run<M: TrainModel>(setup: RunSetup, sink: &mut dyn FileSink) -> Result<Summary> {
    let RunSetup {
        cfg,
        weights,
        tokenizer_dir,
        train,
        eval,
        pad_id,
        output,
        resume,
        opts,
        data_stats,
    } = setup;
    let (model_fp, model_summary) = model_fingerprint(&cfg, &weights)?;
    let id = Identity {
        model_fp,
        model_summary,
        data_fp: data_fingerprint(&train, &eval, &opts),
    };
    let loaded = match &resume {
        Some(dir) => Some(load_for_resume(dir, &id)?),
        None => {
            refuse_finished_output(&output)?;
            None
        }
    };
    std::fs::create_dir_all(&output).map_err(|e| TrainError::io(&output, e))?;
    let tr: Trainer<M> = start_trainer(cfg, weights, train, pad_id, &opts, loaded.as_ref(), resume.as_deref())?;
    let log_path = output.join("metrics.jsonl");
    let log = MetricsLog::open(&log_path, tr.step)?;
    let pb = progress_bar(&opts, &tr);
    let mut run = Run {
        tr,
        log,
        pb,
        output: &output,
        tokenizer_dir: tokenizer_dir.as_deref(),
        id: &id,
        opts: &opts,
        eval: &eval,
    };
    let progress = run.train(sink)?;
    let final_checkpoint = run.finish(progress.last_eval_step, sink)?;
    let Run { tr, pb, .. } = run;
    pb.finish_and_clear();
    summarize(&tr, &output, &log_path, &opts, progress, data_stats, final_checkpoint)
}

/// Reads the checkpoint to resume from and checks that it was trained on the same data with the same data
/// settings (the model is checked by [`checkpoint::load`]).
fn load_for_resume(dir: &Path, id: &Identity) -> Result<Loaded> {
    let l = checkpoint::load(dir, &id.model_fp, &id.model_summary)?;
    if l.state.data_fingerprint != id.data_fp {
        return Err(TrainError::Resume {
            path: dir.to_path_buf(),
            problem: "the training data or the data settings (--seed, --batch, --grad-accum, --seq-len, \
                      --pack, --eval-split) differ from the interrupted run"
                .into(),
        });
    }
    Ok(l)
}

/// A fresh run does not write over another run's results (checkpoints, `final`, `metrics.jsonl`).
fn refuse_finished_output(output: &Path) -> Result<()> {
    if output.is_dir() {
        let busy = std::fs::read_dir(output)
            .map_err(|e| TrainError::io(output, e))?
            .filter_map(|e| e.ok())
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n == "final" || n.starts_with("checkpoint-") || n == "metrics.jsonl"
            });
        if busy {
            return Err(TrainError::Invalid(format!(
                "{} already holds a training run; pass --resume DIR to continue it or choose a new -o",
                output.display()
            )));
        }
    }
    Ok(())
}

/// The trainer, from the source weights or, when resuming, from the checkpoint's weights and state (whose
/// planned number of steps must match this run's).
fn start_trainer<M: TrainModel>(
    cfg: ModelConfig,
    weights: Weights,
    train: Vec<Example>,
    pad_id: u32,
    opts: &Options,
    loaded: Option<&Loaded>,
    resume: Option<&Path>,
) -> Result<Trainer<M>> {
    let model_weights = match loaded {
        Some(l) => Weights::from_safetensors(std::slice::from_ref(&l.weights_file), &l.weights_file)?,
        None => weights,
    };
    let mut tr: Trainer<M> = Trainer::new(cfg, model_weights, train, pad_id, opts.clone())?;
    if let Some(l) = loaded {
        tr.restore(&l.state, &l.optimizer)?;
        if l.state.total_steps != tr.total_steps {
            return Err(TrainError::Resume {
                path: resume.map(Path::to_path_buf).unwrap_or_default(),
                problem: format!(
                    "the run was planned for {} steps, this one for {} (the schedule would change)",
                    l.state.total_steps, tr.total_steps
                ),
            });
        }
    }
    Ok(tr)
}

/// A progress bar over the planned steps (hidden unless `opts.progress`).
fn progress_bar<M: TrainModel>(opts: &Options, tr: &Trainer<M>) -> indicatif::ProgressBar {
    if opts.progress {
        let pb = indicatif::ProgressBar::new(tr.total_steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(tr.step);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// A run in progress: the trainer, and where its results go.
struct Run<'a, M: TrainModel> {
    tr: Trainer<M>,
    log: MetricsLog,
    pb: indicatif::ProgressBar,
    output: &'a Path,
    tokenizer_dir: Option<&'a Path>,
    id: &'a Identity,
    opts: &'a Options,
    eval: &'a [Example],
}

/// What the training loop saw, for the summary.
struct Progress {
    /// Tokens per second of each step.
    tokens_per_s: Vec<f64>,
    /// The loss of each step.
    losses: Vec<f64>,
    /// The step of the last held-out evaluation.
    last_eval_step: Option<u64>,
}

impl<M: TrainModel> Run<'_, M> {
    /// Saves a checkpoint `output/name`.
    fn save(&self, name: String, sink: &mut dyn FileSink) -> Result<PathBuf> {
        let dir = self.output.join(name);
        let state = self
            .tr
            .state(&self.id.model_fp, &self.id.model_summary, &self.id.data_fp);
        self.tr.save(&dir, self.tokenizer_dir, state, sink)?;
        Ok(dir)
    }

    /// Prints a line above the progress bar. indicatif drops `println` when it does not draw (stderr not a
    /// terminal): logs still get the lines.
    fn say(&self, line: String) {
        match (self.opts.progress, self.pb.is_hidden()) {
            (false, _) => {}
            (true, true) => eprintln!("{line}"),
            (true, false) => self.pb.println(line),
        }
    }

    /// One held-out evaluation per routing rule, reported and logged.
    fn held_out(&mut self) -> Result<()> {
        for &rule in &self.opts.eval_routing {
            let e = self.tr.evaluate(self.eval, rule)?;
            let which = match self.opts.eval_routing.len() {
                1 => String::new(),
                _ => format!(" ({} routing)", rule.as_str()),
            };
            self.say(format!(
                "step {}: held-out loss {:.4}, execution rate {:.3}{which}",
                e.step, e.loss, e.exec_rate
            ));
            self.log.write(&Record::Eval(e))?;
        }
        Ok(())
    }

    /// Trains until the planned end or `--stop-after`, logging every step and evaluating and saving
    /// checkpoints as asked. A non-finite loss stops the run with an error.
    fn train(&mut self, sink: &mut dyn FileSink) -> Result<Progress> {
        let opts = self.opts;
        let mut p = Progress {
            tokens_per_s: Vec::new(),
            losses: Vec::new(),
            last_eval_step: None,
        };
        if self.tr.step == 0 && opts.eval_every > 0 && !self.eval.is_empty() {
            // The starting point of the held-out curve (for a zero-router DLO model: every routed unit skipped).
            self.held_out()?;
            p.last_eval_step = Some(0);
        }
        while self.tr.step < self.tr.total_steps && opts.stop_after.is_none_or(|s| self.tr.step < s) {
            let m = self.tr.train_step()?;
            if !(m.loss.is_finite()) {
                return Err(TrainError::Invalid(format!(
                    "the loss became {} at step {}; lower --lr",
                    m.loss, m.step
                )));
            }
            p.tokens_per_s.push(m.tokens_per_s);
            p.losses.push(m.loss);
            self.pb.set_position(m.step);
            self.pb.set_message(format!(
                "loss {:.4} route {:.4} exec {:.3} lr {:.2e} {:.0} tok/s",
                m.ce, m.route, m.exec_rate, m.lr, m.tokens_per_s
            ));
            self.log.write(&Record::Train(m))?;
            if self.tr.step.checked_rem(opts.eval_every) == Some(0) && !self.eval.is_empty() {
                self.held_out()?;
                p.last_eval_step = Some(self.tr.step);
            }
            if self.tr.step.checked_rem(opts.save_every) == Some(0) && self.tr.step < self.tr.total_steps {
                let d = self.save(format!("checkpoint-{}", self.tr.step), sink)?;
                self.say(format!("saved {}", d.display()));
            }
        }
        Ok(p)
    }

    /// At the planned end: a last held-out evaluation (unless this step had one) and the `final` checkpoint.
    /// `None` when the run stopped early.
    fn finish(&mut self, last_eval_step: Option<u64>, sink: &mut dyn FileSink) -> Result<Option<PathBuf>> {
        if self.tr.step < self.tr.total_steps {
            return Ok(None);
        }
        if !self.eval.is_empty() && last_eval_step != Some(self.tr.step) {
            self.held_out()?;
        }
        self.save("final".into(), sink).map(Some)
    }
}

/// Writes `plot.svg` from the metrics log and `summary.json`, and returns the summary.
fn summarize<M: TrainModel>(
    tr: &Trainer<M>,
    output: &Path,
    log_path: &Path,
    opts: &Options,
    progress: Progress,
    data_stats: data::DataStats,
    final_checkpoint: Option<PathBuf>,
) -> Result<Summary> {
    let records = metrics::read_log(log_path)?;
    let summary_rule = opts.eval_routing.first().copied().unwrap_or_default();
    let evals: Vec<&EvalMetrics> = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) if e.routing == summary_rule => Some(e),
            _ => None,
        })
        .collect();
    let plot = output.join("plot.svg");
    std::fs::write(&plot, metrics::plot_svg(&records)).map_err(|e| TrainError::io(&plot, e))?;
    let recent = &progress.losses;
    let tail = &recent[recent.len().saturating_sub(10)..];
    let tps = &progress.tokens_per_s;
    let summary = Summary {
        steps: tr.step,
        finished: tr.step >= tr.total_steps,
        final_train_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        eval_loss_first: evals.first().map(|e| e.loss),
        eval_loss_last: evals.last().map(|e| e.loss),
        eval_exec_rate: evals.last().map(|e| e.exec_rate),
        eval_routing: summary_rule,
        tokens_per_s: tps.iter().sum::<f64>() / tps.len().max(1) as f64,
        capacity: tr.caps.as_ref().map(|c| c.capacity_list()).unwrap_or_default(),
        data: data_stats,
        final_checkpoint,
    };
    let sp = output.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(&sp, text).map_err(|e| TrainError::io(&sp, e))?;
    Ok(summary)
}

/// `dlo-compile train`: reads the data (malformed lines fail here, before the model loads), opens the
/// model, tokenizes with its chat template, splits, and trains. What the user should see before training
/// starts (warnings, what the data gave) goes to `log`, line by line; the caller prints it and the returned
/// [`Summary`]. During training the progress bar shows held-out evaluations and saves.
pub fn run(args: &TrainArgs, log: &mut dyn FnMut(String)) -> Result<Summary> {
    let opts = args.options()?;
    let convs = read_sources(&args.data, log)?;
    let ck = dlo_runtime::Checkpoint::open(&args.model)?;
    let tok = ck
        .tokenizer
        .as_ref()
        .ok_or_else(|| TrainError::file(&args.model, "the model has no tokenizer; training needs one"))?;
    let (train, eval, stats) = tokenize_and_split(tok, &convs, &opts, log)?;
    let pad_id = ck.config.eos_token_ids.first().copied().unwrap_or(0);
    let tokenizer_dir = tokenizer_files(args, tok, &ck.config)?;
    let setup = RunSetup {
        cfg: ck.config,
        weights: ck.weights,
        tokenizer_dir: Some(tokenizer_dir),
        train,
        eval,
        pad_id,
        output: args.output.clone(),
        resume: args.resume.clone(),
        opts,
        data_stats: stats,
    };
    train_run::<Model>(setup, &mut checkpoint::Fs)
}

/// Every conversation of every `--data` source; the sources' warnings go to `log`.
fn read_sources(sources: &[data::Source], log: &mut dyn FnMut(String)) -> Result<Vec<data::Conversation>> {
    let mut convs = Vec::new();
    for src in sources {
        let (c, warnings) = data::load_source(src)?;
        for w in warnings {
            log(format!("warning: {w}"));
        }
        convs.extend(c);
    }
    Ok(convs)
}

/// Tokenizes the conversations with the model's chat template and splits them into training and held-out
/// examples, saying in `log` what was kept.
fn tokenize_and_split(
    tok: &Tokenizer,
    convs: &[data::Conversation],
    opts: &Options,
    log: &mut dyn FnMut(String),
) -> Result<(Vec<Example>, Vec<Example>, data::DataStats)> {
    let enc = data::TokenizerEncoder::new(tok)?;
    if !enc.has_template() {
        log("warning: the tokenizer has no chat template; using the reference layout <|user|>/<|assistant|>".into());
    }
    let (examples, stats) = data::tokenize_all(&enc, convs, opts.seq_len)?;
    log(format!(
        "data: {} conversations, {} kept, {} skipped without assistant tokens, {} truncated to {} tokens",
        stats.conversations, stats.kept, stats.no_assistant, stats.truncated, opts.seq_len
    ));
    if let Some(first) = &stats.first_unlocatable {
        log(format!(
            "warning: {} conversations skipped because the chat template hides their assistant turns; first: {first}",
            stats.unlocatable
        ));
    }
    let (ti, ei) = data::split_indices(examples.len(), opts.eval_split, opts.seed);
    let train: Vec<Example> = ti.iter().map(|&i| examples[i].clone()).collect();
    let eval: Vec<Example> = ei.iter().map(|&i| examples[i].clone()).collect();
    log(format!("split: {} train, {} held out", train.len(), eval.len()));
    Ok((train, eval, stats))
}

/// Where checkpoints copy their tokenizer files from: an HF model directory itself; otherwise (GGUF) the
/// tokenizer exported once to `OUTPUT/.tokenizer`.
fn tokenizer_files(args: &TrainArgs, tok: &Tokenizer, cfg: &ModelConfig) -> Result<PathBuf> {
    if args.model.is_dir() {
        return Ok(args.model.clone());
    }
    let d = args.output.join(".tokenizer");
    std::fs::create_dir_all(&d).map_err(|e| TrainError::io(&d, e))?;
    crate::import::write_tokenizer_files(tok, cfg.max_position_embeddings, &d)?;
    Ok(d)
}
