#!/usr/bin/env bash
# Create (idempotently) the Python environment the reference checks use: onnx (checker), onnxruntime, numpy.
# Prints `DLO_PYTHON=path`. The PyTorch references (fixture generation, scripts/check_hf_load.py,
# scripts/eval_reference.py) need torch + transformers too: pass --fixtures, which makes a second env and prints
# `DLO_TORCH_PYTHON=path` instead, so that a caller can export both.
set -euo pipefail
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
VENV="$CACHE/venv-check"
VAR=DLO_PYTHON
PKGS=(numpy==1.26.4 onnx==1.17.0 onnxruntime==1.32.0 safetensors==0.8.0)
case "${1:-}" in
  "") ;;
  --fixtures)
    VENV="$CACHE/venv"
    VAR=DLO_TORCH_PYTHON
    PKGS+=(torch==2.3.0 transformers==4.40.1 sentencepiece protobuf)
    ;;
  *) echo "usage: $0 [--fixtures]" >&2; exit 2 ;;
esac
stamp="$VENV/.dlo-$(printf '%s\n' "${PKGS[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PKGS[@]}" >&2
  touch "$stamp"
fi
echo "$VAR=$VENV/bin/python"
