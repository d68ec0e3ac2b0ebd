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

__all__ = ["DataError", "RawCorpus", "RawDialogue", "SPLITS"]

SPLITS = ("train", "val", "test")


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
    """A dataset's splits ("train", "val", "test"; absent splits are empty lists)."""

    name: str
    label_names: list[str]
    splits: dict[str, list[RawDialogue]]
    source: str = ""  # where it was read from, for messages and cache keys

    def dialogues(self) -> list[RawDialogue]:
        return [d for s in SPLITS for d in self.splits.get(s, [])]
