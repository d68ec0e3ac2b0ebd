"""Modules built on the fused ops, ready to drop into other models."""

from .causal import CausalInteraction
from .contrastive import SPCLLoss, SupConLoss
from .fusion import TensorRingFusion
from .gru import PerturbedGRU
from .scla import SCLALoss

__all__ = ["CausalInteraction", "PerturbedGRU", "SCLALoss", "SPCLLoss", "SupConLoss", "TensorRingFusion"]
