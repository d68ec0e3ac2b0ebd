"""train_step: one full CaSCLA training step with the fused ops vs the
reference ops (``CaSCLAConfig.ops_backend``).

One step = ``model(batch)`` (unimodal encoders, tensor-ring fusion, the
bidirectional GRU three times: clean, adversarial (AST) and textual view,
causal interaction, CE + SCLA + adversarial CE), ``zero_grad``,
``loss.backward()``, ``Adam.step()``: the loop body of ``cascla_ext.train``
(no gradient clipping). Model in training mode (dropout on), AST and SCLA
on, text/audio/visual with the paper's feature widths (1024, 1582, 342; clue
vectors of 1024).

Shapes (exact: B dialogues, the longest has T utterances, the others a
seeded random length in [T/2, T]):
- ``meld``: B=16, T=24;
- ``iemocap``: B=8, T=110.
Presets: ``small`` (``CaSCLAConfig.small()``) on the CPU and on CUDA,
``paper`` (the paper's widths, d_m = 1024, d_h = 300) on CUDA only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascla_ext import CaSCLA, CaSCLAConfig, collate
from cascla_ext.data.batch import Dialogue
from conftest import CUDA_OK, CUDA_SKIP_REASON, pick, run_benchmark

SHAPES = pick({"meld_T24_B16": (16, 24), "iemocap_T110_B8": (8, 110)}, {"quick_T6_B2": (2, 6)})
INPUT_DIMS = {"t": 1024, "a": 1582, "v": 342}
CLUE_DIM = 1024
N_SPEAKERS = 4
CASES = [("cpu", "small"),
         *(pytest.param(device, preset, marks=pytest.mark.skipif(not CUDA_OK, reason=CUDA_SKIP_REASON))
           for device, preset in (("cuda", "small"), ("cuda", "paper")))]


def make_config(preset: str, backend: str) -> CaSCLAConfig:
    common = dict(input_dims=dict(INPUT_DIMS), clue_dim=CLUE_DIM, ops_backend=backend,
                  use_ast=True, use_scla=True)
    if preset == "small":
        return CaSCLAConfig.small(**common)
    return CaSCLAConfig(**common)


def make_batch(B: int, T: int, num_classes: int, seed: int = 0):
    """B random dialogues, the first of exactly T utterances, collated."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, T // 2), T + 1, size=B)
    lengths[0] = T
    dialogues = []
    for b, n in enumerate(lengths):
        n = int(n)
        dialogues.append(Dialogue(
            id=f"bench-{b}",
            features={m: rng.standard_normal((n, d), dtype=np.float32) for m, d in INPUT_DIMS.items()},
            speakers=rng.integers(0, N_SPEAKERS, size=n),
            labels=rng.integers(0, num_classes, size=n),
            clues=rng.standard_normal((n, 6, CLUE_DIM), dtype=np.float32),
        ))
    return collate(dialogues, modalities=list(INPUT_DIMS))


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("device", "preset"), CASES)
def test_train_step(benchmark, device, preset, shape, impl):
    B, T = SHAPES[shape]
    torch.manual_seed(0)
    cfg = make_config(preset, impl)
    model = CaSCLA(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = make_batch(B, T, cfg.num_classes).to(device)

    def step():
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss

    step()  # Adam's state exists from here on (not counted in the peak memory)
    run_benchmark(benchmark, step, group="train_step", device=device, impl=impl,
                  shape=f"{shape}_{preset}", mode="train_step", B=B, T=T, preset=preset,
                  utterances=int(batch.lengths.sum()),
                  parameters=sum(p.numel() for p in model.parameters()),
                  modalities="tav", use_ast=True, use_scla=True)
