//! Tokenizers: `tokenizer.json`, SentencePiece `tokenizer.model`, or built from GGUF metadata; plus the
//! special tokens and chat template that travel with them.
//!
//! The GGUF conversion (`tokenizer.ggml.*` metadata → `tokenizers`) lives in the `gguf` submodule
//! (tokenizer/gguf.rs).
//!
//! Whatever the source, the result is one `tokenizers` tokenizer ([`Tokenizer::inner`]) that can be saved as
//! an HF `tokenizer.json` ([`Tokenizer::write_hf_files`]), with BOS handled by [`Tokenizer::encode`] itself.
//! [`TextStream`] turns generated ids into text incrementally.

mod gguf;
mod json;

pub use gguf::gguf_spm_vocab;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::sentencepiece::{ModelProto, SpmVocab};
use dlo_passes::fsutil::write_atomic;
use serde_json::{json, Value as Json};
use std::path::{Path, PathBuf};
use tokenizers::AddedToken;

/// A text tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it was loaded from (for error messages).
    path: PathBuf,
    /// Prepend BOS when encoding a prompt (`add_bos_token`).
    pub add_bos: bool,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The chat template, if any.
    pub chat_template: Option<ChatTemplate>,
    /// The BOS token's text (`<s>`, `<|begin_of_text|>`), if any.
    pub bos_token: Option<String>,
    /// The (main) EOS token's text, if any.
    pub eos_token: Option<String>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("add_bos", &self.add_bos)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Special tokens and options that come from `tokenizer_config.json` and friends (or GGUF metadata).
#[derive(Default)]
struct Specials {
    add_bos: Option<bool>,
    bos: Option<String>,
    eos: Option<String>,
    extra_eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads the tokenizer of an HF directory: `tokenizer.json`, else SentencePiece `tokenizer.model`; special
    /// tokens, `add_bos_token` and chat template from `tokenizer_config.json` (and `special_tokens_map.json`,
    /// `chat_template.jinja`, `generation_config.json`'s extra EOS ids). `Ok(None)` when the directory has no
    /// tokenizer.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let json_path = dir.join("tokenizer.json");
        let model_path = dir.join("tokenizer.model");
        if json_path.is_file() {
            let inner = load_tokenizer_json(&json_path)?;
            Self::finish(inner, json_path, read_hf_specials(dir)?, None).map(Some)
        } else if model_path.is_file() {
            Self::from_sentencepiece_file(&model_path, dir, read_hf_specials(dir)?).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Loads a `tokenizer.json` file on its own (no config: no BOS, EOS or chat template unless the
    /// tokenizer's post-processor adds BOS).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = load_tokenizer_json(path)?;
        Self::finish(inner, path.to_path_buf(), Specials::default(), None)
    }

    fn from_sentencepiece_file(path: &Path, dir: &Path, mut specials: Specials) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let proto = <ModelProto as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| Error::format(path, format!("not a SentencePiece model (protobuf decode failed: {e})")))?;
        let vocab = SpmVocab::from_proto(&proto).map_err(|p| Error::format(path, p))?;
        let trainer = proto.trainer_spec.clone().unwrap_or_default();
        let piece_at = |id: Option<i32>, default: i32| -> Option<String> {
            let id = id.unwrap_or(default);
            usize::try_from(id)
                .ok()
                .and_then(|i| vocab.pieces.get(i))
                .map(|p| p.0.clone())
        };
        if specials.bos.is_none() {
            specials.bos = piece_at(trainer.bos_id, 1);
        }
        if specials.eos.is_none() {
            specials.eos = piece_at(trainer.eos_id, 2);
        }
        let bos_id = specials
            .bos
            .as_ref()
            .and_then(|b| vocab.pieces.iter().position(|p| &p.0 == b))
            .map(|i| i as u32);
        let add_bos = specials.add_bos.unwrap_or(true);
        let mut inner = vocab
            .build(if add_bos { bos_id } else { None })
            .map_err(|p| tok_err(path, p))?;
        add_config_added_tokens(&mut inner, dir, vocab.pieces.len(), path)?;
        Self::finish(inner, path.to_path_buf(), specials, Some(true))
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        path: PathBuf,
        specials: Specials,
        default_add_bos: Option<bool>,
    ) -> Result<Self> {
        let mut specials = specials;
        // tokenizer.json without a config flag: BOS iff its post-processor puts it in front.
        let probed = match specials.add_bos.or(default_add_bos) {
            Some(_) => None,
            None => leading_special(&inner),
        };
        if specials.bos.is_none() {
            specials.bos = probed.and_then(|id| inner.id_to_token(id));
        }
        let bos_token_id = specials.bos.as_deref().and_then(|b| inner.token_to_id(b));
        let add_bos = specials
            .add_bos
            .or(default_add_bos)
            .unwrap_or(probed.is_some() && probed == bos_token_id)
            && bos_token_id.is_some();
        let mut eos_token_ids = Vec::new();
        if let Some(id) = specials.eos.as_deref().and_then(|e| inner.token_to_id(e)) {
            eos_token_ids.push(id);
        }
        for id in specials.extra_eos_ids {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let vocab_size = id_span(&inner);
        let chat_template = specials.chat_template.map(|src| {
            ChatTemplate::new(
                src,
                specials.bos.clone().unwrap_or_default(),
                specials.eos.clone().unwrap_or_default(),
            )
        });
        Ok(Tokenizer {
            inner,
            path,
            add_bos,
            bos_token_id,
            eos_token_ids,
            chat_template,
            bos_token: specials.bos,
            eos_token: specials.eos,
            vocab_size,
        })
    }

    /// Encodes text; adds BOS when `add_bos` is set and `add_special` is true. Special-token text in the input
    /// (`<|im_start|>`) is recognised as the special token.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            problem: e.to_string(),
        })?;
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Renders `messages` with the chat template and encodes the result without adding BOS (templates write
    /// their own special tokens, as HF's `apply_chat_template(tokenize=True)` assumes).
    pub fn encode_chat(&self, messages: &[crate::chat::Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let tmpl = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Template(format!("{}: the tokenizer has no chat template", self.path.display())))?;
        self.encode(&tmpl.render(messages, add_generation_prompt)?, false)
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            problem: e.to_string(),
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where the tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of a token's text (added tokens included).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The text of a token id (in the vocabulary's form: `Ġ` / `▁` for spaces).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids (largest id + 1, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream::new(self, skip_special)
    }

    /// `tokenizer.json` text that HF `tokenizers` 0.19+ (and so transformers 4.40) can read: BPE merges are
    /// written as `"a b"` strings when no merge half contains a space.
    pub fn to_hf_tokenizer_json(&self) -> Result<String> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| tok_err(&self.path, e.to_string()))?;
        let mut v: Json = serde_json::from_str(&text).map_err(|e| tok_err(&self.path, e.to_string()))?;
        if let Some(merges) = v.pointer_mut("/model/merges").and_then(Json::as_array_mut) {
            let pairs: Option<Vec<String>> = merges
                .iter()
                .map(|m| match m.as_array().map(Vec::as_slice) {
                    Some([Json::String(a), Json::String(b)]) if !a.contains(' ') && !b.contains(' ') => {
                        Some(format!("{a} {b}"))
                    }
                    _ => None,
                })
                .collect();
            if let Some(pairs) = pairs {
                *merges = pairs.into_iter().map(Json::String).collect();
            }
        }
        // transformers' fast tokenizer applies BOS through the post-processor: add one when BOS is wanted and
        // the tokenizer has none, so that `AutoTokenizer` encodes as `encode(text, true)` does.
        if self.add_bos && v.get("post_processor").is_none_or(Json::is_null) {
            if let Some((id, t)) = self
                .bos_token_id
                .and_then(|id| self.inner.id_to_token(id).map(|t| (id, t)))
            {
                v["post_processor"] = json!({
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": t, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {t.as_str(): {"id": t, "ids": [id], "tokens": [t]}}
                });
            }
        }
        serde_json::to_string(&v).map_err(|e| tok_err(&self.path, e.to_string()))
    }

    /// The `tokenizer_config.json` transformers needs to load [`Self::to_hf_tokenizer_json`] with
    /// `AutoTokenizer`: class `PreTrainedTokenizerFast`, special tokens, `add_bos_token`, chat template.
    pub fn hf_tokenizer_config(&self) -> Json {
        let mut decoder = serde_json::Map::new();
        let mut added: Vec<(u32, tokenizers::AddedToken)> = self.inner.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        for (id, t) in added {
            decoder.insert(
                id.to_string(),
                json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                }),
            );
        }
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "added_tokens_decoder": decoder,
        });
        if let Some(obj) = cfg.as_object_mut() {
            if let Some(b) = &self.bos_token {
                obj.insert("bos_token".into(), json!(b));
            }
            if let Some(e) = &self.eos_token {
                obj.insert("eos_token".into(), json!(e));
            }
            if let Some(t) = &self.chat_template {
                obj.insert("chat_template".into(), json!(t.source));
            }
        }
        cfg
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (each to a temporary file, then renamed).
    pub fn write_hf_files(&self, dir: &Path) -> Result<()> {
        let tok = self.to_hf_tokenizer_json()?;
        let cfg = serde_json::to_string_pretty(&self.hf_tokenizer_config()).map_err(|e| tok_err(dir, e.to_string()))?;
        write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
        write_atomic(&dir.join("tokenizer_config.json"), cfg.as_bytes())?;
        Ok(())
    }
}

/// Incremental detokenizer: feed generated ids one at a time and get the text they complete. Text is only
/// emitted once it decodes to valid UTF-8 (a character split over several byte tokens waits for its last
/// byte), and decoding happens over a short window of previous ids so that spaces are not lost.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    /// A stream with no context (the first token's leading SentencePiece space is dropped, as in `decode`).
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> Self {
        TextStream {
            tok,
            skip_special,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// A stream that continues after `context` (e.g. the prompt's last few ids): their text is not emitted,
    /// but the first generated token is decoded as a continuation of them (keeping its leading space).
    pub fn with_context(tok: &'a Tokenizer, skip_special: bool, context: &[u32]) -> Self {
        let ctx = &context[context.len().saturating_sub(6)..];
        TextStream {
            tok,
            skip_special,
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
        }
    }

    /// Adds one id; returns the newly completed text (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(prefix.as_str()) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Returns whatever has not been emitted yet (incomplete characters as U+FFFD) and resets the window.
    pub fn finish(&mut self) -> Result<String> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self
            .tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = self.tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.strip_prefix(prefix.as_str()).unwrap_or(&full).to_string())
    }
}

/// The id a tokenizer's post-processor puts in front of a single sequence, if any.
fn leading_special(inner: &tokenizers::Tokenizer) -> Option<u32> {
    let with = inner.encode("a", true).ok()?.get_ids().to_vec();
    let without = inner.encode("a", false).ok()?.get_ids().to_vec();
    let first = *with.first()?;
    (with.len() > without.len() && with.get(1..=without.len()) == Some(without.as_slice())).then_some(first)
}

/// One more than the largest token id (what a model's embedding must cover). The common case, ids `0..n` for
/// `n` tokens, is confirmed with lookups; otherwise the whole vocabulary is scanned (it is copied to do so,
/// which on a 49k vocabulary costs milliseconds of the load).
fn id_span(inner: &tokenizers::Tokenizer) -> usize {
    let n = inner.get_vocab_size(true);
    if (0..n as u32).all(|id| inner.id_to_token(id).is_some()) {
        return n;
    }
    inner
        .get_vocab(true)
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
}

fn tok_err(path: &Path, problem: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid tokenizer.json: not UTF-8 ({e})")))?;
    json::parse(text).map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// A token given as a string or as an `AddedToken` object with `content`.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_hf_specials(dir: &Path) -> Result<Specials> {
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = read_json_opt(&cfg_path)?.unwrap_or(Json::Null);
    let map = read_json_opt(&dir.join("special_tokens_map.json"))?.unwrap_or(Json::Null);
    let mut s = Specials {
        add_bos: cfg.get("add_bos_token").and_then(Json::as_bool),
        bos: token_text(cfg.get("bos_token")).or_else(|| token_text(map.get("bos_token"))),
        eos: token_text(cfg.get("eos_token")).or_else(|| token_text(map.get("eos_token"))),
        ..Specials::default()
    };
    let jinja = dir.join("chat_template.jinja");
    let tmpl_json = dir.join("chat_template.json");
    s.chat_template = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
    } else if let Some(v) = read_json_opt(&tmpl_json)? {
        v.get("chat_template").and_then(Json::as_str).map(str::to_string)
    } else {
        match cfg.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(t)) => Some(t.clone()),
            Some(Json::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(Json::as_str) == Some(n))
                        .and_then(|t| t.get("template"))
                        .and_then(Json::as_str)
                };
                named("default")
                    .or_else(|| list.first().and_then(|t| t.get("template")).and_then(Json::as_str))
                    .map(str::to_string)
            }
            Some(_) => {
                return Err(Error::format(
                    &cfg_path,
                    "`chat_template` is neither a string nor a list of templates",
                ))
            }
        }
    };
    let gen_path = dir.join("generation_config.json");
    if let Some(gen) = read_json_opt(&gen_path)? {
        match gen.get("eos_token_id") {
            Some(Json::Number(n)) => s.extra_eos_ids.extend(n.as_u64().and_then(|v| u32::try_from(v).ok())),
            Some(Json::Array(a)) => s
                .extra_eos_ids
                .extend(a.iter().filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))),
            _ => {}
        }
    }
    Ok(s)
}

/// Adds `added_tokens_decoder` entries of `tokenizer_config.json` beyond the SentencePiece vocabulary.
fn add_config_added_tokens(inner: &mut tokenizers::Tokenizer, dir: &Path, n_pieces: usize, path: &Path) -> Result<()> {
    let cfg_path = dir.join("tokenizer_config.json");
    let Some(cfg) = read_json_opt(&cfg_path)? else {
        return Ok(());
    };
    let Some(decoder) = cfg.get("added_tokens_decoder").and_then(Json::as_object) else {
        return Ok(());
    };
    let mut entries: Vec<(u32, AddedToken)> = Vec::new();
    for (id, t) in decoder {
        let id: u32 = id
            .parse()
            .map_err(|_| Error::format(&cfg_path, format!("added_tokens_decoder: key {id:?} is not a token id")))?;
        let content = token_text(Some(t))
            .ok_or_else(|| Error::format(&cfg_path, format!("added_tokens_decoder[{id}] has no `content`")))?;
        let flag = |k: &str, d: bool| t.get(k).and_then(Json::as_bool).unwrap_or(d);
        let tok = AddedToken::from(content, flag("special", false))
            .normalized(flag("normalized", false))
            .lstrip(flag("lstrip", false))
            .rstrip(flag("rstrip", false))
            .single_word(flag("single_word", false));
        entries.push((id, tok));
    }
    entries.sort_by_key(|(id, _)| *id);
    for (id, tok) in entries {
        if (id as usize) < n_pieces {
            // Already a piece; make sure the text agrees and the token is recognised whole.
            if inner.id_to_token(id).as_deref() != Some(tok.content.as_str()) {
                return Err(Error::format(
                    &cfg_path,
                    format!(
                        "added_tokens_decoder[{id}] = {:?} disagrees with {}",
                        tok.content,
                        path.display()
                    ),
                ));
            }
            if tok.special {
                inner
                    .add_special_tokens([tok])
                    .map_err(|e| tok_err(path, e.to_string()))?;
            } else {
                inner.add_tokens([tok]).map_err(|e| tok_err(path, e.to_string()))?;
            }
            continue;
        }
        let content = tok.content.clone();
        if tok.special {
            inner
                .add_special_tokens([tok])
                .map_err(|e| tok_err(path, e.to_string()))?;
        } else {
            inner.add_tokens([tok]).map_err(|e| tok_err(path, e.to_string()))?;
        }
        if inner.token_to_id(&content) != Some(id) {
            return Err(Error::format(
                &cfg_path,
                format!(
                    "added_tokens_decoder: ids are not contiguous after the vocabulary ({content:?} should be {id})"
                ),
            ));
        }
    }
    Ok(())
}

impl Tokenizer {
    /// Builds a tokenizer from a `tokenizer.json` document held in memory (engines store it this way);
    /// `path` names its origin in errors.
    pub fn from_json_str(
        json: &str,
        path: &Path,
        add_bos: bool,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
        chat_template: Option<ChatTemplate>,
    ) -> Result<Self> {
        let inner = json::parse(json).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            problem: format!("invalid tokenizer.json: {e}"),
        })?;
        let vocab_size = id_span(&inner);
        Ok(Tokenizer {
            bos_token: bos_token_id.and_then(|id| inner.id_to_token(id)),
            eos_token: eos_token_ids.first().and_then(|&id| inner.id_to_token(id)),
            inner,
            path: path.to_path_buf(),
            add_bos,
            bos_token_id,
            eos_token_ids,
            chat_template,
            vocab_size,
        })
    }
}
