"""scla_loss: fused op vs its pure-PyTorch reference (M x M covariances) vs
``torch.compile`` of the reference.

Shapes: M = 1024, 4096, 16384 anchors (the labelled utterances of a batch:
a MELD batch of 32 dialogues has about 300, an IEMOCAP one of 16 about 800
to 1800; larger M is where the M x M reference stops fitting) of width
d = 600, K = 7 classes, P = 2 augmented views (the model's [f_text, f_adv]).
Modes: ``fwd`` (no grad) and ``fwd_bwd`` (gradients to f, f_aug and z).

The reference builds several M x M float32 matrices (at M = 16384, 1 GiB
each, about 6 GiB at the peak of fwd_bwd) and takes tens of seconds per
call on two CPU cores; on the CPU, ``reference`` and ``compiled`` therefore
stop at M = ``REFERENCE_MAX_M["cpu"]`` and larger M is skipped with that
reason (the fused op still runs there).

Group ``scla_loss_sweep``: fwd_bwd for M = 512 ... 16384, fused vs
reference (the reference only up to ``REFERENCE_MAX_M``).
"""

from __future__ import annotations

import pytest
import torch

from cascla_ext import ops, reference
from conftest import DEVICES, compiled_once, pick, run_benchmark

SHAPES = pick({"M1024": 1024, "M4096": 4096, "M16384": 16384}, {"quick_M256": 256})
SWEEP_M = pick([512, 1024, 2048, 4096, 8192, 16384], [128, 256])
REFERENCE_MAX_M = {"cpu": 4096, "cuda": 16384}
D, K, P = 600, 7, 2

def make_step(device: str, M: int, mode: str, impl: str):
    if impl != "fused" and M > REFERENCE_MAX_M[device]:
        pytest.skip(f"{impl} scla_loss at M={M} on {device}: M x M matrices, too slow and large "
                    f"(> M={REFERENCE_MAX_M[device]}) for this suite")
    torch.manual_seed(0)
    grad = mode == "fwd_bwd"
    f = torch.randn(M, D, device=device, requires_grad=grad)
    f_aug = (f.detach() + 0.1 * torch.randn(P, M, D, device=device)).requires_grad_(grad)
    z = torch.randn(K, D, device=device, requires_grad=grad)
    y = torch.randint(K, (M,), device=device)
    fn = ({"fused": ops.scla_loss, "reference": reference.scla_loss}.get(impl)
          or compiled_once(reference.scla_loss, dynamic=False))

    def step():
        with torch.set_grad_enabled(grad):
            loss = fn(f, f_aug, z, y, 2.0, 0.5, 1.0, "mean")
        if grad:
            f.grad = f_aug.grad = z.grad = None
            loss.backward()
        return loss

    if impl == "compiled":
        step()  # compile outside the timed rounds
    return step


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_scla_loss(benchmark, device, shape, mode, impl):
    M = SHAPES[shape]
    run_benchmark(benchmark, make_step(device, M, mode, impl), group="scla_loss", device=device,
                  impl=impl, shape=shape, mode=mode, M=M, d=D, K=K, P=P, dtype="float32")


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("M", SWEEP_M, ids=[f"M{m}" for m in SWEEP_M])
@pytest.mark.parametrize("device", DEVICES)
def test_scla_loss_sweep(benchmark, device, M, impl):
    mode = "fwd_bwd"
    run_benchmark(benchmark, make_step(device, M, mode, impl), group="scla_loss_sweep",
                  op="scla_loss", device=device, impl=impl, shape=f"M{M}", mode=mode,
                  sweep=("M", M), M=M, d=D, K=K, P=P, dtype="float32")
