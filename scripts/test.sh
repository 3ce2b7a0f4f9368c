#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch assets, set up the Python reference checkers,
# then format, lint and test the whole workspace in release mode (numeric tests are slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
while IFS="=" read -r k v; do export "$k=$v"; done < <(DLO_FETCH_LLAMA_CPP=1 bash scripts/fetch-assets.sh)
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/setup-python.sh)
# The PyTorch reference (torch 2.3.0 + transformers 4.40.1, the reference implementation's pins): DLO_TORCH_PYTHON.
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/setup-python.sh --fixtures)
# Tests that need an asset or the Python env fail when it is missing (instead of skipping), and each one that
# found what it needs appends a line to this log, counted at the end (dlo_runtime::testing::found_or_skip).
export DLO_REQUIRE_ASSETS=1
DLO_ASSET_TEST_LOG="$(mktemp)"
export DLO_ASSET_TEST_LOG
trap 'rm -f "$DLO_ASSET_TEST_LOG"' EXIT
# The `tensorrt` feature (TensorRT-RTX's builder, loaded at run time) is built and tested here; its bindings
# are generated with libclang.
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  echo "installing libclang-dev (the trtx crate's bindgen needs it) ..." >&2
  apt-get install -y -q libclang-dev >&2 || { apt-get update -q >&2 && apt-get install -y -q libclang-dev >&2; }
fi
FEATURES=(--features dlo-compiler/tensorrt)
cargo fmt --all --check
cargo clippy --release --workspace --all-targets "${FEATURES[@]}" -- -D warnings
# Without the feature too: the fallback that says how to get it.
cargo clippy --release -p dlo-runtime -p dlo-compiler --all-targets -- -D warnings
cargo build --release --workspace --bins "${FEATURES[@]}"
cargo test --release --workspace "${FEATURES[@]}"
# C ABI: the committed header is current, the C and Python examples agree with dlo-run, valgrind is clean.
bash scripts/check-header.sh
bash scripts/check-c-example.sh
bash scripts/valgrind-c-example.sh
# Distinct `<test binary> <test name>` lines: a test that looks up several assets, or runs twice, counts once.
ran="$(sort -u "$DLO_ASSET_TEST_LOG" | grep -c . || true)"
echo "asset-dependent tests run: $ran"
if [ "$ran" -eq 0 ]; then
  echo "error: no asset-dependent test ran (DLO_REQUIRE_ASSETS=1)" >&2
  exit 1
fi
