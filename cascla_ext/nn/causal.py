"""``CausalInteraction``: CauAIN's two-step causal-aware interaction, as CaSCLA
uses it (paper section 3.2, Eqs. 8-9; spec ``model.md`` item 5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dropout import BatchDropout

__all__ = ["CausalInteraction", "causal_masks"]


def causal_masks(speakers: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Which utterances j may cause utterance i, as (B, T, T) bool masks [b, i, j].

    intra: j <= i and the same speaker; inter: j < i and another speaker. Both
    only between real utterances (``mask``).
    """
    T = speakers.shape[1]
    idx = torch.arange(T, device=speakers.device)
    before_or_self = idx.view(T, 1) >= idx.view(1, T)            # [i, j]: j <= i
    strictly_before = idx.view(T, 1) > idx.view(1, T)            # [i, j]: j < i
    same = speakers.unsqueeze(2) == speakers.unsqueeze(1)        # [b, i, j]
    real = mask.unsqueeze(2) & mask.unsqueeze(1)
    intra = before_or_self & same & real
    inter = strictly_before & ~same & real
    return intra, inter


class _Step(nn.Module):
    """One step (intra or inter): retrieve clues, score, trace back."""

    def __init__(self, d_context: int, d_scale: int) -> None:
        super().__init__()
        self.f_q = nn.Linear(d_context, d_context)
        self.f_k = nn.Linear(d_context, d_context)
        self.f_e = nn.Linear(d_context, d_context)   # clue -> key space
        self.f_v = nn.Linear(d_context, d_context)
        self.f_ev = nn.Linear(d_context, d_context)  # clue -> value space
        self.scale = 1.0 / math.sqrt(d_scale)

    def clue_terms(self, clue: Tensor) -> tuple[Tensor, Tensor]:
        """f_e(clue) and f_ev(clue): the parts of the keys and values that do not depend on h."""
        return self.f_e(clue), self.f_ev(clue)

    def forward(self, h: Tensor, clue_terms: tuple[Tensor, Tensor], allowed: Tensor) -> Tensor:
        key_clue, value_clue = clue_terms
        keys = self.f_k(h) + key_clue                                  # (B, T, d)
        scores = torch.einsum("bid,bjd->bij", self.f_q(h), keys) * self.scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        # Rows with no allowed j get all-zero weights (not NaN, not uniform).
        weights = torch.softmax(scores, dim=-1) * allowed
        return torch.einsum("bij,bjd->bid", weights, self.f_v(h) + value_clue)


class CausalInteraction(nn.Module):
    """Causal-aware features f_i from context h (B, T, 2 d_h) and clues.

    Step 1 (intra): s[i, j] = f_q(h_i) . (f_k(h_j) + f_e(Clue_intra_j)) / sqrt(d_h)
    over j <= i of the same speaker; step 2 (inter): likewise with Clue_inter
    over j < i of other speakers. Each step's softmax weights aggregate
    f_v(h_j) + f_e'(Clue_j) (a row with no allowed j gives zeros). Then
    f_i = Linear([h_i; intra_i; inter_i]) -> d_out.

    ``clue_intra`` / ``clue_inter``: (B, T, 2 d_h), already projected from the
    three raw clue vectors of each kind (the model does that projection).
    Utterance i's output depends on utterances j > i only through h (the
    bidirectional GRU), never through the interaction.
    """

    def __init__(self, d_context: int, d_out: int, d_hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.intra = _Step(d_context, d_hidden or d_context // 2)
        self.inter = _Step(d_context, d_hidden or d_context // 2)
        self.out = nn.Linear(3 * d_context, d_out)
        self.dropout = BatchDropout(dropout)

    def forward(self, h: Tensor, clue_intra: Tensor, clue_inter: Tensor, speakers: Tensor,
                mask: Tensor) -> Tensor:
        return self.apply_prepared(h, self.prepare(clue_intra, clue_inter, speakers, mask))

    def prepare(self, clue_intra: Tensor, clue_inter: Tensor, speakers: Tensor, mask: Tensor) -> tuple:
        """Everything that does not depend on h: the causal masks and the clues'
        key and value terms. A model that runs the interaction on several
        views of the same batch (CaSCLA: clean, adversarial, textual)
        computes this once and calls :meth:`apply_prepared` per view."""
        intra_mask, inter_mask = causal_masks(speakers, mask)
        return (self.intra.clue_terms(clue_intra), intra_mask), (self.inter.clue_terms(clue_inter), inter_mask)

    def apply_prepared(self, h: Tensor, prepared: tuple) -> Tensor:
        """The interaction of context h with what :meth:`prepare` returned (= ``forward``)."""
        (intra_terms, intra_mask), (inter_terms, inter_mask) = prepared
        intra = self.intra(h, intra_terms, intra_mask)
        inter = self.inter(h, inter_terms, inter_mask)
        return self.out(self.dropout(torch.cat([h, intra, inter], dim=-1)))
