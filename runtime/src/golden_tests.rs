//! Golden-logit tests: our forward pass against HF transformers on the fixtures committed under
//! `tests/fixtures/` (written by `scripts/gen_fixtures.py`, which documents how each was made).
//!
//! Each fixture is an HF directory (config.json + model.safetensors) plus `golden.safetensors` with fixed
//! `input_ids`, HF's f32 `logits` for them (positions 0..n), HF's bf16 `logits_bf16` (dense fixtures), and for
//! DLO-routed fixtures the reference routing per routed layer `l`: `exec.{l}` (u8) and `router_logit.{l}`.
//!
//! Tolerances:
//! - f32: max abs logit difference ≤ [`F32_TOL`] = 1e-4 (issue 2). Observed: ~1e-6.
//! - bf16: our bf16 model against HF's bf16 run of the same stored weights. Both round every intermediate
//!   to bf16 (8 significant bits), in a different order and with different fused kernels, so they drift apart
//!   by about as much as either drifts from f32. Measured (CPU): HF bf16 vs HF f32 0.096–0.178 (2.0–3.8 % of
//!   the max |logit| of 4.7–7.0); ours bf16 vs HF bf16 0.121–0.227 (1.7–4.9 %); ours bf16 vs f32 0.127–0.156.
//!   Asserted, with a 2× margin over the worst observation:
//!   1. max abs difference to HF bf16 ≤ [`BF16_TOL_REL`] (10 %) × max |logit| of the f32 reference;
//!   2. ours is not much less accurate than HF: max |ours bf16 − f32| ≤ [`BF16_DRIFT_RATIO`] (2) × max |HF bf16 −
//!      f32| (observed ratio 0.76–1.32);
//!   3. the argmax agrees with HF bf16's on ≥ 90 % of positions (near-ties may legitimately flip);
//!   4. cached bf16 decode, one token per step (the few-row decode kernels), also stays within bound 1.
//!
//!   A real defect (a wrong RoPE frequency, norm, or GQA grouping) moves logits by O(1), 20–100 % of max |logit|.
//! - Routed fixtures: routing decisions identical, router logits within [`ROUTER_TOL`], logits within 1e-4.
use crate::model::{Batch, Forward, Model, Routing};
use crate::weights::Weights;
use candle_core::{DType, Device, IndexOp, Tensor};
use dlo_passes::{ModelConfig, RopeScaling};
use std::collections::HashMap;
use std::path::PathBuf;

/// Max abs logit difference allowed in f32.
const F32_TOL: f32 = 1e-4;
/// Max abs logit difference allowed in bf16, relative to the largest |logit| of the f32 reference.
const BF16_TOL_REL: f32 = 0.10;
/// Our bf16 drift from f32 may be at most this multiple of HF's.
const BF16_DRIFT_RATIO: f32 = 2.0;
/// Router logits must agree to this (they have std ≈ 2 and |z| ≥ 0.1 by construction).
const ROUTER_TOL: f32 = 1e-4;

/// One fixture: config, weights and golden tensors.
struct Fixture {
    name: &'static str,
    cfg: ModelConfig,
    weights: Weights,
    golden: HashMap<String, Tensor>,
    ids: Vec<u32>,
}

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn load(name: &'static str) -> Fixture {
    let dir = fixture_dir(name);
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).expect("fixture config.json");
    let weights = Weights::from_safetensors(&[dir.join("model.safetensors")], &dir).expect("fixture weights");
    let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).expect("golden");
    let ids: Vec<u32> = golden["input_ids"]
        .to_dtype(DType::I64)
        .and_then(|t| t.to_vec1::<i64>())
        .expect("input_ids")
        .into_iter()
        .map(|i| u32::try_from(i).expect("id fits u32"))
        .collect();
    Fixture {
        name,
        cfg,
        weights,
        golden,
        ids,
    }
}

impl Fixture {
    fn model(&self, dtype: DType) -> Model {
        Model::load(&self.cfg, &self.weights, dtype, &Device::Cpu).expect("model loads")
    }

    fn golden(&self, key: &str) -> &Tensor {
        self.golden
            .get(key)
            .unwrap_or_else(|| panic!("{}: golden.safetensors has no `{key}`", self.name))
    }

    /// Golden logits `[n, vocab]` as f32.
    fn logits(&self, key: &str) -> Tensor {
        self.golden(key).to_dtype(DType::F32).expect("f32")
    }
}

fn all_logits() -> Forward {
    Forward {
        all_logits: true,
        ..Default::default()
    }
}

/// [`crate::testing::max_abs_diff`] of f32 logits, in f32 like the tolerances above (exact: it is an f32 value).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    crate::testing::max_abs_diff(a, b) as f32
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max")
}

/// Full-sequence forward pass; logits `[n, vocab]`.
fn forward_all(m: &Model, ids: &[u32]) -> crate::model::ForwardOutput {
    m.forward(&Batch::single(ids, 0), None, &all_logits()).expect("forward")
}

fn check_f32(name: &'static str) {
    let fx = load(name);
    let out = forward_all(&fx.model(DType::F32), &fx.ids);
    let want = fx.logits("logits");
    let got = out.logits.i(0).expect("batch 0");
    assert_eq!(got.dims(), want.dims(), "{name}: logits shape");
    let d = max_abs_diff(&got, &want);
    println!(
        "{name}: f32 max abs diff vs HF {d:.3e} (max |logit| {:.3})",
        max_abs(&want)
    );
    assert!(d <= F32_TOL, "{name}: f32 logits differ from HF by {d} (> {F32_TOL})");
}

fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.argmax(candle_core::D::Minus1)
        .and_then(|a| a.to_vec1::<u32>())
        .expect("argmax")
}

fn check_bf16(name: &'static str) {
    let fx = load(name);
    let out = forward_all(&fx.model(DType::BF16), &fx.ids);
    let want = fx.logits("logits_bf16");
    let f32_ref = fx.logits("logits");
    let got = out.logits.i(0).expect("batch 0");
    let d = max_abs_diff(&got, &want);
    let scale = max_abs(&f32_ref);
    let hf_drift = max_abs_diff(&want, &f32_ref);
    let ours_drift = max_abs_diff(&got, &f32_ref);
    println!(
        "{name}: bf16 vs HF bf16 {d:.4} ({:.1}% of max |logit| {scale:.3}); HF bf16 vs f32 {hf_drift:.4}; ours bf16 vs f32 {ours_drift:.4}",
        100.0 * d / scale
    );
    assert!(
        d <= BF16_TOL_REL * scale,
        "{name}: bf16 logits differ from HF bf16 by {d} (> {BF16_TOL_REL} × {scale})"
    );
    assert!(
        ours_drift <= BF16_DRIFT_RATIO * hf_drift,
        "{name}: our bf16 logits drift {ours_drift} from f32, more than {BF16_DRIFT_RATIO} × HF's {hf_drift}"
    );
    // Cached decode in bf16 (one token per step: the few-row decode kernels) stays within the same bound.
    let m = fx.model(DType::BF16);
    let mut cache = m.new_cache();
    let mut worst = 0f32;
    for (i, &tok) in fx.ids.iter().enumerate() {
        let out = m
            .forward(
                &Batch::next_tokens(&[tok], &[i as u32]),
                Some(&mut cache),
                &Forward::default(),
            )
            .expect("decode step");
        let row = out.logits.i((0, 0)).expect("row");
        worst = worst.max(max_abs_diff(&row, &want.i(i).expect("row")));
    }
    println!("{name}: bf16 cached decode vs HF bf16 {worst:.4}");
    assert!(
        worst <= BF16_TOL_REL * scale,
        "{name}: bf16 cached decode differs from HF bf16 by {worst} (> {BF16_TOL_REL} × {scale})"
    );
    let (a, b) = (argmax_rows(&got), argmax_rows(&want));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        same * 10 >= a.len() * 9,
        "{name}: bf16 argmax agrees with HF bf16 on only {same}/{} positions",
        a.len()
    );
}

/// Prefill `prefix` tokens, then decode one token at a time with the KV cache; every step's logits (and
/// routing decisions, for routed fixtures) must equal the golden full-sequence ones.
fn check_decode(name: &'static str, prefix: usize) {
    let fx = load(name);
    let m = fx.model(DType::F32);
    let want = fx.logits("logits");
    let mut cache = m.new_cache();
    let pre = m
        .forward(&Batch::single(&fx.ids[..prefix], 0), Some(&mut cache), &all_logits())
        .expect("prefill");
    let d = max_abs_diff(&pre.logits.i(0).expect("b0"), &want.narrow(0, 0, prefix).expect("rows"));
    assert!(
        d <= F32_TOL,
        "{name}: prefill of {prefix} tokens differs from golden by {d}"
    );
    let mut worst = d;
    for (i, &tok) in fx.ids.iter().enumerate().skip(prefix) {
        let out = m
            .forward(
                &Batch::next_tokens(&[tok], &[i as u32]),
                Some(&mut cache),
                &Forward::default(),
            )
            .expect("decode step");
        let got = out.logits.i((0, 0)).expect("row");
        let d = max_abs_diff(&got, &want.i(i).expect("row"));
        worst = worst.max(d);
        assert!(
            d <= F32_TOL,
            "{name}: decode at position {i} differs from golden by {d}"
        );
        for (l, tr) in out.trace.iter().enumerate() {
            if let Some(tr) = tr {
                let e: Vec<u8> = fx.golden(&format!("exec.{l}")).to_vec1().expect("exec");
                assert_eq!(
                    tr.exec[0],
                    e[i] != 0,
                    "{name}: layer {l} position {i}: cached decode routing differs from the reference"
                );
            }
        }
    }
    println!("{name}: cached decode (prefill {prefix}) max abs diff vs golden {worst:.3e}");
}

#[test]
fn llama_gqa_f32_logits_match_hf() {
    check_f32("llama_gqa");
}

#[test]
fn llama_tied_f32_logits_match_hf() {
    check_f32("llama_tied");
}

#[test]
fn llama3_rope_f32_logits_match_hf() {
    check_f32("llama3_rope");
}

#[test]
fn llama_gqa_bf16_logits_match_hf_bf16() {
    check_bf16("llama_gqa");
}

#[test]
fn llama_tied_bf16_logits_match_hf_bf16() {
    check_bf16("llama_tied");
}

#[test]
fn llama3_rope_bf16_logits_match_hf_bf16() {
    check_bf16("llama3_rope");
}

#[test]
fn decode_with_kv_cache_equals_golden_position_by_position() {
    for name in ["llama_gqa", "llama_tied", "llama3_rope"] {
        check_decode(name, 1);
    }
    check_decode("llama_gqa", 7);
}

#[test]
fn fixtures_are_sensitive_to_what_they_test() {
    // The llama3 fixture must depend on the scaling: without it the logits are far off.
    let fx = load("llama3_rope");
    assert!(matches!(fx.cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    let mut plain = fx.cfg.clone();
    plain.rope_scaling = None;
    let m = Model::load(&plain, &fx.weights, DType::F32, &Device::Cpu).expect("load");
    let d = max_abs_diff(&forward_all(&m, &fx.ids).logits.i(0).expect("b0"), &fx.logits("logits"));
    assert!(d > 0.1, "llama3_rope: unscaled RoPE is within {d} of the golden logits");
    // The tied fixture really is tied, the GQA one really groups heads.
    assert!(load("llama_tied").cfg.tie_word_embeddings);
    let gqa = load("llama_gqa").cfg;
    assert!(gqa.num_key_value_heads < gqa.num_attention_heads && !gqa.tie_word_embeddings);
}

fn check_routed(name: &'static str) {
    let fx = load(name);
    let m = fx.model(DType::F32);
    let out = forward_all(&m, &fx.ids);
    let want = fx.logits("logits");
    let d = max_abs_diff(&out.logits.i(0).expect("b0"), &want);
    let mut routed = 0;
    for (l, tr) in out.trace.iter().enumerate() {
        let key = format!("exec.{l}");
        match (tr, fx.golden.get(&key)) {
            (Some(tr), Some(e)) => {
                routed += 1;
                let e: Vec<bool> = e.to_vec1::<u8>().expect("exec").into_iter().map(|x| x != 0).collect();
                assert_eq!(
                    tr.exec, e,
                    "{name}: layer {l}: routing decisions differ from the reference"
                );
                assert!(
                    e.iter().any(|x| *x) && !e.iter().all(|x| *x),
                    "{name}: layer {l}: degenerate fixture routing"
                );
                let z = fx.logits(&format!("router_logit.{l}"));
                let got = Tensor::new(tr.logits.as_slice(), &Device::Cpu).expect("z");
                let dz = max_abs_diff(&got, &z);
                assert!(dz <= ROUTER_TOL, "{name}: layer {l}: router logits differ by {dz}");
            }
            (None, None) => {}
            (Some(_), None) => panic!("{name}: layer {l} is routed but the fixture has no `{key}`"),
            (None, Some(_)) => {
                panic!("{name}: the fixture routes layer {l} but the model does not")
            }
        }
    }
    assert!(routed >= 2, "{name}: only {routed} routed layers");
    println!("{name}: f32 max abs diff vs reference {d:.3e}; routing identical on {routed} layers");
    assert!(
        d <= F32_TOL,
        "{name}: routed logits differ from the reference by {d} (> {F32_TOL})"
    );
    // The routing matters: running every unit gives different logits.
    let dense = m
        .forward(
            &Batch::single(&fx.ids, 0),
            None,
            &Forward {
                routing: Routing::Force(true),
                all_logits: true,
            },
        )
        .expect("forced");
    let dd = max_abs_diff(&dense.logits.i(0).expect("b0"), &want);
    assert!(dd > 0.1, "{name}: forcing every unit on changes logits by only {dd}");
}

#[test]
fn dlo_mlp_skip_matches_reference() {
    check_routed("dlo_mlp");
}

#[test]
fn dlo_layer_skip_matches_reference() {
    check_routed("dlo_layer");
}

#[test]
fn dlo_decode_with_cache_equals_reference() {
    check_decode("dlo_mlp", 1);
    check_decode("dlo_layer", 1);
    check_decode("dlo_layer", 9);
}
