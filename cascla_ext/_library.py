"""Loads the native library (csrc/, built by CMake) into torch.ops.cascla_ext."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

LIBRARY_NAME = "libcascla_ops.so"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = [here / LIBRARY_NAME]
    # Editable installs keep the Python sources here and the built library in
    # site-packages/cascla_ext; look there too.
    for entry in sys.path:
        if entry:
            found.append(Path(entry) / "cascla_ext" / LIBRARY_NAME)
    return found


def library_path() -> Path:
    override = os.environ.get("CASCLA_EXT_LIBRARY")
    if override:
        return Path(override)
    for path in _candidates():
        if path.is_file():
            return path
    raise ImportError(
        f"cascla_ext: the native library {LIBRARY_NAME} was not found next to the package. "
        "Build it with `pip install --no-build-isolation .` (torch must be installed first)."
    )


def build_info_module(path: Path) -> ModuleType | None:
    """The _build_info.py that CMake wrote next to the library at ``path``."""
    info = path.parent / "_build_info.py"
    if not info.is_file():
        return None
    spec = importlib.util.spec_from_file_location("cascla_ext._build_info", info)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> Path:
    path = library_path()
    try:
        torch.ops.load_library(str(path))
    except OSError as err:
        raise ImportError(load_error_message(path, err)) from err
    return path


def load_error_message(path: Path, err: BaseException) -> str:
    """Why the library did not load: the loader's own message, then what it was
    built against when that is not the running torch (the usual cause)."""
    info = build_info_module(path)
    built = info.TORCH_VERSION if info else None
    message = f"cascla_ext: could not load {path}: {loader_message(err)}"
    if built is None:
        return (f"{message}. Its build record (_build_info.py) is missing; rebuild against this torch "
                f"({torch.__version__}) with `pip install --no-build-isolation .`")
    if built != torch.__version__:
        return (f"{message}. It was built against torch {built}, this is torch {torch.__version__}: "
                f"install torch=={built.split('+')[0]} or rebuild against this torch with "
                "`pip install --no-build-isolation .`")
    return f"{message} (it was built against this torch, {built})"


def loader_message(err: BaseException) -> str:
    """The dynamic loader's own words (``undefined symbol: ...``, ``file too
    short``): torch.ops.load_library replaces them with "Could not load this
    library" and keeps the original as the cause."""
    while err.__cause__ is not None and err.__cause__ is not err:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__
