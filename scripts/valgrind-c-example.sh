#!/usr/bin/env bash
# Runs the C example (examples/c/main.c, linked statically with libdlo) under valgrind's memcheck on a
# tiny routed checkpoint: once on the process-wide thread pool and once with a private 2-thread session
# pool, and once on a file that is not a model (the error path). Fails on any invalid access, use of
# uninitialised memory, or leak (definite or possible) that scripts/valgrind.supp does not explain.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
command -v valgrind >/dev/null || { echo "error: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

cargo build --release -p dlo-capi --lib --example make-tiny-checkpoint
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
make -s -C examples/c OUT="$tmp" LIBDIR="$CARGO_TARGET_DIR/release"
"$CARGO_TARGET_DIR/release/examples/make-tiny-checkpoint" "$tmp/tiny" --layer-skip

vg=(valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect,possible
    --errors-for-leak-kinds=definite,indirect,possible --track-origins=yes
    --suppressions="$root/scripts/valgrind.supp" --error-exitcode=99)
status=0
for threads in 0 2; do
    echo "== valgrind: tiny routed checkpoint, --threads $threads"
    if ! "${vg[@]}" "$tmp/dlo-example" "$tmp/tiny" --token-ids 4,8,15,16,23,42 --max-tokens 12 \
            --threads "$threads" --stats; then
        status=1
    fi
done
echo "== valgrind: a file that is not a model (must fail cleanly with exit status 1)"
set +e
"${vg[@]}" "$tmp/dlo-example" "$root/Cargo.toml" 2>"$tmp/err.txt"
rc=$?
set -e
cat "$tmp/err.txt"
if [[ $rc -ne 1 ]]; then
    echo "error: expected exit status 1, got $rc" >&2
    status=1
fi
if [[ $status -eq 0 ]]; then
    echo "valgrind: no errors, no leaks"
fi
exit $status
