//! `--device` and `--threads`: the runtime flags of every `dlo-compile` command that runs the model (train,
//! build's calibration, analyze), turned into the runtime's one [`RuntimeOptions`] value.

use candle_core::DType;
use dlo_runtime::{DeviceSpec, RuntimeOptions};

/// Where and with how many threads a command runs the model.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` in a build with CUDA support.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Worker threads, 1 to 1024 (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Default for RuntimeArgs {
    fn default() -> Self {
        RuntimeArgs {
            device: "cpu".into(),
            threads: None,
        }
    }
}

impl RuntimeArgs {
    /// The validated runtime options for a model computing in `dtype`.
    pub fn options(&self, dtype: DType) -> dlo_runtime::Result<RuntimeOptions> {
        let opts = RuntimeOptions {
            device: self.device.parse::<DeviceSpec>()?,
            dtype,
            threads: self.threads,
            ..RuntimeOptions::default()
        };
        opts.validate()?;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_validated_options() {
        let a = RuntimeArgs {
            device: "cuda:2".into(),
            threads: Some(3),
        };
        let o = a.options(DType::F32).unwrap();
        assert_eq!((o.device, o.threads), (DeviceSpec::Cuda(2), Some(3)));
        let bad = RuntimeArgs {
            device: "gpu".into(),
            threads: None,
        };
        assert!(bad.options(DType::F32).unwrap_err().to_string().contains("`gpu`"));
        let bad = RuntimeArgs {
            threads: Some(0),
            ..RuntimeArgs::default()
        };
        assert!(bad.options(DType::F32).unwrap_err().to_string().contains("0 threads"));
    }
}
