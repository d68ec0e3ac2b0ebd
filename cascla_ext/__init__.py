"""cascla-ext: C++/CUDA-accelerated CaSCLA for multimodal emotion recognition in conversation.

Layout: ``cascla_ext.ops`` (fused custom ops), ``cascla_ext.reference`` (their
pure-PyTorch twins), ``cascla_ext.nn`` (modules built on the ops).
"""

from __future__ import annotations

import torch

from . import _library

__version__ = "0.1.0"

_LIBRARY_PATH = _library.load()

from . import nn, ops, reference  # noqa: E402
from .config import CaSCLAConfig  # noqa: E402
from .data import Batch, collate  # noqa: E402
from .model import CaSCLA, CaSCLAOutput  # noqa: E402


def build_info() -> dict:
    """What was built: the torch it was built against, and the CUDA kernels if any.

    ``cuda`` says whether CUDA kernels were compiled; ``cuda_kernels_registered``
    checks the loaded library (it is what the dispatcher will actually use).
    """
    info = _library.build_info_module(_LIBRARY_PATH)
    archs = info.CUDA_ARCHS if info else ""
    return {
        "version": __version__,
        "torch_version": info.TORCH_VERSION if info else None,
        "torch_cuda_version": (info.TORCH_CUDA_VERSION or None) if info else None,
        "running_torch_version": torch.__version__,
        "cuda": bool(info.WITH_CUDA) if info else False,
        "cuda_archs": [a for a in archs.split(";") if a],
        "nvcc_version": (info.NVCC_VERSION or None) if info else None,
        "build_type": info.BUILD_TYPE if info else None,
        "cuda_kernels_registered": torch._C._dispatch_has_kernel_for_dispatch_key(
            "cascla_ext::perturbed_gru", "CUDA"
        ),
        "library": str(_LIBRARY_PATH),
    }


__all__ = [
    "Batch", "CaSCLA", "CaSCLAConfig", "CaSCLAOutput", "build_info", "collate", "nn", "ops",
    "reference", "__version__",
]
