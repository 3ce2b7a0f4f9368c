//! `dlo-compile`: turn a Llama-family checkpoint into a DLO model and deploy it.
//!
//! Arguments become a plan (`XArgs::plan`, `BuildPlan::from_args`), the library runs it and returns a
//! report, and only this file prints (apart from `train`'s live progress bar, which also shows its held-out
//! evaluations and saves).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dlo-compile",
    version,
    about = "Turn Llama-family checkpoints into DLO models and engines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a checkpoint (HF directory or GGUF) into an HF directory.
    Import(dlo_compiler::import::ImportArgs),
    /// Lower a checkpoint into a native engine file (optionally calibrated to a compute budget).
    Build(dlo_compiler::build::BuildArgs),
    /// Per-layer, per-token similarity of unit input vs output on sample text (JSON + heatmap).
    Analyze(dlo_compiler::analyze::AnalyzeArgs),
    /// Deepen a base model into a DLO model (layer expansion, routers, DLO hyper-parameters).
    Expand(Box<dlo_compiler::expand::ExpandArgs>),
    /// Fine-tune a (DLO) model on chat data with the routing losses.
    Train(Box<dlo_compiler::train::TrainArgs>),
    /// Accuracy against FLOPs on benchmark tasks, for several models and compute budgets.
    Eval(dlo_compiler::eval::EvalArgs),
}

/// `dlo-compile import`: warnings about what the output will lack, then what was written.
fn import(args: &dlo_compiler::import::ImportArgs) -> anyhow::Result<()> {
    let import = dlo_compiler::import::Import::open(args.plan()?)?;
    for w in import.warnings() {
        eprintln!("warning: {w}");
    }
    let r = import.write()?;
    eprintln!(
        "wrote {} ({} tensors, {})",
        r.output.display(),
        r.tensors,
        r.dtype.as_str()
    );
    Ok(())
}

/// `dlo-compile analyze`: what was analysed and where it went.
fn analyze(args: &dlo_compiler::analyze::AnalyzeArgs) -> anyhow::Result<()> {
    let r = dlo_compiler::analyze::run(&args.plan()?)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "analysed {} tokens in {} sequences; wrote {}/similarity.{{json,png,svg}}",
        r.tokens,
        r.sequences,
        r.output.display()
    );
    Ok(())
}

/// `dlo-compile expand`: the plan's summary on stdout before writing, then what was written.
fn expand(args: &dlo_compiler::expand::ExpandArgs) -> anyhow::Result<()> {
    use dlo_compiler::expand::{human_bytes, Expansion};
    let e = Expansion::prepare(&args.base, &args.output, args.plan()?)?;
    println!("{e}");
    if args.dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    let r = e.write()?;
    println!(
        "wrote {} ({} tensors, {} {}; {} in total) in {:.1}s",
        r.output.display(),
        r.tensors,
        human_bytes(r.safetensors_bytes),
        r.dtype.as_str(),
        human_bytes(r.total_bytes),
        r.elapsed.as_secs_f64()
    );
    Ok(())
}

/// `dlo-compile build`: warnings and the calibrated budget, then what was written.
fn build(args: &dlo_compiler::build::BuildArgs) -> anyhow::Result<()> {
    use dlo_compiler::build::{Build, BuildOutput, BuildPlan};
    let plan = BuildPlan::from_args(args)?;
    let build = Build::prepare(plan.clone())?;
    for w in build.warnings() {
        eprintln!("warning: {w}");
    }
    if let Some(b) = build.budget() {
        let held = b.heldout_rate.map_or("n/a".to_string(), |h| format!("{h:.3}"));
        let what = match b.layer_rates {
            Some(_) => format!("budget capacity (mean {:.3})", b.rate),
            None => format!("budget {}", b.rate),
        };
        eprintln!(
            "{what}: execution rate {:.3} on calibration text, {held} held out",
            b.calibration_rate
        );
    }
    match build.write()? {
        BuildOutput::Onnx { report: r, elem } => eprintln!(
            "wrote {} ({} routed layers, {:.1} MB of {} tensors{})",
            r.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            r.routed_layers,
            r.tensor_bytes as f64 / 1e6,
            elem.as_str(),
            if r.external_data { ", external data" } else { "" }
        ),
        BuildOutput::Native(r) => eprintln!(
            "wrote {} ({:.1} MB, {} routed layers, {})",
            plan.output.display(),
            r.bytes as f64 / 1e6,
            r.routed_layers,
            plan.dtype.map_or("weights as stored in the source", |d| d.as_str())
        ),
        BuildOutput::TensorRt(r) => {
            let m = &r.manifest;
            for e in [&m.prefill, &m.decode] {
                eprintln!(
                    "{}: {:.1} MB, {} {}..={} (opt {}), built in {:.1} s; network: {} layers, {} IIfConditional, \
                     {} TopK, {} gather, {} scatter",
                    e.file,
                    e.bytes as f64 / 1e6,
                    e.profile.dim,
                    e.profile.min,
                    e.profile.max,
                    e.profile.opt,
                    e.build_ms as f64 / 1e3,
                    e.network.layers,
                    e.network.conditionals,
                    e.network.topk,
                    e.network.gathers,
                    e.network.scatters
                );
            }
            eprintln!(
                "wrote {} ({} {}, {} routed layers, {:.1} s)",
                r.dir.display(),
                m.tensorrt.library,
                m.tensorrt.version,
                m.routed_layers(),
                r.seconds
            );
        }
    }
    Ok(())
}

/// `dlo-compile train`: what the data gave as the library says it, then the closing lines: steps, losses,
/// execution rate, speed and where the model is.
fn train(args: &dlo_compiler::train::TrainArgs) -> anyhow::Result<()> {
    let s = dlo_compiler::train::run(args, &mut |line| eprintln!("{line}"))?;
    eprintln!(
        "done: {} steps, train loss {:.4}, held-out loss {} → {}, execution rate {}, {:.0} tokens/s",
        s.steps,
        s.final_train_loss,
        s.eval_loss_first.map_or("-".into(), |x| format!("{x:.4}")),
        s.eval_loss_last.map_or("-".into(), |x| format!("{x:.4}")),
        s.eval_exec_rate.map_or("-".into(), |x| format!("{x:.3}")),
        s.tokens_per_s
    );
    if let Some(f) = &s.final_checkpoint {
        eprintln!("model: {}", f.display());
    }
    Ok(())
}

/// `dlo-compile eval`: a progress bar while scoring, then the Markdown table and where the results went.
fn eval(args: &dlo_compiler::eval::EvalArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} requests {elapsed}<{eta} {msg}")
            .expect("a valid template"),
    );
    let r = dlo_compiler::eval::run(&plan, |p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(p.what.clone());
    });
    bar.finish_and_clear();
    let r = r?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", dlo_compiler::eval::markdown(&r.results));
    eprintln!(
        "wrote {}/{{results.json,results.md,requests.jsonl,accuracy_vs_flops.svg,accuracy_vs_flops.png}}",
        r.output.display()
    );
    Ok(())
}

/// Applies `--threads` to the whole process before a command that runs the model starts any thread (the
/// command's plan checks and opens the device).
fn process_threads(args: &dlo_compiler::runtime_args::RuntimeArgs) -> anyhow::Result<()> {
    if let Some(w) = args.unopened(candle_core::DType::F32)?.init_process_threads()? {
        eprintln!("warning: --threads: {w}");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    dlo_runtime::alloc::tune_for_large_tensors();
    dlo_runtime::error::quiet_error_backtraces();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Import(a) => import(a),
        Command::Build(a) => process_threads(&a.runtime).and_then(|()| build(a)),
        Command::Analyze(a) => process_threads(&a.runtime).and_then(|()| analyze(a)),
        Command::Expand(a) => expand(a),
        Command::Train(a) => process_threads(&a.runtime).and_then(|()| train(a)),
        Command::Eval(a) => process_threads(&a.runtime).and_then(|()| eval(a)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", dlo_runtime::error::report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
