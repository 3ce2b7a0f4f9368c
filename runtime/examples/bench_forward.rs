//! Prefill and decode throughput of the model definition on CPU, measured like `llama-bench`.
//!
//! ```text
//! cargo run --release -p dlo-runtime --example bench_forward -- MODEL \
//!     [--prompt-tokens 128] [--gen-tokens 64] [--threads 2] [--dtype f32|bf16] [--reps 3]
//! ```
//!
//! MODEL is an HF directory (config.json + model.safetensors) or anything [`Checkpoint::open`] reads.
//! Prefill: one forward pass over `--prompt-tokens` tokens from an empty cache. Decode: `--gen-tokens` single-token
//! steps from an empty cache, each feeding the previous step's argmax (as `llama-bench`'s `tg` test, which also
//! starts from an empty context). Each is repeated `--reps` times after one warm-up; the mean is reported as one
//! line `prefill_tok_s=X decode_tok_s=Y` (the format `dlo-run --bench` prints), preceded by details on stderr.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp};
use dlo_passes::ModelConfig;
use dlo_runtime::model::{Batch, Forward, Model};
use dlo_runtime::{Checkpoint, Weights};
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    model: PathBuf,
    prompt_tokens: usize,
    gen_tokens: usize,
    threads: usize,
    dtype: DType,
    reps: usize,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        model: PathBuf::new(),
        prompt_tokens: 128,
        gen_tokens: 64,
        threads: 2,
        dtype: DType::F32,
        reps: 3,
    };
    let mut model = None;
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--prompt-tokens" => a.prompt_tokens = val("--prompt-tokens")?.parse()?,
            "--gen-tokens" => a.gen_tokens = val("--gen-tokens")?.parse()?,
            "--threads" => a.threads = val("--threads")?.parse()?,
            "--reps" => a.reps = val("--reps")?.parse()?,
            "--dtype" => {
                a.dtype = match val("--dtype")?.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => bail!("unknown --dtype {other} (f32, bf16, f16)"),
                }
            }
            s if s.starts_with("--") => bail!("unknown option {s}"),
            s => model = Some(PathBuf::from(s)),
        }
    }
    a.model = model.context(
        "usage: bench_forward MODEL [--prompt-tokens N] [--gen-tokens N] [--threads N] [--dtype f32|bf16] [--reps N]",
    )?;
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.threads == 0 || a.reps == 0 {
        bail!("--prompt-tokens, --gen-tokens, --threads and --reps must be positive");
    }
    Ok(a)
}

/// Loads an HF directory directly; other inputs go through `Checkpoint::open`.
fn load(path: &Path, dtype: DType) -> Result<Model> {
    let dev = Device::Cpu;
    if path.join("config.json").is_file() && path.join("model.safetensors").is_file() {
        let cfg = ModelConfig::from_hf_file(&path.join("config.json"))?;
        let w = Weights::from_safetensors(&[path.join("model.safetensors")], path)?;
        return Ok(Model::load(&cfg, &w, dtype, &dev)?);
    }
    let ck = Checkpoint::open(path)?;
    Ok(Model::load(&ck.config, &ck.weights, dtype, &dev)?)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    // candle's CPU kernels size their thread pools from RAYON_NUM_THREADS; set it before any of them runs.
    std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    let t0 = Instant::now();
    let m = load(&a.model, a.dtype)?;
    let vocab = m.config().vocab_size as u32;
    eprintln!(
        "loaded {} ({:?}) in {:.2}s; threads {}",
        a.model.display(),
        a.dtype,
        t0.elapsed().as_secs_f64(),
        a.threads
    );
    // A fixed pseudo-random prompt (token ids only: no tokenizer needed).
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32).map(|i| (i * 7919 + 13) % vocab).collect();

    let prefill = || -> Result<f64> {
        let t = Instant::now();
        let out = m.forward(&Batch::single(&prompt, 0), None, &Forward::default())?;
        let _ = out.logits.i((0, 0))?.argmax(0)?.to_scalar::<u32>()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let decode = || -> Result<f64> {
        let mut cache = m.new_cache();
        let mut tok = prompt[0];
        let t = Instant::now();
        for pos in 0..a.gen_tokens as u32 {
            let out = m.forward(
                &Batch::next_tokens(&[tok], &[pos]),
                Some(&mut cache),
                &Forward::default(),
            )?;
            tok = out.logits.i((0, 0))?.argmax(0)?.to_scalar::<u32>()?;
        }
        Ok(t.elapsed().as_secs_f64())
    };

    prefill()?;
    decode()?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        pp.push(a.prompt_tokens as f64 / prefill()?);
        tg.push(a.gen_tokens as f64 / decode()?);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let sd = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    eprintln!(
        "pp{}: {:.1} ± {:.1} tok/s; tg{}: {:.1} ± {:.1} tok/s ({} reps)",
        a.prompt_tokens,
        mean(&pp),
        sd(&pp),
        a.gen_tokens,
        mean(&tg),
        sd(&tg),
        a.reps
    );
    println!("prefill_tok_s={:.2} decode_tok_s={:.2}", mean(&pp), mean(&tg));
    Ok(())
}
