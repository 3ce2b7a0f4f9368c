//! Task metrics from per-request scores, reported the way lm-evaluation-harness and OLMES report them.
//!
//! Multiple choice: the prediction is the first choice with the highest score, for four scores — the sum
//! log-likelihood (`acc`), per character of the continuation (`acc_per_char`, the harness's `acc_norm`), per
//! token (`acc_per_token`), and the log-likelihood minus that of the same continuation after the neutral
//! context (`acc_uncond`, PMI; only for tasks whose files have unconditional rows). Last word (LAMBADA):
//! greedy accuracy, perplexity `exp(−mean ll)` over documents, and bits per byte of the continuations.
//! Standard errors of means are the sample standard deviation over √n, as the harness computes them.

use serde::Serialize;

/// A mean and its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mean {
    /// The mean.
    pub value: f64,
    /// Sample standard deviation / √n (0 for fewer than two values).
    pub stderr: f64,
}

impl Mean {
    /// The mean of `xs` (non-empty) and its standard error.
    pub fn of(xs: &[f64]) -> Mean {
        let n = xs.len() as f64;
        let value = xs.iter().sum::<f64>() / n;
        let stderr = if xs.len() < 2 {
            0.0
        } else {
            (xs.iter().map(|x| (x - value).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt()
        };
        Mean { value, stderr }
    }
}

/// One scored choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// Sum log-likelihood of the continuation.
    pub ll: f64,
    /// Whether it was the greedy continuation.
    pub greedy: bool,
    /// Continuation tokens.
    pub tokens: usize,
    /// Characters of the continuation as given in the request file.
    pub chars: usize,
    /// Log-likelihood after the neutral context, when the task has it.
    pub uncond_ll: Option<f64>,
}

/// A scored document.
#[derive(Debug, Clone, PartialEq)]
pub struct DocScore {
    /// The gold choice (`None` for last-word tasks).
    pub label: Option<usize>,
    /// Its choices, in order.
    pub choices: Vec<Choice>,
}

/// Multiple-choice metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultipleChoice {
    /// Documents scored.
    pub docs: usize,
    /// Accuracy by sum log-likelihood.
    pub acc: Mean,
    /// Accuracy by log-likelihood per character.
    pub acc_per_char: Mean,
    /// Accuracy by log-likelihood per token.
    pub acc_per_token: Mean,
    /// Accuracy by log-likelihood minus the unconditional one (PMI), when every document has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_uncond: Option<Mean>,
}

/// Last-word metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastWord {
    /// Documents scored.
    pub docs: usize,
    /// Fraction whose continuation is the greedy one.
    pub acc: Mean,
    /// exp(−mean log-likelihood) over documents.
    pub perplexity: f64,
    /// −Σ ll / (ln 2 · Σ UTF-8 bytes of the continuations).
    pub bits_per_byte: f64,
}

/// The index of the first largest of `xs`.
fn first_argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Multiple-choice metrics of `docs` (non-empty, each with a label).
pub fn multiple_choice(docs: &[DocScore]) -> MultipleChoice {
    let acc = |score: &dyn Fn(&Choice) -> f64| -> Mean {
        let hits: Vec<f64> = docs
            .iter()
            .map(|d| (Some(first_argmax(d.choices.iter().map(score))) == d.label) as u8 as f64)
            .collect();
        Mean::of(&hits)
    };
    let has_uncond = docs.iter().all(|d| d.choices.iter().all(|c| c.uncond_ll.is_some()));
    MultipleChoice {
        docs: docs.len(),
        acc: acc(&|c| c.ll),
        acc_per_char: acc(&|c| c.ll / c.chars.max(1) as f64),
        acc_per_token: acc(&|c| c.ll / c.tokens.max(1) as f64),
        acc_uncond: has_uncond.then(|| acc(&|c| c.ll - c.uncond_ll.unwrap_or(0.0))),
    }
}

/// Last-word metrics of `docs` (non-empty, one choice each); `bytes[i]` is document i's continuation size.
pub fn last_word(docs: &[DocScore], bytes: &[usize]) -> LastWord {
    let lls: Vec<f64> = docs.iter().map(|d| d.choices[0].ll).collect();
    let hits: Vec<f64> = docs.iter().map(|d| d.choices[0].greedy as u8 as f64).collect();
    let total_bytes = bytes.iter().sum::<usize>().max(1) as f64;
    LastWord {
        docs: docs.len(),
        acc: Mean::of(&hits),
        perplexity: (-lls.iter().sum::<f64>() / lls.len() as f64).exp(),
        bits_per_byte: -lls.iter().sum::<f64>() / (std::f64::consts::LN_2 * total_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(ll: f64, tokens: usize, chars: usize, uncond_ll: Option<f64>) -> Choice {
        Choice {
            ll,
            greedy: false,
            tokens,
            chars,
            uncond_ll,
        }
    }

    #[test]
    fn each_normalisation_picks_its_own_winner() {
        // choice 0 wins on the sum, 1 per character, 2 per token, 1 against the unconditional score
        let d = DocScore {
            label: Some(1),
            choices: vec![
                choice(-4.0, 4, 4, Some(-4.5)),
                choice(-6.0, 6, 12, Some(-9.0)),
                choice(-5.0, 10, 5, Some(-5.0)),
            ],
        };
        let m = multiple_choice(std::slice::from_ref(&d));
        assert_eq!(
            (m.acc.value, m.acc_per_char.value, m.acc_per_token.value),
            (0.0, 1.0, 0.0)
        );
        assert_eq!(m.acc_uncond.unwrap().value, 1.0);
        let mut no_uncond = d.clone();
        no_uncond.choices[0].uncond_ll = None;
        assert!(multiple_choice(&[d, no_uncond]).acc_uncond.is_none());
    }

    #[test]
    fn stderr_is_the_sample_deviation_over_root_n() {
        let m = Mean::of(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m.value, 0.75);
        // sample variance 0.25, n = 4: sqrt(0.25 / 4)
        assert!((m.stderr - 0.25).abs() < 1e-12);
        assert_eq!(Mean::of(&[1.0]).stderr, 0.0);
    }

    #[test]
    fn last_word_perplexity_and_bits_per_byte() {
        let d = |ll: f64, greedy| DocScore {
            label: None,
            choices: vec![Choice {
                greedy,
                ..choice(ll, 1, 5, None)
            }],
        };
        let m = last_word(&[d(-1.0, true), d(-3.0, false)], &[4, 4]);
        assert_eq!(m.acc.value, 0.5);
        assert!((m.perplexity - 2f64.exp()).abs() < 1e-12);
        assert!((m.bits_per_byte - 4.0 / (8.0 * std::f64::consts::LN_2)).abs() < 1e-12);
    }
}
