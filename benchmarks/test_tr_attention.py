"""tr_attention: fused op vs its pure-PyTorch reference vs torch.compile of the reference.

Three modalities of rank 16 (the ring of the fusion module: 16 x 16
attention matrices per utterance and modality) at a MELD-like shape (B=32
dialogues of up to T=24 utterances) and an IEMOCAP-like one (B=16, T=110).
Dialogue lengths are random (seeded), with one full dialogue per batch.
``fwd_bwd`` computes the gradients of all twelve inputs for fixed random
output gradients (``torch.autograd.grad``, nothing accumulated).
"""

from __future__ import annotations

import pytest
import torch

from cascla_ext import ops, reference
from conftest import DEVICES, run_benchmark

SHAPES = {"meld_T24_B32": (32, 24), "iemocap_T110_B16": (16, 110)}
N_MODALITIES, RANK = 3, 16

_compiled = {}


def compiled_reference():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(reference.tr_attention)
    return _compiled["fn"]


def make_inputs(B, T, device, requires_grad):
    g = torch.Generator().manual_seed(0)

    def rnd():
        return torch.randn(B, T, RANK, generator=g).to(device).requires_grad_(requires_grad)

    q1, q2, k1, k2 = ([rnd() for _ in range(N_MODALITIES)] for _ in range(4))
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return q1, q2, k1, k2, mask


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_tr_attention(benchmark, device, shape, mode, impl):
    torch.manual_seed(0)
    B, T = SHAPES[shape]
    q1, q2, k1, k2, mask = make_inputs(B, T, device, requires_grad=mode == "fwd_bwd")
    inputs = [*q1, *q2, *k1, *k2]
    fn = {"fused": ops.tr_attention, "reference": reference.tr_attention}.get(impl)
    if impl == "compiled":
        fn = compiled_reference()
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(B, T, RANK, RANK, generator=g).to(device) for _ in range(N_MODALITIES)]

    def step():
        outs = fn(q1, q2, k1, k2, mask)
        if mode == "fwd_bwd":
            return torch.autograd.grad(outs, inputs, grads)
        return outs

    info = dict(group="tr_attention", device=device, impl=impl, shape=shape, mode=mode, B=B, T=T,
                modalities=N_MODALITIES, rank=RANK)
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        if impl == "compiled":
            try:
                step()  # compile outside the timing
            except Exception as err:  # noqa: BLE001 - any backend failure means "does not compile here"
                pytest.skip(f"torch.compile of the reference failed on {device}: "
                            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        run_benchmark(benchmark, step, **info)
