"""Running a test function in several CPU processes of a gloo process group
(tests/test_distributed_*.py): forkserver-started workers, a free port,
a worker's exception raised in the test."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_OK = dist.is_available() and dist.is_gloo_available()
requires_gloo = pytest.mark.skipif(
    not GLOO_OK, reason="torch.distributed or its gloo backend is not available in this torch build")


def assert_close(actual, expected, rtol, atol, msg=""):
    """torch.testing.assert_close for plain tensors of one dtype; that one, with
    torch.distributed initialised, first imports torch.distributed.tensor
    (and sympy): seconds in every worker."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{msg}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"{msg}: max abs difference {err:.3g} (rtol {rtol}, atol {atol})")


# --------------------------------------------------------------------------
# Spawning helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    # As torchrun would set them (cascla_ext.distributed reads MASTER_ADDR/PORT).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _start_method() -> str:
    """"forkserver" where there is one (Linux): the workers are forked from a
    fresh server process that has imported torch and cascla_ext once (nothing
    of this pytest process is inherited, as with spawn, and a world of 3 does
    not import torch 3 times over; torch._dynamo too, which DDP imports:
    seconds per worker otherwise); "spawn" elsewhere."""
    methods = mp.get_all_start_methods()
    if "forkserver" not in methods:
        return "spawn"
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "cascla_ext"])
    return "forkserver"


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` new processes
    with a gloo process group; re-raises a worker's exception; kills the
    workers (only those) if they are not done within ``timeout`` seconds."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.start_processes(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size,
                                 join=False, start_method=_start_method())
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")
