//! Reading `tokenizer.json` quickly.
//!
//! `tokenizers` reads a tokenizer's model through an untagged enum: serde buffers the whole model (SmolLM2:
//! 49,152 vocabulary entries and 48,900 merges) into a generic tree, converts it to a `serde_json::Value`,
//! and only then into the BPE model. On SmolLM2 that took most of an engine's load time. Here the top level
//! is split into raw JSON slices, a BPE model is read straight into the vocabulary and merge list that
//! `tokenizers`' BPE builder takes (its own reader buffers the merges once more to tell their two forms
//! apart), and the tokenizer is assembled from its parts with `tokenizers`' builder, adding the added tokens
//! in the order and with the call its own reader uses. Anything else (other models, ids that would come out differently) goes through
//! `tokenizers`' reader, so the result is always what it would build.

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::collections::HashMap;
use tokenizers::models::bpe::BPE;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerBuilder, TruncationParams,
};

/// Parses `tokenizer.json` text; errors are `tokenizers`' own.
pub(crate) fn parse(json: &str) -> tokenizers::Result<tokenizers::Tokenizer> {
    match parse_bpe(json) {
        Some(t) => Ok(t),
        None => json.parse(),
    }
}

/// The direct route for a BPE model; `None` where it does not apply or could differ from `tokenizers`'
/// reader.
fn parse_bpe(json: &str) -> Option<tokenizers::Tokenizer> {
    let parts: HashMap<&str, &RawValue> = serde_json::from_str(json).ok()?;
    let model = parts.get("model")?.get();
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<&'a str>,
    }
    let kind: Kind = serde_json::from_str(model).ok()?;
    if kind.kind != Some("BPE") {
        return None;
    }
    let bpe = serde_json::from_str::<BpeJson>(model).ok()?.build()?;

    /// A part that may be absent or `null`.
    fn part<T: for<'de> Deserialize<'de>>(parts: &HashMap<&str, &RawValue>, key: &str) -> Option<Option<T>> {
        match parts.get(key) {
            None => Some(None),
            Some(raw) => serde_json::from_str::<Option<T>>(raw.get()).ok(),
        }
    }
    #[derive(Deserialize)]
    struct AddedWithId {
        id: u32,
        #[serde(flatten)]
        token: AddedToken,
    }
    let added: Vec<AddedWithId> = part(&parts, "added_tokens")?.unwrap_or_default();
    let built = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(ModelWrapper::BPE(bpe))
    .with_normalizer(part(&parts, "normalizer")?)
    .with_pre_tokenizer(part(&parts, "pre_tokenizer")?)
    .with_post_processor(part(&parts, "post_processor")?)
    .with_decoder(part(&parts, "decoder")?)
    .with_truncation(part::<TruncationParams>(&parts, "truncation")?)
    .with_padding(part::<PaddingParams>(&parts, "padding")?)
    .build()
    .ok()?;
    let mut tokenizer = tokenizers::Tokenizer::from(built);
    tokenizer.add_tokens(added.iter().map(|t| t.token.clone())).ok()?;
    // tokenizers keeps the model's id where it differs from the file's (with a warning); leave such files
    // to it.
    added
        .iter()
        .all(|t| tokenizer.token_to_id(&t.token.content) == Some(t.id))
        .then_some(tokenizer)
}

/// A BPE model's fields, as `tokenizers`' BPE reader takes them (absent options keep the builder's defaults).
#[derive(Deserialize)]
struct BpeJson {
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    vocab: tokenizers::models::bpe::Vocab,
    merges: MergeList,
}

impl BpeJson {
    fn build(self) -> Option<BPE> {
        let mut b = BPE::builder().vocab_and_merges(self.vocab, self.merges.0);
        if let Some(x) = self.dropout {
            b = b.dropout(x);
        }
        if let Some(x) = self.unk_token {
            b = b.unk_token(x);
        }
        if let Some(x) = self.continuing_subword_prefix {
            b = b.continuing_subword_prefix(x);
        }
        if let Some(x) = self.end_of_word_suffix {
            b = b.end_of_word_suffix(x);
        }
        if let Some(x) = self.fuse_unk {
            b = b.fuse_unk(x);
        }
        if let Some(x) = self.byte_fallback {
            b = b.byte_fallback(x);
        }
        if let Some(x) = self.ignore_merges {
            b = b.ignore_merges(x);
        }
        b.build().ok()
    }
}

/// `merges` in either of its forms, read in one pass: `[["a", "b"], …]`, or legacy `["a b", …]` (lines
/// starting `#version` skipped, every other line exactly two space-separated parts). A list mixing the forms
/// is refused, as `tokenizers` refuses it.
struct MergeList(Vec<(String, String)>);

/// One merge, either form.
enum Merge {
    Pair(String, String),
    Line(String),
}

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Merge;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a merge: [\"a\", \"b\"] or \"a b\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Merge, E> {
                Ok(Merge::Line(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Merge, E> {
                Ok(Merge::Line(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                use serde::de::Error;
                let a: String = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let b: String = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(1, &self))?;
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(3, &self));
                }
                Ok(Merge::Pair(a, b))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for MergeList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MergeList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of merges, all pairs or all lines")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MergeList, A::Error> {
                use serde::de::Error;
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                let mut pairs = None;
                while let Some(m) = seq.next_element::<Merge>()? {
                    let is_pair = matches!(m, Merge::Pair(..));
                    if *pairs.get_or_insert(is_pair) != is_pair {
                        return Err(A::Error::custom("merges mix pairs and lines"));
                    }
                    match m {
                        Merge::Pair(a, b) => out.push((a, b)),
                        Merge::Line(l) if l.starts_with("#version") => {}
                        Merge::Line(l) => match l.split(' ').collect::<Vec<_>>()[..] {
                            [a, b] => out.push((a.to_owned(), b.to_owned())),
                            _ => return Err(A::Error::custom(format!("merge {} is not two parts", out.len() + 1))),
                        },
                    }
                }
                Ok(MergeList(out))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library(json: &str) -> tokenizers::Tokenizer {
        json.parse().unwrap()
    }

    /// A small byte-level BPE with the parts a LLaMA-family tokenizer.json has.
    fn bpe_json(added_id: u32) -> String {
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": added_id, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                              "use_regex": true},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                               "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false,
                      "vocab": {"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6, "Ġ": 7,
                                "hell": 8},
                      "merges": [["h", "e"], ["l", "l"], ["he", "ll"]]}
        })
        .to_string()
    }

    #[test]
    fn bpe_tokenizers_read_as_tokenizers_reads_them() {
        let json = bpe_json(0);
        assert!(parse_bpe(&json).is_some(), "the direct route applies");
        let (ours, theirs) = (parse(&json).unwrap(), library(&json));
        assert_eq!(ours.to_string(false).unwrap(), theirs.to_string(false).unwrap());
        for text in ["hello", "hell<|endoftext|>o he"] {
            let a = ours.encode(text, true).unwrap();
            let b = theirs.encode(text, true).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{text}");
        }
    }

    #[test]
    fn legacy_merge_lines_read_as_tokenizers_reads_them() {
        let mut v: serde_json::Value = serde_json::from_str(&bpe_json(0)).unwrap();
        v["model"]["merges"] = serde_json::json!(["#version: 0.2", "h e", "l l", "he ll"]);
        let json = v.to_string();
        assert!(parse_bpe(&json).is_some());
        assert_eq!(
            parse(&json).unwrap().to_string(false).unwrap(),
            library(&json).to_string(false).unwrap()
        );
        // Malformed or mixed lists are left to tokenizers, which refuses them.
        for bad in [serde_json::json!(["h e f"]), serde_json::json!([["h", "e"], "l l"])] {
            v["model"]["merges"] = bad;
            let json = v.to_string();
            assert!(parse_bpe(&json).is_none() && parse(&json).is_err(), "{json}");
        }
    }

    #[test]
    fn other_files_go_through_tokenizers() {
        // An added token whose id disagrees with the vocabulary: tokenizers keeps the vocabulary's.
        let json = bpe_json(3);
        assert!(parse_bpe(&json).is_none());
        assert_eq!(
            parse(&json).unwrap().to_string(false).unwrap(),
            library(&json).to_string(false).unwrap()
        );
        // Not BPE.
        let wl = serde_json::json!({
            "version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}
        })
        .to_string();
        assert!(parse_bpe(&wl).is_none());
        assert_eq!(
            parse(&wl).unwrap().to_string(false).unwrap(),
            library(&wl).to_string(false).unwrap()
        );
        // Broken JSON: tokenizers' error.
        assert!(parse("{\"model\": ").is_err());
    }
}

#[cfg(test)]
mod smollm2 {
    /// SmolLM2's tokenizer as engines store it (converted from the GGUF): the direct route applies and gives
    /// what `tokenizers` builds, token for token on real text.
    #[test]
    fn smollm2_tokenizer_reads_directly_as_tokenizers_reads_it() {
        let Some(path) = crate::testing::smollm2_gguf() else {
            return;
        };
        let ck = crate::Checkpoint::open(&path).unwrap();
        let json = ck.tokenizer.as_ref().unwrap().to_hf_tokenizer_json().unwrap();
        let ours = super::parse_bpe(&json).expect("the direct route applies to SmolLM2");
        let theirs: tokenizers::Tokenizer = json.parse().unwrap();
        assert_eq!(ours.to_string(false).unwrap(), theirs.to_string(false).unwrap());
        let text = "<|im_start|>user\nWhat is the capital of France? Ünïcödé, 12345 tabs\tand  spaces.<|im_end|>";
        assert_eq!(
            ours.encode(text, false).unwrap().get_ids(),
            theirs.encode(text, false).unwrap().get_ids()
        );
    }
}
