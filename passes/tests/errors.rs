//! Bad input: each case gives a clear error, and no output (or temporary) directory is left behind.

mod common;

use dlo_passes::writer::write_model;
use dlo_passes::{
    Error, ExpandPlan, ModelConfig, ModelSpec, OutDtype, Recipe, SafetensorsDir, SafetensorsIndex, WriteOptions,
};
use std::path::Path;

fn plan_err(r: Recipe) -> String {
    ExpandPlan::from_recipe(&r).unwrap_err().to_string()
}

fn apply_err(base_layers: usize, r: Recipe) -> String {
    let mut s = ModelSpec::from_base(common::config(base_layers), Path::new("base")).unwrap();
    ExpandPlan::from_recipe(&r)
        .unwrap()
        .apply(&mut s)
        .unwrap_err()
        .to_string()
}

fn layers(n: usize) -> Recipe {
    Recipe {
        layers: Some(n),
        ..Default::default()
    }
}

#[test]
fn interleave_counts_that_do_not_divide() {
    // 32 → 45: split = ⌊32/13⌋ = 2 would insert 16 layers, not 13.
    let e = apply_err(32, layers(45));
    assert!(
        e.contains("interleave: cannot expand 32 layers to 45") && e.contains("16 new layers, not 13"),
        "{e}"
    );
    assert!(e.contains("48"), "should suggest a reachable target: {e}");
    let e = apply_err(4, layers(9));
    assert!(e.contains("at most 4 new layers"), "{e}");
    let e = apply_err(8, layers(6));
    assert!(e.contains("only adds layers"), "{e}");
}

#[test]
fn stack_side_counts() {
    let side = |n| Recipe {
        layers: Some(n),
        method: Some("stack-side".into()),
        ..Default::default()
    };
    let e = apply_err(32, side(41));
    assert!(e.contains("stack-side") && e.contains("even"), "{e}");
    let e = apply_err(4, side(10));
    assert!(e.contains("must not exceed the 4 base layers"), "{e}");
}

#[test]
fn stack_manual_ranges_out_of_bounds_or_not_summing() {
    let manual = |n, r: &str| Recipe {
        layers: Some(n),
        method: Some("stack-manual".into()),
        ranges: Some(r.into()),
        ..Default::default()
    };
    let e = apply_err(32, manual(40, "0-8,6-12,10-22,20-26,24-33"));
    assert!(
        e.contains("`24-33`") && e.contains("out of bounds") && e.contains("32 layers"),
        "{e}"
    );
    let e = apply_err(32, manual(40, "0-8,6-12"));
    assert!(e.contains("hold 14 layers in total, but --layers is 40"), "{e}");
    let e = plan_err(manual(40, "0-8,12-6"));
    assert!(e.contains("`12-6`") && e.contains("empty range"), "{e}");
    let e = plan_err(manual(40, "0-8,x-9"));
    assert!(e.contains("`x-9`") && e.contains("start"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        method: Some("stack-manual".into()),
        ..Default::default()
    });
    assert!(e.contains("no ranges given"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        ranges: Some("0-8".into()),
        ..Default::default()
    });
    assert!(e.contains("only used by --method stack-manual"), "{e}");
}

#[test]
fn unknown_method_init_and_other_names() {
    let e = plan_err(Recipe {
        layers: Some(40),
        method: Some("zigzag".into()),
        ..Default::default()
    });
    assert_eq!(
        e,
        "unknown method `zigzag` (expected one of: interleave, stack-side, stack-manual)"
    );
    let e = plan_err(Recipe {
        layers: Some(40),
        init: Some("ones".into()),
        ..Default::default()
    });
    assert!(e.starts_with("unknown init `ones`"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        skip: Some("attn".into()),
        ..Default::default()
    });
    assert!(e.starts_with("unknown skip kind `attn`"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        loss: Some("l2".into()),
        ..Default::default()
    });
    assert!(e.starts_with("unknown loss type `l2`"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        router_init: Some("ones".into()),
        ..Default::default()
    });
    assert!(e.starts_with("unknown router init `ones`"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        dtype: Some("f8".into()),
        ..Default::default()
    });
    assert!(e.starts_with("unknown dtype `f8`"), "{e}");
    let e = plan_err(Recipe {
        layers: Some(40),
        capacity: Some(1.5),
        ..Default::default()
    });
    assert!(e.contains("capacity") && e.contains("(0, 1]"), "{e}");
    let e = plan_err(Recipe::default());
    assert!(e.contains("--layers"), "{e}");
}

#[test]
fn recipe_with_unknown_key_or_bad_syntax_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.toml");
    std::fs::write(&p, "layers = 40\nrouter_every = 2\n").unwrap();
    let e = Recipe::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("r.toml") && e.contains("router_every"), "{e}");
    let p = dir.path().join("r.json");
    std::fs::write(&p, "{\"layers\": \"forty\"}").unwrap();
    let e = Recipe::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("r.json") && e.contains("invalid recipe"), "{e}");
}

#[test]
fn base_that_is_already_dlo_is_refused() {
    let mut v = common::config_json(2);
    v["model_type"] = "llama_dlo".into();
    v["is_dlo"] = serde_json::json!([true, true]);
    let cfg = ModelConfig::from_hf_json(&v, Path::new("b/config.json")).unwrap();
    let e = ModelSpec::from_base(cfg, Path::new("b")).unwrap_err();
    assert!(matches!(e, Error::BaseIsDlo { .. }), "{e}");
}

fn write(base: &Path, out: &Path) -> Result<dlo_passes::WriteReport, Error> {
    let cfg = ModelConfig::from_hf_file(&base.join("config.json")).unwrap();
    let mut spec = ModelSpec::from_base(cfg, base).unwrap();
    ExpandPlan::from_recipe(&layers(6)).unwrap().apply(&mut spec).unwrap();
    let src = SafetensorsDir::open(base)?;
    write_model(
        &spec,
        &src,
        out,
        &WriteOptions {
            dtype: OutDtype::F32,
            extra_files: vec![],
        },
    )
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn output_that_exists_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    common::write_checkpoint(&base, 4, &[]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let e = write(&base, &out).unwrap_err();
    assert!(
        matches!(e, Error::OutputExists { .. }) && e.to_string().contains("already exists"),
        "{e}"
    );
    assert_eq!(entries(&out), ["keep.txt"]);
}

#[test]
fn source_missing_a_tensor_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    common::write_checkpoint(&base, 4, &["model.layers.2.mlp.up_proj.weight"]);
    let out = dir.path().join("out");
    let e = write(&base, &out).unwrap_err().to_string();
    assert!(e.contains("missing tensor `model.layers.2.mlp.up_proj.weight`"), "{e}");
    assert!(e.contains("base"), "names the source: {e}");
    assert_eq!(entries(dir.path()), ["base"], "no output or temp dir left");
}

/// A source whose reads fail midway (after the header was written): the temp dir must be removed.
struct FailingSource(SafetensorsDir);

impl dlo_passes::TensorSource for FailingSource {
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.shape(name)
    }
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, Error> {
        if name.starts_with("model.layers.3.") {
            return Err(Error::tensor_read(self.0.origin(), name, "disk on fire"));
        }
        self.0.read_f32(name)
    }
    fn origin(&self) -> &Path {
        self.0.origin()
    }
}

#[test]
fn read_failure_mid_write_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    common::write_checkpoint(&base, 4, &[]);
    let cfg = ModelConfig::from_hf_file(&base.join("config.json")).unwrap();
    let mut spec = ModelSpec::from_base(cfg, &base).unwrap();
    ExpandPlan::from_recipe(&layers(6)).unwrap().apply(&mut spec).unwrap();
    let src = FailingSource(SafetensorsDir::open(&base).unwrap());
    let out = dir.path().join("out");
    let e = write_model(
        &spec,
        &src,
        &out,
        &WriteOptions {
            dtype: OutDtype::F32,
            extra_files: vec![],
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("disk on fire") && e.contains("model.layers.3."), "{e}");
    assert_eq!(entries(dir.path()), ["base"]);
}

#[test]
fn not_safetensors_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, b"definitely not a safetensors file").unwrap();
    let e = SafetensorsDir::open(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("invalid safetensors"),
        "{e}"
    );
    let e = SafetensorsDir::open(&dir.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn a_bad_shard_index_names_the_index_file() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(dir.path().join("a.safetensors"), b"x").unwrap();
    let cases: [(&str, &str); 5] = [
        ("{ not json", "not valid JSON"),
        (r#"{"metadata": {}}"#, "no `weight_map` object"),
        (
            r#"{"weight_map": {"w": 3}}"#,
            "`weight_map` entry `w` is not a file name",
        ),
        (
            r#"{"weight_map": {"w": "../a.safetensors"}}"#,
            "shard `../a.safetensors` is not a plain file name",
        ),
        (
            r#"{"weight_map": {"w": "b.safetensors"}}"#,
            "names shard `b.safetensors`, which does not exist",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&index, text).unwrap();
        for e in [
            SafetensorsIndex::read(&index).unwrap_err().to_string(),
            SafetensorsDir::open(dir.path()).err().unwrap().to_string(),
        ] {
            assert!(
                e.contains(&index.display().to_string()) && e.contains(want),
                "{text}: {e}"
            );
        }
    }
    let e = SafetensorsIndex::read(&dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
    // A good index lists each shard once, sorted.
    std::fs::write(dir.path().join("b.safetensors"), b"x").unwrap();
    std::fs::write(
        &index,
        r#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#,
    )
    .unwrap();
    let read = SafetensorsIndex::read(&index).unwrap();
    assert_eq!(read.shards(), ["a.safetensors", "b.safetensors"]);
    assert_eq!(
        read.shard_files(),
        [dir.path().join("a.safetensors"), dir.path().join("b.safetensors")]
    );
}

#[test]
fn validation_after_a_pass_names_pass_and_layer() {
    use dlo_passes::{LayerSource, LayerSpec, Pass, Pipeline};
    struct Broken;
    impl Pass for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        fn run(&self, spec: &mut ModelSpec) -> Result<bool, Error> {
            spec.layers[1] = LayerSpec {
                source: LayerSource::Original(99),
                router: None,
            };
            Ok(true)
        }
    }
    let mut s = ModelSpec::from_base(common::config(4), Path::new("base")).unwrap();
    let e = Pipeline::new().with(Broken).run(&mut s).unwrap_err().to_string();
    assert_eq!(
        e,
        "after pass `broken`: layer 1: built from base layer 99, but the base model has 4 layers (0..3)"
    );
}
