"""The dataset readers by name: ``read_raw("meld", data_dir)`` -> ``RawCorpus``.

| name      | reads                                                        |
| --------- | ------------------------------------------------------------ |
| meld      | MELD's official CSVs (``read_meld``)                         |
| iemocap   | COSMIC's IEMOCAP text pickle ``iemocap.pkl`` (``read_iemocap``) |
| cosmic    | COSMIC/CauAIN RoBERTa + COMET feature pickles (``read_cosmic``) |
| jsonl     | JSON Lines dialogues (``read_jsonl``)                        |

docs/data-formats.md describes each format.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from .cosmic import read_cosmic
from .iemocap import read_iemocap
from .jsonl import read_jsonl, read_jsonl_file
from .meld import read_meld
from .raw import DataError, RawCorpus

__all__ = ["READERS", "read_jsonl_file", "read_raw"]

READERS: dict[str, Callable[..., RawCorpus]] = {
    "meld": read_meld,
    "iemocap": read_iemocap,
    "cosmic": read_cosmic,
    "jsonl": read_jsonl,
}
# Readers that also take the path of a single file instead of a directory.
_FILE_OK = ("iemocap", "cosmic", "jsonl")


def read_raw(name: str, data_dir: str | Path, **options) -> RawCorpus:
    """Read dataset ``name`` from ``data_dir`` with the reader's keyword ``options``
    (``cosmic``: ``dataset``, ``text_layers``; ``jsonl``: ``label_names``).

    Raises ValueError for an unknown name or option, DataError for a missing
    ``data_dir`` and for bad data.
    """
    reader = READERS.get(name)
    if reader is None:
        raise ValueError(f"unknown dataset reader {name!r}; available: {', '.join(READERS)}")
    params = list(inspect.signature(reader).parameters)[1:]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"{name}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(it takes: {', '.join(params) or 'none'})")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"{name}: data directory {path} does not exist")
    if not path.is_dir() and name not in _FILE_OK:
        raise DataError(f"{name}: {path} is not a directory")
    return reader(path, **options)
