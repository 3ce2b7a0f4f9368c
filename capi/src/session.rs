//! Sessions: generation settings, a per-generation KV cache, streaming generation, logits and counters.

use crate::engine::{check_budget, EngineInner};
use crate::ffi::{c_str, check_out, id_of, read_params, write_out};
use crate::handles;
use crate::status::{dlo_status, guard, Failure, Result};
use dlo_runtime::chat::Message;
use dlo_runtime::generate::{GenerateParams, Generation, Generator, SamplingParams, StopReason};
use dlo_runtime::model::Routing;
use dlo_runtime::options::capped_threads;
use dlo_runtime::{flops, Tokenizer};
use std::ffi::{c_char, c_int, c_void};
use std::ops::ControlFlow;
use std::sync::{mpsc, Arc, Mutex, TryLockError};

/// An opaque handle to a generation session: sampling settings, thread pool, the KV cache of the current
/// generation, the last logits and counters. A session may be used by one thread at a time (a concurrent
/// call returns DLO_ERR_BUSY); use one session per thread. Never dereference it.
pub struct dlo_session {
    _opaque: [u8; 0],
}

/// Session settings. Always start from `dlo_session_default_params()` and change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dlo_session_params {
    /// `sizeof(dlo_session_params)` as the caller was compiled with; set by `dlo_session_default_params()`.
    pub struct_size: usize,
    /// RNG seed; sampling is deterministic for a given seed (default 42).
    pub seed: u64,
    /// Worker threads: 0 (default) = the engine's `n_threads`; n > 0 = a private pool of n threads, at most
    /// 4 per CPU (larger values are lowered to that); < 0 is DLO_ERR_INVALID_ARG.
    pub n_threads: i32,
    /// New tokens per generation at most: 0 = no limit (until an end-of-sequence token, the callback, or the
    /// context length); default 256; < 0 is DLO_ERR_INVALID_ARG.
    pub max_tokens: i32,
    /// Keep only the k most likely tokens when sampling: 0 (default) = no limit; < 0 is DLO_ERR_INVALID_ARG.
    pub top_k: i32,
    /// Routed layers: 0 (default) = follow the routers (see `budget`); 1 = every routed unit executes;
    /// -1 = every routed unit is skipped. Other values are DLO_ERR_INVALID_ARG.
    pub force_routing: i32,
    /// Softmax temperature: 0 (default) = greedy (argmax); must be >= 0 and finite.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 (default) = off.
    pub top_p: f32,
    /// Compute budget, a target mean execution rate of routed layers in (0, 1]: <= 0 (default) = the
    /// engine's routing (see `dlo_engine_params.budget`). Needs an engine file (DLO_ERR_INVALID_ARG with a
    /// checkpoint).
    pub budget: f32,
}

impl Default for dlo_session_params {
    fn default() -> Self {
        dlo_session_params {
            struct_size: std::mem::size_of::<dlo_session_params>(),
            seed: 42,
            n_threads: 0,
            max_tokens: 256,
            top_k: 0,
            force_routing: 0,
            temperature: 0.0,
            top_p: 1.0,
            budget: 0.0,
        }
    }
}

/// Why a generation ended (`dlo_generation_result.stop_reason`).
#[repr(C)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dlo_stop_reason {
    /// No generation has finished (the value before a call).
    DLO_STOP_NONE = 0,
    /// The model produced an end-of-sequence token (not streamed, not counted).
    DLO_STOP_EOS = 1,
    /// `max_tokens` new tokens were produced.
    DLO_STOP_MAX_TOKENS = 2,
    /// The callback returned nonzero (the token it was given counts as generated).
    DLO_STOP_CALLBACK = 3,
    /// Prompt plus generated tokens reached the context length (`dlo_engine_info.n_ctx`). This is a normal
    /// end (DLO_OK); only a prompt that alone exceeds the context is an error (DLO_ERR_CONTEXT_FULL).
    DLO_STOP_CONTEXT_FULL = 4,
}

/// What one generation did. The caller sets `struct_size = sizeof(dlo_generation_result)` before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dlo_generation_result {
    /// Set by the caller to `sizeof(dlo_generation_result)`.
    pub struct_size: usize,
    /// Prompt tokens processed.
    pub n_prompt_tokens: usize,
    /// New tokens produced (each was passed to the callback).
    pub n_generated: usize,
    /// Why generation ended.
    pub stop_reason: dlo_stop_reason,
}

/// Counters of the last generation of a session (all zero before the first one). The caller sets
/// `struct_size = sizeof(dlo_stats)` before the call. FLOPs count executed matmuls as the DLO reference
/// does (2 per multiply-accumulate: projections, attention score and value products, MLPs that ran,
/// routers, lm_head for one position per step; norms and activations are not counted).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dlo_stats {
    /// Set by the caller to `sizeof(dlo_stats)`.
    pub struct_size: usize,
    /// Prompt tokens processed.
    pub n_prompt_tokens: usize,
    /// New tokens produced.
    pub n_generated: usize,
    /// One-token decode steps run after the prefill.
    pub n_decode_steps: usize,
    /// Wall time of the prefill.
    pub prefill_seconds: f64,
    /// Wall time of the decode steps.
    pub decode_seconds: f64,
    /// Mean execution rate over routed layers (1 for a model without routers).
    pub mean_exec_rate: f64,
    /// Executed matmul FLOPs of the whole generation.
    pub flops: u64,
    /// What the same generation would have cost with every routed unit executed.
    pub flops_dense: u64,
    /// Of `flops`: q/k/v/o projections.
    pub flops_projections: u64,
    /// Of `flops`: attention score and value products.
    pub flops_attention: u64,
    /// Of `flops`: MLPs.
    pub flops_mlp: u64,
    /// Of `flops`: routers.
    pub flops_routers: u64,
    /// Of `flops`: lm_head.
    pub flops_lm_head: u64,
}

/// Called once per generated token, on the thread that called `dlo_generate`. `token` is the new id;
/// `piece` is the text this token completes (`piece_len` bytes plus a NUL): the new part of the decoded
/// generation, held back while it ends in an incomplete UTF-8 sequence, so it may be empty; always empty for
/// a model without a tokenizer. `piece` is owned by the library and valid only during the call. Return 0
/// to continue, nonzero to stop. The callback must not unwind or longjmp out, and must not call
/// `dlo_generate` on the same session.
#[allow(non_camel_case_types)]
pub type dlo_token_callback =
    Option<unsafe extern "C" fn(token: i32, piece: *const c_char, piece_len: usize, user_data: *mut c_void) -> c_int>;

/// What a session handle stands for.
pub(crate) struct SessionInner {
    engine: Arc<EngineInner>,
    params: GenerateParams,
    pool: Option<Pool>,
    state: Mutex<State>,
}

/// A session's private thread pool. Dropping it waits (briefly) until its threads have left, so that after
/// `dlo_session_free` no thread of the session still runs.
struct Pool {
    /// Always `Some` until dropped.
    pool: Option<rayon::ThreadPool>,
    running: Arc<(Mutex<usize>, std::sync::Condvar)>,
}

impl Pool {
    fn new(n: usize) -> Result<Self> {
        let running = Arc::new((Mutex::new(n), std::sync::Condvar::new()));
        let on_exit = running.clone();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("dlo-worker-{i}"))
            .exit_handler(move |_| {
                let (count, cv) = &*on_exit;
                *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                cv.notify_all();
            })
            .build()
            .map_err(|e| Failure::new(dlo_status::DLO_ERR_INTERNAL, format!("cannot start {n} threads: {e}")))?;
        Ok(Pool {
            pool: Some(pool),
            running,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropping the pool tells its threads to finish; wait for them (bounded, so that a stuck thread can
        // never hang the caller).
        drop(self.pool.take());
        let (count, cv) = &*self.running;
        let guard = count.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cv.wait_timeout_while(guard, std::time::Duration::from_secs(10), |n| *n > 0);
    }
}

#[derive(Default)]
struct State {
    logits: Vec<f32>,
    last: Option<Generation>,
}

impl SessionInner {
    fn new(engine: Arc<EngineInner>, p: &dlo_session_params) -> Result<Self> {
        let nonneg = |v: i32, what: &str| {
            usize::try_from(v).map_err(|_| Failure::invalid(format!("dlo_session_params.{what}: {v} < 0")))
        };
        let n_threads = match nonneg(p.n_threads, "n_threads")? {
            0 => engine.n_threads,
            n => capped_threads(n).0,
        };
        let max_tokens = match nonneg(p.max_tokens, "max_tokens")? {
            0 => usize::MAX,
            n => n,
        };
        let sampling = SamplingParams {
            temperature: p.temperature,
            top_k: nonneg(p.top_k, "top_k")?,
            top_p: p.top_p,
            seed: p.seed,
        };
        sampling
            .validate()
            .map_err(|e| Failure::invalid(format!("dlo_session_params: {e}")))?;
        let budget = check_budget(p.budget, "dlo_session_params.budget")?;
        let routing = match p.force_routing {
            1 => Routing::Force(true),
            -1 => Routing::Force(false),
            0 => engine
                .routing(budget)
                .map_err(|f| Failure::new(f.status, format!("dlo_session_params.budget: {}", f.message)))?,
            f => {
                return Err(Failure::invalid(format!(
                    "dlo_session_params.force_routing: {f} is not -1, 0 or 1"
                )))
            }
        };
        let pool = match n_threads {
            0 => None,
            n => Some(Pool::new(n)?),
        };
        let params = GenerateParams {
            max_tokens,
            stop_tokens: engine.stop_tokens.clone(),
            sampling,
            routing,
        };
        Ok(SessionInner {
            engine,
            params,
            pool,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self, func: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(g) => Ok(g),
            // A panic during an earlier call was already reported; the state is reset by each generation.
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(Failure::new(
                dlo_status::DLO_ERR_BUSY,
                format!("{func}: the session is in use by another thread (use one session per thread)"),
            )),
        }
    }

    /// Runs one generation from a fresh KV cache, streaming to `cb` on the calling thread.
    fn generate(
        &self,
        prompt: &[u32],
        cb: dlo_token_callback,
        user_data: *mut c_void,
        func: &str,
    ) -> Result<Generation> {
        let mut st = self.lock(func)?;
        st.logits.clear();
        st.last = None;
        let ctx = self.engine.model.config().max_position_embeddings;
        if prompt.is_empty() {
            return Err(Failure::invalid(format!("{func}: the prompt is empty")));
        }
        if prompt.len() > ctx {
            return Err(Failure::new(
                dlo_status::DLO_ERR_CONTEXT_FULL,
                format!(
                    "{func}: the prompt has {} tokens, more than the context length {ctx}",
                    prompt.len()
                ),
            ));
        }
        let mut stream = Stream {
            tokenizer: self.engine.tokenizer.as_ref(),
            cb,
            user_data,
            ids: Vec::new(),
            printed: 0,
            error: None,
        };
        let model = &self.engine.model;
        let run = |on_token: &mut dyn FnMut(u32) -> bool| -> Result<(Generation, Vec<f32>)> {
            let mut g = Generator::new(model, self.params.clone())?;
            let out = g.generate(prompt, |t| {
                if on_token(t) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })?;
            let logits = match g.last_logits() {
                Some(l) => l
                    .to_dtype(candle_core::DType::F32)
                    .and_then(|l| l.to_vec1())
                    .map_err(dlo_runtime::Error::from)?,
                None => Vec::new(),
            };
            Ok((out, logits))
        };
        let (out, logits) = match self.pool.as_ref().and_then(|p| p.pool.as_ref()) {
            None => run(&mut |t| stream.token(t)),
            Some(pool) => {
                // Compute on the session's pool; relay each token to this thread so that the callback runs
                // where the caller expects it.
                let (tok_tx, tok_rx) = mpsc::sync_channel::<u32>(0);
                let (ack_tx, ack_rx) = mpsc::sync_channel::<bool>(0);
                std::thread::scope(|s| {
                    let worker = s.spawn(move || {
                        pool.install(move || run(&mut |t| tok_tx.send(t).is_ok() && ack_rx.recv().unwrap_or(false)))
                    });
                    for t in tok_rx {
                        if ack_tx.send(stream.token(t)).is_err() {
                            break;
                        }
                    }
                    worker.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
                })
            }
        }?;
        if let Some(e) = stream.error {
            return Err(e);
        }
        st.logits = logits;
        st.last = Some(out.clone());
        Ok(out)
    }
}

/// Turns generated ids into text pieces (as `dlo-run` prints them) and calls the C callback.
struct Stream<'a> {
    tokenizer: Option<&'a Tokenizer>,
    cb: dlo_token_callback,
    user_data: *mut c_void,
    ids: Vec<u32>,
    printed: usize,
    error: Option<Failure>,
}

impl Stream<'_> {
    /// Handles one token; false stops generation.
    fn token(&mut self, t: u32) -> bool {
        let Some(cb) = self.cb else { return true };
        self.ids.push(t);
        let mut piece = Vec::new();
        if let Some(tok) = self.tokenizer {
            match tok.decode(&self.ids, true) {
                // Hold back text that ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
                Ok(text) if !text.ends_with('\u{fffd}') && text.len() >= self.printed => {
                    if let Some(new) = text.get(self.printed..) {
                        piece.extend_from_slice(new.as_bytes());
                        self.printed = text.len();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.error = Some(e.into());
                    return false;
                }
            }
        }
        let len = piece.len();
        piece.push(0);
        // SAFETY: the caller promised a valid callback; `piece` outlives the call.
        unsafe { cb(t as i32, piece.as_ptr().cast(), len, self.user_data) == 0 }
    }
}

fn stop_reason(s: StopReason) -> dlo_stop_reason {
    match s {
        StopReason::StopToken => dlo_stop_reason::DLO_STOP_EOS,
        StopReason::MaxTokens => dlo_stop_reason::DLO_STOP_MAX_TOKENS,
        StopReason::Callback => dlo_stop_reason::DLO_STOP_CALLBACK,
        StopReason::ContextFull => dlo_stop_reason::DLO_STOP_CONTEXT_FULL,
    }
}

/// The default session parameters: greedy, 256 new tokens, the engine's threads and budget.
#[no_mangle]
pub extern "C" fn dlo_session_default_params() -> dlo_session_params {
    dlo_session_params::default()
}

/// Creates a session on `engine`. On success `*out` is a new handle the caller owns and must release with
/// `dlo_session_free`; on failure `*out` is NULL. The session keeps the engine's model alive, so the engine
/// handle may be freed first. Errors: DLO_ERR_INVALID_ARG (a parameter out of range).
#[no_mangle]
pub unsafe extern "C" fn dlo_session_new(
    engine: *const crate::engine::dlo_engine,
    params: *const dlo_session_params,
    out: *mut *mut dlo_session,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_session_new";
        if out.is_null() {
            return Err(Failure::null("out", F));
        }
        *out = std::ptr::null_mut();
        let e = handles::engine(id_of(engine, "engine", F)?, F)?;
        let p: dlo_session_params = read_params(params, "params", F)?;
        let s = SessionInner::new(e, &p)?;
        *out = handles::insert(handles::Object::Session(Arc::new(s))) as *mut dlo_session;
        Ok(())
    })
}

/// Releases a session and sets `*session` to NULL; `*session == NULL` is a no-op (DLO_OK). Pointers from
/// `dlo_session_last_logits` become invalid. Errors: DLO_ERR_INVALID_HANDLE (not a live session).
#[no_mangle]
pub unsafe extern "C" fn dlo_session_free(session: *mut *mut dlo_session) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_session_free";
        if session.is_null() {
            return Err(Failure::null("session", F));
        }
        if (*session).is_null() {
            return Ok(());
        }
        handles::remove_session(*session as usize, F)?;
        *session = std::ptr::null_mut();
        Ok(())
    })
}

unsafe fn finish(out: Generation, result: *mut dlo_generation_result, func: &str) -> Result<()> {
    let r = dlo_generation_result {
        struct_size: std::mem::size_of::<dlo_generation_result>(),
        n_prompt_tokens: out.prompt_tokens,
        n_generated: out.tokens.len(),
        stop_reason: stop_reason(out.stop),
    };
    write_out(result, r, "result", func)
}

unsafe fn check_result(result: *mut dlo_generation_result, func: &str) -> Result<()> {
    // Validate before generating so that a bad `result` does not waste a generation.
    if result.is_null() {
        return Err(Failure::null("result", func));
    }
    read_params(result.cast_const(), "result", func).map(|_| ())
}

/// Generates from `n` prompt token ids, starting from an empty KV cache (each call is a new sequence: to
/// continue a conversation, pass the whole conversation again). Streams every new token to `cb` (may be
/// NULL) with `user_data` passed through, and fills `*result` (caller sets its `struct_size`). Ending at
/// the context length is a normal stop (DLO_STOP_CONTEXT_FULL); a prompt longer than the context is
/// DLO_ERR_CONTEXT_FULL. Errors: DLO_ERR_INVALID_ARG (empty prompt, id outside the vocabulary),
/// DLO_ERR_BUSY (the session is in use on another thread).
#[no_mangle]
pub unsafe extern "C" fn dlo_generate(
    session: *mut dlo_session,
    prompt: *const i32,
    n: usize,
    cb: dlo_token_callback,
    user_data: *mut c_void,
    result: *mut dlo_generation_result,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_generate";
        let s = handles::session(id_of(session, "session", F)?, F)?;
        let prompt = crate::ffi::slice(prompt, n, "prompt", F)?;
        check_result(result, F)?;
        let ids = s.engine.ids(prompt, "prompt")?;
        let out = s.generate(&ids, cb, user_data, F)?;
        finish(out, result, F)
    })
}

/// Generates from NUL-terminated UTF-8 text, as `dlo-run --prompt TEXT [--chat]` does: with
/// `use_chat_template` != 0 the text becomes one user turn rendered with the chat template (generation
/// prompt opened) and is encoded without extra special tokens; otherwise it is encoded with them (BOS when
/// the model wants it). Then as `dlo_generate`. Errors: DLO_ERR_UTF8, DLO_ERR_NO_TOKENIZER, DLO_ERR_TEMPLATE,
/// and those of `dlo_generate`.
#[no_mangle]
pub unsafe extern "C" fn dlo_generate_text(
    session: *mut dlo_session,
    prompt: *const c_char,
    use_chat_template: i32,
    cb: dlo_token_callback,
    user_data: *mut c_void,
    result: *mut dlo_generation_result,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_generate_text";
        let s = handles::session(id_of(session, "session", F)?, F)?;
        let text = c_str(prompt, "prompt", F)?;
        check_result(result, F)?;
        let tok = s.engine.tokenizer()?;
        let ids = if use_chat_template != 0 {
            let rendered = s.engine.chat_prompt(&[Message::new("user", text)])?;
            tok.encode(&rendered, false)?
        } else {
            tok.encode(text, true)?
        };
        let out = s.generate(&ids, cb, user_data, F)?;
        finish(out, result, F)
    })
}

/// The logits (`*n_vocab` f32 values, before temperature) from which the last token of the last generation
/// was chosen. Ownership: the array belongs to the session; it stays valid until the next `dlo_generate*`
/// or `dlo_session_free` on this session. Errors: DLO_ERR_INVALID_ARG before the first generation.
#[no_mangle]
pub unsafe extern "C" fn dlo_session_last_logits(
    session: *mut dlo_session,
    logits: *mut *const f32,
    n_vocab: *mut usize,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_session_last_logits";
        let s = handles::session(id_of(session, "session", F)?, F)?;
        if logits.is_null() {
            return Err(Failure::null("logits", F));
        }
        if n_vocab.is_null() {
            return Err(Failure::null("n_vocab", F));
        }
        let st = s.lock(F)?;
        if st.logits.is_empty() {
            return Err(Failure::invalid(format!("{F}: no logits yet: run dlo_generate first")));
        }
        // The Vec's heap buffer does not move while the session lives and no generation runs.
        *logits = st.logits.as_ptr();
        *n_vocab = st.logits.len();
        Ok(())
    })
}

/// Fills `*out` (caller sets `struct_size`) with the counters of the session's last generation.
#[no_mangle]
pub unsafe extern "C" fn dlo_session_stats(session: *mut dlo_session, out: *mut dlo_stats) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_session_stats";
        let s = handles::session(id_of(session, "session", F)?, F)?;
        if out.is_null() {
            return Err(Failure::null("out", F));
        }
        let st = s.lock(F)?;
        let cfg = s.engine.model.config();
        let mut stats = dlo_stats {
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
        };
        if let Some(g) = &st.last {
            let f = flops::of_generation(cfg, g);
            stats.n_prompt_tokens = g.prompt_tokens;
            stats.n_generated = g.tokens.len();
            stats.n_decode_steps = g.decode_steps();
            stats.prefill_seconds = g.prefill_time.as_secs_f64();
            stats.decode_seconds = g.decode_time.as_secs_f64();
            stats.mean_exec_rate = g.routing.mean_rate();
            stats.flops = f.total();
            stats.flops_dense = flops::of_generation_dense(cfg, g).total();
            stats.flops_projections = f.projections;
            stats.flops_attention = f.attention;
            stats.flops_mlp = f.mlp;
            stats.flops_routers = f.routers;
            stats.flops_lm_head = f.lm_head;
        }
        write_out(out, stats, "out", F)
    })
}

/// Per-layer execution rates of the last generation (executed / processed tokens, prompt and decode steps
/// together): `out[l]` for layer l, -1 for layers without a router, 0 for routed layers before the first
/// generation. `*n_out` = the number of layers; when `cap` is smaller, nothing is written and the status is
/// DLO_ERR_BUFFER_TOO_SMALL (`out = NULL, cap = 0` asks for the size). `out` is caller-owned.
#[no_mangle]
pub unsafe extern "C" fn dlo_session_layer_rates(
    session: *mut dlo_session,
    out: *mut f32,
    cap: usize,
    n_out: *mut usize,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_session_layer_rates";
        let s = handles::session(id_of(session, "session", F)?, F)?;
        check_out(out, cap, n_out, "out", F)?;
        let st = s.lock(F)?;
        let cfg = s.engine.model.config();
        let n = cfg.num_hidden_layers;
        let rates = st.last.as_ref().map(|g| g.routing.rates()).unwrap_or_default();
        *n_out = n;
        if cap < n {
            return Err(Failure::new(
                dlo_status::DLO_ERR_BUFFER_TOO_SMALL,
                format!("{F}: {n} layers do not fit in cap = {cap}"),
            ));
        }
        for l in 0..n {
            let r = if cfg.is_routed(l) {
                rates.get(l).copied().flatten().unwrap_or(0.0) as f32
            } else {
                -1.0
            };
            *out.add(l) = r;
        }
        Ok(())
    })
}
