#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct): fetch assets, build, and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/fetch-assets.sh)
cargo build --release --bins
BIN=target/release
WORK="${DLO_DEMO_DIR:-$DLO_CACHE/demo}"
mkdir -p "$WORK"

echo "== dlo-run: chat with SmolLM2-135M-Instruct (GGUF)"
"$BIN/dlo-run" "$SMOLLM2_GGUF" --chat --prompt "What is the capital of France?" --max-tokens 32 --stats
