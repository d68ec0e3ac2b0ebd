"""Datasets: dialogues with per-utterance features, speakers, labels and clues."""

from __future__ import annotations

from dataclasses import dataclass

from .batch import CLUE_RELATIONS, MODALITIES, MODALITY_NAMES, Batch, Dialogue, collate
from .prepare import FeatureOptions, prepare_corpus, prepare_dialogues
from .raw import DataError, RawCorpus, RawDialogue, holdout_indices
from .synthetic import make_synthetic

__all__ = [
    "CLUE_RELATIONS", "DATASETS", "MODALITIES", "MODALITY_NAMES", "Batch", "Corpus", "DataError",
    "Dialogue", "FeatureOptions", "RawCorpus", "RawDialogue", "collate", "load_dataset",
    "make_synthetic", "prepare_corpus", "prepare_dialogues",
]

#: ``synthetic`` is built in; the others are read from ``data_dir`` (docs/data-formats.md).
DATASETS = ("synthetic", "meld", "iemocap", "cosmic", "jsonl")


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

    def class_prior(self, split: str = "train") -> tuple[float, ...]:
        """The label frequencies of ``split`` (labelled utterances only), in label order."""
        counts = [0] * len(self.label_names)
        for d in self.split(split):
            for y in d.labels:
                if y >= 0:
                    counts[int(y)] += 1
        total = sum(counts)
        if not total:
            raise ValueError(f"dataset {self.name}: the {split} split has no labelled utterance")
        return tuple(c / total for c in counts)

    def with_holdout(self, fraction: float = 0.1, seed: int = 0) -> Corpus:
        """A copy whose split ``holdout`` is a deterministic ``fraction`` of the
        training dialogues (removed from ``train``): a selection split that
        leaves ``val`` untouched for reporting."""
        train = self.split("train")
        held = holdout_indices(len(train), fraction, seed, self.name)
        splits = dict(self.splits)
        splits["train"] = [d for i, d in enumerate(train) if i not in held]
        splits["holdout"] = [d for i, d in enumerate(train) if i in held]
        return Corpus(self.name, splits, self.label_names, self.input_dims, self.clue_dim)


def load_dataset(name: str, *, seed: int = 0, data_dir: str | None = None,
                 features: FeatureOptions | None = None, holdout: float | None = None,
                 **reader_options) -> Corpus:
    """Load a dataset by name.

    ``synthetic``: the built-in corpus (``seed`` picks it). ``meld``,
    ``iemocap``, ``cosmic``, ``jsonl``: read from ``data_dir``, with text
    features and clues extracted as ``features`` says (and cached).
    ``holdout``: a fraction of the training dialogues to move to a
    ``holdout`` split (seed 0) before any feature is extracted, so that a
    fine-tuned encoder (``features.finetune_encoder``) does not train on it.
    """
    if name == "synthetic":
        from .synthetic import LABELS

        splits = make_synthetic(seed)
        first = splits["train"][0]
        for dialogues in splits.values():
            for d in dialogues:
                d.validate()
        corpus = Corpus(name=name, splits=splits, label_names=list(LABELS),
                        input_dims={m: x.shape[1] for m, x in first.features.items()},
                        clue_dim=first.clues.shape[2])
        return corpus.with_holdout(holdout, seed=0) if holdout else corpus
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {name} is read from files: pass data_dir (--data-dir)")
    from .readers import read_raw

    raw = read_raw(name, data_dir, **reader_options)
    if holdout:
        raw = raw.with_holdout(holdout, seed=0)
    return prepare_corpus(raw, features or FeatureOptions())
