//! `dlo-fuzz TARGET`: a seeded mutation fuzzing run of one reader (see the library docs); prints one
//! summary line, `target=… execs=… accepted=… crashes=… distinct_errors=… seconds=… execs_per_s=…`, and
//! each crash. Exit status 1 when a crash was found.

use clap::Parser;
use dlo_fuzz::{run, Assets, Harness, Options, Target};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Fuzz one of dlo's file readers with seeded mutations of real seed files"
)]
struct Args {
    /// engine, hf-dir, gguf or jsonl.
    target: String,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Stop after this many executions (0 = no limit).
    #[arg(long, default_value_t = 0)]
    max_execs: u64,
    /// Seed of the mutation stream.
    #[arg(long, default_value_t = 1)]
    rng_seed: u64,
    /// Where crashing inputs (`crash-N/`) and the input being run (`current/`) go.
    #[arg(long)]
    crash_dir: Option<PathBuf>,
    /// Seconds after which one execution counts as a hang.
    #[arg(long, default_value_t = 20.0)]
    timeout: f64,
    /// Run the input saved in this directory (a `crash-N/` or `abort-N/`) once, print the outcome and time.
    #[arg(long)]
    replay: Option<PathBuf>,
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    dlo_runtime::error::quiet_error_backtraces();
    let args = Args::parse();
    let target = Target::parse(&args.target)
        .ok_or_else(|| anyhow::anyhow!("unknown target `{}` (engine, hf-dir, gguf, jsonl)", args.target))?;
    let harness = Harness::new(target, &Assets::from_cache())?;
    if let Some(dir) = &args.replay {
        let mut files = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            files.push((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path())?));
        }
        let scratch = tempfile::tempdir()?;
        let t = std::time::Instant::now();
        let r = harness.exec(&dlo_fuzz::Input { files }, &scratch.path().join("input"));
        let secs = t.elapsed().as_secs_f64();
        match r {
            Ok(()) => println!("accepted in {secs:.3} s"),
            Err(e) => println!("refused in {secs:.3} s: {e}"),
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let opts = Options {
        duration: Duration::from_secs_f64(args.seconds),
        max_execs: args.max_execs,
        rng_seed: args.rng_seed,
        crash_dir: args.crash_dir,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    let r = run(&harness, &opts)?;
    println!(
        "target={} execs={} accepted={} crashes={} distinct_errors={} seconds={:.0} execs_per_s={:.1}",
        target.name(),
        r.execs,
        r.accepted,
        r.crashes.len(),
        r.distinct_errors,
        r.elapsed.as_secs_f64(),
        r.execs as f64 / r.elapsed.as_secs_f64()
    );
    for c in &r.crashes {
        let at = c.saved.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        println!("crash: {} {at}", c.message.replace('\n', " | "));
    }
    Ok(if r.crashes.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
