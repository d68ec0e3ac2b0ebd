"""``DataSpec``: how a run's data was made, as one typed record.

``load_dataset`` returns a :class:`~cascla_ext.data.Corpus` whose ``spec``
says how it was loaded (the dataset, its folder, the synthetic seed, the
reader's options, the hold-out, and the :class:`FeatureOptions` as resolved:
the clue kind ``auto`` became, the fine-tuned encoder's folder, the media
extractors). ``train`` records ``spec.to_dict()`` in ``model.pt``,
``last.pt`` and ``metrics.json`` (under ``data``); ``cascla evaluate`` and
``predict`` read it back with :meth:`DataSpec.from_dict` and rebuild the
corpus from it (:meth:`DataSpec.load`). The dict is the format checkpoints
have always held, so checkpoints written before this record existed load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .prepare import FeatureOptions

__all__ = ["DataSpec"]

_NONE = type(None)
#: The entries of a recorded ``data`` dict, and the types each may have.
DATA_FIELDS = {
    "dataset": (str,), "data_seed": (int,), "data_dir": (str, _NONE), "features": (dict, _NONE),
    "reader_options": (dict,), "preset": (str, _NONE), "widths": (str, _NONE), "holdout": (float, _NONE),
    "config_file": (str, _NONE),
}
#: The entries of its ``features`` (FeatureOptions.to_dict()), and their types.
FEATURE_FIELDS = {
    "encoder": (str, _NONE), "clues": (str,), "atomic_dir": (str, _NONE), "comet": (str, _NONE),
    "finetune_encoder": (bool,), "finetune_epochs": (int,), "finetune_dir": (str, _NONE),
    "audio": (str, _NONE), "audio_sample_rate": (int,), "visual": (str, _NONE),
    "visual_weights": (str, _NONE), "visual_weights_sha256": (str, _NONE),
    "visual_frames": (int, _NONE), "visual_size": (int, _NONE), "media_extractors": (dict, _NONE),
}
#: Reader options that are never recorded (they are about trusting a file, not about the data).
UNRECORDED_READER_OPTIONS = ("unsafe_pickle",)


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in kinds)


@dataclass(frozen=True)
class DataSpec:
    """The data settings of a run.

    dataset: a name of ``cascla_ext.data.DATASETS``; data_seed: the synthetic
    corpus's seed; data_dir: the folder read (absolute) or None;
    features: the feature options as resolved (None: not known; a record
    read back without them gets the defaults, which made it);
    reader_options: the reader's recorded options (``text_layers``,
    ``media_dir``); holdout: the fraction of training dialogues set aside
    (seed 0) before any feature was extracted, or None. ``preset``,
    ``widths`` and ``config_file`` say which preset and file the run's
    config came from (the CLI fills them in; None otherwise).
    """

    dataset: str = "synthetic"
    data_seed: int = 0
    data_dir: str | None = None
    features: FeatureOptions | None = None
    reader_options: Mapping = field(default_factory=dict)
    holdout: float | None = None
    preset: str | None = None
    widths: str | None = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        # Its own copies: the options and reader options it was given may change later.
        if self.features is not None:
            object.__setattr__(self, "features", self.features.copy())
        object.__setattr__(self, "reader_options", {k: v for k, v in dict(self.reader_options).items()
                                                     if k not in UNRECORDED_READER_OPTIONS})

    def to_dict(self) -> dict:
        """The record as JSON types (what checkpoints and metrics.json hold under ``data``)."""
        out = {"dataset": self.dataset, "data_seed": self.data_seed, "data_dir": self.data_dir}
        if self.features is not None:
            out["features"] = self.features.to_dict()
        out.update(reader_options=dict(self.reader_options), preset=self.preset, widths=self.widths,
                   holdout=self.holdout)
        if self.config_file is not None:
            out["config_file"] = self.config_file
        return out

    @classmethod
    def from_dict(cls, values) -> DataSpec:
        """A record from a ``data`` dict, checked as untrusted data (a checkpoint
        is data, not instructions): a ValueError naming the entry if one is of
        the wrong type. Entries it does not know are ignored; missing ones take
        their defaults (older checkpoints hold fewer; without ``features``, the
        default feature options)."""
        from . import DATASETS

        if not isinstance(values, dict):
            raise ValueError(f"its 'data' entry is a {type(values).__name__}, expected a dict of data settings")
        for key, value in values.items():
            kinds = DATA_FIELDS.get(key)
            if kinds and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise ValueError(f"data[{key!r}] is {value!r}, expected {_names(kinds)}")
        if values.get("dataset") not in DATASETS:
            raise ValueError(f"data['dataset'] is {values.get('dataset')!r}, expected one of {', '.join(DATASETS)}")
        features = values.get("features")
        for key, value in (features or {}).items():
            kinds = FEATURE_FIELDS.get(key)
            if kinds is None:
                raise ValueError(f"data['features'] has an unknown entry {key!r}")
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"data['features'][{key!r}] is {value!r}, expected {_names(kinds)}")
        holdout = values.get("holdout")
        if holdout is not None and not 0.0 < holdout < 1.0:
            raise ValueError(f"data['holdout'] is {holdout!r}, expected a fraction in (0, 1)")
        known = {f.name for f in dataclasses.fields(cls)} - {"features"}
        # Recorded options may name a fine-tuned encoder to load, never a folder to write to. A record
        # without them (the oldest, or a hand-built corpus's) was made with the default options.
        return cls(**{k: v for k, v in values.items() if k in known},
                   features=FeatureOptions.from_dict(features or {}, may_finetune=False))

    def load(self, **load_options):
        """The corpus again, from this record alone (``load_options``: reader
        options that are never recorded, such as ``unsafe_pickle``)."""
        from . import load_dataset

        return load_dataset(self.dataset, seed=self.data_seed, data_dir=self.data_dir, features=self.features,
                            holdout=self.holdout, **self.reader_options, **load_options)
