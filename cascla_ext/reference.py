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

__all__ = ["perturbed_gru", "tr_attention", "scla_loss"]


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
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"perturbed_gru: expected lengths to be an integer tensor (int64), got {lengths.dtype}")
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


def scla_loss(
    f: Tensor,
    f_aug: Tensor | None,
    z: Tensor,
    y: Tensor,
    alpha: float = 2.0,
    beta: float = 0.5,
    gamma: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Reference for :func:`cascla_ext.ops.scla_loss` (spec section 3), written
    literally: the M x M covariances cov(g, f_l) are built (O(M^2 d) time,
    O(M^2) memory). The probabilities are kept as logs (log-sum-exp), so large
    similarities stay finite here too."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"scla_loss: expected reduction to be one of 'none', 'sum', 'mean', got {reduction!r}")
    M, d = f.shape
    K = z.shape[0]
    if f_aug is None:
        f_aug = f.new_zeros(0, M, d)
    P = f_aug.shape[0]

    def cov(u: Tensor, v: Tensor) -> Tensor:  # all pairs of rows: cov(u_a, v_b)
        uc = u - u.mean(-1, keepdim=True)
        vc = v - v.mean(-1, keepdim=True)
        return uc @ vc.transpose(-1, -2) / (d - 1)

    cov_z_zy = cov(z, z)[:, y]  # (K, M): cov(z_j, z_{y_l})

    def sim(g: Tensor) -> Tensor:  # Eq. 12 for every row of g and every z_j: (R, K)
        return g @ z.T / (M - 1) - 0.5 * cov(g, f) @ cov_z_zy.T  # cov(g, f) is (R, M)

    s = sim(f)  # (M, K): Sim(f_i, z_k)
    aug = [sim(f_aug[p]).gather(1, y[:, None]) for p in range(P)]  # each (M, 1)
    t = torch.cat([s, *aug], dim=1)  # (M, K + P): exp(t) are the terms of S_i + Aug_i

    def lse_others(u: Tensor) -> Tensor:  # [i, n] = log sum_{m != n} exp(u[i, m])
        n = u.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=u.device)
        return u.unsqueeze(1).expand(-1, n, n).masked_fill(eye, float("-inf")).logsumexp(-1)

    # Positives (Eqs. 13-15): g = f_i (index y_i) and every f_aug[p, i] (index K + p).
    pos = torch.cat([y[:, None], K + torch.arange(P, device=f.device).expand(M, P)], dim=1)
    lse_all = t.logsumexp(1, keepdim=True)
    log_p = t.gather(1, pos) - lse_all  # log p(g)
    log_1mp = lse_others(t).gather(1, pos) - lse_all  # log(1 - p(g)): the other terms' share
    focal_pos = torch.exp(alpha * log_1mp) if alpha != 0 else torch.ones_like(log_p)
    l_pos = -(log_p * focal_pos).sum(1)

    # Negatives (Eqs. 16-17): q_ik over the K anchor similarities, k != y_i.
    if K > 1:
        log_q = s.log_softmax(1)
        log_1mq = lse_others(s) - s.logsumexp(1, keepdim=True)  # log(1 - q_ik)
        focal_neg = torch.exp(beta * log_q) if beta != 0 else torch.ones_like(log_q)
        negative = torch.ones_like(s, dtype=torch.bool).scatter(1, y[:, None], False)
        l_neg = -torch.where(negative, log_1mq * focal_neg, torch.zeros_like(s)).sum(1)
    else:  # one class: no negatives
        l_neg = torch.zeros_like(l_pos)

    # Eq. 18: class-frequency weights (M / n_{y_i})^gamma.
    n = torch.bincount(y, minlength=K).to(f.dtype)
    loss = (M / n[y]) ** gamma * (l_pos + l_neg)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / M
    return loss


# ---------------------------------------------------------------------------
# Twins of the contrastive losses of cascla_ext.nn.contrastive (the paper's
# Table 5 baselines): one anchor at a time, as the formulas read.

__all__ += ["supcon_loss", "spcl_loss"]


def _multiview_samples(f: Tensor, f_aug: Tensor | None, y: Tensor) -> tuple[list[Tensor], list[int]]:
    """The samples of the multiview batch, f's rows then each view's, and their labels."""
    views = [f] + ([] if f_aug is None else [f_aug[p] for p in range(f_aug.shape[0])])
    samples = [view[i] for view in views for i in range(f.shape[0])]
    labels = [int(y[i]) for _ in views for i in range(f.shape[0])]
    return samples, labels


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp(min=1e-12)


def supcon_loss(
    f: Tensor,
    f_aug: Tensor | None,
    y: Tensor,
    temperature: float = 0.1,
    normalize: bool = True,
) -> Tensor:
    """Reference for :func:`cascla_ext.nn.contrastive.supcon_loss`: Khosla et
    al.'s L^sup_out, anchor by anchor. Samples: f's rows and every view's;
    for anchor i, A(i) = every other sample, P(i) = those with i's label;
    loss_i = -1/|P(i)| sum_p log(exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau));
    the mean over the anchors with a positive (0 if none)."""
    samples, labels = _multiview_samples(f, f_aug, y)
    z = torch.stack([_unit(s) if normalize else s for s in samples]) if samples else f
    losses = []
    for i in range(len(z)):
        s = z @ z[i] / temperature  # s[a] = z_i . z_a / tau
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue  # no positive: the anchor is left out
        log_denominator = torch.logsumexp(s[others], 0)
        log_probs = s[positives] - log_denominator  # log p(p | i) for each positive p
        losses.append(-log_probs.sum() / len(positives))
    if not losses:  # 0, with a graph to the features
        return (f.sum() + (0.0 if f_aug is None else f_aug.sum())) * 0.0
    return torch.stack(losses).mean()


def spcl_loss(
    f: Tensor,
    f_aug: Tensor | None,
    y: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
) -> Tensor:
    """Reference for :func:`cascla_ext.nn.contrastive.spcl_loss`: the
    SPCL-style prototypical loss, anchor by anchor, at given prototypes (K, d)
    (a zero row: class k has no prototype). Everything L2-normalised;
    positives of anchor i: the other samples with its label and its class's
    prototype; denominator: every other sample and every prototype;
    loss_i = -log(sum_pos exp(s/tau) / sum_all exp(s/tau)); the mean over the
    anchors with a positive (0 if none)."""
    samples, labels = _multiview_samples(f, f_aug, y)
    z = torch.stack([_unit(s) for s in samples]) if samples else f
    K = prototypes.shape[0]
    centres = {k: _unit(prototypes[k]) for k in range(K) if bool((prototypes[k] != 0).any())}
    losses = []
    for i in range(len(z)):
        s = z @ z[i] / temperature  # s[a] = z_i . z_a / tau
        c = {k: z[i] @ centre / temperature for k, centre in centres.items()}  # s(z_i, c_k)
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        positive_terms = [s[positives]] + ([c[labels[i]].reshape(1)] if labels[i] in c else [])
        all_terms = [s[others]] + [c[k].reshape(1) for k in c]
        if sum(t.numel() for t in positive_terms) == 0:
            continue  # no positive: the anchor is left out
        log_positive = torch.logsumexp(torch.cat(positive_terms), 0)
        log_all = torch.logsumexp(torch.cat(all_terms), 0)
        losses.append(log_all - log_positive)  # -log(positive share)
    if not losses:  # 0, with a graph to the features
        return (f.sum() + (0.0 if f_aug is None else f_aug.sum())) * 0.0
    return torch.stack(losses).mean()
