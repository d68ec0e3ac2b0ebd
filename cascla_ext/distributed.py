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


# ---------------------------------------------------------------------------
# Distributed training runs (issue 16): the process group, shards, gathering,
# agreement between ranks, and a watchdog that names a rank that died.
#
# Everything here is a thin layer over torch.distributed; train.py calls it.
# Not distributed (no process group, or one process), every helper is the
# identity / a no-op, so single-process training is unchanged.

import contextlib  # noqa: E402 - the section's own imports
import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

#: Seconds a collective may wait, and a rank may go without a heartbeat,
#: before the run is declared failed (``--dist-timeout``).
DEFAULT_TIMEOUT = 300.0


class RankFailed(RuntimeError):
    """Another rank of the run failed (:func:`agree`); the message names it."""


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of processes of the run (1 when not distributed)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def launched_distributed(environ: dict | None = None) -> bool:
    """Whether this process was started by torchrun (or a launcher setting the
    same variables) as one of several: ``WORLD_SIZE`` > 1."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer (set by torchrun), got {environ['WORLD_SIZE']!r}") from None


def init_from_env(device: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL for a CUDA
    ``device``, gloo for the CPU, with ``timeout`` seconds for every
    collective (NCCL aborts a stuck one: ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
    is set to 1 unless already set). Starts the heartbeat watchdog. Returns
    this rank's device: ``cuda:LOCAL_RANK`` for cuda, else ``device``."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"a distributed run needs {name} in the environment (start it with torchrun)")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"--dist-timeout must be a number of seconds > 0, got {timeout!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPUs; "
                             "start at most that many processes per node (--nproc-per-node)")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
        raise ValueError(f"this torch build has no torch.distributed {backend} backend")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    start_watchdog(timeout)
    return device


def shutdown(clean: bool = True) -> None:
    """Stop the watchdog and leave the process group (if any). ``clean``:
    every rank is here too (the run ended normally): the watchdogs stop
    before a barrier, so no rank takes another's exit for a failure."""
    stop_watchdog()
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            if clean and world_size() > 1:
                dist.barrier()
            dist.destroy_process_group()


def shard(items: Sequence, group: dist.ProcessGroup | None = None) -> list:
    """This rank's share of ``items``: every world_size-th one from its rank
    (disjoint, together all of them; sizes differ by at most one)."""
    return list(items[shard_rows(len(items), group)])


def shard_rows(n: int, group: dist.ProcessGroup | None = None) -> slice:
    """The positions of this rank's :func:`shard` of ``n`` items (empty where n <= rank)."""
    return slice(rank(group), n, world_size(group))


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """A detached copy of ``tensor`` summed over the ranks (itself when not distributed)."""
    out = tensor.detach().clone()
    if is_distributed(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_gather_objects(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's ``obj`` (picklable), in rank order ([obj] when not distributed)."""
    if not is_distributed(group):
        return [obj]
    out = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group: dist.ProcessGroup | None = None):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def agree(error: BaseException | None, group: dist.ProcessGroup | None = None) -> None:
    """Raise on every rank if ``error`` is set on any: the first failing
    rank's error, as it is on that rank and as a RuntimeError naming it on
    the others. For checks one rank does alone (claiming the run folder,
    reading last.pt), so that the others do not wait for it in a collective."""
    if not is_distributed(group):
        if error is not None:
            raise error
        return
    messages = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", group)
    for r, message in enumerate(messages):
        if message is not None:
            if error is not None:
                raise error
            raise RankFailed(f"rank {r} failed: {message}")


@contextlib.contextmanager
def on_rank_zero(make_context, group: dist.ProcessGroup | None = None):
    """Enter ``make_context()`` on rank 0 only (e.g. claiming the run folder);
    yields its value there and None on the other ranks. An error entering it
    is raised on every rank (:func:`agree`), and an error in the block
    reaches it on rank 0 as usual."""
    with contextlib.ExitStack() as stack:
        value, error = None, None
        if rank(group) == 0:
            try:
                value = stack.enter_context(make_context())
            except Exception as err:  # noqa: BLE001 - raised again below, on every rank
                error = err
        agree(error, group)
        yield value


def rank_zero_first(load, group: dist.ProcessGroup | None = None, wait: float = 7 * 24 * 3600.0):
    """``load()`` on rank 0, then on the other ranks; returns each rank's
    value. For work that fills a cache the others then read (features
    extracted, an encoder fine-tuned: done once, not by every rank at once
    into the same folder). An error on rank 0 is raised on every rank
    (:func:`agree`). The others wait in a gloo group of their own whose
    timeout is ``wait`` seconds, since that work can outlast the collectives'
    (--dist-timeout); a rank that dies meanwhile is found by the heartbeat
    watchdog. Ranks on machines that do not share rank 0's cache do the
    work themselves, as without this."""
    if not is_distributed(group) or world_size(group) == 1:
        return load()
    waiter = dist.new_group(ranks=dist.get_process_group_ranks(group) if group is not None else None,
                            backend="gloo", timeout=datetime.timedelta(seconds=wait))
    value, error = None, None
    if rank(group) == 0:
        try:
            value = load()
        except Exception as err:  # noqa: BLE001 - raised again below, on every rank
            error = err
    agree(error, waiter)
    return value if rank(group) == 0 else load()


def rng_state() -> dict:
    """This process's random states (torch CPU and CUDA, numpy, Python), as
    plain data that ``torch.load(weights_only=True)`` reads back."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- the watchdog -----------------------------------------------------------
#
# Every rank bumps a counter in the rendezvous store (its own TCP connection)
# every second, and reads the others'. A counter that has not moved for
# ``timeout`` seconds names a rank that died or hangs; an unreachable store
# means the process hosting it (rank 0, or torchrun's agent) is gone. Either
# way this rank prints one line naming the failed rank and exits with status
# 1 at once: a collective with a dead peer might otherwise wait out the
# process group's timeout (NCCL) or the training loop might be between
# collectives. (A collective that fails first - gloo sees a closed socket at
# once - raises in the training loop, which then names the rank from here.)

_watchdog: dict = {}


def _store_client(timeout: float):
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=min(timeout, 30)),
                          wait_for_workers=False)
    return dist.PrefixStore(f"cascla/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/", store)


def failed_rank(wait: float = 6.0, quiet_for: float = 3.0) -> int | None:
    """A rank whose heartbeat has not moved for ``quiet_for`` seconds
    (waiting up to ``wait`` seconds for one to show), or None: after a
    collective failed, which peer it was."""
    deadline = time.monotonic() + wait
    while True:
        seen = dict(_watchdog.get("seen") or {})
        now = time.monotonic()
        stale = [r for r, (_, since) in seen.items() if now - since >= quiet_for]
        if stale or now >= deadline or not seen:
            return stale[0] if stale else None
        time.sleep(0.2)


def _fail(message: str) -> None:
    print(f"cascla: rank {_watchdog['rank']}: {message}; exiting", file=sys.stderr, flush=True)
    os._exit(1)


def _watch(rank_: int, world: int, timeout: float, interval: float, stop: threading.Event) -> None:
    try:
        store = _store_client(timeout)
    except Exception:  # noqa: BLE001 - no heartbeat, the process group's timeout still holds
        return
    seen = {r: (None, time.monotonic()) for r in range(world) if r != rank_}
    _watchdog["seen"] = seen
    beat = 0
    while not stop.wait(interval):
        beat += 1
        try:
            store.set(str(rank_), str(beat))
            values = {r: store.get(str(r)) if store.check([str(r)]) else None for r in seen}
        except Exception:  # noqa: BLE001 - the store's host is gone
            if stop.wait(3 * interval):  # or this process is ending too, and stops the watchdog
                return
            _fail("the rendezvous store is unreachable: rank 0 (or the torchrun agent hosting it) has died")
            return
        now = time.monotonic()
        for r, value in values.items():
            last, since = seen[r]
            if value != last:
                seen[r] = (value, now)
            elif now - since > timeout:
                _fail(f"rank {r} has died or stopped responding (no heartbeat for {timeout:g} s)")
                return


def start_watchdog(timeout: float, interval: float = 1.0) -> None:
    """Start the heartbeat thread (daemon) for this distributed run; see above."""
    if not is_distributed() or _watchdog.get("thread") is not None:
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(rank(), world_size(), float(timeout), interval, stop),
                              name="cascla-watchdog", daemon=True)
    _watchdog.update(thread=thread, stop=stop, rank=rank(), seen=None)
    thread.start()


def stop_watchdog() -> None:
    thread, stop = _watchdog.pop("thread", None), _watchdog.pop("stop", None)
    if thread is not None:
        stop.set()
        thread.join(timeout=5)


def global_label_counts(labels: Tensor, mask: Tensor, num_classes: int,
                        group: dist.ProcessGroup | None = None) -> Tensor:
    """The labelled utterances (mask and label >= 0) per class over all
    ranks' batches: a (K,) float64 tensor, the same on every rank (one
    all-reduce of K numbers; this rank's counts when not distributed)."""
    valid = mask & (labels >= 0)
    return all_reduce_sum(torch.bincount(labels[valid], minlength=num_classes).to(torch.float64), group)


def any_rank(flag: bool, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` is set on any rank (``flag`` when not distributed)."""
    if not is_distributed(group):
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device), group).item() > 0)
