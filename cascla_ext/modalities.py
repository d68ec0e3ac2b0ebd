"""The modalities: their canonical names, in ring order, and the long names
accepted for them. One helper for the fusion module, the config and the CLI."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MODALITIES", "MODALITY_ALIASES", "MODALITY_NAMES", "canonical_modality", "parse_modalities"]

#: Canonical names, in the order of the fusion ring (and of a config's default ``modalities``).
MODALITIES = ("t", "a", "v")
#: Canonical name -> long name (for messages).
MODALITY_NAMES = {"t": "text", "a": "audio", "v": "visual"}
#: Every name accepted for a modality (canonical and long) -> the canonical one.
MODALITY_ALIASES = {**{m: m for m in MODALITIES}, **{long: m for m, long in MODALITY_NAMES.items()}}


def canonical_modality(name) -> str | None:
    """The canonical name of ``name`` (``"text"`` -> ``"t"``), or None if it names none."""
    return MODALITY_ALIASES.get(name) if isinstance(name, str) else None


def parse_modalities(names: Iterable, what: str = "modalities") -> tuple[str, ...]:
    """Canonical names of ``names``, in the order given; a ValueError naming
    ``what`` for an unknown name or one given twice."""
    out: list[str] = []
    for name in names:
        key = canonical_modality(name)
        if key is None:
            raise ValueError(f"{what}: unknown modality {name!r} (expected t, a, v or text, audio, visual)")
        if key in out:
            raise ValueError(f"{what}: modality {name!r} given twice")
        out.append(key)
    return tuple(out)
