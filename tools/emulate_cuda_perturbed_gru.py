"""Check the opt-in persistent CUDA forward of perturbed_gru without a GPU:
run persistent_forward_kernel (csrc/cuda/perturbed_gru_persistent.cuh) on the
CPU (tools/cuda_emulation/perturbed_gru_persistent_emulator.cpp: every thread
of the cooperative grid a std::thread, barriers for the grid, the blocks and
the warp shuffles) through the op's driver, and compare y, h_n and the saved
gate values (what the per-step backward reads) with the CPU op, and y and h_n
with the reference, in float64 and float32, both directions, with and
without rho and lengths (zero lengths included), for emulated GPUs of a few
multiprocessors (so that blocks own 1 to 4 units, the last one partly past H).

    python tools/emulate_cuda_perturbed_gru.py      # from the repository root, after a build

It builds a small torch extension (a minute or two) and prints one line per
case; the exit status is 1 if any case differs. It checks the kernel's logic,
not the CUDA toolchain nor speed: tools/dev_build.sh cuda and a GPU do that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cascla_ext  # noqa: E402,F401  (the CPU op to compare with)
from cascla_ext import reference  # noqa: E402


def build():
    return load(
        name="perturbed_gru_persistent_emulator",
        sources=[str(ROOT / "tools/cuda_emulation/perturbed_gru_persistent_emulator.cpp"),
                 str(ROOT / "csrc/perturbed_gru.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1", "-std=c++20"],
        verbose=False,
    )


def inputs(T, B, D, H, dtype, rho, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (0.5 * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return [rnd(T, B, D), rnd(B, H), rnd(3 * H, D), rnd(3 * H, H), rnd(3 * H), rnd(3 * H),
            rnd(T, B, 3 * H) if rho else None]


def main() -> int:
    emu = build()
    # name, T, B, D, H, lengths, emulated multiprocessors
    cases = [
        ("H13_sms4", 7, 3, 5, 13, [7, 0, 3], 4),   # J = 4, the last block owns unit 12 only
        ("H6_sms2", 5, 4, 3, 6, [5, 5, 1, 2], 2),  # J = 3, two full blocks
        ("H5_sms8", 4, 2, 3, 5, None, 8),          # J = 1, five blocks
        ("H33_sms3", 6, 5, 4, 33, [6, 2, 0, 6, 1], 3),  # J = 11, more units than a warp's lanes
        ("T1", 1, 2, 3, 7, [1, 0], 3),             # one step: h_n in the second buffer
    ]
    failed = 0
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        for name, T, B, D, H, lengths, sms in cases:
            for rho in (True, False):
                for reverse in (False, True):
                    args = inputs(T, B, D, H, dtype, rho)
                    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
                    got = emu.forward(*args, lens, reverse, sms)
                    want = torch.ops.cascla_ext.perturbed_gru.default(*args, lens, reverse)
                    ref = reference.perturbed_gru(*args, lengths=lens, reverse=reverse)
                    err = max((a - b).abs().max().item() for a, b in zip(got, want))
                    rerr = max((a - b).abs().max().item() for a, b in zip(got[:2], ref))
                    ok = err <= tol and rerr <= 10 * tol
                    failed += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:8s} {name:9s} blocks={emu.blocks(H, sms)} "
                          f"rho={rho!s:5s} reverse={reverse!s:5s}: max |diff| vs CPU op (y, h_n, saved) "
                          f"{err:.2e}, vs reference (y, h_n) {rerr:.2e}", flush=True)
    print("all cases agree" if not failed else f"{failed} case(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
