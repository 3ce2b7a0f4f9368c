//! `dlo-trt-build LIBDIR MODEL.onnx ENGINE_OUT [MIN,OPT,MAX]`: parse an ONNX model with the TensorRT-RTX
//! ONNX parser and build a serialized engine. Needs no GPU: only deserialising or running the engine does.
//!
//! LIBDIR holds `libtensorrt_rtx.so.1.7.1` and `libtensorrt_onnxparser_rtx.so.1.7.1` (from the PyPI wheel
//! `onnxruntime-ep-nv-tensorrt-rtx-cu13==0.5.0`). Every dynamic input dimension (`seq` of prefill,
//! `capacity` of decode) gets the optimisation profile MIN/OPT/MAX (default 1,64,256).

use std::path::Path;
use trtx::trtx_sys::Dims64;
use trtx::{Builder, Logger, OnnxParser, OptProfileSelector};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dlo-trt-build: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if !(4..=5).contains(&args.len()) {
        return Err("usage: dlo-trt-build LIBDIR MODEL.onnx ENGINE_OUT [MIN,OPT,MAX]".into());
    }
    let lib = Path::new(&args[1]);
    let range: Vec<i64> = match args.get(4) {
        None => vec![1, 64, 256],
        Some(s) => s
            .split(',')
            .map(|x| x.trim().parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("profile `{s}`: {e}"))?,
    };
    if range.len() != 3 || range[0] < 1 || range[0] > range[1] || range[1] > range[2] {
        return Err(format!("profile {range:?}: need MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX").into());
    }
    trtx::dynamically_load_tensorrt(Some(lib.join("libtensorrt_rtx.so.1.7.1")))?;
    trtx::dynamically_load_tensorrt_onnxparser(Some(lib.join("libtensorrt_onnxparser_rtx.so.1.7.1")))?;
    let logger = Logger::stderr()?;
    let mut builder = Builder::new(&logger)?;
    let network = builder.create_network(0)?;
    let mut parser = OnnxParser::new(network, &logger)?;
    let t0 = std::time::Instant::now();
    parser
        .parse_from_file(&args[2], 1)
        .map_err(|e| format!("{}: the TensorRT-RTX ONNX parser rejected it: {e}", args[2]))?;
    println!("parsed {} in {:.2}s", args[2], t0.elapsed().as_secs_f64());
    let mut config = builder.create_config()?;
    let mut profile = builder.creata_optimization_profile()?;
    {
        let net = parser.network();
        println!("network: {} inputs, {} outputs", net.nb_inputs(), net.nb_outputs());
        for i in 0..net.nb_inputs() {
            let t = net.input(i)?;
            let name = t.name(net)?;
            let dims = t.dimensions(net)?;
            for (sel, k) in [
                (OptProfileSelector::kMIN, 0),
                (OptProfileSelector::kOPT, 1),
                (OptProfileSelector::kMAX, 2),
            ] {
                let d: Vec<i64> = dims.iter().map(|&x| if x < 0 { range[k] } else { x }).collect();
                profile.set_dimensions(&name, sel, &Dims64::from_slice(&d))?;
            }
        }
    }
    config.add_optimization_profile(&mut profile)?;
    let t0 = std::time::Instant::now();
    let engine = builder.build_serialized_network(parser.network_mut(), &mut config)?;
    let bytes: &[u8] = engine.as_ref();
    std::fs::write(&args[3], bytes).map_err(|e| format!("{}: {e}", args[3]))?;
    println!(
        "built serialized engine {} ({} bytes) in {:.2}s",
        args[3],
        bytes.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
