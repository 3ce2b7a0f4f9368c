//! Misuse of the C API: NULL pointers, freed and foreign handles, invalid UTF-8, files that are not models,
//! bad parameters, callbacks that stop, prompts past the context. Each returns a status and a readable
//! message; none crashes.

use crate::support::tiny::{Tiny, VOCAB};
use crate::support::*;
use dlo::dlo_status::*;
use dlo::*;
use std::ffi::{c_char, c_int, c_void};
use std::ptr::{null, null_mut};

/// Asserts `s == DLO_ERR_NULL_ARG` and that the message names `func` and `arg`.
#[track_caller]
fn null_arg(s: dlo_status, func: &str, arg: &str) {
    expect(s, DLO_ERR_NULL_ARG);
    let m = last_error();
    assert!(m.contains(func) && m.contains(&format!("`{arg}`")), "{m}");
}

#[test]
fn null_pointers_are_rejected_for_every_parameter() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let e = load(&path);
    let s = session(e, |p| p.max_tokens = 5);
    let cpath = c(path.to_str().unwrap());
    let ep = dlo_engine_default_params();
    let sp = dlo_session_default_params();
    let text = c("hello");
    let ids = [3i32, 4];
    let mut n = 0usize;
    let mut buf = [0 as c_char; 8];
    let mut out_ids = [0i32; 8];
    let mut res = new_result();
    let mut e2 = null_mut();
    let mut s2 = null_mut();
    let mut info = dlo_engine_default_info();
    let mut stats = zero_stats();
    let mut rates = [0f32; 8];
    let mut logits: *const f32 = null();
    unsafe {
        null_arg(dlo_engine_load(null(), &ep, &mut e2), "dlo_engine_load", "path");
        null_arg(
            dlo_engine_load(cpath.as_ptr(), null(), &mut e2),
            "dlo_engine_load",
            "params",
        );
        null_arg(
            dlo_engine_load(cpath.as_ptr(), &ep, null_mut()),
            "dlo_engine_load",
            "out",
        );
        null_arg(dlo_engine_free(null_mut()), "dlo_engine_free", "engine");
        null_arg(dlo_engine_get_info(null(), &mut info), "dlo_engine_get_info", "engine");
        null_arg(dlo_engine_get_info(e, null_mut()), "dlo_engine_get_info", "out");

        null_arg(
            dlo_tokenize(null(), text.as_ptr(), 1, out_ids.as_mut_ptr(), 8, &mut n),
            "dlo_tokenize",
            "engine",
        );
        null_arg(
            dlo_tokenize(e, null(), 1, out_ids.as_mut_ptr(), 8, &mut n),
            "dlo_tokenize",
            "text",
        );
        null_arg(
            dlo_tokenize(e, text.as_ptr(), 1, null_mut(), 8, &mut n),
            "dlo_tokenize",
            "out",
        );
        null_arg(
            dlo_tokenize(e, text.as_ptr(), 1, out_ids.as_mut_ptr(), 8, null_mut()),
            "dlo_tokenize",
            "n_out",
        );

        let d = "dlo_detokenize";
        null_arg(
            dlo_detokenize(null(), ids.as_ptr(), 2, 1, buf.as_mut_ptr(), 8, &mut n),
            d,
            "engine",
        );
        null_arg(dlo_detokenize(e, null(), 2, 1, buf.as_mut_ptr(), 8, &mut n), d, "ids");
        null_arg(dlo_detokenize(e, ids.as_ptr(), 2, 1, null_mut(), 8, &mut n), d, "buf");
        null_arg(
            dlo_detokenize(e, ids.as_ptr(), 2, 1, buf.as_mut_ptr(), 8, null_mut()),
            d,
            "n_out",
        );

        let w = "dlo_engine_weights";
        null_arg(dlo_engine_weights(null(), buf.as_mut_ptr(), 8, &mut n), w, "engine");
        null_arg(dlo_engine_weights(e, null_mut(), 8, &mut n), w, "buf");
        null_arg(dlo_engine_weights(e, buf.as_mut_ptr(), 8, null_mut()), w, "n_out");

        let r = "dlo_chat_render";
        let user = c("user");
        let ok = dlo_chat_message {
            role: user.as_ptr(),
            content: text.as_ptr(),
        };
        let no_role = dlo_chat_message { role: null(), ..ok };
        let no_content = dlo_chat_message { content: null(), ..ok };
        null_arg(
            dlo_chat_render(null(), &ok, 1, 1, buf.as_mut_ptr(), 8, &mut n),
            r,
            "engine",
        );
        null_arg(
            dlo_chat_render(e, null(), 1, 1, buf.as_mut_ptr(), 8, &mut n),
            r,
            "messages",
        );
        null_arg(
            dlo_chat_render(e, &no_role, 1, 1, buf.as_mut_ptr(), 8, &mut n),
            r,
            "messages[0].role",
        );
        null_arg(
            dlo_chat_render(e, &no_content, 1, 1, buf.as_mut_ptr(), 8, &mut n),
            r,
            "messages[0].content",
        );
        null_arg(dlo_chat_render(e, &ok, 1, 1, null_mut(), 8, &mut n), r, "buf");
        null_arg(
            dlo_chat_render(e, &ok, 1, 1, buf.as_mut_ptr(), 8, null_mut()),
            r,
            "n_out",
        );

        null_arg(dlo_session_new(null(), &sp, &mut s2), "dlo_session_new", "engine");
        null_arg(dlo_session_new(e, null(), &mut s2), "dlo_session_new", "params");
        null_arg(dlo_session_new(e, &sp, null_mut()), "dlo_session_new", "out");
        null_arg(dlo_session_free(null_mut()), "dlo_session_free", "session");

        let g = "dlo_generate";
        null_arg(
            dlo_generate(null_mut(), ids.as_ptr(), 2, None, null_mut(), &mut res),
            g,
            "session",
        );
        null_arg(dlo_generate(s, null(), 2, None, null_mut(), &mut res), g, "prompt");
        null_arg(
            dlo_generate(s, ids.as_ptr(), 2, None, null_mut(), null_mut()),
            g,
            "result",
        );
        let g = "dlo_generate_text";
        null_arg(
            dlo_generate_text(null_mut(), text.as_ptr(), 0, None, null_mut(), &mut res),
            g,
            "session",
        );
        null_arg(dlo_generate_text(s, null(), 0, None, null_mut(), &mut res), g, "prompt");
        null_arg(
            dlo_generate_text(s, text.as_ptr(), 0, None, null_mut(), null_mut()),
            g,
            "result",
        );

        let l = "dlo_session_last_logits";
        null_arg(dlo_session_last_logits(null_mut(), &mut logits, &mut n), l, "session");
        null_arg(dlo_session_last_logits(s, null_mut(), &mut n), l, "logits");
        null_arg(dlo_session_last_logits(s, &mut logits, null_mut()), l, "n_vocab");
        null_arg(
            dlo_session_stats(null_mut(), &mut stats),
            "dlo_session_stats",
            "session",
        );
        null_arg(dlo_session_stats(s, null_mut()), "dlo_session_stats", "out");
        let l = "dlo_session_layer_rates";
        null_arg(
            dlo_session_layer_rates(null_mut(), rates.as_mut_ptr(), 8, &mut n),
            l,
            "session",
        );
        null_arg(dlo_session_layer_rates(s, null_mut(), 8, &mut n), l, "out");
        null_arg(
            dlo_session_layer_rates(s, rates.as_mut_ptr(), 8, null_mut()),
            l,
            "n_out",
        );
    }
    // NULL is allowed where the header says so: a callback, user_data, and `ptr = NULL, cap = 0` size queries.
    let (col, r) = generate(s, &ids, Some(1));
    assert_eq!(
        (col.tokens.len(), r.stop_reason),
        (1, dlo_stop_reason::DLO_STOP_CALLBACK)
    );
    let mut res = new_result();
    expect(
        unsafe { dlo_generate(s, ids.as_ptr(), 2, None, null_mut(), &mut res) },
        DLO_OK,
    );
    assert_eq!(res.stop_reason, dlo_stop_reason::DLO_STOP_MAX_TOKENS);
    expect(
        unsafe { dlo_session_layer_rates(s, null_mut(), 0, &mut n) },
        DLO_ERR_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, 3);
    free(s, e);
}

pub fn dlo_engine_default_info() -> dlo_engine_info {
    dlo_engine_info {
        struct_size: std::mem::size_of::<dlo_engine_info>(),
        n_vocab: 0,
        n_ctx: 0,
        n_layers: 0,
        n_routed_layers: 0,
        has_tokenizer: -7,
        has_chat_template: -7,
        bos_token: -7,
        eos_token: -7,
    }
}

pub fn zero_stats() -> dlo_stats {
    dlo_stats {
        struct_size: std::mem::size_of::<dlo_stats>(),
        n_prompt_tokens: 0,
        n_generated: 0,
        n_decode_steps: 0,
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        mean_exec_rate: 0.0,
        flops: 0,
        flops_dense: 0,
        flops_projections: 0,
        flops_attention: 0,
        flops_mlp: 0,
        flops_routers: 0,
        flops_lm_head: 0,
    }
}

#[test]
fn freed_and_foreign_handles_are_rejected() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let mut e = load(&path);
    let mut s = session(e, |_| {});
    let mut info = dlo_engine_default_info();
    expect(unsafe { dlo_engine_get_info(e, &mut info) }, DLO_OK);
    assert_eq!((info.n_vocab, info.n_layers, info.n_routed_layers), (VOCAB, 3, 2));
    assert_eq!((info.has_tokenizer, info.bos_token, info.eos_token), (0, 1, 2));

    // A handle of the wrong kind.
    let wrong = s as *const dlo_engine;
    expect(unsafe { dlo_engine_get_info(wrong, &mut info) }, DLO_ERR_INVALID_HANDLE);
    assert!(
        last_error().contains("is a dlo_session, not a dlo_engine"),
        "{}",
        last_error()
    );
    // A pointer to some unrelated memory.
    let mut junk = [0x5au8; 64];
    let foreign = junk.as_mut_ptr() as *mut dlo_session;
    let mut res = new_result();
    let ids = [5i32, 6, 7];
    expect(
        unsafe { dlo_generate(foreign, ids.as_ptr(), 3, None, null_mut(), &mut res) },
        DLO_ERR_INVALID_HANDLE,
    );
    assert!(last_error().contains("not a live dlo_session"), "{}", last_error());
    let mut f = foreign;
    expect(unsafe { dlo_session_free(&mut f) }, DLO_ERR_INVALID_HANDLE);
    assert_eq!(f, foreign, "a rejected free leaves the variable alone");
    assert!(junk.iter().all(|&b| b == 0x5a), "foreign memory must not be touched");

    // Freeing the engine first: the session keeps the model alive.
    let copy = e;
    expect(unsafe { dlo_engine_free(&mut e) }, DLO_OK);
    assert!(e.is_null());
    expect(unsafe { dlo_engine_free(&mut e) }, DLO_OK); // *engine == NULL: a no-op
    let mut again = copy;
    expect(unsafe { dlo_engine_free(&mut again) }, DLO_ERR_INVALID_HANDLE); // double free through a copy
    assert!(last_error().contains("already freed"), "{}", last_error());
    expect(unsafe { dlo_engine_get_info(copy, &mut info) }, DLO_ERR_INVALID_HANDLE);
    let mut s2 = null_mut();
    let sp = dlo_session_default_params();
    expect(unsafe { dlo_session_new(copy, &sp, &mut s2) }, DLO_ERR_INVALID_HANDLE);
    assert!(s2.is_null());
    let (col, _) = generate(s, &ids, Some(4));
    assert_eq!(col.tokens.len(), 4);

    let stale = s;
    expect(unsafe { dlo_session_free(&mut s) }, DLO_OK);
    let mut n = 0;
    expect(
        unsafe { dlo_session_layer_rates(stale, null_mut(), 0, &mut n) },
        DLO_ERR_INVALID_HANDLE,
    );
    expect(
        unsafe { dlo_generate(stale, ids.as_ptr(), 3, None, null_mut(), &mut res) },
        DLO_ERR_INVALID_HANDLE,
    );
    let mut again = stale;
    expect(unsafe { dlo_session_free(&mut again) }, DLO_ERR_INVALID_HANDLE);
}

#[test]
fn invalid_utf8_is_rejected() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let e = load(&path);
    let s = session(e, |_| {});
    let bad = b"caf\xc3(\0";
    let bad = bad.as_ptr() as *const c_char;
    let mut res = new_result();
    let mut n = 0;
    let mut ids = [0i32; 8];
    let mut buf = [0 as c_char; 64];
    unsafe {
        expect(dlo_generate_text(s, bad, 0, None, null_mut(), &mut res), DLO_ERR_UTF8);
        assert!(last_error().contains("`prompt` is not valid UTF-8"), "{}", last_error());
        assert!(last_error().contains("offset 3"), "{}", last_error());
        expect(dlo_tokenize(e, bad, 1, ids.as_mut_ptr(), 8, &mut n), DLO_ERR_UTF8);
        let user = c("user");
        let m = dlo_chat_message {
            role: user.as_ptr(),
            content: bad,
        };
        expect(dlo_chat_render(e, &m, 1, 1, buf.as_mut_ptr(), 64, &mut n), DLO_ERR_UTF8);
        assert!(last_error().contains("messages[0].content"), "{}", last_error());
        // Valid UTF-8 on a model without a tokenizer: a clear error, not a crash.
        let ok = c("café");
        expect(
            dlo_generate_text(s, ok.as_ptr(), 0, None, null_mut(), &mut res),
            DLO_ERR_NO_TOKENIZER,
        );
        assert!(last_error().contains("no tokenizer"), "{}", last_error());
        expect(
            dlo_tokenize(e, ok.as_ptr(), 1, ids.as_mut_ptr(), 8, &mut n),
            DLO_ERR_NO_TOKENIZER,
        );
    }
    free(s, e);
}

#[test]
fn files_that_are_not_models_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a model\n").unwrap();
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let bare_dir = dir.path().join("bare");
    std::fs::create_dir(&bare_dir).unwrap();
    // A checkpoint whose weights file is cut short.
    let (_t, tiny) = tiny_checkpoint(Tiny::default());
    let st = tiny.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let missing = dir.path().join("does-not-exist.gguf");
    let p = dlo_engine_default_params();
    for (path, want) in [
        (&text, DLO_ERR_FORMAT),
        (&empty, DLO_ERR_FORMAT),
        (&bare_dir, DLO_ERR_FORMAT),
        (&tiny, DLO_ERR_FORMAT),
        (&missing, DLO_ERR_IO),
    ] {
        let cpath = c(path.to_str().unwrap());
        let mut e = 0x10 as *mut dlo_engine; // must be overwritten with NULL on failure
        let s = unsafe { dlo_engine_load(cpath.as_ptr(), &p, &mut e) };
        assert_eq!(s, want, "{}: {}", path.display(), last_error());
        assert!(e.is_null());
        let m = last_error();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(m.contains(name), "the message should name the file: {m}");
        assert!(m.len() > name.len() + 10, "the message should say what is wrong: {m}");
    }
}

/// Numbers in a config that used to abort the host (1e9 layers: the list of expected tensors was built
/// before any bound) or give NaN output (rope_theta 0) are clean errors naming the file and the key.
#[test]
fn hostile_config_values_are_format_errors() {
    let p = dlo_engine_default_params();
    for (key, value, want) in [
        (
            "num_hidden_layers",
            serde_json::json!(1_000_000_000u64),
            "larger than the supported maximum",
        ),
        // The routed tiny model's per-layer `is_dlo` list disagrees first.
        ("num_hidden_layers", serde_json::json!(7), "num_hidden_layers is 7"),
        ("rope_theta", serde_json::json!(0.0), "must be positive"),
    ] {
        let (_t, tiny) = tiny_checkpoint(Tiny::default());
        let cfg_path = tiny.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let cpath = c(tiny.to_str().unwrap());
        let mut e = null_mut();
        expect(unsafe { dlo_engine_load(cpath.as_ptr(), &p, &mut e) }, DLO_ERR_FORMAT);
        assert!(e.is_null());
        let m = last_error();
        assert!(m.contains("tiny") && m.contains(want), "{key}: {m}");
    }
}

#[test]
fn bad_parameters_are_rejected() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let cpath = c(path.to_str().unwrap());
    let mut e = null_mut();
    for (edit, needle) in [
        (
            (|p: &mut dlo_engine_params| p.struct_size = 0) as fn(&mut dlo_engine_params),
            "struct_size",
        ),
        (|p| p.dtype = 7, "dtype"),
        (|p| p.n_threads = -2, "n_threads"),
        (|p| p.budget = 1.5, "budget"),
        (|p| p.budget = 0.5, "needs an engine"),
    ] {
        let mut p = dlo_engine_default_params();
        edit(&mut p);
        expect(
            unsafe { dlo_engine_load(cpath.as_ptr(), &p, &mut e) },
            DLO_ERR_INVALID_ARG,
        );
        assert!(last_error().contains(needle), "{needle}: {}", last_error());
    }
    let e = load(&path);
    let mut s = null_mut();
    for (edit, needle) in [
        (
            (|p: &mut dlo_session_params| p.struct_size = 8) as fn(&mut dlo_session_params),
            "struct_size",
        ),
        (|p| p.n_threads = -1, "n_threads"),
        (|p| p.max_tokens = -1, "max_tokens"),
        (|p| p.top_k = -1, "top_k"),
        (|p| p.top_p = 0.0, "top-p"),
        (|p| p.temperature = -1.0, "temperature"),
        (|p| p.temperature = f32::NAN, "temperature"),
        (|p| p.force_routing = 2, "force_routing"),
        (|p| p.budget = 0.5, "needs an engine"),
    ] {
        let mut p = dlo_session_default_params();
        edit(&mut p);
        expect(unsafe { dlo_session_new(e, &p, &mut s) }, DLO_ERR_INVALID_ARG);
        assert!(last_error().contains(needle), "{needle}: {}", last_error());
        assert!(s.is_null());
    }
    let s = session(e, |_| {});
    let mut res = new_result();
    unsafe {
        for (ids, needle) in [
            (vec![3, -1, 4], "prompt[1] = -1"),
            (vec![VOCAB as i32], "vocabulary size 97"),
            (vec![], "empty"),
        ] {
            expect(
                dlo_generate(s, ids.as_ptr(), ids.len(), None, null_mut(), &mut res),
                DLO_ERR_INVALID_ARG,
            );
            assert!(last_error().contains(needle), "{needle}: {}", last_error());
        }
        // An output struct whose size was not set.
        let mut res0 = new_result();
        res0.struct_size = 0;
        let ids = [3i32];
        expect(
            dlo_generate(s, ids.as_ptr(), 1, None, null_mut(), &mut res0),
            DLO_ERR_INVALID_ARG,
        );
        assert!(last_error().contains("result->struct_size"), "{}", last_error());
        let mut stats = zero_stats();
        stats.struct_size = 16;
        expect(dlo_session_stats(s, &mut stats), DLO_ERR_INVALID_ARG);
        // Logits before any generation.
        let (mut l, mut n) = (null(), 0);
        expect(dlo_session_last_logits(s, &mut l, &mut n), DLO_ERR_INVALID_ARG);
        assert!(last_error().contains("no logits yet"), "{}", last_error());
    }
    free(s, e);
}

/// 100000 threads used to hang creating them: counts above 4 per CPU are lowered, and generation gives what
/// the default pool gives.
#[test]
fn huge_thread_counts_are_capped_not_refused() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let prompt = [11i32, 22, 33, 44];
    let e = load(&path);
    let s = session(e, |p| p.max_tokens = 6);
    let (want, _) = generate(s, &prompt, None);
    free(s, e);
    let cpath = c(path.to_str().unwrap());
    let mut p = dlo_engine_default_params();
    p.n_threads = 100_000;
    let mut e = null_mut();
    let t0 = std::time::Instant::now();
    expect(unsafe { dlo_engine_load(cpath.as_ptr(), &p, &mut e) }, DLO_OK);
    for n in [0, i32::MAX] {
        let s = session(e, |p| {
            p.max_tokens = 6;
            p.n_threads = n;
        });
        let (got, r) = generate(s, &prompt, None);
        assert_eq!((got.tokens, r.n_generated), (want.tokens.clone(), 6));
        expect(unsafe { dlo_session_free(&mut { s }) }, DLO_OK);
    }
    assert!(t0.elapsed().as_secs_f64() < 20.0, "{:?}", t0.elapsed());
    expect(unsafe { dlo_engine_free(&mut e) }, DLO_OK);
}

#[test]
fn a_callback_can_stop_generation() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let e = load(&path);
    let s = session(e, |p| p.max_tokens = 12);
    let prompt = [11i32, 22, 33, 44];
    let (full, r) = generate(s, &prompt, None);
    assert_eq!(
        (r.n_generated, r.stop_reason),
        (12, dlo_stop_reason::DLO_STOP_MAX_TOKENS)
    );
    let (part, r) = generate(s, &prompt, Some(5));
    assert_eq!((r.n_generated, r.stop_reason), (5, dlo_stop_reason::DLO_STOP_CALLBACK));
    assert_eq!(part.tokens, full.tokens[..5]);
    let mut st = zero_stats();
    expect(unsafe { dlo_session_stats(s, &mut st) }, DLO_OK);
    assert_eq!((st.n_prompt_tokens, st.n_generated, st.n_decode_steps), (4, 5, 4));
    free(s, e);
}

#[test]
fn generation_stops_cleanly_at_the_context_length() {
    let (_d, path) = tiny_checkpoint(Tiny {
        ctx: 16,
        ..Default::default()
    });
    let e = load(&path);
    let s = session(e, |p| p.max_tokens = 0); // no limit but the context
    let prompt: Vec<i32> = (0..10).map(|i| 3 + i * 7).collect();
    let (col, r) = generate(s, &prompt, None);
    // Positions 0..16: the prompt fills 10, each fed-back token one more; the last token is not fed back.
    assert_eq!(
        (r.n_generated, r.stop_reason),
        (7, dlo_stop_reason::DLO_STOP_CONTEXT_FULL)
    );
    assert_eq!(col.tokens.len(), 7);
    let full: Vec<i32> = (0..16).map(|i| 3 + i * 5).collect();
    let (_, r) = generate(s, &full, None);
    assert_eq!(
        (r.n_generated, r.stop_reason),
        (1, dlo_stop_reason::DLO_STOP_CONTEXT_FULL)
    );
    let long: Vec<i32> = (0..17).map(|i| 3 + i * 5).collect();
    let mut res = new_result();
    expect(
        unsafe { dlo_generate(s, long.as_ptr(), long.len(), None, null_mut(), &mut res) },
        DLO_ERR_CONTEXT_FULL,
    );
    assert!(
        last_error().contains("17 tokens, more than the context length 16"),
        "{}",
        last_error()
    );
    free(s, e);
}

/// Shared by the two threads of the busy test.
struct Busy {
    entered: std::sync::Barrier,
    checked: std::sync::Barrier,
}

unsafe extern "C" fn wait_in_callback(_t: i32, _p: *const c_char, _n: usize, ud: *mut c_void) -> c_int {
    let b = &*(ud as *const Busy);
    b.entered.wait(); // the other thread may now try the session
    b.checked.wait(); // ... and has tried
    1
}

#[test]
fn a_session_used_from_two_threads_at_once_is_busy() {
    let (_d, path) = tiny_checkpoint(Tiny::default());
    let e = load(&path);
    let s = session(e, |_| {});
    let busy = Busy {
        entered: std::sync::Barrier::new(2),
        checked: std::sync::Barrier::new(2),
    };
    let s_addr = s as usize;
    std::thread::scope(|sc| {
        let b = &busy;
        sc.spawn(move || {
            b.entered.wait();
            let mut st = zero_stats();
            let r = unsafe { dlo_session_stats(s_addr as *mut dlo_session, &mut st) };
            let msg = last_error();
            b.checked.wait();
            assert_eq!(r, DLO_ERR_BUSY, "{msg}");
            assert!(msg.contains("in use by another thread"), "{msg}");
        });
        let ids = [1i32, 2, 3];
        let mut res = new_result();
        let r = unsafe {
            dlo_generate(
                s,
                ids.as_ptr(),
                3,
                Some(wait_in_callback),
                b as *const Busy as *mut c_void,
                &mut res,
            )
        };
        expect(r, DLO_OK);
        assert_eq!(res.stop_reason, dlo_stop_reason::DLO_STOP_CALLBACK);
    });
    free(s, e);
}
