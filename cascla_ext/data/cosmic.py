"""COSMIC / CauAIN feature pickles -> ``RawCorpus`` with the features and
COMET clues already in place (nothing is re-extracted).

Two files per dataset (``meld`` or ``iemocap``), in one directory:

- ``<dataset>_features_roberta.pkl`` (COSMIC; CauAIN's
  ``<dataset>_features_roberta_cause_effect.pkl`` is found too): a list of
  per-dialogue dicts and split id lists. The layouts understood are in
  ``LAYOUTS`` and docs/data-formats.md; which one a file has is told from
  its number of items and what they hold.
- ``<dataset>_features_comet.pkl`` (optional): COMET's ATOMIC relations, a
  list of 9 dicts in the order xIntent, xAttr, xNeed, xWant, xEffect,
  xReact, oWant, oEffect, oReact (or a dict keyed by relation name), each
  dialogue id -> n vectors of 768. Six of them become ``RawDialogue.clues``
  (n, 6, 768) in ``CLUE_RELATIONS`` order.

Security: both pickles are read as data only (``safe_pickle.load_pickle``):
strings, numbers, lists, dicts, sets and numpy arrays (no object arrays)
load, any other global a file names is refused with a DataError naming the
file and the global, and a corrupt file is one DataError with memory bounded
by its size. ``unsafe_pickle=True`` unpickles with plain ``pickle.load``,
which runs whatever code the files name: only for files you trust.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from .batch import CLUE_RELATIONS
from .iemocap import IEMOCAP_LABELS, check_split_ids, id_sort_key, is_hashable, label_names_of, ordered_ids
from .meld import MELD_LABELS, normalize_text
from .raw import SPLITS, DataError, RawCorpus, RawDialogue
from .safe_pickle import load_pickle

__all__ = [
    "ATOMIC_RELATIONS", "COSMIC_DATASETS", "LAYOUTS", "TEXT_LAYERS", "VAL_FRACTION", "VAL_SEED", "Layout",
    "detect_layout", "hold_out", "read_cosmic",
]

#: Dataset -> label names in the order of the pickles' label ints.
COSMIC_DATASETS = {"meld": MELD_LABELS, "iemocap": IEMOCAP_LABELS}
#: The order of the 9 dicts in COSMIC's COMET pickle.
ATOMIC_RELATIONS = ("xIntent", "xAttr", "xNeed", "xWant", "xEffect", "xReact", "oWant", "oEffect", "oReact")
#: Accepted ``text_layers`` values.
TEXT_LAYERS = ("mean", "concat", "1", "2", "3", "4")
#: Without validation ids, this fraction of the train dialogues becomes "val" (Generator(VAL_SEED)).
VAL_FRACTION = 0.1
VAL_SEED = 0

_ROBERTA_NAMES = ("{}_features_roberta.pkl", "{}_features_roberta_cause_effect.pkl")
_COMET_NAME = "{}_features_comet.pkl"


@dataclass(frozen=True)
class Layout:
    """The items of one feature pickle, by position.

    Field names: ``ids`` (utterance ids per dialogue), ``speakers``,
    ``labels``, ``t1``..``t4`` (text feature sets) or ``t`` (one set), ``a``
    (audio), ``v`` (visual), ``sentences``, ``train``/``test``/``valid``
    (dialogue id lists); ``_`` marks an item that is not read (sentiment
    labels, CauAIN's cause-effect masks).
    """

    name: str
    fields: tuple[str, ...]

    @property
    def text_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.fields if f in ("t", "t1", "t2", "t3", "t4"))


_T4 = ("t1", "t2", "t3", "t4")
_CAUSE_EFFECT = ("_", "_", "_", "_")  # inter/intra cause-effect masks and position indices
#: Known layouts, tried in this order among those with the right number of items.
LAYOUTS = (
    Layout("cosmic-iemocap", ("speakers", "labels", *_T4, "sentences", "train", "test", "valid")),
    Layout("cosmic-meld", ("speakers", "labels", "_", *_T4, "sentences", "train", "test", "valid")),
    Layout("cauain-iemocap", ("speakers", "labels", *_T4, *_CAUSE_EFFECT, "sentences", "train", "test",
                              "valid")),
    Layout("cauain-meld", ("speakers", "labels", "_", *_T4, *_CAUSE_EFFECT, "sentences", "train", "test",
                           "valid")),
    Layout("multimodal", ("ids", "speakers", "labels", *_T4, "a", "v", "sentences", "train", "test")),
    Layout("multimodal-valid", ("ids", "speakers", "labels", *_T4, "a", "v", "sentences", "train", "test",
                                "valid")),
    Layout("multimodal-sentiment", ("ids", "speakers", "labels", "_", *_T4, "a", "v", "sentences", "train",
                                    "test")),
    Layout("dialoguernn", ("ids", "speakers", "labels", "t", "a", "v", "sentences", "train", "test")),
    Layout("dialoguernn-meld", ("ids", "speakers", "labels", "t", "a", "sentences", "train", "test", "_")),
)
_SPLIT_FIELDS = {"train": "train", "valid": "val", "test": "test"}
_FEATURE_FIELDS = ("t", "t1", "t2", "t3", "t4", "a", "v")


# --------------------------------------------------------------------------- layout detection

def _numeric_2d(value: Any) -> np.ndarray | None:
    """``value`` as a float32 (n, d) array, or None if it is not one."""
    try:
        x = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    return x if x.ndim == 2 else None


def _is_int(value: Any) -> bool:
    return (isinstance(value, Integral) and not isinstance(value, bool)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer())


def _has_len(value: Any) -> bool:
    try:
        return len(value) > 0
    except TypeError:
        return False


def _is_id_list(value: Any) -> bool:
    return (not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "__iter__")
            and not (isinstance(value, np.ndarray) and value.ndim != 1))


def _check_layout(layout: Layout, obj: Sequence) -> str | None:
    """Why ``obj`` does not have ``layout`` (checked on one dialogue), or None if it fits."""
    items = dict(zip(layout.fields, obj))
    for f, v in items.items():
        if f in _SPLIT_FIELDS and not _is_id_list(v):
            return f"item {layout.fields.index(f) + 1} ({f} ids) is a {type(v).__name__}, not a list of ids"
        if f not in _SPLIT_FIELDS and f != "_" and not isinstance(v, Mapping):
            return f"item {layout.fields.index(f) + 1} ({f}) is a {type(v).__name__}, not a dict"
    dicts = [v for f, v in items.items() if f not in _SPLIT_FIELDS and f != "_"]
    # One non-empty dialogue found in every dict stands for all (the others' problems are
    # reported, dialogue by dialogue, when they are read).
    vid = next((v for s in _SPLIT_FIELDS if s in items for v in items[s]
                if is_hashable(v) and all(v in d for d in dicts) and _has_len(items["labels"][v])),
               None)
    if vid is None:
        return "no non-empty dialogue of the split lists is in every per-dialogue dict"
    for f, v in items.items():
        if f in _SPLIT_FIELDS or f == "_":
            continue
        value, what = v[vid], f"item {layout.fields.index(f) + 1} ({f}) of dialogue {vid!r}"
        if f in _FEATURE_FIELDS and _numeric_2d(value) is None:
            return f"{what} is not an (n, d) array of features"
        if f == "labels" and not all(_is_int(y) for y in value):
            return f"{what} does not hold int labels"
        if f == "sentences" and not all(isinstance(s, (str, bytes)) for s in value):
            return f"{what} does not hold strings"
    return None


def detect_layout(obj: Any, path: Path) -> Layout:
    """The layout of the unpickled feature file ``obj``, or DataError saying why none fits."""
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path}: expected a list of per-dialogue dicts and id lists, got a "
                        f"{type(obj).__name__}")
    candidates = [lay for lay in LAYOUTS if len(lay.fields) == len(obj)]
    if not candidates:
        known = ", ".join(sorted({str(len(lay.fields)) for lay in LAYOUTS}, key=int))
        raise DataError(f"{path}: a list of {len(obj)} items is not a known feature-pickle layout "
                        f"(known layouts have {known} items; see docs/data-formats.md)")
    reasons = []
    for layout in candidates:
        why = _check_layout(layout, obj)
        if why is None:
            return layout
        reasons.append(f"{layout.name}: {why}")
    raise DataError(f"{path}: {len(obj)} items, but no layout fits ({'; '.join(reasons)})")


# --------------------------------------------------------------------------- conversion

def hold_out(ids: Sequence, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> tuple[list, list]:
    """Split ``ids`` into (train, val): val is round(fraction * n) ids (at least 1 when n >= 2)
    drawn by ``numpy.random.default_rng(seed)`` from the sorted ids, so the draw does not
    depend on the order the pickle stores them in; val is sorted, train keeps ``ids``' order."""
    ordered = sorted(ids, key=id_sort_key)
    n = len(ordered)
    n_val = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
    chosen = {ordered[i] for i in np.random.default_rng(seed).permutation(n)[:n_val].tolist()}
    return [v for v in ids if v not in chosen], [v for v in ordered if v in chosen]


def _speaker_names(value: Any, where: str) -> list[str]:
    """Speakers as names: letters/strings kept, ints as digits, one-hot vectors as ``speaker<k>``."""
    out = []
    for j, s in enumerate(value):
        if isinstance(s, bytes):
            s = s.decode("latin-1")
        if isinstance(s, str):
            out.append(s)
            continue
        if isinstance(s, Integral) and not isinstance(s, bool):
            out.append(str(int(s)))
            continue
        try:
            x = np.asarray(s, dtype=np.float64)
        except (TypeError, ValueError):
            x = None
        if x is None or x.ndim != 1 or np.count_nonzero(x) != 1 or x.max() != 1:
            raise DataError(f"{where}, utterance {j}: speaker {s!r} is neither a name nor a one-hot vector")
        out.append(f"speaker{int(np.argmax(x))}")
    return out


def _features(items: dict, vid: Any, n: int, text_layers: str, where: str) -> dict[str, np.ndarray]:
    def feature(field: str) -> np.ndarray:
        x = _numeric_2d(items[field][vid]) if vid in items[field] else None
        if x is None:
            what = "missing" if vid not in items[field] else "not an (n, d) array of numbers"
            raise DataError(f"{where}: {field} features {what}")
        if x.shape[0] != n:
            raise DataError(f"{where}: mismatched lengths: {field} features have {x.shape[0]} rows "
                            f"for {n} utterances")
        return x

    layers = [f for f in ("t", "t1", "t2", "t3", "t4") if f in items]
    if text_layers in ("mean", "concat"):
        xs = [feature(f) for f in layers]
        if len({x.shape[1] for x in xs}) > 1:
            raise DataError(f"{where}: the text feature sets have different widths "
                            f"{[x.shape[1] for x in xs]}")
        text = np.mean(xs, axis=0, dtype=np.float32) if text_layers == "mean" else np.concatenate(xs, axis=1)
    else:
        text = feature(layers[int(text_layers) - 1])
    out = {"t": np.ascontiguousarray(text, dtype=np.float32)}
    for m in ("a", "v"):
        if m in items:
            out[m] = feature(m)
    return out


def _clues(comet: dict[str, Mapping], vid: Any, n: int, where: str) -> np.ndarray:
    rows = []
    for rel in CLUE_RELATIONS:
        if vid not in comet[rel]:
            raise DataError(f"{where}: missing from the COMET pickle ({rel})")
        x = _numeric_2d(comet[rel][vid])
        if x is None:
            raise DataError(f"{where}: COMET {rel} is not an (n, d) array of numbers")
        if x.shape[0] != n:
            raise DataError(f"{where}: mismatched lengths: COMET {rel} has {x.shape[0]} vectors for "
                            f"{n} utterances")
        rows.append(x)
    if len({x.shape[1] for x in rows}) > 1:
        raise DataError(f"{where}: the COMET relations have different widths {[x.shape[1] for x in rows]}")
    return np.ascontiguousarray(np.stack(rows, axis=1), dtype=np.float32)


def _load_comet(path: Path, unsafe_pickle: bool = False) -> dict[str, Mapping]:
    obj = load_pickle(path, allow_unsafe=unsafe_pickle)
    if isinstance(obj, Mapping):
        missing = [r for r in CLUE_RELATIONS if r not in obj]
        if missing:
            raise DataError(f"{path}: the COMET dict has no {', '.join(missing)}")
        comet = {r: obj[r] for r in CLUE_RELATIONS}
    elif isinstance(obj, (list, tuple)) and len(obj) == len(ATOMIC_RELATIONS):
        comet = dict(zip(ATOMIC_RELATIONS, obj))
    else:
        got = f"{len(obj)} items" if isinstance(obj, (list, tuple)) else f"a {type(obj).__name__}"
        raise DataError(f"{path}: expected a list of {len(ATOMIC_RELATIONS)} dicts "
                        f"({', '.join(ATOMIC_RELATIONS)}), got {got}")
    for rel, d in comet.items():
        if not isinstance(d, Mapping):
            raise DataError(f"{path}: {rel} is a {type(d).__name__}, not a dict from dialogue id to vectors")
    return comet


def _find_files(data_dir: Path, dataset: str | None) -> tuple[str, Path, Path]:
    """(dataset, roberta pickle, comet pickle path (may not exist)) for a directory or a file."""
    if dataset is not None and dataset not in COSMIC_DATASETS:
        raise ValueError(f"cosmic: unknown dataset {dataset!r} (expected {' or '.join(COSMIC_DATASETS)})")
    if data_dir.is_file():
        if dataset is None:
            dataset = next((d for d in COSMIC_DATASETS if data_dir.name.lower().startswith(d)), None)
            if dataset is None:
                raise DataError(f"cosmic: cannot tell the dataset from the file name {data_dir}; "
                                f"pass dataset={' or '.join(repr(d) for d in COSMIC_DATASETS)}")
        return dataset, data_dir, data_dir.parent / _COMET_NAME.format(dataset)
    if not data_dir.is_dir():
        raise DataError(f"cosmic: {data_dir} does not exist")
    found = {d: [data_dir / n.format(d) for n in _ROBERTA_NAMES if (data_dir / n.format(d)).is_file()]
             for d in COSMIC_DATASETS}
    if dataset is None:
        present = [d for d, paths in found.items() if paths]
        if len(present) != 1:
            expected = ", ".join(n.format(d) for d in COSMIC_DATASETS for n in _ROBERTA_NAMES)
            if not present:
                raise DataError(f"cosmic: no feature pickle in {data_dir} (expected one of {expected})")
            raise DataError(f"cosmic: {data_dir} has feature pickles for both {' and '.join(present)}; "
                            "pass dataset= to pick one")
        dataset = present[0]
    if not found[dataset]:
        raise DataError(f"cosmic: {data_dir} has no "
                        f"{' or '.join(n.format(dataset) for n in _ROBERTA_NAMES)}")
    return dataset, found[dataset][0], data_dir / _COMET_NAME.format(dataset)


def read_cosmic(data_dir: str | Path, dataset: str | None = None,
                text_layers: str | int = "mean", *, unsafe_pickle: bool = False) -> RawCorpus:
    """Read COSMIC's (or CauAIN's) RoBERTa feature pickle and, if present, its COMET pickle.

    data_dir: the directory with ``<dataset>_features_roberta.pkl`` (and
        ``<dataset>_features_comet.pkl``), or the path of a feature pickle in
        any layout of ``LAYOUTS`` (the COMET pickle is then looked for beside it).
    dataset: "meld" or "iemocap"; by default told from which files exist (or
        from the file name). It fixes the label names (``MELD_LABELS`` or
        ``IEMOCAP_LABELS``, in the order of the label ints).
    text_layers: how the four RoBERTa feature sets become ``features["t"]``:
        "mean" averages them, "concat" concatenates them (4 x 1024), "1".."4"
        picks one.
    unsafe_pickle: unpickle with plain ``pickle.load``, which runs any code
        the files name, instead of as data only: only for files you trust.

    Features: ``"t"``, and ``"a"``/``"v"`` where the pickle has audio/visual,
    float32 (n, d). Clues: (n, 6, 768) in ``CLUE_RELATIONS`` order, or None
    without the COMET pickle. Speakers: strings kept (``'M'``/``'F'``),
    one-hot vectors named ``speaker<k>`` by their index. Texts go through
    ``normalize_text`` (MELD's pickles hold cp1252 bytes such as ``\\x92``).
    Dialogue ids are the pickle's, as strings.

    Splits: train/valid/test ids -> "train"/"val"/"test". Without validation
    ids (absent or empty), ``hold_out`` moves a deterministic 10% of the
    train dialogues to "val" (``meta["held_out"]`` is True on them).

    Both pickles are read as data only (``load_pickle``) unless ``unsafe_pickle``.
    """
    text_layers = str(text_layers)
    if text_layers not in TEXT_LAYERS:
        raise ValueError(f"cosmic: text_layers must be one of {', '.join(TEXT_LAYERS)}, got {text_layers!r}")
    dataset, path, comet_path = _find_files(Path(data_dir), dataset)
    label_names = COSMIC_DATASETS[dataset]
    obj = load_pickle(path, allow_unsafe=unsafe_pickle)
    layout = detect_layout(obj, path)
    items = {f: v for f, v in zip(layout.fields, obj) if f != "_"}
    if text_layers not in ("mean", "concat") and int(text_layers) > len(layout.text_fields):
        raise ValueError(f"cosmic: text_layers={text_layers} but {path} ({layout.name} layout) has "
                         f"{len(layout.text_fields)} text feature set(s)")
    comet = _load_comet(comet_path, unsafe_pickle) if comet_path.is_file() else None

    ids = {s: ordered_ids(items.get(f), f"{f} ids", str(path)) for f, s in _SPLIT_FIELDS.items()}
    check_split_ids({s: ids[s] for s in SPLITS}, str(path))
    held_out: set = set()
    if not ids["val"]:
        ids["train"], ids["val"] = hold_out(ids["train"])
        held_out = set(ids["val"])
    splits: dict[str, list[RawDialogue]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for vid in ids[split]:
            where = f"{path}: dialogue {vid!r}"
            absent = [f for f in ("speakers", "labels", "sentences") if vid not in items[f]]
            if absent:
                raise DataError(f"{where}: missing from {', '.join(absent)}")
            labels = list(items["labels"][vid])
            n = len(labels)
            if n == 0:
                raise DataError(f"{where}: no utterances")
            names = label_names_of(labels, label_names, where)
            speakers = _speaker_names(items["speakers"][vid], where)
            sentences = [s.decode("latin-1") if isinstance(s, bytes) else s for s in items["sentences"][vid]]
            if not len(speakers) == n == len(sentences):
                raise DataError(f"{where}: mismatched lengths: {len(speakers)} speakers, {n} labels, "
                                f"{len(sentences)} sentences")
            if not all(isinstance(s, str) for s in sentences):
                raise DataError(f"{where}: sentences are not all strings")
            meta: dict = {"file": str(path), "pickle_id": vid, "layout": layout.name}
            if "ids" in items and vid in items["ids"]:
                meta["utterance_ids"] = list(items["ids"][vid])
            if vid in held_out:
                meta["held_out"] = True
            splits[split].append(RawDialogue(
                id=str(vid),
                texts=[normalize_text(s) for s in sentences],
                speakers=speakers,
                labels=names,
                features=_features(items, vid, n, text_layers, where),
                clues=None if comet is None else _clues(comet, vid, n, f"{comet_path}: dialogue {vid!r}"),
                meta=meta,
            ))
    if not any(ids.values()):
        raise DataError(f"{path}: the train, valid and test id lists are all empty")
    return RawCorpus(name=f"cosmic-{dataset}", label_names=list(label_names), splits=splits,
                     source=str(path))
