"""Shared test fixtures: devices to run on, tolerances, and skip reasons."""

from __future__ import annotations

import pytest
import torch

import cascla_ext

CUDA_OK = torch.cuda.is_available() and cascla_ext.build_info()["cuda_kernels_registered"]
if not torch.cuda.is_available():
    CUDA_SKIP_REASON = "no CUDA GPU on this machine"
elif not CUDA_OK:
    CUDA_SKIP_REASON = "cascla_ext was built without CUDA kernels (CASCLA_CUDA=off or no toolkit)"
else:
    CUDA_SKIP_REASON = ""

# Comparisons against cuDNN / cuBLAS must see full float32 arithmetic, not TF32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

requires_cuda = pytest.mark.skipif(not CUDA_OK, reason=CUDA_SKIP_REASON)

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every test that takes `device` runs on the CPU and, where there is one, a CUDA GPU."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module (training runs: 2-thread timings stall on
    a 2-core machine with other work on it). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic():
    """The built-in corpus (seed 0), built once per test session."""
    from cascla_ext.data import load_dataset

    return load_dataset("synthetic")


def small_config(corpus, **overrides):
    """``CaSCLAConfig.small`` for ``corpus`` (its widths, classes and training prior)."""
    from cascla_ext import CaSCLAConfig

    values = dict(num_classes=len(corpus.label_names), input_dims=corpus.input_dims, clue_dim=corpus.clue_dim,
                  class_prior=corpus.class_prior())
    return CaSCLAConfig.small(**{**values, **overrides})


def assert_close(actual, expected, dtype=None, *, atol=None, rtol=None, msg=""):
    """Per-dtype tolerances: float64 is checked tightly, float32 loosely."""
    dtype = dtype or expected.dtype
    if atol is None:
        atol = 1e-10 if dtype == torch.float64 else 2e-5
    if rtol is None:
        rtol = 1e-8 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def assert_compiled_matches_eager(f, inputs: dict) -> None:
    """``torch.compile(f, fullgraph=True)`` (aot_eager) gives the value and the
    gradients (to every tensor of ``inputs``, by name) that eager ``f`` gives."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [v.detach().clone().requires_grad_(True) for v in inputs.values()]
    b = [v.detach().clone().requires_grad_(True) for v in inputs.values()]
    out_c = compiled(*a)
    out_e = f(*b)
    assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    for name, va, vb in zip(inputs, a, b):
        assert_close(va.grad, vb.grad, msg=name)
