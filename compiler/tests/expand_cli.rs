//! `dlo-compile expand` end to end on a tiny HF checkpoint written by the test.

use dlo_compiler::expand::{run, ExpandArgs, ExpandError, Expansion, RECIPE_FILE};
use dlo_passes::{ModelConfig, Recipe, SafetensorsDir, TensorSource};
use safetensors::tensor::TensorView;
use std::path::Path;

fn tiny_checkpoint(dir: &Path, layers: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 6,
        "num_hidden_layers": layers, "num_attention_heads": 2, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![8, 4]),
        ("model.norm.weight".into(), vec![4]),
    ];
    for l in 0..layers {
        for (s, shape) in [
            ("input_layernorm.weight", vec![4]),
            ("self_attn.q_proj.weight", vec![4, 4]),
            ("self_attn.k_proj.weight", vec![4, 4]),
            ("self_attn.v_proj.weight", vec![4, 4]),
            ("self_attn.o_proj.weight", vec![4, 4]),
            ("post_attention_layernorm.weight", vec![4]),
            ("mlp.gate_proj.weight", vec![6, 4]),
            ("mlp.up_proj.weight", vec![6, 4]),
            ("mlp.down_proj.weight", vec![4, 6]),
        ] {
            t.push((format!("model.layers.{l}.{s}"), shape));
        }
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let len: usize = s.iter().product();
            let bytes = (0..len)
                .flat_map(|i| ((k * 100 + i) as f32 * 0.01).to_le_bytes())
                .collect();
            (n, s, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn recipe_plus_flags_write_a_reproducible_dlo_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    tiny_checkpoint(&base, 6);
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        "layers = 8\nmethod = \"stack-side\"\ninit = \"copy\"\ncapacity = 0.5\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = ExpandArgs {
        base: base.clone(),
        output: out.clone(),
        recipe: Some(recipe),
        capacity: Some(0.75),
        skip: Some("layer".into()),
        no_router_on_new: true,
        ..Default::default()
    };
    run(&args).unwrap();
    let cfg = ModelConfig::from_hf_file(&out.join("config.json")).unwrap();
    let d = cfg.dlo.as_ref().unwrap();
    assert_eq!(cfg.num_hidden_layers, 8);
    assert_eq!(d.capacity, dlo_passes::Capacity::Scalar(0.75));
    // stack-side 6 → 8: m = 2, e = 2: 0,1,2,3, 2,3 (new, unrouted), 4,5.
    assert_eq!(d.is_dlo, [true, true, true, true, false, false, true, true]);
    assert!(out.join("tokenizer_config.json").is_file());
    let stored = Recipe::from_file(&out.join(RECIPE_FILE)).unwrap();
    assert_eq!(stored.method.as_deref(), Some("stack-side"));
    assert_eq!(stored.router_on_new, Some(false));
    // Tied embeddings: no lm_head in the source, none in the output.
    let o = SafetensorsDir::open(&out).unwrap();
    assert!(o.shape("lm_head.weight").is_none());
    let src = SafetensorsDir::open(&base).unwrap();
    assert_eq!(
        o.read_f32("model.layers.4.mlp.down_proj.weight").unwrap(),
        src.read_f32("model.layers.2.mlp.down_proj.weight").unwrap()
    );

    // Re-running with the stored recipe reproduces the weights exactly.
    let out2 = dir.path().join("out2");
    run(&ExpandArgs {
        base,
        output: out2.clone(),
        recipe: Some(out.join(RECIPE_FILE)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap()
    );

    // Existing output: refused before anything is read.
    let e = run(&args).unwrap_err();
    assert!(matches!(e, ExpandError::OutputExists(_)), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");
}

#[test]
fn an_expansion_is_summarised_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    tiny_checkpoint(&base, 6);
    let out = dir.path().join("out");
    let args = ExpandArgs {
        base: base.clone(),
        output: out.clone(),
        layers: Some(8),
        dry_run: true,
        ..Default::default()
    };
    assert_eq!(run(&args).unwrap(), None, "a dry run writes nothing");
    assert!(!out.exists());
    let e = Expansion::prepare(&base, &out, args.plan().unwrap()).unwrap();
    let summary = e.to_string();
    assert!(
        summary.starts_with(&format!("expand {} → {}: 6 → 8 layers", base.display(), out.display())),
        "{summary}"
    );
    assert!(summary.contains("\nlayer map:\n  0 ← orig 0"), "{summary}");
    assert!(!out.exists());
    let r = e.write().unwrap();
    assert_eq!(r.output, out);
    assert_eq!(r.tensors, SafetensorsDir::open(&out).unwrap().names().len());
}

#[test]
fn bad_flags_are_reported_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    tiny_checkpoint(&base, 6);
    let out = dir.path().join("out");
    let e = run(&ExpandArgs {
        base: base.clone(),
        output: out.clone(),
        layers: Some(8),
        method: Some("sideways".into()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown method `sideways`"), "{e}");
    let e = run(&ExpandArgs {
        base: base.clone(),
        output: out.clone(),
        layers: Some(11),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot expand 6 layers to 11"), "{e}");
    let e = run(&ExpandArgs {
        base: dir.path().join("missing"),
        output: out.clone(),
        layers: Some(8),
        ..Default::default()
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("missing"), "{e:#}");
    assert!(!out.exists());
}
