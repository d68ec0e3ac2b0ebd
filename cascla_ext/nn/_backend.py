"""What the modules built on the ops share: a choice between a fused op and its reference twin."""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["OpBackend"]


class OpBackend:
    """Mixin for a module that runs one fused op or its pure-PyTorch twin.

    A subclass sets ``_OPS`` (``{"fused": op, "reference": twin}``);
    ``backend`` names the one in use, checked on every assignment, and
    ``op`` is it."""

    _OPS: Mapping[str, Callable] = {}

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in self._OPS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {sorted(self._OPS)}, got {value!r}")
        self._backend = value

    @property
    def op(self) -> Callable:
        return self._OPS[self._backend]
