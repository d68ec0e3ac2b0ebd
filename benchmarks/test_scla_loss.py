"""scla_loss: fused op vs its pure-PyTorch reference (M x M covariances) vs
``torch.compile`` of the reference.

Shapes: M = 1024, 4096, 16384 anchors of width d = 600, K = 7 classes,
P = 2 augmented views (the model's [f_text, f_adv]). Modes: ``fwd`` (no
grad) and ``fwd_bwd`` (gradients to f, f_aug and z).

Peak memory: CUDA runs record ``peak_mem_bytes`` (conftest.run_benchmark).
CPU runs record ``peak_rss_delta_bytes``: the growth of the process's peak
RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before the
timed rounds, inputs already allocated. It counts the outputs, gradients and
temporaries of one call; memory the allocator kept from earlier tests and
reuses is not counted, so small shapes may read low.

The reference at M = 16384 builds several 16384 x 16384 float32 matrices
(1 GiB each; about 6 GiB at the peak of fwd_bwd) and takes tens of seconds
per call on two cores: that shape runs few rounds.
"""

from __future__ import annotations

import pytest
import torch

from cascla_ext import ops, reference
from conftest import DEVICES, run_benchmark

SHAPES = {"M1024": 1024, "M4096": 4096, "M16384": 16384}
SLOW = {"M16384": [pytest.mark.benchmark(min_rounds=2, max_time=1.0)]}
D, K, P = 600, 7, 2

_compiled = None


def compiled_reference():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(reference.scla_loss, dynamic=False)
    return _compiled


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakRss:
    """Growth of peak RSS over the current RSS, on Linux (None elsewhere)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kb("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        self.delta = None if self.base is None else (_proc_status_kb("VmHWM") - self.base) * 1024


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", [pytest.param(s, marks=SLOW.get(s, [])) for s in SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_scla_loss(benchmark, device, shape, mode, impl):
    torch.manual_seed(0)
    M = SHAPES[shape]
    grad = mode == "fwd_bwd"
    f = torch.randn(M, D, device=device, requires_grad=grad)
    f_aug = (f.detach() + 0.1 * torch.randn(P, M, D, device=device)).requires_grad_(grad)
    z = torch.randn(K, D, device=device, requires_grad=grad)
    y = torch.randint(K, (M,), device=device)
    fn = {"fused": ops.scla_loss, "reference": reference.scla_loss}.get(impl) or compiled_reference()

    def step():
        with torch.set_grad_enabled(grad):
            loss = fn(f, f_aug, z, y, 2.0, 0.5, 1.0, "mean")
        if grad:
            f.grad = f_aug.grad = z.grad = None
            loss.backward()
        return loss

    if impl == "compiled":
        step()  # compile outside the timed rounds
    info = dict(M=M, d=D, K=K, P=P, dtype="float32")
    if device == "cpu":
        with PeakRss() as peak:
            run_benchmark(benchmark, step, group="scla_loss", device=device, impl=impl,
                          shape=shape, mode=mode, **info)
        benchmark.extra_info["peak_rss_delta_bytes"] = peak.delta
    else:
        run_benchmark(benchmark, step, group="scla_loss", device=device, impl=impl, shape=shape,
                      mode=mode, **info)
