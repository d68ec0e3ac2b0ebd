"""Build-time metadata for cascla-ext: a scikit-build-core dynamic-metadata provider.

The native library links against libtorch and loads only with the torch it was
compiled against, so the wheel says which one, as packages that ship compiled
PyTorch ops do:

- ``version``: the base version (``__version__`` in ``cascla_ext/__init__.py``)
  with a local label naming that torch: ``0.1.0+pt2.14.1cu130`` for torch
  2.14.1+cu130, ``0.1.0+pt2.13.0cpu`` for a CPU-only torch 2.13.0;
- ``dependencies``: ``torch==<its public version>`` (``torch==2.14.1``), then
  the ``requires`` setting (the rest of the core dependencies).

It runs in the Python that builds the package (``pip install
--no-build-isolation .``), the one CMakeLists.txt compiles against, so both see
the same torch. Configured in pyproject.toml under
``[tool.scikit-build.metadata.version]`` and ``[...dependencies]``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["dynamic_metadata", "local_label", "torch_requirement"]


def _torch_versions() -> tuple[str, str | None, str | None]:
    try:
        import torch
    except ImportError as err:
        raise RuntimeError(
            "cascla-ext: the build needs torch: install torch first, then build with "
            "`pip install --no-build-isolation .`"
        ) from err
    return torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None)


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def torch_requirement(torch_version: str) -> str:
    """``torch==2.14.1`` for torch 2.14.1+cu130 (a pin without the local label
    matches every 2.14.1 build, which is what pip sees as installed)."""
    return f"torch=={_public(torch_version)}"


def local_label(torch_version: str, cuda: str | None = None, hip: str | None = None) -> str:
    """``pt2.14.1cu130`` for torch 2.14.1+cu130: ``pt``, the public version, and
    the build flavour (torch's own local label, else cuXYZ / rocmX.Y / cpu)."""
    flavour = torch_version.partition("+")[2]
    if not flavour:
        flavour = f"cu{cuda.replace('.', '')}" if cuda else f"rocm{hip}" if hip else "cpu"
    label = f"pt{_public(torch_version)}{flavour}"
    label = re.sub(r"[^A-Za-z0-9.]+", ".", label).strip(".")  # PEP 440: alphanumerics and dots
    return label.lower()


def _base_version(path: str) -> str:
    text = Path(path).read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if not match:
        raise RuntimeError(f"cascla-ext: no __version__ = \"...\" in {path}")
    return match.group(1)


def dynamic_metadata(field: str, settings: dict[str, Any]) -> str | list[str]:
    """scikit-build-core's provider hook (the ``tool.scikit-build.metadata`` form)."""
    torch_version, cuda, hip = _torch_versions()
    if field == "version":
        base = _base_version(settings.get("input", "cascla_ext/__init__.py"))
        return f"{base}+{local_label(torch_version, cuda, hip)}"
    if field == "dependencies":
        return [torch_requirement(torch_version), *settings.get("requires", [])]
    raise RuntimeError(f"cascla-ext: tools/cascla_metadata.py provides version and dependencies, not {field}")
