#!/usr/bin/env bash
# CPU forward-pass benchmark: prefill and decode tokens/s of SmolLM2-135M-Instruct, ours vs llama.cpp vs HF
# transformers, on the same weights at the same precision and thread count (docs/benchmarks.md).
#
#   scripts/bench-cpu.sh                    # f32 and bf16, 2 threads, pp128 / tg64
#   THREADS=4 DTYPES="f32" REPS=5 scripts/bench-cpu.sh
#
# Weights: the Q4_1 GGUF from scripts/fetch-assets.sh, dequantised once: `llama-quantize --allow-requantize`
# to F32 and BF16 GGUFs for llama.cpp, and scripts/gguf_to_hf.py to an f32 HF directory for us and for HF
# (bf16 runs cast those f32 values to bf16 at load, as llama-quantize does: round to nearest even).
# Ours: `target/release/dlo-run MODEL --bench ...` when dlo-run has --bench, else the bench_forward example.
# All three measure prefill as one pass over 128 tokens from an empty cache and decode as 64 single-token steps
# from an empty cache (llama-bench's pp/tg tests), mean of REPS runs after a warm-up.
# Needs: cmake, a C++ compiler, cargo, the project venv (~/.cache/dlo/venv). Builds llama.cpp once (niced, -j1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
PY="${DLO_PYTHON:-$CACHE/venv/bin/python}"
THREADS="${THREADS:-2}"
PP="${PROMPT_TOKENS:-128}"
TG="${GEN_TOKENS:-64}"
REPS="${REPS:-3}"
DTYPES="${DTYPES:-f32 bf16}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$CACHE/bench"
mkdir -p "$WORK"

SMOL=$(bash "$ROOT/scripts/fetch-assets.sh" | sed -n 's/^SMOLLM2_GGUF=//p')
eval "$(bash "$ROOT/scripts/build-llama-cpp.sh")" # sets LLAMA_BENCH, LLAMA_QUANTIZE

# Same weights for everyone: dequantised GGUFs for llama.cpp, an f32 HF directory for us and HF.
for ty in F32 BF16; do
  out="$WORK/smollm2-$(echo "$ty" | tr 'A-Z' 'a-z').gguf"
  if [ ! -s "$out" ]; then
    "$LLAMA_QUANTIZE" --allow-requantize "$SMOL" "$out.tmp" "$ty" >"$WORK/quantize-$ty.log" 2>&1 \
      || { echo "error: llama-quantize to $ty failed, see $WORK/quantize-$ty.log" >&2; exit 1; }
    mv "$out.tmp" "$out"
  fi
done
HF="$CACHE/smollm2-hf-f32"
if [ ! -s "$HF/model.safetensors" ]; then
  "$PY" "$ROOT/scripts/gguf_to_hf.py" "$SMOL" "$HF" >&2
fi

# Our benchmark binary.
OURS=()
if [ -x "$CARGO_TARGET_DIR/release/dlo-run" ] && "$CARGO_TARGET_DIR/release/dlo-run" --help 2>/dev/null | grep -q -- '--bench'; then
  OURS=("$CARGO_TARGET_DIR/release/dlo-run" "$HF" --bench)
else
  (cd "$ROOT" && cargo build --release -q -p dlo-runtime --example bench_forward) >&2
  OURS=("$CARGO_TARGET_DIR/release/examples/bench_forward" "$HF" --reps "$REPS")
fi

# parse KEY from a `prefill_tok_s=X decode_tok_s=Y` line
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" | tail -n1; }

llama_cpp() { # dtype → "pp tg"
  local gguf="$WORK/smollm2-$1.gguf"
  "$LLAMA_BENCH" -m "$gguf" -t "$THREADS" -p "$PP" -n "$TG" -r "$REPS" -o json 2>/dev/null \
    | "$PY" -c 'import json,sys
rows=json.load(sys.stdin)
pp=[r["avg_ts"] for r in rows if r["n_prompt"]>0 and r["n_gen"]==0][0]
tg=[r["avg_ts"] for r in rows if r["n_gen"]>0 and r["n_prompt"]==0][0]
print(f"{pp:.2f} {tg:.2f}")'
}

ours() {
  local line
  line=$("${OURS[@]}" --prompt-tokens "$PP" --gen-tokens "$TG" --threads "$THREADS" --dtype "$1" 2>/dev/null | tail -n1)
  echo "$(echo "$line" | field prefill_tok_s) $(echo "$line" | field decode_tok_s)"
}

hf() {
  local line
  line=$("$PY" "$ROOT/scripts/bench_hf.py" "$HF" --prompt-tokens "$PP" --gen-tokens "$TG" --threads "$THREADS" \
    --dtype "$1" --reps "$REPS" 2>/dev/null | tail -n1)
  echo "$(echo "$line" | field prefill_tok_s) $(echo "$line" | field decode_tok_s)"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }

echo "# SmolLM2-135M-Instruct, CPU, $THREADS threads, pp$PP / tg$TG, mean of $REPS reps ($(date -u +%F), load avg $(cut -d' ' -f1-3 /proc/loadavg))"
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
echo "# ours: ${OURS[*]}"
printf "%-5s | %-10s %-10s | %-10s %-10s | %-10s %-10s | %-8s %-8s | %-8s %-8s\n" dtype \
  "ours_pp" "ours_tg" "lcpp_pp" "lcpp_tg" "hf_pp" "hf_tg" "pp/lcpp" "tg/lcpp" "pp/hf" "tg/hf"
for dt in $DTYPES; do
  read -r o_pp o_tg < <(ours "$dt")
  read -r l_pp l_tg < <(llama_cpp "$dt")
  read -r h_pp h_tg < <(hf "$dt")
  printf "%-5s | %-10s %-10s | %-10s %-10s | %-10s %-10s | %-8s %-8s | %-8s %-8s\n" "$dt" \
    "$o_pp" "$o_tg" "$l_pp" "$l_tg" "$h_pp" "$h_tg" \
    "$(ratio "$o_pp" "$l_pp")" "$(ratio "$o_tg" "$l_tg")" "$(ratio "$o_pp" "$h_pp")" "$(ratio "$o_tg" "$h_tg")"
done
