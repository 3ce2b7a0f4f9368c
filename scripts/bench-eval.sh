#!/usr/bin/env bash
# Scoring speed of `dlo-compile eval` against the PyTorch/transformers scorer (scripts/eval_reference.py), side by
# side on the same machine, threads, model (SmolLM2-135M-Instruct, f32 HF import) and requests: continuation
# tokens scored per second on each task, and the ratio. Both time the forward passes only (model loading and
# tokenisation excluded). The reference runs ROUNDS times and its best run counts.
#
#   scripts/bench-eval.sh   # TASKS=arc_easy,hellaswag LIMIT=100 THREADS=2 ROUNDS=2
#                           # OMP_WAIT_POLICY=ACTIVE|PASSIVE (the reference's default is PASSIVE)
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/setup-python.sh --fixtures)
TASKS="${TASKS:-arc_easy,hellaswag}" LIMIT="${LIMIT:-100}" THREADS="${THREADS:-2}" ROUNDS="${ROUNDS:-2}"
cargo build --release --bins >&2
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
HF="$DLO_CACHE/smollm2-hf-f32"
[ -f "$HF/model.safetensors" ] || "$BIN/dlo-compile" import "$SMOLLM2_GGUF" -o "$HF" --dtype f32
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
echo "$(date -u '+%F %H:%M') $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg); $LIMIT docs per task, $THREADS threads"
echo "| task | requests | tokens run (ours / reference) | ours: scored tokens/s | PyTorch: scored tokens/s | ratio |"
echo "|---|---|---|---|---|---|"
for task in ${TASKS//,/ }; do
  "$BIN/dlo-compile" eval "$HF" --task "$task" --limit "$LIMIT" --threads "$THREADS" -o "$W/$task" > /dev/null 2>&1
  read -r ours run req < <(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print(r['scored_tokens_per_s'], r['tokens_run'], r['requests'])" "$W/$task/results.json")
  best=0 ref_run=0
  for _ in $(seq "$ROUNDS"); do
    line=$("$DLO_TORCH_PYTHON" scripts/eval_reference.py "$HF" --task "$task" --limit "$LIMIT" --threads "$THREADS" -o "$W/$task.ref.jsonl" | grep '^REF_SPEED')
    tps=$(sed 's/.*tokens_per_s=\([0-9.]*\).*/\1/' <<<"$line")
    ref_run=$(sed 's/.*input_tokens=\([0-9]*\).*/\1/' <<<"$line")
    best=$(python3 -c "print(max($best, $tps))")
  done
  python3 -c "print(f'| $task | $req | $run / $ref_run | {$ours:.0f} | {$best:.0f} | **{$ours / $best:.2f}×** |')"
done
