"""Presets: a model's widths with its training defaults, in one table.

- ``small``: CPU widths for the built-in synthetic corpus and tests
  (:meth:`CaSCLAConfig.small`), Adam at 1e-3;
- ``base``: CPU widths for real datasets (:meth:`CaSCLAConfig.base`), Adam at 1e-3;
- ``paper``: the paper's widths (d_m 1024, d_h 300; :class:`CaSCLAConfig`'s
  defaults) and its learning rate, 1e-4;
- ``tuned``: settings found by ``cascla tune`` on a dataset's hold-out split
  (never validation or test) with the offline default encoder, one file per
  dataset and encoder setting in ``cascla_ext/tuned/`` (``<dataset>-frozen.json``,
  ``<dataset>-finetuned.json``), in the format ``cascla train --config``
  reads, with where they came from. ``cascla train`` uses the tuned preset of
  a dataset that has one unless ``--preset`` or ``--config`` says otherwise;
  ``--preset paper`` keeps the paper's values.
"""

from __future__ import annotations

from pathlib import Path

from .config import CaSCLAConfig

__all__ = ["LEARNING_RATE", "PRESETS", "WIDTHS", "config_for", "default_widths", "tuned_path", "tuned_presets"]

#: Presets that name model widths (what a config file's ``preset`` may say).
WIDTHS = ("small", "base", "paper")
#: Every ``--preset`` choice.
PRESETS = (*WIDTHS, "tuned")
#: Adam's learning rate with each preset's widths, when nothing else sets it.
LEARNING_RATE = {"small": 1e-3, "base": 1e-3, "paper": 1e-4}
#: Where the tuned presets are (package data).
TUNED_DIR = Path(__file__).with_name("tuned")


def default_widths(dataset: str) -> str:
    """The widths a dataset gets without a preset or a tuned file."""
    return "small" if dataset == "synthetic" else "base"


def config_for(widths: str, **overrides) -> CaSCLAConfig:
    """A config of these widths (``small``, ``base`` or ``paper``), other fields from ``overrides``."""
    if widths not in WIDTHS:
        raise ValueError(f"preset: expected one of {', '.join(WIDTHS)} for the widths, got {widths!r}")
    return CaSCLAConfig(**overrides) if widths == "paper" else getattr(CaSCLAConfig, widths)(**overrides)


def _tuned_name(dataset: str, finetuned: bool) -> str:
    return f"{dataset}-{'finetuned' if finetuned else 'frozen'}"


def tuned_path(dataset: str, finetuned: bool) -> Path | None:
    """The tuned preset of a dataset with the default encoder frozen or fine-tuned, if there is one."""
    path = TUNED_DIR / f"{_tuned_name(dataset, finetuned)}.json"
    return path if path.is_file() else None


def tuned_presets() -> list[str]:
    """The tuned presets shipped, as ``<dataset>-<frozen|finetuned>`` names."""
    return sorted(p.stem for p in TUNED_DIR.glob("*.json")) if TUNED_DIR.is_dir() else []
