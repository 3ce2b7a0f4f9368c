#!/usr/bin/env bash
# TensorRT builds: `dlo-compile build --target tensorrt` on the tiny routed fixtures, dense SmolLM2, SmolLM2
# expanded to a 36-layer DLO model (random routers) with a calibrated budget of 0.5, and (when scripts/train-smollm2-dlo.sh has
# run) the trained 36-layer DLO model at its trained capacities. Prints one Markdown row per model: build time,
# peak RSS, engine sizes and the layer counts of the parsed networks (IIfConditional, TopK, scatter).
#
#   bash scripts/bench-tensorrt.sh            # needs libclang-dev; builds dlo-compile with --features tensorrt
#
# Work files go to $DLO_CACHE/bench-tensorrt (outside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS="=" read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
cargo build --release --quiet -p dlo-compiler --features tensorrt
BIN=target/release/dlo-compile
WORK="$DLO_CACHE/bench-tensorrt"
mkdir -p "$WORK"
CAL="$CHATTERBOT/ai.yml"

if [ ! -f "$WORK/smollm2-hf/config.json" ]; then
  rm -rf "$WORK/smollm2-hf"
  "$BIN" import "$SMOLLM2_GGUF" -o "$WORK/smollm2-hf" --dtype f32 >&2
fi
if [ ! -f "$WORK/smollm2-dlo36/config.json" ]; then
  rm -rf "$WORK/smollm2-dlo36"
  "$BIN" expand "$WORK/smollm2-hf" -o "$WORK/smollm2-dlo36" --layers 36 --router-init random >&2
fi

# row LABEL SOURCE [build args...]
row() {
  local label="$1" src="$2"
  shift 2
  local out="$WORK/out-$(echo "$label" | tr -c 'a-zA-Z0-9' '_')"
  rm -rf "$out"
  local log="$WORK/last.log"
  /usr/bin/time -f "%e %M" -o "$WORK/time" "$BIN" build "$src" --target tensorrt -o "$out" "$@" 2>"$log" \
    || { cat "$log" >&2; exit 1; }
  read -r secs kb <"$WORK/time"
  python3 - "$label" "$out/manifest.json" "$secs" "$kb" <<'EOF'
import json, sys
label, path, secs, kb = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
m = json.load(open(path))
p, d = m["prefill"], m["decode"]
routed = sum(1 for l in m["layers"] if l["routed"] != "none")
print(f"| {label} | {routed} | {secs:.1f} s | {kb / 1e6:.2f} GB | "
      f"{p['bytes'] / 1e6:.1f} MB, {p['build_ms'] / 1e3:.1f} s | {d['bytes'] / 1e6:.1f} MB, {d['build_ms'] / 1e3:.1f} s | "
      f"{d['network']['conditionals']} | {p['network']['topk']} | {p['network']['scatters']} / {d['network']['scatters']} |")
EOF
}

echo "| model | routed layers | whole build | peak RSS | prefill engine | decode engine | IIfConditional (decode) | TopK (prefill) | scatters (prefill / decode) |"
echo "|---|---|---|---|---|---|---|---|---|"
row "tiny, mlp skip (fixture)" tests/fixtures/dlo_mlp
row "tiny, layer skip (fixture)" tests/fixtures/dlo_layer
row "SmolLM2-135M dense (Q4_1 GGUF → f32)" "$SMOLLM2_GGUF"
row "SmolLM2 expanded 30→36 (random routers), budget 0.5" "$WORK/smollm2-dlo36" --budget 0.5 --calibration "$CAL"
TRAINED="$DLO_CACHE/train-smollm2-dlo/sft-dlo/final"
if [ -f "$TRAINED/config.json" ]; then
  row "SmolLM2-DLO 36 layers, trained, budget capacity" "$TRAINED" --budget capacity --calibration "$CAL"
fi
echo
python3 - "$(ls -d "$WORK"/out-*/manifest.json | head -1)" "$(nproc)" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))["tensorrt"]
print(f"built by {t['library']} {t['version']} (build {t['build']}) on {sys.argv[2]} cores, no GPU")
EOF
