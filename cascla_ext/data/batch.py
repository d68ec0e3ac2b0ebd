"""Dialogues, padded batches, and the collate function that makes one from the other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..modalities import MODALITIES, MODALITY_NAMES  # noqa: F401 - re-exported by cascla_ext.data
CLUE_RELATIONS = ("xReact", "xEffect", "xWant", "oReact", "oEffect", "oWant")  # 3 intra, then 3 inter
#: The kinds of clues an extractor makes (``cascla_ext.features.clue_extractor``); the
#: ``--clues`` choices add ``auto`` (``FeatureOptions``), which may resolve to ``data``.
CLUE_KINDS = ("atomic", "comet", "none")


@dataclass
class Dialogue:
    """One conversation: per-utterance features, speakers, labels and causal clues.

    features: modality ("t", "a", "v") -> (n, d_m) float32 array.
    speakers: (n,) int speaker index within the dialogue.
    labels: (n,) int label index, -1 where unknown.
    clues: (n, 6, d_c) float32: xReact, xEffect, xWant, oReact, oEffect, oWant
        (the intra-cause clues first, then the inter-cause ones), or None.
    """

    id: str
    features: dict[str, np.ndarray]
    speakers: np.ndarray
    labels: np.ndarray
    clues: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.speakers)

    def validate(self) -> None:
        n = len(self.speakers)
        if n == 0:
            raise ValueError(f"dialogue {self.id}: no utterances")
        for m, x in self.features.items():
            if x.ndim != 2 or x.shape[0] != n:
                raise ValueError(f"dialogue {self.id}: {MODALITY_NAMES.get(m, m)} features have shape "
                                 f"{x.shape}, expected ({n}, d) for its {n} utterances")
        if self.labels.shape != (n,):
            raise ValueError(f"dialogue {self.id}: {self.labels.shape[0]} labels for {n} utterances")
        if self.clues is not None and (self.clues.ndim != 3 or self.clues.shape[:2] != (n, 6)):
            raise ValueError(f"dialogue {self.id}: clues have shape {self.clues.shape}, expected ({n}, 6, d_c)")


class GlobalLayout(NamedTuple):
    """Where a rank's batch sits in the global batch of a distributed step:
    its dialogues are rows ``rows`` of the global batch of ``size``
    dialogues, which pads to ``length`` utterances. Dropout draws the global
    batch's masks and keeps these rows (:mod:`cascla_ext.nn.dropout`)."""

    rows: slice
    size: int
    length: int


@dataclass
class Batch:
    """B dialogues padded to T utterances.

    features: modality -> (B, T, d_m); speakers (B, T) (-1 at padding); mask (B, T)
    bool, True on real utterances; clues (B, T, 6, d_c) or None; labels (B, T)
    (-1 at padding and where unknown) or None; lengths (B,) on the CPU.

    valid_index (M,) int64 or None: the flat indices (into B * T, row-major)
    of the labelled real utterances (mask & labels >= 0), which :meth:`to`
    derives from CPU labels before moving them. With it the model selects
    those utterances with ``index_select`` and knows M on the host, so a
    training step on a GPU reads nothing back (boolean indexing and
    ``int(valid.sum())`` would be host syncs). None: the model derives the
    selection itself. Whoever changes ``labels`` or ``mask`` of a batch that
    has one must drop it (``dataclasses.replace(batch, valid_index=None)``).

    global_layout: in a distributed training step, where this rank's
    dialogues sit in the global batch (:class:`GlobalLayout`, set by the
    training loop), so that dropout draws the global batch's masks; None:
    the batch is the global batch. A batch with other rows must drop it.
    """

    features: dict[str, Tensor]
    speakers: Tensor
    mask: Tensor
    lengths: Tensor
    clues: Tensor | None = None
    labels: Tensor | None = None
    ids: list[str] = field(default_factory=list)
    valid_index: Tensor | None = None
    global_layout: GlobalLayout | None = None

    def to(self, device: torch.device | str) -> Batch:
        index = self.valid_index
        if index is None and self.labels is not None and self.labels.device.type == "cpu" \
                and self.mask.device.type == "cpu":
            index = (self.mask & (self.labels >= 0)).flatten().nonzero().squeeze(1)
        return replace(
            self,
            valid_index=None if index is None else index.to(device),
            features={m: x.to(device) for m, x in self.features.items()},
            speakers=self.speakers.to(device),
            mask=self.mask.to(device),
            clues=None if self.clues is None else self.clues.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]


def collate(dialogues: Sequence[Dialogue], modalities: Sequence[str] | None = None) -> Batch:
    """Pad dialogues of different lengths into one Batch (zeros, speaker -1, label -1)."""
    if not dialogues:
        raise ValueError("collate: expected at least one dialogue")
    modalities = list(modalities or dialogues[0].features)
    B, T = len(dialogues), max(len(d) for d in dialogues)
    lengths = torch.tensor([len(d) for d in dialogues], dtype=torch.int64)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    features = {}
    for m in modalities:
        dim = dialogues[0].features[m].shape[1]
        x = torch.zeros(B, T, dim)
        for b, d in enumerate(dialogues):
            x[b, : len(d)] = torch.from_numpy(np.asarray(d.features[m], dtype=np.float32))
        features[m] = x
    speakers = torch.full((B, T), -1, dtype=torch.int64)
    labels = torch.full((B, T), -1, dtype=torch.int64)
    for b, d in enumerate(dialogues):
        speakers[b, : len(d)] = torch.from_numpy(np.asarray(d.speakers, dtype=np.int64))
        labels[b, : len(d)] = torch.from_numpy(np.asarray(d.labels, dtype=np.int64))
    clues = None
    if all(d.clues is not None for d in dialogues):
        dc = dialogues[0].clues.shape[2]
        clues = torch.zeros(B, T, 6, dc)
        for b, d in enumerate(dialogues):
            clues[b, : len(d)] = torch.from_numpy(np.asarray(d.clues, dtype=np.float32))
    return Batch(features=features, speakers=speakers, mask=mask, lengths=lengths, clues=clues,
                 labels=labels, ids=[d.id for d in dialogues])
