"""perturbed_gru: fused op vs its pure-PyTorch reference vs torch.nn.GRU (cuDNN on GPU).

All three run a bidirectional single-layer GRU (both directions) at a
MELD-like shape (T=24, B=32, D=600, H=300) and an IEMOCAP-like one (T=110,
B=16). ``torch`` cannot take perturbations; the fused and reference runs get
a random rho in every gate, as in adversarial training.
"""

from __future__ import annotations

import pytest
import torch

from cascla_ext.nn import PerturbedGRU
from conftest import DEVICES, run_benchmark

SHAPES = {"meld_T24_B32": (24, 32), "iemocap_T110_B16": (110, 16)}
D, H = 600, 300


@pytest.mark.parametrize("impl", ["fused", "reference", "torch"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_perturbed_gru(benchmark, device, shape, mode, impl):
    torch.manual_seed(0)
    T, B = SHAPES[shape]
    gru = torch.nn.GRU(D, H, bidirectional=True).to(device)
    x = torch.randn(T, B, D, device=device, requires_grad=mode == "fwd_bwd")
    if impl == "torch":
        model, kwargs = gru, {}
    else:
        model = PerturbedGRU.from_gru(gru, backend=impl)
        rho = [0.01 * torch.randn(T, B, 3 * H, device=device) for _ in range(2)]
        kwargs = {"perturbation": rho}

    def step():
        y, h = model(x, **kwargs)
        if mode == "fwd_bwd":
            (y.square().mean() + h.square().mean()).backward()
        return y

    if mode == "fwd":
        with torch.no_grad():
            run_benchmark(benchmark, step, group="perturbed_gru", device=device, impl=impl,
                          shape=shape, mode=mode, T=T, B=B, D=D, H=H, bidirectional=True)
    else:
        run_benchmark(benchmark, step, group="perturbed_gru", device=device, impl=impl,
                      shape=shape, mode=mode, T=T, B=B, D=D, H=H, bidirectional=True)
