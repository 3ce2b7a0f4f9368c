//! Engine tests: `header`, `alignment`, `round_trip`, `errors`, the write→read→compare `cycle` of routed
//! models, and spreading a budget over per-layer rates. (Budget calibration is the compiler's, and is tested
//! there: `dlo_compiler::calibrate`.)

use super::format::{ALIGN, FORMAT_VERSION, MAGIC, PREFIX_LEN};
use super::plan::spread_rates;
use super::*;
use crate::model::{Batch, Forward, Model};
use crate::testing::{
    max_abs_diff, random_weights, routed, routed_mlp, smollm2_gguf, text_ids, tiny_config, CALIB_TEXT,
};
use candle_core::{DType, Tensor};
use dlo_passes::SkipKind;

const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"hello":3,"world":4,"[UNK]":0},"unk_token":"[UNK]"}}"#;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_json_str(
        TOKENIZER_JSON,
        Path::new("test"),
        true,
        Some(1),
        vec![2],
        Some(ChatTemplate {
            source: "{% for m in messages %}{{ m.content }}{% endfor %}".into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        }),
    )
    .unwrap()
}

/// Writes an engine of `cfg` with seeded random weights; returns its path (inside `dir`) and the weights.
fn write_tiny(dir: &Path, cfg: &ModelConfig, dtype: StorageDtype, name: &str) -> (PathBuf, Weights) {
    let w = random_weights(cfg, 7);
    let path = dir.join(name);
    let plan = EnginePlan::from_config(cfg);
    write_engine_file(
        &path,
        cfg,
        &w,
        Some(&tokenizer()),
        &plan,
        Provenance::now(Path::new("random"), dtype),
    )
    .unwrap();
    (path, w)
}

fn tensor_eq(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn header() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = routed_mlp();
    let (path, _) = write_tiny(dir.path(), &cfg, StorageDtype::F32, "m.dlo");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), FORMAT_VERSION);
    assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 0);
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    let header = &bytes[PREFIX_LEN..PREFIX_LEN + hlen];
    assert_eq!(crc, crc32fast::hash(header));
    let v: serde_json::Value = serde_json::from_slice(header).unwrap();
    assert_eq!(v["file_len"].as_u64().unwrap(), bytes.len() as u64);
    assert_eq!(v["manifest"]["config"]["model_type"], "llama_dlo_exattn");
    assert_eq!(
        v["manifest"]["plan"]["schedule"],
        serde_json::json!(["none", "mlp", "mlp"])
    );
    assert_eq!(v["manifest"]["plan"]["gate"]["alpha"], 2.0);
    assert_eq!(v["manifest"]["provenance"]["dtype"], "f32");
    assert_eq!(v["tensors"].as_array().unwrap().len(), model_tensors(&cfg).len());
    // The padding after the header is zero up to the first tensor.
    let first = v["tensors"][0]["offset"].as_u64().unwrap() as usize;
    assert!(bytes[PREFIX_LEN + hlen..first].iter().all(|&b| b == 0));
}

#[test]
fn alignment() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [StorageDtype::F32, StorageDtype::Bf16] {
        let (path, _) = write_tiny(dir.path(), &tiny_config(true), dtype, "a.dlo");
        let e = Engine::open(&path).unwrap();
        for t in e.file().tensors() {
            assert_eq!(t.offset % ALIGN, 0, "{}", t.name);
            let b = e.file().tensor_bytes(&t.name).unwrap();
            assert_eq!(b.len() as u64, t.length);
        }
    }
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = routed(tiny_config(true), SkipKind::Layer);
    for dtype in [StorageDtype::F32, StorageDtype::Bf16, StorageDtype::F16] {
        let (path, w) = write_tiny(dir.path(), &cfg, dtype, "rt.dlo");
        let e = Engine::open(&path).unwrap();
        e.verify().unwrap();
        assert_eq!(e.config().to_hf_json(), cfg.to_hf_json());
        assert_eq!(e.plan(), &EnginePlan::from_config(&cfg));
        assert_eq!(e.manifest().provenance.dtype, dtype);
        let ew = e.weights();
        let names: Vec<String> = model_tensors(&cfg).into_iter().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(ew.names(), sorted);
        for (name, shape) in model_tensors(&cfg) {
            // Stored values are the source values rounded to the storage dtype, exactly.
            let want = w
                .get(&name, &shape, dtype.dtype(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = ew.get(&name, &shape, DType::F32, &Device::Cpu).unwrap();
            assert!(tensor_eq(&want, &got), "{name} ({})", dtype.as_str());
        }
        let tok = e.tokenizer().unwrap().unwrap();
        assert_eq!(tok.encode("hello world", true).unwrap(), vec![1, 3, 4]);
        assert_eq!(tok.eos_token_ids, vec![2]);
        let chat = tok.chat_template.as_ref().unwrap();
        assert_eq!(chat.bos_token, "<s>");
        assert!(chat.source.contains("messages"));
    }
    // A calibrated plan survives the trip too.
    let mut plan = EnginePlan::from_config(&cfg);
    plan.budget = Some(Budget {
        rate: 0.5,
        thresholds: vec![0.0, 0.25, -0.5],
        calibration_rate: 0.51,
        heldout_rate: Some(0.49),
        layer_rates: Some(vec![None, Some(0.3), Some(0.7)]),
    });
    plan.quantiles = vec![None, Some((0..101).map(|i| i as f32).collect()), Some(vec![0.5; 101])];
    plan.calibration_tokens = 1000;
    let path = dir.path().join("cal.dlo");
    let w = random_weights(&cfg, 3);
    write_engine_file(
        &path,
        &cfg,
        &w,
        None,
        &plan,
        Provenance::now(Path::new("x"), StorageDtype::F32),
    )
    .unwrap();
    let e = Engine::open(&path).unwrap();
    assert_eq!(e.plan(), &plan);
    assert!(e.tokenizer().unwrap().is_none());
}

/// The "cycle": a model built from the engine computes exactly what the checkpoint computes.
#[test]
fn cycle_engine_forward_equals_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    for (i, skip) in [SkipKind::Mlp, SkipKind::Layer].into_iter().enumerate() {
        let cfg = routed(tiny_config(i == 1), skip);
        let (path, w) = write_tiny(dir.path(), &cfg, StorageDtype::F32, "cycle.dlo");
        let reference = Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
        let e = Engine::open(&path).unwrap();
        let from_engine = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu).unwrap();
        let ids = text_ids(CALIB_TEXT, cfg.vocab_size as u32);
        let batch = Batch::left_padded(&[ids[..40].to_vec(), ids[50..70].to_vec()], 0);
        let opts = Forward {
            routing: e.routing(None).unwrap(),
            all_logits: true,
        };
        let a = reference.forward(&batch, None, &opts).unwrap();
        let b = from_engine.forward(&batch, None, &opts).unwrap();
        let diff = max_abs_diff(&a.logits, &b.logits);
        assert_eq!(diff, 0.0, "{skip:?}: engine logits differ by {diff}");
        let mut some_skipped = false;
        for (ta, tb) in a.trace.iter().zip(&b.trace) {
            if let (Some(ta), Some(tb)) = (ta, tb) {
                assert_eq!(ta.exec, tb.exec);
                assert_eq!(ta.logits, tb.logits);
                some_skipped |= ta.exec.iter().any(|e| !e);
            }
        }
        assert!(
            some_skipped,
            "routers never skipped: the comparison would not exercise routing"
        );
    }
}

// ----- errors -----

fn open_err(path: &Path) -> String {
    match Engine::open(path).and_then(|e| e.verify()) {
        Ok(()) => panic!("{} opened without error", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the JSON header of engine `bytes` in place (recomputing its checksum); the new JSON must fit
/// before the first tensor.
fn patch_header(bytes: &mut [u8], f: impl FnOnce(&mut serde_json::Value)) {
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[PREFIX_LEN..PREFIX_LEN + hlen]).unwrap();
    let first = v["tensors"][0]["offset"].as_u64().unwrap() as usize;
    f(&mut v);
    let json = serde_json::to_vec(&v).unwrap();
    assert!(PREFIX_LEN + json.len() <= first, "patched header does not fit");
    bytes[PREFIX_LEN..first].fill(0);
    bytes[PREFIX_LEN..PREFIX_LEN + json.len()].copy_from_slice(&json);
    bytes[12..16].copy_from_slice(&(json.len() as u32).to_le_bytes());
    bytes[16..20].copy_from_slice(&crc32fast::hash(&json).to_le_bytes());
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn errors_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_tiny(dir.path(), &tiny_config(true), StorageDtype::F32, "t.dlo");
    let bytes = std::fs::read(&path).unwrap();
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    for (cut, want) in [
        (0, "the file is empty"),
        (12, "shorter than the 20-byte prefix"),
        (PREFIX_LEN + hlen / 2, "engine is truncated"),
        (bytes.len() - 1, "engine is truncated"),
        (bytes.len() / 2, "engine is truncated"),
    ] {
        let p = write_bytes(dir.path(), "cut.dlo", &bytes[..cut]);
        let e = open_err(&p);
        assert!(e.contains(want), "cut at {cut}: {e}");
        assert!(e.contains("cut.dlo"), "the message names the file: {e}");
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 300]);
    let e = open_err(&write_bytes(dir.path(), "long.dlo", &longer));
    assert!(e.contains("trailing data"), "{e}");
}

/// An engine truncated by another process after it was opened, while its tensors are read: a clean error
/// naming the file (a memory-mapped reader dies of SIGBUS here).
#[test]
fn errors_truncated_while_loading() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(true);
    let (path, _) = write_tiny(dir.path(), &cfg, StorageDtype::F32, "t.dlo");
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len / 2, len - 100] {
        let e = Engine::open(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let err = match Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu) {
            Ok(_) => panic!("loaded from a truncated engine"),
            Err(err) => err.to_string(),
        };
        assert!(
            err.contains("t.dlo") && err.contains("truncated or replaced while being read"),
            "{err}"
        );
        let err = e.verify().unwrap_err().to_string();
        assert!(err.contains("truncated or replaced while being read"), "{err}");
        write_tiny(dir.path(), &cfg, StorageDtype::F32, "t.dlo");
    }
}

/// A quantized engine truncated after it was opened: mapping its blocks is the same clear error as reading them,
/// not a fault, and building a model from it fails naming the file.
#[test]
fn errors_truncated_before_the_blocks_are_mapped() {
    use candle_core::quantized::GgmlDType as G;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(true);
    let (path, _) = write_tiny(dir.path(), &cfg, StorageDtype::Blocks(G::Q4_0), "q.dlo");
    let e = Engine::open(&path).unwrap();
    let last = "model.layers.2.mlp.down_proj.weight";
    let t = e.file().entry(last).unwrap().clone();
    assert_eq!(t.dtype, StorageDtype::Packed(G::Q4_0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(t.offset + 10)
        .unwrap();
    let err = e.file().tensor_mapped(last).unwrap_err().to_string();
    assert!(
        err.contains("q.dlo") && err.contains("truncated or replaced while being read"),
        "{err}"
    );
    let err = match Model::load_opts(e.config(), &e.weights(), &crate::RuntimeOptions::default()) {
        Ok(_) => panic!("loaded from a truncated engine"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("q.dlo") && err.contains("truncated or replaced"), "{err}");
}

#[test]
fn errors_flipped_byte_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_tiny(dir.path(), &tiny_config(true), StorageDtype::F32, "f.dlo");
    let bytes = std::fs::read(&path).unwrap();
    let e = Engine::open(&path).unwrap();
    let first = e.file().tensors()[0].offset as usize;
    let entries = e.file().tensors().to_vec();
    drop(e);
    // Every byte of prefix, header and padding; a stride through the tensor data (and each tensor's
    // first and last byte).
    let mut positions: Vec<usize> = (0..first).collect();
    positions.extend((first..bytes.len()).step_by(61));
    for t in &entries {
        positions.push(t.offset as usize);
        positions.push((t.offset + t.length - 1) as usize);
    }
    let p = dir.path().join("flip.dlo");
    for &i in &positions {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        std::fs::write(&p, &b).unwrap();
        let msg = open_err(&p);
        if let Some(t) = entries
            .iter()
            .find(|t| (t.offset..t.offset + t.length).contains(&(i as u64)))
        {
            assert!(
                msg.contains(&format!("integrity check failed for tensor `{}`", t.name)),
                "byte {i} in {}: {msg}",
                t.name
            );
        } else if (PREFIX_LEN..first).contains(&i) {
            // A flipped header byte fails the manifest checksum (padding bytes are checked for zero).
            assert!(
                msg.contains("integrity check failed for the manifest") || msg.contains("padding"),
                "byte {i}: {msg}"
            );
        }
    }
}

#[test]
fn errors_flipped_tensor_byte_caught_when_building_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = routed_mlp();
    for dtype in [StorageDtype::F32, StorageDtype::Bf16] {
        let (path, _) = write_tiny(dir.path(), &cfg, dtype, "g.dlo");
        let mut bytes = std::fs::read(&path).unwrap();
        let e = Engine::open(&path).unwrap();
        let t = e.file().entry("model.layers.2.mlp.up_proj.weight").unwrap().clone();
        drop(e);
        bytes[(t.offset + t.length / 3) as usize] ^= 0x01;
        let p = write_bytes(dir.path(), "g2.dlo", &bytes);
        // Opening is O(header) and succeeds; the model build reads the tensor and fails on its checksum.
        let e = Engine::open(&p).unwrap();
        let err = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { what, .. } if what == "tensor `model.layers.2.mlp.up_proj.weight`"),
            "{err}"
        );
        assert!(err.to_string().contains("g2.dlo"), "{err}");
    }
}

#[test]
fn errors_newer_format_version() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_tiny(dir.path(), &tiny_config(true), StorageDtype::F32, "v.dlo");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let p = write_bytes(dir.path(), "v2.dlo", &bytes);
    let e = open_err(&p);
    assert!(
        e.contains(&format!(
            "engine format version {} is newer than this runtime supports ({FORMAT_VERSION}); \
             rebuild the engine or upgrade dlo",
            FORMAT_VERSION + 1
        )),
        "{e}"
    );
    assert!(matches!(Engine::open(&p), Err(Error::EngineVersion { found: 2, .. })));
}

#[test]
fn errors_wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let mut gguf = b"GGUF\x03\x00\x00\x00".to_vec();
    gguf.extend_from_slice(&[0; 64]);
    let e = open_err(&write_bytes(dir.path(), "model.gguf", &gguf));
    assert!(e.contains("not a dlo engine (found GGUF magic)"), "{e}");

    let st = dir.path().join("model.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("w".to_string(), t)]), &st).unwrap();
    let e = open_err(&st);
    assert!(e.contains("not a dlo engine (found a safetensors header)"), "{e}");

    let e = open_err(dir.path());
    assert!(e.contains("not a dlo engine: this is a directory"), "{e}");
    let e = open_err(&write_bytes(dir.path(), "x.bin", b"hello there, not an engine"));
    assert!(e.contains("not a dlo engine (found bytes 68 65 6c"), "{e}");
}

#[test]
fn errors_corrupt_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = routed_mlp();
    let (path, _) = write_tiny(dir.path(), &cfg, StorageDtype::F32, "m.dlo");
    let bytes = std::fs::read(&path).unwrap();
    // Invalid JSON with a valid checksum.
    let mut b = bytes.clone();
    let hlen = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    b[PREFIX_LEN + hlen - 1] = b',';
    let crc = crc32fast::hash(&b[PREFIX_LEN..PREFIX_LEN + hlen]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    let e = open_err(&write_bytes(dir.path(), "j.dlo", &b));
    assert!(e.contains("header JSON is invalid"), "{e}");
    // Valid JSON, inconsistent plan: the schedule says layer 1 is dense.
    let mut b = bytes.clone();
    patch_header(&mut b, |v| v["manifest"]["plan"]["schedule"][1] = "none".into());
    let e = open_err(&write_bytes(dir.path(), "s.dlo", &b));
    assert!(e.contains("manifest plan: layer schedule"), "{e}");
    // A config the runtime cannot accept.
    let mut b = bytes.clone();
    patch_header(&mut b, |v| v["manifest"]["config"]["num_attention_heads"] = 3.into());
    assert!(Engine::open(&write_bytes(dir.path(), "c.dlo", &b)).is_err());
    // A missing manifest key.
    let mut b = bytes.clone();
    patch_header(&mut b, |v| {
        v["manifest"].as_object_mut().unwrap().remove("plan");
    });
    let e = open_err(&write_bytes(dir.path(), "k.dlo", &b));
    assert!(e.contains("manifest is invalid") && e.contains("plan"), "{e}");
    // A tensor the config needs is absent from the table.
    let mut b = bytes.clone();
    patch_header(&mut b, |v| v["tensors"][0]["name"] = "renamed".into());
    let e = open_err(&write_bytes(dir.path(), "n.dlo", &b));
    assert!(e.contains("missing tensor `model.embed_tokens.weight`"), "{e}");
}

/// Manifest values that would give NaN logits or unbounded allocations are refused at open, naming the
/// engine and the key (the checksum is recomputed, so only validation can catch them).
#[test]
fn errors_manifest_config_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(false);
    let (path, _) = write_tiny(dir.path(), &cfg, StorageDtype::F32, "m.dlo");
    let bytes = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("rope_theta", 0.0.into(), "`rope_theta`: must be positive"),
        ("rms_norm_eps", (-1.0).into(), "`rms_norm_eps`: must not be negative"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "linear", "factor": 0.0}),
            "`factor` must be positive",
        ),
        (
            "num_hidden_layers",
            1_000_000_000u64.into(),
            "larger than the supported maximum",
        ),
        // The plan's per-layer schedule is checked against the config first.
        ("num_hidden_layers", 1.into(), "disagrees with the config"),
        ("max_position_embeddings", 0.into(), "must be positive, found 0"),
    ];
    for (key, value, want) in cases {
        let mut b = bytes.clone();
        patch_header(&mut b, |v| v["manifest"]["config"][key] = value.clone());
        let p = write_bytes(dir.path(), "v.dlo", &b);
        let e = open_err(&p);
        assert!(
            e.contains(&p.display().to_string()) && e.contains(want),
            "{key} = {value}: {e}"
        );
    }
}

/// Engines with block-quantized weights: the projections in the block format (a k-quant falling back to a
/// 32-element format on 32-wide rows, as llama.cpp does), embeddings in Q8_0, norms and routers in f32; the
/// model runs them in their blocks, close to the same engine dequantized, for both skip kinds.
#[test]
fn quantized_engines_store_blocks_and_run_them() {
    use crate::model::weight::WeightKind;
    use candle_core::quantized::GgmlDType as G;
    let dir = tempfile::tempdir().unwrap();
    let (f32_path, _) = write_tiny(dir.path(), &routed_mlp(), StorageDtype::F32, "f.dlo");
    let f32_len = std::fs::metadata(&f32_path).unwrap().len();
    for (skip, (q, stored)) in [SkipKind::Mlp, SkipKind::Layer]
        .into_iter()
        .zip([(G::Q8_0, G::Q8_0), (G::Q4_1, G::Q4_1)])
        .chain([(SkipKind::Mlp, (G::Q4K, G::Q5_0))])
    {
        let cfg = routed(tiny_config(false), skip);
        let (path, source) = write_tiny(dir.path(), &cfg, StorageDtype::Blocks(q), "q.dlo");
        assert!(std::fs::metadata(&path).unwrap().len() < f32_len, "{q:?}");
        let e = Engine::open(&path).unwrap();
        e.verify().unwrap();
        let entry = |n: &str| e.file().entry(n).unwrap().dtype;
        // 32-element block formats are stored eight rows interleaved, ready for the packed kernels.
        assert_eq!(entry("model.layers.1.mlp.up_proj.weight"), StorageDtype::Packed(stored));
        // 97 vocabulary rows are not whole groups of eight: row-major.
        assert_eq!(entry("model.embed_tokens.weight"), StorageDtype::Blocks(G::Q8_0));
        assert_eq!(entry("lm_head.weight"), StorageDtype::Blocks(G::Q8_0));
        // Read back as a copy, they are ggml's row-major blocks: the quantization of the source.
        let up = "model.layers.1.mlp.up_proj.weight";
        let shape = [cfg.intermediate_size, cfg.hidden_size];
        let w = source.get(up, &shape, DType::F32, &Device::Cpu).unwrap();
        let src = crate::model::weight::quantize(&w, stored).unwrap();
        assert_eq!(e.file().tensor_bytes(up).unwrap(), src.data().unwrap().into_owned());
        assert_eq!(entry("model.norm.weight"), StorageDtype::F32);
        assert_eq!(entry("model.routers.1.weight"), StorageDtype::F32);
        let q_model = Model::load_opts(e.config(), &e.weights(), &crate::RuntimeOptions::default()).unwrap();
        let down = &q_model.layers[2].mlp.down_proj.weight;
        assert_eq!(down.kind(), WeightKind::Quantized(stored));
        // Where this CPU has the packed kernels, the engine's bytes are used in place from its map.
        assert_eq!(down.in_place(), crate::kernels::packed::available(), "{q:?}");
        let opts = crate::RuntimeOptions {
            dequantize: true,
            ..Default::default()
        };
        let dense = Model::load_opts(e.config(), &e.weights(), &opts).unwrap();
        let ids = text_ids(CALIB_TEXT, cfg.vocab_size as u32)[..24].to_vec();
        let fwd = Forward {
            all_logits: true,
            routing: Routing::Force(true),
        };
        let a = q_model.forward(&Batch::single(&ids, 0), None, &fwd).unwrap().logits;
        let b = dense.forward(&Batch::single(&ids, 0), None, &fwd).unwrap().logits;
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let d = max_abs_diff(&a, &b);
        assert!(d > 0.0 && d < 0.05 * scale, "{q:?}: max |Δlogit| {d} of {scale}");
    }
}

/// The packed storage dtypes: names, the shapes they store (2-D, whole groups of eight rows) and their byte
/// counts (those of row-major blocks, but for Q4_K); Q2_K, Q3_K and Q5_K have none.
#[test]
fn packed_storage_names_and_shapes() {
    use candle_core::quantized::GgmlDType as G;
    for (name, t) in [
        ("q4_0_x8", G::Q4_0),
        ("q4_1_x8", G::Q4_1),
        ("q5_0_x8", G::Q5_0),
        ("q5_1_x8", G::Q5_1),
        ("q8_0_x8", G::Q8_0),
    ] {
        let d = StorageDtype::parse(name).unwrap();
        assert_eq!((d, d.as_str()), (StorageDtype::Packed(t), name));
        assert_eq!(StorageDtype::Blocks(t).packed(), Some(d));
        assert_eq!(d.byte_len(&[16, 64]), StorageDtype::Blocks(t).byte_len(&[16, 64]));
        let err = d.byte_len(&[12, 64]).unwrap_err();
        assert!(err.contains("rows are a multiple of 8"), "{err}");
        assert!(d.byte_len(&[2, 8, 64]).is_err());
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{name}\""));
    }
    // k-quants: Q4_K's packed groups are larger (scales unpacked to bytes), Q6_K's the same size.
    let q4k = StorageDtype::parse("q4_k_x8").unwrap();
    assert_eq!(StorageDtype::Blocks(G::Q4K).packed(), Some(q4k));
    assert_eq!(q4k.byte_len(&[8, 256]), Ok(1184));
    assert_eq!(StorageDtype::Blocks(G::Q4K).byte_len(&[8, 256]), Ok(8 * 144));
    assert_eq!(StorageDtype::parse("q6_k_x8").unwrap().byte_len(&[8, 256]), Ok(8 * 210));
    assert_eq!(StorageDtype::Blocks(G::Q5K).packed(), None);
    // The storage names follow the kernels: a type has a packed dtype iff it has a packed layout, named after it.
    for &(t, name) in crate::model::weight::QUANT_TYPES {
        let layout = crate::kernels::packed::packed_len(t, 8, 256).is_some();
        let packed = StorageDtype::Blocks(t).packed();
        assert_eq!(packed.is_some(), layout, "{name}");
        if let Some(p) = packed {
            assert_eq!(p.as_str(), format!("{name}_x8"));
        }
    }
    let err = serde_json::from_str::<StorageDtype>("\"q5_k_x8\"")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown tensor dtype `q5_k_x8`") && err.contains("q4_k_x8"),
        "{err}"
    );
}

/// SmolLM2's Q4_1 GGUF as an engine: its projections are stored packed and, where the CPU has the packed
/// kernels, used in place from the map (q/k/v and gate/up, stored back to back, fused without a copy); the
/// engine's logits are the GGUF's, bit for bit (the same blocks through the same kernels).
#[test]
fn smollm2_q4_engine_runs_in_place_as_the_gguf_does() {
    let Some(gguf) = crate::testing::smollm2_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ck = crate::Checkpoint::open(&gguf).unwrap();
    let path = dir.path().join("q4_1.dlo");
    let plan = EnginePlan::from_config(&ck.config);
    let prov = Provenance::now(&gguf, StorageDtype::F32);
    write_engine_file_as(
        &path,
        &ck.config,
        &ck.weights,
        ck.tokenizer.as_ref(),
        &plan,
        prov,
        WeightsDtype::Source,
    )
    .unwrap();
    let opts = crate::RuntimeOptions::default();
    let (opened, model) = load_any(&path, &opts).unwrap();
    assert!(opened.tokenizer.is_some());
    let e = Engine::open(&path).unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(e.file().entry(q).unwrap().dtype, StorageDtype::Packed(GgmlDType::Q4_1));
    if crate::kernels::packed::available() {
        // q/k/v and gate/up are views of their fused weights, so these cover the fusion too.
        for (i, w) in model.projections().enumerate() {
            assert!(
                w.in_place(),
                "projection {i} (layer {}) was copied out of the map",
                i / 7
            );
        }
        assert!(model.embed_tokens.in_place(), "the tied Q8_0 embedding was copied");
    }
    let reference = Model::load_opts(&ck.config, &ck.weights, &opts).unwrap();
    let ids: Vec<u32> = ck
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("The capital of France is", true)
        .unwrap();
    let fwd = Forward {
        all_logits: true,
        routing: Routing::Force(true),
    };
    let a = model.forward(&Batch::single(&ids, 0), None, &fwd).unwrap().logits;
    let b = reference.forward(&Batch::single(&ids, 0), None, &fwd).unwrap().logits;
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// A quantized engine cut inside its block data, or with a flipped block byte, is a clear error naming the
/// file (and the tensor), never a panic.
#[test]
fn errors_quantized_engine_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_tiny(
        dir.path(),
        &tiny_config(false),
        StorageDtype::parse("q4_0").unwrap(),
        "q.dlo",
    );
    let bytes = std::fs::read(&path).unwrap();
    let e = Engine::open(&path).unwrap();
    let t = e.file().entry("model.layers.1.mlp.gate_proj.weight").unwrap().clone();
    assert_eq!(t.dtype.as_str(), "q4_0_x8");
    let cut = write_bytes(dir.path(), "cut.dlo", &bytes[..t.offset as usize + 7]);
    let msg = open_err(&cut);
    assert!(msg.contains("engine is truncated") && msg.contains("cut.dlo"), "{msg}");
    let mut flipped = bytes.clone();
    flipped[t.offset as usize + 5] ^= 0x10;
    let p = write_bytes(dir.path(), "flip.dlo", &flipped);
    let e = Engine::open(&p).unwrap();
    let err = Model::load_opts(e.config(), &e.weights(), &crate::RuntimeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("flip.dlo") && err.contains("model.layers.1.mlp.gate_proj.weight"),
        "{err}"
    );
}

#[test]
fn errors_tensor_table() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_tiny(dir.path(), &tiny_config(true), StorageDtype::F32, "o.dlo");
    let bytes = std::fs::read(&path).unwrap();
    let len = bytes.len() as u64;
    type Patch = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Patch, &str)> = vec![
        (
            Box::new(move |v| {
                let n = v["tensors"].as_array().unwrap().len();
                v["tensors"][n - 1]["offset"] = (len.div_ceil(256) * 256 + 256).into();
            }),
            "run past the end of the file",
        ),
        (
            Box::new(|v| v["tensors"][1]["offset"] = v["tensors"][0]["offset"].clone()),
            "overlaps",
        ),
        (
            Box::new(|v| v["tensors"][0]["offset"] = 300.into()),
            "not 256-byte aligned",
        ),
        (
            Box::new(|v| v["tensors"][0]["length"] = 12.into()),
            "does not match shape",
        ),
        (
            Box::new(|v| v["tensors"][0]["shape"] = serde_json::json!([u64::MAX, 4])),
            "overflows",
        ),
        (
            Box::new(|v| v["tensors"][0]["shape"] = serde_json::json!(vec![1; 9])),
            "rank 9 exceeds",
        ),
        (
            Box::new(|v| v["tensors"][0]["dtype"] = "q9_9".into()),
            "header JSON is invalid",
        ),
        (
            Box::new(|v| {
                v["tensors"][0]["dtype"] = "q4_0".into();
                v["tensors"][0]["shape"] = serde_json::json!([3, 33]);
            }),
            "not a whole number of q4_0 blocks",
        ),
        (
            Box::new(|v| v["tensors"][0]["dtype"] = "q8_0".into()),
            "does not match shape",
        ),
        (
            Box::new(|v| v["tensors"][0]["crc32"] = "xyz".into()),
            "not 8 hex digits",
        ),
        (
            Box::new(|v| v["tensors"][1]["name"] = v["tensors"][0]["name"].clone()),
            "appears twice",
        ),
    ];
    for (i, (f, want)) in cases.into_iter().enumerate() {
        let mut b = bytes.clone();
        patch_header(&mut b, f);
        let e = open_err(&write_bytes(dir.path(), "bad.dlo", &b));
        assert!(e.contains(want), "case {i}: {e}");
    }
}

#[test]
fn errors_budget_outside_unit_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = routed_mlp();
    let w = random_weights(&cfg, 1);
    let mut plan = EnginePlan::from_config(&cfg);
    plan.quantiles = vec![None, Some(vec![0.0; 101]), Some(vec![0.0; 101])];
    let path = dir.path().join("b.dlo");
    write_engine_file(
        &path,
        &cfg,
        &w,
        None,
        &plan,
        Provenance::now(Path::new("x"), StorageDtype::F32),
    )
    .unwrap();
    let e = Engine::open(&path).unwrap();
    for r in [0.0, -0.5, 1.5, f64::NAN] {
        let err = e.routing(Some(r)).unwrap_err().to_string();
        assert!(err.contains("is outside (0, 1]"), "{r}: {err}");
    }
    assert!(e.routing(Some(1.0)).is_ok());
    // A stored budget outside (0, 1] is refused at open (and at write).
    let mut bytes = std::fs::read(&path).unwrap();
    patch_header(&mut bytes, |v| {
        v["manifest"]["plan"]["budget"] = serde_json::json!({
            "rate": 1.5, "thresholds": [0.0, 0.0, 0.0], "calibration_rate": 1.0, "heldout_rate": null
        })
    });
    let err = open_err(&write_bytes(dir.path(), "b2.dlo", &bytes));
    assert!(err.contains("budget 1.5 is outside (0, 1]"), "{err}");
    // Per-layer rates must match the layers: one per layer, in [0, 1] on routed layers, null on dense ones.
    for (rates, problem) in [
        (serde_json::json!([null, 0.5]), "2 per-layer rates for 3 layers"),
        (serde_json::json!([null, 0.5, 1.5]), "layer 2: per-layer rate Some(1.5)"),
        (serde_json::json!([0.5, 0.5, 0.5]), "layer 0: per-layer rate Some(0.5)"),
        (serde_json::json!([null, null, 0.5]), "layer 1: per-layer rate None"),
    ] {
        let mut bytes = std::fs::read(&path).unwrap();
        patch_header(&mut bytes, |v| {
            v["manifest"]["plan"]["budget"] = serde_json::json!({
                "rate": 0.5, "thresholds": [0.0, 0.0, 0.0], "calibration_rate": 0.5, "heldout_rate": null,
                "layer_rates": rates
            })
        });
        let err = open_err(&write_bytes(dir.path(), "b3.dlo", &bytes));
        assert!(err.contains(problem), "{rates}: {err}");
    }
    plan.budget = Some(Budget {
        rate: 0.0,
        thresholds: vec![0.0; 3],
        calibration_rate: 0.0,
        heldout_rate: None,
        layer_rates: None,
    });
    let err = write_engine_file(
        &path,
        &cfg,
        &w,
        None,
        &plan,
        Provenance::now(Path::new("x"), StorageDtype::F32),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("budget 0 is outside (0, 1]"), "{err}");
    // Without quantile tables the budget cannot be changed at load time.
    let bare = dir.path().join("bare.dlo");
    write_tiny(dir.path(), &cfg, StorageDtype::F32, "bare.dlo");
    let err = Engine::open(&bare).unwrap().routing(Some(0.5)).unwrap_err().to_string();
    assert!(err.contains("rebuild it with --calibration"), "{err}");
}

#[test]
fn failed_write_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(true);
    let mut w = std::collections::HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros((97, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let w = Weights::from_tensors(w, "partial");
    let path = dir.path().join("never.dlo");
    let err = write_engine_file(
        &path,
        &cfg,
        &w,
        None,
        &EnginePlan::from_config(&cfg),
        Provenance::now(Path::new("x"), StorageDtype::F32),
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing tensor"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a temporary file was left behind"
    );
}

#[test]
fn spread_rates_keeps_proportions_and_saturates_at_one() {
    let profile = [None, Some(1.0), Some(0.5), Some(0.25), Some(0.0)];
    let r = spread_rates(&profile, 0.35).unwrap();
    let m: f64 = r.iter().flatten().sum::<f64>() / 4.0;
    assert!((m - 0.35).abs() < 1e-9, "{r:?}");
    assert_eq!(r[0], None);
    assert!((r[1].unwrap() / r[2].unwrap() - 2.0).abs() < 1e-9, "{r:?}");
    assert_eq!(r[4], Some(0.0));
    // 0.6: the first layer saturates at 1 and the others take up its share
    let r = spread_rates(&profile, 0.6).unwrap();
    assert_eq!(r[1], Some(1.0));
    assert!((r[2].unwrap() / r[3].unwrap() - 2.0).abs() < 1e-9, "{r:?}");
    assert!((r.iter().flatten().sum::<f64>() / 4.0 - 0.6).abs() < 1e-9, "{r:?}");
    assert!(spread_rates(&profile, 0.8)
        .unwrap_err()
        .to_string()
        .contains("out of reach"));
    assert_eq!(spread_rates(&profile, 1.0).unwrap()[4], Some(1.0));
    assert!(spread_rates(&profile, 0.0).is_err());
}

// ----- SmolLM2-135M (real asset) -----

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians over 5 runs of: `Engine::open`, `Model::load` from the engine (tensor copies with their crc32),
/// and `Engine::verify` alone on a fresh open, in milliseconds; and the last model built.
fn time_engine_load(path: &Path) -> (f64, f64, f64, Model) {
    let (mut open, mut build, mut verify) = (Vec::new(), Vec::new(), Vec::new());
    let mut model = None;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let e = Engine::open(path).unwrap();
        open.push(t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        let m = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu).unwrap();
        build.push(t.elapsed().as_secs_f64() * 1e3);
        model = Some(m);
        let e = Engine::open(path).unwrap();
        let t = std::time::Instant::now();
        e.verify().unwrap();
        verify.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (median_ms(open), median_ms(build), median_ms(verify), model.unwrap())
}

/// SmolLM2-135M's shapes with seeded random weights: the load-time measurement without the GGUF asset
/// (for machines that lack it). Run with `--ignored engine_load_timing_smollm2_shapes --nocapture`.
#[test]
#[ignore = "timing only; prints numbers for docs/benchmarks.md"]
fn engine_load_timing_smollm2_shapes() {
    let cfg = ModelConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        max_position_embeddings: 8192,
        ..tiny_config(true)
    };
    let w = random_weights(&cfg, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.dlo");
    let bytes = write_engine_file(
        &path,
        &cfg,
        &w,
        None,
        &EnginePlan::from_config(&cfg),
        Provenance::now(Path::new("random"), StorageDtype::F32),
    )
    .unwrap();
    let (open, build, verify, _) = time_engine_load(&path);
    eprintln!(
        "engine load (SmolLM2-135M shapes, f32, {:.1} MB, warm page cache, {} threads, median of 5): \
         Engine::open {open:.2} ms, Model::load from it {build:.1} ms, full verify alone {verify:.1} ms",
        bytes as f64 / 1e6,
        rayon::current_num_threads()
    );
}

/// Builds an f32 engine from SmolLM2-135M, times loading it (the "Engine load" numbers in
/// `docs/benchmarks.md`), and checks a model built from the engine computes exactly the checkpoint's logits.
#[test]
fn smollm2_engine_load_time_and_agreement() {
    let Some(gguf) = smollm2_gguf() else { return };
    let ckpt = Checkpoint::open(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2.dlo");
    let t = std::time::Instant::now();
    let plan = EnginePlan::from_config(&ckpt.config);
    let bytes = write_engine_file(
        &path,
        &ckpt.config,
        &ckpt.weights,
        ckpt.tokenizer.as_ref(),
        &plan,
        Provenance::now(&gguf, StorageDtype::F32),
    )
    .unwrap();
    let write_ms = t.elapsed().as_secs_f64() * 1e3;
    let (open, build, verify, model) = time_engine_load(&path);
    let t = std::time::Instant::now();
    let c2 = Checkpoint::open(&gguf).unwrap();
    let reference = Model::load(&c2.config, &c2.weights, DType::F32, &Device::Cpu).unwrap();
    let gguf_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "engine load (SmolLM2-135M, f32, {:.1} MB, warm page cache, median of 5): Engine::open {open:.2} ms, \
         Model::load from it {build:.1} ms (includes per-tensor crc32), full verify alone {verify:.1} ms \
         ({:.2} GB/s); writing the engine {write_ms:.0} ms; GGUF open + dequantize + Model::load {gguf_ms:.0} ms",
        bytes as f64 / 1e6,
        bytes as f64 / verify / 1e6
    );
    assert!(open < 100.0, "Engine::open took {open} ms");
    let ids: Vec<u32> = (0..48u32).map(|i| (i * 997 + 13) % 49152).collect();
    let opts = Forward {
        all_logits: true,
        ..Default::default()
    };
    let a = reference.forward(&Batch::single(&ids, 0), None, &opts).unwrap();
    let b = model.forward(&Batch::single(&ids, 0), None, &opts).unwrap();
    let diff = max_abs_diff(&a.logits, &b.logits);
    assert_eq!(diff, 0.0, "engine logits differ from the checkpoint's by {diff}");
    let e = Engine::open(&path).unwrap();
    let t = std::time::Instant::now();
    let tok = e.tokenizer().unwrap();
    eprintln!(
        "engine tokenizer: {:.1} ms to build from the stored tokenizer.json ({} KB manifest)",
        t.elapsed().as_secs_f64() * 1e3,
        e.file().tensors()[0].offset / 1024
    );
    assert_eq!(tok.is_some(), ckpt.tokenizer.is_some());
    if let (Some(a), Some(b)) = (&tok, &ckpt.tokenizer) {
        let text = "<|im_start|>user\nWhat is the capital of France? 1234<|im_end|>";
        assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
        assert_eq!(
            (a.add_bos, a.bos_token_id, &a.eos_token_ids),
            (b.add_bos, b.bos_token_id, &b.eos_token_ids)
        );
        assert_eq!(a.bos_token, b.bos_token);
        assert_eq!(a.eos_token, b.eos_token);
        let (ca, cb) = (a.chat_template.as_ref().unwrap(), b.chat_template.as_ref().unwrap());
        assert_eq!(
            (&ca.source, &ca.bos_token, &ca.eos_token),
            (&cb.source, &cb.bos_token, &cb.eos_token)
        );
    }
}
