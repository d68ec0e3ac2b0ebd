"""Benchmark helpers (pytest-benchmark). See benchmarks/README.md.

Conventions, shared by every benchmark file:
- group = the op's name (``perturbed_gru``, ``tr_attention``, ``scla_loss``,
  ``train_step``), or ``<op>_sweep`` for a scaling sweep;
- the test id names the device (``cpu``/``cuda``), the shape, the mode
  (``fwd``, ``fwd_bwd`` or ``train_step``) and the implementation (``fused``,
  ``reference``, ``torch``, ``compiled``); the same facts go into
  ``extra_info`` (plus ``group``, ``op``, ``device_name``, ``torch``);
- sweeps add ``extra_info["sweep"] = {"param": "T", "value": 64}``;
- CUDA timings synchronise inside the timed function;
- every run records ``peak_mem_bytes`` of one call (``peak_mem_method`` says
  how: ``torch.cuda.max_memory_allocated`` on CUDA, ``torch.profiler`` on the
  CPU; see :func:`cpu_peak_memory`).

Timing: untimed calls first (warm-up, then the memory measurement: on CUDA
one call each, on the CPU both under ``torch.profiler``), then
``benchmark.pedantic`` with
``rounds = max(min_rounds, ceil(max_time / t_call))`` (at most
``MAX_ROUNDS``), where ``min_rounds`` and ``max_time`` come from
``--benchmark-min-rounds`` / ``--benchmark-max-time`` (defaults in
benchmarks/pytest.ini) or a ``@pytest.mark.benchmark(...)`` on the test.

``--quick`` (or ``CASCLA_BENCH_QUICK=1``) shrinks shapes and sweeps for a
smoke run; the benchmark files choose their shapes with :func:`pick`.
``--cpu-threads N`` sets ``torch.set_num_threads(N)`` (recorded in
``device_name``); the default is 1 (per-core figures, comparable across
machines and stable on shared or virtual ones), 0 keeps torch's choice.

Run: ``pytest benchmarks --benchmark-only --benchmark-json=out.json``.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable

import pytest
import torch

import cascla_ext

QUICK_ENV = "CASCLA_BENCH_QUICK"
MAX_ROUNDS = 10_000
MIN_ROUND_SECONDS = 1e-4  # calls shorter than this are repeated inside one round

CUDA_OK = torch.cuda.is_available() and cascla_ext.build_info()["cuda_kernels_registered"]
CUDA_SKIP_REASON = (
    "no CUDA GPU on this machine"
    if not torch.cuda.is_available()
    else "cascla_ext was built without CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason=CUDA_SKIP_REASON))]


def pytest_addoption(parser):
    parser.addoption(
        "--quick", action="store_true", default=False,
        help="cascla benchmarks: small shapes and short sweeps (a smoke run, not for results)",
    )
    parser.addoption(
        "--cpu-threads", type=int, default=1, metavar="N",
        help="cascla benchmarks: torch.set_num_threads(N) for the CPU runs (default 1: per-core "
             "figures, stable on shared machines where parallel regions stall on descheduled "
             "threads; 0: torch's choice)",
    )


def pytest_configure(config):
    # Through the environment, so that a benchmark file sees it at import
    # whatever module object it got for this conftest.
    if config.getoption("quick", False):
        os.environ[QUICK_ENV] = "1"
    threads = config.getoption("cpu_threads", None)
    if threads:
        torch.set_num_threads(threads)


def quick() -> bool:
    """True under ``--quick`` (or ``CASCLA_BENCH_QUICK=1``)."""
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def pick(full, small):
    """``small`` under ``--quick``, ``full`` otherwise (shapes, sweep values)."""
    return small if quick() else full


_COMPILED: dict = {}


def compiled_once(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, **options)``, built once per session and shared by
    every test that times it (the compilation itself happens on the first
    call, which the benchmark files make outside the timed rounds)."""
    key = (fn, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name} ({torch.get_num_threads()} threads)"


def cpu_peak_memory(fn: Callable[[], object]) -> tuple[int | None, float]:
    """Peak memory of one call of ``fn`` on the CPU, and that call's wall time
    (profiler overhead included).

    ``fn`` runs twice under ``torch.profiler`` with memory profiling: a
    warm-up call, then the measured one. Replaying every allocation and free
    through PyTorch's CPU allocator in time order gives the live bytes; the
    result is their highest value during the measured call minus their value
    just before it. So, as on CUDA, what the warm-up call left behind
    (gradients, optimizer state, caches) is part of the base, and a
    gradient replaced during the call is not counted twice.

    Counted: tensors (outputs, saved activations, gradients, temporaries, the
    fused ops' workspaces: they are ATen tensors). Not counted: memory outside
    PyTorch's allocator (small std::vector scratch, oneDNN/BLAS internals, the
    Python heap) and whether malloc keeps pages or hands them back: it is
    the counterpart of ``max_memory_allocated() - memory_allocated()`` on
    CUDA, not the process's RSS.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    marker = "cascla_bench.measured_call"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # warm-up
        start = time.perf_counter()
        with record_function(marker):
            fn()
        elapsed = time.perf_counter() - start
    try:
        allocations, window = [], None
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
            elif event.name == marker:
                window = (event.start_time_ns, event.end_time_ns)
    except (AttributeError, RuntimeError):  # a torch without this (private) event tree
        return None, elapsed
    if window is None:
        return None, elapsed
    live, base, peak = 0, None, 0
    for t, size in sorted(allocations):  # frees have negative sizes
        if t > window[1]:
            break
        if t >= window[0] and base is None:
            base = peak = live
        live += size
        if base is not None:
            peak = max(peak, live)
    return (0 if base is None else peak - base), elapsed


def cuda_peak_memory(fn: Callable[[], object]) -> tuple[int, float]:
    """Peak ``torch.cuda.max_memory_allocated()`` during one call of ``fn``
    above the bytes allocated before it, and the call's (synchronised) time."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return torch.cuda.max_memory_allocated() - base, elapsed


def plan_rounds(benchmark, seconds: float) -> tuple[int, int]:
    """(rounds, iterations) for a call that takes ``seconds``."""
    # pytest-benchmark keeps --benchmark-max-time / --benchmark-min-rounds and a
    # test's @pytest.mark.benchmark(...) overrides in these attributes.
    max_time = float(getattr(benchmark, "_max_time", 1.0))
    min_rounds = int(getattr(benchmark, "_min_rounds", 3))
    seconds = max(seconds, 1e-7)
    iterations = 1 if seconds >= MIN_ROUND_SECONDS else math.ceil(MIN_ROUND_SECONDS / seconds)
    rounds = math.ceil(max_time / (seconds * iterations))
    return max(1, min(MAX_ROUNDS, max(min_rounds, rounds))), iterations


def run_benchmark(benchmark, fn: Callable[[], object], *, group: str, device: str, impl: str,
                  shape: str, mode: str, op: str | None = None,
                  sweep: tuple[str, int | float] | None = None, **extra) -> None:
    """Time ``fn`` (synchronised on CUDA), its peak memory, and what was measured.

    ``op`` defaults to ``group``; ``sweep=("T", 64)`` marks a point of a
    scaling sweep (``extra_info["sweep"]``, read by report.py).
    """
    benchmark.group = group
    benchmark.extra_info.update(
        group=group, op=op or group, impl=impl, device=device, device_name=device_name(device),
        shape=shape, mode=mode, torch=torch.__version__, **extra,
    )
    if sweep is not None:
        benchmark.extra_info["sweep"] = {"param": sweep[0], "value": sweep[1]}
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once, measure nothing
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return
    if device == "cuda":
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        timed()  # warm-up (cuBLAS handles, compilation)
        peak, seconds = cuda_peak_memory(fn)
        method = "torch.cuda.max_memory_allocated"
    else:
        timed = fn
        peak, seconds = cpu_peak_memory(fn)  # also the warm-up
        method = "torch.profiler"
    benchmark.extra_info["peak_mem_bytes"] = peak
    benchmark.extra_info["peak_mem_method"] = method
    rounds, iterations = plan_rounds(benchmark, seconds)
    benchmark.pedantic(timed, rounds=rounds, iterations=iterations,
                       warmup_rounds=1 if seconds * iterations < 0.05 else 0)
