"""What was built, and that the library registered what it says it did."""

from __future__ import annotations

import torch

import cascla_ext

OPS = ["perturbed_gru", "perturbed_gru_backward", "scla_loss", "scla_loss_backward"]


def test_build_info_describes_the_build():
    info = cascla_ext.build_info()
    assert info["version"] == cascla_ext.__version__
    assert info["torch_version"] == torch.__version__, "the library must be built against the running torch"
    assert isinstance(info["cuda"], bool)
    assert info["cuda"] == info["cuda_kernels_registered"]
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build lists its architectures"
        assert all(a[0].isdigit() for a in info["cuda_archs"])
        assert info["torch_cuda_version"] == torch.version.cuda
    else:
        assert info["cuda_archs"] == []


def test_every_op_has_cpu_kernels_and_matching_cuda_kernels():
    cuda = cascla_ext.build_info()["cuda"]
    for op in OPS:
        name = f"cascla_ext::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == cuda, name


def test_ops_are_pt2_compliant():
    for op in OPS:
        packet = getattr(torch.ops.cascla_ext, op)
        assert torch.Tag.pt2_compliant_tag in packet.default.tags
