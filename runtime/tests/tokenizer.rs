//! Tokenizer tests on real vocabularies: SmolLM2's byte-level BPE (GGUF) against HF `tokenizers` ids
//! (tests/fixtures/tokenizer/smollm2_ids.json, from scripts/gen_tokenizer_fixture.py), and the Llama
//! SentencePiece vocabulary (GGUF and `tokenizer.model`) against llama.cpp's 46 test vectors. Tests whose
//! asset is absent print a skip message and pass, or fail under `DLO_REQUIRE_ASSETS=1` (as in CI).

use candle_core::quantized::gguf_file::{self, Value};
use dlo_runtime::chat::Message;
use dlo_runtime::sentencepiece::{PieceType, SpmKind, SpmVocab};
use dlo_runtime::testing::{cache_dir, found_or_skip, smollm2_gguf};
use dlo_runtime::tokenizer::gguf_spm_vocab;
use dlo_runtime::{Error, TextStream, Tokenizer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `(vocab gguf, .inp, .out)` of llama.cpp's SentencePiece test vocabulary.
fn llama_spm_paths() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let root = cache_dir().join("pkgs/llama-cpp-python");
    let found = std::fs::read_dir(&root).ok().and_then(|rd| {
        rd.filter_map(|e| e.ok())
            .map(|e| e.path().join("vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"))
            .find(|p| p.is_file())
    });
    let found = found.map(|p| {
        let inp = PathBuf::from(format!("{}.inp", p.display()));
        let out = PathBuf::from(format!("{}.out", p.display()));
        (p, inp, out)
    });
    let missing = format!(
        "asset {}/*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
        root.display()
    );
    found_or_skip(found, &missing, "DLO_FETCH_LLAMA_CPP=1 bash scripts/fetch-assets.sh")
}

fn read_metadata(path: &Path) -> HashMap<String, Value> {
    let mut f = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut f).unwrap().metadata
}

fn fixture() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/smollm2_ids.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn fixture_cases() -> Vec<(String, Vec<u32>, String)> {
    fixture()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            (
                c["text"].as_str().unwrap().to_string(),
                ids,
                c["decoded"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// llama.cpp's test vectors: inputs separated by `\n__ggml_vocab_test__\n`, one line of ids per input.
fn llama_vectors(inp: &Path, out: &Path) -> Vec<(String, Vec<u32>)> {
    let raw = std::fs::read_to_string(inp).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < raw.len() {
        match raw[pos..].find(sep) {
            Some(n) => {
                texts.push(raw[pos..pos + n].to_string());
                pos += n + sep.len();
            }
            None => {
                texts.push(raw[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "test vector files disagree");
    texts.into_iter().zip(ids).collect()
}

#[test]
fn smollm2_gguf_matches_hf_tokenizers() {
    let Some(path) = smollm2_gguf() else { return };
    let md = read_metadata(&path);
    let tok = Tokenizer::from_gguf(&md, &path)
        .unwrap()
        .expect("SmolLM2 GGUF has a tokenizer");
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.vocab_size(), fixture()["vocab_size"].as_u64().unwrap() as usize);
    assert!(!tok.add_bos);
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.id_to_token(49152), None);

    let sentence = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.";
    assert_eq!(tok.encode(sentence, true).unwrap().len(), 21);

    let cases = fixture_cases();
    assert!(cases.len() >= 10);
    for (text, ids, decoded) in &cases {
        assert_eq!(&tok.encode(text, false).unwrap(), ids, "ids for {text:?}");
        assert_eq!(&tok.decode(ids, false).unwrap(), decoded, "decode of {text:?}");
        assert_eq!(&tok.decode(ids, false).unwrap(), text, "round trip of {text:?}");
    }
}

#[test]
fn smollm2_round_trips_and_special_tokens() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = Tokenizer::from_gguf(&read_metadata(&path), &path).unwrap().unwrap();
    for text in [
        "3.14159 and 2718281828459045 and ٣٤٥",
        "Grüße aus Köln — ça va? ñandú. Ωμέγα. 中文字符 🧪🧬",
        "\u{1F600}\u{200D}\u{1F525} zero\u{200B}width",
        "tab\tnewline\n\ncarriage\r\nend ",
        "trailing spaces   ",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Special-token text is one id; decoding can skip it.
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi");
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = Tokenizer::from_gguf(&read_metadata(&path), &path).unwrap().unwrap();
    let tmpl = tok.chat_template.as_ref().expect("SmolLM2 has a chat template");
    let out = tmpl
        .render(&[Message::new("user", "What is the capital of France?")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    for chat in fixture()["chats"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let gen = chat["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(tmpl.render(&msgs, gen).unwrap(), chat["rendered"].as_str().unwrap());
    }
    let ids = tok.encode_chat(&[Message::new("user", "Hi")], true).unwrap();
    assert_eq!(ids[0], 1, "starts with <|im_start|>");
    let tail = tok.encode("<|im_start|>assistant\n", false).unwrap();
    assert_eq!(tail.len(), 4);
    assert!(ids.ends_with(&tail), "{ids:?}");
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        3,
        "system, user and assistant turns: {ids:?}"
    );
}

#[test]
fn smollm2_text_stream_waits_for_complete_characters() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = Tokenizer::from_gguf(&read_metadata(&path), &path).unwrap().unwrap();
    let text = "Llamas 🦙 say «héllo» 👍🏽 in 日本語!";
    let ids = tok.encode(text, false).unwrap();
    // The llama emoji takes several byte-level tokens, so some pushes must hold text back.
    assert!(tok.encode("🦙", false).unwrap().len() > 1);
    let mut stream = tok.stream(false);
    let mut out = String::new();
    let mut empty_pushes = 0;
    for &id in &ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "partial character emitted: {piece:?}");
        empty_pushes += usize::from(piece.is_empty());
        out.push_str(&piece);
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, text);
    assert!(empty_pushes > 0);

    // A stream cut in the middle of a character emits the replacement character on finish.
    let emoji = tok.encode("🦙", false).unwrap();
    let mut stream = TextStream::new(&tok, false);
    assert_eq!(stream.push(emoji[0]).unwrap(), "");
    assert_eq!(stream.finish().unwrap().chars().next(), Some('\u{FFFD}'));
}

#[test]
fn smollm2_tokenizer_json_round_trip() {
    let Some(path) = smollm2_gguf() else { return };
    let tok = Tokenizer::from_gguf(&read_metadata(&path), &path).unwrap().unwrap();
    let cases = fixture_cases();

    // The raw `tokenizers` serialization, loaded on its own.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.json");
    std::fs::write(&raw, tok.inner().to_string(false).unwrap()).unwrap();
    let raw_tok = Tokenizer::from_tokenizer_json(&raw).unwrap();
    assert!(!raw_tok.add_bos, "SmolLM2 adds no BOS");
    assert!(raw_tok.chat_template.is_none());
    for (text, ids, _) in &cases {
        assert_eq!(
            &raw_tok.encode(text, false).unwrap(),
            ids,
            "raw tokenizer.json: {text:?}"
        );
    }

    // An HF directory: tokenizer.json (legacy merges) + tokenizer_config.json.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    tok.write_hf_files(&hf).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer.json")).unwrap()).unwrap();
    assert!(
        json["model"]["merges"][0].is_string(),
        "merges should be written as \"a b\" strings"
    );
    let back = Tokenizer::from_hf_dir(&hf)
        .unwrap()
        .expect("written directory has a tokenizer");
    for (text, ids, decoded) in &cases {
        assert_eq!(&back.encode(text, true).unwrap(), ids, "tokenizer.json: {text:?}");
        assert_eq!(&back.decode(ids, false).unwrap(), decoded);
    }
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.add_bos, tok.add_bos);
    assert_eq!(back.eos_token_ids, tok.eos_token_ids);
    assert_eq!(back.bos_token_id, tok.bos_token_id);
    let msgs = [Message::new("user", "Hi")];
    assert_eq!(
        back.chat_template.as_ref().unwrap().render(&msgs, true).unwrap(),
        tok.chat_template.as_ref().unwrap().render(&msgs, true).unwrap()
    );
}

#[test]
fn llama_spm_gguf_matches_llama_cpp_vectors() {
    let Some((vocab, inp, out)) = llama_spm_paths() else {
        return;
    };
    let md = read_metadata(&vocab);
    let tok = Tokenizer::from_gguf(&md, &vocab)
        .unwrap()
        .expect("vocab has a tokenizer");
    assert_eq!(tok.vocab_size(), 32000);
    assert!(tok.add_bos);
    assert_eq!(tok.bos_token_id, Some(1));
    assert_eq!(tok.eos_token_ids, vec![2]);
    let vectors = llama_vectors(&inp, &out);
    assert_eq!(vectors.len(), 46);
    let mut failures = Vec::new();
    for (text, ids) in &vectors {
        let got = tok.encode(text, false).unwrap();
        if &got != ids {
            failures.push(format!("{text:?}: expected {ids:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors differ:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
    // BOS is added on request only.
    let with_bos = tok.encode("Hello world", true).unwrap();
    assert_eq!(with_bos[0], 1);
    assert_eq!(&with_bos[1..], tok.encode("Hello world", false).unwrap().as_slice());
    // Decoding undoes the dummy prefix and byte fallback.
    for (text, ids) in &vectors {
        assert_eq!(&tok.decode(ids, false).unwrap(), text, "decode of {ids:?}");
    }

    // Streaming: the first token's dummy-prefix space is dropped, later spaces kept; a context keeps it;
    // byte-fallback pieces of one character are held back until it is complete.
    let hello = tok.encode("Hello world", false).unwrap();
    assert_eq!(hello.len(), 2);
    let mut s = tok.stream(false);
    assert_eq!(s.push(hello[0]).unwrap(), "Hello");
    assert_eq!(s.push(hello[1]).unwrap(), " world");
    let mut s = TextStream::with_context(&tok, false, &hello[..1]);
    assert_eq!(s.push(hello[1]).unwrap(), " world");
    let text = " this is 🦙.cpp";
    let ids = tok.encode(text, false).unwrap();
    let mut s = tok.stream(false);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(s.push(id).unwrap());
    }
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.iter().filter(|p| p.is_empty()).count() >= 3,
        "4 byte pieces, 3 held back: {pieces:?}"
    );
    assert_eq!(pieces.concat(), tok.decode(&ids, false).unwrap());

    // A tokenizer.json exported from it and loaded without any config still adds BOS (post-processor).
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokenizer.json");
    std::fs::write(&json, tok.to_hf_tokenizer_json().unwrap()).unwrap();
    let bare = Tokenizer::from_tokenizer_json(&json).unwrap();
    assert!(bare.add_bos);
    assert_eq!(bare.bos_token.as_deref(), Some("<s>"));
    assert_eq!(bare.encode("Hello world", true).unwrap(), with_bos);
}

#[test]
fn llama_spm_tokenizer_model_matches_gguf() {
    let Some((vocab_path, inp, out)) = llama_spm_paths() else {
        return;
    };
    let md = read_metadata(&vocab_path);
    let gguf_tok = Tokenizer::from_gguf(&md, &vocab_path).unwrap().unwrap();
    let vocab = gguf_spm_vocab(&md, &vocab_path).unwrap().expect("llama vocabulary");
    let proto = vocab.to_proto(Some(1), Some(2));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.model"),
        prost::Message::encode_to_vec(&proto),
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path())
        .unwrap()
        .expect("tokenizer.model found");
    assert_eq!(tok.path(), dir.path().join("tokenizer.model"));
    assert!(tok.add_bos);
    assert_eq!(tok.bos_token_id, Some(1));
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
    for (text, ids) in llama_vectors(&inp, &out) {
        let got = tok.encode(&text, false).unwrap();
        assert_eq!(got, gguf_tok.encode(&text, false).unwrap(), "{text:?}");
        assert_eq!(got, ids, "{text:?}");
    }

    // tokenizer_config.json overrides: bos/eos as AddedToken objects, a named template list, extra EOS ids
    // from generation_config.json, and an added token beyond the SentencePiece vocabulary.
    let cfg = serde_json::json!({
        "add_bos_token": false,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": true},
        "eos_token": {"content": "</s>"},
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}"}
        ],
        "added_tokens_decoder": {
            "32000": {"content": "<pad>", "special": true, "normalized": false, "lstrip": false, "rstrip": false, "single_word": false}
        }
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 32000]}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap().unwrap();
    assert!(!tok.add_bos);
    assert_eq!(tok.encode("Hello", true).unwrap(), tok.encode("Hello", false).unwrap());
    assert_eq!(tok.eos_token_ids, vec![2, 32000]);
    assert_eq!(tok.token_to_id("<pad>"), Some(32000));
    assert_eq!(tok.vocab_size(), 32001);
    let rendered = tok
        .chat_template
        .as_ref()
        .unwrap()
        .render(&[Message::new("user", "x")], false)
        .unwrap();
    assert_eq!(rendered, "<s>[x]</s>");
}

/// A tiny SentencePiece BPE vocabulary: no assets needed.
fn tiny_spm() -> SpmVocab {
    let mut pieces: Vec<(String, f32, PieceType)> = vec![
        ("<unk>".into(), 0.0, PieceType::Unknown),
        ("<s>".into(), 0.0, PieceType::Control),
        ("</s>".into(), 0.0, PieceType::Control),
    ];
    for b in 0..=255u8 {
        pieces.push((format!("<0x{b:02X}>"), 0.0, PieceType::Byte));
    }
    for (p, s) in [
        ("▁a", -1.0),
        ("ab", -2.0),
        ("▁ab", -3.0),
        ("▁", -4.0),
        ("a", -5.0),
        ("b", -6.0),
        ("c", -7.0),
    ] {
        pieces.push((p.into(), s, PieceType::Normal));
    }
    SpmVocab {
        pieces,
        kind: SpmKind::Bpe,
        add_dummy_prefix: true,
        byte_fallback: true,
        remove_extra_whitespaces: false,
        unk_id: Some(0),
        precompiled_charsmap: None,
    }
}

#[test]
fn tiny_spm_merges_by_score_with_byte_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let proto = tiny_spm().to_proto(Some(1), Some(2));
    std::fs::write(
        dir.path().join("tokenizer.model"),
        prost::Message::encode_to_vec(&proto),
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap().unwrap();
    let id = |p: &str| tok.token_to_id(p).unwrap();
    // "▁ab": "▁"+"a" (score -1) merges first, then "▁a"+"b" (-3); "ab" (-2) never gets the chance.
    assert_eq!(tok.encode("ab", false).unwrap(), vec![id("▁ab")]);
    assert_eq!(tok.encode("cab", false).unwrap(), vec![id("▁"), id("c"), id("ab")]);
    // "é" is not a piece: UTF-8 bytes C3 A9.
    assert_eq!(
        tok.encode("é", false).unwrap(),
        vec![id("▁"), id("<0xC3>"), id("<0xA9>")]
    );
    assert_eq!(
        tok.decode(&tok.encode("a é cab", false).unwrap(), false).unwrap(),
        "a é cab"
    );
    assert_eq!(tok.encode("a", true).unwrap(), vec![1, id("▁a")]);
}

// ---- bad input ----

#[test]
fn malformed_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"model\": {\"type\": \"BPE\", \"vocab\": 7}",
    )
    .unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // A valid tokenizer.json with a broken tokenizer_config.json: the error names the config.
    let tiny = Tokenizer::from_gguf(&tiny_gguf_md(), Path::new("tiny.gguf"))
        .unwrap()
        .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tiny.to_hf_tokenizer_json().unwrap()).unwrap();
    assert!(Tokenizer::from_hf_dir(dir.path()).unwrap().is_some());
    std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": 5}"#).unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("tokenizer_config.json") && err.to_string().contains("chat_template"),
        "{err}"
    );
}

#[test]
fn directory_without_tokenizer_is_none() {
    let dir = tempfile::tempdir().unwrap();
    assert!(Tokenizer::from_hf_dir(dir.path()).unwrap().is_none());
    // A config without a tokenizer is not a tokenizer (and not an error).
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    assert!(Tokenizer::from_hf_dir(dir.path()).unwrap().is_none());
    assert!(Tokenizer::from_gguf(&HashMap::new(), Path::new("x.gguf"))
        .unwrap()
        .is_none());
}

#[test]
fn truncated_or_garbage_tokenizer_model_is_an_error() {
    let bytes = prost::Message::encode_to_vec(&tiny_spm().to_proto(Some(1), Some(2)));
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tokenizer.model");
    for bad in [
        &bytes[..bytes.len() / 2],
        &bytes[..7],
        b"\xff\xff\xff\xff not a protobuf".as_slice(),
        b"",
    ] {
        std::fs::write(&model, bad).unwrap();
        let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.model"), "{err}");
    }
}

fn tiny_gguf_md() -> HashMap<String, Value> {
    let s = |v: &str| Value::String(v.into());
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), s("gpt2"));
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(["<|eos|>", "a", "b", "ab"].map(s).to_vec()),
    );
    md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![s("a b")]));
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array([3, 1, 1, 1].map(Value::I32).to_vec()),
    );
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(0));
    md
}

#[test]
fn tiny_gguf_gpt2_builds() {
    let tok = Tokenizer::from_gguf(&tiny_gguf_md(), Path::new("tiny.gguf"))
        .unwrap()
        .unwrap();
    assert_eq!(tok.encode("ab<|eos|>a", true).unwrap(), vec![3, 0, 1]);
    assert_eq!(tok.eos_token_ids, vec![0]);
    assert!(!tok.add_bos);
}

#[test]
fn malformed_gguf_metadata_names_file_and_key() {
    let path = Path::new("/models/bad.gguf");
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::U32(1), Value::U32(2)]),
            "tokenizer.ggml.tokens",
        ),
        (
            "tokenizer.ggml.tokens",
            Value::String("abc".into()),
            "tokenizer.ggml.tokens",
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("ab".into())]),
            "tokenizer.ggml.merges",
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a x".into())]),
            "tokenizer.ggml.merges",
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vec![Value::I32(1)]),
            "tokenizer.ggml.token_type",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(99),
            "tokenizer.ggml.eos_token_id",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Value::String("x".into()),
            "tokenizer.ggml.eos_token_id",
        ),
        (
            "tokenizer.ggml.pre",
            Value::String("mystery".into()),
            "tokenizer.ggml.pre",
        ),
        (
            "tokenizer.ggml.model",
            Value::String("bert".into()),
            "tokenizer.ggml.model",
        ),
        ("tokenizer.chat_template", Value::U8(1), "tokenizer.chat_template"),
    ];
    for (key, value, expect) in cases {
        let mut md = tiny_gguf_md();
        md.insert(key.into(), value);
        let err = Tokenizer::from_gguf(&md, path).unwrap_err().to_string();
        assert!(err.contains("bad.gguf") && err.contains(expect), "{key}: {err}");
    }
    let mut md = tiny_gguf_md();
    md.remove("tokenizer.ggml.merges");
    let err = Tokenizer::from_gguf(&md, path).unwrap_err().to_string();
    assert!(
        err.contains("bad.gguf") && err.contains("tokenizer.ggml.merges"),
        "{err}"
    );
    // llama (SentencePiece) needs scores of the right length.
    let mut md = tiny_gguf_md();
    md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    md.insert("tokenizer.ggml.scores".into(), Value::Array(vec![Value::F32(0.0)]));
    let err = Tokenizer::from_gguf(&md, path).unwrap_err().to_string();
    assert!(
        err.contains("bad.gguf") && err.contains("tokenizer.ggml.scores"),
        "{err}"
    );
}

/// `tokenizer.model` files trained by the `sentencepiece` library (scripts/gen_tokenizer_fixture.py) and the
/// ids that library gives: BPE with byte fallback, and unigram (both with `remove_extra_whitespaces`).
#[test]
fn sentencepiece_models_match_the_sentencepiece_library() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("spm_ids.json")).unwrap()).unwrap();
    for kind in ["bpe", "unigram"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixtures.join(format!("spm_{kind}.model")),
            dir.path().join("tokenizer.model"),
        )
        .unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap().unwrap();
        assert!(tok.add_bos);
        assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
        let cases = expected[kind].as_array().unwrap();
        assert!(cases.len() >= 10);
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let ids: Vec<u32> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text, false).unwrap(), ids, "{kind}: {text:?}");
            // sentencepiece shows <unk> as " ⁇ "; HF tokenizers (and we) show the piece, "<unk>".
            if !ids.contains(&0) {
                assert_eq!(
                    tok.decode(&ids, false).unwrap(),
                    c["decoded"].as_str().unwrap(),
                    "{kind}: decode {ids:?}"
                );
            }
        }
    }
}

/// Every vocabulary in llama.cpp's `models/` that has test vectors and a tokenizer kind we support
/// (byte-level BPE with its pre-tokenizer, SentencePiece BPE) encodes all its vectors exactly.
#[test]
fn llama_cpp_vocabularies_match_their_test_vectors() {
    let Some((spm, _, _)) = llama_spm_paths() else { return };
    let models = spm.parent().unwrap();
    let names = [
        "command-r",
        "deepseek-coder",
        "deepseek-llm",
        "falcon",
        "gpt-2",
        "llama-bpe",
        "llama-spm",
        "mpt",
        "phi-3",
        "qwen2",
        "qwen35",
        "refact",
        "starcoder",
    ];
    let mut report = Vec::new();
    let mut total_bad = 0;
    for name in names {
        let vocab = models.join(format!("ggml-vocab-{name}.gguf"));
        let inp = models.join(format!("ggml-vocab-{name}.gguf.inp"));
        let out = models.join(format!("ggml-vocab-{name}.gguf.out"));
        let tok = Tokenizer::from_gguf(&read_metadata(&vocab), &vocab).unwrap().unwrap();
        if name == "llama-bpe" {
            // llama.cpp adds BOS for Llama 3 when the GGUF does not say.
            assert!(tok.add_bos);
            assert_eq!(tok.bos_token.as_deref(), Some("<|begin_of_text|>"));
        }
        let vectors = llama_vectors(&inp, &out);
        let mut bad = 0;
        for (text, ids) in &vectors {
            let got = tok.encode(text, false).unwrap();
            if &got != ids {
                bad += 1;
                eprintln!("{name}: {text:?}\n  expected {ids:?}\n  got      {got:?}");
            }
        }
        total_bad += bad;
        report.push(format!("{name}: {}/{}", vectors.len() - bad, vectors.len()));
    }
    eprintln!("{}", report.join(", "));
    assert_eq!(total_bad, 0, "{}", report.join(", "));
}
