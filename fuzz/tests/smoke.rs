//! A short, deterministic fuzzing run of every reader (what CI runs; `scripts/fuzz.sh` runs the long ones):
//! every seed is accepted, mutations reach many distinct checks, and nothing panics.

use dlo_fuzz::{run, Assets, Harness, Options, Target};
use std::time::Duration;

fn smoke(target: Target, execs: u64) {
    let assets = Assets::from_cache();
    if target == Target::Jsonl && assets.smollm2.is_none() {
        return; // testing::smollm2_gguf() already failed the run when assets are required
    }
    let h = Harness::new(target, &assets).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (i, s) in h.seeds().iter().enumerate() {
        h.exec(s, &dir.path().join("seed"))
            .unwrap_or_else(|e| panic!("{} seed {i} refused: {e}", target.name()));
    }
    let r = run(
        &h,
        &Options {
            duration: Duration::from_secs(600),
            max_execs: execs,
            rng_seed: 7,
            crash_dir: None,
            timeout: Duration::from_secs(60),
        },
    )
    .unwrap();
    let msgs: Vec<&str> = r.crashes.iter().map(|c| c.message.as_str()).collect();
    assert!(msgs.is_empty(), "{} crashed: {msgs:#?}", target.name());
    assert_eq!(r.execs, execs);
    assert!(r.accepted >= h.seeds().len() as u64 && r.accepted < r.execs, "{r:?}");
    assert!(
        r.distinct_errors >= 20,
        "{}: only {} distinct errors",
        target.name(),
        r.distinct_errors
    );
}

#[test]
fn engine_reader_survives_mutations() {
    smoke(Target::Engine, 1500);
}

#[test]
fn hf_dir_reader_survives_mutations() {
    smoke(Target::HfDir, 3000);
}

#[test]
fn gguf_reader_survives_mutations() {
    smoke(Target::Gguf, 300);
}

#[test]
fn training_data_reader_survives_mutations() {
    smoke(Target::Jsonl, 1500);
}
