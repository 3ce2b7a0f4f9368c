//! Recipes: TOML/JSON round trips, CLI-style overlays, defaults = the paper's.

use dlo_passes::{ExpandPlan, Recipe};

#[test]
fn complete_recipe_round_trips_through_toml_and_json() {
    let r = Recipe {
        layers: Some(40),
        method: Some("stack-manual".into()),
        ranges: Some("0-8,6-12,10-22,20-26,24-32".into()),
        init: Some("merge-slerp".into()),
        skip: Some("layer".into()),
        router_every: Some(2),
        router_skip_ends: Some(1),
        router_on_new: Some(false),
        router_init: Some("random".into()),
        capacity: Some(0.7),
        loss: Some("cos".into()),
        loss_weight: Some(0.5),
        gate_scale: Some(1.5),
        gate_gap: Some(0.1),
        rescale: Some(false),
        dtype: Some("bf16".into()),
        seed: Some(42),
    };
    let plan = ExpandPlan::from_recipe(&r).unwrap();
    assert_eq!(plan.to_recipe(), r);
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("r.toml");
    std::fs::write(&t, plan.to_recipe().to_toml()).unwrap();
    assert_eq!(ExpandPlan::from_recipe(&Recipe::from_file(&t).unwrap()).unwrap(), plan);
    let j = dir.path().join("r.json");
    std::fs::write(&j, plan.to_recipe().to_json()).unwrap();
    assert_eq!(ExpandPlan::from_recipe(&Recipe::from_file(&j).unwrap()).unwrap(), plan);
    assert!(r.to_toml().contains("router-every = 2"), "{}", r.to_toml());
}

#[test]
fn flags_override_the_recipe_file_and_defaults_are_the_papers() {
    let file: Recipe = toml::from_str("layers = 40\ninit = \"copy\"\ncapacity = 0.5\n").unwrap();
    let flags = Recipe {
        capacity: Some(0.8),
        ..Default::default()
    };
    let merged = file.overlay(&flags);
    let plan = ExpandPlan::from_recipe(&merged).unwrap();
    let full = plan.to_recipe();
    assert_eq!(full.capacity, Some(0.8));
    assert_eq!(full.init.as_deref(), Some("copy"));
    // Everything else is the paper default (dlo-method.md §3.1, paper-script column).
    let d = ExpandPlan::from_recipe(&Recipe {
        layers: Some(40),
        ..Default::default()
    })
    .unwrap()
    .to_recipe();
    assert_eq!(d.method.as_deref(), Some("interleave"));
    assert_eq!(d.init.as_deref(), Some("zeros"));
    assert_eq!(d.skip.as_deref(), Some("mlp"));
    assert_eq!(
        (d.router_every, d.router_skip_ends, d.router_on_new),
        (Some(1), Some(0), Some(true))
    );
    assert_eq!(d.router_init.as_deref(), Some("zero"));
    assert_eq!(d.capacity, Some(0.9));
    assert_eq!(d.loss.as_deref(), Some("cos-global"));
    assert_eq!(
        (d.loss_weight, d.gate_scale, d.gate_gap),
        (Some(1.0), Some(2.0), Some(0.05))
    );
}
