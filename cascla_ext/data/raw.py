"""Raw dialogues as the dataset readers return them: text, speakers and label
names per utterance (and, for feature pickles, pre-extracted features and
clues), before feature extraction turns them into model-ready ``Dialogue``s.

Every reader (``meld``, ``iemocap``, ``cosmic``, ``jsonl``) returns a
``RawCorpus``; ``cascla_ext.data.load_dataset`` extracts what is missing
(text features with an encoder, causal clues) and builds the ``Corpus``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["DataError", "HOLDOUT", "RawCorpus", "RawDialogue", "SPLITS", "holdout_indices", "split_holdout"]

SPLITS = ("train", "val", "test")
#: A selection split carved out of the training dialogues (``with_holdout``).
HOLDOUT = "holdout"


def holdout_indices(n_train: int, fraction: float, seed: int, name: str) -> set[int]:
    """The positions of the training dialogues that a hold-out of ``fraction``
    takes (deterministic in ``seed``); the same rule for raw and prepared corpora."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    n = max(1, round(fraction * n_train))
    if n >= n_train:
        raise ValueError(f"dataset {name}: {n_train} training dialogues are too few to hold some out")
    return set(np.random.default_rng(seed).permutation(n_train)[:n].tolist())


def split_holdout(splits: dict[str, list], fraction: float, seed: int, name: str) -> dict[str, list]:
    """``splits`` with a ``holdout`` split of ``fraction`` of the training
    dialogues (removed from ``train``; :func:`holdout_indices`). What both
    ``RawCorpus.with_holdout`` and ``Corpus.with_holdout`` do."""
    train = splits.get("train") or []
    held = holdout_indices(len(train), fraction, seed, name)
    out = dict(splits)
    out["train"] = [d for i, d in enumerate(train) if i not in held]
    out[HOLDOUT] = [d for i, d in enumerate(train) if i in held]
    return out


class DataError(ValueError):
    """Bad data: the message names the file, the row or dialogue, and what was wrong."""


@dataclass
class RawDialogue:
    """One conversation as read from disk.

    texts: the utterances' text ("" where a feature pickle has no text).
    speakers: speaker names as in the file (``Dialogue.speakers`` numbers them
        in order of first appearance within the dialogue).
    labels: label names, None where unknown (e.g. a JSONL file for prediction).
    features: pre-extracted features, modality ("t", "a", "v") -> (n, d) float32.
    clues: pre-extracted clues (n, 6, d_c) in ``CLUE_RELATIONS`` order, or None.
    meta: anything else worth keeping (utterance ids, source rows, ...).
    """

    id: str
    texts: list[str]
    speakers: list[str]
    labels: list[str | None]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    clues: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class RawCorpus:
    """A dataset's splits ("train", "val", "test" and, after :meth:`with_holdout`,
    "holdout"; absent splits are empty lists)."""

    name: str
    label_names: list[str]
    splits: dict[str, list[RawDialogue]]
    source: str = ""  # where it was read from, for messages and cache keys

    def dialogues(self) -> list[RawDialogue]:
        return [d for s in (*SPLITS, HOLDOUT) for d in self.splits.get(s, [])]

    def with_holdout(self, fraction: float = 0.1, seed: int = 0) -> RawCorpus:
        """A copy whose ``holdout`` split is ``fraction`` of the training
        dialogues (removed from ``train``). Done before feature extraction, a
        fine-tuned encoder never sees the hold-out that selects the best epoch."""
        return RawCorpus(self.name, self.label_names, split_holdout(self.splits, fraction, seed, self.name),
                         self.source)
