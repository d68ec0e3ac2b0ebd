"""Pure-PyTorch twins of the fused ops in :mod:`cascla_ext.ops`.

Same signatures, same math (``../shared/spec/ops.md``), written for clarity
rather than speed: they are what the kernels are tested against, and a
fallback for debugging (autograd does their backward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["perturbed_gru", "tr_attention"]


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


def tr_attention(
    q1: Sequence[Tensor],
    q2: Sequence[Tensor],
    k1: Sequence[Tensor],
    k2: Sequence[Tensor],
    mask: Tensor,
    scale: float | None = None,
) -> list[Tensor]:
    """Reference for :func:`cascla_ext.ops.tr_attention` (spec section 2).

    Modality m has ranks s_m = q1[m].shape[-1] and w_m = q2[m].shape[-1]; the
    ring needs w_m == s_{m+1}. Returns [Out_0, ..., Out_{n-1}], Out_m of shape
    (B, T, s_m, s_m).
    """
    n = len(q1)
    if n < 1 or not (len(q2) == len(k1) == len(k2) == n):
        raise ValueError("tr_attention: q1, q2, k1 and k2 must be lists of the same length n >= 1")
    real = (mask != 0).to(q1[0].dtype)  # (B, T): 1 for real utterances
    count = real.sum(1).clamp(min=1)  # (B,): real utterances per dialogue (at least 1)
    w_bt = real[:, :, None, None]

    thetas, pooled = [], []
    for m in range(n):
        s_m, w_m = q1[m].shape[-1], q2[m].shape[-1]
        sc = scale if scale is not None else 1.0 / math.sqrt(s_m * w_m)
        # Eq. 2-3: the Khatri-Rao (outer) product of the query and key cores,
        # scaled, softmaxed over all s_m * w_m entries jointly.
        logits = sc * (q1[m] * k1[m]).unsqueeze(-1) * (q2[m] * k2[m]).unsqueeze(-2)  # (B, T, s, w)
        theta = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        thetas.append(theta)
        # The pooled matrix: the mean of Theta over the dialogue's real utterances.
        pooled.append((theta * w_bt).sum(1) / count[:, None, None])  # (B, s, w)

    outs = []
    for m in range(n):
        # Eq. 4: contract Theta_m around the ring with the other modalities' pooled matrices.
        ring = thetas[m]
        if n > 1:
            chain = pooled[(m + 1) % n]
            for j in range(2, n):
                chain = chain @ pooled[(m + j) % n]
            ring = thetas[m] @ chain.unsqueeze(1)  # (B, T, s_m, s_m)
        outs.append(ring * w_bt)
    return outs
