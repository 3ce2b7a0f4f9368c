//! The `expand` pass: deepen the model by inserting new layers (`dlo-method.md` §3.2–3.4).
//!
//! - [`ExpandMethod::Interleave`] (LLaMA Pro, the default): split = ⌊L / (L'−L)⌋; after every original
//!   layer i with (i+1) mod split = 0 a new layer built from layer i is inserted. The count must come out
//!   at exactly L' (e.g. 32→40 puts new layers at 4, 9, …, 39 built from 3, 7, …, 31).
//! - [`ExpandMethod::StackSide`] (SOLAR): m = L'−L (even, ≤ L), e = (L−m)/2; the stack is
//!   `[0, e+m) ++ [e, e+m) ++ [e+m, L)`, the second copy of `[e, e+m)` being the new layers.
//! - [`ExpandMethod::StackManual`]: half-open base-layer ranges concatenated; they must lie in `[0, L)` and
//!   sum to L'. Every appearance of a layer after its first is a new layer.
//!
//! New layers are initialised per [`NewLayerInit`]. Merges combine the source layer j with its
//! predecessor j−1 in base numbering, in every method (as the reference's interleave does; for j = 0 they
//! fall back to an exact copy). Unlike the reference, stack-side and stack-manual copy **whole layers**
//! and support every init (the reference copies only `q_proj` there and supports only `normal`).

use crate::error::{Error, Result};
use crate::ir::{mix_seed, CopyInit, ExpansionInfo, LayerSource, LayerSpec, ModelSpec};
use crate::pass::Pass;
use std::ops::Range;

/// Layer-placement method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandMethod {
    /// LLaMA Pro block expansion.
    Interleave,
    /// SOLAR depth up-scaling.
    StackSide,
    /// Explicit half-open base-layer ranges.
    StackManual(Vec<Range<usize>>),
}

impl ExpandMethod {
    /// `interleave`, `stack-side` or `stack-manual`.
    pub fn name(&self) -> &'static str {
        match self {
            ExpandMethod::Interleave => "interleave",
            ExpandMethod::StackSide => "stack-side",
            ExpandMethod::StackManual(_) => "stack-manual",
        }
    }
}

/// How new layers are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewLayerInit {
    /// Copy with `o_proj` and `down_proj` zeroed (identity at init).
    Zeros,
    /// Exact copy (the reference's `normal`).
    Copy,
    /// HF default init (N(0, 0.02) matrices, unit norms).
    Random,
    /// Mean of the layer and its predecessor.
    MergeLinear,
    /// SLERP (t = 0.5) of the layer and its predecessor.
    MergeSlerp,
}

impl NewLayerInit {
    /// Parses `zeros|copy|normal|random|merge-linear|merge-slerp` (`normal` is the reference's name for copy).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "zeros" => NewLayerInit::Zeros,
            "copy" | "normal" => NewLayerInit::Copy,
            "random" => NewLayerInit::Random,
            "merge-linear" => NewLayerInit::MergeLinear,
            "merge-slerp" => NewLayerInit::MergeSlerp,
            other => {
                return Err(Error::Unknown {
                    what: "init",
                    value: other.into(),
                    expected: "zeros, copy, random, merge-linear, merge-slerp",
                })
            }
        })
    }
    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            NewLayerInit::Zeros => "zeros",
            NewLayerInit::Copy => "copy",
            NewLayerInit::Random => "random",
            NewLayerInit::MergeLinear => "merge-linear",
            NewLayerInit::MergeSlerp => "merge-slerp",
        }
    }

    /// The source of a new layer built from base layer `j`, placed at output index `out`.
    pub fn source(self, j: usize, out: usize, seed: u64) -> LayerSource {
        match self {
            NewLayerInit::Zeros => LayerSource::Copy {
                from: j,
                init: CopyInit::Zeros,
            },
            NewLayerInit::Copy => LayerSource::Copy {
                from: j,
                init: CopyInit::Exact,
            },
            NewLayerInit::Random => LayerSource::Random {
                like: j,
                seed: mix_seed(seed, out as u64, 1),
            },
            NewLayerInit::MergeLinear if j > 0 => LayerSource::MergeLinear { a: j, b: j - 1 },
            NewLayerInit::MergeSlerp if j > 0 => LayerSource::MergeSlerp { a: j, b: j - 1, t: 0.5 },
            NewLayerInit::MergeLinear | NewLayerInit::MergeSlerp => LayerSource::Copy {
                from: j,
                init: CopyInit::Exact,
            },
        }
    }
}

/// Parses stack-manual ranges `0-8,6-12` (also the reference's `[0,8];[6,12]`) into half-open ranges,
/// checking each is non-empty. Bounds against the base model are checked by [`layer_map`].
pub fn parse_ranges(s: &str) -> Result<Vec<Range<usize>>> {
    let cleaned: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let parts: Vec<&str> = if cleaned.contains(';') {
        cleaned.split(';').collect()
    } else {
        cleaned.split(',').collect()
    };
    let mut out = Vec::new();
    for part in parts.iter().filter(|p| !p.is_empty()) {
        let inner = part.trim_start_matches('[').trim_end_matches(']');
        let bad = |problem: &str| Error::Range {
            range: part.to_string(),
            problem: problem.into(),
        };
        let (a, b) = inner
            .split_once('-')
            .or_else(|| inner.split_once(','))
            .ok_or_else(|| bad("expected START-END (half-open), e.g. 0-8"))?;
        let a: usize = a.parse().map_err(|_| bad("start is not a non-negative integer"))?;
        let b: usize = b.parse().map_err(|_| bad("end is not a non-negative integer"))?;
        if a >= b {
            return Err(bad(
                "empty range: start must be smaller than end (ranges are half-open)",
            ));
        }
        out.push(a..b);
    }
    if out.is_empty() {
        return Err(Error::Range {
            range: s.into(),
            problem: "no ranges given (stack-manual needs --ranges, e.g. 0-8,6-12,10-22,20-26,24-32)".into(),
        });
    }
    Ok(out)
}

/// Formats ranges as `0-8,6-12`.
pub fn format_ranges(r: &[Range<usize>]) -> String {
    r.iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

/// Targets near `target` that interleave can reach from `base` layers.
fn interleave_targets_near(base: usize, target: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=base)
        .filter(|&d| base / (base / d) == d)
        .map(|d| base + d)
        .collect();
    v.sort_by_key(|&t| (t as i64 - target as i64).abs());
    v.truncate(3);
    v.sort();
    v
}

/// The layer map of an expansion: for each output layer, `(base layer, is_new)`.
pub fn layer_map(method: &ExpandMethod, base: usize, target: usize) -> Result<Vec<(usize, bool)>> {
    let count_err = |problem: String| Error::LayerCount {
        method: method_name_static(method),
        base,
        target,
        problem,
    };
    if base == 0 {
        return Err(count_err("the base model has no layers".into()));
    }
    match method {
        ExpandMethod::Interleave | ExpandMethod::StackSide if target < base => Err(count_err(format!(
            "{} only adds layers; the target must be at least {base}",
            method.name()
        ))),
        ExpandMethod::Interleave | ExpandMethod::StackSide if target == base => {
            Ok((0..base).map(|i| (i, false)).collect())
        }
        ExpandMethod::Interleave => {
            let added = target - base;
            if added > base {
                return Err(count_err(format!(
                    "interleave adds at most one layer after each original, i.e. at most {base} new layers, not {added}"
                )));
            }
            let split = base / added;
            let mut map = Vec::with_capacity(target);
            for i in 0..base {
                map.push((i, false));
                if (i + 1) % split == 0 {
                    map.push((i, true));
                }
            }
            if map.len() != target {
                return Err(count_err(format!(
                    "split = ⌊{base}/{added}⌋ = {split} inserts a layer after every {split}th original, giving {} new layers, not {added} (reachable targets near {target}: {:?})",
                    map.len() - base,
                    interleave_targets_near(base, target)
                )));
            }
            Ok(map)
        }
        ExpandMethod::StackSide => {
            let m = target - base;
            if !m.is_multiple_of(2) {
                return Err(count_err(format!("the {m} added layers must be an even number")));
            }
            if m > base {
                return Err(count_err(format!(
                    "the {m} added (overlapped) layers must not exceed the {base} base layers"
                )));
            }
            let e = (base - m) / 2;
            let mut map: Vec<(usize, bool)> = (0..e + m).map(|i| (i, false)).collect();
            map.extend((e..e + m).map(|i| (i, true)));
            map.extend((e + m..base).map(|i| (i, false)));
            debug_assert_eq!(map.len(), target);
            Ok(map)
        }
        ExpandMethod::StackManual(ranges) => {
            let text = format_ranges(ranges);
            for r in ranges {
                if r.start >= r.end {
                    return Err(Error::Range {
                        range: format!("{}-{}", r.start, r.end),
                        problem: "empty range: start must be smaller than end (ranges are half-open)".into(),
                    });
                }
                if r.end > base {
                    return Err(Error::Range {
                        range: format!("{}-{}", r.start, r.end),
                        problem: format!(
                            "out of bounds: the base model has {base} layers (ranges are half-open, end ≤ {base})"
                        ),
                    });
                }
            }
            let sum: usize = ranges.iter().map(|r| r.len()).sum();
            if sum != target {
                return Err(Error::RangeSum {
                    ranges: text,
                    sum,
                    target,
                });
            }
            let mut seen = vec![false; base];
            let mut map = Vec::with_capacity(target);
            for r in ranges {
                for i in r.clone() {
                    map.push((i, seen[i]));
                    seen[i] = true;
                }
            }
            Ok(map)
        }
    }
}

fn method_name_static(m: &ExpandMethod) -> &'static str {
    m.name()
}

/// The expand pass. Must run on an unexpanded spec; routers are left to [`crate::InsertRouters`].
#[derive(Debug, Clone, PartialEq)]
pub struct Expand {
    /// Placement method.
    pub method: ExpandMethod,
    /// L', the output layer count.
    pub target: usize,
    /// Init of new layers.
    pub init: NewLayerInit,
    /// Seed for random init.
    pub seed: u64,
}

impl Pass for Expand {
    fn name(&self) -> &'static str {
        "expand"
    }

    fn run(&self, spec: &mut ModelSpec) -> Result<bool> {
        if !spec.is_unexpanded() {
            return Err(Error::InvalidSpec {
                problem: "expand must run on the base model's layers (it already ran, or layers were edited)".into(),
            });
        }
        let map = layer_map(&self.method, spec.base_layers(), self.target)?;
        spec.layers = map
            .iter()
            .enumerate()
            .map(|(out, &(j, is_new))| LayerSpec {
                source: if is_new {
                    self.init.source(j, out, self.seed)
                } else {
                    LayerSource::Original(j)
                },
                router: None,
            })
            .collect();
        spec.expansion = Some(ExpansionInfo {
            method: self.method.name().into(),
            init: self.init.as_str().into(),
            ranges: match &self.method {
                ExpandMethod::StackManual(r) => Some(format_ranges(r)),
                _ => None,
            },
        });
        Ok(map.iter().any(|&(_, n)| n) || map.len() != spec.base_layers())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_interleave_targets_are_reachable() {
        // 32 → 45 is not reachable; the suggestions are, and are the nearest ones.
        let near = interleave_targets_near(32, 45);
        assert_eq!(near, [40, 42, 48]);
        for t in near {
            assert!(layer_map(&ExpandMethod::Interleave, 32, t).is_ok(), "{t}");
        }
    }

    #[test]
    fn ranges_accept_spaces_and_reject_missing_dash() {
        assert_eq!(parse_ranges(" 0-2 , 1-3 ").unwrap(), [0..2, 1..3]);
        assert!(parse_ranges("0:2")
            .unwrap_err()
            .to_string()
            .contains("expected START-END"));
    }
}
