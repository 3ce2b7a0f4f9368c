#!/usr/bin/env bash
# Builds libdlo (release) and installs the C library for other programs:
#   PREFIX/lib/libdlo.so, PREFIX/lib/libdlo.a, PREFIX/include/dlo.h, PREFIX/lib/pkgconfig/dlo.pc
#
#   scripts/install-capi.sh [PREFIX]        # default PREFIX: /usr/local
#
# Then: cc app.c $(pkg-config --cflags --libs dlo)             (shared; add PREFIX/lib to the loader path
#       cc app.c $(pkg-config --cflags --libs --static dlo)     if it is not a system directory)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${1:-/usr/local}"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release -p dlo-capi --lib
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
[[ -n "$version" ]] || { echo "error: no workspace version in Cargo.toml" >&2; exit 1; }
lib="$CARGO_TARGET_DIR/release"
install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$lib/libdlo.so" "$prefix/lib/libdlo.so"
install -m 0644 "$lib/libdlo.a" "$prefix/lib/libdlo.a"
install -m 0644 include/dlo.h "$prefix/include/dlo.h"
tmp="$(mktemp "$prefix/lib/pkgconfig/.dlo.pc.XXXXXX")"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" dlo.pc.in >"$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$prefix/lib/pkgconfig/dlo.pc"
echo "installed libdlo $version into $prefix (pkg-config: PKG_CONFIG_PATH=$prefix/lib/pkgconfig)"
