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

/// Upper bound on worker threads: 4 × the CPUs this process may use (at least 4). More threads than that
/// only contend for the same cores (1,000 threads turned a 0.8 s run into 56 s) and, far enough up, hang
/// thread creation.
pub fn max_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_mul(4)
        .max(4)
}

/// A requested worker-thread count lowered to [`max_threads`]: the count to use, and the warning to show
/// when it was lowered.
pub fn capped_threads(n: usize) -> (usize, Option<String>) {
    let max = max_threads();
    if n <= max {
        return (n, None);
    }
    let warning = format!(
        "{n} threads requested; using {max} (4 × the {} CPUs available: more threads only contend for them)",
        max / 4
    );
    (max, Some(warning))
}

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
    /// Dequantize block-quantized weights (a GGUF's Q4_1, an engine's Q8_0) to [`Self::dtype`] at load instead of
    /// running them in their blocks. Off by default: a quantized model runs quantized.
    pub dequantize: bool,
    /// Storage dtype of the KV cache: `None` = the compute dtype; f16 (llama.cpp's default) or bf16 halve it.
    pub kv_dtype: Option<DType>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            threads: None,
            matvec: true,
            dequantize: false,
            kv_dtype: None,
        }
    }
}

impl RuntimeOptions {
    /// Checks the values: a positive thread count, a compute dtype the model supports. (A count above
    /// [`max_threads`] is valid; [`Self::cap_threads`] lowers it.)
    pub fn validate(&self) -> Result<()> {
        if self.threads == Some(0) {
            return Err(Error::InvalidArgument(
                "0 threads: the thread count must be at least 1 (leave it out to use all cores)".into(),
            ));
        }
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
            return Err(Error::InvalidArgument(format!(
                "compute dtype {:?} is not one of f32, bf16, f16, f64",
                self.dtype
            )));
        }
        if let Some(kv) = self.kv_dtype {
            if !matches!(kv, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
                return Err(Error::InvalidArgument(format!(
                    "KV cache dtype {kv:?} is not one of f32, f16, bf16"
                )));
            }
        }
        Ok(())
    }

    /// Lowers [`Self::threads`] to [`max_threads`]; returns the warning to show when it did.
    pub fn cap_threads(&mut self) -> Option<String> {
        let (n, warning) = capped_threads(self.threads?);
        self.threads = Some(n);
        warning
    }

    /// The load settings of the model's tensors on `device` (the device these options open).
    pub fn load<'a>(&self, device: &'a Device) -> Load<'a> {
        Load {
            dtype: self.dtype,
            device,
            matvec: self.matvec,
            quantized: !self.dequantize,
            kv_dtype: self.kv_dtype,
        }
    }

    /// Makes [`Self::threads`] the whole process's thread count, for programs that own their process (`dlo-run`,
    /// `dlo-compile`, benchmarks): the global rayon pool, and `RAYON_NUM_THREADS`, which candle's CPU GEMM
    /// reads at every call to size its parallelism (candle-core 0.11 has no other knob). Call it first thing,
    /// before any thread starts; a library inside someone else's process (the C ABI) runs on private
    /// rayon pools of that size instead. Does nothing when `threads` is `None`. A count above
    /// [`max_threads`] is lowered to it; the warning saying so is returned for the caller to show.
    ///
    /// It also shortens the spinning of candle's barrier pool (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless set):
    /// candle's k-quant kernels (Q6_K and friends) run on that pool, whose workers spin ~1 ms between calls,
    /// and on few cores the spinning starves the rayon workers that run everything else (SmolLM2 Q4_K_M decode
    /// at 2 threads: 76–128 tokens/s with candle's default, 159–209 with 50 pauses).
    pub fn init_process_threads(&self) -> Result<Option<String>> {
        self.validate()?;
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "50");
        }
        let Some((n, warning)) = self.threads.map(capped_threads) else {
            return Ok(None);
        };
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        // Fails only when the global pool already exists: then it keeps its size.
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().ok();
        Ok(warning)
    }
}

/// The asset cache `scripts/fetch-assets.sh` fills: `$DLO_CACHE`, default `~/.cache/dlo`.
pub fn cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    std::env::var_os("DLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/dlo"))
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
    fn zero_threads_and_odd_dtypes_are_refused_and_many_threads_capped() {
        let o = RuntimeOptions {
            threads: Some(0),
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().to_string().contains("0 threads"));
        assert!(o.init_process_threads().is_err());
        let o = RuntimeOptions {
            kv_dtype: Some(DType::U8),
            ..Default::default()
        };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("KV cache dtype U8") && e.contains("f32, f16, bf16"), "{e}");
        let max = max_threads();
        assert!(max >= 4 && max.is_multiple_of(4));
        for n in [max + 1, 100_000, usize::MAX] {
            let mut o = RuntimeOptions {
                threads: Some(n),
                ..Default::default()
            };
            o.validate().unwrap();
            let w = o.cap_threads().unwrap();
            assert_eq!(o.threads, Some(max));
            assert!(w.contains(&format!("{n} threads requested; using {max}")), "{w}");
        }
        let mut o = RuntimeOptions {
            threads: Some(max),
            ..Default::default()
        };
        assert_eq!((o.cap_threads(), o.threads), (None, Some(max)));
        let o = RuntimeOptions {
            dtype: DType::U8,
            ..Default::default()
        };
        assert!(o.validate().is_err());
    }
}
