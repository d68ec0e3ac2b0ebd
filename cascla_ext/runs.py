"""Run folders: one training run (or one ``--seeds`` study) per folder.

``claim_run_dir(path)`` is what ``cascla train`` (and :func:`cascla_ext.train.train`)
does before it writes anything:

- the folder is locked for the run with an advisory ``flock`` on
  ``path/.cascla.lock``; the kernel drops it when the process ends, however
  it ends, so a crashed run never leaves a folder stuck, and a second run
  into the same folder fails at once with one line;
- a folder that already holds a run (``model.pt``, ``metrics.json``,
  ``summary.json`` or ``seed_<s>/``) is not overwritten unless asked
  (``overwrite=True``, ``--overwrite``);
- a folder that the claim created is removed again if the run fails before
  writing anything into it, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RUN_FILES", "RunFolderError", "check_run_dir", "claim_run_dir", "folder_lock"]

#: What a run writes into its folder (besides ``seed_<s>/`` folders of a ``--seeds`` study).
RUN_FILES = ("model.pt", "metrics.json", "summary.json")
LOCK_FILE = ".cascla.lock"


class RunFolderError(ValueError):
    """The run folder cannot be used: not a folder, in use, or holding a finished run."""


def _existing_run(path: Path) -> list[str]:
    found = [name for name in RUN_FILES if (path / name).exists()]
    found += sorted(p.name + "/" for p in path.glob("seed_*") if p.is_dir())
    return found


def check_run_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early (before data is loaded) where :func:`claim_run_dir` would fail.
    Returns the folder as a Path; creates nothing."""
    if not str(path).strip():
        raise RunFolderError("--out must name a folder for the run, got an empty string")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} exists and is not a directory")
    if path.is_dir() and not overwrite:
        found = _existing_run(path)
        if found:
            raise RunFolderError(f"--out {path} already holds a run ({', '.join(found)}); pass --overwrite "
                                 "to replace it, or choose another folder")
    return path


@contextlib.contextmanager
def folder_lock(path: Path, lock_name: str, busy: str) -> Iterator[None]:
    """Hold an advisory flock on ``path/lock_name`` (which records this pid)
    for the block; the kernel drops it when the process ends, however it
    ends. Raises RunFolderError(``busy`` + who holds it) if another process does."""
    fh = open(path / lock_name, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunFolderError(busy.format(holder=holder)) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


@contextlib.contextmanager
def claim_run_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Create (if needed) and lock ``path`` for one run; yields it as a Path.

    Raises RunFolderError if another process holds the folder, or if it
    holds a run and ``overwrite`` is False. On an exception inside the block
    a folder created here that is still empty (but for the lock) is removed.
    """
    path = check_run_dir(path, overwrite=overwrite)
    created = []
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            created.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    with folder_lock(path, LOCK_FILE, f"--out {path} is in use by another cascla run ({{holder}}); wait for it "
                                      "to finish or choose another folder"):
        # Re-check under the lock: a run may have finished between the check and the lock.
        if not overwrite and _existing_run(path):
            raise RunFolderError(f"--out {path} already holds a run ({', '.join(_existing_run(path))}); "
                                 "pass --overwrite to replace it, or choose another folder")
        try:
            yield path
        except BaseException:
            if created and not [p for p in path.iterdir() if p.name != LOCK_FILE]:
                lock_path.unlink(missing_ok=True)
                for folder in reversed(created):  # innermost first
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise
