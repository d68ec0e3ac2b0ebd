#!/usr/bin/env bash
# Development build without pip: configure + build with CMake/ninja into
# build/dev-<cuda|cpu>, then copy the library and _build_info.py into the
# source tree's cascla_ext/ (both git-ignored), so `python -m pytest` from the
# repository root uses this checkout. Incremental after the first run.
#   tools/dev_build.sh [cpu|cuda]    (default: cuda if it can be built)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-auto}
py=${PYTHON:-python}
case "$mode" in
  cpu) cuda=off ;;
  cuda) cuda=on ;;
  *) cuda=auto ;;
esac
build=build/dev-$mode
mkdir -p build
cmake_bin=$("$py" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || echo cmake)
"$cmake_bin" -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" -DCASCLA_CUDA="$cuda" \
  ${CASCLA_CUDA_ARCH_LIST:+-DCASCLA_CUDA_ARCH_LIST="$CASCLA_CUDA_ARCH_LIST"} >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
"$cmake_bin" --build "$build"
cp "$build/libcascla_ops.so" "$build/_build_info.py" cascla_ext/
echo "built $build -> cascla_ext/libcascla_ops.so"
