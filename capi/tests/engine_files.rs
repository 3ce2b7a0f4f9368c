//! Engine files (`dlo_runtime::engine`) through the C API: they load like checkpoints, generate what the
//! runtime generates with the engine's routing plan, and honour compute budgets.

use crate::generation::reference;
use crate::support::tiny::Tiny;
use crate::support::*;
use candle_core::{DType, Device};
use dlo::dlo_status::*;
use dlo::*;
use dlo_compiler::calibrate::{calibrate, CalibrationOptions, RateTarget};
use dlo_runtime::engine::format::StorageDtype;
use dlo_runtime::engine::{write_engine_file, EnginePlan, Provenance};
use dlo_runtime::generate::SamplingParams;
use dlo_runtime::{Checkpoint, Model};
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

/// Writes an engine of the tiny checkpoint at `ckpt`, calibrated to a mean execution rate of `budget`.
fn build_engine(ckpt: &Path, out: &Path, budget: f64) -> PathBuf {
    let ck = Checkpoint::open(ckpt).unwrap();
    let m = Model::load(&ck.config, &ck.weights, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..4096u32).map(|i| (i * 7919 + (i / 13) * 31 + 5) % 97).collect();
    let cal = calibrate(
        &m,
        &ids,
        None,
        &CalibrationOptions {
            target: Some(RateTarget::Uniform(budget)),
            chunk_len: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let mut plan = EnginePlan::from_config(&ck.config);
    cal.apply(&mut plan);
    let path = out.join("tiny.dlo");
    write_engine_file(
        &path,
        &ck.config,
        &ck.weights,
        None,
        &plan,
        Provenance::now(ckpt, StorageDtype::F32),
    )
    .unwrap();
    path
}

fn mean_rate(s: *mut dlo_session) -> f64 {
    let mut st = crate::misuse::zero_stats();
    expect(unsafe { dlo_session_stats(s, &mut st) }, DLO_OK);
    st.mean_exec_rate
}

#[test]
fn engine_files_generate_with_their_plan_and_budgets() {
    let (d, ckpt) = tiny_checkpoint(Tiny {
        seed: 4,
        ..Default::default()
    });
    let engine_path = build_engine(&ckpt, d.path(), 0.4);
    let plan = dlo_runtime::engine::Engine::open(&engine_path).unwrap().plan().clone();
    let e = load(&engine_path);
    let prompt: Vec<i32> = (0..40).map(|i| (i * 37 + 11) % 97).collect();
    let prompt_u: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();

    // Default: the engine's calibrated thresholds.
    let s = session(e, |p| p.max_tokens = 24);
    let (col, _) = generate(s, &prompt, None);
    let (want, _) = reference(
        &ckpt,
        &prompt_u,
        24,
        SamplingParams::default(),
        plan.routing(None).unwrap(),
    );
    assert_eq!(col.tokens, want.tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
    let calibrated = mean_rate(s);
    assert!((calibrated - want.routing.mean_rate()).abs() < 1e-12);

    // A session budget: thresholds from the engine's quantile tables.
    let s2 = session(e, |p| {
        p.max_tokens = 24;
        p.budget = 0.9;
    });
    let (col2, _) = generate(s2, &prompt, None);
    let (want2, _) = reference(
        &ckpt,
        &prompt_u,
        24,
        SamplingParams::default(),
        plan.routing(Some(0.9)).unwrap(),
    );
    assert_eq!(col2.tokens, want2.tokens.iter().map(|&t| t as i32).collect::<Vec<_>>());
    let high = mean_rate(s2);
    assert!(
        high > calibrated,
        "budget 0.9 should execute more than 0.4: {high} vs {calibrated}"
    );

    // An engine-wide budget is the default of its sessions.
    let mut ep = dlo_engine_default_params();
    ep.budget = 0.9;
    let mut e2 = null_mut();
    let cpath = c(engine_path.to_str().unwrap());
    expect(unsafe { dlo_engine_load(cpath.as_ptr(), &ep, &mut e2) }, DLO_OK);
    let s3 = session(e2, |p| p.max_tokens = 24);
    let (col3, _) = generate(s3, &prompt, None);
    assert_eq!(col3.tokens, col2.tokens);

    // A budget outside (0, 1] is refused.
    let mut bad = dlo_session_default_params();
    bad.budget = 1.5;
    let mut s4 = null_mut();
    expect(unsafe { dlo_session_new(e, &bad, &mut s4) }, DLO_ERR_INVALID_ARG);
    assert!(last_error().contains("budget"), "{}", last_error());

    for mut h in [s2, s3] {
        expect(unsafe { dlo_session_free(&mut h) }, DLO_OK);
    }
    expect(unsafe { dlo_engine_free(&mut e2) }, DLO_OK);
    free(s, e);
}

#[test]
fn corrupt_engine_files_are_rejected() {
    let (d, ckpt) = tiny_checkpoint(Tiny::default());
    let engine_path = build_engine(&ckpt, d.path(), 0.5);
    let bytes = std::fs::read(&engine_path).unwrap();
    let p = dlo_engine_default_params();
    for (name, data) in [
        ("truncated.dlo", bytes[..bytes.len() / 3].to_vec()),
        ("header-only.dlo", bytes[..12].to_vec()),
    ] {
        let path = d.path().join(name);
        std::fs::write(&path, &data).unwrap();
        let cpath = c(path.to_str().unwrap());
        let mut e = null_mut();
        let s = unsafe { dlo_engine_load(cpath.as_ptr(), &p, &mut e) };
        assert_eq!(s, DLO_ERR_FORMAT, "{name}: {}", last_error());
        assert!(e.is_null());
        assert!(last_error().contains(name), "{}", last_error());
    }
}

#[test]
fn c_example_runs_on_a_routed_engine() {
    use crate::c_example::{build_c_example, run};
    let (d, ckpt) = tiny_checkpoint(Tiny {
        layer_skip: true,
        seed: 6,
        ..Default::default()
    });
    let engine_path = build_engine(&ckpt, d.path(), 0.5);
    let plan = dlo_runtime::engine::Engine::open(&engine_path).unwrap().plan().clone();
    let exe = build_c_example(d.path());
    let ids = [4u32, 8, 15, 16, 23, 42, 7, 9];
    let (want, _) = reference(&ckpt, &ids, 20, SamplingParams::default(), plan.routing(None).unwrap());
    // What dlo-run prints for a model without a tokenizer: each id and a space, then a newline.
    let want: String = want.tokens.iter().map(|t| format!("{t} ")).collect::<String>() + "\n";
    let args = [
        engine_path.to_str().unwrap(),
        "--token-ids",
        "4,8,15,16,23,42,7,9",
        "--max-tokens",
        "20",
    ];
    assert_eq!(run(std::process::Command::new(&exe).args(args)), want);
}
