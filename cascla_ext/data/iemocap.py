"""IEMOCAP transcripts in COSMIC's text pickle (``iemocap.pkl``) -> ``RawCorpus``.

The pickle holds a list ``[speakers, labels, sentences, trainIds, testIds,
validIds]``: the first three are dicts from dialogue id (``Ses01F_impro01``)
to per-utterance lists (``'M'``/``'F'``, an int label, the text); the last
three list dialogue ids. Labels: 0 happy, 1 sad, 2 neutral, 3 angry,
4 excited, 5 frustrated.

Security: the pickle is read as data only (``safe_pickle.load_pickle``):
strings, numbers, lists, dicts, sets and numpy arrays load, any other global
the file names is refused with a DataError naming the file and the global,
and a corrupt file is one DataError with memory bounded by its size (the same
holds for ``cosmic``'s feature pickles). ``unsafe_pickle=True`` unpickles
with plain ``pickle.load``, which runs whatever code the file names: only
for a file you trust.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from .meld import normalize_text
from .raw import SPLITS, DataError, RawCorpus, RawDialogue
from .safe_pickle import load_pickle

__all__ = ["IEMOCAP_FILE", "IEMOCAP_LABELS", "check_split_ids", "id_sort_key", "is_hashable", "label_index",
           "label_names_of", "load_pickle", "ordered_ids", "read_iemocap"]

#: Emotion names in the order of COSMIC's label ints.
IEMOCAP_LABELS = ("happy", "sad", "neutral", "angry", "excited", "frustrated")
IEMOCAP_FILE = "iemocap.pkl"
_FIELDS = ("speakers", "labels", "sentences", "trainIds", "testIds", "validIds")


def ordered_ids(ids: Any, what: str, where: str) -> list:
    """A split's dialogue ids as a list: sequence order kept, sets (no order) sorted."""
    if ids is None:
        return []
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__iter__"):
        raise DataError(f"{where}: {what} should be a list of dialogue ids, got {type(ids).__name__}")
    out = list(ids)
    if isinstance(ids, (set, frozenset)):
        out.sort(key=id_sort_key)
    return out


def is_hashable(value: Any) -> bool:
    """Whether ``value`` can be a dict key (a tuple holding a list cannot, though it is ``Hashable``)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


def check_split_ids(ids: Mapping[str, list], where: str) -> None:
    """Check the dialogue ids of a pickle's splits (split -> ids, as
    :func:`ordered_ids` gives them): each a string or an int (a dict key), and
    none listed twice, in one split or two. A DataError naming the file, the
    split and the dialogue otherwise. The id checks of the iemocap and cosmic readers."""
    seen: dict[Any, str] = {}
    for split, vids in ids.items():
        for vid in vids:
            if not is_hashable(vid):
                raise DataError(f"{where}: {split} ids: a dialogue id must be a string or an int, got a "
                                f"{type(vid).__name__}")
            if vid in seen:
                lists = f"twice in the {split}" if seen[vid] == split else f"in both the {seen[vid]} and the {split}"
                raise DataError(f"{where}: dialogue {vid!r}: listed twice ({lists} ids)")
            seen[vid] = split


def id_sort_key(vid: Any) -> tuple:
    """Sort key for dialogue ids of mixed types: numbers numerically, then strings."""
    if isinstance(vid, Integral):
        return (0, int(vid), "")
    return (1, 0, str(vid))


def label_index(value: Any, n_labels: int) -> int | None:
    """``value`` as a label index in [0, n_labels), or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():  # 2.0 from a float array
            value = int(value)
        else:
            return None
    value = int(value)
    return value if 0 <= value < n_labels else None


def label_names_of(labels: Sequence[Any], label_names: Sequence[str], where: str) -> list[str]:
    """Integer labels as label names; DataError naming ``where`` and the utterance otherwise."""
    names = []
    for j, y in enumerate(labels):
        k = label_index(y, len(label_names))
        if k is None:
            raise DataError(f"{where}, utterance {j}: label {y!r} is not an int in "
                            f"0..{len(label_names) - 1} ({', '.join(label_names)})")
        names.append(label_names[k])
    return names


def _utterances(value: Any, what: str, where: str) -> list:
    """A dialogue's per-utterance entries as a list, or DataError if ``value`` is not a sequence."""
    try:
        return list(value)
    except TypeError:
        raise DataError(f"{where}: {what} should be a list, got {type(value).__name__}") from None


def read_iemocap(data_dir: str | Path, *, unsafe_pickle: bool = False,
                 media_dir: str | Path | None = None) -> RawCorpus:
    """Read COSMIC's IEMOCAP text pickle: ``data_dir/iemocap.pkl``, or ``data_dir`` itself if it is a file.

    Splits: ``trainIds`` -> "train", ``validIds`` -> "val", ``testIds`` ->
    "test", each in the pickle's order (sorted if stored as a set). Dialogue
    ids are kept as in the pickle (``Ses01F_impro01``); they are unique
    across splits. Dialogues in the dicts but in no split are ignored. Texts
    go through ``normalize_text`` (a no-op on IEMOCAP's ASCII transcripts).
    Label names are ``IEMOCAP_LABELS`` in that order.

    Raises DataError naming the file and dialogue for a wrong layout, ids
    missing from the dicts or listed twice, empty dialogues, lists of
    different lengths, and labels that are not ints in 0..5.

    The pickle is read as data only (``load_pickle``); ``unsafe_pickle=True``
    uses plain ``pickle.load``, which runs any code the file names: only for
    a file you trust.

    media_dir: ``IEMOCAP_full_release`` (its ``Session1/`` ... folders): each
    utterance is matched to its transcript line (speaker and text, in order;
    ``cascla_ext.data.media.iemocap_media``), which names its sentence .wav
    (``meta["audio"]``) and its span of the dialogue's .avi (``meta["video"]``);
    unmatched utterances get None clips (zero features later).
    """
    data_dir = Path(data_dir)
    path = data_dir if data_dir.is_file() else data_dir / IEMOCAP_FILE
    if not data_dir.exists():
        raise DataError(f"IEMOCAP: {data_dir} does not exist")
    if not path.is_file():
        raise DataError(f"IEMOCAP: {path} not found (expected COSMIC's {IEMOCAP_FILE} in {data_dir})")
    obj = load_pickle(path, allow_unsafe=unsafe_pickle)
    if not isinstance(obj, (list, tuple)) or len(obj) != len(_FIELDS):
        got = f"a {type(obj).__name__} of {len(obj)} items" if isinstance(obj, (list, tuple)) \
            else f"a {type(obj).__name__}"
        raise DataError(f"{path}: expected a list of {len(_FIELDS)} items [{', '.join(_FIELDS)}], got {got}")
    speakers, labels, sentences = obj[:3]
    for name, d in zip(_FIELDS[:3], (speakers, labels, sentences)):
        if not isinstance(d, Mapping):
            raise DataError(f"{path}: {name} (item {_FIELDS.index(name) + 1}) should be a dict from "
                            f"dialogue id to a list, got {type(d).__name__}")
    split_of = {"trainIds": "train", "validIds": "val", "testIds": "test"}
    ids = {split_of[f]: ordered_ids(obj[_FIELDS.index(f)], f, str(path)) for f in ("trainIds", "validIds", "testIds")}
    check_split_ids(ids, str(path))
    splits: dict[str, list[RawDialogue]] = {s: [] for s in SPLITS}
    for field_name, split in split_of.items():
        for vid in ids[split]:
            where = f"{path}: dialogue {vid!r} ({field_name})"
            absent = [n for n, d in zip(_FIELDS[:3], (speakers, labels, sentences)) if vid not in d]
            if absent:
                raise DataError(f"{where}: missing from {', '.join(absent)}")
            spk, lab, sen = (_utterances(d[vid], name, where)
                             for name, d in zip(_FIELDS[:3], (speakers, labels, sentences)))
            if not spk:
                raise DataError(f"{where}: no utterances")
            if not len(spk) == len(lab) == len(sen):
                raise DataError(f"{where}: mismatched lengths: {len(spk)} speakers, {len(lab)} labels, "
                                f"{len(sen)} sentences")
            names = label_names_of(lab, IEMOCAP_LABELS, where)
            for j, (s, t) in enumerate(zip(spk, sen)):
                if not isinstance(s, str) or not isinstance(t, str):
                    bad = ("speaker", s) if not isinstance(s, str) else ("sentence", t)
                    raise DataError(f"{where}, utterance {j}: {bad[0]} {bad[1]!r} is not a string")
            splits[split].append(RawDialogue(
                id=str(vid), texts=[normalize_text(t) for t in sen], speakers=spk, labels=names,
                meta={"file": str(path)},
            ))
    if not any(ids.values()):
        raise DataError(f"{path}: trainIds, validIds and testIds are all empty")
    if media_dir is not None:
        from .media import iemocap_media

        for d in (d for ds in splits.values() for d in ds):
            d.meta["audio"], d.meta["video"], d.meta["utterance_ids"] = iemocap_media(
                media_dir, d.id, d.speakers, d.texts)
    return RawCorpus(name="iemocap", label_names=list(IEMOCAP_LABELS), splits=splits, source=str(path))
