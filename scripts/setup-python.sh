#!/usr/bin/env bash
# Create (idempotently) the Python environment the reference checks use: onnx (checker), onnxruntime, numpy.
# Prints `DLO_PYTHON=path`. Fixture generation needs torch + transformers too: pass --fixtures.
set -euo pipefail
CACHE="${DLO_CACHE:-$HOME/.cache/dlo}"
VENV="$CACHE/venv-check"
PKGS=(numpy==1.26.4 onnx==1.17.0 onnxruntime==1.19.2 safetensors==0.4.5)
if [ "${1:-}" = "--fixtures" ]; then
  VENV="$CACHE/venv"
  PKGS+=(torch==2.3.0 transformers==4.40.1 sentencepiece protobuf)
fi
stamp="$VENV/.dlo-$(printf '%s\n' "${PKGS[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PKGS[@]}" >&2
  touch "$stamp"
fi
echo "DLO_PYTHON=$VENV/bin/python"
