"""``PerturbedGRU``: a drop-in ``torch.nn.GRU`` whose gates take perturbations.

The parameters have ``nn.GRU``'s names and shapes, so state dicts load both
ways, and with no perturbation the outputs equal ``nn.GRU``'s. Each layer and
direction runs :func:`cascla_ext.ops.perturbed_gru`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import ops, reference
from ._backend import OpBackend
from .dropout import batch_dropout

__all__ = ["PerturbedGRU"]



class PerturbedGRU(OpBackend, nn.Module):
    """Multi-layer (bi)directional GRU with perturbations inside the gates.

    Arguments as ``torch.nn.GRU``. ``forward(input, hx=None, *, lengths=None,
    perturbation=None)``:

    - ``input``: (T, B, D), (B, T, D) if ``batch_first``, (T, D) unbatched, or a
      ``PackedSequence``.
    - ``hx``: (num_layers * num_directions, B, H) or None (zeros).
    - ``lengths``: (B,) valid lengths of a padded input (not with a
      ``PackedSequence``, which carries its own). Outputs at padded steps are 0
      and the reverse direction starts at each sequence's last valid step, as
      ``nn.GRU`` does on ``pack_padded_sequence(..., enforce_sorted=False)``.
    - ``perturbation``: None, or one entry per layer and direction (index
      ``layer * num_directions + direction``, as ``h_n``), each None or a
      tensor of the gate pre-activations' shape: (T, B, 3H), or (B, T, 3H) if
      ``batch_first`` (for a ``PackedSequence``: time-major, padded, in the
      original batch order; (T, 3H) unbatched). Gates in the order r, z, n.

    Returns ``(output, h_n)`` like ``nn.GRU``.

    ``backend`` selects ``"fused"`` (the C++/CUDA op, default) or
    ``"reference"`` (pure PyTorch, for debugging).
    """

    _OPS = {"fused": ops.perturbed_gru, "reference": reference.perturbed_gru}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "fused",
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PerturbedGRU: {name} must be a positive int, got {value!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"PerturbedGRU: num_layers must be an int >= 1, got {num_layers!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout <= 1.0) or isinstance(
            dropout, bool
        ):
            raise ValueError(f"PerturbedGRU: dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        H = hidden_size
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else H * directions
            for direction in range(directions):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (3 * H, layer_in)), ("weight_hh", (3 * H, H))]
                if bias:
                    shapes += [("bias_ih", (3 * H,)), ("bias_hh", (3 * H,))]
                for pname, shape in shapes:
                    setattr(self, pname + sfx, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(pname + sfx)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """``nn.GRU``'s initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.GRU`` (there is no cuDNN weight buffer)."""

    @property
    def all_weights(self) -> list[list[Tensor]]:
        per = 4 if self.bias else 2
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i : i + per]] for i in range(0, len(names), per)]

    @classmethod
    def from_gru(cls, gru: nn.GRU, **kwargs) -> PerturbedGRU:
        """A ``PerturbedGRU`` with ``gru``'s configuration and a copy of its weights."""
        p = next(gru.parameters())
        module = cls(
            gru.input_size,
            gru.hidden_size,
            num_layers=gru.num_layers,
            bias=gru.bias,
            batch_first=gru.batch_first,
            dropout=gru.dropout,
            bidirectional=gru.bidirectional,
            device=p.device,
            dtype=p.dtype,
            **kwargs,
        )
        module.load_state_dict(gru.state_dict())
        return module

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.backend != "fused":
            s += f", backend={self.backend!r}"
        return s

    def _weights(self, layer: int, direction: int) -> tuple[Tensor, ...]:
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = getattr(self, "weight_ih" + sfx)
        w_hh = getattr(self, "weight_hh" + sfx)
        if not self.bias:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, getattr(self, "bias_ih" + sfx), getattr(self, "bias_hh" + sfx)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        *,
        lengths: Tensor | Sequence[int] | None = None,
        perturbation: Sequence[Tensor | None] | Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        packed = isinstance(input, PackedSequence)
        batch_first = self.batch_first and not packed
        if packed:
            if lengths is not None:
                raise ValueError("PerturbedGRU: lengths must be None for a PackedSequence input")
            x, lengths = pad_packed_sequence(input)  # (T, B, D), original batch order
            unbatched = False
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"PerturbedGRU: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(
                    "PerturbedGRU: expected input of shape (T, B, D), (B, T, D) with batch_first, "
                    f"or (T, D) unbatched, got {tuple(input.shape)}"
                )
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"PerturbedGRU: expected input with {self.input_size} features (input_size), got {x.shape[-1]}"
            )
        T, B, _ = x.shape
        L, dirs, H = self.num_layers, self.num_directions, self.hidden_size

        if hx is None:
            hx = x.new_zeros(L * dirs, B, H)
        else:
            if unbatched:
                if hx.dim() != 2:
                    raise ValueError(f"PerturbedGRU: expected hx of shape ({L * dirs}, {H}) for unbatched input, got {tuple(hx.shape)}")
                hx = hx.unsqueeze(1)
            if tuple(hx.shape) != (L * dirs, B, H):
                raise ValueError(
                    f"PerturbedGRU: expected hx of shape (num_layers * num_directions, B, H) = "
                    f"({L * dirs}, {B}, {H}), got {tuple(hx.shape)}"
                )

        rhos = self._perturbations(perturbation, unbatched, batch_first, T, B)
        run = self.op
        layer_in, h_n = x, []
        for layer in range(L):
            outs = []
            for d in range(dirs):
                idx = layer * dirs + d
                y, h = run(layer_in, hx[idx], *self._weights(layer, d), rhos[idx], lengths, d == 1)
                outs.append(y)
                h_n.append(h)
            layer_in = torch.cat(outs, dim=2) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < L - 1:
                layer_in = batch_dropout(layer_in, self.dropout, batch_dim=1, time_dims=(0,))  # (T, B, .)
        out, h_n = layer_in, torch.stack(h_n)

        if packed:
            return _repack(out, lengths, input), h_n
        if unbatched:
            return out.squeeze(1), h_n.squeeze(1)
        return (out.transpose(0, 1) if batch_first else out), h_n

    def _perturbations(self, perturbation, unbatched, batch_first, T, B) -> list[Tensor | None]:
        n = self.num_layers * self.num_directions
        if perturbation is None:
            return [None] * n
        rhos = list(perturbation)
        if len(rhos) != n:
            raise ValueError(
                f"PerturbedGRU: perturbation must hold num_layers * num_directions = {n} entries "
                f"(one per layer and direction), got {len(rhos)}"
            )
        out = []
        for i, rho in enumerate(rhos):
            if rho is not None:
                if unbatched:
                    rho = rho.unsqueeze(1)
                elif batch_first:
                    rho = rho.transpose(0, 1)
                expected = (T, B, 3 * self.hidden_size)
                if tuple(rho.shape) != expected:
                    want = (B, T, expected[2]) if batch_first else expected
                    raise ValueError(
                        f"PerturbedGRU: expected perturbation[{i}] of shape {want} "
                        f"({'B, T' if batch_first else 'T, B'}, 3*hidden_size), got {tuple(perturbation[i].shape)}"
                    )
            out.append(rho)
        return out


def _repack(out: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a padded (T, B, *) output with the batch order of the input ``like``."""
    if like.sorted_indices is None:
        data, batch_sizes, _, _ = pack_padded_sequence(out, lengths)
        return PackedSequence(data, batch_sizes, None, None)
    order = like.sorted_indices
    data, batch_sizes, _, _ = pack_padded_sequence(
        out.index_select(1, order), lengths.index_select(0, order.cpu())
    )
    return PackedSequence(data, batch_sizes, like.sorted_indices, like.unsorted_indices)
