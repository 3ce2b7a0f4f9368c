//! The streaming writer on a tiny synthetic checkpoint written by the test: every output tensor checked.

mod common;

use common::{f32_bytes, tensors, HIDDEN};
use dlo_passes::writer::{tokenizer_files, write_model};
use dlo_passes::{ExpandPlan, ModelConfig, ModelSpec, OutDtype, Recipe, SafetensorsDir, TensorSource, WriteOptions};
use safetensors::SafeTensors;
use std::path::Path;

fn expand(base: &Path, out: &Path, r: Recipe) -> (ModelSpec, dlo_passes::WriteReport) {
    let cfg = ModelConfig::from_hf_file(&base.join("config.json")).unwrap();
    let mut spec = ModelSpec::from_base(cfg, base).unwrap();
    let plan = ExpandPlan::from_recipe(&r).unwrap();
    plan.apply(&mut spec).unwrap();
    let src = SafetensorsDir::open(base).unwrap();
    let opts = WriteOptions {
        dtype: plan.dtype,
        extra_files: tokenizer_files(base),
    };
    let rep = write_model(&spec, &src, out, &opts).unwrap();
    (spec, rep)
}

fn read_f32(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

#[test]
fn zeros_interleave_4_to_6_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    common::write_checkpoint(&base, 4, &[]);
    let out = dir.path().join("out");
    let (_spec, rep) = expand(
        &base,
        &out,
        Recipe {
            layers: Some(6),
            ..Default::default()
        },
    );
    let src = tensors(4);

    // Config: reference keys, layer count, provenance; readable by our own loader.
    let cfg = ModelConfig::from_hf_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.num_hidden_layers, 6);
    let d = cfg.dlo.as_ref().unwrap();
    assert_eq!(d.is_dlo, vec![true; 6]);
    assert_eq!(d.gate_init_method, "zero");
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(raw["model_type"], "llama_dlo_exattn");
    assert_eq!(raw["architectures"][0], "LlamaDLOExAttnForCausalLM");
    assert_eq!(raw["dlo_capacity"], 0.9);
    assert_eq!(raw["dlo_loss_type"], "cos-global");
    assert_eq!(raw["torch_dtype"], "float32");
    assert_eq!(raw["dlo_provenance"][2]["init"], "zeros");
    assert!(out.join("tokenizer.json").is_file());

    // Tensors, through the reference safetensors reader.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(bytes.len() as u64, rep.safetensors_bytes);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // split = 2: new layers at 2 (from 1) and 5 (from 3).
    let map = [
        (0, 0, false),
        (1, 1, false),
        (2, 1, true),
        (3, 2, false),
        (4, 3, false),
        (5, 3, true),
    ];
    let mut expected_names = vec!["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    for (out_l, src_l, zeroed) in map {
        for (suffix, shape) in common::layer_tensors() {
            let name = format!("model.layers.{out_l}.{suffix}");
            let t = st.tensor(&name).unwrap();
            assert_eq!(t.shape(), shape.as_slice(), "{name}");
            let (_, want) = &src[&format!("model.layers.{src_l}.{suffix}")];
            if zeroed && (suffix == "self_attn.o_proj.weight" || suffix == "mlp.down_proj.weight") {
                assert!(read_f32(&st, &name).1.iter().all(|&x| x == 0.0), "{name} not zero");
            } else {
                assert_eq!(t.data(), f32_bytes(want).as_slice(), "{name} differs from its source");
            }
            expected_names.push(name);
        }
        let router = format!("model.routers.{out_l}.weight");
        let (shape, v) = read_f32(&st, &router);
        assert_eq!(shape, [1, HIDDEN]);
        assert!(v.iter().all(|&x| x == 0.0));
        expected_names.push(router);
    }
    for n in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
        assert_eq!(st.tensor(n).unwrap().data(), f32_bytes(&src[n].1).as_slice(), "{n}");
    }
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    expected_names.sort();
    assert_eq!(names, expected_names);
    assert_eq!(rep.tensors, expected_names.len());
    // No temporary directory is left next to the output.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

#[test]
fn merges_random_and_random_routers_are_materialised() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    common::write_checkpoint(&base, 4, &[]);
    let src = tensors(4);
    let name = |l: usize, s: &str| format!("model.layers.{l}.{s}");

    // merge-linear, every layer routed with random routers, new layers unrouted.
    let out = dir.path().join("lin");
    expand(
        &base,
        &out,
        Recipe {
            layers: Some(6),
            init: Some("merge-linear".into()),
            router_init: Some("random".into()),
            router_on_new: Some(false),
            skip: Some("layer".into()),
            ..Default::default()
        },
    );
    let o = SafetensorsDir::open(&out).unwrap();
    for (suffix, _) in common::layer_tensors() {
        let got = o.read_f32(&name(5, suffix)).unwrap();
        let (a, b) = (&src[&name(3, suffix)].1, &src[&name(2, suffix)].1);
        let want: Vec<f32> = a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect();
        assert_eq!(got, want, "{suffix}");
    }
    assert!(
        o.shape("model.routers.5.weight").is_none(),
        "new layer must be unrouted"
    );
    let r0 = o.read_f32("model.routers.0.weight").unwrap();
    let r1 = o.read_f32("model.routers.1.weight").unwrap();
    assert_eq!(r0.len(), HIDDEN);
    assert!(r0.iter().any(|&x| x != 0.0) && r0 != r1);
    assert!(r0.iter().all(|x| x.abs() < 0.2), "N(0, 0.02) values expected: {r0:?}");
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(raw["model_type"], "llama_dlo");
    assert_eq!(raw["gate_init_method"], "random");
    assert_eq!(raw["is_dlo"], serde_json::json!([true, true, false, true, true, false]));

    // merge-slerp: every tensor of the layer is a slerp of the two source tensors.
    let out = dir.path().join("slerp");
    expand(
        &base,
        &out,
        Recipe {
            layers: Some(6),
            init: Some("merge-slerp".into()),
            ..Default::default()
        },
    );
    let o = SafetensorsDir::open(&out).unwrap();
    for (suffix, _) in common::layer_tensors() {
        let got = o.read_f32(&name(2, suffix)).unwrap();
        let want = dlo_passes::init::slerp(0.5, &src[&name(1, suffix)].1, &src[&name(0, suffix)].1);
        assert_eq!(got, want, "{suffix}");
        // Not a copy of either endpoint (the reference's stack bug left all but one tensor untouched).
        assert_ne!(got, src[&name(1, suffix)].1);
    }

    // random: norms are ones, matrices N(0, 0.02), deterministic per seed.
    let out = dir.path().join("rand");
    expand(
        &base,
        &out,
        Recipe {
            layers: Some(6),
            init: Some("random".into()),
            ..Default::default()
        },
    );
    let o = SafetensorsDir::open(&out).unwrap();
    assert!(o
        .read_f32(&name(2, "input_layernorm.weight"))
        .unwrap()
        .iter()
        .all(|&x| x == 1.0));
    let q = o.read_f32(&name(2, "self_attn.q_proj.weight")).unwrap();
    assert!(q.iter().all(|x| x.abs() < 0.2) && q.iter().any(|&x| x != 0.0));
    let q5 = o.read_f32(&name(5, "self_attn.q_proj.weight")).unwrap();
    assert_ne!(q, q5);
    let out2 = dir.path().join("rand2");
    expand(
        &base,
        &out2,
        Recipe {
            layers: Some(6),
            init: Some("random".into()),
            ..Default::default()
        },
    );
    let o2 = SafetensorsDir::open(&out2).unwrap();
    assert_eq!(
        o2.read_f32(&name(2, "self_attn.q_proj.weight")).unwrap(),
        q,
        "same seed, same weights"
    );
}

#[test]
fn stack_side_copies_whole_layers_and_bf16_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    common::write_checkpoint(&base, 4, &[]);
    let src = tensors(4);
    let out = dir.path().join("out");
    // 4 → 6 stack-side: m = 2, e = 1: layers 0,1,2, 1,2 (new, copy), 3.
    expand(
        &base,
        &out,
        Recipe {
            layers: Some(6),
            method: Some("stack-side".into()),
            init: Some("copy".into()),
            dtype: Some("bf16".into()),
            ..Default::default()
        },
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (out_l, src_l) in [(0, 0), (1, 1), (2, 2), (3, 1), (4, 2), (5, 3)] {
        for (suffix, _) in common::layer_tensors() {
            let t = st.tensor(&format!("model.layers.{out_l}.{suffix}")).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::BF16);
            let want: Vec<u8> = src[&format!("model.layers.{src_l}.{suffix}")]
                .1
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect();
            assert_eq!(t.data(), want.as_slice(), "layer {out_l} {suffix}");
        }
    }
    let cfg = ModelConfig::from_hf_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
    // Reading bf16 back through our source gives the rounded values.
    let o = SafetensorsDir::open(&out).unwrap();
    let v = o.read_f32("model.layers.3.self_attn.q_proj.weight").unwrap();
    let want: Vec<f32> = src["model.layers.1.self_attn.q_proj.weight"]
        .1
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(v, want);
    let _ = OutDtype::Bf16;
}
