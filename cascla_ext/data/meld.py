"""MELD's official CSVs (``train_sent_emo.csv``, ``dev_sent_emo.csv``,
``test_sent_emo.csv``) -> ``RawCorpus``; and ``normalize_text``, the clean-up
of MELD's encoding artefacts that the pickle readers use too.

Format (docs/data-formats.md): one row per utterance, columns ``Sr No.,
Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season,
Episode, StartTime, EndTime``, of which ``Utterance, Speaker, Emotion,
Dialogue_ID, Utterance_ID`` are required. Rows are grouped by ``Dialogue_ID``
and ordered by ``Utterance_ID`` (which may have gaps: some utterances were
dropped from MELD; a gap is not an error).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from .raw import SPLITS, DataError, RawCorpus, RawDialogue

__all__ = ["MELD_FILES", "MELD_LABELS", "MELD_REQUIRED_COLUMNS", "normalize_text", "read_meld"]

#: Emotion names in MELD's conventional index order (also COSMIC's label ints).
MELD_LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
#: File name -> split.
MELD_FILES = {"train_sent_emo.csv": "train", "dev_sent_emo.csv": "val", "test_sent_emo.csv": "test"}
MELD_REQUIRED_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
# Kept in RawDialogue.meta (per utterance) when the file has them.
_OPTIONAL_COLUMNS = {"Sentiment": "sentiments", "Season": "seasons", "Episode": "episodes",
                     "StartTime": "start_times", "EndTime": "end_times", "Sr No.": "sr_no"}


# --------------------------------------------------------------------------- text clean-up

def _cp1252_char(b: int) -> str:
    """The character byte ``b`` stands for in Windows-1252 (Latin-1 for its 5 unassigned bytes)."""
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(b)


# A UTF-8 continuation byte (0x80-0xBF) as it shows up after a wrong cp1252 or Latin-1 decode.
_CONT_TO_BYTE = {}
for _b in range(0x80, 0xC0):
    _CONT_TO_BYTE[_cp1252_char(_b)] = _b
    _CONT_TO_BYTE[chr(_b)] = _b
# Lead bytes 0xC2-0xF4 are the same characters in cp1252 and Latin-1 (Â .. ô).
_CONT = "[" + re.escape("".join(sorted(_CONT_TO_BYTE))) + "]"
_MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")
# C1 control characters: cp1252 bytes (e.g. 0x92, a right quote) decoded as Latin-1.
_C1_FIX = {chr(b): _cp1252_char(b) for b in range(0x80, 0xA0)}
_C1_TABLE = str.maketrans(_C1_FIX)
_TYPOGRAPHIC = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u2026": "...",
})


def _unmojibake(match: re.Match) -> str:
    lead, *rest = match.group()
    raw = bytes([ord(lead), *(_CONT_TO_BYTE[c] for c in rest)])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # not a UTF-8 sequence after all: leave it alone
        return match.group()


def normalize_text(text: str) -> str:
    """Undo the encoding artefacts found in MELD (CSV and COSMIC pickles); keep everything else.

    1. Mojibake, UTF-8 bytes read as cp1252 or Latin-1: ``â€™`` -> ``’``,
       ``Ã©`` -> ``é`` (only where the characters re-encode to a valid UTF-8
       sequence; repeated for doubly mangled text).
    2. C1 control characters, cp1252 bytes read as Latin-1: ``\\x92`` -> ``’``,
       ``\\x85`` -> ``…``, ``\\x97`` -> ``—``.
    3. Typographic quotes and the ellipsis -> ASCII: ``‘ ’ ‚ ‛ ′`` -> ``'``,
       ``“ ” „ ‟ ″`` -> ``"``, ``…`` -> ``...`` (MELD mixes them with their
       ASCII forms for the same thing).

    Dashes, accented letters and all other characters are kept, as is
    whitespace. ASCII text comes back unchanged.
    """
    if text.isascii():
        return text
    for _ in range(3):
        fixed = _MOJIBAKE.sub(_unmojibake, text)
        if fixed == text:
            break
        text = fixed
    text = text.translate(_C1_TABLE)
    return text.translate(_TYPOGRAPHIC)


# --------------------------------------------------------------------------- CSV reading

def _decode(path: Path) -> str:
    """The file's text: UTF-8 (BOM allowed), else cp1252 (older MELD copies), never a decode error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1").translate(_C1_TABLE)


def _int_field(value: str, column: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(f"{where}: {column} {value!r} is not an integer") from None


def _read_meld_csv(path: Path, split: str) -> list[RawDialogue]:
    text = _decode(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header line with the columns "
                        f"{', '.join(MELD_REQUIRED_COLUMNS)})") from None
    except csv.Error as err:
        raise DataError(f"{path}:1: unreadable CSV header: {err}") from None
    header = [h.strip() for h in header]
    col = {}
    for i, name in enumerate(header):
        col.setdefault(name, i)
    missing = [c for c in MELD_REQUIRED_COLUMNS if c not in col]
    if missing:
        raise DataError(f"{path}:1: missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)} (the header has: {', '.join(header)})")
    optional = {c: key for c, key in _OPTIONAL_COLUMNS.items() if c in col}
    needed = max(col[c] for c in MELD_REQUIRED_COLUMNS)

    # Dialogue_ID -> {Utterance_ID: (line, row)}
    dialogues: dict[int, dict[int, tuple[int, list[str]]]] = {}
    prev_end = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}:{prev_end + 1}: unreadable CSV row: {err}") from None
        line, prev_end = prev_end + 1, reader.line_num  # a quoted field may span lines
        if not row or all(not f.strip() for f in row):
            continue
        where = f"{path}:{line}"
        if len(row) <= needed:
            absent = [c for c in MELD_REQUIRED_COLUMNS if col[c] >= len(row)]
            raise DataError(f"{where}: row has {len(row)} fields, {len(header)} expected "
                            f"(no value for {', '.join(absent)})")
        emotion = row[col["Emotion"]].strip().lower()
        if emotion not in MELD_LABELS:
            raise DataError(f"{where}: unknown emotion {row[col['Emotion']]!r} "
                            f"(expected one of {', '.join(MELD_LABELS)})")
        d_id = _int_field(row[col["Dialogue_ID"]], "Dialogue_ID", where)
        u_id = _int_field(row[col["Utterance_ID"]], "Utterance_ID", where)
        utterances = dialogues.setdefault(d_id, {})
        if u_id in utterances:
            raise DataError(f"{where}: duplicate utterance: Dialogue_ID {d_id}, Utterance_ID {u_id} "
                            f"is also on line {utterances[u_id][0]}")
        utterances[u_id] = (line, row)

    if not dialogues:
        raise DataError(f"{path}: no utterances (only a header)")
    out = []
    for d_id in sorted(dialogues):
        utterances = dialogues[d_id]
        order = sorted(utterances)
        rows = [utterances[u][1] for u in order]
        meta: dict = {"file": str(path), "dialogue_id": d_id, "utterance_ids": order,
                      "lines": [utterances[u][0] for u in order]}
        for c, key in optional.items():
            meta[key] = [r[col[c]].strip() if col[c] < len(r) else "" for r in rows]
        out.append(RawDialogue(
            id=f"{split}/dia{d_id}",
            texts=[normalize_text(r[col["Utterance"]]) for r in rows],
            speakers=[normalize_text(r[col["Speaker"]].strip()) for r in rows],
            labels=[r[col["Emotion"]].strip().lower() for r in rows],
            meta=meta,
        ))
    return out


def read_meld(data_dir: str | Path, media_dir: str | Path | None = None) -> RawCorpus:
    """Read MELD's official CSVs from ``data_dir``.

    ``train_sent_emo.csv`` -> split "train", ``dev_sent_emo.csv`` -> "val",
    ``test_sent_emo.csv`` -> "test"; whichever are present. Dialogue ids are ``<split>/dia<Dialogue_ID>``
    (``train/dia12``); texts and speaker names go through ``normalize_text``;
    ``meta`` keeps the utterance ids, the source line of each utterance, and
    the optional columns (sentiments, seasons, ...). Label names are
    ``MELD_LABELS`` in that order.

    media_dir: MELD's clips as released (``train_splits/dia0_utt0.mp4``, ...;
        ``cascla_ext.data.media``): each utterance's ``dia{D}_utt{U}.mp4`` is
        attached as its audio and video clip (``meta["audio"]``, ``meta["video"]``);
        a split without a clip folder gets None clips (zero features later).

    Raises DataError (naming the file and line) for no CSV present, missing
    columns, short rows, unknown emotions, non-integer ids and duplicate
    (Dialogue_ID, Utterance_ID) pairs.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"MELD: {data_dir} is not a directory")
    names = list(MELD_FILES)
    splits: dict[str, list[RawDialogue]] = {s: [] for s in SPLITS}
    found = False
    for name in names:
        path = data_dir / name
        if path.is_file():
            found = True
            splits[MELD_FILES[name]] = _read_meld_csv(path, MELD_FILES[name])
    if not found:
        raise DataError(f"MELD: none of {', '.join(names)} in {data_dir}")
    if media_dir is not None:
        from .media import meld_media_folders

        folders = meld_media_folders(media_dir, [s for s, d in splits.items() if d])
        for split, dialogues in splits.items():
            folder = folders.get(split)
            for d in dialogues:
                clips = [None if folder is None else str(folder / f"dia{d.meta['dialogue_id']}_utt{u}.mp4")
                         for u in d.meta["utterance_ids"]]
                d.meta["audio"], d.meta["video"] = clips, list(clips)
    return RawCorpus(name="meld", label_names=list(MELD_LABELS), splits=splits, source=str(data_dir))
