"""The fused ops: typed Python entry points, fake (meta) implementations for
``torch.compile``, and autograd. Schemas: ``csrc/ops.cpp``; kernels:
``csrc/cpu/`` and ``csrc/cuda/``; the math: ``../shared/spec/ops.md``;
pure-PyTorch twins with the same signatures: :mod:`cascla_ext.reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["perturbed_gru", "tr_attention", "scla_loss"]


def _as_lengths(lengths: Tensor | Sequence[int] | None) -> Tensor | None:
    if lengths is None or isinstance(lengths, Tensor):
        return lengths
    values = list(lengths)
    # No dtype here: a list of floats becomes a float tensor, which the op
    # rejects exactly as it rejects a float tensor (instead of truncating it).
    return torch.as_tensor(values) if values else torch.zeros(0, dtype=torch.int64)


# --------------------------------------------------------------------------
# 1. perturbed_gru


def perturbed_gru(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    rho: Tensor | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One GRU direction with perturbations ``rho`` added inside the gates.

    Args:
        x: (T, B, D) time-major input.
        h0: (B, H) initial state.
        w_ih, w_hh: (3H, D) and (3H, H) weights, gates in PyTorch's order r, z, n.
        b_ih, b_hh: (3H,) biases, or None for none.
        rho: (T, B, 3H) perturbation of the gate pre-activations, or None (= 0).
        lengths: (B,) integer lengths in [0, T] (CPU or x's device), or None (= all T).
        reverse: visit each sequence's valid steps from last to first.

    Returns:
        ``(y, h_n)``: y (T, B, H) the state after each valid step, 0 at padded
        steps; h_n (B, H) the state after the last step visited (h0 where the
        length is 0). Gradients flow to x, h0, the weights, the biases and rho.
        With rho = 0 it equals ``torch.nn.GRU``. Under ``torch.autocast`` it
        computes in float32 and returns y and h_n in the autocast dtype.
    """
    y, h_n, _ = torch.ops.cascla_ext.perturbed_gru.default(
        x, h0, w_ih, w_hh, b_ih, b_hh, rho, _as_lengths(lengths), bool(reverse)
    )
    low = _autocast_dtype(x)
    if low is not None and y.dtype == torch.float32:  # as autocast runs nn.GRU
        y, h_n = y.to(low), h_n.to(low)
    return y, h_n


@torch.library.register_fake("cascla_ext::perturbed_gru")
def _perturbed_gru_fake(x, h0, w_ih, w_hh, b_ih, b_hh, rho, lengths, reverse):
    torch._check(x.dim() == 3, lambda: "perturbed_gru: expected x of shape (T, B, D)")
    torch._check(h0.dim() == 2, lambda: "perturbed_gru: expected h0 of shape (B, H)")
    T, B, _ = x.shape
    H = h0.shape[1]
    return x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(T, B, 4 * H)


@torch.library.register_fake("cascla_ext::perturbed_gru_backward")
def _perturbed_gru_backward_fake(grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, reverse, y, saved):
    T, B, D = x.shape
    H = h0.shape[1]
    return (
        x.new_empty(T, B, D),
        x.new_empty(B, H),
        x.new_empty(3 * H, D),
        x.new_empty(3 * H, H),
        x.new_empty(3 * H),
        x.new_empty(3 * H),
        x.new_empty(T, B, 3 * H),
    )


def _perturbed_gru_setup_context(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, rho, lengths, reverse = inputs
    y, _, saved = output
    ctx.save_for_backward(x, h0, w_ih, w_hh, lengths, y, saved)
    ctx.reverse = reverse
    ctx.has_b_ih, ctx.has_b_hh, ctx.has_rho = b_ih is not None, b_hh is not None, rho is not None
    ctx.mark_non_differentiable(saved)


def _perturbed_gru_backward(ctx, grad_y, grad_h_n, _grad_saved):
    x, h0, w_ih, w_hh, lengths, y, saved = ctx.saved_tensors
    gx, gh0, gw_ih, gw_hh, gb_ih, gb_hh, grho = torch.ops.cascla_ext.perturbed_gru_backward.default(
        grad_y, grad_h_n, x, h0, w_ih, w_hh, lengths, ctx.reverse, y, saved
    )
    return (
        gx,
        gh0,
        gw_ih,
        gw_hh,
        gb_ih if ctx.has_b_ih else None,
        gb_hh if ctx.has_b_hh else None,
        grho if ctx.has_rho else None,
        None,
        None,
    )


torch.library.register_autograd(
    "cascla_ext::perturbed_gru",
    _perturbed_gru_backward,
    setup_context=_perturbed_gru_setup_context,
)


# --------------------------------------------------------------------------
# 2. tr_attention


def tr_attention(
    q1: Sequence[Tensor],
    q2: Sequence[Tensor],
    k1: Sequence[Tensor],
    k2: Sequence[Tensor],
    mask: Tensor,
    scale: float | None = None,
) -> list[Tensor]:
    """Tensor-ring contraction attention over n modalities (spec: ops.md section 2).

    Args:
        q1, q2, k1, k2: lists of n >= 1 tensors, one per modality in ring order.
            ``q1[m]``, ``k1[m]`` are (B, T, s_m); ``q2[m]``, ``k2[m]`` are
            (B, T, w_m), and around the ring w_m = s_{(m+1) mod n}.
        mask: (B, T) bool (or 0/1): which utterances are real.
        scale: the logits' scale, or None for 1/sqrt(s_m * w_m) per modality.

    Returns:
        ``[Out_0, ..., Out_{n-1}]``, Out_m (B, T, s_m, s_m): each real
        utterance's softmax Theta_m[b, t] (over the s_m x w_m outer product of
        q1 k1 and q2 k2) times the ring product of the other modalities'
        pooled matrices A_{m+1} ... A_{m+n-1} (A_j the mean of Theta_j over the
        dialogue's real utterances); 0 at padded utterances. Gradients flow to
        every q1, q2, k1, k2. A dialogue with no real utterance gives zeros.

    The forward saves each utterance's softmax Theta (the op's ``theta``
    output) and the pooled A's for the backward. CUDA takes at most 16
    modalities per call; the CPU any number.
    """
    out, _, _ = torch.ops.cascla_ext.tr_attention.default(
        list(q1), list(q2), list(k1), list(k2), mask, None if scale is None else float(scale)
    )
    return out


def _tr_ranks(q1, q2, k1, k2, mask) -> list[tuple[int, int]]:
    """The checks that the fake implementation needs to give shapes; (s_m, w_m) per modality."""
    n = len(q1)
    torch._check(n >= 1, lambda: "tr_attention: expected q1 to hold one tensor per modality (n >= 1)")
    torch._check(
        len(q2) == n and len(k1) == n and len(k2) == n,
        lambda: "tr_attention: expected q1, q2, k1 and k2 to hold n tensors each",
    )
    torch._check(mask.dim() == 2, lambda: "tr_attention: expected mask of shape (B, T)")
    ranks = []
    for m in range(n):
        for name, t in (("q1", q1[m]), ("q2", q2[m]), ("k1", k1[m]), ("k2", k2[m])):
            torch._check(t.dim() == 3, lambda: f"tr_attention: expected {name}[{m}] of shape (B, T, rank)")
        ranks.append((q1[m].shape[2], q2[m].shape[2]))
    for m in range(n):
        torch._check(
            ranks[m][1] == ranks[(m + 1) % n][0],
            lambda: f"tr_attention: rank mismatch around the ring at modality {m}",
        )
    return ranks


@torch.library.register_fake("cascla_ext::tr_attention")
def _tr_attention_fake(q1, q2, k1, k2, mask, scale=None):
    ranks = _tr_ranks(q1, q2, k1, k2, mask)
    B, T = mask.shape
    out = [q.new_empty(B, T, s, s) for q, (s, _) in zip(q1, ranks)]
    theta = [q.new_empty(B, T, s, w) for q, (s, w) in zip(q1, ranks)]
    pooled = [q.new_empty(B, s, w) for q, (s, w) in zip(q1, ranks)]
    return out, theta, pooled


@torch.library.register_fake("cascla_ext::tr_attention_backward")
def _tr_attention_backward_fake(grad_out, q1, q2, k1, k2, mask, scale, theta, pooled):
    return (
        [torch.empty_like(t) for t in q1],
        [torch.empty_like(t) for t in q2],
        [torch.empty_like(t) for t in k1],
        [torch.empty_like(t) for t in k2],
    )


# Autograd of tr_attention (and of tr_attention_backward: double backward
# raises NotImplementedError) is registered in C++, csrc/tr_attention_autograd.cpp:
# the Python wrapper of register_autograd rebuilds the lists of tensors with
# pytree on every call, about 0.4 ms per forward + backward on a 2-core CPU,
# more than the kernels. The backward is the op tr_attention_backward (fake above).


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{op}: double backward (a gradient of the gradient) is not supported by the fused "
            f"kernel; use cascla_ext.reference.{op.split('::')[1].removesuffix('_backward')} for that"
        )

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


_no_double_backward("cascla_ext::perturbed_gru_backward")


# --------------------------------------------------------------------------
# 3. scla_loss

_REDUCTIONS = ("none", "sum", "mean")


def scla_loss(
    f: Tensor,
    f_aug: Tensor | None,
    z: Tensor,
    y: Tensor,
    alpha: float = 2.0,
    beta: float = 0.5,
    gamma: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Soft-HGR supervised contrastive loss between features and label
    embeddings, with augmented views as extra positives (paper Eqs. 12-18).

    Args:
        f: (M, d) anchor features (valid utterances only), M >= 2, d >= 2.
        f_aug: (P, M, d) augmented views of each anchor (P >= 0), or None for
            none (P = 0).
        z: (K, d) label embeddings.
        y: (M,) int64 labels in [0, K), on f's device.
        alpha, beta: positive and negative focusing parameters (>= 0).
        gamma: exponent of the class-frequency weights (M / n_c)^gamma.
        reduction: "none" (the M per-anchor losses), "sum" (Eq. 18) or "mean"
            (the sum divided by M).

    Returns:
        The loss, () or (M,). Gradients flow to f, f_aug and z. The kernels
        never build an M x M matrix (time O(M K d + K^2 d), memory linear in
        M) and stay finite for similarities in the thousands.
    """
    if f_aug is None:
        f_aug = f.new_empty((0, *f.shape))
    loss, _, _, _ = torch.ops.cascla_ext.scla_loss.default(
        f, f_aug, z, y, float(alpha), float(beta), float(gamma), str(reduction)
    )
    return loss


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{op}: expected reduction to be one of 'none', 'sum', 'mean', got {reduction!r}"
        )


@torch.library.register_fake("cascla_ext::scla_loss")
def _scla_loss_fake(f, f_aug, z, y, alpha, beta, gamma, reduction):
    _check_reduction("scla_loss", reduction)
    torch._check(f.dim() == 2, lambda: "scla_loss: expected f of shape (M, d)")
    torch._check(f_aug.dim() == 3, lambda: "scla_loss: expected f_aug of shape (P, M, d)")
    torch._check(z.dim() == 2, lambda: "scla_loss: expected z of shape (K, d)")
    M, d = f.shape
    P, K = f_aug.shape[0], z.shape[0]
    loss = f.new_empty(M) if reduction == "none" else f.new_empty(())
    return loss, f.new_empty(M, K), f.new_empty(P, M), f.new_empty(K, d, dtype=torch.float64)


@torch.library.register_fake("cascla_ext::scla_loss_backward")
def _scla_loss_backward_fake(grad, f, f_aug, z, y, logits, aug_logits, class_sums, alpha, beta,
                             gamma, reduction):
    _check_reduction("scla_loss_backward", reduction)
    return f.new_empty(f.shape), f.new_empty(f_aug.shape), f.new_empty(z.shape)


def _scla_loss_setup_context(ctx, inputs, output):
    f, f_aug, z, y, alpha, beta, gamma, reduction = inputs
    _, logits, aug_logits, class_sums = output
    ctx.save_for_backward(f, f_aug, z, y, logits, aug_logits, class_sums)
    ctx.params = (alpha, beta, gamma, reduction)
    ctx.mark_non_differentiable(logits, aug_logits, class_sums)


def _scla_loss_backward(ctx, grad_loss, _grad_logits, _grad_aug_logits, _grad_class_sums):
    f, f_aug, z, y, logits, aug_logits, class_sums = ctx.saved_tensors
    grad_f, grad_f_aug, grad_z = torch.ops.cascla_ext.scla_loss_backward.default(
        grad_loss, f, f_aug, z, y, logits, aug_logits, class_sums, *ctx.params
    )
    return grad_f, grad_f_aug, grad_z, None, None, None, None, None


torch.library.register_autograd(
    "cascla_ext::scla_loss", _scla_loss_backward, setup_context=_scla_loss_setup_context
)
_no_double_backward("cascla_ext::scla_loss_backward")


# --------------------------------------------------------------------------
# Mixed precision (torch.autocast)
#
# Under autocast, float16/bfloat16 inputs (and float32 ones: autocast would
# otherwise hand the kernels' internal GEMMs half-precision operands) are cast
# to float32 and each op runs with autocast off, so every product accumulates
# in float32 and nothing is re-cast behind the kernels' back; float64 is left
# alone. The outputs come back in float32: the losses and the tr_attention
# softmax as autocast keeps cross_entropy and softmax, and ``perturbed_gru``'s
# entry point casts y and h_n to the autocast dtype, as autocast runs nn.GRU.
# The backward ops get the same rule (a backward called inside the region).

_AUTOCAST_OPS = ("perturbed_gru", "perturbed_gru_backward", "tr_attention", "tr_attention_backward",
                 "scla_loss", "scla_loss_backward")
for _device_type in ("cpu", "cuda"):
    if torch.amp.is_autocast_available(_device_type):
        for _name in _AUTOCAST_OPS:
            torch.library.register_autocast(f"cascla_ext::{_name}", _device_type, torch.float32)


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype an enabled autocast region on t's device computes in, else None."""
    device_type = t.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
