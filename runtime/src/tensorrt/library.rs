//! Finding and loading TensorRT-RTX's libraries at run time. Nothing of NVIDIA's is linked: the directory
//! is `--trt-lib DIR` (an explicit path), else `$DLO_TRT_LIB`, else the folder `scripts/fetch-assets.sh`
//! fills (`$DLO_CACHE/pkgs/trt-rtx/onnxruntime_ep_nv_tensorrt_rtx`). Loading needs the `tensorrt` feature.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The TensorRT-RTX runtime and builder library file (the `trtx` crate's headers are 1.7).
pub const BUILDER_LIB: &str = "libtensorrt_rtx.so.1.7.1";
/// The matching ONNX parser library file.
pub const PARSER_LIB: &str = "libtensorrt_onnxparser_rtx.so.1.7.1";

/// Where TensorRT-RTX's libraries are.
#[derive(Debug, Clone)]
pub struct LibDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its [`BUILDER_LIB`].
    pub builder: PathBuf,
    /// Its [`PARSER_LIB`].
    pub parser: PathBuf,
}

/// The library directory: `explicit`, else `$DLO_TRT_LIB`, else the assets folder. An error names the file
/// that is missing and how to provide it.
pub fn find_library(explicit: Option<&Path>) -> Result<LibDir> {
    let dir = match (explicit, std::env::var_os("DLO_TRT_LIB")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => crate::cache_dir().join("pkgs/trt-rtx/onnxruntime_ep_nv_tensorrt_rtx"),
    };
    let lib = LibDir {
        builder: dir.join(BUILDER_LIB),
        parser: dir.join(PARSER_LIB),
        dir,
    };
    for f in [&lib.builder, &lib.parser] {
        if !f.is_file() {
            return Err(Error::format(
                f,
                "not found (give the directory with TensorRT-RTX 1.7.1's libraries with --trt-lib or DLO_TRT_LIB; \
                 scripts/fetch-assets.sh installs them)",
            ));
        }
    }
    Ok(lib)
}

/// The version of the TensorRT library in `lib`, as `(major.minor.patch, build)`; loads the runtime and parser
/// libraries into the process for the `trtx` crate (once per process).
#[cfg(feature = "tensorrt")]
pub fn load_library(lib: &LibDir) -> Result<(String, i32)> {
    let fail = |path: &Path, e: &dyn std::fmt::Display| Error::format(path, format!("cannot be loaded: {e}"));
    trtx::dynamically_load_tensorrt(Some(lib.builder.clone())).map_err(|e| fail(&lib.builder, &e))?;
    trtx::dynamically_load_tensorrt_onnxparser(Some(lib.parser.clone())).map_err(|e| fail(&lib.parser, &e))?;
    // SAFETY: the library is loaded and these are plain `int32_t f(void)` C functions of its ABI.
    unsafe {
        let l = libloading::Library::new(&lib.builder).map_err(|e| fail(&lib.builder, &e))?;
        let get = |name: &str| -> Result<i32> {
            let f: libloading::Symbol<unsafe extern "C" fn() -> i32> = l
                .get(name.as_bytes())
                .map_err(|e| fail(&lib.builder, &format!("no {name}: {e}")))?;
            Ok(f())
        };
        let version = format!(
            "{}.{}.{}",
            get("getInferLibMajorVersion")?,
            get("getInferLibMinorVersion")?,
            get("getInferLibPatchVersion")?
        );
        Ok((version, get("getInferLibBuildVersion")?))
    }
}

/// A TensorRT logger that keeps the errors it is given, so that they can be reported with the failure they
/// explain (never panics: a panic in a logger callback aborts the process).
#[cfg(feature = "tensorrt")]
#[derive(Clone, Default)]
pub struct ErrorLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

#[cfg(feature = "tensorrt")]
impl trtx::LogHandler for ErrorLog {
    fn log(&self, severity: trtx::Severity, message: &str) {
        if matches!(severity, trtx::Severity::InternalError | trtx::Severity::Error) {
            if let Ok(mut v) = self.0.lock() {
                v.push(message.to_string());
            }
        }
    }
}

#[cfg(feature = "tensorrt")]
impl ErrorLog {
    /// The errors logged so far, joined with `; `, or `fallback` when there are none.
    pub fn errors_or(&self, fallback: String) -> String {
        let v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
        if v.is_empty() {
            fallback
        } else {
            v.join("; ")
        }
    }
}
