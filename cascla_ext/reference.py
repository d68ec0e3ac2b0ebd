"""Pure-PyTorch twins of the fused ops in :mod:`cascla_ext.ops`.

Same signatures, same math (``../shared/spec/ops.md``), written for clarity
rather than speed: they are what the kernels are tested against, and a
fallback for debugging (autograd does their backward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["perturbed_gru"]


def perturbed_gru(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    rho: Tensor | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Reference for :func:`cascla_ext.ops.perturbed_gru` (spec section 1)."""
    T, B, _ = x.shape
    gi = F.linear(x, w_ih, b_ih)  # (T, B, 3H)
    if rho is not None:
        gi = gi + rho
    if lengths is None:
        valid = torch.ones(T, B, dtype=torch.bool, device=x.device)
    else:
        lengths = torch.as_tensor(lengths, device=x.device)
        valid = torch.arange(T, device=x.device).unsqueeze(1) < lengths.unsqueeze(0)
    h = h0
    ys: list[Tensor] = [h0.new_zeros(h0.shape)] * T
    for t in reversed(range(T)) if reverse else range(T):
        gh = F.linear(h, w_hh, b_hh)
        gi_r, gi_z, gi_n = gi[t].chunk(3, dim=1)
        gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(gi_r + gh_r)
        z = torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        h_new = (1 - z) * n + z * h
        m = valid[t].unsqueeze(1)
        h = torch.where(m, h_new, h)
        ys[t] = torch.where(m, h_new, torch.zeros_like(h_new))
    y = torch.stack(ys) if T > 0 else x.new_zeros(0, B, h0.shape[1])
    return y, h
