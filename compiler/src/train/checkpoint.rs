//! Training checkpoints, written atomically in the reference's HF layout plus the trainer's own state.
//!
//! A checkpoint directory holds
//! - `config.json` (`ModelConfig::to_hf_json`, with `dlo_capacity` set to the run's current capacity: the
//!   per-layer realised list after `cos-global` training, as the reference saves it);
//! - `model.safetensors`: every tensor under its HF name (trained tensors in f32, frozen ones as stored);
//! - the tokenizer files of the source model, copied;
//! - `trainer_state.safetensors` (AdamW moments `m.{name}` / `v.{name}`) and `trainer_state.json` (step, data
//!   position, RNG, capacities, learning-rate ratios, and fingerprints of the model and data).
//!
//! Everything is written into a temporary directory beside the target (`.{name}.tmp-…`, see
//! [`dlo_passes::fsutil::AtomicDir`]) and renamed into place at the end; on any failure the temporary
//! directory is removed and whatever was at the target before is left untouched.

use super::error::{Result, TrainError};
use candle_core::Tensor;
use dlo_passes::fsutil::{AtomicDir, FsError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Files of an HF model directory that travel with a checkpoint (those that exist are copied).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Format tag of `trainer_state.json`.
pub const STATE_FORMAT: &str = "dlo-trainer-state/1";

/// The trainer's resumable state (`trainer_state.json`). Floating-point values that must survive exactly
/// are stored as strings in Rust's shortest round-trip form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// [`STATE_FORMAT`].
    pub format: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the data position.
    pub epoch: u64,
    /// Row index within that epoch's order.
    pub cursor: usize,
    /// The run's seed (shuffles derive from it and the epoch: this is the whole RNG state).
    pub seed: u64,
    /// Fingerprint of the source model (config + tensor names and shapes).
    pub model_fingerprint: String,
    /// Human-readable description of the source model, for error messages.
    pub model_summary: String,
    /// Fingerprint of the tokenized training data and the settings that shape the data stream.
    pub data_fingerprint: String,
    /// Current capacity: `None` for dense models, else `{"scalar": "0.9"}` or `{"per_layer": [..]}`.
    pub capacity: Option<CapacityRecord>,
    /// Current c̄ (string form).
    pub global_avg: Option<String>,
    /// Layer-wise learning-rate ratios for the next step (string form).
    pub lr_ratios: Vec<String>,
    /// AdamW step count of each trained tensor.
    pub param_steps: BTreeMap<String, u64>,
    /// Total steps the run was planned for.
    pub total_steps: u64,
}

/// `dlo_capacity` in [`TrainerState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityRecord {
    /// One value.
    Scalar(String),
    /// One value per layer, `None` for dense layers.
    PerLayer(Vec<Option<String>>),
}

/// Exact text form of an `f64`.
pub fn f64_text(x: f64) -> String {
    format!("{x:?}")
}

/// Parses [`f64_text`].
pub fn parse_f64(s: &str, what: &str) -> Result<f64> {
    s.parse()
        .map_err(|_| TrainError::Invalid(format!("trainer state: `{what}` is not a number: {s}")))
}

/// What goes into one checkpoint.
pub struct CheckpointContents<'a> {
    /// `config.json` object.
    pub config: serde_json::Value,
    /// Model tensors by HF name.
    pub tensors: Vec<(String, Tensor)>,
    /// Source directory to copy tokenizer files from, if any.
    pub tokenizer_dir: Option<&'a Path>,
    /// Trainer state.
    pub state: TrainerState,
    /// Optimizer moments.
    pub optimizer: HashMap<String, Tensor>,
}

/// Writes files of a checkpoint; tests substitute one that fails part-way.
pub trait FileSink {
    /// Writes `bytes` to `path`.
    fn write(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// The real file system.
pub struct Fs;

impl FileSink for Fs {
    fn write(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }
}

fn safetensors_bytes(tensors: &[(String, Tensor)], path: &Path) -> Result<Vec<u8>> {
    let mut contig = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        contig.push((n.clone(), t.contiguous()?));
    }
    let views = contig.iter().map(|(n, t)| (n.as_str(), t));
    // transformers' `from_pretrained` (4.40, the reference implementation's pin) needs `format: pt`.
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| TrainError::file(path, format!("cannot serialise tensors: {e}")))
}

/// Writes `contents` to `dir` atomically (see the module docs).
pub fn save(dir: &Path, contents: &CheckpointContents, sink: &mut dyn FileSink) -> Result<()> {
    let fs_err = |e: FsError| TrainError::io(e.path, e.source);
    if dir.file_name().is_none() {
        return Err(TrainError::Invalid(format!("bad checkpoint path {}", dir.display())));
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    }
    let tmp = AtomicDir::create(dir).map_err(fs_err)?;
    let w = |sink: &mut dyn FileSink, file: &str, bytes: &[u8]| -> Result<()> {
        let p = tmp.path().join(file);
        sink.write(&p, bytes).map_err(|e| TrainError::io(&p, e))
    };
    let cfg = serde_json::to_vec_pretty(&contents.config).map_err(|e| TrainError::Invalid(e.to_string()))?;
    w(sink, "config.json", &cfg)?;
    let model = safetensors_bytes(&contents.tensors, &tmp.path().join("model.safetensors"))?;
    w(sink, "model.safetensors", &model)?;
    drop(model);
    if let Some(src) = contents.tokenizer_dir {
        for f in TOKENIZER_FILES {
            let p = src.join(f);
            if p.is_file() {
                let bytes = std::fs::read(&p).map_err(|e| TrainError::io(&p, e))?;
                w(sink, f, &bytes)?;
            }
        }
    }
    let mut opt: Vec<(String, Tensor)> = contents.optimizer.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    opt.sort_by(|a, b| a.0.cmp(&b.0));
    let opt = safetensors_bytes(&opt, &tmp.path().join("trainer_state.safetensors"))?;
    w(sink, "trainer_state.safetensors", &opt)?;
    let st = serde_json::to_vec_pretty(&contents.state).map_err(|e| TrainError::Invalid(e.to_string()))?;
    w(sink, "trainer_state.json", &st)?;
    // Replaces the target: an old one is moved aside first, so that a failed rename loses nothing.
    tmp.commit_replace().map_err(fs_err)
}

/// A checkpoint read back for resuming.
pub struct Loaded {
    /// Trainer state.
    pub state: TrainerState,
    /// Optimizer moments.
    pub optimizer: HashMap<String, Tensor>,
    /// `model.safetensors` of the checkpoint.
    pub weights_file: PathBuf,
}

/// Reads a checkpoint's trainer state, checking it belongs to the model with `fingerprint`.
pub fn load(dir: &Path, fingerprint: &str, summary: &str) -> Result<Loaded> {
    let err = |problem: String| TrainError::Resume {
        path: dir.into(),
        problem,
    };
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| {
        err(format!(
            "no readable trainer_state.json ({e}); is this a training checkpoint?"
        ))
    })?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| err(format!("trainer_state.json is invalid: {e}")))?;
    if state.format != STATE_FORMAT {
        return Err(err(format!("unknown trainer state format `{}`", state.format)));
    }
    if state.model_fingerprint != fingerprint {
        return Err(err(format!(
            "it was trained from a different model ({}; this model is {}); pass the MODEL the interrupted \
             run started from",
            state.model_summary, summary
        )));
    }
    let op = dir.join("trainer_state.safetensors");
    let optimizer = candle_core::safetensors::load(&op, &candle_core::Device::Cpu)
        .map_err(|e| err(format!("trainer_state.safetensors: {e}")))?;
    let weights_file = dir.join("model.safetensors");
    if !weights_file.is_file() {
        return Err(err("no model.safetensors".into()));
    }
    Ok(Loaded {
        state,
        optimizer,
        weights_file,
    })
}

/// 64-bit FNV-1a, as hex: stable fingerprints of models and data.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn contents(v: f32) -> CheckpointContents<'static> {
        let t = Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap();
        CheckpointContents {
            config: serde_json::json!({"model_type": "llama"}),
            tensors: vec![("model.norm.weight".into(), t.clone())],
            tokenizer_dir: None,
            state: TrainerState {
                format: STATE_FORMAT.into(),
                step: v as u64,
                epoch: 0,
                cursor: 3,
                seed: 1,
                model_fingerprint: "abc".into(),
                model_summary: "tiny".into(),
                data_fingerprint: "d".into(),
                capacity: Some(CapacityRecord::PerLayer(vec![None, Some(f64_text(0.1 + 0.2))])),
                global_avg: Some(f64_text(0.9)),
                lr_ratios: vec![f64_text(1.0)],
                param_steps: BTreeMap::new(),
                total_steps: 6,
            },
            optimizer: HashMap::from([("m.model.norm.weight".to_string(), t)]),
        }
    }

    /// A sink that fails on the n-th file, like a disk filling up.
    struct FailAt(usize);
    impl FileSink for FailAt {
        fn write(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
            if self.0 == 0 {
                return Err(std::io::Error::other("No space left on device (simulated)"));
            }
            self.0 -= 1;
            Fs.write(path, bytes)
        }
    }

    #[test]
    fn failed_save_keeps_the_previous_checkpoint_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("final");
        save(&dir, &contents(3.0), &mut Fs).unwrap();
        let before = std::fs::read(dir.join("model.safetensors")).unwrap();
        for n in 0..4 {
            let e = save(&dir, &contents(6.0), &mut FailAt(n)).unwrap_err().to_string();
            assert!(e.contains("No space left") && e.contains(".final.tmp-"), "{e}");
            assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), before);
            let l = load(&dir, "abc", "tiny").unwrap();
            assert_eq!(l.state.step, 3);
            let names: Vec<_> = std::fs::read_dir(d.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("final")], "temp left behind");
        }
        // a successful save replaces it
        save(&dir, &contents(6.0), &mut Fs).unwrap();
        let l = load(&dir, "abc", "tiny").unwrap();
        assert_eq!(l.state.step, 6);
        assert_eq!(l.state.capacity, contents(6.0).state.capacity);
        assert_eq!(parse_f64(l.state.global_avg.as_deref().unwrap(), "g").unwrap(), 0.9);
    }

    /// transformers 4.40 refuses a safetensors file without `{"format": "pt"}` metadata (issue 14's finding).
    #[test]
    fn checkpoint_files_carry_the_metadata_transformers_expects() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ck");
        save(&dir, &contents(1.0), &mut Fs).unwrap();
        for f in ["model.safetensors", "trainer_state.safetensors"] {
            let bytes = std::fs::read(dir.join(f)).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let m = meta.metadata().as_ref().expect("metadata");
            assert_eq!(m.get("format").map(String::as_str), Some("pt"), "{f}");
        }
    }

    #[test]
    fn unwritable_location_is_an_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        // a regular file where the output directory should be: no privilege can write below it
        let blocker = d.path().join("out");
        std::fs::write(&blocker, b"x").unwrap();
        let e = save(&blocker.join("checkpoint-1"), &contents(1.0), &mut Fs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out"), "{e}");
        assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
        // a read-only directory (only meaningful when not running as root)
        use std::os::unix::fs::PermissionsExt;
        let ro = d.path().join("ro");
        save(&ro.join("checkpoint-1"), &contents(1.0), &mut Fs).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let probe = std::fs::File::create(ro.join("probe"));
        if probe.is_err() {
            assert!(save(&ro.join("checkpoint-2"), &contents(2.0), &mut Fs).is_err());
            assert_eq!(load(&ro.join("checkpoint-1"), "abc", "tiny").unwrap().state.step, 1);
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn resume_from_a_different_model_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("c");
        save(&dir, &contents(1.0), &mut Fs).unwrap();
        let e = load(&dir, "zzz", "30 layers").err().unwrap().to_string();
        assert!(
            e.contains("different model") && e.contains("tiny") && e.contains("30 layers"),
            "{e}"
        );
        let e = load(d.path(), "abc", "x").err().unwrap().to_string();
        assert!(e.contains("trainer_state.json"), "{e}");
    }

    #[test]
    fn f64_text_round_trips_exactly() {
        for x in [0.1 + 0.2, 1.0 / 3.0, 0.9, 1e-300, 123456.789] {
            assert_eq!(parse_f64(&f64_text(x), "x").unwrap().to_bits(), x.to_bits());
        }
    }
}
