"""A content-addressed on-disk cache for feature arrays.

An entry is ``<cache_dir>/<kind>/<hash>.npy`` (the array) plus ``<hash>.json``
(the key, for humans), where ``hash`` is the SHA-256 of the key's canonical
JSON. Both are written atomically (``cascla_ext._io.atomic_write``), so a
reader sees a whole entry or none; an entry that cannot be read back anyway
(truncated by hand, a full disk, another numpy) is recomputed, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._io import atomic_write, atomic_write_json

__all__ = ["FeatureCache", "default_cache_dir", "file_sha256", "key_hash"]

_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def default_cache_dir() -> Path:
    """``$CASCLA_CACHE`` if set (and not empty), else ``~/.cache/cascla_ext``."""
    env = os.environ.get("CASCLA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cascla_ext"


def _json_default(obj):
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cache key: {type(obj).__name__} is not JSON-serialisable ({obj!r})")


_SHA_MEMO: dict[tuple, str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (remembered per path, size and mtime for the
    process: the audio and the visual pass read a MELD clip once, not twice;
    ATOMIC's CSV files key its cache by content, not by modification time)."""
    st = os.stat(path)
    stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _SHA_LOCK:
        known = _SHA_MEMO.get(stamp)
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    with _SHA_LOCK:
        _SHA_MEMO[stamp] = h.hexdigest()
    return h.hexdigest()


def canonical_json(key: dict) -> str:
    """The key as JSON with sorted keys and no insignificant whitespace."""
    return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def key_hash(key: dict) -> str:
    """SHA-256 (hex) of the key's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


class FeatureCache:
    """Arrays cached on disk under ``cache_dir``; ``cache_dir=None`` disables caching.

    >>> cache = FeatureCache(default_cache_dir())
    >>> x = cache.get_or_compute("text", {"encoder": fp, "texts": h}, lambda: encoder.encode(texts))
    """

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()

    @property
    def enabled(self) -> bool:
        return self.cache_dir is not None

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.cache_dir) if self.enabled else None!r})"

    def path_for(self, kind: str, key: dict) -> Path:
        """Where the entry's array lives (its key sits beside it, with suffix ``.json``)."""
        if not self.enabled:
            raise ValueError("FeatureCache: caching is disabled (cache_dir=None)")
        if not _KIND.match(kind):
            raise ValueError(f"FeatureCache: kind must be a plain name (letters, digits, _ . -), got {kind!r}")
        return self.cache_dir / kind / f"{key_hash(key)}.npy"

    def load(self, kind: str, key: dict) -> np.ndarray | None:
        """The cached array, or None where there is none or it cannot be read."""
        if not self.enabled:
            return None
        path = self.path_for(kind, key)
        if not path.exists():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            warnings.warn(f"FeatureCache: unreadable entry {path} ({exc}); recomputing it", stacklevel=3)
            return None

    def store(self, kind: str, key: dict, array: np.ndarray) -> Path:
        """Write the array and its key (the array first: the key file is only documentation)."""
        path = self.path_for(kind, key)
        atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False), binary=True)
        meta = {"kind": kind, "key": json.loads(canonical_json(key)), "shape": list(array.shape),
                "dtype": str(array.dtype)}
        atomic_write_json(meta, path.with_suffix(".json"))
        return path

    def get_or_compute(self, kind: str, key: dict, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array for (kind, key); else ``compute()``, stored, and returned."""
        if self.enabled:
            canonical_json(key)  # fail on an unserialisable key before computing anything
            cached = self.load(kind, key)
            if cached is not None:
                return cached
        array = np.asarray(compute())
        if self.enabled:
            self.store(kind, key, array)
        return array
