#!/usr/bin/env bash
# Set up a fresh machine from nothing but this repository: a virtual
# environment (.venv) with torch (2.14.1 unless CASCLA_TORCH says another
# version) and the build tools, then the package built against that torch with
# the extras the CLI's real-data pipeline and the tests need (.[erc,tune,test,media]).
# CUDA kernels are compiled when a CUDA toolkit is found; CASCLA_CUDA=on makes
# that mandatory, off skips it. Safe to run again.
#
#   bash tools/setup.sh                                       # torch 2.14.1 (CUDA 13 build)
#   CASCLA_TORCH=2.13.0 CASCLA_CUDA=off bash tools/setup.sh   # CPU-only torch, CPU kernels
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
TORCH=${CASCLA_TORCH:-2.14.1}

echo "== venv ($VENV) with torch $TORCH"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.26" ninja numpy

echo "== build (CUDA kernels: ${CASCLA_CUDA:-auto})"
start=$(date +%s)
# the wheel pins torch==<the torch above>, so this never swaps torch
"$VENV/bin/python" -m pip install -q --no-build-isolation ".[erc,tune,test,media]"
echo "built in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -c 'import cascla_ext, json; print(json.dumps(cascla_ext.build_info(), indent=1))'
