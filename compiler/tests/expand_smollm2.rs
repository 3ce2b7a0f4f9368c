//! Expanding the real SmolLM2-135M (GGUF, 30 layers) to 36 layers and running the result in the runtime:
//! the `zeros` expansion is an exact identity when every router executes, and a `copy` expansion puts the
//! copied layers at the interleave positions (skipping exactly those layers gives the base model back); and
//! an engine built with `--budget capacity` executes, layer by layer, the capacity its config records.
//! Needs the SmolLM2 and GSM8K assets (scripts/fetch-assets.sh); skips with a message otherwise.

use candle_core::{DType, Device, Tensor};
use dlo_compiler::expand::{run, ExpandArgs};
use dlo_runtime::model::{Batch, Forward, Routing};
use dlo_runtime::testing::{gsm8k_requests, max_abs_diff, smollm2_gguf};
use dlo_runtime::{Checkpoint, Model};
use std::path::Path;

const IDS: &[u32] = &[1, 504, 3458, 314, 3032, 30, 378, 1470, 28, 2];

fn logits(path: &Path, routing: Routing) -> Tensor {
    let ck = Checkpoint::open(path).unwrap();
    let model = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
    let out = model
        .forward(
            &Batch::single(IDS, 0),
            None,
            &Forward {
                routing,
                all_logits: true,
            },
        )
        .unwrap();
    out.logits
}

#[test]
fn smollm2_30_to_36_zeros_is_identity_and_copy_places_layers() {
    let Some(base) = smollm2_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base_logits = logits(&base, Routing::Reference);

    // zeros: every new layer adds exactly nothing, so with every router forced on the logits are the base's.
    let zeros = dir.path().join("zeros");
    run(&ExpandArgs {
        base: base.clone(),
        output: zeros.clone(),
        layers: Some(36),
        ..Default::default()
    })
    .unwrap();
    let d = max_abs_diff(&base_logits, &logits(&zeros, Routing::Force(true)));
    assert!(d <= 1e-5, "zeros expansion changed the logits by {d}");

    // copy with whole-layer skip: the model differs from the base when every layer runs; skipping exactly the
    // new layers (5, 11, ..., 35 for interleave 30 → 36) gives the base back, so they sit where §3.2 says and
    // are exact copies of the original just before them (skipping layer 6 instead, say, differs by ~8.6).
    let copy = dir.path().join("copy");
    run(&ExpandArgs {
        base,
        output: copy.clone(),
        layers: Some(36),
        init: Some("copy".into()),
        skip: Some("layer".into()),
        ..Default::default()
    })
    .unwrap();
    let all_on = max_abs_diff(&base_logits, &logits(&copy, Routing::Force(true)));
    assert!(all_on > 1e-2, "copied layers had no effect ({all_on})");
    let new_layers = [5, 11, 17, 23, 29, 35];
    let thresholds: Vec<f32> = (0..36)
        .map(|l| {
            if new_layers.contains(&l) {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let skip_new = max_abs_diff(&base_logits, &logits(&copy, Routing::Thresholds(thresholds)));
    assert!(
        skip_new <= 1e-5,
        "skipping the new layers should give the base logits, differs by {skip_new}"
    );
}

#[test]
fn smollm2_dlo_engine_with_budget_capacity_follows_each_layers_capacity() {
    use dlo_compiler::build::{BudgetArg, BuildArgs, BuildPlan};
    use dlo_compiler::calibrate::routing_stats;
    use dlo_runtime::engine::Engine;
    let Some(base) = smollm2_gguf() else { return };
    let Some(gsm8k) = gsm8k_requests() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("dlo");
    run(&ExpandArgs {
        base,
        output: ckpt.clone(),
        layers: Some(36),
        router_init: Some("random".into()),
        ..Default::default()
    })
    .unwrap();
    // The per-layer capacities cos-global training leaves: the first layer always runs, the zero-initialised
    // new layers (5, 11, ..., 35) never do, the rest between.
    let caps: Vec<f64> = (0..36)
        .map(|l| match l {
            0 => 1.0,
            _ if l % 6 == 5 => 0.0,
            _ => [0.95, 0.8, 0.6][l % 3],
        })
        .collect();
    let cfg_path = ckpt.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["dlo_capacity"] = serde_json::json!(caps);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // Real text: GSM8K questions and answers, the first 4096 tokens to calibrate on and the next ones held out.
    let text: String = dlo_compiler::train::data::import_gsm8k(&gsm8k)
        .unwrap()
        .iter()
        .take(150)
        .flat_map(|c| c.messages.iter().map(|m| format!("{}\n", m.content)))
        .collect();
    let text_path = dir.path().join("gsm8k.txt");
    std::fs::write(&text_path, &text).unwrap();
    let engine = dir.path().join("dlo.dlo");
    let args = BuildArgs {
        model: ckpt,
        output: engine.clone(),
        target: "native".into(),
        dtype: Some("f32".into()),
        budget: Some(BudgetArg::Capacity),
        calibration: Some(text_path),
        heldout: None,
        calibration_tokens: 4096,
        chunk_len: 128,
        runtime: Default::default(),
        profile: None,
        kv_profile: None,
        trt_lib: None,
    };
    dlo_compiler::build::run(BuildPlan::from_args(&args).unwrap()).unwrap();
    let e = Engine::open(&engine).unwrap();
    let b = e.plan().budget.clone().unwrap();
    let want: Vec<Option<f64>> = caps.iter().map(|c| Some(*c)).collect();
    assert_eq!(b.layer_rates.as_ref(), Some(&want));
    let model = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu).unwrap();
    let ids = e.tokenizer().unwrap().unwrap().encode(&text, false).unwrap();
    assert!(ids.len() > 4096 + 2048, "{} tokens of text", ids.len());
    let held = &ids[4096..4096 + 2048];
    let stats = routing_stats(&model, held, &e.routing(None).unwrap(), 128, 8).unwrap();
    for (l, (r, c)) in stats.layer_rates.iter().zip(&caps).enumerate() {
        let r = r.unwrap();
        match *c {
            0.0 | 1.0 => assert_eq!(r, *c, "layer {l}"),
            _ => assert!((r - c).abs() <= 0.06, "layer {l}: held-out rate {r}, capacity {c}"),
        }
    }
    // The reference rule (the sign of a random router) ignores the capacities.
    let reference = routing_stats(&model, held, &dlo_runtime::model::Routing::Reference, 128, 8).unwrap();
    assert!(reference.layer_rates[0].unwrap() < 0.9 && reference.layer_rates[5].unwrap() > 0.1);
}
