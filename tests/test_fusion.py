"""cascla_ext.nn.TensorRingFusion (spec: model.md item 2, paper Eqs. 2-6)."""

from __future__ import annotations

import pytest
import torch

from cascla_ext.nn import TensorRingFusion
from conftest import assert_close

WIDTHS = {"t": 12, "a": 7, "v": 9}


def make(names, *, ranks=None, device="cpu", dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    dims = {n: WIDTHS[n[0]] for n in names}
    if ranks is None:
        ranks = {n: 2 + i for i, n in enumerate(names)}  # unequal ranks
    return TensorRingFusion(dims, out_dim=5, ranks=ranks, device=device, dtype=dtype, **kwargs)


def features(module, B=3, T=6, *, device="cpu", dtype=torch.float64, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: (scale * torch.randn(B, T, d, generator=g, dtype=torch.float64)).to(device, dtype)
            for n, d in module.dims.items()}


def lengths_mask(lengths, T, device="cpu"):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(device)


SUBSETS = [("t",), ("a", "v"), ("t", "a", "v"), ("v", "t")]


@pytest.mark.parametrize("names", SUBSETS, ids=lambda v: "".join(v))
def test_output_shapes(device, names):
    module = make(names, device=device)
    feats = features(module, device=device)
    x, xs = module(feats, lengths_mask([6, 2, 0], 6, device))
    assert x.shape == (3, 6, 5)
    assert list(xs) == [n for n in ("t", "a", "v") if n in names]  # ring order
    for n, x_m in xs.items():
        assert x_m.shape == (3, 6, WIDTHS[n])
    assert torch.isfinite(x).all()


def test_long_names_and_one_rank():
    module = TensorRingFusion({"visual": 4, "text": 6}, out_dim=3, ranks=3, dtype=torch.float64)
    assert module.names == ["text", "visual"]
    assert module.ranks == {"text": 3, "visual": 3}
    x, xs = module({"text": torch.randn(2, 4, 6, dtype=torch.float64),
                    "visual": torch.randn(2, 4, 4, dtype=torch.float64)})
    assert x.shape == (2, 4, 3) and set(xs) == {"text", "visual"}


@pytest.mark.parametrize("names", [("t",), ("t", "a", "v")], ids=["t", "tav"])
def test_fused_matches_reference_backend(device, names):
    fused = make(names, device=device)
    ref = make(names, device=device, backend="reference")
    ref.load_state_dict(fused.state_dict())
    feats = features(fused, device=device)
    mask = lengths_mask([6, 3, 0], 6, device)
    results = []
    for module in (fused, ref):
        module.zero_grad()
        leaves = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
        x, xs = module(leaves, mask)
        loss = (x * torch.linspace(-1, 1, x.numel(), dtype=x.dtype, device=device).view_as(x)).sum()
        loss = loss + sum((v ** 2).mean() for v in xs.values())
        loss.backward()
        results.append((x.detach(), {k: v.detach() for k, v in xs.items()},
                        {k: v.grad for k, v in leaves.items()},
                        {k: p.grad for k, p in module.named_parameters()}))
    (x1, xs1, g1, p1), (x2, xs2, g2, p2) = results
    assert_close(x1, x2)
    for k in xs1:
        assert_close(xs1[k], xs2[k])
        assert_close(g1[k], g2[k])
    for k in p1:
        assert_close(p1[k], p2[k], msg=k)


def test_mask_padding_never_changes_real_outputs(device):
    module = make(("t", "a", "v"), device=device)
    feats = features(module, device=device)
    mask = lengths_mask([6, 2, 4], 6, device)
    x, xs = module(feats, mask)
    noisy = {k: torch.where(mask[..., None], v, 1e3 * torch.randn_like(v)) for k, v in feats.items()}
    x2, xs2 = module(noisy, mask)
    assert_close(x2[mask], x[mask])
    assert torch.all(x2[~mask] == 0) and torch.all(x[~mask] == 0)
    for k in xs:
        assert_close(xs2[k][mask], xs[k][mask])
        assert torch.all(xs2[k][~mask] == 0)
    # Gradients never reach padded features.
    leaves = {k: v.clone().requires_grad_(True) for k, v in noisy.items()}
    y, _ = module(leaves, mask)
    y.square().sum().backward()
    for v in leaves.values():
        assert torch.all(v.grad[~mask] == 0)
        assert v.grad[mask].abs().sum() > 0


def test_no_mask_means_all_real(device):
    module = make(("t", "a"), device=device)
    feats = features(module, device=device)
    x1, _ = module(feats)
    x2, _ = module(feats, torch.ones(3, 6, dtype=torch.int64, device=device))
    assert torch.equal(x1, x2)


def test_each_contribution_is_bounded_by_the_normalisation(device):
    """Each W^m x^m / (||W^m|| ||x^m||) has norm <= 1, however large a modality's
    features or weights; x is their sum."""
    module = make(("t", "a", "v"), device=device)
    feats = features(module, device=device)
    feats["a"] = feats["a"] * 1e4  # one modality at a much larger scale
    with torch.no_grad():
        module.branches["v"].out.weight.mul_(1e3)
        x, xs = module(feats)
        terms = {k: module.project(k, v) for k, v in xs.items()}
    for k, term in terms.items():
        norms = term.norm(dim=-1)
        assert torch.all(norms <= 1 + 1e-9), k
        assert norms.max() > 1e-3, k  # and not trivially small
    assert_close(x, sum(terms.values()))
    assert torch.all(x.norm(dim=-1) <= 3 + 1e-9)
    # Scaling a modality's output matrix W^m changes nothing.
    with torch.no_grad():
        module.branches["t"].out.weight.mul_(7.0)
        x_scaled, _ = module(feats)
    assert_close(x_scaled, x)


def test_eta_and_attention_formula(device):
    """x^m = Att^m * c^m + eta * c^m: with Att's Linear at 0, x^m = eta c^m."""
    module = make(("t", "a"), device=device, eta=0.25)
    with torch.no_grad():
        for br in module.branches.values():
            br.att.weight.zero_()
            br.att.bias.zero_()
    feats = features(module, device=device)
    mask = lengths_mask([6, 5, 1], 6, device)
    _, xs = module(feats, mask)
    for k in xs:
        assert_close(xs[k][mask], 0.25 * feats[k][mask])


def test_float32_and_repr():
    module = make(("t", "a", "v"), dtype=torch.float32)
    x, _ = module(features(module, dtype=torch.float32), lengths_mask([6, 1, 3], 6))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert "ranks=(t=2, a=3, v=4)" in repr(module)


def test_errors():
    with pytest.raises(ValueError, match="unknown modality 'x'"):
        TensorRingFusion({"x": 3}, out_dim=2)
    with pytest.raises(ValueError, match="non-empty mapping"):
        TensorRingFusion({}, out_dim=2)
    with pytest.raises(ValueError, match="given twice"):
        TensorRingFusion({"t": 3, "text": 3}, out_dim=2)
    with pytest.raises(ValueError, match="one rank per modality"):
        TensorRingFusion({"t": 3, "a": 3}, out_dim=2, ranks={"t": 2})
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        TensorRingFusion({"t": 3}, out_dim=2, eta=1.5)
    with pytest.raises(ValueError, match="out_dim must be a positive int"):
        TensorRingFusion({"t": 3}, out_dim=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        TensorRingFusion({"t": 3}, out_dim=2, backend="cuda")
    module = make(("t", "a"))
    feats = features(module)
    with pytest.raises(ValueError, match=r"features lack modalities \['a'\]"):
        module({"t": feats["t"]})
    with pytest.raises(ValueError, match=r"expected features\['a'\] of shape \(B, T, 7\)"):
        module({"t": feats["t"], "a": feats["a"][..., :5]})
    with pytest.raises(ValueError, match=r"expected mask of shape \(B, T\) = \(3, 6\)"):
        module(feats, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(KeyError, match="no modality 'v'"):
        module.project("v", feats["t"])
