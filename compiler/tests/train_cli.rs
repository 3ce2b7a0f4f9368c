//! `dlo-compile train` end to end on a tiny HF checkpoint with a byte-level tokenizer and a ChatML template:
//! a run, an interrupted run resumed to the same curve, and bad inputs refused before training starts.

use candle_core::{Device, Tensor};
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

/// A tiny DLO checkpoint (3 layers, routers on 1 and 2) with random weights from `seed`.
fn write_model(dir: &Path, seed: u64, layers: usize) {
    let (d, f, h, kv, hd) = (16usize, 32usize, 4usize, 2usize, 4usize);
    let cfg = json!({
        "model_type": "llama_dlo_exattn", "architectures": ["LlamaDLOExAttnForCausalLM"],
        "vocab_size": V, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
        "num_attention_heads": h, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false,
        "eos_token_id": 257, "is_dlo": (0..layers).map(|l| l > 0).collect::<Vec<_>>(),
        "dlo_capacity": 0.75, "dlo_loss_type": "cos-global", "dlo_loss_coefficient": 1.0,
        "rescale_hidden_states": true, "scale_factor": 2.0, "scale_gap": 0.05, "gate_init_method": "random"
    });
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
        if l > 0 {
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
