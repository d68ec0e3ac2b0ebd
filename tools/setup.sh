#!/usr/bin/env bash
# Set up a fresh machine from nothing but this repository: a virtual
# environment (.venv) with torch 2.14.1 and the build tools, then the package
# built against that torch (CUDA kernels compiled when a CUDA toolkit is found;
# CASCLA_CUDA=on makes that mandatory, off skips it). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv

echo "== venv ($VENV) with torch 2.14.1"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1"
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.26" ninja numpy

echo "== build (CUDA kernels: ${CASCLA_CUDA:-auto})"
start=$(date +%s)
"$VENV/bin/python" -m pip install -q --no-build-isolation ".[test]"
echo "built in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -c 'import cascla_ext, json; print(json.dumps(cascla_ext.build_info(), indent=1))'
