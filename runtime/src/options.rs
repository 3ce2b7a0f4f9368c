//! How a model is loaded and run: one [`RuntimeOptions`] value, filled from `dlo-run`'s or `dlo-compile`'s
//! flags or from the C ABI's engine parameters, instead of each entry point choosing a device, dtype and
//! kernels of its own.

use crate::error::{Error, Result};
use crate::model::layers::Load;
use candle_core::{DType, Device};
use std::fmt;
use std::str::FromStr;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU (candle's CPU backend and our kernels).
    #[default]
    Cpu,
    /// CUDA device `n` (needs a build with candle's `cuda` feature).
    Cuda(usize),
}

impl DeviceSpec {
    /// The candle device; an error naming the device when it cannot be opened (e.g. CUDA in a CPU-only
    /// build).
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| Error::InvalidArgument(format!("device {self}: cannot open it: {e}")))
            }
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    /// Parses `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("device `{s}` is not `cpu`, `cuda` or `cuda:N`"));
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Upper bound on worker threads: far above any core count we run on, far below what hangs thread creation.
pub const MAX_THREADS: usize = 1024;

/// Everything that decides how a model is loaded and executed, in one value.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeOptions {
    /// Where the model runs.
    pub device: DeviceSpec,
    /// Compute dtype (weights are converted to it at load): f32, bf16, or f64 (a slow verification mode).
    pub dtype: DType,
    /// Worker threads for the CPU kernels; `None` = all cores.
    pub threads: Option<usize>,
    /// Whether few-row CPU products (batch-1 decode) use the decode matvec ([`crate::kernels::matvec`])
    /// instead of candle's GEMM. On by default; off only to measure or to rule the kernel out.
    pub matvec: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            threads: None,
            matvec: true,
        }
    }
}

impl RuntimeOptions {
    /// Checks the values: a thread count in 1..=[`MAX_THREADS`], a compute dtype the model supports.
    pub fn validate(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 || n > MAX_THREADS {
                return Err(Error::InvalidArgument(format!(
                    "{n} threads: the thread count must be between 1 and {MAX_THREADS}"
                )));
            }
        }
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
            return Err(Error::InvalidArgument(format!(
                "compute dtype {:?} is not one of f32, bf16, f16, f64",
                self.dtype
            )));
        }
        Ok(())
    }

    /// The load settings of the model's tensors on `device` (the device these options open).
    pub fn load<'a>(&self, device: &'a Device) -> Load<'a> {
        Load {
            dtype: self.dtype,
            device,
            matvec: self.matvec,
        }
    }

    /// Makes [`Self::threads`] the whole process's thread count, for programs that own their process (`dlo-run`,
    /// `dlo-compile`, benchmarks): the global rayon pool, and `RAYON_NUM_THREADS`, which candle's CPU GEMM
    /// reads at every call to size its parallelism (candle-core 0.11 has no other knob). Call it first thing,
    /// before any thread starts; a library inside someone else's process (the C ABI) runs on private
    /// rayon pools of that size instead. Does nothing when `threads` is `None`.
    pub fn init_process_threads(&self) -> Result<()> {
        self.validate()?;
        if let Some(n) = self.threads {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            // Fails only when the global pool already exists: then it keeps its size.
            rayon::ThreadPoolBuilder::new().num_threads(n).build_global().ok();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            let parsed: DeviceSpec = s.parse().unwrap();
            assert_eq!(parsed, d);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }

    /// This crate has no CUDA build yet (issue 13 adds one; then this test belongs behind its feature).
    #[test]
    fn cuda_in_a_cpu_build_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).device().unwrap_err().to_string();
        assert!(e.contains("cuda:0"), "{e}");
    }

    #[test]
    fn out_of_range_threads_and_dtypes_are_refused() {
        for n in [0, MAX_THREADS + 1, 100_000] {
            let o = RuntimeOptions {
                threads: Some(n),
                ..Default::default()
            };
            assert!(o.validate().unwrap_err().to_string().contains(&format!("{n} threads")));
            assert!(o.init_process_threads().is_err());
        }
        let o = RuntimeOptions {
            dtype: DType::U8,
            ..Default::default()
        };
        assert!(o.validate().is_err());
    }
}
