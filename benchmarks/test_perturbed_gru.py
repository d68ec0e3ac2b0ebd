"""perturbed_gru: fused op vs its pure-PyTorch reference vs torch.nn.GRU (cuDNN on GPU).

All three run a bidirectional single-layer GRU (both directions, D=600 ->
H=300 per direction) at a MELD-like shape (T=24, B=32) and an IEMOCAP-like
one (T=110, B=16). ``torch`` cannot take perturbations; the fused and
reference runs get a random rho in every gate, as in adversarial training.
``fwd_bwd`` backpropagates a loss of the outputs and the final states to the
input and the weights.

``fused_persistent`` (CUDA only): the fused op with the opt-in persistent
forward (``CASCLA_GRU_PERSISTENT``, one cooperative launch per direction;
compiled, not yet run on a GPU); the backward is the per-step one.

Group ``perturbed_gru_sweep``: fwd_bwd at B=16 for T = 8 ... 128 (how the
cost grows with the sequence length; the recurrence is sequential in T).
"""

from __future__ import annotations

import pytest
import torch

from cascla_ext.nn import PerturbedGRU
from conftest import DEVICES, pick, run_benchmark

SHAPES = pick({"meld_T24_B32": (24, 32), "iemocap_T110_B16": (110, 16)},
              {"quick_T6_B4": (6, 4)})
SWEEP_B = pick(16, 4)
SWEEP_T = pick([8, 16, 32, 64, 128], [4, 8])
D, H = 600, 300
IMPLS = ["fused", "reference", "torch"]


def make_step(device: str, T: int, B: int, mode: str, impl: str):
    torch.manual_seed(0)
    gru = torch.nn.GRU(D, H, bidirectional=True).to(device)
    x = torch.randn(T, B, D, device=device, requires_grad=mode == "fwd_bwd")
    if impl == "torch":
        model, kwargs = gru, {}
    else:
        model = PerturbedGRU.from_gru(gru, backend=impl)
        rho = [0.01 * torch.randn(T, B, 3 * H, device=device) for _ in range(2)]
        kwargs = {"perturbation": rho}

    def step():
        with torch.set_grad_enabled(mode == "fwd_bwd"):
            y, h = model(x, **kwargs)
            if mode == "fwd_bwd":
                (y.square().mean() + h.square().mean()).backward()
        return y

    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_gru(benchmark, device, shape, mode, impl):
    T, B = SHAPES[shape]
    run_benchmark(benchmark, make_step(device, T, B, mode, impl), group="perturbed_gru",
                  device=device, impl=impl, shape=shape, mode=mode, T=T, B=B, D=D, H=H,
                  bidirectional=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", SWEEP_T, ids=[f"T{t}" for t in SWEEP_T])
@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_gru_sweep(benchmark, device, T, impl):
    B, mode = SWEEP_B, "fwd_bwd"
    run_benchmark(benchmark, make_step(device, T, B, mode, impl), group="perturbed_gru_sweep",
                  op="perturbed_gru", device=device, impl=impl, shape=f"T{T}_B{B}", mode=mode,
                  sweep=("T", T), T=T, B=B, D=D, H=H, bidirectional=True)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
def test_perturbed_gru_persistent(benchmark, monkeypatch, device, shape, mode):
    monkeypatch.setenv("CASCLA_GRU_PERSISTENT", "require")  # raises rather than fall back
    T, B = SHAPES[shape]
    run_benchmark(benchmark, make_step(device, T, B, mode, "fused"), group="perturbed_gru",
                  device=device, impl="fused_persistent", shape=shape, mode=mode, T=T, B=B, D=D, H=H,
                  bidirectional=True)
