#!/usr/bin/env bash
# One call on a lent GPU machine (issue 18), sized to about 9 minutes on an
# H100/H200: build the package against that machine's torch
# (pip install --no-build-isolation --no-deps .), run the GPU tests (the
# sync-free and CUDA-graph claims, autocast, and every CUDA-marked test of
# the ops, modules and model, the opt-in persistent GRU), the whole benchmark
# suite (CUDA group, then CPU group, each under a time cap), and a
# torch.profiler look at the fused ops;
# everything goes under $OUT (logs, JSON, profiler tables and trace).
#   tools/gpu_check.sh
# Caps in seconds (environment): GPU_CHECK_BUDGET (whole script, default 540),
# TEST_CAP (default 140), BENCH_CUDA_CAP (120), PROFILE_CAP (35),
# BENCH_PERSISTENT_CAP (25), BENCH_CPU_CAP (40); BENCH_OPTS passes options to pytest-benchmark
# (default --benchmark-max-time=0.25 --benchmark-min-rounds=3). A stage gets at
# most what is left of the budget; a capped pytest run is stopped with SIGINT,
# so pytest-benchmark still writes the JSON of what ran.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
py=${PYTHON:-python3}
t_start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-540}
left() { echo $(( budget - ($(date +%s) - t_start) )); }
# cap N: min(N, what is left of the budget less a 15 s reserve), at least 1
cap() { local l; l=$(( $(left) - 15 )); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }

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
cd - >/dev/null

# Tests, each run within what is left of TEST_CAP: the GPU-only claims
# (test_cuda_sync: CUDA graph capture, sync debug mode) on their own; then the
# CUDA-marked tests of autocast, the ops, modules and model in one run; last
# the opt-in persistent GRU forward on its own (a cooperative launch that
# misbehaved must not take the other results with it).
start=$(date +%s); rc=0
test_end=$(( start + $(cap "${TEST_CAP:-140}") ))
run_tests() {  # log name, then pytest arguments
  local name=$1; shift
  local t=$(( test_end - $(date +%s) ))
  if [ "$t" -le 5 ]; then echo "$name: not run (TEST_CAP reached)"; rc=1; return; fi
  timeout -s INT -k 10 "$t" "$py" -X faulthandler -m pytest "$@" -q -rs -p no:cacheprovider --tb=short \
    >"$OUT/$name.log" 2>&1
  local frc=$?; [ $frc -ne 0 ] && rc=$frc
  echo "$name: rc=$frc $(tail -1 "$OUT/$name.log")"
  [ $frc -ne 0 ] && grep -E "^FAILED|^ERROR|Error|Fatal|assert" "$OUT/$name.log" | head -12
}
run_tests test_cuda_sync tests/test_cuda_sync.py
run_tests tests_cuda -m cuda -k "not persistent" tests/test_autocast.py tests/test_scla_loss.py \
  tests/test_tr_attention.py tests/test_perturbed_gru.py tests/test_scla_module.py tests/test_fusion.py \
  tests/test_gru_module.py tests/test_model.py
run_tests test_gru_persistent -m cuda -k persistent tests/test_perturbed_gru.py
echo "tests: rc=$rc, $(( $(date +%s) - start )) s"

# Benchmarks: the whole suite under caps. The CUDA group first (without the
# persistent GRU), then the profiler look, the persistent GRU, the CPU group
# (the op files first, so that a cap cuts the slow whole-run benchmarks).
bench_files="benchmarks/test_perturbed_gru.py benchmarks/test_tr_attention.py benchmarks/test_scla_loss.py
             benchmarks/test_train_step.py benchmarks/test_ddp_epoch.py benchmarks/test_loaded_machine.py"
bench() {  # group name, -k expression, cap
  local group=$1 expr=$2 t; t=$(cap "$3")
  local s; s=$(date +%s)
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "$t" "$py" -m pytest $bench_files --benchmark-only -q -p no:cacheprovider -k "$expr" \
    --benchmark-json="$OUT/bench_$group.json" --benchmark-columns=median,iqr,rounds \
    --benchmark-sort=name ${BENCH_OPTS:---benchmark-max-time=0.25 --benchmark-min-rounds=3} \
    >"$OUT/bench_$group.log" 2>&1
  echo "benchmarks $group: rc=$? (cap $t s), $(( $(date +%s) - s )) s"
  grep -E "^test_|^Name|benchmark '" "$OUT/bench_$group.log" | cut -c1-150
}
bench cuda "cuda and not persistent" "${BENCH_CUDA_CAP:-120}"

# A short profiler look at the fused ops (the slowest fused kernel's table and trace).
s=$(date +%s)
timeout -s INT -k 10 "$(cap "${PROFILE_CAP:-35}")" "$py" tools/profile_ops.py "$OUT" --device cuda \
  >"$OUT/profile.log" 2>&1
echo "profile: rc=$?, $(( $(date +%s) - s )) s"; tail -8 "$OUT/profile.log"

bench cuda_persistent "persistent" "${BENCH_PERSISTENT_CAP:-25}"
bench cpu "not cuda" "${BENCH_CPU_CAP:-40}"  # ddp_epoch and loaded_machine have no device in their names
echo "total: $(( $(date +%s) - t_start )) s"
exit $rc
