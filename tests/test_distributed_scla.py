"""cascla_ext.distributed: the SCLA loss over the global batch of a torch.distributed run.

The spawned tests start 2 or 3 CPU processes (gloo on 127.0.0.1); each
builds the same global batch, takes its shard, and checks the distributed
loss and gradients against ``ops.scla_loss`` (and ``reference.scla_loss``)
on the concatenated batch, in float64 to 1e-10. A worker's failure is
raised here with its traceback.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cascla_ext import ops, reference
from cascla_ext.distributed import (
    _class_stats,
    _label_side,
    _per_anchor_loss,
    balanced_scale_global,
    global_value,
    is_distributed,
    scla_loss_global,
)
from cascla_ext.nn.scla import balanced_scale
from spawn_helpers import assert_close, requires_gloo, run_distributed


TOL = {"rtol": 1e-10, "atol": 1e-10}
K, D, D_IN = 4, 6, 5
PARAMS = [(2.0, 0.5, 1.0), (0.0, 0.0, 0.5), (1.0, 2.0, 1.5)]  # (alpha, beta, gamma)
# Uneven shards: a single-anchor rank, an empty rank; rank 0's shard never has class K - 1.
LAYOUTS = {2: [(5, 2), (9, 1)], 3: [(5, 2, 9), (5, 1, 9), (4, 0, 3)]}


# --------------------------------------------------------------------------
# The global batch and its shards


def _global_batch(sizes, P, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = sum(sizes)
    f = torch.randn(M, D, generator=g, dtype=dtype) * 2
    f_aug = torch.randn(P, M, D, generator=g, dtype=dtype) * 2
    z = torch.randn(K, D, generator=g, dtype=dtype)
    y = torch.randint(0, K, (M,), generator=g)
    y[: sizes[0]] = torch.randint(0, K - 1, (sizes[0],), generator=g)  # rank 0 lacks class K - 1
    return f, f_aug, z, y


def _shard(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _single(f, f_aug, z, y, params, reduction):
    """Single-process value and gradients (w.r.t. f, f_aug, z) on the whole batch."""
    leaves = [t.clone().requires_grad_() for t in (f, f_aug, z)]
    loss = ops.scla_loss(*leaves, y, *params, reduction=reduction)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach(), grads


def _all_reduce_sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------
# Workers


def _check_loss_worker(rank, world_size):
    assert is_distributed() and dist.get_world_size() == world_size
    N = world_size
    for sizes in LAYOUTS[world_size]:
        for P in (0, 2):
            f, f_aug, z, y = _global_batch(sizes, P, seed=sum(sizes) + P)
            sl = _shard(sizes, rank)
            for params in PARAMS:
                where = f"sizes={sizes} P={P} (alpha, beta, gamma)={params} rank={rank}"
                ref_value = reference.scla_loss(f, f_aug, z, y, *params, reduction="none")
                for reduction in ("mean", "sum", "none") if params == PARAMS[0] else ("mean",):
                    value, (gf, gfa, gz) = _single(f, f_aug, z, y, params, reduction)
                    lf, lfa, lz = f[sl].clone().requires_grad_(), f_aug[:, sl].clone().requires_grad_(), \
                        z.clone().requires_grad_()
                    loss = scla_loss_global(lf, None if P == 0 else lfa, lz, y[sl], *params, reduction=reduction)
                    if reduction == "none":
                        # Local per-anchor losses; sum them: the gradients are those of the global sum.
                        assert_close(loss.detach(), value[sl], **TOL, msg=where)
                        assert_close(loss.detach(), ref_value[sl], **TOL, msg=where)
                        loss.sum().backward()
                        scale = 1  # sum over ranks of the local sums = the global sum
                        z_grad = _all_reduce_sum(lz.grad)
                    else:
                        assert_close(global_value(loss), value, **TOL, msg=where)
                        ref_total = ref_value.sum() / (len(y) if reduction == "mean" else 1)
                        assert_close(global_value(loss), ref_total, **TOL, msg=where)
                        loss.backward()
                        scale = N  # the convention: N times this rank's part
                        z_grad = _all_reduce_sum(lz.grad) / N  # as DDP averages
                    assert_close(lf.grad / scale, gf[sl], **TOL, msg=where)
                    if P:
                        assert_close(lfa.grad / scale, gfa[:, sl], **TOL, msg=where)
                    else:
                        assert lfa.grad is None
                    assert_close(z_grad, gz, **TOL, msg=where)
                gamma = params[2]
                assert_close(balanced_scale_global(y[sl], K, gamma, P, dtype=torch.float64),
                             balanced_scale(y, K, gamma, P, torch.float64), **TOL, msg=where)

    # Under autocast: float32 arithmetic and a float32 loss, as the op.
    sizes = LAYOUTS[world_size][0]
    f, f_aug, z, y = (t.float() if t.is_floating_point() else t for t in _global_batch(sizes, 2))
    sl = _shard(sizes, rank)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = scla_loss_global(f[sl], f_aug[:, sl], z, y[sl])
        expected = ops.scla_loss(f, f_aug, z, y)
    assert loss.dtype == torch.float32
    assert_close(global_value(loss), expected, rtol=1e-5, atol=1e-5, msg=f"autocast rank={rank}")

    # Fewer than 2 anchors over all ranks: an error on every rank (not a hang).
    sizes = (1,) + (0,) * (world_size - 1)
    f, f_aug, z, y = _global_batch(sizes, 0)
    sl = _shard(sizes, rank)
    with pytest.raises(RuntimeError, match="at least 2 anchors"):
        scla_loss_global(f[sl], None, z, y[sl])


class _Tiny(nn.Module):
    """Features from an encoder shared by f and f_aug; label embeddings from parameters."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(D_IN, D, dtype=torch.float64)
        self.emb = nn.Parameter(torch.randn(K, D, dtype=torch.float64))
        self.proj = nn.Linear(D, D, dtype=torch.float64)

    def forward(self, x, x_aug):
        return torch.tanh(self.enc(x)) * 3, torch.tanh(self.enc(x_aug)) * 3, self.proj(torch.relu(self.emb))


def _ddp_worker(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(3)
    single = _Tiny()
    model = DistributedDataParallel(_Tiny())  # rank 0's parameters, broadcast
    model.module.load_state_dict(single.state_dict())  # the same on every rank (same seed)
    for sizes in LAYOUTS[world_size]:
        for P in (0, 2):
            for normalization in ("literal", "balanced"):
                where = f"sizes={sizes} P={P} {normalization} rank={rank}"
                g = torch.Generator().manual_seed(sum(sizes) + P)
                M = sum(sizes)
                x, x_aug = torch.randn(M, D_IN, generator=g, dtype=torch.float64), \
                    torch.randn(P, M, D_IN, generator=g, dtype=torch.float64)
                y = torch.randint(0, K, (M,), generator=g)
                single.zero_grad()
                model.zero_grad()

                f, f_aug, z = single(x, x_aug)
                loss = ops.scla_loss(f, f_aug, z, y)
                if normalization == "balanced":
                    loss = loss * balanced_scale(y, K, 1.0, P, torch.float64)
                loss.backward()

                sl = _shard(sizes, rank)
                f, f_aug, z = model(x[sl], x_aug[:, sl])
                dloss = scla_loss_global(f, f_aug, z, y[sl])
                if normalization == "balanced":
                    dloss = dloss * balanced_scale_global(y[sl], K, 1.0, P, dtype=torch.float64)
                dloss.backward()  # DDP averages the parameter gradients over the ranks

                assert_close(global_value(dloss), loss.detach(), **TOL, msg=where)
                for (name, p), q in zip(single.named_parameters(), model.module.parameters()):
                    assert_close(q.grad, p.grad, **TOL, msg=f"{where}: {name}")


# --------------------------------------------------------------------------
# Tests


def test_not_initialised_is_the_fused_op():
    """Without torch.distributed: exactly ops.scla_loss (values and gradients) and balanced_scale."""
    assert not is_distributed()
    f, f_aug, z, y = _global_batch((6, 3), 2)
    for reduction in ("mean", "sum", "none"):
        for aug in (f_aug, None):
            a = [t.clone().requires_grad_() for t in (f, z)]
            b = [t.clone().requires_grad_() for t in (f, z)]
            out = scla_loss_global(a[0], aug, a[1], y, 2.0, 0.5, 1.5, reduction)
            expected = ops.scla_loss(b[0], aug, b[1], y, 2.0, 0.5, 1.5, reduction)
            assert torch.equal(out, expected)
            out.sum().backward()
            expected.sum().backward()
            assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)
        if reduction != "none":
            assert torch.equal(global_value(out), expected.detach())
    assert torch.equal(balanced_scale_global(y, K, 1.5, 2, dtype=torch.float64),
                       balanced_scale(y, K, 1.5, 2, torch.float64))


@pytest.mark.parametrize("num_classes", [1, 4])
@pytest.mark.parametrize("P", [0, 2])
def test_class_statistics_of_shards_give_the_global_loss(num_classes, P):
    """In one process: summing the shards' class statistics (the all-reduce) and
    computing each shard's anchors with them gives ops.scla_loss on the whole
    batch, gradients included (they flow through the sum to every shard)."""
    sizes = (5, 1, 0, 9)
    g = torch.Generator().manual_seed(1)
    M = sum(sizes)
    f = (torch.randn(M, D, generator=g, dtype=torch.float64) * 3).requires_grad_()
    f_aug = torch.randn(P, M, D, generator=g, dtype=torch.float64).requires_grad_()
    z = torch.randn(num_classes, D, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, num_classes, (M,), generator=g)
    for alpha, beta, gamma in PARAMS:
        table = sum(_class_stats(a, b, num_classes) for a, b in zip(f.split(sizes), y.split(sizes)))
        sums, counts = table[:, :D], table[:, D]
        W = _label_side(z, sums, counts.sum())
        loss = torch.cat([_per_anchor_loss(a, b, W, c, counts, counts.sum(), alpha, beta, gamma)
                          for a, b, c in zip(f.split(sizes), f_aug.split(sizes, 1), y.split(sizes))])
        expected = ops.scla_loss(f, f_aug, z, y, alpha, beta, gamma, "none")
        assert_close(loss, expected, **TOL)
        assert_close(loss, reference.scla_loss(f, f_aug, z, y, alpha, beta, gamma, "none"), **TOL)
        inputs = [f, f_aug, z] if P else [f, z]
        for a, b in zip(torch.autograd.grad(loss.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)):
            assert_close(a, b, **TOL)


@requires_gloo
@pytest.mark.parametrize("world_size", [2, 3])
def test_global_loss_and_gradients_match_one_process(world_size):
    """Uneven shards (a single-anchor rank, an empty rank, a rank lacking a
    class), P = 0 and 2, every reduction: the global value, each rank's f and
    f_aug gradients (divided by N for mean / sum) and z's averaged gradient
    are the single-process ones."""
    run_distributed(_check_loss_worker, world_size)


@requires_gloo
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_step_is_the_single_process_step(world_size):
    """A DistributedDataParallel model (encoder for f and f_aug, label
    embeddings for z): after backward, DDP's averaged parameter gradients are
    those of the single-process model on the concatenated batch, literal and
    balanced."""
    run_distributed(_ddp_worker, world_size)
