//! Reading `tokenizer.json` quickly.
//!
//! `tokenizers` reads a tokenizer's model through an untagged enum: serde buffers the whole model (SmolLM2:
//! 49,152 vocabulary entries and 48,900 merges) into a generic tree, converts it to a `serde_json::Value`,
//! and only then into the BPE model. On SmolLM2 that took most of an engine's load time. Here the top level
//! is split into raw JSON slices, a BPE model is read by its own streaming deserializer, and the tokenizer
//! is assembled from its parts with `tokenizers`' builder, adding the added tokens in the order and with the
//! call its own reader uses. Anything else (other models, ids that would come out differently) goes through
//! `tokenizers`' reader, so the result is always what it would build.

use serde::Deserialize;
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
    let bpe: BPE = serde_json::from_str(model).ok()?;

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
