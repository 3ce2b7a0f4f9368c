#!/usr/bin/env python3
"""Paired comparison of two (model, budget) runs of one `dlo-compile eval` output directory.

Usage: python3 scripts/eval_paired.py DIR MODEL_A[:BUDGET] MODEL_B[:BUDGET] [--metric acc|acc_per_char|acc_per_token]

Both runs scored the same documents, so the difference of their accuracies is judged per document: for each
multiple-choice task (and over all of them pooled) it prints A's and B's accuracy, the mean of the per-document
differences (A − B), its standard error (sample standard deviation / √n) and the difference in standard errors.
Prints also each run's mean executed GFLOPs per token (from results.json). BUDGET defaults to `default`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def predictions(rows, metric):
    """doc → (predicted idx, label) for the conditional rows of one run of one task."""
    by_doc = defaultdict(list)
    for r in rows:
        if r["doc_id"] < 1_000_000 and isinstance(r["label"], int):
            by_doc[r["doc_id"]].append(r)
    uncond = {(r["doc_id"] - 1_000_000, r["idx"]): r["ll"] for r in rows if r["doc_id"] >= 1_000_000}
    out = {}
    for d, rs in by_doc.items():
        rs.sort(key=lambda r: r["idx"])

        def score(r):
            if metric == "acc_per_char":
                return r["ll"] / max(r["chars"], 1)
            if metric == "acc_per_token":
                return r["ll"] / max(r["tokens"], 1)
            if metric == "acc_uncond":
                return r["ll"] - uncond[(d, r["idx"])]
            return r["ll"]

        best = max(range(len(rs)), key=lambda i: (score(rs[i]), -i))
        out[d] = (best, rs[0]["label"])
    return out


def mean_se(xs):
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd / math.sqrt(n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--metric", default="acc", choices=["acc", "acc_per_char", "acc_per_token", "acc_uncond"])
    args = ap.parse_args()
    runs = [tuple((s.split(":", 1) + ["default"])[:2]) for s in (args.a, args.b)]
    rows = defaultdict(list)
    for line in open(Path(args.dir) / "requests.jsonl"):
        r = json.loads(line)
        if (r["model"], r["budget"]) in runs:
            rows[(r["model"], r["budget"], r["task"])].append(r)
    results = json.load(open(Path(args.dir) / "results.json"))["results"]
    for m, b in runs:
        rs = [r for r in results if r["model"] == m and r["budget"] == b]
        if not rs:
            raise SystemExit(f"{args.dir}: no results for model {m} at budget {b}")
        g = sum(r["flops_per_token"] for r in rs) / len(rs) / 1e9
        print(f"{m} @ {b}: {g:.4f} GFLOPs/token (mean over its {len(rs)} tasks)")
    tasks = sorted({t for (_, _, t) in rows})
    pooled = []
    print(f"\n| task ({args.metric}) | docs | {runs[0][0]} @ {runs[0][1]} | {runs[1][0]} @ {runs[1][1]} "
          "| difference ± s.e. | in s.e. |")
    print("|---|---|---|---|---|---|")
    for t in tasks:
        pa = predictions(rows[(*runs[0], t)], args.metric)
        pb = predictions(rows[(*runs[1], t)], args.metric)
        docs = sorted(set(pa) & set(pb))
        if not docs:
            continue
        diff = [(pa[d][0] == pa[d][1]) - (pb[d][0] == pb[d][1]) for d in docs]
        acc_a = sum(pa[d][0] == pa[d][1] for d in docs) / len(docs)
        acc_b = sum(pb[d][0] == pb[d][1] for d in docs) / len(docs)
        m, se = mean_se(diff)
        pooled += diff
        z = m / se if se > 0 else 0.0
        print(f"| {t} | {len(docs)} | {acc_a:.3f} | {acc_b:.3f} | {m:+.3f} ± {se:.3f} | {z:+.1f} |")
    if pooled:
        m, se = mean_se(pooled)
        z = m / se if se > 0 else 0.0
        print(f"| all (pooled documents) | {len(pooled)} | | | {m:+.4f} ± {se:.4f} | {z:+.1f} |")


if __name__ == "__main__":
    main()
