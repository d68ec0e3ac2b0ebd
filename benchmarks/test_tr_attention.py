"""tr_attention: fused op vs its pure-PyTorch reference vs torch.compile of the reference.

Three modalities of rank 16 (the ring of the fusion module: 16 x 16
attention matrices per utterance and modality) at a MELD-like shape (B=32
dialogues of up to T=24 utterances) and an IEMOCAP-like one (B=16, T=110).
Dialogue lengths are random (seeded), with one full dialogue per batch.
``fwd_bwd`` computes the gradients of all twelve inputs for fixed random
output gradients (``torch.autograd.grad``, nothing accumulated).

Group ``tr_attention_sweep``: fwd_bwd at B=16 for dialogue lengths
T = 8 ... 128, fused vs reference (``compiled`` would recompile per length).
"""

from __future__ import annotations

import pytest
import torch

from cascla_ext import ops, reference
from conftest import DEVICES, compiled_once, pick, run_benchmark

SHAPES = pick({"meld_T24_B32": (32, 24), "iemocap_T110_B16": (16, 110)},
              {"quick_T8_B4": (4, 8)})
SWEEP_B = pick(16, 4)
SWEEP_T = pick([8, 16, 32, 64, 128], [4, 8])
N_MODALITIES, RANK = 3, 16

def make_inputs(B, T, device, requires_grad):
    g = torch.Generator().manual_seed(0)

    def rnd():
        return torch.randn(B, T, RANK, generator=g).to(device).requires_grad_(requires_grad)

    q1, q2, k1, k2 = ([rnd() for _ in range(N_MODALITIES)] for _ in range(4))
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    return q1, q2, k1, k2, mask


def make_step(device: str, B: int, T: int, mode: str, impl: str):
    torch.manual_seed(0)
    q1, q2, k1, k2, mask = make_inputs(B, T, device, requires_grad=mode == "fwd_bwd")
    inputs = [*q1, *q2, *k1, *k2]
    fn = compiled_once(reference.tr_attention) if impl == "compiled" else {
        "fused": ops.tr_attention, "reference": reference.tr_attention}[impl]
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(B, T, RANK, RANK, generator=g).to(device) for _ in range(N_MODALITIES)]

    def step():
        with torch.set_grad_enabled(mode == "fwd_bwd"):
            outs = fn(q1, q2, k1, k2, mask)
            if mode == "fwd_bwd":
                return torch.autograd.grad(outs, inputs, grads)
            return outs

    if impl == "compiled":
        try:
            step()  # compile outside the timing
        except Exception as err:  # noqa: BLE001 - any backend failure means "does not compile here"
            pytest.skip(f"torch.compile of the reference failed on {device}: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return step


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
def test_tr_attention(benchmark, device, shape, mode, impl):
    B, T = SHAPES[shape]
    run_benchmark(benchmark, make_step(device, B, T, mode, impl), group="tr_attention",
                  device=device, impl=impl, shape=shape, mode=mode, B=B, T=T,
                  modalities=N_MODALITIES, rank=RANK)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("T", SWEEP_T, ids=[f"T{t}" for t in SWEEP_T])
@pytest.mark.parametrize("device", DEVICES)
def test_tr_attention_sweep(benchmark, device, T, impl):
    B, mode = SWEEP_B, "fwd_bwd"
    run_benchmark(benchmark, make_step(device, B, T, mode, impl), group="tr_attention_sweep",
                  op="tr_attention", device=device, impl=impl, shape=f"T{T}_B{B}", mode=mode,
                  sweep=("T", T), B=B, T=T, modalities=N_MODALITIES, rank=RANK)
