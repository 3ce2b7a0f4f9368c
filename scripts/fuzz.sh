#!/usr/bin/env bash
# Long fuzzing runs of dlo's file readers (the short deterministic ones are `cargo test -p dlo-fuzz`).
#
#   scripts/fuzz.sh                      # every target for 1 h, one after another
#   SECONDS_PER_TARGET=600 JOBS=2 scripts/fuzz.sh engine gguf
#
# Each target runs single-threaded (RAYON_NUM_THREADS=1) under a virtual-memory limit (MEM_LIMIT_KB,
# default 6 GiB), so an allocation sized from a hostile number aborts instead of swapping: the input that
# did it is in $DLO_CACHE/fuzz/TARGET/current, which this script keeps as a crash, then it restarts the
# target with the next mutation seed until the time is used. Prints one summary line per target:
# `target=… execs=… crashes=… aborts=… seconds=…` (crashes = panics and hangs caught in-process, aborts =
# processes killed by a signal). Inputs of crashes stay under $DLO_CACHE/fuzz/TARGET/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
TOTAL="${SECONDS_PER_TARGET:-3600}"
JOBS="${JOBS:-1}"
MEM="${MEM_LIMIT_KB:-6291456}"
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(engine hf-dir gguf jsonl)
while IFS="=" read -r k v; do export "$k=$v"; done < <(bash "$ROOT/scripts/fetch-assets.sh")
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release -q -p dlo-fuzz --manifest-path "$ROOT/Cargo.toml"
# A copy, so that rebuilding the workspace during a long run does not swap the binary under a restart.
mkdir -p "$CACHE/fuzz"
BIN="$CACHE/fuzz/dlo-fuzz"
cp "$CARGO_TARGET_DIR/release/dlo-fuzz" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"

fuzz_target() { # target → summary line
  local t="$1" dir="$CACHE/fuzz/$1" start left seed=1 execs=0 crashes=0 aborts=0 rc out
  mkdir -p "$dir"
  start=$(date +%s)
  while :; do
    left=$(( TOTAL - ($(date +%s) - start) ))
    [ "$left" -le 0 ] && break
    set +e
    out=$( (ulimit -v "$MEM"; RAYON_NUM_THREADS=1 "$BIN" "$t" --seconds "$left" --rng-seed "$seed" \
      --crash-dir "$dir/run-$seed") 2>"$dir/run-$seed.stderr")
    rc=$?
    set -e
    echo "$out" >"$dir/run-$seed.out"
    local line; line=$(grep '^target=' <<<"$out" || true)
    if [ -n "$line" ]; then
      execs=$(( execs + $(sed 's/.* execs=\([0-9]*\).*/\1/' <<<"$line") ))
      crashes=$(( crashes + $(sed 's/.* crashes=\([0-9]*\).*/\1/' <<<"$line") ))
    fi
    if [ "$rc" -gt 1 ]; then # killed by a signal (abort on allocation failure, or the hang watchdog)
      aborts=$(( aborts + 1 ))
      [ -d "$dir/run-$seed/current" ] && mv "$dir/run-$seed/current" "$dir/abort-$seed"
      echo "$t: process ended with status $rc; input kept in $dir/abort-$seed ($(grep -m1 -E "memory allocation|panicked|hang|error" "$dir/run-$seed.stderr" || tail -1 "$dir/run-$seed.stderr"))" >&2
    fi
    if [ "$rc" -le 1 ]; then
      # Finished its time (crashes, if any, are in its output); no summary line = it could not start.
      [ -n "$line" ] || { echo "$t: dlo-fuzz failed: $(cat "$dir/run-$seed.stderr")" >&2; return 1; }
      break
    fi
    seed=$(( seed + 1 ))
  done
  echo "target=$t execs=$execs crashes=$crashes aborts=$aborts seconds=$(( $(date +%s) - start )) rayon_threads=1 mem_limit_kb=$MEM"
}

running=0
for t in "${TARGETS[@]}"; do
  fuzz_target "$t" &
  running=$(( running + 1 ))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$(( running - 1 )); fi
done
wait
