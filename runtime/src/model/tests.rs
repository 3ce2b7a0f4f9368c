//! Model tests on small random checkpoints: cached decoding equals recomputation, padding is inert,
//! routed layers follow the reference rule.

use super::*;
use crate::testing::{max_abs_diff, random_weights, routed, tiny_config};
use dlo_passes::SkipKind;

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 31 + seed * 7 + 3) % 97).collect()
}

/// Full recomputation of all positions vs prefill of a prefix then one-token decode steps, in f32 and in f64
/// (the precision reference checks of exported models use).
fn check_decode_equals_recompute(cfg: &ModelConfig) {
    // f32: decode runs the matvec kernel, recomputation runs GEMM: same math, different summation order.
    check_decode_equals_recompute_in(cfg, DType::F32, 1e-5, 1e-4);
    check_decode_equals_recompute_in(cfg, DType::F64, 1e-10, 1e-10);
}

fn check_decode_equals_recompute_in(cfg: &ModelConfig, dtype: DType, prefill_tol: f64, decode_tol: f64) {
    let m = Model::load(cfg, &random_weights(cfg, 7), dtype, &Device::Cpu).unwrap();
    let seq = ids(12, 1);
    let all = Forward {
        all_logits: true,
        ..Default::default()
    };
    let full = m.forward(&Batch::single(&seq, 0), None, &all).unwrap();
    let mut cache = m.new_cache();
    let pre = m.forward(&Batch::single(&seq[..5], 0), Some(&mut cache), &all).unwrap();
    assert_eq!(full.logits.dtype(), dtype);
    assert!(max_abs_diff(&pre.logits, &full.logits.narrow(1, 0, 5).unwrap()) < prefill_tol);
    for (i, &tok) in seq.iter().enumerate().skip(5) {
        let out = m
            .forward(
                &Batch::next_tokens(&[tok], &[i as u32]),
                Some(&mut cache),
                &Forward::default(),
            )
            .unwrap();
        let want = full.logits.narrow(1, i, 1).unwrap();
        let d = max_abs_diff(&out.logits, &want);
        assert!(
            d < decode_tol,
            "{dtype:?} position {i}: decode differs from recomputation by {d}"
        );
        for (l, tr) in out.trace.iter().enumerate() {
            if let (Some(tr), Some(ftr)) = (tr, &full.trace[l]) {
                assert_eq!(
                    tr.exec[0], ftr.exec[i],
                    "layer {l} position {i}: routing decision differs"
                );
            }
        }
    }
}

#[test]
fn dense_decode_equals_recompute() {
    check_decode_equals_recompute(&tiny_config(false));
    check_decode_equals_recompute(&tiny_config(true));
}

#[test]
fn mlp_skip_decode_equals_recompute() {
    check_decode_equals_recompute(&routed(tiny_config(false), SkipKind::Mlp));
}

#[test]
fn layer_skip_decode_equals_recompute_with_ragged_caches() {
    let cfg = routed(tiny_config(false), SkipKind::Layer);
    check_decode_equals_recompute(&cfg);
    // The per-layer caches really are ragged: routed layers hold fewer tokens than dense ones.
    let m = Model::load(&cfg, &random_weights(&cfg, 7), DType::F32, &Device::Cpu).unwrap();
    let mut cache = m.new_cache();
    let out = m
        .forward(&Batch::single(&ids(40, 3), 0), Some(&mut cache), &Forward::default())
        .unwrap();
    let lens = cache.lengths(0);
    assert_eq!(lens[0], 40);
    for (l, (len, tr)) in lens.iter().zip(&out.trace).enumerate().skip(1) {
        let executed = tr.as_ref().unwrap().exec.iter().filter(|e| **e).count();
        assert_eq!(*len, executed, "layer {l}");
        assert!(
            executed > 0 && executed < 40,
            "layer {l} executed {executed} of 40: routers are degenerate"
        );
    }
}

/// Padding a sequence inside a batch does not change any of its tokens' logits or routing.
fn check_padding_is_inert(cfg: &ModelConfig) {
    let m = Model::load(cfg, &random_weights(cfg, 11), DType::F32, &Device::Cpu).unwrap();
    let a = ids(9, 1);
    let b = ids(4, 2);
    let all = Forward {
        all_logits: true,
        ..Default::default()
    };
    let batch = Batch::left_padded(&[a.clone(), b.clone()], 0);
    let mut cache = m.new_cache();
    let both = m.forward(&batch, Some(&mut cache), &all).unwrap();
    for (bi, s) in [a.clone(), b.clone()].iter().enumerate() {
        let alone = m.forward(&Batch::single(s, 0), None, &all).unwrap();
        let pad = 9 - s.len();
        let got = both.logits.get(bi).unwrap().narrow(0, pad, s.len()).unwrap();
        let d = max_abs_diff(&got, &alone.logits.get(0).unwrap());
        // Batched matmuls block differently from single-sequence ones: allow f32 summation-order noise.
        assert!(d < 1e-4, "sequence {bi}: padding changed logits by {d}");
        for (l, tr) in both.trace.iter().enumerate() {
            if let (Some(tr), Some(at)) = (tr, &alone.trace[l]) {
                assert_eq!(&tr.exec[bi * 9 + pad..(bi + 1) * 9], &at.exec[..], "layer {l}");
            }
        }
    }
    // Batched decode continues both sequences independently.
    let next = m
        .forward(
            &Batch::next_tokens(&[5, 6], &[9, 4]),
            Some(&mut cache),
            &Forward::default(),
        )
        .unwrap();
    for (bi, (s, tok)) in [(a, 5u32), (b, 6u32)].into_iter().enumerate() {
        let mut s = s;
        s.push(tok);
        let alone = m.forward(&Batch::single(&s, 0), None, &Forward::default()).unwrap();
        let d = max_abs_diff(&next.logits.get(bi).unwrap(), &alone.logits.get(0).unwrap());
        assert!(d < 1e-4, "sequence {bi}: batched decode differs by {d}");
    }
}

#[test]
fn padding_is_inert_dense_and_routed() {
    check_padding_is_inert(&tiny_config(true));
    check_padding_is_inert(&routed(tiny_config(false), SkipKind::Mlp));
    check_padding_is_inert(&routed(tiny_config(false), SkipKind::Layer));
}

#[test]
fn forced_routing_bounds_the_routed_model() {
    // Forcing every routed unit on gives the dense computation with the gate applied; forcing them off
    // makes routed `layer`-skip layers identities.
    let cfg = routed(tiny_config(false), SkipKind::Layer);
    let w = random_weights(&cfg, 5);
    let m = Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
    let seq = ids(6, 4);
    let off = m
        .forward(
            &Batch::single(&seq, 0),
            None,
            &Forward {
                routing: Routing::Force(false),
                all_logits: true,
            },
        )
        .unwrap();
    let mut one_layer = cfg.clone();
    one_layer.num_hidden_layers = 1;
    one_layer.dlo = None;
    let m1 = Model::load(&one_layer, &w, DType::F32, &Device::Cpu).unwrap();
    let dense1 = m1
        .forward(
            &Batch::single(&seq, 0),
            None,
            &Forward {
                all_logits: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(max_abs_diff(&off.logits, &dense1.logits) < 1e-5);
    assert!(off.trace[1].as_ref().unwrap().exec.iter().all(|e| !e));
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let cfg = tiny_config(true);
    let m = Model::load(&cfg, &random_weights(&cfg, 1), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward(&Batch::single(&[1, 500], 0), None, &Forward::default())
        .unwrap_err();
    assert!(e.to_string().contains("token id 500"), "{e}");
}
