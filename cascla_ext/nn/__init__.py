"""Modules built on the fused ops, ready to drop into other models."""

from .gru import PerturbedGRU

__all__ = ["PerturbedGRU"]
