"""Datasets: dialogues with per-utterance features, speakers, labels and clues."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .batch import CLUE_RELATIONS, MODALITIES, MODALITY_NAMES, Batch, Dialogue, GlobalLayout, collate
from .corpus import Corpus, feature_widths
from .prepare import FeatureOptions, prepare_corpus, prepare_dialogues
from .raw import DataError, RawCorpus, RawDialogue
from .spec import DataSpec
from .synthetic import make_synthetic

__all__ = [
    "CLUE_RELATIONS", "DATASETS", "MODALITIES", "MODALITY_NAMES", "Batch", "Corpus", "DataError", "DataSpec",
    "Dialogue", "FeatureOptions", "GlobalLayout", "RawCorpus", "RawDialogue", "collate", "feature_widths",
    "load_dataset", "make_synthetic", "prepare_corpus", "prepare_dialogues",
]

#: ``synthetic`` is built in; the others are read from ``data_dir`` (docs/data-formats.md).
DATASETS = ("synthetic", "meld", "iemocap", "cosmic", "jsonl")


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

    The corpus's ``spec`` (:class:`DataSpec`) records all of this, with the
    feature options as resolved (``features`` itself is not changed), so that
    ``spec.load()`` builds the same corpus again.
    """
    if name == "synthetic":
        from .synthetic import LABELS, SyntheticSpec

        unknown = sorted(set(reader_options) - {"shift"})
        if unknown:
            raise ValueError(f"dataset synthetic: unknown options {unknown}; it takes shift (SyntheticSpec.shift)")
        shift = reader_options.get("shift") or 0.0
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift >= 0:
            raise ValueError(f"dataset synthetic: shift must be a number >= 0, got {shift!r}")
        reader_options = {"shift": float(shift)} if shift else {}
        splits = make_synthetic(seed, SyntheticSpec(shift=float(shift))) if shift else make_synthetic(seed)
        for dialogues in splits.values():
            for d in dialogues:
                d.validate()
        dims, clue_dim = feature_widths(splits["train"], name)
        corpus = Corpus(name=name, splits=splits, label_names=list(LABELS), input_dims=dims, clue_dim=clue_dim)
        corpus = corpus.with_holdout(holdout, seed=0) if holdout else corpus
        return replace(corpus, spec=DataSpec(name, data_seed=seed, features=features or FeatureOptions(),
                                             reader_options=reader_options, holdout=holdout or None))
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {name} is read from files: pass data_dir (--data-dir)")
    from .readers import read_raw

    raw = read_raw(name, data_dir, **reader_options)
    if holdout:
        raw = raw.with_holdout(holdout, seed=0)
    corpus = prepare_corpus(raw, features or FeatureOptions())
    return replace(corpus, spec=replace(corpus.spec, dataset=name, data_seed=seed, data_dir=str(Path(data_dir).resolve()),
                                        reader_options=reader_options, holdout=holdout or None))
