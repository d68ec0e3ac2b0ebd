"""Datasets: dialogues with per-utterance features, speakers, labels and clues."""

from __future__ import annotations

from dataclasses import dataclass

from .batch import CLUE_RELATIONS, MODALITIES, MODALITY_NAMES, Batch, Dialogue, collate
from .synthetic import make_synthetic

__all__ = [
    "CLUE_RELATIONS", "DATASETS", "MODALITIES", "MODALITY_NAMES", "Batch", "Corpus", "Dialogue",
    "collate", "load_dataset", "make_synthetic",
]

DATASETS = ("synthetic",)


@dataclass
class Corpus:
    """Splits of one dataset and what the model needs to know about it."""

    name: str
    splits: dict[str, list[Dialogue]]
    label_names: list[str]
    input_dims: dict[str, int]
    clue_dim: int

    def split(self, name: str) -> list[Dialogue]:
        if name not in self.splits or not self.splits[name]:
            have = ", ".join(s for s, d in self.splits.items() if d)
            raise ValueError(f"dataset {self.name} has no split {name!r} (it has: {have})")
        return self.splits[name]


def load_dataset(name: str, *, seed: int = 0) -> Corpus:
    """Load a dataset by name. ``synthetic``: the built-in corpus (``seed`` picks it)."""
    if name == "synthetic":
        from .synthetic import LABELS

        splits = make_synthetic(seed)
        first = splits["train"][0]
        for dialogues in splits.values():
            for d in dialogues:
                d.validate()
        return Corpus(name=name, splits=splits, label_names=list(LABELS),
                      input_dims={m: x.shape[1] for m, x in first.features.items()},
                      clue_dim=first.clues.shape[2])
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
