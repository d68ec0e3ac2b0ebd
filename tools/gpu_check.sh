#!/usr/bin/env bash
# One call on a lent GPU machine: build the package against that machine's torch
# (pip install --no-build-isolation --no-deps .), run the whole test suite (CUDA
# tests included) and the CUDA benchmarks, and leave logs and JSON under $OUT.
#   tools/gpu_check.sh [pytest -k expression for benchmarks]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/device.txt"

start=$(date +%s)
if ! "$py" -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "cascla-ext:" "$OUT/build.log"
cd /tmp  # import the installed package, not the source tree
"$py" -c 'import cascla_ext, json; print(json.dumps(cascla_ext.build_info()))' | tee "$OUT/build_info.json"
so=$("$py" -c 'import cascla_ext; print(cascla_ext.build_info()["library"])')
echo "NEEDED: $(readelf -d "$so" | grep NEEDED | grep -o '\[.*\]' | tr '\n' ' ')"
echo "libstdc++ functions defined inside the library: $(nm -C --defined-only "$so" | grep -c 'std::basic_ostream')"
cd - >/dev/null

# A crash in one file must not hide the others: one pytest run per file.
start=$(date +%s); rc=0
for f in tests/test_*.py; do
  name=$(basename "$f" .py)
  "$py" -X faulthandler -m pytest "$f" -q -rs -p no:cacheprovider --tb=short \
    >"$OUT/$name.log" 2>&1
  frc=$?; [ $frc -ne 0 ] && rc=$frc
  echo "$name: rc=$frc $(tail -1 "$OUT/$name.log")"
  [ $frc -ne 0 ] && grep -E "^FAILED|^ERROR|Error|Fatal|assert" "$OUT/$name.log" | head -12
done
echo "tests: rc=$rc, $(( $(date +%s) - start )) s"

bench_k=${1:-cuda}
start=$(date +%s)
"$py" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider -k "$bench_k" \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds \
  --benchmark-sort=name ${BENCH_OPTS:-} >"$OUT/bench.log" 2>&1
echo "benchmarks: rc=$?, $(( $(date +%s) - start )) s"
grep -E "^test_|^Name|benchmark '" "$OUT/bench.log" | cut -c1-150
exit $rc
