//! TensorRT target: option and output checks (host side, always), and with the `tensorrt` feature real
//! builds by TensorRT-RTX 1.7.1 on a CPU-only machine: tiny routed models of both skip kinds, SmolLM2-DLO
//! with a calibrated budget, and the parser's refusal of invalid ONNX.

use super::*;
use dlo_passes::SkipKind;
use dlo_runtime::testing;

fn tiny(skip: Option<SkipKind>) -> ModelConfig {
    let cfg = testing::tiny_config(false);
    match skip {
        Some(s) => testing::routed(cfg, s),
        None => cfg,
    }
}

#[test]
fn options_default_to_the_models_context_and_refuse_impossible_profiles() {
    let cfg = tiny(Some(SkipKind::Layer)); // context 256
    let o = TrtOptions::parse(&cfg, None, None).unwrap();
    assert_eq!((o.prefill.min, o.prefill.opt, o.prefill.max), (1, 64, 256));
    assert_eq!((o.decode.min, o.decode.opt, o.decode.max), (1, 256, 256));
    assert_eq!((o.prefill.dim.as_str(), o.decode.dim.as_str()), ("seq", "capacity"));
    let short = ModelConfig {
        max_position_embeddings: 32,
        ..cfg.clone()
    };
    let o = TrtOptions::parse(&short, None, None).unwrap();
    assert_eq!((o.prefill.opt, o.prefill.max, o.decode.max), (32, 32, 32));
    for (p, kv, want) in [
        ("8,4,16", "1,2,3", "--profile 8,4,16: need 1 ≤ MIN ≤ OPT ≤ MAX"),
        ("1,2,3", "0,2,3", "--kv-profile 0,2,3: need"),
        ("1,64,512", "1,2,3", "longer than the model's context (256 positions)"),
        ("1,64", "1,2,3", "expected three sizes"),
    ] {
        let e = TrtOptions::parse(&cfg, Some(p), Some(kv)).unwrap_err().to_string();
        assert!(e.contains(want), "{p} / {kv}: {e}");
    }
    // A routed prefill compacts rows with TopK (at most 3840); a dense model's prefill may be longer.
    let long = ModelConfig {
        max_position_embeddings: 8192,
        ..cfg
    };
    let e = TrtOptions::parse(&long, Some("1,64,4096"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 3840 rows"), "{e}");
    let dense = ModelConfig {
        max_position_embeddings: 8192,
        ..tiny(None)
    };
    assert_eq!(
        TrtOptions::parse(&dense, Some("1,64,4096"), None).unwrap().prefill.max,
        4096
    );
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = find_library(Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains(&dir.path().join(BUILDER_LIB).display().to_string()), "{e}");
    assert!(e.contains("--trt-lib"), "{e}");
    std::fs::write(dir.path().join(BUILDER_LIB), b"").unwrap();
    let e = find_library(Some(dir.path())).unwrap_err().to_string();
    assert!(e.contains(PARSER_LIB), "{e}");
}

#[test]
fn an_output_that_is_not_an_earlier_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    check_output(&dir.path().join("new")).unwrap();
    check_output(dir.path()).unwrap(); // empty
    std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
    let e = check_output(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not an earlier TensorRT build"), "{e}");
    let e = check_output(&dir.path().join("notes.txt")).unwrap_err().to_string();
    assert!(e.contains("not a directory"), "{e}");
    std::fs::write(dir.path().join(MANIFEST_FILE), b"{}").unwrap();
    check_output(dir.path()).unwrap();
}

#[test]
fn routing_folded_into_dense_compute_fails_the_build() {
    let mlp = tiny(Some(SkipKind::Mlp)); // 2 routed layers
    let layer = tiny(Some(SkipKind::Layer));
    let counts = |conditionals, topk, scatters| NetworkCounts {
        layers: 100,
        conditionals,
        topk,
        gathers: 4,
        scatters,
    };
    check_routing(GraphKind::Decode, &mlp, &counts(2, 0, 0)).unwrap();
    check_routing(GraphKind::Prefill, &mlp, &counts(0, 2, 2)).unwrap();
    check_routing(GraphKind::Prefill, &layer, &counts(0, 2, 6)).unwrap();
    for (kind, cfg, c, want) in [
        (
            GraphKind::Decode,
            &mlp,
            counts(0, 0, 0),
            "2 routed layers but 0 IIfConditional",
        ),
        (
            GraphKind::Prefill,
            &mlp,
            counts(0, 1, 2),
            "need 2 TopK compactions and 2 scatters; found 1 and 2",
        ),
        (GraphKind::Prefill, &layer, counts(0, 2, 2), "6 scatters; found 2 and 2"),
    ] {
        let e = check_routing(kind, cfg, &c).unwrap_err();
        assert!(matches!(e, TrtError::RoutingFolded { .. }), "{e}");
        assert!(e.to_string().contains(want), "{e}");
    }
}

#[cfg(not(feature = "tensorrt"))]
#[test]
fn without_the_feature_a_build_says_how_to_get_it() {
    let cfg = tiny(Some(SkipKind::Mlp));
    let w = testing::random_weights(&cfg, 3);
    let dir = tempfile::tempdir().unwrap();
    let opts = TrtOptions::parse(&cfg, None, None).unwrap();
    let e = build_tensorrt(&cfg, &w, None, &dir.path().join("out"), &opts).unwrap_err();
    assert!(matches!(e, TrtError::NotCompiled));
    assert!(e.to_string().contains("--features tensorrt"), "{e}");
    assert!(!dir.path().join("out").exists());
}

/// The TensorRT-RTX libraries ([`find_library`]), or a skip (a failure under `DLO_REQUIRE_ASSETS=1`).
#[cfg(feature = "tensorrt")]
fn library() -> Option<LibDir> {
    testing::found_or_skip(
        find_library(None).ok(),
        "TensorRT-RTX 1.7.1 libraries ($DLO_TRT_LIB)",
        "bash scripts/fetch-assets.sh",
    )
}

/// Checks what every build must show: the manifest reads back equal (engines match it), engines are
/// non-empty, the decode network has one IIfConditional per routed layer and the prefill network one TopK.
#[cfg(feature = "tensorrt")]
fn check_build(r: &TrtReport, routed: usize) -> Manifest {
    let m = Manifest::read(&r.dir).unwrap();
    assert_eq!(m, r.manifest);
    assert_eq!(m.routed_layers(), routed);
    for e in [&m.prefill, &m.decode] {
        assert!(e.bytes > 100_000, "{} is {} bytes", e.file, e.bytes);
        assert!(e.network.layers > 0);
    }
    assert_eq!(m.decode.network.conditionals, routed);
    assert_eq!(m.prefill.network.topk, routed);
    assert_eq!(m.prefill.network.conditionals, 0);
    assert_eq!(m.tensorrt.library, "TensorRT-RTX");
    assert!(m.tensorrt.version.starts_with("1.7."), "{}", m.tensorrt.version);
    m
}

#[cfg(feature = "tensorrt")]
#[test]
fn tiny_routed_models_build_prefill_and_decode_engines_with_their_conditionals() {
    let Some(lib) = library() else { return };
    for skip in [SkipKind::Mlp, SkipKind::Layer] {
        let cfg = tiny(Some(skip));
        let w = testing::random_weights(&cfg, 21);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("trt");
        let mut opts = TrtOptions::parse(&cfg, Some("1,16,64"), Some("1,64,128")).unwrap();
        opts.lib = Some(lib.dir.clone());
        opts.thresholds = Some(vec![0.0, 0.25, -0.5]);
        let r = build_tensorrt(&cfg, &w, None, &out, &opts).unwrap();
        let m = check_build(&r, 2);
        let thresholds: Vec<Option<f32>> = m.layers.iter().map(|e| e.threshold).collect();
        assert_eq!(thresholds, [None, Some(0.25), Some(-0.5)]);
        let ragged = m.layers.iter().filter(|e| e.kv == "ragged").count();
        assert_eq!(ragged, if skip == SkipKind::Layer { 2 } else { 0 });
        assert_eq!(m.model.max_positions, 128);
        assert_eq!((m.prefill.profile.max, m.decode.profile.max), (64, 128));
        assert!(m.tokenizer.is_none());
        // The runtime opens the deployment where a GPU is there; elsewhere (CI) it stops at deserializing, with
        // an error naming the engine. An engine built by another library version is refused before that.
        match dlo_runtime::tensorrt::Engines::open(&out, &lib) {
            Ok(engines) => assert_eq!(engines.manifest, m),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("prefill.engine") && e.contains("could not deserialize"),
                    "{e}"
                );
                assert!(e.contains("GPU"), "{e}");
            }
        }
        let mut other = m.clone();
        other.tensorrt.version = "1.6.0".into();
        other.write(&out).unwrap();
        let e = dlo_runtime::tensorrt::Engines::open(&out, &lib)
            .unwrap_err()
            .to_string();
        assert!(e.contains("were built by 1.6.0") && e.contains(BUILDER_LIB), "{e}");
        // Building again replaces the earlier build as a whole.
        opts.thresholds = None;
        let again = build_tensorrt(&cfg, &w, None, &out, &opts).unwrap();
        assert_eq!(check_build(&again, 2).layers[1].threshold, Some(0.0));
        // A failing build (here: no library) leaves the output as it was and nothing beside it.
        let failing = TrtOptions {
            lib: Some(dir.path().join("nowhere")),
            ..opts.clone()
        };
        let e = build_tensorrt(&cfg, &w, None, &dir.path().join("other"), &failing).unwrap_err();
        assert!(e.to_string().contains(BUILDER_LIB), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["trt"], "no temporary leftovers");
    }
}

#[cfg(feature = "tensorrt")]
#[test]
fn invalid_onnx_is_a_clear_parser_error() {
    let Some(lib) = library() else { return };
    driver::load(&lib).unwrap();
    let p = Profile::parse("--profile", "seq", "1,2,4", 8).unwrap();
    let e = driver::build("prefill", b"this is not an ONNX model", &p).unwrap_err();
    assert!(matches!(e, TrtError::Parse { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("prefill: TensorRT's ONNX parser refused the model"),
        "{e}"
    );
    // A real model cut short.
    let cfg = tiny(Some(SkipKind::Mlp));
    let w = testing::random_weights(&cfg, 4);
    let onnx = LoweredModels::new(&cfg, &w, &OnnxOptions::default())
        .unwrap()
        .encode(GraphKind::Decode)
        .unwrap();
    let e = driver::build("decode", &onnx[..onnx.len() / 2], &p).unwrap_err();
    assert!(matches!(e, TrtError::Parse { .. }), "{e}");
    // The whole model builds (the refusals above are about the bytes, not the graph).
    assert!(!driver::build("decode", &onnx, &p).unwrap().bytes.is_empty());
}

/// SmolLM2 with layer-skip routers on the odd layers (random router weights, so that tokens split), a budget
/// of 0.5 calibrated on chatterbot text, and the GGUF's tokenizer: both engines build, routing survives, and
/// the manifest carries the calibrated thresholds, the tokenizer, the chat template and the stop tokens.
#[cfg(feature = "tensorrt")]
#[test]
fn smollm2_dlo_with_a_budget_builds_engines_with_one_conditional_per_routed_layer() {
    use crate::calibrate::{calibrate, CalibrationOptions, RateTarget};
    use candle_core::{DType, Device};
    let Some(lib) = library() else { return };
    let Some(gguf) = testing::smollm2_gguf() else { return };
    let Some(text) = testing::asset("pkgs/chatterbot/chatterbot_corpus/data/english/ai.yml") else {
        return;
    };
    let ckpt = dlo_runtime::Checkpoint::open(&gguf).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("the GGUF has a tokenizer");
    let mut cfg = ckpt.config.clone();
    let n = cfg.num_hidden_layers;
    let mut dlo = dlo_passes::DloConfig::paper_default(SkipKind::Layer, n);
    dlo.is_dlo = (0..n).map(|l| l % 2 == 1).collect();
    cfg.dlo = Some(dlo);
    let mut tensors = std::collections::HashMap::new();
    for name in ckpt.weights.names() {
        let shape = ckpt.weights.shape_of(&name).unwrap();
        tensors.insert(
            name.clone(),
            ckpt.weights.get(&name, &shape, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    let mut rng = testing::XorShift::new(7);
    for l in (0..n).filter(|&l| cfg.is_routed(l)) {
        let v = rng.symmetric_vec(cfg.hidden_size, 0.05, 0.0);
        let t = candle_core::Tensor::from_vec(v, (1, cfg.hidden_size), &Device::Cpu).unwrap();
        tensors.insert(format!("model.routers.{l}.weight"), t);
    }
    let w = Weights::from_tensors(tensors, &gguf);
    let model = dlo_runtime::Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
    let ids = tok.encode(&std::fs::read_to_string(&text).unwrap(), false).unwrap();
    let cal_opts = CalibrationOptions {
        target: Some(RateTarget::Uniform(0.5)),
        chunk_len: 64,
        ..Default::default()
    };
    let budget = calibrate(&model, &ids[..ids.len().min(1024)], None, &cal_opts)
        .unwrap()
        .budget
        .expect("a budget");
    drop(model);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = TrtOptions::parse(&cfg, Some("1,64,256"), Some("1,256,512")).unwrap();
    opts.lib = Some(lib.dir);
    opts.thresholds = Some(budget.thresholds.clone());
    let r = build_tensorrt(&cfg, &w, Some(tok), &dir.path().join("smollm2-dlo"), &opts).unwrap();
    let m = check_build(&r, n / 2);
    for (l, e) in m.layers.iter().enumerate() {
        assert_eq!(
            e.threshold,
            cfg.is_routed(l).then_some(budget.thresholds[l]),
            "layer {l}"
        );
    }
    // The fixed-capacity cache adds only the decode engine's buffers; both engines hold SmolLM2's weights.
    assert!(m.prefill.bytes > 400_000_000 && m.decode.bytes > 400_000_000);
    assert_eq!(m.tokenizer.as_deref(), Some("tokenizer.json"));
    let reloaded = dlo_runtime::Tokenizer::from_hf_dir(&r.dir)
        .unwrap()
        .expect("tokenizer written");
    assert_eq!(
        reloaded.encode("The capital of France", false).unwrap(),
        tok.encode("The capital of France", false).unwrap()
    );
    assert!(m.chat_template.as_deref().is_some_and(|t| t.contains("im_start")));
    assert!(!m.stop_tokens.is_empty());
    eprintln!(
        "SmolLM2-DLO (15 layer-skip routers, budget 0.5): prefill {:.0} MB in {:.1} s, decode {:.0} MB in {:.1} s; \
         {} IIfConditional, {} TopK; whole build {:.1} s",
        m.prefill.bytes as f64 / 1e6,
        m.prefill.build_ms as f64 / 1e3,
        m.decode.bytes as f64 / 1e6,
        m.decode.build_ms as f64 / 1e3,
        m.decode.network.conditionals,
        m.prefill.network.topk,
        r.seconds
    );
}
