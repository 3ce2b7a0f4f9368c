//! GGUF vocabularies → [`Tokenizer`]: llama.cpp's `tokenizer.ggml.*` metadata converted into a `tokenizers`
//! tokenizer, so that a GGUF file tokenizes exactly as llama.cpp does. `gpt2` vocabularies become byte-level
//! BPE with llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`; `llama` vocabularies become SentencePiece BPE
//! ([`SpmVocab`]). Metadata is read with the getters of [`crate::gguf::Metadata`].

use super::{tok_err, Specials, Tokenizer};
use crate::error::{Error, Result};
use crate::gguf::Metadata;
use crate::sentencepiece::{bos_post_processor, PieceType, SpmKind, SpmVocab};
use candle_core::quantized::gguf_file::Value as GgufValue;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

impl Tokenizer {
    /// Builds the tokenizer embedded in GGUF metadata (`tokenizer.ggml.*`): `gpt2` (byte-level BPE) or `llama`
    /// (SentencePiece BPE). `Ok(None)` when the file has no vocabulary (`tokenizer.ggml.model` absent, `none`
    /// or `no_vocab`). Malformed metadata gives an error naming `path` and the key.
    pub fn from_gguf(md: &HashMap<String, GgufValue>, path: &Path) -> Result<Option<Self>> {
        let meta = Metadata::new(md, path);
        let Some(model) = meta.string("tokenizer.ggml.model")? else {
            return Ok(None);
        };
        let tokens = || -> Result<Vec<String>> {
            meta.string_array("tokenizer.ggml.tokens")?
                .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))
        };
        let (inner, tokens, default_add_bos) = match model {
            "none" | "no_vocab" => return Ok(None),
            "gpt2" => {
                let tokens = tokens()?;
                let (inner, add_bos) = byte_level_bpe(&meta, path, &tokens)?;
                (inner, tokens, add_bos)
            }
            "llama" => {
                let tokens = tokens()?;
                (sentencepiece(&meta, path, &tokens)?, tokens, true)
            }
            other => {
                return Err(tok_err(
                    path,
                    format!("unsupported GGUF tokenizer `tokenizer.ggml.model` = {other:?} (supported: gpt2, llama)"),
                ))
            }
        };
        let id_to_text = |key: &str| -> Result<Option<String>> {
            match meta.u32(key)? {
                None => Ok(None),
                Some(id) => tokens
                    .get(id as usize)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| Error::format(path, format!("GGUF metadata `{key}` = {id} is not a token id"))),
            }
        };
        let mut extra_eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = meta.u32(key)? {
                if (id as usize) < tokens.len() {
                    extra_eos_ids.push(id);
                }
            }
        }
        let specials = Specials {
            add_bos: meta.bool("tokenizer.ggml.add_bos_token")?.or(Some(default_add_bos)),
            bos: id_to_text("tokenizer.ggml.bos_token_id")?,
            eos: id_to_text("tokenizer.ggml.eos_token_id")?,
            extra_eos_ids,
            chat_template: meta.string("tokenizer.chat_template")?.map(str::to_string),
        };
        let mut inner = inner;
        if specials.add_bos == Some(true) {
            if let Some(bos) = &specials.bos {
                if let Some(id) = inner.token_to_id(bos) {
                    inner.with_post_processor(Some(bos_post_processor(bos, id).map_err(|p| tok_err(path, p))?));
                }
            }
        }
        Self::finish(inner, path.to_path_buf(), specials, Some(default_add_bos)).map(Some)
    }
}

/// `tokenizer.ggml.token_type`, checked against the number of tokens; all `Normal` when absent.
fn token_types(meta: &Metadata, path: &Path, n: usize) -> Result<Vec<PieceType>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let Some(a) = meta.int_array(KEY)? else {
        return Ok(vec![PieceType::Normal; n]);
    };
    if a.len() != n {
        return Err(Error::format(
            path,
            format!("GGUF metadata `{KEY}` has {} entries for {n} tokens", a.len()),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, &t)| {
            i32::try_from(t)
                .ok()
                .and_then(PieceType::from_i32)
                .ok_or_else(|| Error::format(path, format!("GGUF metadata `{KEY}`: token {i} has unknown type {t}")))
        })
        .collect()
}

/// llama.cpp's pre-tokenizer regexes (`llm_tokenizer_bpe`), each applied in turn like an HF `Split(Isolated)`;
/// where HF's own `tokenizer.json` writes a regex differently (`(?i:'s|…)`), HF's form is used.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];
const RE_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"];
const RE_DEEPSEEK_CODER: &[&str] = &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"];
const RE_DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];

/// How llama.cpp splits text for `tokenizer.ggml.pre`: the pre-tokenizer, whether whole words in the
/// vocabulary skip the merges (`ignore_merges`), and whether BOS is added when the GGUF does not say.
fn pre_tokenizer(pre: Option<&str>, path: &Path) -> Result<(PreTokenizerWrapper, bool, bool)> {
    let splits = |res: &[&str]| -> Result<PreTokenizerWrapper> {
        let mut seq: Vec<PreTokenizerWrapper> = Vec::with_capacity(res.len() + 1);
        for re in res {
            let s = Split::new(
                SplitPattern::Regex((*re).into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| tok_err(path, format!("pre-tokenizer regex {re:?}: {e}")))?;
            seq.push(s.into());
        }
        seq.push(ByteLevel::new(false, true, false).into());
        Ok(PreSequence::new(seq).into())
    };
    // GPT-2's regex is ByteLevel's own (plus a trailing `\s+`, which changes nothing when splitting).
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, true, true).into() };
    Ok(match pre.unwrap_or("default") {
        "default" => (splits(RE_DEFAULT)?, false, false),
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => (gpt2(), false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => (
            PreSequence::new(vec![Digits::new(true).into(), gpt2()]).into(),
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" => {
            (splits(&[RE_LLAMA3])?, true, true)
        }
        "dbrx" | "smaug-bpe" => (splits(&[RE_LLAMA3])?, false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (splits(&[RE_QWEN2])?, false, false),
        "qwen35" => (splits(&[RE_QWEN35])?, false, false),
        "falcon" => (splits(RE_FALCON)?, false, false),
        "deepseek-coder" => (splits(RE_DEEPSEEK_CODER)?, false, false),
        "deepseek-llm" => (splits(RE_DEEPSEEK_LLM)?, false, false),
        other => {
            return Err(tok_err(
                path,
                format!(
                    "unsupported GGUF pre-tokenizer `tokenizer.ggml.pre` = {other:?} (supported: default, gpt-2, \
                     phi-2, mpt, olmo, jais, exaone4, smollm, starcoder, refact, command-r, codeshell, exaone, \
                     llama3, llama-v3, llama-bpe, falcon3, falcon-h1, pixtral, dbrx, smaug-bpe, qwen2, \
                     deepseek-r1-qwen, stablelm2, qwen35, falcon, deepseek-coder, deepseek-llm)"
                ),
            ))
        }
    })
}

/// `tokenizer.ggml.model = gpt2`: byte-level BPE, control tokens special, user-defined tokens added. Also
/// returns whether llama.cpp adds BOS for this pre-tokenizer when `tokenizer.ggml.add_bos_token` is absent.
fn byte_level_bpe(meta: &Metadata, path: &Path, tokens: &[String]) -> Result<(tokenizers::Tokenizer, bool)> {
    let merges_raw = meta
        .string_array("tokenizer.ggml.merges")?
        .ok_or_else(|| Error::format(path, "GGUF metadata lacks `tokenizer.ggml.merges` (needed for gpt2)"))?;
    let types = token_types(meta, path, tokens.len())?;
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            Error::format(
                path,
                format!("GGUF metadata `tokenizer.ggml.merges`: merge {i} ({m:?}) is not `a b`"),
            )
        })?;
        if !vocab.contains_key(a) || !vocab.contains_key(b) || !vocab.contains_key(&format!("{a}{b}")) {
            return Err(Error::format(
                path,
                format!("GGUF metadata `tokenizer.ggml.merges`: merge {i} ({m:?}) uses a token not in the vocabulary"),
            ));
        }
        merges.push((a.to_string(), b.to_string()));
    }
    let pre = meta.string("tokenizer.ggml.pre")?;
    let (pre_tok, ignore_merges, add_bos) = pre_tokenizer(pre, path)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| tok_err(path, format!("building the BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tok));
    inner.with_decoder(Some(ByteLevel::new(true, true, true)));
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (t, ty) in tokens.iter().zip(&types) {
        match ty {
            PieceType::Control | PieceType::Unknown => {
                special.push(AddedToken::from(t.clone(), true).normalized(false))
            }
            PieceType::UserDefined => user.push(AddedToken::from(t.clone(), false).normalized(false)),
            _ => {}
        }
    }
    inner
        .add_special_tokens(special)
        .map_err(|e| tok_err(path, e.to_string()))?;
    inner.add_tokens(user).map_err(|e| tok_err(path, e.to_string()))?;
    Ok((inner, add_bos))
}

/// `tokenizer.ggml.model = llama`: a SentencePiece BPE vocabulary with scores.
fn sentencepiece(meta: &Metadata, path: &Path, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    // BOS post-processing is attached by the caller once add_bos is known.
    spm_vocab_from_gguf(meta, path, tokens)?
        .build(None)
        .map_err(|p| tok_err(path, p))
}

fn spm_vocab_from_gguf(meta: &Metadata, path: &Path, tokens: &[String]) -> Result<SpmVocab> {
    const SCORES: &str = "tokenizer.ggml.scores";
    let scores = meta
        .f32_array(SCORES)?
        .ok_or_else(|| Error::format(path, format!("GGUF metadata lacks `{SCORES}` (needed for llama)")))?;
    if scores.len() != tokens.len() {
        return Err(Error::format(
            path,
            format!(
                "GGUF metadata `{SCORES}` has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            ),
        ));
    }
    let types = token_types(meta, path, tokens.len())?;
    let unk_id = match meta.u32("tokenizer.ggml.unknown_token_id")? {
        Some(id) if (id as usize) < tokens.len() => Some(id),
        _ => types.iter().position(|t| *t == PieceType::Unknown).map(|i| i as u32),
    };
    Ok(SpmVocab {
        byte_fallback: types.contains(&PieceType::Byte),
        pieces: tokens
            .iter()
            .zip(scores)
            .zip(types)
            .map(|((t, s), ty)| (t.clone(), s, ty))
            .collect(),
        kind: SpmKind::Bpe,
        add_dummy_prefix: meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
        // llama.cpp does not collapse whitespace.
        remove_extra_whitespaces: false,
        unk_id,
        precompiled_charsmap: None,
    })
}

/// The SentencePiece view of a GGUF `llama` vocabulary (pieces, scores, types), e.g. to write a
/// `tokenizer.model` with [`SpmVocab::to_proto`]. `Ok(None)` for other tokenizer kinds.
pub fn gguf_spm_vocab(md: &HashMap<String, GgufValue>, path: &Path) -> Result<Option<SpmVocab>> {
    let meta = Metadata::new(md, path);
    if meta.string("tokenizer.ggml.model")? != Some("llama") {
        return Ok(None);
    }
    let tokens = meta
        .string_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
    spm_vocab_from_gguf(&meta, path, &tokens).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_of_the_wrong_type_is_an_error_naming_the_key_and_the_file() {
        let path = Path::new("m.gguf");
        let md: HashMap<String, GgufValue> = [
            ("s", GgufValue::U8(1)),
            ("n", GgufValue::I32(-1)),
            (
                "a",
                GgufValue::Array(vec![GgufValue::String("x".into()), GgufValue::U8(2)]),
            ),
            ("f", GgufValue::Array(vec![GgufValue::F64(0.5), GgufValue::F32(1.5)])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let meta = Metadata::new(&md, path);
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let e = err(meta.string("s").map(drop));
        assert!(
            e.contains("m.gguf") && e.contains("`s`: expected a string, found U8(1)"),
            "{e}"
        );
        let e = err(meta.u32("n").map(drop));
        assert!(e.contains("`n`") && e.contains("I32(-1)"), "{e}");
        let e = err(meta.string_array("a").map(drop));
        assert!(
            e.contains("`a`: expected an array of strings, element 1 is U8(2)"),
            "{e}"
        );
        let e = err(meta.bool("a").map(drop));
        assert!(e.contains("found an array of String (2 elements)"), "{e}");
        assert!(meta.missing("k").to_string().contains("missing GGUF metadata key `k`"));
        assert_eq!(meta.f32_array("f").unwrap(), Some(vec![0.5, 1.5]));
        assert_eq!(meta.string("absent").unwrap(), None);
    }
}
