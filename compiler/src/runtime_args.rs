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
    /// Worker threads (default: all cores; more than 4 per CPU are lowered to that, with a warning).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Dequantize block-quantized weights (a GGUF's Q4_1, a Q8_0 engine) to f32 at load instead of running
    /// them in their blocks.
    #[arg(long)]
    pub dequantize: bool,
}

impl Default for RuntimeArgs {
    fn default() -> Self {
        RuntimeArgs {
            device: "cpu".into(),
            threads: None,
            dequantize: false,
        }
    }
}

impl RuntimeArgs {
    /// The validated runtime options for a model computing in `dtype`. The device is opened once here, so that
    /// an unavailable one fails before a command reads or writes anything.
    pub fn options(&self, dtype: DType) -> dlo_runtime::Result<RuntimeOptions> {
        let opts = self.unopened(dtype)?;
        opts.device.device()?;
        Ok(opts)
    }

    /// [`Self::options`] without opening the device: enough to set the process's threads.
    pub fn unopened(&self, dtype: DType) -> dlo_runtime::Result<RuntimeOptions> {
        let opts = RuntimeOptions {
            device: self.device.parse::<DeviceSpec>()?,
            dtype,
            threads: self.threads,
            dequantize: self.dequantize,
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
            device: "cpu".into(),
            threads: Some(3),
            dequantize: false,
        };
        let o = a.options(DType::F32).unwrap();
        assert_eq!((o.device, o.threads), (DeviceSpec::Cpu, Some(3)));
        for (device, threads, needle) in [
            ("gpu", None, "`gpu`"),
            ("cpu", Some(0), "0 threads"),
            // this build has no CUDA: the device is named when it cannot be opened
            ("cuda:2", None, "device cuda:2: cannot open it"),
        ] {
            let bad = RuntimeArgs {
                device: device.into(),
                threads,
                dequantize: false,
            };
            let e = bad.options(DType::F32).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
