"""Modules built on the fused ops, ready to drop into other models."""

from .fusion import TensorRingFusion
from .gru import PerturbedGRU
from .scla import SCLALoss

__all__ = ["PerturbedGRU", "TensorRingFusion", "SCLALoss"]
