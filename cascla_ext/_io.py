"""Atomic file writes: write a temporary file beside the target, then rename,
so a crash or an interrupt never leaves a half-written file behind.

Files get the mode an ordinary ``open(path, "w")`` would give them (0666 less
the user's umask), not ``mkstemp``'s private 0600, so a shared cache or run
folder stays readable to whoever the umask lets read it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read without changing it for other threads where /proc has it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a newly created regular file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode of a newly created directory under the current umask."""
    return 0o777 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically. The object is serialised in memory
    first, so a write error (a full disk) surfaces as the ``OSError`` it is,
    not as the serializer's ``RuntimeError``, and leaves no partial file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()), binary=True)


def atomic_write_json(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda fh: (json.dump(obj, fh, indent=2), fh.write("\n")))
