"""Check the CUDA kernels of tr_attention without a GPU: run them on the CPU
(tools/cuda_emulation/tr_attention_emulator.cpp: a std::thread per CUDA
thread, barriers for __syncthreads and the warp shuffles) and compare with the
CPU op, forward (out, theta, pooled) and backward (all four gradients), in
float64 and float32, over rings of 1 to 4 modalities, masks with empty, full
and holed dialogues, and dialogues longer than one 16-utterance chunk.

    python tools/emulate_cuda_tr_attention.py      # from the repository root, after a build

It builds a small torch extension (about a minute) and prints one line per
case; the exit status is 1 if any case differs. It checks the kernels' logic,
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


def build():
    return load(
        name="tr_attention_cuda_emulator",
        sources=[str(ROOT / "tools/cuda_emulation/tr_attention_emulator.cpp"), str(ROOT / "csrc/tr_attention.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O1", "-std=c++20"],
        verbose=False,
    )


def inputs(B, T, ranks, lengths, dtype, seed=0, amplitude=1.0):
    g = torch.Generator().manual_seed(seed)
    n = len(ranks)
    shapes = [(ranks[m], ranks[(m + 1) % n]) for m in range(n)]
    rnd = lambda *s: (amplitude * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    q1 = [rnd(B, T, s) for s, _ in shapes]
    q2 = [rnd(B, T, w) for _, w in shapes]
    k1 = [rnd(B, T, s) for s, _ in shapes]
    k2 = [rnd(B, T, w) for _, w in shapes]
    if isinstance(lengths[0], list):
        mask = torch.tensor(lengths, dtype=torch.bool)
    else:
        mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    grads = [rnd(B, T, s, s) for s, _ in shapes]
    return q1, q2, k1, k2, mask, grads


def reference_errors(q1, q2, k1, k2, mask, scale, grads, outs, grad_lists):
    """Max |diff| of the emulated outputs and gradients (dq1, dq2, dk1, dk2)
    from cascla_ext.reference's (autograd), computed in float64."""
    from cascla_ext import reference

    lists = [[t.detach().double().requires_grad_(True) for t in group] for group in (q1, q2, k1, k2)]
    ref = reference.tr_attention(*lists, mask, scale)
    total = sum((o * g.double()).sum() for o, g in zip(ref, grads))
    flat = [t for group in lists for t in group]
    ref_g = torch.autograd.grad(total, flat, allow_unused=True) if total.requires_grad else [None] * len(flat)
    err = max([(a.double() - b.detach()).abs().max().item() if a.numel() else 0.0 for a, b in zip(outs, ref)]
              + [0.0])
    gerr = 0.0
    for a, b in zip(grad_lists, ref_g):
        if a.numel():
            b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
            gerr = max(gerr, (a.double() - b).abs().max().item())
    return err, gerr


def main() -> int:
    emu = build()
    cases = [
        ("n1", 2, 5, (3,), [5, 2]),
        ("n2", 3, 6, (3, 5), [6, 0, 2]),
        ("n3", 3, 41, (5, 3, 4), [41, 23, 0]),
        ("n3_rank16", 2, 20, (16, 16, 16), [20, 17]),
        ("n4_holes", 2, 6, (3, 1, 2, 5), [[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1]]),
        ("empty_T", 2, 0, (2, 3), [0, 0]),
        # odd sizes: ranks 1 and 7, a prime T, an odd B, more pairs than threads
        ("odd_n3", 5, 17, (7, 1, 3), [17, 1, 9, 0, 13]),
        ("odd_n2", 1, 33, (9, 5), [31]),
        ("big_pairs", 1, 3, (17, 18, 19), [3]),
    ]
    failed = 0
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        for name, B, T, ranks, lengths, in cases:
            for scale in (None, 0.7):
                q1, q2, k1, k2, mask, grads = inputs(B, T, ranks, lengths, dtype)
                n = len(ranks)
                want = torch.ops.cascla_ext.tr_attention.default(q1, q2, k1, k2, mask, scale)
                got = emu.forward(q1, q2, k1, k2, mask, scale)
                want = [t for part in want for t in part]
                theta, pooled = got[n:2 * n], got[2 * n:]
                want_g = torch.ops.cascla_ext.tr_attention_backward.default(
                    grads, q1, q2, k1, k2, mask, scale, theta, pooled)
                got_g = emu.backward(grads, q1, q2, k1, k2, mask, scale, theta, pooled)
                want_g = [t for part in want_g for t in part]
                err = max([(a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(got, want)]
                          + [0.0])
                gerr = max([(a - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(got_g, want_g)]
                           + [0.0])
                rerr, rgerr = reference_errors(q1, q2, k1, k2, mask, scale, grads, got[:n], got_g)
                ok = err <= tol and gerr <= tol and rerr <= 10 * tol and rgerr <= 10 * tol
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:8s} {name:10s} scale={scale}: "
                      f"max |diff| forward {err:.2e}, backward {gerr:.2e}; "
                      f"vs reference {rerr:.2e}, {rgerr:.2e}")
    # Logits of ~1e10 (float32) and ~1e19 (float64): the softmax's max and its
    # exponent must see the same rounded logit (no FMA contraction), or Theta
    # comes out uniform or NaN where the CPU op (and the reference) is one-hot.
    for dtype, amplitude in ((torch.float32, 600.0), (torch.float64, 1e5)):
        q1, q2, k1, k2, mask, _ = inputs(2, 3, (8,), [3, 2], dtype, seed=4, amplitude=amplitude)
        want = torch.ops.cascla_ext.tr_attention.default(q1, q2, k1, k2, mask, None)[1][0]
        got = emu.forward(q1, q2, k1, k2, mask, None)[1]
        err = (got - want).abs().max().item()
        ok = bool(torch.isfinite(got).all()) and err <= 1e-5
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:8s} large logits (inputs x {amplitude:g}): "
              f"max |diff| theta {err:.2e}")
    print("all cases agree" if not failed else f"{failed} case(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
