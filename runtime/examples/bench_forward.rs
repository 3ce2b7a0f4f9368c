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
//!
//! `--profile` also splits one decode step's time (stderr): the projections of all layers and the lm_head,
//! each timed alone on a decode-shaped input, the rest of the step (attention, norms, RoPE, cache, glue), and
//! the effective weight-streaming bandwidth next to a plain single-pass read of an equally large buffer.

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
    profile: bool,
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
        profile: false,
    };
    let mut model = None;
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--prompt-tokens" => a.prompt_tokens = val("--prompt-tokens")?.parse()?,
            "--gen-tokens" => a.gen_tokens = val("--gen-tokens")?.parse()?,
            "--threads" => a.threads = val("--threads")?.parse()?,
            "--reps" => a.reps = val("--reps")?.parse()?,
            "--profile" => a.profile = true,
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
    dlo_runtime::RuntimeOptions {
        threads: Some(a.threads),
        ..Default::default()
    }
    .init_process_threads()?;
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
    if a.profile {
        profile(&m, mean(&tg))?;
    }
    println!("prefill_tok_s={:.2} decode_tok_s={:.2}", mean(&pp), mean(&tg));
    Ok(())
}

/// Mean seconds of `f` over `n` runs after one warm-up.
fn time_it(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / n as f64)
}

/// Splits a decode step (measured at `decode_tok_s`) into weight streaming and the rest, and measures what the
/// thread hand-off of the matvec kernel costs (f32 models only for the kernel-level lines).
fn profile(m: &Model, decode_tok_s: f64) -> Result<()> {
    use dlo_runtime::kernels::{matvec, WeightElem};
    use dlo_runtime::model::layers::Linear;
    let step_s = 1.0 / decode_tok_s;
    let d = m.config().hidden_size;
    let f = m.config().intermediate_size;
    let dev = Device::Cpu;
    let n = 10;
    let xd = candle_core::Tensor::randn(0f32, 1.0, (1, 1, d), &dev)?.to_dtype(m.dtype())?;
    let xf = candle_core::Tensor::randn(0f32, 1.0, (1, 1, f), &dev)?.to_dtype(m.dtype())?;
    let xo = candle_core::Tensor::randn(
        0f32,
        1.0,
        (1, 1, m.config().num_attention_heads * m.config().head_dim),
        &dev,
    )?
    .to_dtype(m.dtype())?;
    let head = match &m.lm_head {
        Some(h) => h.clone(),
        None => Linear {
            weight: m.embed_tokens.clone(),
            bias: None,
        },
    };
    // Every projection of a decode step, in order, with its input.
    let mut projs: Vec<(&Linear, &candle_core::Tensor)> = Vec::new();
    for l in &m.layers {
        for lin in [&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj] {
            projs.push((lin, &xd));
        }
        projs.push((&l.self_attn.o_proj, &xo));
        projs.push((&l.mlp.gate_proj, &xd));
        projs.push((&l.mlp.up_proj, &xd));
        projs.push((&l.mlp.down_proj, &xf));
    }
    projs.push((&head, &xd));
    let bytes: usize = projs
        .iter()
        .map(|(l, _)| l.weight.as_dense().map_or(0, |w| w.elem_count()) * m.dtype().size_in_bytes())
        .sum();
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    let via_linear = time_it(n, || {
        for (l, x) in &projs {
            l.forward(x)?;
        }
        Ok(())
    })?;
    eprintln!(
        "decode step {:.2} ms; its {} projections via Linear::forward {:.2} ms ({:.0}% of the step, {:.1} GB/s); rest {:.2} ms",
        1e3 * step_s,
        projs.len(),
        1e3 * via_linear,
        100.0 * via_linear / step_s,
        gbs(via_linear),
        1e3 * (step_s - via_linear)
    );
    if m.dtype() != DType::F32 {
        return Ok(());
    }
    // The same weights through the kernels directly: from this (non-pool) thread, from inside the rayon
    // pool, and as a plain sequential loop of row dot products (no rayon at all).
    let ws: Vec<(Vec<f32>, Vec<f32>, usize, usize)> = projs
        .iter()
        .map(|(l, x)| -> Result<_> {
            let w = l.weight.as_dense().expect("the profile loads dense weights");
            let (o, i) = w.dims2()?;
            Ok((
                w.flatten_all()?.to_vec1::<f32>()?,
                x.flatten_all()?.to_vec1::<f32>()?,
                o,
                i,
            ))
        })
        .collect::<Result<_>>()?;
    let cold = time_it(n, || {
        for (w, x, o, i) in &ws {
            std::hint::black_box(matvec(w, x, 1, *o, *i));
        }
        Ok(())
    })?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .build()?;
    let warm = pool.install(|| {
        time_it(n, || {
            for (w, x, o, i) in &ws {
                std::hint::black_box(matvec(w, x, 1, *o, *i));
            }
            Ok(())
        })
    })?;
    let seq = time_it(n, || {
        for (w, x, o, i) in &ws {
            let y: Vec<f32> = (0..*o).map(|r| f32::dot(&w[r * i..(r + 1) * i], x)).collect();
            std::hint::black_box(y);
        }
        Ok(())
    })?;
    let big: Vec<f32> = vec![1.0; bytes / 4];
    let read = time_it(3, || {
        // Eight independent lanes so that the sum vectorises: a streaming-read ceiling.
        let mut acc = [0f32; 8];
        for c in big.chunks_exact(8) {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        std::hint::black_box(acc);
        Ok(())
    })?;
    eprintln!(
        "kernels::matvec over the same weights: called from a non-pool thread {:.2} ms ({:.1} GB/s), inside pool.install {:.2} ms ({:.1} GB/s); sequential dot loop (no rayon) {:.2} ms ({:.1} GB/s); plain f32 sum over {} MB {:.2} ms ({:.1} GB/s)",
        1e3 * cold,
        gbs(cold),
        1e3 * warm,
        gbs(warm),
        1e3 * seq,
        gbs(seq),
        bytes / 1_000_000,
        1e3 * read,
        gbs(read)
    );
    Ok(())
}
