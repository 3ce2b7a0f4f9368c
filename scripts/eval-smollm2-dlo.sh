#!/usr/bin/env bash
# The evidence for DLO on SmolLM2 (issue 14): benchmark accuracy against FLOPs per token, in one
# `dlo-compile eval` run, for
#   - the base model (SmolLM2-135M-Instruct, 30 layers);
#   - its dense fine-tune, and
#   - the 30 → 36 DLO fine-tune (routers on all 36 layers, MLP skipping), as an engine calibrated to its trained
#     per-layer capacities on GSM8K text, at budget 1 (every unit on), at its capacity rule, and at the budget
#     whose FLOPs per token equal the base model's (from the engine's quantile tables); and the same checkpoint
#     built and calibrated at that budget (a second run, $OUT-cal),
# all from scripts/train-smollm2-dlo.sh (GSM8K question → answer SFT: no benchmark below is trained on).
# The equal-FLOPs budget is solved from the base model's FLOPs per token on a short first pass (LIMIT_PROBE docs).
#
#   scripts/eval-smollm2-dlo.sh   # TASKS=arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa,lambada
#                                 # LIMIT=500 THREADS=2 RUN_DIR=$DLO_CACHE/train-smollm2-dlo OUT=$RUN_DIR/eval
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
TASKS="${TASKS:-arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa,lambada}"
LIMIT="${LIMIT:-500}" THREADS="${THREADS:-2}" LIMIT_PROBE="${LIMIT_PROBE:-40}"
W="${RUN_DIR:-$DLO_CACHE/train-smollm2-dlo}"
OUT="${OUT:-$W/eval}"
cargo build --release --bins >&2
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
for f in "$W/base/model.safetensors" "$W/sft-dense/final/model.safetensors" "$W/sft-dlo.dlo"; do
  [ -e "$f" ] || { echo "error: $f missing: run scripts/train-smollm2-dlo.sh first" >&2; exit 1; }
done
# The base model's FLOPs per token on these tasks → the DLO budget with the same FLOPs (MLP skipping: only the
# MLPs of routed layers scale with the execution rate).
rm -rf "$OUT.probe"
"$BIN/dlo-compile" eval "base=$W/base" "dlo-sft=$W/sft-dlo.dlo" --budget 1 --task "$TASKS" --limit "$LIMIT_PROBE" \
  --threads "$THREADS" -o "$OUT.probe" > /dev/null
R=$(python3 - "$OUT.probe/results.json" "$W/sft-dlo/final/config.json" <<'PY'
import json, sys
res = json.load(open(sys.argv[1]))["results"]
cfg = json.load(open(sys.argv[2]))
mean = lambda m: sum(r["flops_per_token"] for r in res if r["model"] == m) / sum(r["model"] == m for r in res)
base, full = mean("base"), mean("dlo-sft")  # the DLO engine at budget 1: every unit on
routed = sum(cfg["is_dlo"])
mlp = 6 * cfg["hidden_size"] * cfg["intermediate_size"]
print(f"{1 - (full - base) / (routed * mlp):.4f}")
PY
)
echo "budget with the base model's FLOPs per token: $R" >&2
rm -rf "$OUT"
"$BIN/dlo-compile" eval "base=$W/base" "dense-sft=$W/sft-dense/final" "dlo-sft=$W/sft-dlo.dlo" --budget "1,capacity,$R" \
  --task "$TASKS" --limit "$LIMIT" --threads "$THREADS" -o "$OUT"
# The same budget calibrated at build time (fixed-point iteration on the GSM8K text), not mapped from quantiles
[ -f "$W/sft-dlo-r$R.dlo" ] || "$BIN/dlo-compile" build "$W/sft-dlo/final" -o "$W/sft-dlo-r$R.dlo" --budget "$R" \
  --calibration "$W/gsm8k.txt"
rm -rf "$OUT-cal"
"$BIN/dlo-compile" eval "dense-sft=$W/sft-dense/final" "dlo-sft-cal=$W/sft-dlo-r$R.dlo" --task "$TASKS" \
  --limit "$LIMIT" --threads "$THREADS" -o "$OUT-cal"
# DLO at the base model's FLOPs against the dense fine-tune (same FLOPs), per document, and at its other budgets
for run in "dlo-sft:$R" dlo-sft:capacity dlo-sft:1; do
  echo
  python3 scripts/eval_paired.py "$OUT" "$run" dense-sft
done
echo
python3 scripts/eval_paired.py "$OUT-cal" dlo-sft-cal dense-sft
