//! `dlo-compile import`: any supported checkpoint → an HF directory (safetensors + config.json +
//! tokenizer.json + tokenizer_config.json) that HF transformers can load. Written to a temporary directory
//! and renamed into place, so a failed import leaves nothing behind.
//!
//! OWNER: loader work (issue 2).

use std::path::PathBuf;

/// Arguments of `dlo-compile import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Source checkpoint: an HF directory or a GGUF file.
    pub src: PathBuf,
    /// Output directory (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Storage dtype of the written tensors.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

/// Runs the import.
pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    anyhow::bail!("{}: import is not implemented yet", args.src.display())
}
