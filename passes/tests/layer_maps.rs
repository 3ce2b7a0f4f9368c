//! Layer maps of every expansion method (dlo-method.md §3.2–3.4) and router placement rules.

mod common;

use dlo_passes::expand::{layer_map, parse_ranges};
use dlo_passes::{CopyInit, ExpandMethod, ExpandPlan, LayerSource, ModelSpec, Recipe, RouterInit};
use std::path::Path;

fn new_positions(map: &[(usize, bool)]) -> Vec<(usize, usize)> {
    map.iter()
        .enumerate()
        .filter(|(_, &(_, n))| n)
        .map(|(l, &(j, _))| (l, j))
        .collect()
}

fn plan(r: Recipe) -> ExpandPlan {
    ExpandPlan::from_recipe(&r).unwrap()
}

fn spec_after(layers: usize, r: Recipe) -> ModelSpec {
    let mut s = ModelSpec::from_base(common::config(layers), Path::new("base")).unwrap();
    plan(r).apply(&mut s).unwrap();
    s
}

#[test]
fn interleave_32_to_40_new_layers_at_4_9_to_39_from_3_7_to_31() {
    let map = layer_map(&ExpandMethod::Interleave, 32, 40).unwrap();
    assert_eq!(map.len(), 40);
    let new = new_positions(&map);
    assert_eq!(
        new.iter().map(|p| p.0).collect::<Vec<_>>(),
        [4, 9, 14, 19, 24, 29, 34, 39]
    );
    assert_eq!(
        new.iter().map(|p| p.1).collect::<Vec<_>>(),
        [3, 7, 11, 15, 19, 23, 27, 31]
    );
    // Originals keep their order.
    let orig: Vec<usize> = map.iter().filter(|p| !p.1).map(|p| p.0).collect();
    assert_eq!(orig, (0..32).collect::<Vec<_>>());
}

#[test]
fn interleave_30_to_36_smollm2() {
    let map = layer_map(&ExpandMethod::Interleave, 30, 36).unwrap();
    let new = new_positions(&map);
    // split = 5: a new layer after originals 4, 9, 14, 19, 24, 29.
    assert_eq!(new, [(5, 4), (11, 9), (17, 14), (23, 19), (29, 24), (35, 29)]);
}

#[test]
fn interleave_other_sizes() {
    // 32 → 48: split 2, new after every odd original.
    let new = new_positions(&layer_map(&ExpandMethod::Interleave, 32, 48).unwrap());
    assert_eq!(new.len(), 16);
    assert_eq!(new[0], (2, 1));
    assert_eq!(new[15], (47, 31));
    // 32 → 64: a copy after every layer.
    let new = new_positions(&layer_map(&ExpandMethod::Interleave, 32, 64).unwrap());
    assert_eq!(new[0], (1, 0));
    // No expansion: identity.
    assert_eq!(
        layer_map(&ExpandMethod::Interleave, 4, 4).unwrap(),
        (0..4).map(|i| (i, false)).collect::<Vec<_>>()
    );
}

#[test]
fn stack_side_32_to_40_is_0_to_19_then_12_to_31() {
    let map = layer_map(&ExpandMethod::StackSide, 32, 40).unwrap();
    let src: Vec<usize> = map.iter().map(|p| p.0).collect();
    let expected: Vec<usize> = (0..20).chain(12..32).collect();
    assert_eq!(src, expected);
    // The second copy of 12..20 is the new block.
    let new = new_positions(&map);
    assert_eq!(new, (20..28).zip(12..20).collect::<Vec<_>>());
}

#[test]
fn stack_manual_reference_example() {
    let ranges = parse_ranges("0-8,6-12,10-22,20-26,24-32").unwrap();
    assert_eq!(ranges, [0..8, 6..12, 10..22, 20..26, 24..32]);
    // The reference's own syntax is accepted too.
    assert_eq!(parse_ranges("[0,8];[6,12];[10,22];[20,26];[24,32]").unwrap(), ranges);
    let map = layer_map(&ExpandMethod::StackManual(ranges), 32, 40).unwrap();
    let src: Vec<usize> = map.iter().map(|p| p.0).collect();
    let expected: Vec<usize> = (0..8).chain(6..12).chain(10..22).chain(20..26).chain(24..32).collect();
    assert_eq!(src, expected);
    let dup: Vec<usize> = new_positions(&map).iter().map(|p| p.1).collect();
    assert_eq!(dup, [6, 7, 10, 11, 20, 21, 24, 25]);
}

#[test]
fn new_layer_inits_become_the_right_sources() {
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            init: Some("zeros".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        s.layers[4].source,
        LayerSource::Copy {
            from: 3,
            init: CopyInit::Zeros
        }
    );
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            init: Some("copy".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        s.layers[9].source,
        LayerSource::Copy {
            from: 7,
            init: CopyInit::Exact
        }
    );
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            init: Some("merge-linear".into()),
            ..Default::default()
        },
    );
    assert_eq!(s.layers[4].source, LayerSource::MergeLinear { a: 3, b: 2 });
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            init: Some("merge-slerp".into()),
            ..Default::default()
        },
    );
    assert_eq!(s.layers[9].source, LayerSource::MergeSlerp { a: 7, b: 6, t: 0.5 });
    // Merging layer 0 falls back to a copy (nothing precedes it): 4 → 8 interleave copies every layer.
    let s = spec_after(
        4,
        Recipe {
            layers: Some(8),
            init: Some("merge-linear".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        s.layers[1].source,
        LayerSource::Copy {
            from: 0,
            init: CopyInit::Exact
        }
    );
    assert_eq!(s.layers[3].source, LayerSource::MergeLinear { a: 1, b: 0 });
    // Random init is seeded, and the seed changes it.
    let a = spec_after(
        8,
        Recipe {
            layers: Some(10),
            init: Some("random".into()),
            ..Default::default()
        },
    );
    let b = spec_after(
        8,
        Recipe {
            layers: Some(10),
            init: Some("random".into()),
            seed: Some(7),
            ..Default::default()
        },
    );
    assert!(matches!(a.layers[4].source, LayerSource::Random { like: 3, .. }));
    assert_ne!(a.layers[4].source, b.layers[4].source);
    // Stack-manual duplicates take the init too.
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            method: Some("stack-manual".into()),
            ranges: Some("0-5,3-8".into()),
            init: Some("merge-linear".into()),
            ..Default::default()
        },
    );
    assert_eq!(s.layers[5].source, LayerSource::MergeLinear { a: 3, b: 2 });
    assert_eq!(s.layers[6].source, LayerSource::MergeLinear { a: 4, b: 3 });
    assert_eq!(s.layers[7].source, LayerSource::Original(5));
}

#[test]
fn paper_default_routes_every_layer_with_zero_routers() {
    let s = spec_after(
        32,
        Recipe {
            layers: Some(40),
            ..Default::default()
        },
    );
    assert_eq!(s.is_dlo(), vec![true; 40]);
    assert!(s.layers.iter().all(|l| l.router == Some(RouterInit::Zero)));
    let cfg = s.output_config();
    let d = cfg.dlo.as_ref().unwrap();
    assert_eq!(cfg.num_hidden_layers, 40);
    assert_eq!(d.skip.model_type(), "llama_dlo_exattn");
    assert_eq!((d.loss_coefficient, d.scale_factor, d.scale_gap), (1.0, 2.0, 0.05));
    assert_eq!(d.capacity, dlo_passes::Capacity::Scalar(0.9));
    assert_eq!(d.loss_type.as_str(), "cos-global");
}

#[test]
fn router_every_k_skip_ends_and_new_layers() {
    // Every 4th original layer (3, 7, ... by base index), skip the first/last 4 originals, new layers unrouted.
    let s = spec_after(
        32,
        Recipe {
            layers: Some(40),
            router_every: Some(4),
            router_skip_ends: Some(4),
            router_on_new: Some(false),
            ..Default::default()
        },
    );
    let routed_base: Vec<usize> = s
        .layers
        .iter()
        .filter(|l| l.router.is_some())
        .map(|l| match l.source {
            LayerSource::Original(i) => i,
            ref other => panic!("new layer routed: {other:?}"),
        })
        .collect();
    assert_eq!(routed_base, [7, 11, 15, 19, 23, 27]);
    // k = 0: no original routed; new layers routed.
    let s = spec_after(
        32,
        Recipe {
            layers: Some(40),
            router_every: Some(0),
            ..Default::default()
        },
    );
    let routed: Vec<usize> = (0..40).filter(|&l| s.layers[l].router.is_some()).collect();
    assert_eq!(routed, [4, 9, 14, 19, 24, 29, 34, 39]);
    // Random routers get distinct per-layer seeds.
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            router_init: Some("random".into()),
            ..Default::default()
        },
    );
    let seeds: std::collections::BTreeSet<u64> = s
        .layers
        .iter()
        .map(|l| match l.router {
            Some(RouterInit::Random { seed }) => seed,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seeds.len(), 10);
    assert_eq!(s.gate_init_method(), "random");
}

#[test]
fn provenance_is_recorded_in_the_output_config() {
    let s = spec_after(
        8,
        Recipe {
            layers: Some(10),
            ..Default::default()
        },
    );
    let json = s.output_config().to_hf_json();
    let p = json["dlo_provenance"].as_array().unwrap();
    assert_eq!(p.len(), 10);
    assert_eq!(p[4]["source"], "copy");
    assert_eq!(p[4]["init"], "zeros");
    assert_eq!(p[4]["from"], serde_json::json!([3]));
    assert_eq!(p[3]["source"], "original");
    assert_eq!(p[3]["router"], "zero");
    assert_eq!(json["dlo_expansion"]["method"], "interleave");
    assert_eq!(json["dlo_expansion"]["base_layers"], 8);
    assert_eq!(s.layer_map()[4], "4 ← new: zeros copy of 3 [router: zero]");
}
