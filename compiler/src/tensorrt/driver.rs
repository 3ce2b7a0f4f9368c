//! The in-process TensorRT driver (cargo feature `tensorrt`): loads TensorRT-RTX's builder and ONNX parser
//! from a directory at run time (the `trtx` crate dlopens them), parses ONNX model bytes, counts what the
//! parsed network contains, and builds a serialized engine for one optimisation profile. Building needs no
//! GPU; only deserializing or running an engine does.

use super::{Built, LibDir, TrtError};
use dlo_runtime::tensorrt::ErrorLog;
use dlo_runtime::tensorrt::{BuildInfo, NetworkCounts, Profile};
use trtx::trtx_sys::{Dims64, LayerType};
use trtx::{Builder, Logger, OnnxParser, OptProfileSelector};

/// Loads the libraries in `lib` (once per process) and reports their version.
pub(crate) fn load(lib: &LibDir) -> Result<BuildInfo, TrtError> {
    let (version, build) = dlo_runtime::tensorrt::load_library(lib)?;
    Ok(BuildInfo {
        library: "TensorRT-RTX".into(),
        version,
        build,
        flags: Vec::new(),
    })
}

/// Parses `onnx` (named `name` in errors), counts its layers, and builds an engine whose every dynamic input
/// dimension takes `profile`.
pub(crate) fn build(name: &str, onnx: &[u8], profile: &Profile) -> Result<Built, TrtError> {
    let log = ErrorLog::default();
    let trt = |what: &str, e: trtx::Error| TrtError::Build {
        engine: name.to_string(),
        problem: log.errors_or(format!("{what}: {e}")),
    };
    let logger = Logger::new(log.clone()).map_err(|e| trt("logger", e))?;
    let mut builder = Builder::new(&logger).map_err(|e| trt("builder", e))?;
    let network = builder.create_network(0).map_err(|e| trt("network", e))?;
    let mut parser = OnnxParser::new(network, &logger).map_err(|e| trt("parser", e))?;
    parser.parse(onnx).map_err(|e| TrtError::Parse {
        engine: name.to_string(),
        problem: log.errors_or(e.to_string()),
    })?;
    if parser.network().nb_outputs() == 0 {
        // Protobuf decodes many byte strings as an empty model, which parses into an empty network.
        return Err(TrtError::Parse {
            engine: name.to_string(),
            problem: log.errors_or("the model has no outputs (not an ONNX model?)".into()),
        });
    }
    let mut config = builder.create_config().map_err(|e| trt("config", e))?;
    let mut opt = builder.creata_optimization_profile().map_err(|e| trt("profile", e))?;
    let counts = {
        let net = parser.network();
        for i in 0..net.nb_inputs() {
            let t = net.input(i).map_err(|e| trt("input", e))?;
            let input = t.name(net).map_err(|e| trt("input name", e))?;
            let dims = t.dimensions(net).map_err(|e| trt("input dims", e))?;
            for (sel, n) in [
                (OptProfileSelector::kMIN, profile.min),
                (OptProfileSelector::kOPT, profile.opt),
                (OptProfileSelector::kMAX, profile.max),
            ] {
                let d: Vec<i64> = dims.iter().map(|&x| if x < 0 { n as i64 } else { x }).collect();
                opt.set_dimensions(&input, sel, &Dims64::from_slice(&d))
                    .map_err(|e| trt("profile dims", e))?;
            }
        }
        let mut c = NetworkCounts {
            layers: net.nb_layers() as usize,
            ..Default::default()
        };
        for i in 0..net.nb_layers() {
            match net.layer_type(i).map_err(|e| trt("layer", e))? {
                LayerType::kCONDITION => c.conditionals += 1,
                LayerType::kTOPK => c.topk += 1,
                LayerType::kGATHER => c.gathers += 1,
                LayerType::kSCATTER => c.scatters += 1,
                _ => {}
            }
        }
        c
    };
    config
        .add_optimization_profile(&mut opt)
        .map_err(|e| trt("profile", e))?;
    let t0 = std::time::Instant::now();
    let engine = builder
        .build_serialized_network(parser.network_mut(), &mut config)
        .map_err(|e| trt("build", e))?;
    let bytes: &[u8] = engine.as_ref();
    if bytes.is_empty() {
        return Err(TrtError::Build {
            engine: name.to_string(),
            problem: log.errors_or("the builder returned an empty engine".into()),
        });
    }
    Ok(Built {
        bytes: bytes.to_vec(),
        counts,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
