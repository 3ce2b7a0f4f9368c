//! Generation through the C API agrees with the runtime's own generation loop (what `dlo-run` runs), and
//! the counters (logits, execution rates, FLOPs) agree with the runtime's.

use crate::misuse::zero_stats;
use crate::support::tiny::Tiny;
use crate::support::*;
use candle_core::{DType, Device};
use dlo::dlo_status::*;
use dlo::*;
use dlo_runtime::chat::Message;
use dlo_runtime::generate::{GenerateParams, Generation, Generator, SamplingParams};
use dlo_runtime::model::Routing;
use dlo_runtime::testing::smollm2_gguf;
use dlo_runtime::{flops, Checkpoint, Model};
use std::ops::ControlFlow;
use std::path::Path;
use std::ptr::null;

/// The runtime's generation with the settings `dlo-run` would use; returns the result and last logits.
pub fn reference(
    path: &Path,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
    routing: Routing,
) -> (Generation, Vec<f32>) {
    let ck = Checkpoint::open(path).unwrap();
    let m = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
    let params = GenerateParams {
        max_tokens,
        stop_tokens: ck.config.eos_token_ids.clone(),
        sampling,
        routing,
    };
    let mut g = Generator::new(&m, params).unwrap();
    let out = g.generate(prompt, |_| ControlFlow::Continue(())).unwrap();
    let logits = g.last_logits().unwrap().to_vec1::<f32>().unwrap();
    (out, logits)
}

fn rates(s: *mut dlo_session) -> Vec<f32> {
    let mut n = 0;
    expect(
        unsafe { dlo_session_layer_rates(s, std::ptr::null_mut(), 0, &mut n) },
        DLO_ERR_BUFFER_TOO_SMALL,
    );
    let mut v = vec![0f32; n];
    expect(unsafe { dlo_session_layer_rates(s, v.as_mut_ptr(), n, &mut n) }, DLO_OK);
    v
}

fn stats(s: *mut dlo_session) -> dlo_stats {
    let mut st = zero_stats();
    expect(unsafe { dlo_session_stats(s, &mut st) }, DLO_OK);
    st
}

#[test]
fn generation_logits_and_counters_match_the_runtime() {
    for layer_skip in [false, true] {
        let (_d, path) = tiny_checkpoint(Tiny {
            layer_skip,
            seed: 3,
            ..Default::default()
        });
        let e = load(&path);
        let prompt = [5i32, 17, 33, 2, 61, 9, 40, 88];
        let prompt_u: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
        let (want, want_logits) = reference(&path, &prompt_u, 20, SamplingParams::default(), Routing::Reference);
        let want_tokens: Vec<i32> = want.tokens.iter().map(|&t| t as i32).collect();

        // Greedy on the process-wide pool and on a private 2-thread pool.
        for threads in [0, 2] {
            let s = session(e, |p| {
                p.max_tokens = 20;
                p.n_threads = threads;
            });
            // Before any generation: zero counters, routed layers at 0, dense layers at -1.
            let st = stats(s);
            assert_eq!((st.n_generated, st.flops), (0, 0));
            assert_eq!(rates(s), vec![-1.0, 0.0, 0.0]);

            let (col, res) = generate(s, &prompt, None);
            assert_eq!(col.tokens, want_tokens, "layer_skip={layer_skip} threads={threads}");
            assert!(col.nul_terminated && col.text.is_empty(), "no tokenizer: empty pieces");
            assert_eq!(res.n_prompt_tokens, 8);
            assert_eq!(res.n_generated, want.tokens.len());
            let (mut lp, mut nv) = (null(), 0usize);
            expect(unsafe { dlo_session_last_logits(s, &mut lp, &mut nv) }, DLO_OK);
            let logits = unsafe { std::slice::from_raw_parts(lp, nv) };
            assert_eq!(logits, &want_logits[..]);

            let cfg = Checkpoint::open(&path).unwrap().config;
            let st = stats(s);
            let f = flops::of_generation(&cfg, &want);
            assert_eq!((st.n_prompt_tokens, st.n_generated), (8, want.tokens.len()));
            assert_eq!(st.n_decode_steps as u64, want.decode_steps() as u64);
            assert_eq!(st.flops, f.total());
            assert_eq!(
                [
                    st.flops_projections,
                    st.flops_attention,
                    st.flops_mlp,
                    st.flops_routers,
                    st.flops_lm_head
                ],
                [f.projections, f.attention, f.mlp, f.routers, f.lm_head]
            );
            assert_eq!(st.flops_dense, flops::of_generation_dense(&cfg, &want).total());
            assert!(st.flops < st.flops_dense, "random routers skip something");
            assert!((st.mean_exec_rate - want.routing.mean_rate()).abs() < 1e-12);
            let want_rates: Vec<f32> = want
                .routing
                .rates()
                .iter()
                .map(|r| r.map_or(-1.0, |r| r as f32))
                .collect();
            assert_eq!(rates(s), want_rates);
            assert!(want_rates[1] > 0.0 && want_rates[1] < 1.0, "{want_rates:?}");
            let mut s = s;
            expect(unsafe { dlo_session_free(&mut s) }, DLO_OK);
        }

        // Forcing every routed unit on: rates 1, FLOPs equal the dense count, tokens as the runtime's.
        let s = session(e, |p| {
            p.max_tokens = 6;
            p.force_routing = 1;
        });
        let (col, _) = generate(s, &prompt, None);
        let (forced, _) = reference(&path, &prompt_u, 6, SamplingParams::default(), Routing::Force(true));
        assert_eq!(col.tokens, forced.tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
        assert_eq!(rates(s), vec![-1.0, 1.0, 1.0]);
        let st = stats(s);
        assert_eq!(st.flops, st.flops_dense);
        assert_eq!(st.mean_exec_rate, 1.0);
        free(s, e);
    }
}

#[test]
fn sampling_is_seeded_and_matches_the_runtime() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let e = load(&path);
    let prompt = [9i32, 8, 7];
    let sampling = SamplingParams {
        temperature: 1.3,
        top_k: 20,
        top_p: 0.95,
        seed: 7,
    };
    let (want, _) = reference(&path, &[9, 8, 7], 24, sampling.clone(), Routing::Reference);
    let mk = |seed| {
        session(e, |p| {
            p.max_tokens = 24;
            p.temperature = 1.3;
            p.top_k = 20;
            p.top_p = 0.95;
            p.seed = seed;
        })
    };
    let s1 = mk(7);
    let (a, _) = generate(s1, &prompt, None);
    let s2 = mk(7);
    let (b, _) = generate(s2, &prompt, None);
    // The same session again restarts from an empty cache and a freshly seeded sampler.
    let (b2, _) = generate(s2, &prompt, None);
    assert_eq!(a.tokens, want.tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
    assert_eq!(a, b);
    assert_eq!(b, b2);
    let s3 = mk(8);
    let (c3, _) = generate(s3, &prompt, None);
    assert_ne!(a.tokens, c3.tokens, "another seed should sample differently");
    for mut s in [s1, s2] {
        expect(unsafe { dlo_session_free(&mut s) }, DLO_OK);
    }
    free(s3, e);
}

#[test]
fn text_functions_on_smollm2_gguf() {
    let Some(gguf) = smollm2_gguf() else { return };
    let ck = Checkpoint::open(&gguf).unwrap();
    let tok = ck.tokenizer.as_ref().unwrap();
    let e = load(&gguf);
    let text = c("Hello, wörld! 1 2 3");
    let want = tok.encode("Hello, wörld! 1 2 3", true).unwrap();
    let mut n = 0usize;
    unsafe {
        // Size query, too small a buffer, then the real call.
        expect(
            dlo_tokenize(e, text.as_ptr(), 1, std::ptr::null_mut(), 0, &mut n),
            DLO_ERR_BUFFER_TOO_SMALL,
        );
        assert_eq!(n, want.len());
        let mut ids = vec![-1i32; want.len()];
        expect(
            dlo_tokenize(e, text.as_ptr(), 1, ids.as_mut_ptr(), 2, &mut n),
            DLO_ERR_BUFFER_TOO_SMALL,
        );
        assert!(ids.iter().all(|&t| t == -1), "nothing written when the buffer is short");
        expect(
            dlo_tokenize(e, text.as_ptr(), 1, ids.as_mut_ptr(), ids.len(), &mut n),
            DLO_OK,
        );
        assert_eq!(ids, want.iter().map(|&t| t as i32).collect::<Vec<_>>());

        let want_text = tok.decode(&want, true).unwrap();
        expect(
            dlo_detokenize(e, ids.as_ptr(), ids.len(), 1, std::ptr::null_mut(), 0, &mut n),
            DLO_ERR_BUFFER_TOO_SMALL,
        );
        assert_eq!(n, want_text.len());
        let mut buf = vec![0x7f as std::ffi::c_char; n]; // one byte short of the NUL
        expect(
            dlo_detokenize(e, ids.as_ptr(), ids.len(), 1, buf.as_mut_ptr(), n, &mut n),
            DLO_ERR_BUFFER_TOO_SMALL,
        );
        buf.push(0x7f);
        expect(
            dlo_detokenize(e, ids.as_ptr(), ids.len(), 1, buf.as_mut_ptr(), n + 1, &mut n),
            DLO_OK,
        );
        let got = std::ffi::CStr::from_ptr(buf.as_ptr()).to_str().unwrap();
        assert_eq!(got, want_text);
        assert_eq!(got, "Hello, wörld! 1 2 3");

        // The GGUF runs in its own blocks: the storage kinds and the bytes a decode step reads.
        expect(
            dlo_engine_weights(e, std::ptr::null_mut(), 0, &mut n),
            DLO_ERR_BUFFER_TOO_SMALL,
        );
        let mut buf = vec![0 as std::ffi::c_char; n + 1];
        expect(dlo_engine_weights(e, buf.as_mut_ptr(), n + 1, &mut n), DLO_OK);
        let weights = std::ffi::CStr::from_ptr(buf.as_ptr()).to_str().unwrap().to_string();
        let lines: Vec<Vec<&str>> = weights.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 3, "{weights}");
        assert_eq!((lines[0][0], lines[0][1]), ("q4_1", "210"), "{weights}");
        assert_eq!((lines[1][0], lines[1][1]), ("q8_0", "1"), "{weights}");
        assert_eq!(lines[2][0], "bytes_per_token");
        let per_token: u64 = lines[2][1].parse().unwrap();
        let stored: u64 = lines[..2].iter().map(|l| l[2].parse::<u64>().unwrap()).sum();
        assert_eq!(
            per_token, stored,
            "a tied model reads every projection and the embedding table per token"
        );

        let sys = c("system");
        let user = c("user");
        let (m1, m2) = (c("Be brief."), c("Capital of France?"));
        let msgs = [
            dlo_chat_message {
                role: sys.as_ptr(),
                content: m1.as_ptr(),
            },
            dlo_chat_message {
                role: user.as_ptr(),
                content: m2.as_ptr(),
            },
        ];
        let want_chat = tok
            .chat_template
            .as_ref()
            .unwrap()
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Capital of France?"),
                ],
                true,
            )
            .unwrap();
        expect(
            dlo_chat_render(e, msgs.as_ptr(), 2, 1, std::ptr::null_mut(), 0, &mut n),
            DLO_ERR_BUFFER_TOO_SMALL,
        );
        let mut buf = vec![0 as std::ffi::c_char; n + 1];
        expect(
            dlo_chat_render(e, msgs.as_ptr(), 2, 1, buf.as_mut_ptr(), n + 1, &mut n),
            DLO_OK,
        );
        assert_eq!(std::ffi::CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), want_chat);
        // Only the roles the header lists.
        for bad in ["tool", "User", ""] {
            let role = c(bad);
            let m = [dlo_chat_message {
                role: role.as_ptr(),
                content: m2.as_ptr(),
            }];
            expect(
                dlo_chat_render(e, m.as_ptr(), 1, 1, buf.as_mut_ptr(), n + 1, &mut n),
                DLO_ERR_INVALID_ARG,
            );
            let err = last_error();
            assert!(
                err.contains(&format!(
                    "messages[0].role is `{bad}`, not one of system, user, assistant"
                )),
                "{err}"
            );
        }
    }
    // dlo_generate_text with the chat template = dlo_generate on the rendered, encoded prompt.
    let s = session(e, |p| p.max_tokens = 8);
    let q = c("Capital of France?");
    let mut col = Collected::default();
    let mut res = new_result();
    expect(
        unsafe {
            dlo_generate_text(
                s,
                q.as_ptr(),
                1,
                Some(collect),
                &mut col as *mut Collected as *mut _,
                &mut res,
            )
        },
        DLO_OK,
    );
    let rendered = tok
        .chat_template
        .as_ref()
        .unwrap()
        .render(&[Message::new("user", "Capital of France?")], true)
        .unwrap();
    let ids: Vec<i32> = tok
        .encode(&rendered, false)
        .unwrap()
        .iter()
        .map(|&t| t as i32)
        .collect();
    assert_eq!(res.n_prompt_tokens, ids.len());
    let (col2, _) = generate(s, &ids, None);
    assert_eq!(col.tokens, col2.tokens);
    let toks: Vec<u32> = col.tokens.iter().map(|&t| t as u32).collect();
    assert_eq!(
        String::from_utf8(col.text).unwrap(),
        tok.decode(&toks, true).unwrap().trim_end_matches('\u{fffd}')
    );
    free(s, e);
}
