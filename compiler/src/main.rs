//! `dlo-compile`: turn a Llama-family checkpoint into a DLO model and deploy it.
//!
//! Arguments become a plan (`XArgs::plan`), the library runs it and returns a report, and only this file
//! prints (the commands not converted yet still print from the library).

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

fn main() -> std::process::ExitCode {
    dlo_runtime::alloc::tune_for_large_tensors();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Import(a) => import(a),
        Command::Build(a) => dlo_compiler::build::run(a),
        Command::Analyze(a) => analyze(a),
        Command::Expand(a) => expand(a),
        Command::Train(a) => dlo_compiler::train::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", dlo_runtime::error::report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
