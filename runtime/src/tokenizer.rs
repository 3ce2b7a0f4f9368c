//! Tokenizers: `tokenizer.json`, SentencePiece `tokenizer.model`, or built from GGUF metadata; plus the
//! special tokens and chat template that travel with them.
//!
//! OWNER: tokenizer work (issue 2). Keep the public API.

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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
}

impl Tokenizer {
    /// Loads the tokenizer of an HF directory: `tokenizer.json`, else `tokenizer.model`; special tokens and
    /// chat template from `tokenizer_config.json`. `Ok(None)` when the directory has no tokenizer.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let _ = dir;
        Ok(None)
    }

    /// Builds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`); `Ok(None)` when there is none.
    pub fn from_gguf(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        path: &Path,
    ) -> Result<Option<Self>> {
        let _ = (md, path);
        Ok(None)
    }

    /// Encodes text; adds BOS when `add_bos` is set and `add_special` is true.
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
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            problem: format!("invalid tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
            add_bos,
            bos_token_id,
            eos_token_ids,
            chat_template,
        })
    }
}
