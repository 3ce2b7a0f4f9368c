//! Time from nothing to a model ready for its first forward pass, warm (the file in the page cache):
//! [`load_any`] (open, weights and tokenizer; the tokenizer is read on a second thread), its parts alone, and
//! for comparison the engine's tokenizer read by `tokenizers`' own reader.
//!
//! ```text
//! cargo run --release -p dlo-runtime --example bench_load -- ENGINE_OR_CHECKPOINT [--threads 2] [--reps 7]
//! ```
//!
//! Prints one line per part with the median and the range over `--reps` runs (after one warm-up run).

use dlo_runtime::engine::{load_any, Engine};
use dlo_runtime::RuntimeOptions;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let path = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: bench_load MODEL [--threads N] [--reps N]"))?,
    );
    let (threads, reps) = (flag("--threads", 2)?, flag("--reps", 7)?.max(1));
    let opts = RuntimeOptions {
        threads: Some(threads),
        ..Default::default()
    };
    opts.init_process_threads()?;
    let mut parts: [(&str, Vec<Duration>); 5] = [
        ("load_any (open + weights ‖ tokenizer)", vec![]),
        ("  Engine::open", vec![]),
        ("  tokenizer", vec![]),
        ("  weights → Model", vec![]),
        ("  (tokenizer by tokenizers' own reader)", vec![]),
    ];
    let engine = dlo_runtime::engine::is_engine(&path);
    for rep in 0..=reps {
        let t = Instant::now();
        let loaded = load_any(&path, &opts)?;
        let all = t.elapsed();
        drop(loaded);
        let mut times = vec![all];
        if engine {
            let t = Instant::now();
            let e = Engine::open(&path)?;
            times.push(t.elapsed());
            let t = Instant::now();
            let tok = e.tokenizer()?;
            times.push(t.elapsed());
            let t = Instant::now();
            let model = dlo_runtime::Model::load_opts(e.config(), &e.weights(), &opts)?;
            times.push(t.elapsed());
            if let Some(spec) = &e.manifest().tokenizer {
                let t = Instant::now();
                let theirs: tokenizers::Tokenizer = spec.json.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
                times.push(t.elapsed());
                drop(theirs);
            }
            drop((tok, model));
        }
        if rep > 0 {
            for (p, d) in parts.iter_mut().zip(times) {
                p.1.push(d);
            }
        }
    }
    println!("{} ({threads} threads, {reps} runs, warm)", path.display());
    for (name, mut v) in parts.into_iter().filter(|(_, v)| !v.is_empty()) {
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{name:<40} median {:6.1} ms  (min {:.1}, max {:.1})",
            ms(v[v.len() / 2]),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    }
    Ok(())
}
