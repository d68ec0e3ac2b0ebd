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

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .config import CaSCLAConfig

__all__ = ["LEARNING_RATE", "PRESETS", "Preset", "TABLE", "WIDTHS", "config_for", "default_widths", "preset_fields", "tuned_path",
           "tuned_presets"]


@dataclass(frozen=True)
class Preset:
    """One row of the table: the CaSCLAConfig fields it sets (over the
    config's defaults, which are the paper's) and its training defaults."""

    name: str
    model: Mapping = field(default_factory=dict)
    lr: float = 1e-3


#: The presets that name model widths, in one table (what a config file's ``preset`` may say).
TABLE: Mapping[str, Preset] = MappingProxyType({
    "small": Preset("small", MappingProxyType(dict(
        d_model=64, encoder_heads=4, encoder_ff=128, d_fused=64, d_hidden=48, d_feature=64,
        label_embedding_dim=32, ranks=MappingProxyType({"t": 8, "a": 6, "v": 6}))), lr=1e-3),
    # a quarter of the paper's d_m, d_h 128, the paper's ring ranks: MELD or IEMOCAP in minutes per seed
    "base": Preset("base", MappingProxyType(dict(
        d_model=256, encoder_heads=4, encoder_ff=512, d_fused=256, d_hidden=128, d_feature=256,
        label_embedding_dim=128, ranks=MappingProxyType({"t": 16, "a": 16, "v": 16}))), lr=1e-3),
    "paper": Preset("paper", MappingProxyType({}), lr=1e-4),
})
#: Presets that name model widths.
WIDTHS = tuple(TABLE)
#: Every ``--preset`` choice.
PRESETS = (*WIDTHS, "tuned")
#: Adam's learning rate with each preset's widths, when nothing else sets it (from :data:`TABLE`).
LEARNING_RATE = MappingProxyType({name: p.lr for name, p in TABLE.items()})
#: Where the tuned presets are (package data).
TUNED_DIR = Path(__file__).with_name("tuned")


def default_widths(dataset: str) -> str:
    """The widths a dataset gets without a preset or a tuned file."""
    return "small" if dataset == "synthetic" else "base"


def preset_fields(widths: str) -> dict:
    """The CaSCLAConfig fields of a preset's widths (fresh, mutable copies)."""
    if widths not in TABLE:
        raise ValueError(f"preset: expected one of {', '.join(WIDTHS)} for the widths, got {widths!r}")
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in TABLE[widths].model.items()}


def config_for(widths: str, **overrides) -> CaSCLAConfig:
    """A config of these widths (``small``, ``base`` or ``paper``), other fields from ``overrides``."""
    from .config import CaSCLAConfig

    return CaSCLAConfig(**{**preset_fields(widths), **overrides})


def _tuned_name(dataset: str, finetuned: bool) -> str:
    return f"{dataset}-{'finetuned' if finetuned else 'frozen'}"


def tuned_path(dataset: str, finetuned: bool) -> Path | None:
    """The tuned preset of a dataset with the default encoder frozen or fine-tuned, if there is one."""
    path = TUNED_DIR / f"{_tuned_name(dataset, finetuned)}.json"
    return path if path.is_file() else None


def tuned_presets() -> list[str]:
    """The tuned presets shipped, as ``<dataset>-<frozen|finetuned>`` names."""
    return sorted(p.stem for p in TUNED_DIR.glob("*.json")) if TUNED_DIR.is_dir() else []
