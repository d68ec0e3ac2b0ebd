"""Dropout whose masks are the global batch's (issue 16, docs/distributed.md).

In a distributed step each rank holds some dialogues of the global batch,
padded to its own longest one. :func:`batch_dropout` draws the mask of an
activation (B, T, ...) for the **global** batch's padded shape
(B_global, T_global, ...) from the default generator and keeps this rank's
rows and first T steps. Every rank draws the same global masks in the same
order from the same stream, so a dialogue gets the mask it gets in one
process on the global batch, and the ranks' streams stay in step. In one
process (no layout) the global batch is the batch, and the mask is drawn
as ATen's dropout draws it (``empty_like(x).bernoulli_(1 - p)``, divided by
1 - p): on the CPU exactly ``F.dropout``'s, bit for bit. (On CUDA
``F.dropout`` has a fused kernel with a stream of its own: the masks are
other draws of the same distribution.)

The layout comes from the batch (``Batch.global_layout``, set by the
training loop) through :func:`global_batch`, which ``CaSCLA.forward``
enters; the sites are :class:`BatchDropout` modules and
:class:`TransformerEncoderLayer` (whose attention-weight dropout PyTorch
draws inside ``nn.MultiheadAttention``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchDropout", "TransformerEncoderLayer", "batch_dropout", "global_batch"]

#: The layout of the batch being forwarded (an object with ``rows`` (a
#: slice: this batch's dialogues in the global batch), ``size`` (the global
#: batch's dialogues) and ``length`` (its padded length)), or None.
_LAYOUT: ContextVar = ContextVar("cascla_global_batch", default=None)


@contextlib.contextmanager
def global_batch(layout):
    """While the block runs, :func:`batch_dropout` draws for ``layout``
    (``cascla_ext.data.GlobalLayout``; None: the batch is the global batch)."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def batch_dropout(x: Tensor, p: float, training: bool = True, *, batch_dim: int = 0,
                  time_dims: Sequence[int] = (1,), memory_order: Sequence[int] | None = None) -> Tensor:
    """Dropout of x with the global batch's mask (see the module's notes).

    ``batch_dim``: x's dialogue dimension; ``time_dims``: its utterance
    dimensions (padded to the global length in the global mask; the
    attention weights have two). ``memory_order``: x's dimensions from the
    outermost to the innermost in memory, the order in which the mask is
    drawn (None: as listed). It is a fixed property of a site, never read
    from x's strides (which are ambiguous where a rank has one dialogue or
    one utterance), so every rank draws alike; it matters only for being
    ``F.dropout``'s draw in one process, which fills the mask in x's memory
    order. No host sync: the layout is host data, the mask is sliced."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"batch_dropout: expected p in [0, 1], got {p}")
    if not training or p == 0 or x.numel() == 0:
        return x
    if p == 1:
        return x * x.new_zeros(())
    layout = _LAYOUT.get()
    dims = range(x.dim())
    order = list(dims) if memory_order is None else list(memory_order)
    shape = list(x.shape)
    if layout is not None:
        shape[batch_dim] = layout.size
        for d in time_dims:
            shape[d] = layout.length
    noise = x.new_empty([shape[d] for d in order]).bernoulli_(1 - p)
    noise.div_(1 - p)
    noise = noise.permute([order.index(d) for d in dims])
    if layout is not None:
        index = [slice(None)] * x.dim()
        index[batch_dim] = layout.rows
        for d in time_dims:
            index[d] = slice(0, x.shape[d])
        noise = noise[tuple(index)]
        if noise.shape != x.shape:
            raise ValueError(f"batch_dropout: an activation of shape {tuple(x.shape)} does not fit the global "
                             f"batch's layout ({layout}): dims {batch_dim} (dialogues) and {tuple(time_dims)} "
                             "(utterances)")
        noise = noise.contiguous()  # keeps only this rank's part alive for the backward
    return x * noise


class BatchDropout(nn.Dropout):
    """``nn.Dropout`` for activations (B, T, ...) with :func:`batch_dropout`'s
    masks. ``time_major``: x is laid out utterance-major in memory (the
    transposed output of a (T, B, ...) computation: the GRU's, the attention's)."""

    def __init__(self, p: float = 0.5, time_major: bool = False):
        super().__init__(p)
        self.time_major = time_major

    def forward(self, x: Tensor) -> Tensor:
        order = (1, 0, *range(2, x.dim())) if self.time_major else None
        return batch_dropout(x, self.p, self.training, memory_order=order)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (``batch_first``) with batch-consistent
    dropout everywhere: the feed-forward, residual and attention-weight
    dropouts draw :func:`batch_dropout`'s masks. The same parameters under
    the same names (checkpoints load either way). Training with dropout runs
    the self-attention here, as ``F.multi_head_attention_forward`` and
    PyTorch's math attention compute it (the same operations in the same
    layouts, half precision computed in float32), with the weights' mask
    (B, heads, T, T) drawn for the global batch; otherwise (evaluation,
    dropout 0) PyTorch's own path runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attn = self.self_attn
        if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("TransformerEncoderLayer: expected batch_first self-attention with packed "
                             "projections, no bias_k/bias_v and no add_zero_attn")
        p = self.dropout.p
        self.dropout = BatchDropout(p)
        self.dropout1 = BatchDropout(p, time_major=True)  # the attention's output is (T, B, E) transposed
        self.dropout2 = BatchDropout(p)

    def _sa_block(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  is_causal: bool = False) -> Tensor:
        p = self.self_attn.dropout
        if not (self.training and p > 0):
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        return self.dropout1(self._attention(x, attn_mask, key_padding_mask, p))

    def _attention(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, p: float
                   ) -> Tensor:
        """Self-attention of x (B, T, E) with attention-weight dropout p.
        The masks are additive floats, as the layer's forward makes them
        (``key_padding_mask`` (B, T), ``attn_mask`` (T, T) or (B * heads, T, T))."""
        mha = self.self_attn
        B, T, E = x.shape
        H = mha.num_heads
        hd = E // H
        proj = F.linear(x.transpose(0, 1), mha.in_proj_weight, mha.in_proj_bias)  # (T, B, 3E)
        proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = (t.view(T, B * H, hd).transpose(0, 1).view(B, H, T, hd) for t in proj)
        mask = None if key_padding_mask is None else key_padding_mask.view(B, 1, 1, T)
        if attn_mask is not None:
            attn_mask = attn_mask.view(B, H, T, T) if attn_mask.dim() == 3 else attn_mask
            mask = attn_mask if mask is None else attn_mask + mask
        dtype = q.dtype
        with torch.autocast(x.device.type, enabled=False):
            if dtype in (torch.float16, torch.bfloat16):
                q, k, v = q.float(), k.float(), v.float()
                mask = None if mask is None else mask.float()
            scale = math.sqrt(1.0 / math.sqrt(hd))
            w = torch.matmul(q * scale, k.transpose(-2, -1) * scale)
            if mask is not None:
                w = w + mask
            w = batch_dropout(torch.softmax(w, dim=-1), p, time_dims=(2, 3))
            out = torch.matmul(w, v).to(dtype)  # (B, H, T, hd)
        out = out.permute(2, 0, 1, 3).contiguous().view(T * B, E)
        return F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(T, B, E).transpose(0, 1)
