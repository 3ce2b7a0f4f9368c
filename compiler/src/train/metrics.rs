//! Training feedback: per-step and eval records (`metrics.jsonl` in the output directory) and an SVG plot
//! of the losses and per-layer execution rates. The SVG is written by hand: text is plain `<text>`, so no
//! font is needed on the machine that draws it.

use super::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// An optimizer step.
    Train(StepMetrics),
    /// A held-out evaluation.
    Eval(EvalMetrics),
}

/// What one optimizer step did (means over its micro-batches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step number (1-based: the step just taken).
    pub step: u64,
    /// Fractional epoch of the data position after the step.
    pub epoch: f64,
    /// Total loss CE + λ·L_route.
    pub loss: f64,
    /// Next-token CE on assistant tokens.
    pub ce: f64,
    /// Routing loss L_route (0 for dense models).
    pub route: f64,
    /// Peak-relative learning rate actually used for tensors outside routed layers.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean over routed layers of the top-k execution rate (real tokens).
    pub exec_rate: f64,
    /// Per layer: top-k execution rate (`None` for dense layers).
    pub exec: Vec<Option<f64>>,
    /// Per layer: fraction of real tokens with σ(z) > 0.5 (what inference would execute).
    pub router_rate: Vec<Option<f64>>,
    /// Per layer: fraction of real tokens labelled "execute".
    pub label_rate: Vec<Option<f64>>,
    /// Per layer: capacity used by this step's last micro-batch.
    pub capacity: Vec<Option<f64>>,
    /// Real tokens processed.
    pub tokens: u64,
    /// Target tokens.
    pub target_tokens: u64,
    /// Tokens per second (wall clock; not reproducible).
    pub tokens_per_s: f64,
    /// Where the step's time went (wall clock; not reproducible).
    #[serde(default)]
    pub timing: Timing,
}

/// Seconds spent in the parts of one optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Training forward and losses, all micro-batches.
    pub forward_s: f64,
    /// Backward passes and gradient accumulation.
    pub backward_s: f64,
    /// Clipping and the AdamW update.
    pub optimizer_s: f64,
}

/// A held-out evaluation under the inference routing rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// After this many steps.
    pub step: u64,
    /// The inference routing rule evaluated.
    #[serde(default)]
    pub routing: EvalRouting,
    /// CE per target token over the held-out split.
    pub loss: f64,
    /// Mean execution rate over routed layers under `routing`.
    pub exec_rate: f64,
    /// Per layer execution rate.
    pub exec: Vec<Option<f64>>,
    /// Target tokens evaluated.
    pub target_tokens: u64,
}

/// The inference routing rule of a held-out evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EvalRouting {
    /// The reference's rule: a unit runs iff its router logit is > 0 (σ(z) > 0.5).
    #[default]
    Reference,
    /// Per-layer thresholds calibrated on training text so that each routed layer executes its current
    /// training capacity (what `dlo-compile build --budget capacity` deploys).
    Capacity,
}

impl EvalRouting {
    /// Its name on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalRouting::Reference => "reference",
            EvalRouting::Capacity => "capacity",
        }
    }
}

/// Reads `metrics.jsonl`.
pub fn read_log(path: &Path) -> Result<Vec<Record>> {
    read_log_inner(path, false)
}

/// Reads `metrics.jsonl`; with `tolerate_torn_tail`, a malformed **last** line (a write cut short by a
/// killed process) is dropped instead of being an error.
fn read_log_inner(path: &Path, tolerate_torn_tail: bool) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (k, (i, l)) in lines.iter().enumerate() {
        match serde_json::from_str(l) {
            Ok(r) => out.push(r),
            Err(_) if tolerate_torn_tail && k + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(TrainError::Data {
                    path: path.into(),
                    line: i + 1,
                    problem: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Appends to `metrics.jsonl`.
pub struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// Opens the log; when resuming at `keep_until`, records after that step (from a run that went on
    /// past its last checkpoint) are dropped first. `keep_until = 0` starts a fresh log.
    pub fn open(path: &Path, keep_until: u64) -> Result<Self> {
        let keep: Vec<Record> = if keep_until == 0 {
            vec![]
        } else {
            read_log_inner(path, true)?
                .into_iter()
                .filter(|r| match r {
                    Record::Train(s) => s.step <= keep_until,
                    Record::Eval(e) => e.step <= keep_until,
                })
                .collect()
        };
        let mut text = String::new();
        for r in &keep {
            text.push_str(&serde_json::to_string(r).map_err(|e| TrainError::Invalid(e.to_string()))?);
            text.push('\n');
        }
        std::fs::write(path, text).map_err(|e| TrainError::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsLog {
            file,
            path: path.into(),
        })
    }

    /// Appends one record.
    pub fn write(&mut self, r: &Record) -> Result<()> {
        let line = serde_json::to_string(r).map_err(|e| TrainError::Invalid(e.to_string()))?;
        writeln!(self.file, "{line}").map_err(|e| TrainError::io(&self.path, e))
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A colour per series (layer index or curve), cycling through a qualitative palette.
fn colour(i: usize) -> &'static str {
    const P: [&str; 10] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    ];
    P[i % P.len()]
}

/// One panel: named polylines over x (steps) in a box at `top`.
fn panel(svg: &mut String, top: f64, title: &str, series: &[(String, Vec<(f64, f64)>)], y_unit: Option<(f64, f64)>) {
    let (left, width, height) = (70.0, 760.0, 220.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    svg.push_str(&format!(
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-family=\"sans-serif\">{}</text>\n",
        top - 8.0,
        esc(title)
    ));
    svg.push_str(&format!(
        "<rect x=\"{left}\" y=\"{top}\" width=\"{width}\" height=\"{height}\" fill=\"none\" stroke=\"#444\"/>\n"
    ));
    if pts.is_empty() {
        return;
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (mut y0, mut y1) = match y_unit {
        Some(r) => r,
        None => pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1))),
    };
    if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let x1 = if x1 - x0 < 1e-9 { x0 + 1.0 } else { x1 };
    let px = |x: f64| left + (x - x0) / (x1 - x0) * width;
    let py = |y: f64| top + height - (y - y0) / (y1 - y0) * height;
    for (k, v) in [(0.0, y0), (0.5, (y0 + y1) / 2.0), (1.0, y1)] {
        let y = top + height - k * height;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"end\">{v:.3}</text>\n",
            left - 4.0,
            y + 4.0
        ));
    }
    for (k, v) in [(0.0, x0), (1.0, x1)] {
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"middle\">step {v:.0}</text>\n",
            left + k * width,
            top + height + 14.0
        ));
    }
    for (i, (name, s)) in series.iter().enumerate() {
        let path: Vec<String> = s
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        if path.is_empty() {
            continue;
        }
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            colour(i),
            path.join(" ")
        ));
        let (lx, ly) = (left + width + 8.0, top + 12.0 + 13.0 * i as f64);
        if ly < top + height {
            svg.push_str(&format!(
                "<text x=\"{lx}\" y=\"{ly}\" font-size=\"11\" font-family=\"sans-serif\" fill=\"{}\">{}</text>\n",
                colour(i),
                esc(name)
            ));
        }
    }
}

/// Renders the losses and per-layer execution rates of a log as SVG.
pub fn plot_svg(records: &[Record]) -> String {
    let train: Vec<&StepMetrics> = records
        .iter()
        .filter_map(|r| match r {
            Record::Train(s) => Some(s),
            _ => None,
        })
        .collect();
    let evals: Vec<&EvalMetrics> = records
        .iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some(e),
            _ => None,
        })
        .collect();
    let n_layers = train.first().map_or(0, |s| s.exec.len());
    let per_layer = |f: &dyn Fn(&StepMetrics) -> &Vec<Option<f64>>| -> Vec<(String, Vec<(f64, f64)>)> {
        (0..n_layers)
            .filter(|&l| train.iter().any(|s| f(s).get(l).copied().flatten().is_some()))
            .map(|l| {
                (
                    format!("layer {l}"),
                    train
                        .iter()
                        .filter_map(|s| f(s).get(l).copied().flatten().map(|v| (s.step as f64, v)))
                        .collect(),
                )
            })
            .collect()
    };
    let mut svg = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"940\" height=\"880\" viewBox=\"0 0 940 880\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
    );
    let mut losses = vec![
        (
            "train CE".to_string(),
            train.iter().map(|s| (s.step as f64, s.ce)).collect(),
        ),
        (
            "routing loss".to_string(),
            train.iter().map(|s| (s.step as f64, s.route)).collect(),
        ),
    ];
    let rules: Vec<EvalRouting> = [EvalRouting::Reference, EvalRouting::Capacity]
        .into_iter()
        .filter(|r| evals.iter().any(|e| e.routing == *r))
        .collect();
    for r in &rules {
        let name = match rules.len() {
            1 => "held-out CE".to_string(),
            _ => format!("held-out CE ({})", r.as_str()),
        };
        losses.push((
            name,
            evals
                .iter()
                .filter(|e| e.routing == *r)
                .map(|e| (e.step as f64, e.loss))
                .collect(),
        ));
    }
    panel(&mut svg, 30.0, "loss", &losses, None);
    panel(
        &mut svg,
        320.0,
        "training execution rate per layer (top-k)",
        &per_layer(&|s| &s.exec),
        Some((0.0, 1.0)),
    );
    panel(
        &mut svg,
        610.0,
        "inference execution rate per layer (sigma(z) > 0.5)",
        &per_layer(&|s| &s.router_rate),
        Some((0.0, 1.0)),
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(s: u64) -> StepMetrics {
        StepMetrics {
            step: s,
            epoch: 0.0,
            loss: 3.0 - s as f64 * 0.1,
            ce: 2.5,
            route: 0.5,
            lr: 1e-3,
            grad_norm: 1.0,
            exec_rate: 0.9,
            exec: vec![None, Some(0.9)],
            router_rate: vec![None, Some(0.4)],
            label_rate: vec![None, Some(0.8)],
            capacity: vec![None, Some(0.9)],
            tokens: 10,
            target_tokens: 5,
            tokens_per_s: 100.0,
            timing: Timing::default(),
        }
    }

    #[test]
    fn log_resumes_by_dropping_records_past_the_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&p, 0).unwrap();
        for s in 1..=5 {
            log.write(&Record::Train(step(s))).unwrap();
        }
        log.write(&Record::Eval(EvalMetrics {
            step: 5,
            routing: EvalRouting::Reference,
            loss: 2.0,
            exec_rate: 0.5,
            exec: vec![None, Some(0.5)],
            target_tokens: 3,
        }))
        .unwrap();
        drop(log);
        let mut log = MetricsLog::open(&p, 3).unwrap();
        log.write(&Record::Train(step(4))).unwrap();
        let r = read_log(&p).unwrap();
        let steps: Vec<u64> = r
            .iter()
            .map(|r| match r {
                Record::Train(s) => s.step,
                Record::Eval(e) => 100 + e.step,
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        let svg = plot_svg(&r);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("layer 1"));
        assert!(!svg.contains("layer 0"), "dense layers have no rate curve");
        // a torn last line (killed mid-write) is dropped on resume, but is an error anywhere else
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"kind\":\"train\",\"st");
        std::fs::write(&p, &text).unwrap();
        assert!(read_log(&p).is_err());
        drop(log);
        MetricsLog::open(&p, 4).unwrap();
        assert_eq!(read_log(&p).unwrap().len(), 4);
        std::fs::write(&p, text.replace("\"step\":2,", "\"step\":2,,") + "\n").unwrap();
        let e = MetricsLog::open(&p, 4).err().unwrap().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }
}
