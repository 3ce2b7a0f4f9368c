//! Fingerprints that tie a checkpoint to its source model and training data, so that a resume with
//! anything else is refused.

use super::checkpoint;
use super::data::Example;
use super::error::Result;
use super::options::Options;
use candle_core::{DType, Device};
use dlo_passes::{Capacity, ModelConfig};
use dlo_runtime::Weights;

/// Fingerprint and one-line description of a source model: its config and a sample of every tensor.
pub fn model_fingerprint(cfg: &ModelConfig, w: &Weights) -> Result<(String, String)> {
    let mut cfg = cfg.clone();
    if let Some(d) = cfg.dlo.as_mut() {
        d.capacity = Capacity::Scalar(0.0); // the trainer rewrites capacities; they do not identify a model
    }
    let cfg_text = cfg.to_hf_json().to_string();
    let mut parts: Vec<Vec<u8>> = vec![cfg_text.into_bytes()];
    for name in w.names() {
        let shape = w.shape_of(&name).unwrap_or_default();
        parts.push(format!("{name}{shape:?}").into_bytes());
        let t = w.get(&name, &shape, DType::F32, &Device::Cpu)?.flatten_all()?;
        let n = t.dim(0)?.min(256);
        let sample: Vec<f32> = t.narrow(0, 0, n)?.to_vec1()?;
        parts.push(sample.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let summary = format!(
        "{} layers, hidden {}, vocab {}{}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        if cfg.dlo.is_some() { ", DLO" } else { "" }
    );
    Ok((checkpoint::fingerprint(&refs), summary))
}

/// Fingerprint of the tokenized data and the settings that shape the data stream.
pub fn data_fingerprint(train: &[Example], eval: &[Example], opts: &Options) -> String {
    let mut bytes = Vec::new();
    for e in train.iter().chain(eval) {
        bytes.extend(e.ids.iter().flat_map(|x| x.to_le_bytes()));
        bytes.extend(e.labels.iter().map(|l| *l as u8));
        bytes.push(0xfe);
    }
    let settings = format!(
        "n_train={} seed={} batch={} accum={} seq={} pack={}",
        train.len(),
        opts.seed,
        opts.batch,
        opts.grad_accum,
        opts.seq_len,
        opts.pack
    );
    checkpoint::fingerprint(&[&bytes, settings.as_bytes()])
}
