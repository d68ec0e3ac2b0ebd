"""``SCLALoss``: the SCLA loss of the paper (section 3.3, Eqs. 10-18) with the
label embeddings it learns.

The label embeddings are z_k = Dropout(ReLU(W_g ReLU(Emb(k)) + b_g))
(Eqs. 10-11); the loss is :func:`cascla_ext.ops.scla_loss` between the
utterance features and them, with the augmented views (textual features
f_(t), adversarial features f^r) as extra positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from ._backend import OpBackend

__all__ = ["NORMALIZATIONS", "SCLALoss", "balanced_scale"]

#: Readings of Eq. 18's scale: the paper's as written, or normalised (see SCLALoss).
NORMALIZATIONS = ("literal", "balanced")



class SCLALoss(OpBackend, nn.Module):
    """Supervised contrastive loss between features and learned label embeddings.

    Args:
        num_classes: K, the number of emotion classes.
        dim: d, the width of the features (and of the label embeddings).
        embedding_dim: d_e, the width of Emb(k) (Eq. 11). The paper does not
            give it; default: ``dim``.
        dropout: the dropout on z (Eq. 10). The paper does not give it;
            default 0.1.
        alpha, beta: positive and negative focusing parameters (paper: 2.0, 0.5).
        gamma: exponent of the class-frequency weights (M / n_c)^gamma (paper:
            one of 0.5, 1.0, 1.5; default 1.0).
        reduction: "mean" (default: the sum of Eq. 18 divided by M), "sum"
            (Eq. 18 as written) or "none" (the M per-utterance losses).
        normalization: "literal" (default here: Eq. 18 as the op computes it)
            or "balanced": the class weights (M / n_c)^gamma divided by their
            mean over the batch (mean 1, same relative emphasis on rare
            classes; literally they average to the number of classes
            present), and each anchor's loss divided by its 1 + P views
            (literally it grows with every augmented positive). The balanced
            loss is the literal one times 1 / (mean_i w_i * (1 + P)), a
            factor computed on the device from y (no host round trip). It
            keeps the term near the cross-entropy's scale, so lambda = 1
            trains well (docs/objective.md has the numbers). ``CaSCLA``
            defaults to "balanced".
        backend: "fused" (the C++/CUDA op, default) or "reference" (pure
            PyTorch with the M x M covariances, for debugging).
        scope: in a ``torch.distributed`` run, "local" (each rank's own
            anchors) or "global" (the union of all ranks' anchors:
            :func:`cascla_ext.distributed.scla_loss_global` and
            ``balanced_scale_global``, with the dropout mask on z drawn on
            rank 0 and broadcast, so z is the same on every rank; docs/distributed.md).
            Without a process group of several ranks, both are the local loss.

    ``forward(f, y, f_aug=None)``: f (M, d) features of the valid utterances,
    y (M,) their labels in [0, K), f_aug None, a (P, M, d) tensor or a
    sequence of P (M, d) tensors (e.g. ``[f_text, f_adv]``). Returns the loss.

    The embeddings: :meth:`label_embeddings` gives z as ``forward`` uses it
    (with dropout in training mode); :attr:`embeddings` gives z without
    dropout and detached, for analysis.
    """

    _OPS = {"fused": ops.scla_loss, "reference": reference.scla_loss}

    def __init__(
        self,
        num_classes: int,
        dim: int,
        embedding_dim: int | None = None,
        dropout: float = 0.1,
        alpha: float = 2.0,
        beta: float = 0.5,
        gamma: float = 1.0,
        reduction: str = "mean",
        normalization: str = "literal",
        backend: str = "fused",
        scope: str = "local",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        embedding_dim = dim if embedding_dim is None else embedding_dim
        if num_classes < 1:
            raise ValueError(f"SCLALoss: expected num_classes >= 1, got {num_classes}")
        if dim < 2:
            raise ValueError(f"SCLALoss: expected dim >= 2 (covariances divide by dim - 1), got {dim}")
        if embedding_dim < 1:
            raise ValueError(f"SCLALoss: expected embedding_dim >= 1, got {embedding_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SCLALoss: expected dropout in [0, 1), got {dropout}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"SCLALoss: expected alpha >= 0 and beta >= 0, got {alpha}, {beta}")
        if reduction not in ("none", "sum", "mean"):
            raise ValueError(f"SCLALoss: expected reduction 'none', 'sum' or 'mean', got {reduction!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"SCLALoss: expected normalization 'literal' or 'balanced', got {normalization!r}")
        self.backend = backend
        if scope not in ("local", "global"):
            raise ValueError(f"SCLALoss: expected scope 'local' or 'global', got {scope!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_classes, self.dim, self.embedding_dim = num_classes, dim, embedding_dim
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.reduction, self.normalization = reduction, normalization
        self.scope = scope
        self.group = None  # the process group of the global scope (None: the default one)
        self.embedding = nn.Embedding(num_classes, embedding_dim, **factory)  # Emb (Eq. 11)
        self.proj = nn.Linear(embedding_dim, dim, **factory)  # W_g, b_g (Eq. 10)
        self.dropout = nn.Dropout(dropout)

    def label_embeddings(self) -> Tensor:
        """z (K, dim) = Dropout(ReLU(W_g ReLU(Emb(k)) + b_g)), as forward uses it."""
        e = F.relu(self.embedding.weight)
        z = F.relu(self.proj(e))
        p = self.dropout.p
        if self._global() and self.training and p > 0:
            # One mask for every rank (rank 0's draw): z must be replicated.
            import torch.distributed as dist

            keep = torch.empty_like(z, requires_grad=False).bernoulli_(1 - p)
            dist.broadcast(keep, src=0, group=self.group)
            return z * keep / (1 - p)
        return self.dropout(z)

    def _global(self) -> bool:
        """The global scope in a run of several ranks."""
        if self.scope != "global":
            return False
        from ..distributed import is_distributed

        return is_distributed()

    @property
    def embeddings(self) -> Tensor:
        """z (K, dim) without dropout, detached: for analysis (e.g. similarity to features)."""
        with torch.no_grad():
            return F.relu(self.proj(F.relu(self.embedding.weight))).detach()

    def forward(self, f: Tensor, y: Tensor, f_aug: Tensor | Sequence[Tensor] | None = None) -> Tensor:
        if f_aug is not None and not isinstance(f_aug, Tensor):
            f_aug = torch.stack(list(f_aug)) if len(f_aug) else None
        z = self.label_embeddings().to(f.dtype)
        views = 0 if f_aug is None else f_aug.shape[0]
        if self._global():
            from ..distributed import balanced_scale_global, scla_loss_global

            loss = scla_loss_global(f, f_aug, z, y, self.alpha, self.beta, self.gamma, self.reduction,
                                    group=self.group)
            if self.normalization == "balanced":
                loss = loss * balanced_scale_global(y, self.num_classes, self.gamma, views, group=self.group,
                                                    dtype=loss.dtype)
            return loss
        loss = self.op(f, f_aug, z, y, self.alpha, self.beta, self.gamma, self.reduction)
        if self.normalization == "balanced":
            loss = loss * balanced_scale(y, self.num_classes, self.gamma, views, f.dtype)
        return loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, embedding_dim={self.embedding_dim}, "
                f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, reduction={self.reduction!r}, "
                f"normalization={self.normalization!r}, backend={self.backend!r}, scope={self.scope!r}")


def balanced_scale(y: Tensor, num_classes: int, gamma: float, num_views: int, dtype: torch.dtype) -> Tensor:
    """1 / (mean_i (M / n_{y_i})^gamma * (1 + P)): the factor that turns Eq.
    18's loss into the balanced reading (``SCLALoss(normalization="balanced")``).
    A 0-d tensor on y's device, computed without a host round trip."""
    M = y.numel()
    # Counted by comparison, not torch.bincount: on CUDA bincount reads y's
    # min and max back to size its output (a host sync). (M, K) booleans are small.
    counts = (y.unsqueeze(1) == torch.arange(num_classes, device=y.device)).sum(0).to(dtype)
    weights = (M / counts[y]) ** gamma
    return 1.0 / (weights.mean() * (1 + num_views))
