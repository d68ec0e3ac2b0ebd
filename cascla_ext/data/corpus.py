"""``Corpus``: the prepared splits of one dataset, what the model needs to
know about them (labels, feature widths), and how they were made (its
:class:`~cascla_ext.data.spec.DataSpec`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..modalities import MODALITIES
from .batch import Dialogue
from .raw import DataError, split_holdout

if TYPE_CHECKING:
    from .spec import DataSpec

__all__ = ["Corpus", "feature_widths"]


def feature_widths(dialogues: Sequence[Dialogue], name: str) -> tuple[dict[str, int], int]:
    """The feature width of each modality and the clue width of ``dialogues``
    (all must agree: a DataError naming the dialogue otherwise). The one place
    feature widths are computed (load_dataset, prepare_corpus, cascla predict)."""
    if not dialogues:
        raise DataError(f"{name}: no dialogues")
    first = dialogues[0]
    dims = {m: x.shape[1] for m, x in first.features.items()}
    for d in dialogues:
        for m, x in d.features.items():
            if dims.get(m) != x.shape[1]:
                raise DataError(f"{name}: dialogue {d.id} has {m} features of width {x.shape[1]}, "
                                f"others have {dims.get(m)}")
    return dims, first.clues.shape[2]


@dataclass
class Corpus:
    """Splits of one dataset and what the model needs to know about it.

    ``spec``: how it was loaded (dataset, folder, feature options as
    resolved, hold-out ...), set by :func:`~cascla_ext.data.load_dataset`;
    None for a corpus built by hand."""

    name: str
    splits: dict[str, list[Dialogue]]
    label_names: list[str]
    input_dims: dict[str, int]
    clue_dim: int
    spec: DataSpec | None = None

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

    def pick_modalities(self, wanted: Iterable[str] | None = None) -> tuple[str, ...]:
        """``wanted`` (default: every modality the corpus has, in ring order),
        checked against the corpus's features."""
        modalities = tuple(wanted or ()) or tuple(m for m in MODALITIES if m in self.input_dims)
        missing = [m for m in modalities if m not in self.input_dims]
        if missing:
            raise ValueError(f"dataset {self.name} has no {', '.join(missing)} features "
                             f"(it has: {', '.join(self.input_dims)})")
        return modalities

    def config_fields(self, modalities: Sequence[str]) -> dict:
        """The CaSCLAConfig fields the data decides, for a model of these modalities."""
        return dict(num_classes=len(self.label_names), modalities=tuple(modalities),
                    input_dims={m: self.input_dims[m] for m in modalities}, clue_dim=self.clue_dim,
                    class_prior=self.class_prior("train"))

    def with_holdout(self, fraction: float = 0.1, seed: int = 0) -> Corpus:
        """A copy whose split ``holdout`` is a deterministic ``fraction`` of the
        training dialogues (removed from ``train``): a selection split that
        leaves ``val`` untouched for reporting."""
        self.split("train")
        # load_dataset sets a hold-out aside with seed 0: only then can the spec rebuild it
        spec = replace(self.spec, holdout=fraction) if self.spec is not None and seed == 0 else None
        return replace(self, splits=split_holdout(self.splits, fraction, seed, self.name), spec=spec)
