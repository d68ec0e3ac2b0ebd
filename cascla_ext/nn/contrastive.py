"""Two supervised contrastive losses the paper compares SCLA against in its
batch-size study (Table 5): ``SupConLoss`` (Khosla et al., NeurIPS 2020) and
``SPCLLoss`` (after Song et al., EMNLP 2022).

Both share :class:`~cascla_ext.nn.SCLALoss`'s call, ``forward(f, y,
f_aug=None)``: f (M, d) the features of the labelled utterances, y (M,) int64
their labels, f_aug None, a (P, M, d) tensor or a sequence of P (M, d) tensors
(the model passes ``[f_text, f_adv]``, P = 2). Each returns a 0-d loss, the
mean over the anchors that have a positive.

The multiview batch. Both losses contrast the N = (1 + P) M samples

    z = [f_1, ..., f_M, f_aug[0, 1], ..., f_aug[0, M], ..., f_aug[P-1, M]]

with labels y repeated 1 + P times: every sample is an anchor, and the other
views of the same utterance are positives like any other same-class sample
(Khosla et al.'s "multiviewed batch"). Similarities are s(i, a) = z_i . z_a
on L2-normalised rows (cosine; optional for SupCon), divided by the
temperature tau.

The vectorised functions :func:`supcon_loss` and :func:`spcl_loss` build the
N x N (and N x K) logit matrices once (O(N^2) memory, fine for N up to a few
thousand); :mod:`cascla_ext.reference` has literal per-anchor twins
(``reference.supcon_loss``, ``reference.spcl_loss``) they are tested against.
Nothing in a forward reads a device tensor on the host (no ``.item()``, no
``if`` on a tensor): anchors without positives are dropped with
``torch.where`` and the mean divides by their count on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SPCLLoss", "SupConLoss", "spcl_loss", "supcon_loss"]

# F.normalize's floor on the norm: a zero row stays zero instead of dividing by 0.
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------- checks


def _check_temperature(op: str, temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{op}: expected temperature to be a positive finite number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: expected temperature to be positive and finite, got {temperature}")
    return float(temperature)


def _check_batch(op: str, f: Tensor, y: Tensor, f_aug: Tensor | Sequence[Tensor] | None) -> Tensor:
    """Validates (f, y, f_aug) by shape, dtype and device (never by value:
    that would read the device) and returns f_aug as a (P, M, d) tensor (P = 0
    for None or an empty sequence)."""
    if not isinstance(f, Tensor) or f.dim() != 2:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"{op}: expected f of shape (M, d), got {shape}")
    if not f.is_floating_point():
        raise ValueError(f"{op}: expected f to be a floating-point tensor, got {f.dtype}")
    M, d = f.shape
    if not isinstance(y, Tensor) or y.shape != (M,):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{op}: expected y of shape (M,) = ({M},) (one label per row of f), got {shape}")
    if y.dtype != torch.int64:
        raise ValueError(f"{op}: expected y to be an int64 tensor, got {y.dtype}")
    if y.device != f.device:
        raise ValueError(f"{op}: expected y on f's device {f.device}, got {y.device}")
    if f_aug is None:
        return f.new_empty(0, M, d)
    if not isinstance(f_aug, Tensor):
        views = list(f_aug)
        if not all(isinstance(v, Tensor) for v in views):
            raise ValueError(f"{op}: expected f_aug to be None, a (P, M, d) tensor or a sequence of (M, d) tensors")
        if any(v.shape != f.shape for v in views):
            raise ValueError(f"{op}: expected every view in f_aug of f's shape {tuple(f.shape)}, "
                             f"got {[tuple(v.shape) for v in views]}")
        if any(v.dtype != f.dtype or v.device != f.device for v in views):
            raise ValueError(f"{op}: expected every view in f_aug of f's dtype {f.dtype} on f's device {f.device}")
        return torch.stack(views) if views else f.new_empty(0, M, d)
    if f_aug.dim() != 3 or f_aug.shape[1:] != f.shape:
        raise ValueError(f"{op}: expected f_aug of shape (P, M, d) = (P, {M}, {d}), got {tuple(f_aug.shape)}")
    if f_aug.dtype != f.dtype:
        raise ValueError(f"{op}: expected f_aug of f's dtype {f.dtype}, got {f_aug.dtype}")
    if f_aug.device != f.device:
        raise ValueError(f"{op}: expected f_aug on f's device {f.device}, got {f_aug.device}")
    return f_aug


def _check_label_range(op: str, y: Tensor, num_classes: int) -> None:
    """Labels in [0, K), checked on the CPU only: on an accelerator the check
    would wait for the device (out-of-range labels there fail in indexing)."""
    if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{op}: expected labels y in [0, {num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


# --------------------------------------------------------------------------- shared pieces


def _multiview(f: Tensor, f_aug: Tensor, y: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """The N = (1 + P) M samples (view-major: f, then f_aug[0], ...) and their labels."""
    z = torch.cat([f, f_aug.reshape(-1, f.shape[1])])
    if normalize:
        z = F.normalize(z, dim=1, eps=_NORM_EPS)
    return z, y.repeat(1 + f_aug.shape[0])


def _batch_logits(z: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """logits[i, a] = z_i . z_a / tau with the diagonal (a = i) set to -inf
    (masked, so exp gives exactly 0 there), and pos[i, a] = (a != i and
    labels_a == labels_i)."""
    N = z.shape[0]
    eye = torch.eye(N, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    return logits, pos


def _mean_over_valid(loss_i: Tensor, valid: Tensor) -> Tensor:
    """sum_{i valid} loss_i / #valid, and 0 when no anchor is valid.

    ``torch.where`` keeps the invalid anchors' (possibly non-finite) values out
    of the value and gives them a zero gradient; the count is clamped on the
    device, so no host round trip decides the empty case. The zero still has a
    graph back to the features (gradient 0).
    """
    total = torch.where(valid, loss_i, torch.zeros_like(loss_i)).sum()
    return total / valid.sum().clamp(min=1).to(loss_i.dtype)


# --------------------------------------------------------------------------- SupCon


def supcon_loss(
    f: Tensor,
    f_aug: Tensor | Sequence[Tensor] | None,
    y: Tensor,
    temperature: float = 0.1,
    normalize: bool = True,
) -> Tensor:
    """Khosla et al.'s supervised contrastive loss L^sup_out (Eq. 2 of
    "Supervised Contrastive Learning", NeurIPS 2020) on the multiview batch.

    With z the N = (1 + P) M samples (L2-normalised if ``normalize``),
    A(i) = {a != i} and P(i) = {p in A(i) : y_p = y_i}:

        loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) )
               = LSE_{a in A(i)}(z_i.z_a / tau) - 1/|P(i)| sum_{p in P(i)} z_i.z_p / tau

        loss = mean of loss_i over the anchors with |P(i)| > 0 (0 if none has one).

    The log-sum-exp subtracts each row's maximum (``torch.logsumexp``); the
    self-similarity is masked with -inf, not subtracted, so it contributes an
    exact 0 to the denominator. Departures from the authors' code: anchors
    without a positive are dropped from the mean (their code divides by
    |P(i)| = 0 or, later, counts them as 0), and there is no
    temperature / base_temperature factor (1 with their defaults).
    """
    temperature = _check_temperature("supcon_loss", temperature)
    f_aug = _check_batch("supcon_loss", f, y, f_aug)
    z, labels = _multiview(f, f_aug, y, normalize)
    logits, pos = _batch_logits(z, labels, temperature)
    n_pos = pos.sum(1)
    # Rows with no positive (and, when N = 1, no other sample: an all -inf row)
    # give non-finite loss_i; _mean_over_valid drops them, and the -inf
    # entries' gradients are zeroed by masked_fill's backward.
    lse = logits.logsumexp(1)
    pos_mean = torch.where(pos, logits, torch.zeros_like(logits)).sum(1) / n_pos.clamp(min=1).to(z.dtype)
    return _mean_over_valid(lse - pos_mean, n_pos > 0)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al., 2020), L^sup_out over the
    batch of features and their augmented views: see :func:`supcon_loss`
    for the formula.

    Args:
        temperature: tau > 0 (default 0.1; Khosla et al. use 0.07 on images).
        normalize: L2-normalise the samples first (default True, as in the
            paper: the projection head's outputs lie on the unit sphere).

    ``forward(f, y, f_aug=None)`` as :class:`~cascla_ext.nn.SCLALoss`: f (M, d),
    y (M,) int64 labels (any values: only equality matters), f_aug None, a
    (P, M, d) tensor or a sequence of P (M, d) tensors. Returns the 0-d mean
    over the (1 + P) M anchors that have a positive; 0 (with a graph to f) if
    none has one.
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True) -> None:
        super().__init__()
        self.temperature = _check_temperature("SupConLoss", temperature)
        self.normalize = bool(normalize)

    def forward(self, f: Tensor, y: Tensor, f_aug: Tensor | Sequence[Tensor] | None = None) -> Tensor:
        f_aug = _check_batch("SupConLoss", f, y, f_aug)
        return supcon_loss(f, f_aug, y, self.temperature, self.normalize)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}"


# --------------------------------------------------------------------------- SPCL


def spcl_loss(
    f: Tensor,
    f_aug: Tensor | Sequence[Tensor] | None,
    y: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
) -> Tensor:
    """Supervised prototypical contrastive loss (after Song et al., EMNLP
    2022, without their curriculum) given the class prototypes.

    prototypes (K, d): row k is class k's prototype c_k; a row of zeros means
    class k has no prototype (yet) and is left out everywhere. With z the
    N = (1 + P) M samples and c_k all L2-normalised, s(u, v) = u.v / tau,
    A(i) = {a != i} the other samples, C the classes with a prototype:

        pos_i  = {z_p : p in A(i), y_p = y_i}  +  {c_{y_i} if y_i in C}
        all_i  = {z_a : a in A(i)}             +  {c_k : k in C}
        loss_i = -log( sum_{v in pos_i} exp(s(z_i, v)) / sum_{v in all_i} exp(s(z_i, v)) )
               = LSE_{v in all_i} s(z_i, v) - LSE_{v in pos_i} s(z_i, v)

        loss = mean of loss_i over the anchors with pos_i non-empty (0 if none).

    (All positives share one log, as in SPCL's Eq. 5, unlike SupCon's mean of
    logs.) Gradients flow to f, f_aug and, if it requires them, prototypes.
    """
    temperature = _check_temperature("spcl_loss", temperature)
    f_aug = _check_batch("spcl_loss", f, y, f_aug)
    if not isinstance(prototypes, Tensor) or prototypes.dim() != 2 or prototypes.shape[1] != f.shape[1]:
        shape = tuple(prototypes.shape) if isinstance(prototypes, Tensor) else type(prototypes).__name__
        raise ValueError(f"spcl_loss: expected prototypes of shape (K, d) = (K, {f.shape[1]}), got {shape}")
    if prototypes.dtype != f.dtype or prototypes.device != f.device:
        raise ValueError(f"spcl_loss: expected prototypes of f's dtype {f.dtype} on f's device {f.device}, "
                         f"got {prototypes.dtype} on {prototypes.device}")
    K = prototypes.shape[0]
    _check_label_range("spcl_loss", y, K)
    z, labels = _multiview(f, f_aug, y, normalize=True)
    present = (prototypes != 0).any(1)  # (K,): classes with a prototype
    c = F.normalize(prototypes, dim=1, eps=_NORM_EPS)

    batch_logits, batch_pos = _batch_logits(z, labels, temperature)  # (N, N)
    proto_logits = (z @ c.T / temperature).masked_fill(~present, float("-inf"))  # (N, K)
    classes = torch.arange(K, device=f.device)
    proto_pos = (labels[:, None] == classes[None, :]) & present  # (N, K): c_{y_i}, if present

    logits = torch.cat([batch_logits, proto_logits], 1)  # (N, N + K): every v in all_i
    pos = torch.cat([batch_pos, proto_pos], 1)
    lse_all = logits.logsumexp(1)  # subtracts each row's max
    lse_pos = logits.masked_fill(~pos, float("-inf")).logsumexp(1)
    # Anchors without positives have lse_pos = -inf (and, with no other sample
    # and no prototype, lse_all = -inf too): dropped from the mean, and
    # masked_fill's backward zeroes the gradient of every -inf entry.
    return _mean_over_valid(lse_all - lse_pos, pos.any(1))


class SPCLLoss(nn.Module):
    """SPCL-style supervised prototypical contrastive loss (Song et al.,
    "Supervised Prototypical Contrastive Learning for Emotion Recognition in
    Conversation", EMNLP 2022): the batch's same-class samples and the class
    prototype are the positives; the loss is :func:`spcl_loss`.

    The prototypes. SPCL keeps a pool of (detached) representations per class
    and takes each prototype as the mean of that class's pool, the current
    batch included. Here: a memory queue per class of the last ``queue_size``
    L2-normalised, detached anchor features f_i (the views f_aug are not
    queued) and

        c_k = mean of the last min(queue_size, n_k) class-k features seen,
              the current batch's class-k anchors (in row order) included

    (n_k: class-k anchors seen so far, this batch included), i.e. the mean of
    the queue as it stands after pushing the batch. In training mode the
    pushed queue is stored (buffers ``queue`` (K, Q, d) and ``queue_total``
    (K,), the number of class-k features ever pushed; feature number n of class
    k lives in slot n mod Q, unused slots are 0); in eval mode the same
    prototypes are used but nothing is stored. A class never seen has no
    prototype and is left out of every denominator. The prototypes are
    detached (no gradient flows through them), so the loss's gradient is that
    of :func:`spcl_loss` at fixed prototypes.

    Left out of SPCL (the authors' code): the difficulty-measure curriculum
    (the sampling of easy-to-hard batches, a data-loader concern); the random
    support set (they average a random subset of ``support_set_size`` of a
    class's pool, here the whole queue); the pools' initial "default centres"
    (here a class has no prototype until seen); their score (1 + cos) / 2 (here
    the cosine); the division of the positive mass by |pos_i| and the
    loss > 0.3 mask (here the plain -log of the positives' share).

    Args:
        num_classes: K.
        dim: d, the features' width.
        temperature: tau > 0 (default 0.1).
        queue_size: Q >= 1, features kept per class (default 64).

    ``forward(f, y, f_aug=None)`` as :class:`~cascla_ext.nn.SCLALoss` (y in
    [0, K)). Returns the 0-d mean over the anchors with a positive; sets
    :attr:`last_prototypes` (K, d) (detached, zero rows for classes without
    one) to the prototypes it used. :meth:`prototypes` gives them for a batch
    without storing anything; :meth:`reset` empties the queue.
    """

    queue: Tensor
    queue_total: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        temperature: float = 0.1,
        queue_size: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SPCLLoss: expected num_classes >= 1, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"SPCLLoss: expected dim >= 1, got {dim!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"SPCLLoss: expected queue_size >= 1, got {queue_size!r}")
        self.temperature = _check_temperature("SPCLLoss", temperature)
        self.num_classes, self.dim, self.queue_size = num_classes, dim, queue_size
        self.register_buffer("queue", torch.zeros(num_classes, queue_size, dim, device=device, dtype=dtype))
        self.register_buffer("queue_total", torch.zeros(num_classes, dtype=torch.int64, device=device))
        self.last_prototypes: Tensor | None = None

    @torch.no_grad()
    def reset(self) -> None:
        """Empties the queue (every class back to no prototype)."""
        self.queue.zero_()
        self.queue_total.zero_()
        self.last_prototypes = None

    @torch.no_grad()
    def _pushed(self, f: Tensor | None, y: Tensor | None) -> tuple[Tensor, Tensor]:
        """The queue and totals after pushing the normalised rows of f (labels
        y), in f's dtype and on f's device, without storing them; f None: the
        queue as it is. Vectorised: no host round trip."""
        queue, total = self.queue, self.queue_total
        if f is None:
            return queue, total
        queue, total = queue.to(device=f.device, dtype=f.dtype), total.to(f.device)
        K, Q, d = self.num_classes, self.queue_size, self.dim
        M = f.shape[0]
        onehot = y[:, None] == torch.arange(K, device=f.device)  # (M, K)
        counts = onehot.sum(0)  # (K,) class-k anchors in this batch
        rank = onehot.cumsum(0).gather(1, y[:, None]).squeeze(1) - 1  # earlier same-class rows
        # Only a class's last Q rows of the batch survive; they land in slots
        # (total + rank) mod Q, distinct within a class. The others are sent to
        # one scratch row each past the end, so no two writes collide.
        keep = rank >= counts[y] - Q
        slot = torch.remainder(total[y] + rank, Q)
        index = torch.where(keep, y * Q + slot, K * Q + torch.arange(M, device=f.device))
        flat = torch.cat([queue.reshape(K * Q, d), queue.new_zeros(M, d)])
        flat.index_copy_(0, index, F.normalize(f.detach(), dim=1, eps=_NORM_EPS))
        return flat[: K * Q].view(K, Q, d), total + counts

    def _prototypes_from(self, queue: Tensor, total: Tensor) -> Tensor:
        """c_k = (sum of queue row k) / min(total_k, Q): the mean of the stored
        features (unused slots are 0); a zero row where total_k = 0."""
        count = total.clamp(max=self.queue_size, min=1).to(queue.dtype)
        return queue.sum(1) / count[:, None]

    def prototypes(self, f: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """The prototypes (K, d) ``forward(f, y)`` would use (the queue with
        the batch pushed), without storing anything; with no batch, those of
        the queue as it is. Detached."""
        if (f is None) != (y is None):
            raise ValueError("SPCLLoss.prototypes: expected both f and y, or neither")
        if f is not None:
            self._check_features(f, y)
        return self._prototypes_from(*self._pushed(f, y)).detach()

    def _check_features(self, f: Tensor, y: Tensor) -> None:
        _check_batch("SPCLLoss", f, y, None)
        if f.shape[1] != self.dim:
            raise ValueError(f"SPCLLoss: expected f of shape (M, {self.dim}) (dim={self.dim}), "
                             f"got {tuple(f.shape)}")
        _check_label_range("SPCLLoss", y, self.num_classes)

    def forward(self, f: Tensor, y: Tensor, f_aug: Tensor | Sequence[Tensor] | None = None) -> Tensor:
        self._check_features(f, y)
        f_aug = _check_batch("SPCLLoss", f, y, f_aug)
        queue, total = self._pushed(f, y)
        protos = self._prototypes_from(queue, total).detach()
        if self.training:  # the queue moves on only while training
            with torch.no_grad():
                self.queue.copy_(queue)
                self.queue_total.copy_(total)
        self.last_prototypes = protos
        return spcl_loss(f, f_aug, y, protos, self.temperature)

    def queued(self, k: int) -> Tensor:
        """Class k's stored features, oldest first (min(total_k, Q), d), for
        inspection (reads the total on the host)."""
        total, Q = int(self.queue_total[k]), self.queue_size
        if total <= Q:
            return self.queue[k, :total].clone()
        return torch.roll(self.queue[k], -(total % Q), 0)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}, "
                f"queue_size={self.queue_size}")
