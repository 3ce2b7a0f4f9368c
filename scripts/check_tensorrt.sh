#!/usr/bin/env bash
# Optional check: does TensorRT accept our ONNX export? Parses DIR/decode.onnx (and DIR/prefill.onnx) with the
# TensorRT-RTX 1.7 ONNX parser and builds serialized engines, on a CPU-only machine (no GPU or driver needed
# to build; only running an engine needs one).
#
#   scripts/check_tensorrt.sh DIR [MIN,OPT,MAX]
#
# What it installs, outside the repository (nothing NVIDIA is ever committed):
#   - the PyPI wheel onnxruntime-ep-nv-tensorrt-rtx-cu13==0.5.0 (146 MB, NVIDIA licence), unpacked with
#     `pip install --no-deps --target $DLO_CACHE/trt-rtx`; we only dlopen its libtensorrt_rtx.so.1.7.1 and
#     libtensorrt_onnxparser_rtx.so.1.7.1;
#   - a build of scripts/trt-build (uses the `trtx` crate, which needs libclang: apt-get install libclang-dev)
#     in $DLO_CACHE/trt-build.
# Exit status: 0 when both models build; 1 otherwise; 2 when a prerequisite is missing.
set -euo pipefail

DIR="${1:?usage: check_tensorrt.sh DIR [MIN,OPT,MAX]}"
PROFILE="${2:-1,64,256}"
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
PY="${PYTHON:-$CACHE/venv/bin/python}"
HERE="$(cd "$(dirname "$0")" && pwd)"
WHEEL=onnxruntime-ep-nv-tensorrt-rtx-cu13==0.5.0
LIBDIR="$CACHE/trt-rtx/onnxruntime_ep_nv_tensorrt_rtx"

for f in decode.onnx prefill.onnx; do
  [ -f "$DIR/$f" ] || { echo "check_tensorrt: $DIR/$f: missing (run dlo-compile build --target onnx -o $DIR)" >&2; exit 2; }
done

if [ ! -f "$LIBDIR/libtensorrt_rtx.so.1.7.1" ]; then
  echo "installing $WHEEL into $CACHE/trt-rtx ..." >&2
  rm -rf "$CACHE/trt-rtx.tmp"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --target "$CACHE/trt-rtx.tmp" "$WHEEL" >&2 \
    || { echo "check_tensorrt: could not install $WHEEL" >&2; exit 2; }
  rm -rf "$CACHE/trt-rtx" && mv "$CACHE/trt-rtx.tmp" "$CACHE/trt-rtx"
fi

if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* 2>/dev/null | grep -q 'libclang-[0-9.]*\.so\|libclang\.so'; then
  echo "check_tensorrt: libclang not found (the trtx crate's bindgen needs it): apt-get install libclang-dev" >&2
  exit 2
fi

# Build the driver from a copy, so that cargo's lock file and outputs stay out of the repository.
SRC="$CACHE/trt-build/src-copy"
mkdir -p "$SRC"
cp "$HERE/trt-build/Cargo.toml" "$SRC/Cargo.toml"
mkdir -p "$SRC/src" && cp "$HERE/trt-build/src/main.rs" "$SRC/src/main.rs"
echo "building scripts/trt-build (first time: ~2 min) ..." >&2
cargo build --quiet --release --manifest-path "$SRC/Cargo.toml" --target-dir "$CACHE/trt-build/target" >&2
BIN="$CACHE/trt-build/target/release/dlo-trt-build"

status=0
echo "== decode.onnx"
if "$BIN" "$LIBDIR" "$DIR/decode.onnx" "$DIR/decode.trt-rtx.engine" "$PROFILE" 2>"$DIR/decode.trt-rtx.log"; then
  echo "decode.onnx: TensorRT-RTX parsed it and built a serialized engine (log: $DIR/decode.trt-rtx.log)"
else
  echo "decode.onnx: FAILED; last lines of $DIR/decode.trt-rtx.log:" >&2
  tail -20 "$DIR/decode.trt-rtx.log" >&2
  status=1
fi
echo "== prefill.onnx"
if "$BIN" "$LIBDIR" "$DIR/prefill.onnx" "$DIR/prefill.trt-rtx.engine" "$PROFILE" 2>"$DIR/prefill.trt-rtx.log"; then
  echo "prefill.onnx: TensorRT-RTX parsed it and built a serialized engine (log: $DIR/prefill.trt-rtx.log)"
else
  echo "prefill.onnx: FAILED; last lines of $DIR/prefill.trt-rtx.log:" >&2
  tail -20 "$DIR/prefill.trt-rtx.log" >&2
  status=1
fi
exit $status
