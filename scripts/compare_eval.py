#!/usr/bin/env python3
"""Compare `dlo-compile eval`'s scores (DIR/requests.jsonl) with the reference's (scripts/eval_reference.py).

Usage: python3 scripts/compare_eval.py OURS.jsonl REF.jsonl [--model M] [--budget B] [--tol 1e-3]

Rows join on (task, doc_id, idx). Ours may hold several models and compute budgets (its `model` and `budget`
keys): --model and --budget pick one; they are required when ours holds more than one, so that every
(task, doc_id, idx) names one row. Every reference row must be present in ours (ours may hold more rows).

Printed per task: rows compared, max |Δll| (and where), the accuracy of each side over the reference's
documents (argmax of ll over a document's conditional rows, doc_id < 1,000,000, first on ties; integer labels
only), and how many documents' predictions and rows' `greedy` flags differ.

Exit status 0 only when every |Δll| <= --tol, every document's prediction (argmax) is the same on both sides,
and the joined rows describe the same requests (equal label, chars and tokens: a different continuation split
would show there); 1 when they do not agree; 2 when a file cannot be read or the rows cannot be joined.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

UNCOND = 1_000_000
REQUIRED = ("task", "doc_id", "idx", "label", "ll", "greedy", "tokens", "chars")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_rows(path: str) -> list[dict]:
    rows = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not valid JSON: {e}")
            if not isinstance(r, dict):
                fail(f"{path}:{n}: expected a JSON object")
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                fail(f"{path}:{n}: missing {', '.join(missing)}")
            if not isinstance(r["ll"], (int, float)) or isinstance(r["ll"], bool):
                fail(f"{path}:{n}: `ll` is not a number: {r['ll']!r}")
            r["_line"] = n
            rows.append(r)
    if not rows:
        fail(f"{path}: no rows")
    return rows


def index(rows: list[dict], path: str) -> dict:
    out = {}
    for r in rows:
        key = (r["task"], r["doc_id"], r["idx"])
        if key in out:
            fail(f"{path}: lines {out[key]['_line']} and {r['_line']} both score task {key[0]} doc {key[1]} idx "
                 f"{key[2]}" + (" (pick one model and budget with --model / --budget)" if "model" in r else ""))
        out[key] = r
    return out


def pick(rows: list[dict], path: str, model: str | None, budget: str | None) -> list[dict]:
    """Ours, cut to one (model, budget)."""
    for flag, key, want in (("--model", "model", model), ("--budget", "budget", budget)):
        have = sorted({str(r.get(key)) for r in rows})
        if want is not None:
            rows = [r for r in rows if r.get(key) == want]
            if not rows:
                fail(f"{path}: no rows with {key} {want!r} (it holds: {', '.join(have)})")
        elif len(have) > 1:
            fail(f"{path} holds {len(have)} {key}s ({', '.join(have)}): pick one with {flag}")
    return rows


def predictions(rows: dict, docs: dict) -> dict:
    """doc → predicted idx (argmax of ll over the doc's conditional rows, first idx on ties)."""
    out = {}
    for doc, idxs in docs.items():
        lls = [(rows[(doc[0], doc[1], i)]["ll"], -i) for i in idxs]
        out[doc] = -max(lls)[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ours")
    ap.add_argument("ref")
    ap.add_argument("--model", help="the `model` of our rows to compare")
    ap.add_argument("--budget", help="the `budget` of our rows to compare")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |Δll| allowed (default 1e-3)")
    a = ap.parse_args()
    if not a.tol >= 0:
        ap.error(f"--tol {a.tol}: must be a non-negative number")
    ours = index(pick(read_rows(a.ours), a.ours, a.model, a.budget), a.ours)
    ref = index(read_rows(a.ref), a.ref)

    absent = [k for k in ref if k not in ours]
    if absent:
        shown = ", ".join(f"{t} doc {d} idx {i}" for t, d, i in absent[:5])
        fail(f"{len(absent)} of {len(ref)} reference rows are not in {a.ours}: {shown}"
             + (", ..." if len(absent) > 5 else ""))

    bad = False
    tasks = sorted({k[0] for k in ref})
    for task in tasks:
        keys = [k for k in ref if k[0] == task]
        worst, worst_key, nonfinite, differ = 0.0, None, [], []
        greedy_diff = 0
        for k in keys:
            o, r = ours[k], ref[k]
            # `dlo-compile eval` keeps integer (multiple-choice) labels only; LAMBADA's are lists of answers
            int_label = isinstance(r["label"], int) and not isinstance(r["label"], bool)
            for f in ("label", "chars", "tokens") if int_label else ("chars", "tokens"):
                if o[f] != r[f]:
                    differ.append(f"doc {k[1]} idx {k[2]}: {f} {o[f]!r} (ours) vs {r[f]!r} (reference)")
            if not (math.isfinite(o["ll"]) and math.isfinite(r["ll"])):
                nonfinite.append(k)
                continue
            d = abs(o["ll"] - r["ll"])
            if worst_key is None or d > worst:
                worst, worst_key = d, k
            greedy_diff += bool(o["greedy"]) != bool(r["greedy"])
        docs: dict = {}
        for k in keys:
            if k[1] < UNCOND:
                docs.setdefault((task, k[1]), []).append(k[2])
        for v in docs.values():
            v.sort()
        labelled = {d: v for d, v in docs.items() if isinstance(ref[(d[0], d[1], v[0])]["label"], int)
                    and not isinstance(ref[(d[0], d[1], v[0])]["label"], bool)}
        p_ours, p_ref = predictions(ours, labelled), predictions(ref, labelled)
        flips = [d for d in labelled if p_ours[d] != p_ref[d]]

        def acc(p):
            return sum(p[d] == ref[(d[0], d[1], labelled[d][0])]["label"] for d in labelled) / len(labelled)

        line = f"{task}: {len(keys)} rows, max |Δll| {worst:.3e}"
        if worst_key is not None:
            line += f" (doc {worst_key[1]} idx {worst_key[2]})"
        if labelled:
            line += (f"; {len(labelled)} docs, accuracy ours {acc(p_ours):.3f} reference {acc(p_ref):.3f}, "
                     f"{len(flips)} predictions differ")
        else:
            line += f"; {len(docs)} docs without integer labels (no accuracy)"
        line += f"; greedy differs on {greedy_diff} rows"
        print(line)
        problems = []
        if worst > a.tol:
            over = sum(1 for k in keys if k not in nonfinite and abs(ours[k]["ll"] - ref[k]["ll"]) > a.tol)
            problems.append(f"{over} rows differ by more than {a.tol:g} in ll (worst {worst:.3e})")
        if nonfinite:
            problems.append(f"{len(nonfinite)} rows with a non-finite ll (first: doc {nonfinite[0][1]} idx "
                            f"{nonfinite[0][2]})")
        if flips:
            problems.append(f"predictions differ on docs {', '.join(str(d[1]) for d in flips[:10])}"
                            + (", ..." if len(flips) > 10 else ""))
        if differ:
            problems.append(f"{len(differ)} fields describe different requests, first: {differ[0]}")
        for p in problems:
            print(f"  FAIL {p}")
        bad |= bool(problems)
    extra = len(ours) - len(ref)
    if extra:
        print(f"({extra} rows of ours have no reference row and are not compared)")
    print("FAIL" if bad else f"OK: {len(ref)} rows within {a.tol:g}, every prediction the same")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
