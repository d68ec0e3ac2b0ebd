"""The SCLA loss over the global batch of a ``torch.distributed`` run.

:func:`cascla_ext.ops.scla_loss` depends on the whole batch: the class counts
n_c, the batch size M (in 1 / (M - 1) and (M / n_c)^gamma) and the soft-HGR
sum over every anchor l = 1..M in Sim. Computed per rank, N ranks would train
a different objective than one process on the same global batch.
:func:`scla_loss_global` makes it exact by all-reducing per-class statistics
(spec: ``shared/spec/ops.md`` section 3; notes: ``docs/distributed.md``).

Since cov is bilinear in centred vectors,

    sum_l cov(g, f_l) cov(z_j, z_{y_l}) = sum_c cov(z_j, z_c) (g - g-bar) . C_c / (d - 1),
    C_c = sum_{l: y_l = c} (f_l - f_l-bar)

so Sim(g, z_j) = g . W_j with W = z / (M - 1) - 1/2 G C / (d - 1),
G = cov(z, z) (K x K). One all-reduce (SUM) of the K x (d + 1) table
[C | n] gives every rank the global W, M and n_c: O(K d) numbers a step,
independent of the batch, instead of the O(M d) an all-gather of the
features costs. The all-reduce is differentiable (its backward all-reduces
the gradient), so every rank's features receive the gradient of the other
ranks' anchors' losses.

The gradient convention (scalar reductions): each rank returns
``world_size * (its part of the global value)``, i.e. for "mean"

    returned_r = N * sum_{i on rank r} loss_i / M_global,

so that the mean over the ranks of the returned values is the single-process
loss on the concatenated batch, and DDP (which averages the gradients over
the N ranks) takes exactly the single-process step -- for the parameters
behind f and f_aug and for replicated ones behind z alike. The gradient on
one rank's own f is N times the single-process gradient of those rows.
:func:`global_value` gives the global loss (for logging).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .nn.scla import balanced_scale

__all__ = ["SCOPES", "balanced_scale_global", "global_value", "is_distributed", "scla_loss_global"]

#: Where the SCLA loss's batch statistics come from: "local" (each rank's own
#: shard, :func:`cascla_ext.ops.scla_loss`) or "global" (the union of all
#: ranks' shards, :func:`scla_loss_global`). For the CLI to expose later.
SCOPES = ("local", "global")

_REDUCTIONS = ("none", "sum", "mean")


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``group`` (default: the default group) spans more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) with autograd: the backward all-reduces (SUMs) the gradient.

    The same as ``torch.distributed.nn.functional.all_reduce``, which recent
    torch deprecates (a FutureWarning every call) in favour of a functional
    collective without autograd."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _class_stats(f: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """The (K, d + 1) float64 table [sum_{l: y_l = c} f_l | n_c] of one shard.

    The sums are not centred (centring is linear: it is done after the
    reduction, on K rows); the count column carries no gradient."""
    M, d = f.shape
    table = f.new_zeros((num_classes, d + 1), dtype=torch.float64)
    rows = torch.cat([f.to(torch.float64), f.new_ones((M, 1), dtype=torch.float64)], dim=1)
    return table.index_add(0, y, rows)


def _label_side(z: Tensor, sums: Tensor, M: Tensor) -> Tensor:
    """W (K, d) in float64 with Sim(g, z_j) = g . W_j, from the global class
    sums (K, d) and the global M (a 0-d float64 tensor)."""
    d1 = z.shape[1] - 1
    zd = z.to(torch.float64)
    zc = zd - zd.mean(1, keepdim=True)
    G = zc @ zc.T / d1  # cov(z_j, z_c)
    C = sums - sums.mean(1, keepdim=True)  # sum_{l: y_l = c} (f_l - f_l-bar)
    return zd / (M - 1) - 0.5 / d1 * (G @ C)


def _lse_excluding(u: Tensor, idx: Tensor) -> Tensor:
    """[i, a] = log sum_{m != idx[i, a]} exp(u[i, m]) for u (R, n), idx (R, A)."""
    n = u.shape[1]
    drop = idx.unsqueeze(-1) == torch.arange(n, device=u.device)  # (R, A, n)
    return u.unsqueeze(1).expand(-1, idx.shape[1], -1).masked_fill(drop, float("-inf")).logsumexp(-1)


def _per_anchor_loss(f: Tensor, f_aug: Tensor, W: Tensor, y: Tensor, counts: Tensor, M: Tensor,
                     alpha: float, beta: float, gamma: float) -> Tensor:
    """loss_i (M_r,) of the local anchors, given the global W, counts and M."""
    K, P, R = W.shape[0], f_aug.shape[0], f.shape[0]
    Wf = W.to(f.dtype)
    s = f @ Wf.T  # (R, K): Sim(f_i, z_k)
    aug = (f_aug * Wf[y]).sum(-1).T  # (R, P): Sim(f_aug[p, i], z_{y_i})
    t = torch.cat([s, aug], dim=1)  # exp(t[i]) are the terms of S_i + Aug_i

    # Positives: g = f_i (column y_i) and every f_aug[p, i] (column K + p).
    if K + P > 1:
        pos = torch.cat([y[:, None], K + torch.arange(P, device=f.device).expand(R, P)], dim=1)
        lse_all = t.logsumexp(1, keepdim=True)
        log_p = t.gather(1, pos) - lse_all
        log_1mp = _lse_excluding(t, pos) - lse_all  # log(1 - p(g)): the other terms' share
        focal_pos = torch.exp(alpha * log_1mp) if alpha != 0 else torch.ones_like(log_p)
        l_pos = -(log_p * focal_pos).sum(1)
    else:  # a single term: p = 1, no loss (and no NaN from an empty log-sum-exp)
        l_pos = t.sum(1) * 0

    # Negatives: q_ik over the K anchor similarities, k != y_i.
    if K > 1:
        lse_s = s.logsumexp(1, keepdim=True)
        log_q = s - lse_s
        every = torch.arange(K, device=f.device).expand(R, K)
        log_1mq = _lse_excluding(s, every) - lse_s  # log(1 - q_ik)
        focal_neg = torch.exp(beta * log_q) if beta != 0 else torch.ones_like(log_q)
        negative = every != y[:, None]
        l_neg = -torch.where(negative, log_1mq * focal_neg, torch.zeros_like(s)).sum(1)
    else:
        l_neg = torch.zeros_like(l_pos)

    w = (M / counts[y]) ** gamma  # (M_global / n_{y_i})^gamma, float64
    return w.to(f.dtype) * (l_pos + l_neg)


def _check(f: Tensor, f_aug: Tensor, z: Tensor, y: Tensor, reduction: str) -> None:
    op = "scla_loss_global"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: expected reduction to be one of 'none', 'sum', 'mean', got {reduction!r}")
    if f.dim() != 2 or f.shape[1] < 2:
        raise ValueError(f"{op}: expected f of shape (M, d) with d >= 2, got {tuple(f.shape)}")
    if f_aug.dim() != 3 or f_aug.shape[1:] != f.shape:
        raise ValueError(f"{op}: expected f_aug of shape (P, M, d) with (M, d) = f.shape, "
                         f"got {tuple(f_aug.shape)}")
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] != f.shape[1]:
        raise ValueError(f"{op}: expected z of shape (K, d) with d = f.size(1), got {tuple(z.shape)}")
    if y.shape != (f.shape[0],) or y.dtype != torch.int64:
        raise ValueError(f"{op}: expected y of shape (M,) = ({f.shape[0]},) and dtype int64, "
                         f"got {tuple(y.shape)} {y.dtype}")
    if not (f.dtype == f_aug.dtype == z.dtype) or not f.is_floating_point():
        raise ValueError(f"{op}: expected f, f_aug and z of one floating dtype, "
                         f"got {f.dtype}, {f_aug.dtype}, {z.dtype}")


def scla_loss_global(
    f: Tensor,
    f_aug: Tensor | None,
    z: Tensor,
    y: Tensor,
    alpha: float = 2.0,
    beta: float = 0.5,
    gamma: float = 1.0,
    reduction: str = "mean",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """:func:`cascla_ext.ops.scla_loss` over the union of all ranks' anchors.

    Every rank of ``group`` (default: the default group) must call it, with
    its own shard: f (M_r, d), f_aug (P, M_r, d) or None, y (M_r,), and the
    same z (K, d) and P on every rank (z replicated, e.g. the label
    embeddings of a DDP model -- with the same dropout mask). M_r may be 0
    or 1 and a shard may lack classes; the global M must be >= 2. The
    counts n_c, M, and the sum over l in Sim are global.

    Returns, with N the world size:

    - "mean": ``N * sum_{i on this rank} loss_i / M_global``;
    - "sum": ``N * sum_{i on this rank} loss_i``;
    - "none": this rank's M_r per-anchor losses loss_i (global weights,
      global Sim), unscaled.

    For "mean" and "sum", the mean of the returned values over the ranks is
    the single-process loss on the concatenated batch (:func:`global_value`
    computes it), and the gradients are those of N times this rank's part:
    averaged over the ranks as DDP does, they are the single-process
    gradients, for the parameters behind f and f_aug as for replicated ones
    behind z. (With "none": the global sum is the all-reduce SUM of
    ``loss.sum()``; ``N * loss.sum() / M_global`` is the "mean" value.)

    Not distributed (torch.distributed not initialised, or one process):
    exactly :func:`cascla_ext.ops.scla_loss` (the fused op). Distributed: pure
    PyTorch, O(M_r K d + K^2 d) time, no M x M matrix, one all-reduce of
    K (d + 1) float64 numbers forward (and one backward).
    """
    if f_aug is None:
        f_aug = f.new_empty((0, *f.shape))
    if not is_distributed(group):
        return ops.scla_loss(f, f_aug, z, y, alpha, beta, gamma, reduction)
    _check(f, f_aug, z, y, reduction)
    device_type = f.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # As the op under autocast: float32 arithmetic (float64 left alone), float32 out.
        if f.dtype != torch.float64:
            f, f_aug, z = f.float(), f_aug.float(), z.float()
        with torch.autocast(device_type, enabled=False):
            return _scla_loss_global(f, f_aug, z, y, alpha, beta, gamma, reduction, group)
    return _scla_loss_global(f, f_aug, z, y, alpha, beta, gamma, reduction, group)


def _scla_loss_global(f, f_aug, z, y, alpha, beta, gamma, reduction, group) -> Tensor:
    K, d = z.shape
    table = _AllReduceSum.apply(_class_stats(f, y, K), group)
    sums, counts = table[:, :d], table[:, d].detach()
    M = counts.sum()
    torch._assert_async(M >= 2, "scla_loss_global: expected at least 2 anchors over all ranks")
    loss = _per_anchor_loss(f, f_aug, _label_side(z, sums, M), y, counts, M, float(alpha), float(beta),
                            float(gamma))
    if reduction == "none":
        return loss
    N = dist.get_world_size(group)
    if reduction == "sum":
        return N * loss.sum()
    return loss.sum() * (N / M).to(loss.dtype)


def global_value(loss: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The global value of a "mean" or "sum" :func:`scla_loss_global` (or of
    any loss with its convention): the mean over the ranks of ``loss``,
    detached, the same on every rank. Not distributed: ``loss.detach()``."""
    value = loss.detach().clone()
    if not is_distributed(group):
        return value
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value / dist.get_world_size(group)


def balanced_scale_global(
    y: Tensor,
    num_classes: int,
    gamma: float,
    num_views: int,
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """:func:`cascla_ext.nn.scla.balanced_scale` over all ranks' anchors:
    1 / (mean_i (M / n_{y_i})^gamma * (1 + P)), the mean and the counts over
    the global batch, i.e. with one all-reduce of the K counts,

        mean_i w_i = sum_{c: n_c > 0} n_c (M / n_c)^gamma / M.

    A 0-d tensor of ``dtype`` (default: torch's default dtype) on y's
    device, the same on every rank; no gradient. Not distributed: exactly
    ``balanced_scale``. Multiplying a :func:`scla_loss_global` value by it
    keeps that value's convention."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not is_distributed(group):
        return balanced_scale(y, num_classes, gamma, num_views, dtype)
    counts = torch.bincount(y, minlength=num_classes).to(torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    M = counts.sum()
    present = counts > 0
    mean_w = torch.where(present, counts * (M / counts.clamp(min=1)) ** gamma, 0.0).sum() / M
    return (1.0 / (mean_w * (1 + num_views))).to(dtype)
