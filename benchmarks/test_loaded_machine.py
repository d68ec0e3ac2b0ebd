"""loaded_machine: the README's main job (``cascla train --dataset synthetic``)
on a machine whose every core is busy with other PyTorch work (issue 15).

Load: one single-thread PyTorch process per core running matrix products
(the common and worst case on shared machines: another PyTorch job), started
before and stopped after each timed run. Timed runs, each a fresh
``python -m cascla_ext train`` process (start-up included), in one test so
that the ratios come from one run on one machine:

- ``idle``: default threads, no load;
- ``loaded_default``: default threads (the CLI's: 1 on the CPU), under load;
- ``loaded_1thread``: ``--threads 1``, under load;
- ``loaded_all_cores``: ``--threads <cores>`` (torch's own default) under
  load, for one epoch only: what the default avoids (minutes per epoch on 2
  cores in earlier measurements), reported, not a target.

Targets (asserted): ``loaded_default <= 1.5 x loaded_1thread`` and
``loaded_default <= 3 x idle`` (a fair share alone is 2-3x). Record the
result with ``--benchmark-json``; run nothing else meanwhile. ``--quick``:
one epoch per run. ``CASCLA_BENCH_LOADED_EPOCHS`` sets the epochs otherwise
(default 3; the README job's 20 take minutes per run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from conftest import QUICK_ENV, device_name

ROOT = Path(__file__).resolve().parents[1]
LOAD_CODE = ("import torch\n"
             "torch.set_num_threads(1)\n"
             "a = torch.randn(384, 384)\n"
             "while True:\n"
             "    a = torch.tanh(a @ a)\n")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Load:
    """One busy single-thread PyTorch process per core while inside."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs = [subprocess.Popen([sys.executable, "-c", LOAD_CODE], env=env) for _ in range(self.n)]
        time.sleep(2.0)  # imported and spinning
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _main_job(epochs: int, threads: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cascla_ext", "train", "--dataset", "synthetic", "--out", f"{tmp}/run",
               "--epochs", str(epochs), "--quiet"] + (["--threads", str(threads)] if threads else [])
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=7200)
        return time.perf_counter() - t0


def test_loaded_machine(benchmark):
    quick = os.environ.get(QUICK_ENV) == "1"
    epochs = 1 if quick else int(os.environ.get("CASCLA_BENCH_LOADED_EPOCHS", "3"))
    cores = _cores()
    seconds = {"idle": _main_job(epochs, None)}
    with Load(cores):
        seconds["loaded_1thread"] = _main_job(epochs, 1)
        seconds["loaded_default"] = benchmark.pedantic(lambda: _main_job(epochs, None), rounds=1, iterations=1)
        seconds["loaded_all_cores_1epoch"] = _main_job(1, cores) if cores > 1 else None
    ratios = {"loaded_default_vs_loaded_1thread": seconds["loaded_default"] / seconds["loaded_1thread"],
              "loaded_default_vs_idle": seconds["loaded_default"] / seconds["idle"]}
    benchmark.extra_info.update(
        group="loaded_machine", op="main_job", impl="cli", device="cpu", device_name=device_name("cpu"),
        shape=f"synthetic_{epochs}epochs", mode="train", torch=torch.__version__, cores=cores,
        load_processes=cores, seconds=seconds, ratios=ratios)
    assert ratios["loaded_default_vs_loaded_1thread"] <= 1.5, ratios
    assert ratios["loaded_default_vs_idle"] <= 3.0, ratios
