//! Expanding the real SmolLM2-135M (GGUF, 30 layers) to 36 layers and running the result in the runtime:
//! the `zeros` expansion is an exact identity when every router executes, and a `copy` expansion puts the
//! copied layers at the interleave positions (skipping exactly those layers gives the base model back).
//! Needs the SmolLM2 asset (scripts/fetch-assets.sh); skips with a message otherwise.

use candle_core::{DType, Device, Tensor};
use dlo_compiler::expand::{run, ExpandArgs};
use dlo_runtime::model::{Batch, Forward, Routing};
use dlo_runtime::testing::{max_abs_diff, smollm2_gguf};
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
