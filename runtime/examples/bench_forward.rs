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

/// Splits a decode step (`step_s` seconds, measured) into projections, lm_head and the rest.
fn profile(m: &Model, decode_tok_s: f64) -> Result<()> {
    use dlo_runtime::model::layers::Linear;
    let step_s = 1.0 / decode_tok_s;
    let d = m.config().hidden_size;
    let f = m.config().intermediate_size;
    let dev = Device::Cpu;
    let xd = candle_core::Tensor::randn(0f32, 1.0, (1, 1, d), &dev)?.to_dtype(m.dtype())?;
    let xf = candle_core::Tensor::randn(0f32, 1.0, (1, 1, f), &dev)?.to_dtype(m.dtype())?;
    let xo = candle_core::Tensor::randn(
        0f32,
        1.0,
        (1, 1, m.config().num_attention_heads * m.config().head_dim),
        &dev,
    )?
    .to_dtype(m.dtype())?;
    let n = 10;
    let mut bytes = 0usize;
    for l in &m.layers {
        for lin in [
            &l.self_attn.q_proj,
            &l.self_attn.k_proj,
            &l.self_attn.v_proj,
            &l.mlp.gate_proj,
            &l.mlp.up_proj,
        ] {
            bytes += lin.weight.elem_count() * m.dtype().size_in_bytes();
        }
        bytes +=
            (l.self_attn.o_proj.weight.elem_count() + l.mlp.down_proj.weight.elem_count()) * m.dtype().size_in_bytes();
    }
    let proj_s = time_it(n, || {
        for l in &m.layers {
            for lin in [
                &l.self_attn.q_proj,
                &l.self_attn.k_proj,
                &l.self_attn.v_proj,
                &l.mlp.gate_proj,
                &l.mlp.up_proj,
            ] {
                lin.forward(&xd)?;
            }
            l.self_attn.o_proj.forward(&xo)?;
            l.mlp.down_proj.forward(&xf)?;
        }
        Ok(())
    })?;
    let head = match &m.lm_head {
        Some(h) => h.clone(),
        None => Linear {
            weight: m.embed_tokens.clone(),
            bias: None,
        },
    };
    let head_bytes = head.weight.elem_count() * m.dtype().size_in_bytes();
    let head_s = time_it(n, || {
        head.forward(&xd)?;
        Ok(())
    })?;
    // A plain streaming read of as many bytes as one decode step's weights (one thread).
    let buf = vec![1u8; bytes + head_bytes];
    let read_s = time_it(3, || {
        let s: u64 = buf.chunks_exact(64).map(|c| c[0] as u64 + c[63] as u64).sum();
        std::hint::black_box(s);
        Ok(())
    })?;
    let gbs = |b: usize, s: f64| b as f64 / s / 1e9;
    eprintln!(
        "decode step {:.2} ms: layer projections {:.2} ms ({:.0}%, {:.1} GB/s), lm_head {:.2} ms ({:.0}%, {:.1} GB/s), rest {:.2} ms ({:.0}%)",
        1e3 * step_s,
        1e3 * proj_s,
        100.0 * proj_s / step_s,
        gbs(bytes, proj_s),
        1e3 * head_s,
        100.0 * head_s / step_s,
        gbs(head_bytes, head_s),
        1e3 * (step_s - proj_s - head_s),
        100.0 * (step_s - proj_s - head_s) / step_s
    );
    eprintln!(
        "weights per step {:.0} MB; a one-thread streaming read of that many bytes runs at {:.1} GB/s",
        (bytes + head_bytes) as f64 / 1e6,
        gbs(bytes + head_bytes, read_s)
    );
    Ok(())
}
