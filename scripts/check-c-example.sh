#!/usr/bin/env bash
# The C example (examples/c, built with the system C compiler against libdlo) and the Python ctypes
# example must print exactly what dlo-run prints with the same settings: on a tiny routed checkpoint
# (always) and on SmolLM2 with its chat template (when scripts/fetch-assets.sh has fetched it). This runs
# the dlo-capi `c_example` tests with DLO_RUN pointing at a freshly built dlo-run, so that dlo-run's own
# output is compared too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

cargo build --release -p dlo-run
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Copy right away: target/release/dlo-run may be shared with other checkouts using the same target dir.
cp "$CARGO_TARGET_DIR/release/dlo-run" "$tmp/dlo-run"
DLO_RUN="$tmp/dlo-run" cargo test --release -p dlo-capi --test capi c_example -- --nocapture
# The Makefile build (static and shared) must work too.
cargo build --release -p dlo-capi --lib
make -s -C examples/c OUT="$tmp/static" LIBDIR="$CARGO_TARGET_DIR/release"
make -s -C examples/c OUT="$tmp/shared" LIBDIR="$CARGO_TARGET_DIR/release" LINK=shared
"$tmp/shared/dlo-example" 2>/dev/null && { echo "error: the example should fail without a model" >&2; exit 1; }
echo "C and Python examples agree with dlo-run"
