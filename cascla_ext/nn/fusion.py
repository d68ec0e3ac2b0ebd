"""``TensorRingFusion``: the feature-aware, modality-balancing fusion of CaSCLA
(paper section 3.1, Eqs. 2-6; spec: ``../shared/spec/model.md`` item 2).

For each configured modality m with features c^m (B, T, d_m):

- four rank projections q1 = c W_Q^(1), q2 = c W_Q^(2), k1 = c W_K^(1),
  k2 = c W_K^(2) (Eq. 2), to ranks s_m = r_m and w_m = r_{next modality};
- :func:`cascla_ext.ops.tr_attention` (Eqs. 2-4) -> Out_m (B, T, r_m, r_m);
- Att^m = Linear(flatten(Out_m)) -> d_m (Eq. 4);
- x^m = Att^m * c^m + eta * c^m (element-wise, Eq. 5);
- x = sum_m W^m x^m / (||W^m||_F ||x^m||_2), W^m: d_m -> d_x (Eq. 6).

Each normalised term has norm at most 1 (||W x|| <= ||W||_2 ||x|| <= ||W||_F ||x||),
so no modality can dominate x by its scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import ops, reference
from ._backend import OpBackend
from ..modalities import MODALITIES, canonical_modality

__all__ = ["TensorRingFusion", "MODALITIES"]



def _positive_int(owner: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


class _Branch(nn.Module):
    """One modality's parameters: the rank projections, Att's Linear and W^m."""

    def __init__(self, d: int, s: int, w: int, out_dim: int, bias: bool, factory: dict) -> None:
        super().__init__()
        self.q1 = nn.Linear(d, s, bias=bias, **factory)
        self.q2 = nn.Linear(d, w, bias=bias, **factory)
        self.k1 = nn.Linear(d, s, bias=bias, **factory)
        self.k2 = nn.Linear(d, w, bias=bias, **factory)
        self.att = nn.Linear(s * s, d, **factory)
        self.out = nn.Linear(d, out_dim, bias=False, **factory)


class TensorRingFusion(OpBackend, nn.Module):
    """Modality-balancing fusion with tensor-ring contraction attention (Eqs. 2-6).

    Args:
        dims: the configured modalities and their widths d_m, e.g.
            ``{"t": 1024, "a": 300, "v": 342}``: any non-empty subset of
            t, a, v (or text, audio, visual). The ring runs in the order t, a, v.
        out_dim: d_x, the common width of the fused x.
        ranks: the ring's ranks: one int for every modality, or a mapping
            modality -> r_m. Modality m's attention matrices are r_m x r_{next}.
        eta: weight of the unimodal features in x^m = Att^m * c^m + eta * c^m (Eq. 5), in [0, 1].
        scale: the logits' scale in the op, or None for 1/sqrt(r_m r_next).
        bias: bias in the four rank projections (Eq. 2 has none).
        eps: floor of ||x^m|| in the normalisation (padded utterances have x^m = 0).
        backend: ``"fused"`` (the C++/CUDA op, default) or ``"reference"`` (pure PyTorch).

    ``forward(features, mask=None)``: ``features`` maps each configured
    modality (under the name given in ``dims``) to c^m (B, T, d_m); ``mask``
    (B, T) marks the real utterances (None: all). Returns ``(x, xs)``: x
    (B, T, out_dim) and ``xs``, the dict of x^m (B, T, d_m) under the same
    names; both are 0 at padded utterances, and padding never changes the real
    utterances' outputs. ``project(name, x_m)`` gives x^m's normalised term of
    Eq. 6 (the textual augmentation of the model feeds ``project("t", xs["t"])``
    to the context GRU).
    """

    _OPS = {"fused": ops.tr_attention, "reference": reference.tr_attention}

    def __init__(
        self,
        dims: Mapping[str, int],
        out_dim: int,
        ranks: int | Mapping[str, int] = 16,
        eta: float = 0.5,
        scale: float | None = None,
        bias: bool = False,
        eps: float = 1e-12,
        backend: str = "fused",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "TensorRingFusion"
        if not isinstance(dims, Mapping) or not dims:
            raise ValueError(f"{owner}: dims must be a non-empty mapping modality -> width, got {dims!r}")
        canon: dict[str, str] = {}  # canonical -> name as given
        for name in dims:
            key = canonical_modality(name)
            if key is None:
                raise ValueError(
                    f"{owner}: unknown modality {name!r} in dims; expected some of "
                    "t, a, v (or text, audio, visual)"
                )
            if key in canon:
                raise ValueError(f"{owner}: modality {name!r} given twice in dims (as {canon[key]!r})")
            canon[key] = name
        self.names = [canon[k] for k in MODALITIES if k in canon]  # ring order
        self.dims = {name: _positive_int(owner, f"dims[{name!r}]", dims[name]) for name in self.names}
        self.out_dim = _positive_int(owner, "out_dim", out_dim)
        if isinstance(ranks, Mapping):
            unknown = set(ranks) - set(self.names)
            missing = set(self.names) - set(ranks)
            if unknown or missing:
                raise ValueError(
                    f"{owner}: ranks must give one rank per modality of dims {self.names}, "
                    f"got {sorted(ranks)}"
                )
            self.ranks = {name: _positive_int(owner, f"ranks[{name!r}]", ranks[name]) for name in self.names}
        else:
            r = _positive_int(owner, "ranks", ranks)
            self.ranks = {name: r for name in self.names}
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"{owner}: eta must be a number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.scale = None if scale is None else float(scale)
        self.eps = float(eps)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        n = len(self.names)
        self.branches = nn.ModuleDict()
        for m, name in enumerate(self.names):
            s, w = self.ranks[name], self.ranks[self.names[(m + 1) % n]]
            self.branches[canonical_modality(name)] = _Branch(self.dims[name], s, w, self.out_dim, bias, factory)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        ranks = ", ".join(f"{k}={v}" for k, v in self.ranks.items())
        s = f"dims=({dims}), out_dim={self.out_dim}, ranks=({ranks}), eta={self.eta}"
        if self.scale is not None:
            s += f", scale={self.scale}"
        if self.backend != "fused":
            s += f", backend={self.backend!r}"
        return s

    def _branch(self, name: str) -> _Branch:
        key = canonical_modality(name)
        if key is None or key not in self.branches:
            raise KeyError(f"TensorRingFusion: no modality {name!r}; configured: {self.names}")
        return self.branches[key]  # type: ignore[return-value]

    def project(self, name: str, x_m: Tensor) -> Tensor:
        """W^m x^m / (||W^m||_F ||x^m||_2): modality ``name``'s term of Eq. 6 (norm <= 1)."""
        out = self._branch(name).out
        norm = x_m.norm(dim=-1, keepdim=True).clamp_min(self.eps) * out.weight.norm()
        return out(x_m) / norm

    def forward(self, features: Mapping[str, Tensor], mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        owner = "TensorRingFusion"
        missing = [name for name in self.names if name not in features]
        if missing:
            raise ValueError(f"{owner}: features lack modalities {missing}; expected {self.names}")
        cs = [features[name] for name in self.names]
        ref = cs[0]
        if ref.dim() != 3:
            raise ValueError(f"{owner}: expected features[{self.names[0]!r}] of shape (B, T, d), got {tuple(ref.shape)}")
        B, T = ref.shape[:2]
        for name, c in zip(self.names, cs):
            if tuple(c.shape) != (B, T, self.dims[name]):
                raise ValueError(
                    f"{owner}: expected features[{name!r}] of shape (B, T, {self.dims[name]}) = "
                    f"({B}, {T}, {self.dims[name]}), got {tuple(c.shape)}"
                )
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=ref.device)
        elif tuple(mask.shape) != (B, T):
            raise ValueError(f"{owner}: expected mask of shape (B, T) = ({B}, {T}), got {tuple(mask.shape)}")
        real = (mask != 0).to(ref.device)

        branches = [self._branch(name) for name in self.names]
        q1 = [br.q1(c) for br, c in zip(branches, cs)]
        q2 = [br.q2(c) for br, c in zip(branches, cs)]
        k1 = [br.k1(c) for br, c in zip(branches, cs)]
        k2 = [br.k2(c) for br, c in zip(branches, cs)]
        outs = self.op(q1, q2, k1, k2, real, self.scale)

        keep = real.unsqueeze(-1).to(ref.dtype)
        xs: dict[str, Tensor] = {}
        x = None
        for name, br, c, out in zip(self.names, branches, cs, outs):
            att = br.att(out.flatten(-2))  # Eq. 4
            x_m = (att * c + self.eta * c) * keep  # Eq. 5; 0 at padding
            xs[name] = x_m
            term = self.project(name, x_m)  # Eq. 6
            x = term if x is None else x + term
        return x, xs
