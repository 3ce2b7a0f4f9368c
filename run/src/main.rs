//! `dlo-run`: load a checkpoint and generate text, dump one forward pass, or benchmark.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use clap::Parser;
use dlo_passes::fsutil::AtomicFile;
use dlo_runtime::chat::Message;
use dlo_runtime::engine::load_any;
use dlo_runtime::generate::{GenerateParams, Generator, SamplingParams};
use dlo_runtime::model::{Batch, Forward, Routing};
use dlo_runtime::{Model, RuntimeOptions};
use std::collections::HashMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "dlo-run", version, about = "Run a Llama-family or DLO checkpoint")]
struct Args {
    /// An engine (`dlo-compile build`), an HF directory or a GGUF file.
    model: PathBuf,
    /// Prompt text.
    #[arg(long)]
    prompt: Option<String>,
    /// Wrap the prompt in the model's chat template (as one user turn).
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Comma-separated prompt token ids instead of text (no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    token_ids: Option<Vec<u32>>,
    /// With --token-ids: run one forward pass and write logits and routing to this safetensors file.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Maximum new tokens; 0 = no limit (until an end-of-sequence token or the context is full), as in the
    /// C ABI.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// RNG seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Compute dtype, to which every weight is converted (f64: a slow verification mode, e.g. `--dump`
    /// references for f64 ONNX exports). Without it the model computes in f32 and block-quantized weights (a
    /// GGUF's Q4_1, a Q8_0 engine) run in their blocks; with it they are dequantized.
    #[arg(long, value_parser = ["f32", "bf16", "f64"])]
    dtype: Option<String>,
    /// Storage of the KV cache (default: the compute dtype). f16 (llama.cpp's default) halves its memory; K/V
    /// are widened back to the compute dtype for attention.
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    kv_dtype: Option<String>,
    /// Worker threads (default: all cores; more than 4 per CPU are lowered to that, with a warning).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` in a build with CUDA support.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Mean execution rate of routed units, in (0, 1] (engines built with --calibration only; an engine built
    /// with `--budget capacity` keeps its per-layer proportions).
    #[arg(long)]
    budget: Option<f64>,
    /// Force every routed unit on (`on`) or off (`off`) instead of following the routers.
    #[arg(long, value_parser = ["on", "off"])]
    force_routing: Option<String>,
    /// Print timing and routing statistics to stderr after generating.
    #[arg(long)]
    stats: bool,
    /// Benchmark prefill and decode speed on synthetic token ids; prints `prefill_tok_s=X decode_tok_s=Y`.
    #[arg(long)]
    bench: bool,
    /// Prompt length for --bench (at least 1).
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    prompt_tokens: usize,
    /// Generated tokens for --bench (at least 1; the first comes from the prefill, the rest are decode steps).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    gen_tokens: usize,
}

/// Parses a count that must be positive.
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> std::process::ExitCode {
    dlo_runtime::alloc::tune_for_large_tensors();
    dlo_runtime::error::quiet_error_backtraces();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", dlo_runtime::error::report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let opts = RuntimeOptions {
        device: args.device.parse()?,
        dtype: match args.dtype.as_deref() {
            Some("bf16") => DType::BF16,
            Some("f64") => DType::F64,
            _ => DType::F32,
        },
        dequantize: args.dtype.is_some(),
        kv_dtype: args.kv_dtype.as_deref().map(|d| match d {
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            _ => DType::F32,
        }),
        threads: args.threads,
        ..RuntimeOptions::default()
    };
    if let Some(w) = opts.init_process_threads().context("--threads")? {
        eprintln!("warning: --threads: {w}");
    }
    let t0 = Instant::now();
    let (ckpt, model) =
        load_any(&args.model, &opts).with_context(|| format!("loading the model from {}", args.model.display()))?;
    for w in &ckpt.warnings {
        eprintln!("warning: {w}");
    }
    let load_time = t0.elapsed();
    let routing = match args.force_routing.as_deref() {
        Some(_) if args.budget.is_some() => bail!("--budget and --force-routing exclude each other"),
        Some("on") => Routing::Force(true),
        Some("off") => Routing::Force(false),
        _ => ckpt.routing(args.budget)?,
    };

    if args.bench {
        return bench(&model, &args, routing);
    }
    if let Some(path) = &args.dump {
        let ids = args.token_ids.as_ref().context("--dump needs --token-ids")?;
        return dump(&model, ids, path, routing);
    }

    let tok = ckpt.tokenizer.as_ref();
    let prompt: Vec<u32> = match (&args.token_ids, &args.prompt) {
        (Some(ids), None) => ids.clone(),
        (None, Some(text)) => {
            let tok = tok.with_context(|| format!("{}: no tokenizer; use --token-ids", args.model.display()))?;
            let text = if args.chat {
                let tmpl = tok
                    .chat_template
                    .as_ref()
                    .with_context(|| format!("{}: no chat template for --chat", args.model.display()))?;
                let mut msgs = vec![];
                if let Some(s) = &args.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", text));
                tmpl.render(&msgs, true)?
            } else {
                text.clone()
            };
            tok.encode(&text, !args.chat)?
        }
        (Some(_), Some(_)) => bail!("give either --prompt or --token-ids, not both"),
        (None, None) => bail!("nothing to do: give --prompt TEXT or --token-ids IDS"),
    };
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        stop_tokens: ckpt.stop_tokens(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        routing,
    };
    let mut gen = Generator::new(&model, params)?;
    let mut out = std::io::stdout().lock();
    let mut stream = tok.map(|t| dlo_runtime::TextStream::with_context(t, true, &prompt));
    let mut failure = None;
    let result = gen.generate(&prompt, |t| {
        let piece = match stream.as_mut() {
            Some(s) => match s.push(t) {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
            },
            None => format!("{t} "),
        };
        if write!(out, "{piece}").and_then(|_| out.flush()).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    if let Some(s) = stream.as_mut() {
        write!(out, "{}", s.finish()?)?;
    }
    writeln!(out)?;
    if args.stats {
        let pre = result.prompt_tokens as f64 / result.prefill_time.as_secs_f64();
        let dec = result.decode_steps() as f64 / result.decode_time.as_secs_f64().max(1e-9);
        eprintln!(
            "load {:.2}s, prompt {} tokens ({pre:.1} tok/s), generated {} tokens ({dec:.1} tok/s), stop: {:?}",
            load_time.as_secs_f64(),
            result.prompt_tokens,
            result.tokens.len(),
            result.stop
        );
        if ckpt.config.dlo.is_some() {
            eprintln!(
                "mean execution rate of routed layers: {:.3}",
                result.routing.mean_rate()
            );
        }
        let kinds: Vec<String> = model
            .weight_kinds()
            .iter()
            .map(|(k, n, b)| format!("{k} ({n} tensors, {:.1} MB)", *b as f64 / 1e6))
            .collect();
        eprintln!(
            "weights: {}; {:.1} MB read per token with every unit on",
            kinds.join(", "),
            model.bytes_per_token() as f64 / 1e6
        );
        eprintln!("{}", flops_report(&ckpt.config, &result));
    }
    Ok(())
}

/// One forward pass over `ids`; writes `logits` [n, vocab] and, per routed layer, `exec.{l}` (u8) and
/// `router_logit.{l}` (f32) to a safetensors file (temp file + rename).
fn dump(model: &Model, ids: &[u32], path: &Path, routing: Routing) -> Result<()> {
    let out = model.forward(
        &Batch::single(ids, 0),
        None,
        &Forward {
            routing,
            all_logits: true,
        },
    )?;
    let n = ids.len();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("logits".into(), out.logits.i(0)?);
    for (l, tr) in out.trace.iter().enumerate() {
        if let Some(tr) = tr {
            let exec: Vec<u8> = tr.exec.iter().map(|&e| e as u8).collect();
            tensors.insert(format!("exec.{l}"), Tensor::from_vec(exec, n, &Device::Cpu)?);
            tensors.insert(
                format!("router_logit.{l}"),
                Tensor::from_vec(tr.logits.clone(), n, &Device::Cpu)?,
            );
        }
    }
    // A temporary beside the destination, renamed into place; removed on any failure, the rename included.
    let file = AtomicFile::create(path)?;
    candle_core::safetensors::save(&tensors, file.temp_path())
        .with_context(|| format!("writing {}", file.temp_path().display()))?;
    file.commit()?;
    Ok(())
}

/// Prefill `--prompt-tokens` synthetic ids, then decode `--gen-tokens` greedily; prints tokens/s.
fn bench(model: &Model, args: &Args, routing: Routing) -> Result<()> {
    let v = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32).map(|i| (i * 7919 + 13) % v).collect();
    // Warm-up: one short pass so that thread pools and allocations are primed.
    model.forward(
        &Batch::single(&prompt[..8.min(prompt.len())], 0),
        None,
        &Forward::default(),
    )?;
    let params = GenerateParams {
        max_tokens: args.gen_tokens,
        routing,
        ..Default::default()
    };
    let mut gen = Generator::new(model, params)?;
    let r = gen.generate(&prompt, |_| ControlFlow::Continue(()))?;
    let pre = r.prompt_tokens as f64 / r.prefill_time.as_secs_f64();
    let dec = r.decode_steps() as f64 / r.decode_time.as_secs_f64().max(1e-9);
    use dlo_runtime::flops;
    let cfg = model.config();
    let exec = |st: &dlo_runtime::generate::RoutingStats| -> Vec<Option<u64>> {
        st.layers.iter().map(|s| s.map(|(e, _)| e)).collect()
    };
    let t = r.prompt_tokens as u64;
    let pre_f = flops::prefill(cfg, t, &exec(&r.prefill_routing), 1).total() as f64;
    let pre_dense = flops::prefill(cfg, t, &[], 1).total() as f64;
    let all_f = flops::of_generation(cfg, &r).total() as f64;
    let all_dense = flops::of_generation_dense(cfg, &r).total() as f64;
    let steps = r.decode_steps().max(1) as f64;
    println!(
        "prefill_tok_s={pre:.2} decode_tok_s={dec:.2} prompt_tokens={} gen_tokens={} exec_rate={:.3} \
         prefill_flops_per_token={:.4e} prefill_dense_flops_per_token={:.4e} \
         decode_flops_per_token={:.4e} decode_dense_flops_per_token={:.4e}",
        r.prompt_tokens,
        r.tokens.len(),
        r.routing.mean_rate(),
        pre_f / t as f64,
        pre_dense / t as f64,
        (all_f - pre_f) / steps,
        (all_dense - pre_dense) / steps,
    );
    Ok(())
}

/// Executed matmul FLOPs per processed token, beside the dense model's and (for expanded models) the base
/// model's (the original layers only, no routers).
fn flops_report(cfg: &dlo_passes::ModelConfig, g: &dlo_runtime::generate::Generation) -> String {
    use dlo_runtime::flops;
    let tokens = (g.prompt_tokens + g.decode_steps()).max(1) as f64;
    let per = |f: flops::Flops| f.total() as f64 / tokens;
    let executed = per(flops::of_generation(cfg, g));
    let dense = per(flops::of_generation_dense(cfg, g));
    let mut line = format!("FLOPs per token: {executed:.4e} executed, {dense:.4e} with every unit on");
    let base_layers = cfg.extra.get("dlo_expansion").and_then(|e| e["base_layers"].as_u64());
    if let Some(n) = base_layers {
        let mut base = cfg.clone();
        base.num_hidden_layers = n as usize;
        base.dlo = None;
        let b = per(flops::of_generation_dense(&base, g));
        line += &format!(", {b:.4e} for the {n}-layer base model ({:.3}x)", executed / b);
    }
    line
}
