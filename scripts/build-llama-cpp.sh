#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` and `llama-quantize` from the sources in the llama-cpp-python==0.3.36 sdist
# (vendor/llama.cpp), into a cache directory outside the repository. Idempotent: does nothing when both
# binaries exist (and, when LLAMA_CPP_SRC is given, are newer than its CMakeLists.txt).
#
# Sources: $LLAMA_CPP_SRC, else what `DLO_FETCH_LLAMA_CPP=1 scripts/fetch-assets.sh` unpacked.
# Output:  $LLAMA_CPP_BUILD (default $DLO_CACHE/llama.cpp-build/build-noamx); prints LLAMA_BENCH=… and
#          LLAMA_QUANTIZE=….
# Flags:   -march=native (GGML_NATIVE) without AMX: on our VMs ggml's AMX kernels for Q8_0/Q4_0 die with SIGILL at
#          their first `tilezero` (tile data not enabled for the process), so llama.cpp runs its AVX-512/VNNI kernels,
#          the fastest that work here.
# Jobs:    $JOBS (default 1; the build is niced so it does not starve other work).
set -euo pipefail

CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JOBS="${JOBS:-1}"

BUILD="${LLAMA_CPP_BUILD:-$CACHE/llama.cpp-build/build-noamx}"
BENCH="$BUILD/bin/llama-bench"
QUANT="$BUILD/bin/llama-quantize"
if [ -z "${LLAMA_CPP_SRC:-}" ] && [ -x "$BENCH" ] && [ -x "$QUANT" ]; then
  echo "LLAMA_BENCH=$BENCH"
  echo "LLAMA_QUANTIZE=$QUANT"
  exit 0
fi

if [ -z "${LLAMA_CPP_SRC:-}" ]; then
  LLAMA_CPP_SRC=$(ls -d "$CACHE"/pkgs/llama-cpp-python/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n1 || true)
  if [ -z "$LLAMA_CPP_SRC" ]; then
    LLAMA_CPP_SRC=$(DLO_FETCH_LLAMA_CPP=1 bash "$HERE/fetch-assets.sh" | sed -n 's/^LLAMA_CPP_SRC=//p')
  fi
fi
if [ ! -f "$LLAMA_CPP_SRC/CMakeLists.txt" ]; then
  echo "error: no llama.cpp sources at '$LLAMA_CPP_SRC' (set LLAMA_CPP_SRC or run DLO_FETCH_LLAMA_CPP=1 scripts/fetch-assets.sh)" >&2
  exit 1
fi
command -v cmake >/dev/null || { echo "error: cmake not found (apt-get install cmake)" >&2; exit 1; }

if [ -x "$BENCH" ] && [ -x "$QUANT" ] && [ "$BENCH" -nt "$LLAMA_CPP_SRC/CMakeLists.txt" ]; then
  echo "LLAMA_BENCH=$BENCH"
  echo "LLAMA_QUANTIZE=$QUANT"
  exit 0
fi

# -mno-amx-* where the compiler knows them (GCC >= 11, Clang >= 12).
NO_AMX=""
if echo 'int main(){return 0;}' | ${CC:-cc} -x c -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 - -o /dev/null 2>/dev/null; then
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
echo "building llama.cpp from $LLAMA_CPP_SRC into $BUILD (-j $JOBS) ..." >&2
nice -n 15 cmake -S "$LLAMA_CPP_SRC" -B "$BUILD" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
nice -n 15 cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-bench llama-quantize >&2
echo "LLAMA_BENCH=$BENCH"
echo "LLAMA_QUANTIZE=$QUANT"
