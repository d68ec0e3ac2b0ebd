"""Modules built on the fused ops, ready to drop into other models."""

from .fusion import TensorRingFusion
from .gru import PerturbedGRU

__all__ = ["PerturbedGRU", "TensorRingFusion"]
