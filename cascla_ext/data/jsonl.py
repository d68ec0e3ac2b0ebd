"""JSON Lines dialogues -> ``RawCorpus``: the format for your own data and for ``cascla predict``.

One dialogue per line::

    {"id": "d1", "utterances": [{"speaker": "A", "text": "Hi!", "label": "joy"},
                                {"speaker": "B", "text": "Hello."}]}

``label`` is optional (missing or null: unknown); so are ``audio`` and
``video``, paths of the utterance's media files (relative to the file's
folder), from which audio and visual features are extracted; a line may carry
``"split": "train" | "val" | "test"``. A directory holds ``train.jsonl``,
``val.jsonl``, ``test.jsonl`` (any of them) and optionally ``labels.json``,
a JSON list of label names that fixes their order. docs/data-formats.md has
the full rules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

from .raw import SPLITS, DataError, RawCorpus, RawDialogue

__all__ = ["JSONL_FILES", "LABELS_FILE", "SPLIT_ALIASES", "read_jsonl", "read_jsonl_file"]

#: File name -> split, in a JSONL directory.
JSONL_FILES = {"train.jsonl": "train", "val.jsonl": "val", "test.jsonl": "test"}
LABELS_FILE = "labels.json"
#: Accepted values of a line's ``"split"``.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                 "test": "test"}

# (split, dialogue, file, line) for each dialogue read
_Entry = tuple[str, RawDialogue, Path, int]


def _parse_line(obj: Any, where: str) -> tuple[RawDialogue, str | None]:
    """One decoded line -> (dialogue, its "split" value or None)."""
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected a JSON object {{"id": ..., "utterances": [...]}}, '
                        f"got {type(obj).__name__}")
    if "id" not in obj:
        raise DataError(f'{where}: missing "id"')
    did = obj["id"]
    if isinstance(did, bool) or not isinstance(did, (str, Integral)) or str(did) == "":
        raise DataError(f'{where}: "id" must be a non-empty string (or an integer), got {did!r}')
    did = str(did)
    where = f"{where}: dialogue {did!r}"
    utts = obj.get("utterances")
    if utts is None:
        raise DataError(f'{where}: missing "utterances"')
    if not isinstance(utts, list):
        raise DataError(f'{where}: "utterances" must be a list, got {type(utts).__name__}')
    if not utts:
        raise DataError(f"{where}: no utterances (empty dialogue)")
    texts, speakers, labels = [], [], []
    media: dict[str, list] = {"audio": [], "video": []}
    for j, u in enumerate(utts):
        at = f"{where}, utterance {j}"
        if not isinstance(u, dict):
            raise DataError(f'{at}: expected an object {{"speaker": ..., "text": ..., "label": ...}}, '
                            f"got {type(u).__name__}")
        for key in ("speaker", "text"):
            if key not in u:
                raise DataError(f'{at}: missing "{key}"')
        text, speaker, label = u["text"], u["speaker"], u.get("label")
        if not isinstance(text, str):
            raise DataError(f'{at}: "text" must be a string, got {text!r}')
        if isinstance(speaker, bool) or not isinstance(speaker, (str, Integral)) or str(speaker) == "":
            raise DataError(f'{at}: "speaker" must be a non-empty string, got {speaker!r}')
        if label is not None and (not isinstance(label, str) or not label):
            raise DataError(f'{at}: "label" must be a non-empty string or null, got {label!r}')
        for key, clips in media.items():
            clip = u.get(key)
            if clip is not None and (not isinstance(clip, str) or not clip):
                raise DataError(f'{at}: "{key}" must be a media file path (a string) or null, got {clip!r}')
            clips.append(clip)
        texts.append(text)
        speakers.append(str(speaker))
        labels.append(label)
    split = obj.get("split")
    if split is not None:
        if not isinstance(split, str) or split.lower() not in SPLIT_ALIASES:
            raise DataError(f'{where}: unknown "split" {split!r} (expected train, val or test)')
        split = SPLIT_ALIASES[split.lower()]
    meta = {k: v for k, v in media.items() if any(c is not None for c in v)}
    return RawDialogue(id=did, texts=texts, speakers=speakers, labels=labels, meta=meta), split


def _read_lines(path: Path, default_split: str, fixed: bool) -> list[_Entry]:
    """Every dialogue of ``path``. ``fixed``: the file decides the split (a differing "split" is an error)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSON Lines file") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out: list[_Entry] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to be a dialogue") from None
        dialogue, split = _parse_line(obj, where)
        if split is not None and fixed and split != default_split:
            raise DataError(f'{where}: dialogue {dialogue.id!r} says "split": {obj["split"]!r}, but it is '
                            f"in {path.name}, the {default_split} file")
        # media paths are relative to the file's folder; every dialogue lists
        # its clips (None where it has none) so that audio and visual features
        # can be extracted for any file, with zeros where a clip is absent
        media = {k: [None if c is None else str((path.parent / Path(c).expanduser()).absolute()) for c in
                     dialogue.meta.get(k, [None] * len(dialogue))] for k in ("audio", "video")}
        dialogue.meta = {"file": str(path), "line": number, **media}
        out.append((split or default_split, dialogue, path, number))
    if not out:
        raise DataError(f"{path}: no dialogues (the file is empty)")
    return out


def _check_names(names: Any, source: str) -> list[str]:
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{source}: label names must be a non-empty list of strings, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise DataError(f"{source}: label names must be non-empty strings, got {bad[0]!r}")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise DataError(f"{source}: label name{'s' if len(dup) > 1 else ''} {', '.join(dup)} listed twice")
    return list(names)


def _build(entries: list[_Entry], label_names: list[str] | None, names_from: str,
           source: Path) -> RawCorpus:
    """Check ids and labels, then group the entries into splits.

    names_from says where ``label_names`` came from; when they are None (made
    from the labels seen), it is a hint on how to give them instead.
    """
    first: dict[str, tuple[Path, int]] = {}
    for _, d, path, line in entries:
        if d.id in first:
            p0, l0 = first[d.id]
            raise DataError(f"{path}:{line}: duplicate dialogue id {d.id!r} (first on {p0}:{l0})")
        first[d.id] = (path, line)
    if label_names is None:
        train = [d for s, d, _, _ in entries if s == "train"]
        pool = train or [d for _, d, _, _ in entries]
        label_names = sorted({y for d in pool for y in d.labels if y is not None})
        names_from = ("the labels seen in the training dialogues" if train
                      else "the labels seen in the data") + names_from
    known = set(label_names)
    for _, d, path, line in entries:
        for j, y in enumerate(d.labels):
            if y is not None and y not in known:
                raise DataError(f"{path}:{line}: dialogue {d.id!r}, utterance {j}: unknown label {y!r} "
                                f"(label names, from {names_from}: {', '.join(label_names) or 'none'})")
    splits: dict[str, list[RawDialogue]] = {s: [] for s in SPLITS}
    for s, d, _, _ in entries:
        splits[s].append(d)
    return RawCorpus(name="jsonl", label_names=list(label_names), splits=splits, source=str(source))


def read_jsonl_file(path: str | Path, label_names: Sequence[str] | None = None,
                    split: str = "test") -> RawCorpus:
    """Read one JSON Lines file: each dialogue goes to its line's ``"split"``, else to ``split``.

    label_names: the label names, in order (``cascla predict`` passes the
        checkpoint's); a label outside them is a DataError naming file:line.
        Without them: the labels seen in the file's train dialogues (or, if
        none is marked train, in all of them), sorted alphabetically.
    """
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    names = None if label_names is None else _check_names(list(label_names), "label_names")
    entries = _read_lines(path, split, fixed=False)
    return _build(entries, names, "the given label names" if names else " (pass label_names to fix them)",
                  path)


def read_jsonl(data_dir_or_file: str | Path, label_names: Sequence[str] | None = None) -> RawCorpus:
    """Read a JSON Lines directory (``train.jsonl``, ``val.jsonl``, ``test.jsonl``, any present),
    or one file (as ``read_jsonl_file``: lines without a "split" go to "test").

    Label names, first that applies: ``label_names``; ``labels.json`` in the
    directory (a JSON list of names: their order is the label index order);
    else the labels seen in ``train.jsonl`` (all files if there is none),
    sorted alphabetically, so the order does not depend on line order.
    Labels in val/test outside those names are a DataError (file:line).

    Raises DataError with file:line for invalid JSON, missing or mistyped
    fields, empty dialogues, unknown labels, duplicate dialogue ids (across
    files too) and a "split" that contradicts the file it is in.
    """
    path = Path(data_dir_or_file)
    if path.is_file():
        return read_jsonl_file(path, label_names)
    if not path.is_dir():
        raise DataError(f"jsonl: {path} does not exist")
    entries: list[_Entry] = []
    for name, split in JSONL_FILES.items():
        if (path / name).is_file():
            entries += _read_lines(path / name, split, fixed=True)
    if not entries:
        raise DataError(f"jsonl: none of {', '.join(JSONL_FILES)} in {path}")
    if label_names is not None:
        return _build(entries, _check_names(list(label_names), "label_names"), "the given label names", path)
    labels_path = path / LABELS_FILE
    if labels_path.is_file():
        try:
            names = json.loads(labels_path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{labels_path}: invalid JSON ({err})") from None
        except RecursionError:
            raise DataError(f"{labels_path}: JSON nested too deeply to be a list of label names") from None
        return _build(entries, _check_names(names, str(labels_path)), str(labels_path), path)
    return _build(entries, None, f" (add a {LABELS_FILE} to fix them)", path)
