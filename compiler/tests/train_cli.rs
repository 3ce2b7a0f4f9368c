//! `dlo-compile train` end to end on a tiny HF checkpoint with a byte-level tokenizer and a ChatML template:
//! a run, an interrupted run resumed to the same curve, bad inputs refused before training starts, and trained
//! checkpoints that load in transformers 4.40.1 with our logits.

use candle_core::{DType, Device, Tensor};
use dlo_runtime::testing::{write_hf_checkpoint, XorShift};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const V: usize = 258; // 256 bytes + <|im_start|> + <|im_end|>

/// GPT-2's byte → printable-character map used by byte-level BPE vocabularies.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, Value> = byte_chars()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let special = |id: usize, s: &str| {
        json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let tc = json!({
        "eos_token": "<|im_end|>", "add_bos_token": false,
        "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// A tiny DLO checkpoint (MLP skip, routers on every layer but 0) with random weights from `seed`.
fn write_model(dir: &Path, seed: u64, layers: usize) {
    write_model_of(dir, seed, layers, Some("llama_dlo_exattn"));
}

/// A tiny checkpoint with random weights from `seed`: dense (`dlo_type` None) or of DLO `model_type`
/// `dlo_type` with routers on every layer but 0.
fn write_model_of(dir: &Path, seed: u64, layers: usize, dlo_type: Option<&str>) {
    let (d, f, h, kv, hd) = (16usize, 32usize, 4usize, 2usize, 4usize);
    let mut cfg = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": V, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
        "num_attention_heads": h, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false,
        "eos_token_id": 257
    });
    if let Some(t) = dlo_type {
        let arch = match t {
            "llama_dlo_exattn" => "LlamaDLOExAttnForCausalLM",
            _ => "LlamaDLOForCausalLM",
        };
        let dlo = json!({
            "model_type": t, "architectures": [arch],
            "is_dlo": (0..layers).map(|l| l > 0).collect::<Vec<_>>(),
            "dlo_capacity": 0.75, "dlo_loss_type": "cos-global", "dlo_loss_coefficient": 1.0,
            "rescale_hidden_states": true, "scale_factor": 2.0, "scale_gap": 0.05, "gate_init_method": "random"
        });
        for (k, v) in dlo.as_object().unwrap() {
            cfg[k] = v.clone();
        }
    }
    // Uniform with (about) the given standard deviation: sqrt(12) ≈ 3.46.
    let mut rng = XorShift::new(seed);
    let mut rnd = |n: usize, std: f32, mean: f32| -> Vec<f32> {
        (0..n).map(|_| (rng.unit_f32() - 0.5) * 3.46 * std + mean).collect()
    };
    let dev = Device::Cpu;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        let n = shape.iter().product();
        m.insert(name, Tensor::from_vec(rnd(n, std, mean), shape, &dev).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[V, d], 1.0, 0.0);
    put("lm_head.weight".into(), &[V, d], 0.3, 0.0);
    put("model.norm.weight".into(), &[d], 0.1, 1.0);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.self_attn.q_proj.weight"), &[h * hd, d], 0.3, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv * hd, d], 0.3, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv * hd, d], 0.3, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[d, h * hd], 0.3, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), &[f, d], 0.3, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[f, d], 0.3, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[d, f], 0.3, 0.0);
        put(format!("{p}.input_layernorm.weight"), &[d], 0.1, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[d], 0.1, 1.0);
        if l > 0 && dlo_type.is_some() {
            put(format!("model.routers.{l}.weight"), &[1, d], 0.5, 0.0);
        }
    }
    write_hf_checkpoint(dir, &cfg, &m).unwrap();
    write_tokenizer(dir);
}

fn write_data(dir: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..24 {
        lines.push(match i % 3 {
            0 => json!({"messages": [{"role": "user", "content": format!("add {i} and {}", i + 1)},
                                     {"role": "assistant", "content": format!("{}", 2 * i + 1)}]}),
            1 => json!({"instruction": "repeat", "input": format!("word{i}"), "output": format!("word{i}")}),
            _ => json!({"prompt": format!("count to {}", i % 7), "response": (1..=i % 7 + 1).map(|x| x.to_string()).collect::<Vec<_>>().join(" ")}),
        }
        .to_string());
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

fn train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dlo-compile"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

fn curve(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_s");
                o.remove("timing");
            }
            v
        })
        .collect()
}

#[test]
fn cli_trains_resumes_identically_and_writes_a_loadable_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    write_model(&model, 1, 3);
    let data = write_data(d.path());
    let m = model.to_str().unwrap();
    let dt = data.to_str().unwrap();
    let common = [
        "--data",
        dt,
        "--steps",
        "6",
        "--batch",
        "3",
        "--grad-accum",
        "2",
        "--seq-len",
        "48",
        "--lr",
        "3e-3",
        "--warmup",
        "0.2",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--eval-split",
        "4",
        "--anneal-steps",
        "3",
        "--seed",
        "5",
    ];
    let a = d.path().join("a");
    let out = train(&[&[m, "-o", a.to_str().unwrap()], &common[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("24 conversations, 24 kept") && err.contains("20 train, 4 held out"),
        "{err}"
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
    ] {
        assert!(a.join("final").join(f).is_file(), "final/{f}");
    }
    assert!(a.join("plot.svg").is_file() && a.join("summary.json").is_file());
    let c = curve(&a);
    assert_eq!(c.iter().filter(|r| r["kind"] == "train").count(), 6);
    assert_eq!(
        c.iter().filter(|r| r["kind"] == "eval").count(),
        3,
        "at steps 0, 3 and 6"
    );
    // interrupted after step 3 (checkpoint-2 is the last one), then resumed: same curve, same model
    let b = d.path().join("b");
    let out = train(&[&[m, "-o", b.to_str().unwrap(), "--stop-after", "3"], &common[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!b.join("final").exists());
    let ck = b.join("checkpoint-2");
    let out = train(
        &[
            &[m, "-o", b.to_str().unwrap(), "--resume", ck.to_str().unwrap()],
            &common[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(curve(&a), curve(&b));
    assert_eq!(
        std::fs::read(a.join("final/model.safetensors")).unwrap(),
        std::fs::read(b.join("final/model.safetensors")).unwrap()
    );
    // the trained model trains again from its own directory (a loadable HF checkpoint with tokenizer)
    let c2 = d.path().join("c");
    let fin = a.join("final");
    let out = train(&[
        fin.to_str().unwrap(),
        "--data",
        dt,
        "--steps",
        "1",
        "-o",
        c2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cli_refuses_bad_data_and_foreign_resume_before_training() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    write_model(&model, 1, 3);
    let data = write_data(d.path());
    let bad = d.path().join("bad.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text = text.replacen('\n', "\n{\"messages\": [}\n", 1);
    std::fs::write(&bad, text).unwrap();
    let out_dir = d.path().join("o");
    let m = model.to_str().unwrap();
    let out = train(&[
        m,
        "--data",
        bad.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--steps",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2:") && err.contains("not valid JSON"), "{err}");
    assert!(!out_dir.exists(), "nothing is written when the data is bad");
    // a missing data file: named, with its cause said once
    let missing = d.path().join("missing.jsonl");
    let out = train(&[m, "--data", missing.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.jsonl: No such file"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // a checkpoint of another model cannot be resumed
    let a = d.path().join("a");
    let dt = data.to_str().unwrap();
    let out = train(&[
        m,
        "--data",
        dt,
        "-o",
        a.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other = d.path().join("other");
    write_model(&other, 2, 4);
    let fin = a.join("final");
    let out = train(&[
        other.to_str().unwrap(),
        "--data",
        dt,
        "-o",
        a.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "2",
        "--resume",
        fin.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different model") && err.contains("4 layers"), "{err}");
    // runtime flags: out-of-range threads and unknown or unavailable devices, before anything is written
    let o = d.path().join("o2");
    for (flags, needle) in [
        (["--threads", "0"], "0 threads: the thread count must be at least 1"),
        (["--device", "gpu"], "device `gpu` is not `cpu`, `cuda` or `cuda:N`"),
        (["--device", "cuda:0"], "device cuda:0: cannot open it"),
    ] {
        let mut args = vec![m, "--data", dt, "-o", o.to_str().unwrap(), "--steps", "1"];
        args.extend(flags);
        let out = train(&args);
        assert!(!out.status.success(), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!o.exists(), "{flags:?} wrote {}", o.display());
    }
}

/// Kill the process for real (SIGKILL) part-way, resume from its last checkpoint: the curve and the final
/// model equal an uninterrupted run's.
#[test]
fn killed_run_resumes_to_the_same_curve() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    write_model(&model, 3, 3);
    let data = write_data(d.path());
    let m = model.to_str().unwrap();
    let dt = data.to_str().unwrap();
    let common = [
        "--data",
        dt,
        "--steps",
        "300",
        "--batch",
        "4",
        "--seq-len",
        "48",
        "--lr",
        "1e-3",
        "--save-every",
        "10",
        "--eval-every",
        "50",
        "--eval-split",
        "4",
        "--anneal-steps",
        "100",
    ];
    let b = d.path().join("b");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlo-compile"))
        .arg("train")
        .args([m, "-o", b.to_str().unwrap()])
        .args(common)
        .stderr(std::fs::File::create(d.path().join("killed.log")).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !b.join("checkpoint-20").is_dir() {
        let log = || std::fs::read_to_string(d.path().join("killed.log")).unwrap_or_default();
        assert!(started.elapsed().as_secs() < 120, "no checkpoint-20: {}", log());
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the run ended ({st}) before checkpoint-20: {}", log());
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!b.join("final").exists(), "the run finished before it could be killed");
    let last = (1..30)
        .rev()
        .map(|k| b.join(format!("checkpoint-{}", k * 10)))
        .find(|p| p.join("trainer_state.json").is_file())
        .unwrap();
    let out = train(
        &[
            &[m, "-o", b.to_str().unwrap(), "--resume", last.to_str().unwrap()],
            &common[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = d.path().join("a");
    let out = train(&[&[m, "-o", a.to_str().unwrap()], &common[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(curve(&a), curve(&b));
    assert_eq!(
        std::fs::read(a.join("final/model.safetensors")).unwrap(),
        std::fs::read(b.join("final/model.safetensors")).unwrap()
    );
}

/// The logits (and routing) `scripts/check_hf_load.py --logits-out` writes: transformers 4.40.1's
/// `from_pretrained` load of `dir`, with the reference's routed eval forward for a DLO checkpoint.
struct HfLogits {
    logits: Vec<Vec<f32>>,
    /// Per routed layer: router logits and exec decisions, per position.
    routed: HashMap<usize, (Vec<f32>, Vec<bool>)>,
}

/// Runs `scripts/check_hf_load.py DIR --ids IDS --logits-out FILE` with `py`; the process output, and the
/// file's contents when it succeeded.
fn hf_logits(py: &Path, dir: &Path, ids: &[u32]) -> (std::process::Output, Option<HfLogits>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_hf_load.py");
    let out_file = dir.with_extension("logits.json");
    let ids_arg = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let out = Command::new(py)
        .arg(script)
        .arg(dir)
        .args(["--ids", &ids_arg, "--logits-out"])
        .arg(&out_file)
        .output()
        .unwrap();
    if !out.status.success() {
        return (out, None);
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let f32s = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let logits = v["logits"].as_array().unwrap().iter().map(f32s).collect();
    let routed = v["routed"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(l, r)| {
            let exec = r["exec"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_i64() == Some(1))
                .collect();
            (l.parse().unwrap(), (f32s(&r["router_logits"]), exec))
        })
        .collect();
    (out, Some(HfLogits { logits, routed }))
}

fn max_abs(v: impl IntoIterator<Item = f32>) -> f32 {
    v.into_iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Issue: a checkpoint written by `dlo-compile train` did not load in transformers 4.40.1 (`from_pretrained`
/// stopped with `AttributeError: 'NoneType' object has no attribute 'get'`: the safetensors file carried no
/// `{"format": "pt"}` metadata). Trained checkpoints, dense and DLO (MLP and whole-layer skip), now load there
/// through `from_pretrained`, and transformers' logits (the reference's routed eval forward over its modules
/// for DLO) equal our runtime's with the reference routing: max |Δ| ≤ 1e-4 × max |logit|, the same routing
/// decisions. The same dense checkpoint rewritten without the metadata is refused there as it was.
#[test]
fn trained_checkpoints_load_in_transformers_with_our_logits() {
    use dlo_runtime::model::{Batch, Forward, Routing};
    use dlo_runtime::{Checkpoint, Model};
    const REL_TOL: f32 = 1e-4;
    let Some(py) = dlo_runtime::testing::torch_python() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let data = write_data(d.path());
    // Text-like ids with the chat markers: the bytes of a sentence, framed by <|im_start|> and <|im_end|>.
    let ids: Vec<u32> = std::iter::once(256)
        .chain("user\nrepeat: the quick brown fox".bytes().map(u32::from))
        .chain([257])
        .collect();
    for (name, dlo_type) in [
        ("dense", None),
        ("mlp", Some("llama_dlo_exattn")),
        ("layer", Some("llama_dlo")),
    ] {
        let model = d.path().join(format!("{name}-model"));
        write_model_of(&model, 7, 3, dlo_type);
        let run = d.path().join(format!("{name}-run"));
        let started = std::time::Instant::now();
        let out = train(&[
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "-o",
            run.to_str().unwrap(),
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "48",
            "--lr",
            "1e-2",
            "--eval-split",
            "0",
            "--save-every",
            "0",
        ]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let train_s = started.elapsed().as_secs_f32();
        let fin = run.join("final");
        assert_ne!(
            std::fs::read(fin.join("model.safetensors")).unwrap(),
            std::fs::read(model.join("model.safetensors")).unwrap(),
            "{name}: training changed nothing"
        );
        let started = std::time::Instant::now();
        let (out, hf) = hf_logits(&py, &fin, &ids);
        let hf = hf.unwrap_or_else(|| {
            panic!(
                "{name}: transformers could not load the trained checkpoint:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let hf_s = started.elapsed().as_secs_f32();

        let ck = Checkpoint::open(&fin).unwrap();
        let ours = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
        let fwd = Forward {
            routing: Routing::Reference,
            all_logits: true,
        };
        let out = ours.forward(&Batch::single(&ids, 0), None, &fwd).unwrap();
        let got: Vec<Vec<f32>> = out.logits.squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(
            (got.len(), got[0].len()),
            (hf.logits.len(), hf.logits[0].len()),
            "{name}: logits shape"
        );
        let scale = max_abs(hf.logits.iter().flatten().copied());
        let diff = max_abs(got.iter().flatten().zip(hf.logits.iter().flatten()).map(|(a, b)| a - b));

        // The routing: the same layers routed, the same decisions, router logits as close as the logits.
        let routed: Vec<usize> = (0..out.trace.len()).filter(|l| out.trace[*l].is_some()).collect();
        let mut hf_routed: Vec<usize> = hf.routed.keys().copied().collect();
        hf_routed.sort();
        assert_eq!(routed, hf_routed, "{name}: routed layers");
        let mut rates = Vec::new();
        for &l in &routed {
            let tr = out.trace[l].as_ref().unwrap();
            let (z, exec) = &hf.routed[&l];
            let margin = z.iter().fold(f32::INFINITY, |m, x| m.min(x.abs()));
            assert_eq!(
                &tr.exec, exec,
                "{name}: layer {l}: routing decisions differ from transformers' (smallest |z| {margin:e})"
            );
            let dz = max_abs(tr.logits.iter().zip(z).map(|(a, b)| a - b));
            let zs = max_abs(z.iter().copied());
            assert!(
                dz <= REL_TOL * zs,
                "{name}: layer {l}: router logits differ by {dz} (max |z| {zs})"
            );
            rates.push(format!("{l}:{}/{}", exec.iter().filter(|e| **e).count(), exec.len()));
        }
        if dlo_type.is_some() {
            // Some tokens take each branch somewhere, so that the comparison covers the skip path too.
            let execs = routed.iter().flat_map(|l| hf.routed[l].1.iter());
            let on = execs.clone().filter(|e| **e).count();
            assert!(on > 0 && on < execs.count(), "{name}: degenerate routing {rates:?}");
        }
        println!(
            "{name}: trained in {train_s:.2} s, transformers load + forward {hf_s:.1} s; max |Δlogit| {diff:.3e} \
             (max |logit| {scale:.3}); executed per routed layer {rates:?}"
        );
        assert!(scale > 0.5, "{name}: degenerate logits (max |logit| {scale})");
        assert!(
            diff <= REL_TOL * scale,
            "{name}: logits differ from transformers' by {diff} (> {REL_TOL} × {scale})"
        );

        if dlo_type.is_none() {
            // Without the metadata transformers 4.40.1 refuses the file, as it refused the checkpoint:
            // this test goes through the check that failed.
            let bare = d.path().join("no-metadata");
            std::fs::create_dir_all(&bare).unwrap();
            for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(fin.join(f), bare.join(f)).unwrap();
            }
            let tensors = candle_core::safetensors::load(fin.join("model.safetensors"), &Device::Cpu).unwrap();
            candle_core::safetensors::save(&tensors, bare.join("model.safetensors")).unwrap();
            let (out, hf) = hf_logits(&py, &bare, &ids);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(hf.is_none(), "a checkpoint without safetensors metadata loaded");
            assert!(err.contains("'NoneType' object has no attribute 'get'"), "{err}");
        }
    }
}
