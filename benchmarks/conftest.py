"""Benchmark helpers (pytest-benchmark).

Conventions, shared by every op's benchmark file:
- group = the op's name (``perturbed_gru``, ``tr_attention``, ``scla_loss``, ...);
- the test id names the implementation (``fused``, ``reference``, ``torch``,
  ``compiled``), the device (``cpu``/``cuda``), the shape and the mode
  (``fwd`` or ``fwd_bwd``); the same facts go into ``extra_info``;
- CUDA timings synchronise inside the timed function;
- CUDA runs record the peak allocated memory of one call in ``extra_info``.

Run: ``pytest benchmarks --benchmark-only --benchmark-json=out.json``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import cascla_ext

CUDA_OK = torch.cuda.is_available() and cascla_ext.build_info()["cuda_kernels_registered"]
CUDA_SKIP_REASON = (
    "no CUDA GPU on this machine"
    if not torch.cuda.is_available()
    else "cascla_ext was built without CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason=CUDA_SKIP_REASON))]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def run_benchmark(benchmark, fn: Callable[[], object], *, group: str, device: str, impl: str,
                  shape: str, mode: str, **extra) -> None:
    """Time ``fn`` (synchronised on CUDA) and record what was measured."""
    benchmark.group = group
    benchmark.extra_info.update(
        op=group, impl=impl, device=device, device_name=device_name(device), shape=shape,
        mode=mode, torch=torch.__version__, **extra,
    )
    if device == "cuda":
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        fn()  # warm-up (cuBLAS handles, compilation)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        timed = fn
    benchmark(timed)
