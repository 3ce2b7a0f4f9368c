#!/usr/bin/env bash
# CPU forward-pass benchmark: prefill and decode tokens/s of SmolLM2-135M-Instruct, ours vs llama.cpp vs HF
# transformers, on the same weights at the same precision and thread count (docs/benchmarks.md).
#
#   scripts/bench-cpu.sh                    # f32 and bf16, 2 threads, pp128 / tg64
#   DTYPES="q8_0 q4_1 q4_k_m q4_0" THREADS="1 2" ENGINES="ours llama_cpp" scripts/bench-cpu.sh
#                                           # quantized weights: both run the same GGUF file in its own blocks
#   THREADS="1 2" DTYPES="f32" ROUNDS=5 REPS=2 scripts/bench-cpu.sh
#   PROMPT_TOKENS=4096 GEN_TOKENS=0 DTYPES=f32 ENGINES="ours llama_cpp" RSS_TOKENS=8000 scripts/bench-cpu.sh
#                                           # long prompts: pp4096 ours vs llama.cpp, and the peak RSS of an
#                                           # 8,000-token prefill against a 1-token run (docs/benchmarks.md)
#
# ENGINES picks engines (default "ours llama_cpp hf"); GEN_TOKENS=0 measures prefill only (ours still samples the
# one token that ends its prefill). RSS_TOKENS=N adds, after the rounds, the peak RSS (`/usr/bin/time -f %M`) of
# `dlo-run --bench --prompt-tokens N --gen-tokens 1` and of the same with 1 prompt token (the weights baseline),
# for each thread count and dtype.
#
# Weights: the Q4_1 GGUF from scripts/fetch-assets.sh, dequantised once: `llama-quantize --allow-requantize`
# to F32 and BF16 GGUFs for llama.cpp, and scripts/gguf_to_hf.py to an f32 HF directory for us and for HF
# (bf16 runs cast those f32 values to bf16 at load, as llama-quantize does: round to nearest even).
# Quantized dtypes (q8_0, q4_0, q4_k_m, …: llama-quantize's type names, lower case) are GGUFs that
# llama-quantize makes from the F32 GGUF (q4_1 is the shipped file itself); llama.cpp and ours (`dlo-run
# FILE.gguf --bench`, no --dtype: the file's own blocks) run the same file. HF has no row for them.
# Ours: `dlo-run MODEL --bench ...` (built from this checkout) when it has --bench, else the bench_forward example.
# All three measure prefill as one pass over 128 tokens from an empty cache and decode as 64 single-token steps
# from an empty cache (llama-bench's pp/tg tests), mean of REPS runs after a warm-up. llama.cpp keeps its default
# f16 KV cache (llama-bench has no f32 cache type); at <= 128 positions the cache is < 2% of the bytes read.
# Needs: cmake, a C++ compiler, cargo, the project venv (~/.cache/dlo/venv). Builds llama.cpp once (niced, -j1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
PY="${DLO_TORCH_PYTHON:-$CACHE/venv/bin/python}"  # torch + transformers (setup-python.sh --fixtures)
THREADS="${THREADS:-2}"  # one or more thread counts, e.g. "1 2"
PP="${PROMPT_TOKENS:-128}"
TG="${GEN_TOKENS:-64}"
REPS="${REPS:-2}"
ROUNDS="${ROUNDS:-3}"
DTYPES="${DTYPES:-f32 bf16}"
ENGINES="${ENGINES:-ours llama_cpp hf}"
RSS_TOKENS="${RSS_TOKENS:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$CACHE/bench"
mkdir -p "$WORK"

SMOL=$(bash "$ROOT/scripts/fetch-assets.sh" | sed -n 's/^SMOLLM2_GGUF=//p')
eval "$(bash "$ROOT/scripts/build-llama-cpp.sh")" # sets LLAMA_BENCH, LLAMA_QUANTIZE

# Same weights for everyone: dequantised GGUFs for llama.cpp, an f32 HF directory for us and HF.
is_float() { case "$1" in f32|bf16|f16) return 0 ;; *) return 1 ;; esac; }
quantize_to() { # source gguf, llama-quantize type → $WORK/smollm2-<type>.gguf
  local out="$WORK/smollm2-$(echo "$2" | tr 'A-Z' 'a-z').gguf"
  if [ ! -s "$out" ]; then
    "$LLAMA_QUANTIZE" --allow-requantize "$1" "$out.tmp" "$2" >"$WORK/quantize-$2.log" 2>&1 \
      || { echo "error: llama-quantize to $2 failed, see $WORK/quantize-$2.log" >&2; exit 1; }
    mv "$out.tmp" "$out"
  fi
}
for ty in F32 BF16; do quantize_to "$SMOL" "$ty"; done
ln -sf "$SMOL" "$WORK/smollm2-q4_1.gguf"
for dt in $DTYPES; do
  is_float "$dt" || [ "$dt" = q4_1 ] || quantize_to "$WORK/smollm2-f32.gguf" "$(echo "$dt" | tr 'a-z' 'A-Z')"
done
HF="$CACHE/smollm2-hf-f32"
if [ ! -s "$HF/model.safetensors" ]; then
  "$PY" "$ROOT/scripts/gguf_to_hf.py" "$SMOL" "$HF" >&2
fi

# Our benchmark binary, built from this checkout and copied aside: a shared target directory may be rebuilt
# by other checkouts while the benchmark runs.
(cd "$ROOT" && cargo build --release -q -p dlo-run) >&2
if "$CARGO_TARGET_DIR/release/dlo-run" --help 2>/dev/null | grep -q -- '--bench'; then
  cp "$CARGO_TARGET_DIR/release/dlo-run" "$WORK/ours.bin"
  OURS=("$WORK/ours.bin" "$HF" --bench)
  OURS_DESC="dlo-run MODEL --bench"
else
  (cd "$ROOT" && cargo build --release -q -p dlo-runtime --example bench_forward) >&2
  cp "$CARGO_TARGET_DIR/release/examples/bench_forward" "$WORK/ours.bin"
  OURS=("$WORK/ours.bin" "$HF" --reps "$REPS")
  OURS_DESC="runtime/examples/bench_forward.rs"
fi

# parse KEY from a `prefill_tok_s=X decode_tok_s=Y` line
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" | tail -n1; }

llama_cpp() { # dtype threads → "pp tg" (mean of REPS)
  "$LLAMA_BENCH" -m "$WORK/smollm2-$1.gguf" -t "$2" -p "$PP" -n "$TG" -r "$REPS" -o json 2>/dev/null \
    | "$PY" -c 'import json,sys
rows=json.load(sys.stdin)
pp=[r["avg_ts"] for r in rows if r["n_prompt"]>0 and r["n_gen"]==0] or [float("nan")]
tg=[r["avg_ts"] for r in rows if r["n_gen"]>0 and r["n_prompt"]==0] or [float("nan")]
print(f"{pp[0]:.2f} {tg[0]:.2f}")'
}

# ours' command for a dtype: the f32 HF directory with --dtype, or the quantized GGUF as it is.
ours_cmd() {
  if is_float "$1"; then echo "${OURS[*]} --dtype $1"; else echo "$WORK/ours.bin $WORK/smollm2-$1.gguf --bench"; fi
}

ours() {
  local line
  # shellcheck disable=SC2046
  line=$($(ours_cmd "$1") --prompt-tokens "$PP" --gen-tokens "$((TG > 0 ? TG : 1))" --threads "$2" \
    2>/dev/null | tail -n1)
  local tg
  tg=$(echo "$line" | field decode_tok_s)
  [ "$TG" -gt 0 ] || tg=nan
  echo "$(echo "$line" | field prefill_tok_s) $tg"
}

hf() {
  is_float "$1" || { echo "nan nan"; return; }
  local line
  line=$("$PY" "$ROOT/scripts/bench_hf.py" "$HF" --prompt-tokens "$PP" --gen-tokens "$TG" --threads "$2" \
    --dtype "$1" --reps "$REPS" 2>/dev/null | tail -n1)
  echo "$(echo "$line" | field prefill_tok_s) $(echo "$line" | field decode_tok_s)"
}

# ROUNDS rounds; in each, every engine runs once per (threads, dtype), interleaved, so that load from other
# processes hits all of them alike. Reported: the best round (least disturbed) and the median round.
RAW="$WORK/bench-cpu-$(date -u +%Y%m%dT%H%M%S).tsv"
printf "round\tthreads\tdtype\tengine\tpp\ttg\tload1\n" >"$RAW"
for r in $(seq 1 "$ROUNDS"); do
  for t in $THREADS; do
    for dt in $DTYPES; do
      for eng in $ENGINES; do
        read -r pp tg < <("$eng" "$dt" "$t" || true)
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$r" "$t" "$dt" "$eng" "${pp:-nan}" "${tg:-nan}" "$(cut -d' ' -f1 /proc/loadavg)" >>"$RAW"
      done
    done
  done
done

echo "# SmolLM2-135M-Instruct on CPU: pp$PP / tg$TG tokens/s; $ROUNDS interleaved rounds (each the mean of $REPS reps)"
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load average during the runs: $(awk -F'\t' 'NR>1{print $7}' "$RAW" | sort -n | sed -n '1p;$p' | paste -sd- -)"
echo "# ours: $OURS_DESC ($(cd "$ROOT" && git rev-parse --short HEAD)); llama.cpp: $LLAMA_BENCH (-ctk/-ctv f16, default); raw: $RAW"
"$PY" - "$RAW" <<'PYEOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
keys = sorted({(int(r["threads"]), r["dtype"]) for r in rows}, key=lambda k: (k[0], k[1] != "f32"))
def get(t, dt, eng, col, how):
    v = [float(r[col]) for r in rows if int(r["threads"]) == t and r["dtype"] == dt and r["engine"] == eng]
    v = [x for x in v if x == x]
    if not v:
        return float("nan")
    return max(v) if how == "best" else statistics.median(v)
def ratio(a, b):
    return f"{a / b:.2f}" if b == b and b > 0 and a == a else "n/a"
for how in ("best", "median"):
    print(f"\n{how} round:")
    print("| threads | dtype | ours pp | ours tg | llama.cpp pp | llama.cpp tg | HF pp | HF tg | pp ours/llama.cpp | tg ours/llama.cpp | pp ours/HF | tg ours/HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t, dt in keys:
        o = [get(t, dt, "ours", c, how) for c in ("pp", "tg")]
        l = [get(t, dt, "llama_cpp", c, how) for c in ("pp", "tg")]
        h = [get(t, dt, "hf", c, how) for c in ("pp", "tg")]
        print(f"| {t} | {dt} | {o[0]:.1f} | {o[1]:.1f} | {l[0]:.1f} | {l[1]:.1f} | {h[0]:.1f} | {h[1]:.1f} | "
              f"{ratio(o[0], l[0])} | {ratio(o[1], l[1])} | {ratio(o[0], h[0])} | {ratio(o[1], h[1])} |")
PYEOF

# Peak RSS of a long prefill against a 1-token run (the weights and runtime alone), ours only.
if [ -n "$RSS_TOKENS" ]; then
  echo
  echo "peak RSS (/usr/bin/time -f %M) of $OURS_DESC --gen-tokens 1:"
  echo "| threads | dtype | prompt tokens | peak RSS MB | 1-token peak RSS MB | above the 1-token run MB | prefill tok/s |"
  echo "|---|---|---|---|---|---|---|"
  rss() { # dtype threads prompt-tokens → "kB prefill_tok_s"
    # shellcheck disable=SC2046
    /usr/bin/time -f "%M" -o "$WORK/rss.time" $(ours_cmd "$1") --prompt-tokens "$3" --gen-tokens 1 --threads "$2" \
      >"$WORK/rss.out" 2>/dev/null
    echo "$(tail -n1 "$WORK/rss.time") $(field prefill_tok_s <"$WORK/rss.out")"
  }
  for t in $THREADS; do
    for dt in $DTYPES; do
      read -r base _ < <(rss "$dt" "$t" 1)
      read -r peak pre < <(rss "$dt" "$t" "$RSS_TOKENS")
      echo "| $t | $dt | $RSS_TOKENS | $((peak / 1024)) | $((base / 1024)) | $(((peak - base) / 1024)) | $pre |"
    done
  done
fi
