//! Model tests on small random checkpoints: cached decoding equals recomputation, padding is inert,
//! routed layers follow the reference rule.

use super::*;
use crate::backend::Backend;
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

/// Two prefixes prefilled once (left-padded), their caches copied row by row and continued several ways
/// (right-padded) give each full sequence's logits and routing decisions: the shared-context scoring of
/// evaluation.
fn check_shared_prefix_continuations(cfg: &ModelConfig) {
    let m = Model::load(cfg, &random_weights(cfg, 13), DType::F32, &Device::Cpu).unwrap();
    let all = Forward {
        all_logits: true,
        ..Default::default()
    };
    let prefixes = [ids(7, 1), ids(3, 2)];
    let mut cache = m.new_cache();
    m.forward(&Batch::left_padded(&prefixes, 0), Some(&mut cache), &all)
        .unwrap();
    // continuation i extends prefix rows[i]
    let rows = [1usize, 0, 1, 0];
    let conts = [ids(5, 3), ids(2, 4), ids(1, 5), ids(4, 6)];
    let start: Vec<u32> = rows.iter().map(|&r| prefixes[r].len() as u32).collect();
    let mut forked = m.select_rows(&cache, &rows).unwrap();
    let batch = Batch::right_padded(&conts, &start, 0);
    let out = m.forward(&batch, Some(&mut forked), &all).unwrap();
    assert_eq!(
        forked.layers[0].len(),
        7 + 5,
        "7 prefix slots (one row padded) and 5 continuation slots"
    );
    for (i, (&r, c)) in rows.iter().zip(&conts).enumerate() {
        let full: Vec<u32> = prefixes[r].iter().chain(c).copied().collect();
        let alone = m.forward(&Batch::single(&full, 0), None, &all).unwrap();
        let p = prefixes[r].len();
        let got = out.logits.get(i).unwrap().narrow(0, 0, c.len()).unwrap();
        let want = alone.logits.get(0).unwrap().narrow(0, p, c.len()).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "continuation {i}: logits differ by {d}");
        for (l, tr) in out.trace.iter().enumerate() {
            if let (Some(tr), Some(at)) = (tr, &alone.trace[l]) {
                let t = batch.t;
                assert_eq!(
                    &tr.exec[i * t..i * t + c.len()],
                    &at.exec[p..],
                    "continuation {i}, layer {l}"
                );
                assert!(
                    !tr.exec[i * t + c.len()..(i + 1) * t].iter().any(|e| *e),
                    "padding executed"
                );
            }
        }
    }
    let e = m.select_rows(&cache, &[2]).unwrap_err().to_string();
    assert!(e.contains("row 2 of a cache holding 2 sequences"), "{e}");
}

#[test]
fn shared_prefix_continuations_equal_full_sequences() {
    check_shared_prefix_continuations(&tiny_config(false));
    check_shared_prefix_continuations(&routed(tiny_config(false), SkipKind::Mlp));
    check_shared_prefix_continuations(&routed(tiny_config(false), SkipKind::Layer));
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

/// Chunked prefill equals the one-shot pass — every position's logits within `tol`, identical routing
/// decisions and per-layer cache lengths — for chunk sizes that split the prompt evenly, unevenly and into
/// single tokens; and decoding after a chunked prefill equals full recomputation.
fn check_chunked_prefill(cfg: &ModelConfig, dtype: DType, tol: f64) {
    let m = Model::load(cfg, &random_weights(cfg, 7), dtype, &Device::Cpu).unwrap();
    let seq = ids(72, 2);
    let all = Forward {
        all_logits: true,
        ..Default::default()
    };
    let prompt = Batch::single(&seq[..60], 0);
    let mut one_cache = m.new_cache();
    let one = m
        .forward_chunked(&prompt, Some(&mut one_cache), &all, usize::MAX)
        .unwrap();
    let full = m
        .forward_chunked(&Batch::single(&seq, 0), None, &all, usize::MAX)
        .unwrap();
    for chunk in [1, 7, 16, 59] {
        let mut cache = m.new_cache();
        let got = m.forward_chunked(&prompt, Some(&mut cache), &all, chunk).unwrap();
        let d = max_abs_diff(&got.logits, &one.logits);
        assert!(d < tol, "{dtype:?} chunk {chunk}: logits differ by {d}");
        for (l, (a, b)) in got.trace.iter().zip(&one.trace).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => {
                    assert_eq!(a.exec, b.exec, "chunk {chunk} layer {l}: routing decisions differ");
                    let dz = a
                        .logits
                        .iter()
                        .zip(&b.logits)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        (dz as f64) < tol,
                        "chunk {chunk} layer {l}: router logits differ by {dz}"
                    );
                }
                (None, None) => {}
                _ => panic!("chunk {chunk} layer {l}: routed in one pass only"),
            }
        }
        assert_eq!(cache.lengths(0), one_cache.lengths(0), "chunk {chunk}");
        // Only the last position's logits, when that is all that is asked for.
        let last = m.forward_chunked(&prompt, None, &Forward::default(), chunk).unwrap();
        assert_eq!(last.logits.dims3().unwrap().1, 1);
        assert!(max_abs_diff(&last.logits, &one.logits.narrow(1, 59, 1).unwrap()) < tol);
        for (i, &tok) in seq.iter().enumerate().skip(60) {
            let out = m
                .forward(
                    &Batch::next_tokens(&[tok], &[i as u32]),
                    Some(&mut cache),
                    &Forward::default(),
                )
                .unwrap();
            let d = max_abs_diff(&out.logits, &full.logits.narrow(1, i, 1).unwrap());
            assert!(
                d < tol,
                "{dtype:?} chunk {chunk} position {i}: decode differs from recomputation by {d}"
            );
            for (l, tr) in out.trace.iter().enumerate() {
                if let (Some(tr), Some(ftr)) = (tr, &full.trace[l]) {
                    assert_eq!(tr.exec[0], ftr.exec[i], "chunk {chunk} layer {l} position {i}");
                }
            }
        }
    }
    // The routers of the routed configs make real decisions here (neither all nor none execute).
    for tr in one.trace.iter().flatten() {
        let n = tr.exec.iter().filter(|e| **e).count();
        assert!(n > 0 && n < 60, "degenerate routing: {n} of 60 execute");
    }
}

#[test]
fn chunked_prefill_equals_one_shot_dense() {
    for cfg in [tiny_config(false), tiny_config(true)] {
        check_chunked_prefill(&cfg, DType::F32, 1e-4);
        check_chunked_prefill(&cfg, DType::F64, 1e-10);
    }
}

#[test]
fn chunked_prefill_equals_one_shot_mlp_skip() {
    let cfg = routed(tiny_config(false), SkipKind::Mlp);
    check_chunked_prefill(&cfg, DType::F32, 1e-4);
    check_chunked_prefill(&cfg, DType::F64, 1e-10);
}

#[test]
fn chunked_prefill_equals_one_shot_layer_skip() {
    let cfg = routed(tiny_config(false), SkipKind::Layer);
    check_chunked_prefill(&cfg, DType::F32, 1e-4);
    check_chunked_prefill(&cfg, DType::F64, 1e-10);
}

/// A left-padded batch prefilled in chunks gives each sequence's real tokens the one-shot logits and routing,
/// and batched decode continues from it as from the one-shot cache.
#[test]
fn chunked_prefill_of_a_padded_batch() {
    for cfg in [
        tiny_config(true),
        routed(tiny_config(false), SkipKind::Mlp),
        routed(tiny_config(false), SkipKind::Layer),
    ] {
        let m = Model::load(&cfg, &random_weights(&cfg, 13), DType::F32, &Device::Cpu).unwrap();
        let batch = Batch::left_padded(&[ids(50, 1), ids(23, 2)], 0);
        let all = Forward {
            all_logits: true,
            ..Default::default()
        };
        let (mut c1, mut c2) = (m.new_cache(), m.new_cache());
        let one = m.forward_chunked(&batch, Some(&mut c1), &all, usize::MAX).unwrap();
        let got = m.forward_chunked(&batch, Some(&mut c2), &all, 16).unwrap();
        for (bi, pad) in [(0, 0), (1, 27)] {
            let a = got.logits.get(bi).unwrap().narrow(0, pad, 50 - pad).unwrap();
            let b = one.logits.get(bi).unwrap().narrow(0, pad, 50 - pad).unwrap();
            let d = max_abs_diff(&a, &b);
            assert!(d < 1e-4, "sequence {bi}: logits differ by {d}");
            for (l, (x, y)) in got.trace.iter().zip(&one.trace).enumerate() {
                if let (Some(x), Some(y)) = (x, y) {
                    let r = bi * 50 + pad..(bi + 1) * 50;
                    assert_eq!(x.exec[r.clone()], y.exec[r], "sequence {bi} layer {l}");
                }
            }
        }
        let step = Batch::next_tokens(&[5, 6], &[50, 23]);
        let a = m.forward(&step, Some(&mut c1), &Forward::default()).unwrap();
        let b = m.forward(&step, Some(&mut c2), &Forward::default()).unwrap();
        let d = max_abs_diff(&a.logits, &b.logits);
        assert!(d < 1e-4, "decode after chunked prefill differs by {d}");
    }
}

/// On SmolLM2-135M, a prompt of more than one [`PREFILL_CHUNK`] gives the one-shot logits (within f32
/// summation-order noise) and the same greedy continuation.
#[test]
fn smollm2_long_prompt_chunked_equals_one_shot() {
    use crate::generate::{GenerateParams, Generator};
    use crate::testing::{smollm2_gguf, CALIB_TEXT};
    let Some(gguf) = smollm2_gguf() else { return };
    let ckpt = crate::checkpoint::Checkpoint::open(&gguf).unwrap();
    let m = Model::load(&ckpt.config, &ckpt.weights, DType::F32, &Device::Cpu).unwrap();
    let tok = ckpt.tokenizer.as_ref().expect("the GGUF has a tokenizer");
    let text = tok.encode(CALIB_TEXT, false).unwrap();
    let prompt: Vec<u32> = text.iter().copied().cycle().take(PREFILL_CHUNK + 200).collect();
    let batch = Batch::single(&prompt, 0);
    let mut cache = m.new_cache();
    let one = m
        .forward_chunked(&batch, Some(&mut cache), &Forward::default(), usize::MAX)
        .unwrap();
    let chunked = m.forward(&batch, None, &Forward::default()).unwrap();
    let d = max_abs_diff(&chunked.logits, &one.logits);
    assert!(d < 2e-3, "last-position logits differ by {d}");
    // Greedy continuation: one-shot prefill then decode, against the generator (which prefills in chunks).
    let mut want = vec![crate::generate::argmax(
        &one.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    )];
    for i in 0..7 {
        let pos = (prompt.len() + i) as u32;
        let out = m
            .forward(
                &Batch::next_tokens(&want[i..i + 1], &[pos]),
                Some(&mut cache),
                &Forward::default(),
            )
            .unwrap();
        want.push(crate::generate::argmax(
            &out.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ));
    }
    let params = GenerateParams {
        max_tokens: 8,
        ..Default::default()
    };
    let got = Generator::new(&m, params)
        .unwrap()
        .generate(&prompt, |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(got.tokens, want);
}

/// An f16 KV cache holds K/V rounded to f16 and widens them back for attention: cached decoding stays within
/// f16 rounding of an f32 cache (and the cache's buffers are f16).
#[test]
fn f16_kv_cache_decodes_within_rounding() {
    let cfg = routed(tiny_config(false), SkipKind::Mlp);
    let w = random_weights(&cfg, 7);
    let opts = crate::RuntimeOptions {
        kv_dtype: Some(DType::F16),
        ..Default::default()
    };
    let m16 = Model::load_opts(&cfg, &w, &opts).unwrap();
    let m32 = Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
    let seq = ids(10, 2);
    let fwd = Forward {
        routing: Routing::Force(true),
        ..Default::default()
    };
    let (mut c16, mut c32) = (m16.new_cache(), m32.new_cache());
    m16.forward(&Batch::single(&seq[..6], 0), Some(&mut c16), &fwd).unwrap();
    m32.forward(&Batch::single(&seq[..6], 0), Some(&mut c32), &fwd).unwrap();
    assert_eq!(c16.layers[0].storage_dtype(), Some(DType::F16));
    for (i, &tok) in seq.iter().enumerate().skip(6) {
        let step = Batch::next_tokens(&[tok], &[i as u32]);
        let a = m16.forward(&step, Some(&mut c16), &fwd).unwrap().logits;
        let b = m32.forward(&step, Some(&mut c32), &fwd).unwrap().logits;
        let d = max_abs_diff(&a, &b);
        assert!(d > 0.0 && d < 1e-2, "position {i}: {d}");
    }
}
