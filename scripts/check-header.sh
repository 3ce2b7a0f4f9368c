#!/usr/bin/env bash
# Regenerates include/dlo.h from capi/src with cbindgen and fails when the committed header differs.
#
#   scripts/check-header.sh           # check (CI): exit 1 and show the diff when include/dlo.h is stale
#   scripts/check-header.sh --write   # regenerate include/dlo.h in place
#
# cbindgen is a development tool, not a build dependency (so building libdlo never needs it). When it is
# not on PATH (or in ~/.cargo/bin), it is installed from crates.io with the pinned version below.
set -euo pipefail
CBINDGEN_VERSION="0.29.4"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cbindgen="$(command -v cbindgen || true)"
[[ -z "$cbindgen" && -x "$HOME/.cargo/bin/cbindgen" ]] && cbindgen="$HOME/.cargo/bin/cbindgen"
if [[ -n "$cbindgen" ]] && ! "$cbindgen" --version | grep -qF " $CBINDGEN_VERSION"; then
    echo "note: $cbindgen is $("$cbindgen" --version), expected $CBINDGEN_VERSION; installing the pinned one" >&2
    cbindgen=""
fi
if [[ -z "$cbindgen" ]]; then
    # Installed into its own root (not the shared CARGO_TARGET_DIR) so that it never touches workspace builds.
    tools="${DLO_TOOLS_DIR:-$HOME/.cache/dlo/tools}"
    if [[ ! -x "$tools/bin/cbindgen" ]] || ! "$tools/bin/cbindgen" --version | grep -qF " $CBINDGEN_VERSION"; then
        echo "installing cbindgen $CBINDGEN_VERSION into $tools" >&2
        env -u CARGO_TARGET_DIR cargo install cbindgen --version "=$CBINDGEN_VERSION" --locked --root "$tools" >&2
    fi
    cbindgen="$tools/bin/cbindgen"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$cbindgen" --quiet --config capi/cbindgen.toml --crate dlo-capi --output "$tmp/dlo.h" capi

if [[ "${1:-}" == "--write" ]]; then
    mv "$tmp/dlo.h" include/dlo.h
    echo "wrote include/dlo.h"
elif diff -u include/dlo.h "$tmp/dlo.h"; then
    echo "include/dlo.h is up to date"
else
    echo "error: include/dlo.h is stale; run scripts/check-header.sh --write and commit it" >&2
    exit 1
fi
