"""Modules built on the fused ops, ready to drop into other models."""

from .gru import PerturbedGRU
from .scla import SCLALoss

__all__ = ["PerturbedGRU", "SCLALoss"]
