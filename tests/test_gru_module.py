"""cascla_ext.nn.PerturbedGRU as a drop-in torch.nn.GRU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cascla_ext.nn import PerturbedGRU
from conftest import assert_close

CONFIGS = [
    dict(num_layers=1, bidirectional=False, batch_first=False, bias=True),
    dict(num_layers=2, bidirectional=True, batch_first=True, bias=True),
    dict(num_layers=3, bidirectional=True, batch_first=False, bias=False),
    dict(num_layers=2, bidirectional=False, batch_first=True, bias=True),
]
F32 = dict(atol=1e-5, rtol=1e-4)


def pair(device, dtype=torch.float32, input_size=5, hidden_size=7, **cfg):
    torch.manual_seed(0)
    gru = torch.nn.GRU(input_size, hidden_size, **cfg).to(device=device, dtype=dtype)
    return gru, PerturbedGRU.from_gru(gru)


def inputs(gru, T=6, B=4, device="cpu", dtype=torch.float32):
    shape = (B, T, gru.input_size) if gru.batch_first else (T, B, gru.input_size)
    return torch.randn(*shape, device=device, dtype=dtype)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_equals_nn_gru_values_and_grads(device, cfg):
    gru, mod = pair(device, **cfg)
    x = inputs(gru, device=device)
    L = gru.num_layers * (2 if gru.bidirectional else 1)
    hx = torch.randn(L, 4, gru.hidden_size, device=device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1, h1 = gru(x1, hx)
    out2, h2 = mod(x2, hx)
    assert out2.shape == out1.shape and h2.shape == h1.shape
    assert_close(out2, out1, **F32)
    assert_close(h2, h1, **F32)
    (out1.sin().sum() + h1.sum()).backward()
    (out2.sin().sum() + h2.sum()).backward()
    assert_close(x2.grad, x1.grad, **F32)
    for (name, p1), (name2, p2) in zip(gru.named_parameters(), mod.named_parameters()):
        assert name == name2
        assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_state_dict_round_trip(device):
    gru, _ = pair(device, num_layers=2, bidirectional=True)
    mod = PerturbedGRU(5, 7, num_layers=2, bidirectional=True).to(device)
    assert set(mod.state_dict()) == set(gru.state_dict())
    mod.load_state_dict(gru.state_dict())  # strict
    back = torch.nn.GRU(5, 7, num_layers=2, bidirectional=True).to(device)
    back.load_state_dict(mod.state_dict())  # strict, the other way
    x = inputs(gru, device=device)
    assert_close(mod(x)[0], gru(x)[0], **F32)
    assert_close(back(x)[0], gru(x)[0], **F32)


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence(device, enforce_sorted):
    gru, mod = pair(device, num_layers=2, bidirectional=True)
    T, B = 6, 4
    x = torch.randn(T, B, 5, device=device)
    lengths = torch.tensor([6, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 6, 1, 5])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    hx = torch.randn(4, B, 7, device=device)
    out1, h1 = gru(packed, hx)
    out2, h2 = mod(packed, hx)
    assert torch.equal(out2.batch_sizes, out1.batch_sizes)
    for a, b in [(out2.sorted_indices, out1.sorted_indices), (out2.unsorted_indices, out1.unsorted_indices)]:
        assert (a is None and b is None) or torch.equal(a, b)
    assert_close(out2.data, out1.data, **F32)
    assert_close(h2, h1, **F32)
    # And the same through lengths= on the padded input.
    out3, h3 = mod(x, hx, lengths=lengths)
    padded1, _ = pad_packed_sequence(out1, total_length=T)
    assert_close(out3, padded1, **F32)
    assert_close(h3, h1, **F32)


def test_unbatched_input(device):
    gru, mod = pair(device, num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, device=device)
    hx = torch.randn(4, 7, device=device)
    out1, h1 = gru(x, hx)
    out2, h2 = mod(x, hx)
    assert out2.shape == (6, 14) and h2.shape == (4, 7)
    assert_close(out2, out1, **F32)
    assert_close(h2, h1, **F32)


def test_perturbation(device):
    gru, mod = pair(device, num_layers=2, bidirectional=True, batch_first=True)
    x = inputs(gru, device=device)  # (B=4, T=6, 5)
    B, T, H = 4, 6, 7
    zeros = [torch.zeros(B, T, 3 * H, device=device) for _ in range(4)]
    base, hb = mod(x)
    out, h = mod(x, perturbation=zeros)
    assert torch.equal(out, base) and torch.equal(h, hb)
    # Perturbing only layer 1's reverse direction changes outputs, and its
    # gradient reaches the perturbation tensor.
    rho = torch.zeros(B, T, 3 * H, device=device, requires_grad=True)
    out, _ = mod(x, perturbation=[None, None, None, rho + 0.5])
    assert not torch.allclose(out[..., H:], base[..., H:])
    assert torch.allclose(out[..., :H], base[..., :H])  # the forward half of the top layer is untouched
    out.square().sum().backward()
    assert rho.grad is not None and rho.grad.abs().sum() > 0


def test_fused_equals_reference_backend_with_perturbation(device):
    _, mod = pair(device, dtype=torch.float64, num_layers=2, bidirectional=True)
    ref = PerturbedGRU.from_gru(torch.nn.GRU(5, 7, num_layers=2, bidirectional=True), backend="reference")
    ref.load_state_dict(mod.state_dict())
    ref.to(device=device, dtype=torch.float64)
    x = torch.randn(6, 4, 5, device=device, dtype=torch.float64)
    lengths = [6, 0, 3, 1]
    rhos = [0.2 * torch.randn(6, 4, 21, device=device, dtype=torch.float64) for _ in range(4)]
    outs = []
    for m in (mod, ref):
        r = [t.clone().requires_grad_(True) for t in rhos]
        out, h = m(x, lengths=lengths, perturbation=r)
        (out.sum() + h.sum()).backward()
        outs.append((out, h, [t.grad for t in r], [p.grad for p in m.parameters()]))
    (o1, h1, gr1, gp1), (o2, h2, gr2, gp2) = outs
    assert_close(o1, o2)
    assert_close(h1, h2)
    for a, b in zip(gr1 + gp1, gr2 + gp2):
        assert_close(a, b)


def test_dropout_between_layers(device):
    torch.manual_seed(0)
    mod = PerturbedGRU(5, 7, num_layers=2, dropout=0.5).to(device)
    x = torch.randn(6, 4, 5, device=device)
    mod.eval()
    assert torch.equal(mod(x)[0], mod(x)[0])
    mod.train()
    assert not torch.equal(mod(x)[0], mod(x)[0])


def test_torch_compile_module(device):
    _, mod = pair(device, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(4, 6, 5, device=device)
    lengths = torch.tensor([6, 2, 1, 4])
    compiled = torch.compile(lambda x: mod(x, lengths=lengths), fullgraph=True, backend="aot_eager")
    out_c, h_c = compiled(x)
    out_e, h_e = mod(x, lengths=lengths)
    assert_close(out_c, out_e)
    assert_close(h_c, h_e)


def test_repr_and_nn_gru_compat():
    mod = PerturbedGRU(5, 7, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
    assert "PerturbedGRU(5, 7, num_layers=2, batch_first=True, dropout=0.1, bidirectional=True)" == repr(mod)
    mod.flatten_parameters()  # callable like nn.GRU's
    assert len(mod.all_weights) == 4 and len(mod.all_weights[0]) == 4


@pytest.mark.parametrize(
    "kwargs,pattern,exc",
    [
        (dict(input_size=0, hidden_size=3), "input_size must be a positive int", ValueError),
        (dict(input_size=3, hidden_size=-1), "hidden_size must be a positive int", ValueError),
        (dict(input_size=3, hidden_size=3, num_layers=0), "num_layers must be an int >= 1", ValueError),
        (dict(input_size=3, hidden_size=3, dropout=1.5), "dropout must be a number in", ValueError),
        (dict(input_size=3, hidden_size=3, backend="cudnn"), "backend must be one of", ValueError),
    ],
)
def test_bad_construction(kwargs, pattern, exc):
    with pytest.raises(exc, match=pattern):
        PerturbedGRU(**kwargs)


def test_bad_forward_arguments(device):
    mod = PerturbedGRU(5, 7, num_layers=2, bidirectional=True).to(device)
    x = torch.randn(6, 4, 5, device=device)
    with pytest.raises(ValueError, match="expected input with 5 features"):
        mod(torch.randn(6, 4, 3, device=device))
    with pytest.raises(ValueError, match=r"expected input of shape \(T, B, D\)"):
        mod(torch.randn(6, device=device))
    with pytest.raises(ValueError, match=r"expected hx of shape .* = \(4, 4, 7\)"):
        mod(x, torch.zeros(2, 4, 7, device=device))
    with pytest.raises(ValueError, match="perturbation must hold num_layers \\* num_directions = 4"):
        mod(x, perturbation=[None])
    with pytest.raises(ValueError, match=r"expected perturbation\[2\] of shape \(6, 4, 21\)"):
        mod(x, perturbation=[None, None, torch.zeros(6, 4, 7, device=device), None])
    packed = pack_padded_sequence(x, torch.tensor([6, 5, 2, 1]))
    with pytest.raises(ValueError, match="lengths must be None for a PackedSequence"):
        mod(packed, lengths=[6, 5, 2, 1])
    with pytest.raises(ValueError, match=r"lengths\[b\] in \[0, T\]"):
        mod(x, lengths=[7, 1, 1, 1])
