#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch assets, set up the Python reference checkers,
# then format, lint and test the whole workspace in release mode (numeric tests are slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS="=" read -r k v; do export "$k=$v"; done < <(DLO_FETCH_LLAMA_CPP=1 bash scripts/fetch-assets.sh)
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/setup-python.sh)
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --workspace --bins
cargo test --release --workspace
# C ABI: the committed header is current, the C and Python examples agree with dlo-run, valgrind is clean.
bash scripts/check-header.sh
bash scripts/check-c-example.sh
bash scripts/valgrind-c-example.sh
