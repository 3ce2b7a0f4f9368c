//! SentencePiece vocabularies: the `tokenizer.model` protobuf (hand-written `prost` messages, only the fields
//! we use; unknown fields are skipped) and the conversion of a SentencePiece vocabulary, from that file or
//! from GGUF metadata, into an equivalent `tokenizers` tokenizer.
//!
//! BPE-type models are converted the way HF's `LlamaConverter` does it (legacy mode, as Llama-2's shipped
//! `tokenizer.json`): a BPE model whose merges are every split of a piece into two pieces, ordered by the
//! merged piece's score (highest first); `byte_fallback` to `<0xNN>` pieces; normalizer `Prepend("▁")` +
//! `Replace(" ", "▁")`; decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)`. Unigram
//! models use the `tokenizers` Unigram model with a `Metaspace` pre-tokenizer, as HF's `SpmConverter` does.

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

/// The SentencePiece word-boundary marker, U+2581.
pub const SPIECE_UNDERLINE: char = '▁';

/// `sentencepiece_model.proto` `ModelProto` (the fields the tokenizer needs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// The vocabulary, in id order.
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    /// Training options (model type, special ids, byte fallback).
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    /// Normalization options (dummy prefix, precompiled character map).
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`: one vocabulary entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SentencePiece {
    /// The piece text (`▁` for spaces).
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    /// Log-probability (unigram) or merge priority (BPE); higher merges first.
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// A [`PieceType`] value (default `NORMAL`).
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
}

/// `TrainerSpec` (the fields the tokenizer needs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrainerSpec {
    /// 1 = unigram (the default), 2 = BPE, 3 = word, 4 = char.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    /// Vocabulary size the model was trained with.
    #[prost(int32, optional, tag = "4")]
    pub vocab_size: Option<i32>,
    /// Unknown characters become `<0xNN>` byte pieces.
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    /// Id of the unknown piece (default 0).
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
    /// Id of BOS (default 1; -1 = none).
    #[prost(int32, optional, tag = "41")]
    pub bos_id: Option<i32>,
    /// Id of EOS (default 2; -1 = none).
    #[prost(int32, optional, tag = "42")]
    pub eos_id: Option<i32>,
    /// Id of padding (default -1 = none).
    #[prost(int32, optional, tag = "43")]
    pub pad_id: Option<i32>,
    /// Text of the unknown piece (default `<unk>`).
    #[prost(string, optional, tag = "45")]
    pub unk_piece: Option<String>,
    /// Text of BOS (default `<s>`).
    #[prost(string, optional, tag = "46")]
    pub bos_piece: Option<String>,
    /// Text of EOS (default `</s>`).
    #[prost(string, optional, tag = "47")]
    pub eos_piece: Option<String>,
}

/// `NormalizerSpec` (the fields the tokenizer needs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct NormalizerSpec {
    /// Normalization rule name (`identity`, `nmt_nfkc`, ...).
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// Compiled normalization rules (empty for `identity`).
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    /// Prepend `▁` to the input (default true).
    #[prost(bool, optional, tag = "3")]
    pub add_dummy_prefix: Option<bool>,
    /// Collapse runs of whitespace (default true).
    #[prost(bool, optional, tag = "4")]
    pub remove_extra_whitespaces: Option<bool>,
    /// Replace spaces by `▁` (default true).
    #[prost(bool, optional, tag = "5")]
    pub escape_whitespaces: Option<bool>,
}

/// SentencePiece piece types (the same numbers as GGUF `tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal,
    /// The unknown piece.
    Unknown,
    /// A control symbol (`<s>`, `</s>`, chat markers): never produced from text.
    Control,
    /// A user-defined symbol: always matched as a whole.
    UserDefined,
    /// Unused.
    Unused,
    /// A byte piece `<0xNN>`.
    Byte,
}

impl PieceType {
    /// From the protobuf / GGUF number; `None` for values outside 1..=6.
    pub fn from_i32(v: i32) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    /// The protobuf / GGUF number.
    pub fn to_i32(self) -> i32 {
        match self {
            PieceType::Normal => 1,
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::UserDefined => 4,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
        }
    }
}

/// Which SentencePiece algorithm a vocabulary is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmKind {
    /// Merges by score (Llama, Mistral).
    Bpe,
    /// Viterbi over piece log-probabilities (T5-style).
    Unigram,
}

/// A SentencePiece vocabulary with the options that change how text is split.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    /// `(piece, score, type)` in id order.
    pub pieces: Vec<(String, f32, PieceType)>,
    /// The algorithm.
    pub kind: SpmKind,
    /// Prepend `▁` to the text (SentencePiece `add_dummy_prefix`, GGUF `tokenizer.ggml.add_space_prefix`).
    pub add_dummy_prefix: bool,
    /// Unknown characters become byte pieces.
    pub byte_fallback: bool,
    /// Strip leading/trailing spaces and collapse runs of spaces (SentencePiece `remove_extra_whitespaces`).
    pub remove_extra_whitespaces: bool,
    /// Id of the unknown piece.
    pub unk_id: Option<u32>,
    /// Unigram only: the precompiled normalization map.
    pub precompiled_charsmap: Option<Vec<u8>>,
}

impl SpmVocab {
    /// Reads a `tokenizer.model` file's bytes. Errors describe the problem (the caller adds the path).
    pub fn from_model_bytes(bytes: &[u8]) -> Result<Self, String> {
        let proto = <ModelProto as prost::Message>::decode(bytes)
            .map_err(|e| format!("not a SentencePiece model (protobuf decode failed: {e})"))?;
        Self::from_proto(&proto)
    }

    /// Converts a decoded [`ModelProto`].
    pub fn from_proto(proto: &ModelProto) -> Result<Self, String> {
        if proto.pieces.is_empty() {
            return Err("SentencePiece model has no pieces".into());
        }
        let mut pieces = Vec::with_capacity(proto.pieces.len());
        for (i, p) in proto.pieces.iter().enumerate() {
            let text = p.piece.clone().ok_or_else(|| format!("piece {i} has no text"))?;
            let ty = p.r#type.unwrap_or(1);
            let ty = PieceType::from_i32(ty).ok_or_else(|| format!("piece {i} ({text:?}) has unknown type {ty}"))?;
            pieces.push((text, p.score.unwrap_or(0.0), ty));
        }
        let trainer = proto.trainer_spec.clone().unwrap_or_default();
        let kind = match trainer.model_type.unwrap_or(1) {
            1 => SpmKind::Unigram,
            2 => SpmKind::Bpe,
            t => {
                return Err(format!(
                    "unsupported SentencePiece model type {t} (only unigram = 1 and BPE = 2)"
                ))
            }
        };
        let norm = proto.normalizer_spec.clone().unwrap_or_default();
        let unk_id = match trainer.unk_id.unwrap_or(0) {
            id if id >= 0 && (id as usize) < pieces.len() => Some(id as u32),
            _ => pieces.iter().position(|p| p.2 == PieceType::Unknown).map(|i| i as u32),
        };
        let byte_fallback = trainer.byte_fallback.unwrap_or(false) || pieces.iter().any(|p| p.2 == PieceType::Byte);
        Ok(SpmVocab {
            pieces,
            kind,
            add_dummy_prefix: norm.add_dummy_prefix.unwrap_or(true),
            byte_fallback,
            remove_extra_whitespaces: norm.remove_extra_whitespaces.unwrap_or(true),
            unk_id,
            precompiled_charsmap: norm.precompiled_charsmap.filter(|m| !m.is_empty()),
        })
    }

    /// Encodes this vocabulary as a `tokenizer.model` ModelProto (BOS/EOS ids as given).
    pub fn to_proto(&self, bos_id: Option<u32>, eos_id: Option<u32>) -> ModelProto {
        let pieces = self
            .pieces
            .iter()
            .map(|(p, s, t)| SentencePiece {
                piece: Some(p.clone()),
                score: Some(*s),
                r#type: Some(t.to_i32()),
            })
            .collect();
        let piece_of = |id: Option<u32>| id.and_then(|i| self.pieces.get(i as usize)).map(|p| p.0.clone());
        ModelProto {
            pieces,
            trainer_spec: Some(TrainerSpec {
                model_type: Some(if self.kind == SpmKind::Bpe { 2 } else { 1 }),
                vocab_size: Some(self.pieces.len() as i32),
                byte_fallback: Some(self.byte_fallback),
                unk_id: Some(self.unk_id.map_or(-1, |i| i as i32)),
                bos_id: Some(bos_id.map_or(-1, |i| i as i32)),
                eos_id: Some(eos_id.map_or(-1, |i| i as i32)),
                pad_id: Some(-1),
                unk_piece: piece_of(self.unk_id),
                bos_piece: piece_of(bos_id),
                eos_piece: piece_of(eos_id),
            }),
            normalizer_spec: Some(NormalizerSpec {
                name: Some("identity".into()),
                precompiled_charsmap: self.precompiled_charsmap.clone(),
                add_dummy_prefix: Some(self.add_dummy_prefix),
                remove_extra_whitespaces: Some(self.remove_extra_whitespaces),
                escape_whitespaces: Some(true),
            }),
        }
    }

    /// Builds the equivalent `tokenizers` tokenizer. Control and unknown pieces become special added tokens,
    /// user-defined pieces non-special added tokens. `bos` (when given) is added by the post-processor, as
    /// HF's Llama tokenizer does (our [`crate::Tokenizer::encode`] adds it itself and does not use it).
    pub fn build(&self, bos: Option<u32>) -> Result<tokenizers::Tokenizer, String> {
        let mut tok = match self.kind {
            SpmKind::Bpe => self.build_bpe()?,
            SpmKind::Unigram => self.build_unigram()?,
        };
        let mut added = Vec::new();
        for (text, _, ty) in &self.pieces {
            match ty {
                PieceType::Control | PieceType::Unknown => {
                    added.push(AddedToken::from(text.clone(), true).normalized(false));
                }
                PieceType::UserDefined => added.push(AddedToken::from(text.clone(), false).normalized(false)),
                _ => {}
            }
        }
        tok.add_special_tokens(added)
            .map_err(|e| format!("adding special tokens: {e}"))?;
        if let Some(bos) = bos {
            if let Some((text, _, _)) = self.pieces.get(bos as usize) {
                tok.with_post_processor(Some(bos_post_processor(text, bos)?));
            }
        }
        Ok(tok)
    }

    fn build_bpe(&self) -> Result<tokenizers::Tokenizer, String> {
        let mut vocab = Vocab::default();
        for (id, (text, _, _)) in self.pieces.iter().enumerate() {
            // On duplicates the later id wins, as in HF's converter.
            vocab.insert(text.clone(), id as u32);
        }
        let merges = bpe_merges_from_scores(&self.pieces, &vocab);
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(self.byte_fallback);
        if let Some(unk) = self.unk_id.and_then(|i| self.pieces.get(i as usize)) {
            builder = builder.unk_token(unk.0.clone()).fuse_unk(true);
        }
        let bpe = builder.build().map_err(|e| format!("building the BPE model: {e}"))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        let space = SPIECE_UNDERLINE.to_string();
        let mut norms = self.whitespace_normalizers()?;
        if self.add_dummy_prefix {
            norms.push(Prepend::new(space.clone()).into());
        }
        norms.push(Replace::new(" ", space.clone()).map_err(|e| e.to_string())?.into());
        tok.with_normalizer(Some(NormalizerSequence::new(norms)))
            .map_err(|e| e.to_string())?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new(space, " ").map_err(|e| e.to_string())?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_dummy_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tok.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tok)
    }

    /// `remove_extra_whitespaces`: collapse runs of spaces, then drop a leading and a trailing space.
    fn whitespace_normalizers(&self) -> Result<Vec<NormalizerWrapper>, String> {
        if !self.remove_extra_whitespaces {
            return Ok(Vec::new());
        }
        let collapse = Replace::new(ReplacePattern::Regex(" {2,}".into()), " ").map_err(|e| e.to_string())?;
        let ends = Replace::new(ReplacePattern::Regex("^ | $".into()), "").map_err(|e| e.to_string())?;
        Ok(vec![collapse.into(), ends.into()])
    }

    fn build_unigram(&self) -> Result<tokenizers::Tokenizer, String> {
        let vocab = self.pieces.iter().map(|(p, s, _)| (p.clone(), f64::from(*s))).collect();
        let model = Unigram::from(vocab, self.unk_id.map(|i| i as usize), self.byte_fallback)
            .map_err(|e| format!("building the unigram model: {e}"))?;
        let mut tok = tokenizers::Tokenizer::new(model);
        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        if let Some(map) = &self.precompiled_charsmap {
            norms.push(
                Precompiled::from(map)
                    .map_err(|e| format!("precompiled_charsmap: {e}"))?
                    .into(),
            );
        }
        norms.extend(self.whitespace_normalizers()?);
        if !norms.is_empty() {
            tok.with_normalizer(Some(NormalizerSequence::new(norms)))
                .map_err(|e| e.to_string())?;
        }
        let scheme = if self.add_dummy_prefix {
            PrependScheme::Always
        } else {
            PrependScheme::Never
        };
        let meta = Metaspace::new(SPIECE_UNDERLINE, scheme, true);
        tok.with_pre_tokenizer(Some(meta.clone()));
        if self.byte_fallback {
            let decoders: Vec<DecoderWrapper> = vec![ByteFallback::new().into(), meta.into()];
            tok.with_decoder(Some(DecoderSequence::new(decoders)));
        } else {
            tok.with_decoder(Some(meta));
        }
        Ok(tok)
    }
}

/// A post-processor that puts `bos` (with id `id`) in front of every sequence, as HF's Llama tokenizer does.
pub fn bos_post_processor(bos: &str, id: u32) -> Result<TemplateProcessing, String> {
    TemplateProcessing::builder()
        .try_single(format!("{bos}:0 $A:0"))
        .and_then(|b| b.try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1")))
        .map_err(|e| format!("post-processor: {e}"))?
        .special_tokens(vec![(bos.to_string(), id)])
        .build()
        .map_err(|e| format!("post-processor: {e}"))
}

/// BPE merges implied by SentencePiece scores: every split of a piece into two pieces of the vocabulary,
/// ordered by the merged piece's score (highest first, ties in id order), within a piece by the ids of the
/// halves — the order HF's `SentencePieceExtractor` produces.
pub fn bpe_merges_from_scores(pieces: &[(String, f32, PieceType)], vocab: &Vocab) -> Vec<(String, String)> {
    // (score, piece index, left id, right id, left, right)
    let mut merges: Vec<(f32, usize, u32, u32, &str, &str)> = Vec::new();
    for (idx, (piece, score, _)) in pieces.iter().enumerate() {
        let start = merges.len();
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((*score, idx, li, ri, l, r));
            }
        }
        merges[start..].sort_by_key(|m| (m.2, m.3));
    }
    // Stable sort by score, descending; NaN scores sort last.
    merges.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or_else(|| a.0.is_nan().cmp(&b.0.is_nan())));
    merges.into_iter().map(|m| (m.4.to_string(), m.5.to_string())).collect()
}
