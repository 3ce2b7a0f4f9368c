//! The manifest's checks (each bad case a clear error naming the file), profile choice and KV bookkeeping.

use super::*;

/// A manifest for `units` whose engines are `prefill`/`decode` bytes (any bytes: only size and CRC matter here).
fn manifest(units: &[RoutedUnit], prefill: &[u8], decode: &[u8]) -> Manifest {
    let layers: Vec<LayerEntry> = units
        .iter()
        .enumerate()
        .map(|(l, &u)| LayerEntry::new(u, (u != RoutedUnit::None).then_some(0.1 * l as f32)))
        .collect();
    let mut m = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        tensorrt: BuildInfo {
            library: "TensorRT-RTX".into(),
            version: "1.7.1".into(),
            build: 116,
            flags: vec![],
        },
        model: ModelShape {
            num_layers: units.len(),
            hidden_size: 64,
            kv_heads: 2,
            head_dim: 16,
            vocab_size: 100,
            max_positions: 4096,
            dtype: "float32".into(),
        },
        layers,
        prefill: entry("prefill.engine", prefill, "seq", [1, 64, 256]),
        decode: entry("decode.engine", decode, "capacity", [1, 256, 1024]),
        tokenizer: None,
        chat_template: None,
        stop_tokens: vec![2],
        bos_token_id: Some(1),
    };
    for decode in [false, true] {
        let (inputs, outputs) = m.required_io(decode);
        let dim = if decode { "capacity" } else { "seq" };
        let io = |names: Vec<String>| {
            names
                .into_iter()
                .map(|name| IoTensor {
                    dtype: if name.contains("ids") { "int64" } else { "float32" }.into(),
                    shape: match name.split('.').next().unwrap() {
                        "present_key" | "present_value" | "past_key" | "past_value" => {
                            vec![Dim::Fixed(1), Dim::Fixed(2), Dim::Dynamic(dim.into()), Dim::Fixed(16)]
                        }
                        "input_ids" | "position_ids" if decode => vec![Dim::Fixed(1), Dim::Fixed(1)],
                        _ => vec![Dim::Fixed(1), Dim::Dynamic(dim.into())],
                    },
                    name,
                })
                .collect::<Vec<_>>()
        };
        let e = if decode { &mut m.decode } else { &mut m.prefill };
        e.inputs = io(inputs);
        e.outputs = io(outputs);
    }
    m
}

fn entry(file: &str, bytes: &[u8], dim: &str, [min, opt, max]: [usize; 3]) -> EngineEntry {
    EngineEntry {
        file: file.into(),
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
        profile: Profile {
            dim: dim.into(),
            min,
            opt,
            max,
        },
        inputs: vec![],
        outputs: vec![],
        network: NetworkCounts::default(),
        build_ms: 500,
    }
}

const UNITS: [RoutedUnit; 3] = [RoutedUnit::None, RoutedUnit::Mlp, RoutedUnit::Layer];

/// A deployment directory with engines and a manifest for [`UNITS`].
fn deployment() -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let (p, d) = (b"prefill engine bytes".to_vec(), b"decode engine".to_vec());
    std::fs::write(dir.path().join("prefill.engine"), &p).unwrap();
    std::fs::write(dir.path().join("decode.engine"), &d).unwrap();
    let m = manifest(&UNITS, &p, &d);
    m.write(dir.path()).unwrap();
    (dir, m)
}

/// Writes `m` into `dir` and reads it back, returning the error's text.
fn read_err(dir: &Path, m: &Manifest) -> String {
    m.write(dir).unwrap();
    let e = Manifest::read(dir).unwrap_err().to_string();
    assert!(e.contains(dir.to_str().unwrap()), "error names no file: {e}");
    e
}

#[test]
fn a_written_manifest_reads_back_equal() {
    let (dir, m) = deployment();
    assert_eq!(Manifest::read(dir.path()).unwrap(), m);
    assert_eq!(m.routed_layers(), 2);
    assert_eq!(m.layers[2].kv, "ragged");
    assert_eq!(m.layers[1].kv, "dense");
    assert_eq!(m.layers[0].threshold, None);
}

#[test]
fn an_engine_that_does_not_match_its_manifest_is_refused() {
    let (dir, m) = deployment();
    std::fs::write(dir.path().join("decode.engine"), b"decode engin!").unwrap();
    let e = Manifest::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains("decode.engine") && e.contains("CRC-32"), "{e}");
    std::fs::write(dir.path().join("decode.engine"), b"other").unwrap();
    let e = Manifest::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains("5 bytes, the manifest says 13"), "{e}");
    std::fs::remove_file(dir.path().join("prefill.engine")).unwrap();
    let e = Manifest::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains("prefill.engine"), "{e}");
    drop(m);
}

#[test]
fn an_inconsistent_manifest_is_refused_with_the_reason() {
    let (dir, m) = deployment();
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|m| m.format = "onnx".into()), "format `onnx`"),
        (Box::new(|m| m.version = 9), "manifest version 9"),
        (
            Box::new(|m| drop(m.layers.pop())),
            "2 layer entries for a 3-layer model",
        ),
        (
            Box::new(|m| m.layers[1].routed = "attn".into()),
            "layer 1: routed `attn`",
        ),
        (
            Box::new(|m| m.layers[2].kv = "dense".into()),
            "layer 2: routed `layer` needs kv `ragged`",
        ),
        (
            Box::new(|m| m.layers[0].threshold = Some(0.0)),
            "layer 0: routed `none` needs kv `dense` and no",
        ),
        (
            Box::new(|m| m.decode.inputs.retain(|t| t.name != "past_valid.2")),
            "no I/O tensor `past_valid.2`",
        ),
        (
            Box::new(|m| m.prefill.outputs.retain(|t| t.name != "exec.1")),
            "no I/O tensor `exec.1`",
        ),
        (Box::new(|m| m.prefill.profile.min = 300), "need 1 ≤ MIN ≤ OPT ≤ MAX"),
        (
            Box::new(|m| m.decode.profile.max = 5000),
            "longer than the model's context",
        ),
        (
            Box::new(|m| m.decode.profile.dim = "seq".into()),
            "profile of `seq`, expected `capacity`",
        ),
        (Box::new(|m| m.prefill.profile.max = 4000), "TopK takes at most 3840"),
        (
            Box::new(|m| m.decode.outputs.retain(|t| t.name != "present_value.1")),
            "no I/O tensor `present_value.1`",
        ),
        (
            Box::new(|m| {
                m.decode
                    .outputs
                    .iter_mut()
                    .find(|t| t.name == "present_key.0")
                    .unwrap()
                    .shape[1] = Dim::Fixed(3)
            }),
            "input `past_key.0` has no output `present_key.0` of the same dtype and shape",
        ),
    ];
    for (edit, want) in cases {
        let mut bad = m.clone();
        edit(&mut bad);
        let e = read_err(dir.path(), &bad);
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
    // A dense model's prefill has no TopK, so it may be longer.
    let mut dense = manifest(&[RoutedUnit::None; 2], b"prefill engine bytes", b"decode engine");
    dense.prefill.profile.max = 4000;
    dense.write(dir.path()).unwrap();
    Manifest::read(dir.path()).unwrap();
    // Not JSON, or unknown fields.
    std::fs::write(dir.path().join(MANIFEST_FILE), "{").unwrap();
    let e = Manifest::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not a dlo TensorRT manifest"), "{e}");
    let mut v: serde_json::Value = serde_json::to_value(&m).unwrap();
    v["surprise"] = 1.into();
    std::fs::write(dir.path().join(MANIFEST_FILE), v.to_string()).unwrap();
    let e = Manifest::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains("surprise"), "{e}");
    // No manifest at all.
    std::fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
    let e = Manifest::read(dir.path()).unwrap_err().to_string();
    assert!(e.contains(MANIFEST_FILE), "{e}");
}

#[test]
fn profiles_parse_and_refuse_impossible_ranges() {
    let p = Profile::parse("--profile", "seq", "1, 64,256", 512).unwrap();
    assert_eq!((p.min, p.opt, p.max), (1, 64, 256));
    assert!(p.admits(1) && p.admits(256) && !p.admits(257) && !p.admits(0));
    for (s, want) in [
        ("1,64", "expected three sizes"),
        ("a,b,c", "expected three sizes"),
        ("0,1,2", "need 1 ≤ MIN ≤ OPT ≤ MAX"),
        ("8,4,16", "need 1 ≤ MIN ≤ OPT ≤ MAX"),
        ("1,2,1", "need 1 ≤ MIN ≤ OPT ≤ MAX"),
        ("1,64,1024", "longer than the model's context (512 positions)"),
    ] {
        let e = Profile::parse("--profile", "seq", s, 512).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("--profile"), "{s}: {e}");
    }
}

#[test]
fn decode_capacity_and_prompt_checks_follow_the_profiles() {
    let m = manifest(&UNITS, b"p", b"d");
    assert_eq!(m.decode_capacity(0).unwrap(), 1);
    assert_eq!(m.decode_capacity(100).unwrap(), 128);
    assert_eq!(m.decode_capacity(1024).unwrap(), 1024);
    assert!(m
        .decode_capacity(1025)
        .unwrap_err()
        .to_string()
        .contains("at most 1024"));
    let mut m2 = m.clone();
    m2.decode.profile.min = 64;
    assert_eq!(m2.decode_capacity(3).unwrap(), 64);
    m.check_prompt(256).unwrap();
    assert!(m.check_prompt(257).unwrap_err().to_string().contains("1..=256"));
    assert!(m.check_prompt(0).is_err());
    // 3 layers × K and V × 2 heads × 16 dims × 4 bytes per slot, plus one mask byte per ragged layer.
    assert_eq!(m.kv_bytes(10), 3 * 2 * 2 * 16 * 4 * 10 + 10);
}

#[test]
fn the_kv_book_tracks_which_slots_each_ragged_layer_filled() {
    let m = manifest(&UNITS, b"p", b"d");
    let mut kv = KvBook::new(&m, 6);
    assert!(kv.is_empty());
    kv.after_prefill(3, |l| {
        assert_eq!(l, 2, "only the layer-skip layer is ragged");
        vec![true, false, true]
    })
    .unwrap();
    assert_eq!(kv.len(), 3);
    assert_eq!(kv.valid(2, 1), Some(false));
    assert_eq!(kv.valid(0, 1), None);
    assert_eq!((kv.keys_in(0), kv.keys_in(1), kv.keys_in(2)), (3, 3, 2));
    kv.after_decode(|_| false).unwrap();
    kv.after_decode(|_| true).unwrap();
    assert_eq!(kv.keys_in(2), 3);
    assert_eq!(kv.valid(2, 3), Some(false));
    assert_eq!(kv.valid(2, 4), Some(true));
    kv.after_decode(|_| true).unwrap();
    let e = kv.after_decode(|_| true).unwrap_err().to_string();
    assert!(e.contains("holds 6 tokens"), "{e}");
    assert!(
        kv.after_prefill(1, |_| vec![true]).is_err(),
        "prefill into a used cache"
    );
    let mut fresh = KvBook::new(&m, 4);
    let e = fresh.after_prefill(3, |_| vec![true]).unwrap_err().to_string();
    assert!(e.contains("1 validity flags for a prompt of 3"), "{e}");
    assert!(KvBook::new(&m, 2).after_prefill(3, |_| vec![true; 3]).is_err());
}

#[test]
fn bindings_resolve_the_dynamic_dimension_and_pair_decode_outputs_with_inputs() {
    let m = manifest(&UNITS, b"p", b"d");
    let b = m.bindings(Stage::Decode, 128).unwrap();
    let get = |name: &str| b.iter().find(|x| x.name == name).unwrap();
    assert_eq!(get("past_key.1").shape, [1, 2, 128, 16]);
    assert_eq!(get("past_key.1").bytes, 2 * 128 * 16 * 4);
    assert!(get("past_key.1").input && !get("present_key.1").input);
    assert_eq!(get("position_ids").shape, [1, 1]);
    assert_eq!(get("position_ids").bytes, 8);
    assert_eq!(get("past_valid.2").shape, [1, 128]);
    assert_eq!(b.len(), m.decode.inputs.len() + m.decode.outputs.len());
    let p = m.bindings(Stage::Prefill, 10).unwrap();
    assert_eq!(
        p.iter().find(|x| x.name == "present_value.0").unwrap().shape,
        [1, 2, 10, 16]
    );
    let e = m.bindings(Stage::Prefill, 300).unwrap_err().to_string();
    assert!(e.contains("seq 300 is outside the engine's profile (1..=256)"), "{e}");
    let mut odd = m.clone();
    odd.prefill.outputs[0].dtype = "float16".into();
    assert!(odd
        .bindings(Stage::Prefill, 4)
        .unwrap_err()
        .to_string()
        .contains("dtype `float16`"));
    odd.prefill.outputs[0].dtype = "float32".into();
    odd.prefill.outputs[0].shape = vec![Dim::Dynamic("batch".into())];
    assert!(odd
        .bindings(Stage::Prefill, 4)
        .unwrap_err()
        .to_string()
        .contains("dimension `batch`"));
    // Every cache tensor feeds back: K and V of each layer, the mask of the layer-skip layer.
    let mut fb = m.decode_feedback();
    fb.sort();
    let want: Vec<(String, String)> = [
        ("present_key.0", "past_key.0"),
        ("present_key.1", "past_key.1"),
        ("present_key.2", "past_key.2"),
        ("present_valid.2", "past_valid.2"),
        ("present_value.0", "past_value.0"),
        ("present_value.1", "past_value.1"),
        ("present_value.2", "past_value.2"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(fb, want);
}

#[test]
fn a_deployment_given_as_a_model_is_a_clear_error() {
    let (dir, _) = deployment();
    assert!(is_deployment(dir.path()));
    assert!(!is_deployment(&dir.path().join("prefill.engine")));
    let e = crate::engine::open_any(dir.path()).err().unwrap().to_string();
    if cfg!(feature = "tensorrt") {
        // The library is found (or its absence named); these engine files are not engines.
        assert!(e.contains("prefill.engine") || e.contains(BUILDER_LIB), "{e}");
    } else {
        assert!(e.contains("no TensorRT support") && e.contains(MANIFEST_FILE), "{e}");
    }
    let opts = crate::RuntimeOptions::default();
    let e2 = crate::engine::load_any(dir.path(), &opts).err().unwrap().to_string();
    assert_eq!(e, e2);
}
