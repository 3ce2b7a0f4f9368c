//! Engines: loading a model, its tokenizer and chat template; text ↔ token ids.

use crate::ffi::{c_str, check_out, id_of, read_params, write_out, write_text};
use crate::handles;
use crate::status::{dlo_status, guard, Failure, Result};
use candle_core::DType;
use dlo_runtime::chat::Message;
use dlo_runtime::engine::{load_any, routing_for, EnginePlan};
use dlo_runtime::model::Routing;
use dlo_runtime::options::capped_threads;
use dlo_runtime::{Model, RuntimeOptions, Tokenizer};
use std::ffi::c_char;
use std::path::{Path, PathBuf};

/// An opaque handle to a loaded model (weights, tokenizer, chat template). Immutable once loaded: one
/// engine may be shared by any number of threads and sessions at once. Never dereference it.
pub struct dlo_engine {
    _opaque: [u8; 0],
}

/// Compute dtypes (values of `dlo_engine_params.dtype`).
#[repr(C)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum dlo_dtype {
    /// 32-bit floats (the default; matches `dlo-run --dtype f32`).
    DLO_DTYPE_F32 = 0,
    /// bfloat16 weights and activations (`dlo-run --dtype bf16`).
    DLO_DTYPE_BF16 = 1,
}

/// How to load an engine. Always start from `dlo_engine_default_params()` and change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dlo_engine_params {
    /// `sizeof(dlo_engine_params)` as the caller was compiled with; set by `dlo_engine_default_params()`.
    pub struct_size: usize,
    /// A `dlo_dtype` value: DLO_DTYPE_F32 (0, default) or DLO_DTYPE_BF16 (1); anything else is
    /// DLO_ERR_INVALID_ARG.
    pub dtype: i32,
    /// Worker threads of sessions that leave their own `n_threads` at 0. 0 (default) = all cores (the
    /// process-wide pool); n > 0 = a private pool of n threads per session, at most 4 per CPU (larger
    /// values are lowered to that); < 0 is DLO_ERR_INVALID_ARG.
    pub n_threads: i32,
    /// Default compute budget of sessions that leave their own `budget` at 0: a target mean execution rate
    /// of routed layers in (0, 1]. <= 0 (default) = the model's own routing: an engine file's calibrated
    /// thresholds when it has them, else the reference rule (router logit > 0). A budget needs an engine
    /// file (thresholds from its calibration tables); with a checkpoint, a budget > 0 is DLO_ERR_INVALID_ARG.
    pub budget: f32,
}

impl Default for dlo_engine_params {
    fn default() -> Self {
        dlo_engine_params {
            struct_size: std::mem::size_of::<dlo_engine_params>(),
            dtype: dlo_dtype::DLO_DTYPE_F32 as i32,
            n_threads: 0,
            budget: 0.0,
        }
    }
}

/// Facts about a loaded engine, filled by `dlo_engine_get_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dlo_engine_info {
    /// Set by the caller to `sizeof(dlo_engine_info)` before the call.
    pub struct_size: usize,
    /// Vocabulary size (valid token ids are 0 .. n_vocab-1; also the length of the logits).
    pub n_vocab: usize,
    /// Context length (`max_position_embeddings`): prompt plus generated tokens of one generation.
    pub n_ctx: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Layers with a DLO router.
    pub n_routed_layers: usize,
    /// 1 when the model has a tokenizer (text functions work), else 0.
    pub has_tokenizer: i32,
    /// 1 when the model has a chat template, else 0.
    pub has_chat_template: i32,
    /// Beginning-of-sequence token id, -1 when there is none.
    pub bos_token: i32,
    /// The first end-of-sequence token id, -1 when there is none (generation stops at every EOS id).
    pub eos_token: i32,
}

/// One chat message for `dlo_chat_render`. Both strings are NUL-terminated UTF-8, owned by the caller.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dlo_chat_message {
    /// "system", "user" or "assistant".
    pub role: *const c_char,
    /// The text.
    pub content: *const c_char,
}

/// What an engine handle stands for.
pub(crate) struct EngineInner {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    /// Token ids that end generation: the config's EOS ids plus the tokenizer's.
    pub stop_tokens: Vec<u32>,
    pub path: PathBuf,
    pub n_threads: usize,
    /// The engine file's plan (`None` for a checkpoint).
    pub plan: Option<EnginePlan>,
    /// Routing of sessions that set no budget of their own.
    pub default_routing: Routing,
}

impl EngineInner {
    pub fn load(path: &Path, p: &dlo_engine_params) -> Result<Self> {
        let dtype = match p.dtype {
            0 => DType::F32,
            1 => DType::BF16,
            d => {
                return Err(Failure::invalid(format!(
                    "dlo_engine_params.dtype: {d} is not a dlo_dtype value"
                )))
            }
        };
        // A library has no place to print a warning: counts above the cap are lowered silently (the header
        // documents it).
        let n_threads = usize::try_from(p.n_threads)
            .map(|n| capped_threads(n).0)
            .map_err(|_| Failure::invalid(format!("dlo_engine_params.n_threads: {} < 0", p.n_threads)))?;
        let opts = RuntimeOptions {
            dtype,
            threads: (n_threads > 0).then_some(n_threads),
            ..RuntimeOptions::default()
        };
        opts.validate()
            .map_err(|e| Failure::invalid(format!("dlo_engine_params.n_threads: {e}")))?;
        let budget = check_budget(p.budget, "dlo_engine_params.budget")?;
        let (opened, model) = load_any(path, &opts)?;
        let default_routing = opened.routing(budget.map(f64::from))?;
        let stop_tokens = opened.stop_tokens();
        Ok(EngineInner {
            model,
            tokenizer: opened.tokenizer,
            stop_tokens,
            path: path.to_path_buf(),
            n_threads,
            plan: opened.plan,
            default_routing,
        })
    }

    /// The routing rule for a session budget (`None`: the engine's default).
    pub fn routing(&self, budget: Option<f32>) -> Result<Routing> {
        match budget {
            None => Ok(self.default_routing.clone()),
            Some(b) => routing_for(self.plan.as_ref(), Some(f64::from(b)))
                .map_err(|e| Failure::invalid(format!("{}: {e}", self.path.display()))),
        }
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Failure::from(dlo_runtime::Error::NoTokenizer {
                path: self.path.clone(),
            })
        })
    }

    /// Checks token ids against the vocabulary.
    pub fn ids(&self, ids: &[i32], what: &str) -> Result<Vec<u32>> {
        let v = self.model.config().vocab_size;
        ids.iter()
            .enumerate()
            .map(|(i, &t)| match usize::try_from(t) {
                Ok(u) if u < v => Ok(u as u32),
                _ => Err(Failure::invalid(format!(
                    "{what}[{i}] = {t} is not a token id (vocabulary size {v})"
                ))),
            })
            .collect()
    }

    /// Renders `text` as one user turn with the chat template (generation prompt opened).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String> {
        let tmpl = self.tokenizer()?.chat_template.as_ref().ok_or_else(|| {
            Failure::new(
                dlo_status::DLO_ERR_NO_TOKENIZER,
                format!("{}: the model has no chat template", self.path.display()),
            )
        })?;
        Ok(tmpl.render(messages, true)?)
    }
}

/// `budget` as an option: <= 0 → None; (0, 1] → Some; NaN or > 1 → error.
pub(crate) fn check_budget(b: f32, what: &str) -> Result<Option<f32>> {
    if b.is_nan() || b > 1.0 {
        return Err(Failure::invalid(format!(
            "{what}: {b} is not an execution rate in (0, 1]"
        )));
    }
    Ok((b > 0.0).then_some(b))
}

/// The default engine parameters (f32, all cores, the model's own routing).
#[no_mangle]
pub extern "C" fn dlo_engine_default_params() -> dlo_engine_params {
    dlo_engine_params::default()
}

/// Loads a model: an engine file built by `dlo-compile build` (recognised by its magic), an HF checkpoint
/// directory (config.json + safetensors, with its tokenizer files) or a GGUF file. `path`: NUL-terminated
/// file-system path. On success `*out` is a new engine handle that the caller owns and must release with
/// `dlo_engine_free`; on failure `*out` is set to NULL. Errors: DLO_ERR_IO (unreadable), DLO_ERR_FORMAT (not
/// an engine or checkpoint, corrupt or inconsistent files), DLO_ERR_INVALID_ARG (bad params).
#[no_mangle]
pub unsafe extern "C" fn dlo_engine_load(
    path: *const c_char,
    params: *const dlo_engine_params,
    out: *mut *mut dlo_engine,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_engine_load";
        if out.is_null() {
            return Err(Failure::null("out", F));
        }
        *out = std::ptr::null_mut();
        let path = crate::ffi::c_path(path, "path", F)?;
        let params: dlo_engine_params = read_params(params, "params", F)?;
        let inner = EngineInner::load(&path, &params)?;
        let id = handles::insert(handles::Object::Engine(std::sync::Arc::new(inner)));
        *out = id as *mut dlo_engine;
        Ok(())
    })
}

/// Releases an engine handle and sets `*engine` to NULL. `*engine == NULL` is a no-op (DLO_OK). Sessions
/// created from the engine stay valid (they keep the model alive) until they are freed.
/// Errors: DLO_ERR_INVALID_HANDLE for a handle that is not a live engine (already freed, or foreign).
#[no_mangle]
pub unsafe extern "C" fn dlo_engine_free(engine: *mut *mut dlo_engine) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_engine_free";
        if engine.is_null() {
            return Err(Failure::null("engine", F));
        }
        if (*engine).is_null() {
            return Ok(());
        }
        handles::remove_engine(*engine as usize, F)?;
        *engine = std::ptr::null_mut();
        Ok(())
    })
}

/// Fills `*out` with facts about the engine. The caller sets `out->struct_size = sizeof(dlo_engine_info)`
/// first.
#[no_mangle]
pub unsafe extern "C" fn dlo_engine_get_info(engine: *const dlo_engine, out: *mut dlo_engine_info) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_engine_get_info";
        let e = handles::engine(id_of(engine, "engine", F)?, F)?;
        let cfg = e.model.config();
        let tok = e.tokenizer.as_ref();
        let info = dlo_engine_info {
            struct_size: std::mem::size_of::<dlo_engine_info>(),
            n_vocab: cfg.vocab_size,
            n_ctx: cfg.max_position_embeddings,
            n_layers: cfg.num_hidden_layers,
            n_routed_layers: (0..cfg.num_hidden_layers).filter(|&l| cfg.is_routed(l)).count(),
            has_tokenizer: tok.is_some() as i32,
            has_chat_template: tok.is_some_and(|t| t.chat_template.is_some()) as i32,
            bos_token: tok
                .and_then(|t| t.bos_token_id)
                .or(cfg.bos_token_id)
                .map_or(-1, |t| t as i32),
            eos_token: e.stop_tokens.first().map_or(-1, |&t| t as i32),
        };
        write_out(out, info, "out", F)
    })
}

/// Describes how the engine's weights are stored: one line per storage kind, `KIND TENSORS BYTES` (e.g.
/// `q4_1 210 66355200`; kinds `f32`, `bf16`, `f16`, `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q2_k` … `q6_k`),
/// largest first, then `bytes_per_token N`: the weight bytes one decode step reads with every unit executing.
/// Output as in `dlo_detokenize` (text + NUL in caller-owned `buf`, `*n_out` = length without the NUL,
/// DLO_ERR_BUFFER_TOO_SMALL with the needed length; `buf = NULL, cap = 0` asks for the size).
#[no_mangle]
pub unsafe extern "C" fn dlo_engine_weights(
    engine: *const dlo_engine,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_engine_weights";
        let e = handles::engine(id_of(engine, "engine", F)?, F)?;
        check_out(buf, cap, n_out, "buf", F)?;
        let mut text = String::new();
        for (kind, tensors, bytes) in e.model.weight_kinds() {
            text.push_str(&format!("{kind} {tensors} {bytes}\n"));
        }
        text.push_str(&format!("bytes_per_token {}\n", e.model.bytes_per_token()));
        write_text(&text, buf, cap, n_out, F)
    })
}

/// Encodes NUL-terminated UTF-8 `text` into token ids. `add_special` != 0 adds the tokenizer's special
/// prefix (BOS when the model wants it). Writes the ids to `out[0 .. *n_out]`, `*n_out` being their count.
/// When `cap` is smaller than the count, nothing is written, `*n_out` is the count needed and the status is
/// DLO_ERR_BUFFER_TOO_SMALL (pass `out = NULL, cap = 0` to ask for the size). `out` is caller-owned.
/// Errors: DLO_ERR_UTF8, DLO_ERR_NO_TOKENIZER, DLO_ERR_TOKENIZER.
#[no_mangle]
pub unsafe extern "C" fn dlo_tokenize(
    engine: *const dlo_engine,
    text: *const c_char,
    add_special: i32,
    out: *mut i32,
    cap: usize,
    n_out: *mut usize,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_tokenize";
        let e = handles::engine(id_of(engine, "engine", F)?, F)?;
        let text = c_str(text, "text", F)?;
        check_out(out, cap, n_out, "out", F)?;
        let ids = e.tokenizer()?.encode(text, add_special != 0)?;
        *n_out = ids.len();
        if ids.len() > cap {
            return Err(Failure::new(
                dlo_status::DLO_ERR_BUFFER_TOO_SMALL,
                format!("{F}: {} token ids do not fit in cap = {cap}", ids.len()),
            ));
        }
        for (i, &t) in ids.iter().enumerate() {
            *out.add(i) = t as i32;
        }
        Ok(())
    })
}

/// Decodes `n` token ids to UTF-8 text; `skip_special` != 0 leaves out special tokens (BOS, EOS, chat
/// markers). Writes the text plus a terminating NUL to `buf`; `*n_out` is the text length in bytes without
/// the NUL. When `cap < *n_out + 1`, nothing is written and the status is DLO_ERR_BUFFER_TOO_SMALL (pass
/// `buf = NULL, cap = 0` to ask for the size). `ids` may be NULL when `n == 0`. Buffers are caller-owned.
/// Errors: DLO_ERR_INVALID_ARG (an id outside the vocabulary), DLO_ERR_NO_TOKENIZER, DLO_ERR_TOKENIZER.
#[no_mangle]
pub unsafe extern "C" fn dlo_detokenize(
    engine: *const dlo_engine,
    ids: *const i32,
    n: usize,
    skip_special: i32,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_detokenize";
        let e = handles::engine(id_of(engine, "engine", F)?, F)?;
        let ids = crate::ffi::slice(ids, n, "ids", F)?;
        check_out(buf, cap, n_out, "buf", F)?;
        let ids = e.ids(ids, "ids")?;
        let text = e.tokenizer()?.decode(&ids, skip_special != 0)?;
        write_text(&text, buf, cap, n_out, F)
    })
}

/// Renders `n` chat messages with the model's chat template; `add_generation_prompt` != 0 opens an
/// assistant turn at the end. Output as in `dlo_detokenize` (text + NUL in caller-owned `buf`, `*n_out` =
/// length without the NUL, DLO_ERR_BUFFER_TOO_SMALL with the needed length). Errors: DLO_ERR_UTF8,
/// DLO_ERR_NO_TOKENIZER (no tokenizer or no chat template), DLO_ERR_TEMPLATE.
#[no_mangle]
pub unsafe extern "C" fn dlo_chat_render(
    engine: *const dlo_engine,
    messages: *const dlo_chat_message,
    n: usize,
    add_generation_prompt: i32,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> dlo_status {
    guard(|| {
        const F: &str = "dlo_chat_render";
        let e = handles::engine(id_of(engine, "engine", F)?, F)?;
        let msgs = crate::ffi::slice(messages, n, "messages", F)?;
        check_out(buf, cap, n_out, "buf", F)?;
        let msgs = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = c_str(m.role, &format!("messages[{i}].role"), F)?;
                if !dlo_runtime::chat::ROLES.contains(&role) {
                    return Err(Failure::invalid(format!(
                        "{F}: messages[{i}].role is `{role}`, not one of {}",
                        dlo_runtime::chat::ROLES.join(", ")
                    )));
                }
                Ok(Message::new(
                    role,
                    c_str(m.content, &format!("messages[{i}].content"), F)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let tok = e.tokenizer()?;
        let tmpl = tok.chat_template.as_ref().ok_or_else(|| {
            Failure::new(
                dlo_status::DLO_ERR_NO_TOKENIZER,
                format!("{F}: {}: the model has no chat template", e.path.display()),
            )
        })?;
        let text = tmpl.render(&msgs, add_generation_prompt != 0)?;
        write_text(&text, buf, cap, n_out, F)
    })
}
