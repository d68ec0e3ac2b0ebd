"""Batch-consistent dropout (cascla_ext.nn.dropout; issue 16): in one process
it is PyTorch's dropout bit for bit on the CPU (so single-process results
are what they were), with a global layout it takes the global batch's mask
rows and steps, and the encoder layer that draws the attention weights'
mask itself is nn.TransformerEncoderLayer (values, gradients, weights'
names). The 2-rank steps with dropout are in test_distributed_train.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cascla_ext import CaSCLA, collate
from cascla_ext.data import GlobalLayout
from cascla_ext.nn.dropout import BatchDropout, TransformerEncoderLayer, batch_dropout, global_batch
from conftest import small_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_one_process_is_f_dropout_bit_for_bit(dtype, p):
    """The same values and the same random state after, contiguous and time-major."""
    base = torch.randn(5, 3, 8, dtype=dtype)
    for x, order in ((base.transpose(0, 1), (1, 0, 2)), (base, None)):
        torch.manual_seed(4)
        expected = F.dropout(x, p, training=True)
        state = torch.get_rng_state()
        torch.manual_seed(4)
        got = batch_dropout(x, p, memory_order=order)
        assert torch.equal(got, expected)
        assert torch.equal(torch.get_rng_state(), state)
    assert batch_dropout(base, 0.5, training=False) is base


@pytest.mark.parametrize("world", [2, 3])
def test_a_ranks_mask_is_its_rows_and_steps_of_the_global_mask(world):
    """(B, T, D) contiguous and time-major, and the attention weights (B, H, T, T)."""
    lengths = [7, 3, 5, 2, 6]
    B, T = len(lengths), max(lengths)
    cases = [((B, T, 4), 0, (1,), None), ((T, B, 4), 1, (0,), None), ((B, T, 4), 0, (1,), (1, 0, 2)),
             ((B, 2, T, T), 0, (2, 3), None)]
    for shape, batch_dim, time_dims, order in cases:
        torch.manual_seed(1)
        full = batch_dropout(torch.ones(shape), 0.4, batch_dim=batch_dim, time_dims=time_dims,
                             memory_order=order)
        state = torch.get_rng_state()
        for r in range(world):
            rows = slice(r, B, world)
            t_local = max(lengths[rows])
            local = list(shape)
            local[batch_dim] = len(lengths[rows])
            for d in time_dims:
                local[d] = t_local
            torch.manual_seed(1)
            with global_batch(GlobalLayout(rows, B, T)):
                got = batch_dropout(torch.ones(local), 0.4, batch_dim=batch_dim, time_dims=time_dims,
                                    memory_order=order)
            assert torch.equal(torch.get_rng_state(), state)  # every rank's stream stays the one stream
            index = [slice(None)] * len(shape)
            index[batch_dim] = rows
            for d in time_dims:
                index[d] = slice(0, t_local)
            assert torch.equal(got, full[tuple(index)]), (shape, r)
    with global_batch(GlobalLayout(slice(0, 5, 2), 5, 7)), pytest.raises(ValueError, match="does not fit"):
        batch_dropout(torch.ones(2, 7, 4), 0.4)  # rows 0, 2, 4 are three


def _layers(p, **kwargs):
    torch.manual_seed(0)
    stock = nn.TransformerEncoderLayer(32, 4, 64, dropout=p, batch_first=True, **kwargs)
    ours = TransformerEncoderLayer(32, 4, 64, dropout=p, batch_first=True, **kwargs)
    ours.load_state_dict(stock.state_dict())  # the same names: old checkpoints load
    assert list(ours.state_dict()) == list(stock.state_dict())
    return stock, ours


def _run(encoder, x, mask, seed=7):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = encoder(x, src_key_padding_mask=~mask)
    (y * mask.unsqueeze(-1) * torch.linspace(-1, 1, x.shape[-1])).sum().backward()
    return y.detach() * mask.unsqueeze(-1), x.grad, [p.grad for p in encoder.parameters()], torch.get_rng_state()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_is_pytorchs_with_dropout_bit_for_bit(norm_first):
    """Training with dropout: the same outputs, gradients and random state
    as nn.TransformerEncoderLayer from the same seed (CPU); and in eval."""
    stock, ours = _layers(0.3, norm_first=norm_first)
    lengths = torch.tensor([9, 4, 6])
    mask = torch.arange(9) < lengths.unsqueeze(1)
    x = torch.randn(3, 9, 32)
    encoders = [nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) for layer in (stock, ours)]
    for batch in (slice(0, 3), slice(1, 2)):
        a, b = (_run(e.train(), x[batch], mask[batch]) for e in encoders)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
        assert all(torch.equal(u, v) for u, v in zip(a[2], b[2]))
        for e in encoders:
            e.zero_grad()
    with torch.no_grad():
        a, b = (e.eval()(x, src_key_padding_mask=~mask) * mask.unsqueeze(-1) for e in encoders)
    assert torch.equal(a, b)


def test_encoder_layer_attention_is_pytorchs_at_dropout_zero():
    """The attention computed here (forced, p = 0) against PyTorch's, padded
    keys weighted 0: values and gradients (PyTorch's CPU flash kernel then
    rounds otherwise)."""
    stock, ours = _layers(0.0)
    mask = torch.arange(9) < torch.tensor([9, 4, 6]).unsqueeze(1)
    padding = F._canonical_mask(mask=~mask, mask_name="key_padding_mask", other_type=None, other_name="",
                                target_type=torch.float32)
    x = torch.randn(3, 9, 32)
    outs = []
    for attend in (lambda x: stock._sa_block(x, None, padding), lambda x: ours._attention(x, None, padding, 0.0)):
        xx = x.clone().requires_grad_(True)
        y = attend(xx) * mask.unsqueeze(-1)
        y.sum().backward()
        outs.append((y.detach(), xx.grad))
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    for p, q in zip(stock.self_attn.parameters(), ours.self_attn.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    # The padded keys change nothing.
    noisy = x.clone()
    noisy[1, 4:] = 100.0
    torch.testing.assert_close(ours._attention(noisy, None, padding, 0.0)[1, :4],
                               ours._attention(x, None, padding, 0.0)[1, :4])


def test_encoder_layer_under_autocast():
    """bfloat16 autocast, with dropout: PyTorch's layer within bfloat16's tolerance, finite gradients."""
    stock, ours = _layers(0.3)
    mask = torch.arange(9) < torch.tensor([9, 4, 6]).unsqueeze(1)
    x = torch.randn(3, 9, 32)
    outs = []
    for layer in (stock, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_run(layer.train(), x, mask))
    (a, _, _, _), (b, gb, pb, _) = outs
    assert b.dtype == a.dtype
    assert (a.float() - b.float()).abs().max() < 3e-2 * a.abs().max()
    assert all(torch.isfinite(g).all() for g in [gb, *pb])


def _stock(model: CaSCLA) -> CaSCLA:
    """``model`` with PyTorch's own dropout modules and encoder layers (the same weights)."""
    stock = copy.deepcopy(model)
    for module in list(stock.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BatchDropout):
                setattr(module, name, nn.Dropout(child.p))
            elif isinstance(child, TransformerEncoderLayer):
                layer = nn.TransformerEncoderLayer(child.linear1.in_features, child.self_attn.num_heads,
                                                   child.linear1.out_features, dropout=child.dropout.p,
                                                   batch_first=True)
                layer.load_state_dict(child.state_dict())
                setattr(module, name, layer)
    assert not any(isinstance(m, (BatchDropout, TransformerEncoderLayer)) for m in stock.modules())
    assert list(stock.state_dict()) == list(model.state_dict())
    return stock


def test_model_step_is_the_stock_dropout_step(synthetic):
    """One process: a CaSCLA training step with dropout (AST, textual view,
    SCLA) is the step of the same model with nn.Dropout and
    nn.TransformerEncoderLayer, bit for bit on the CPU: the loss, its terms,
    every gradient and the random state after (single-process results are
    unchanged); and the stock model's state dict loads."""
    torch.manual_seed(0)
    model = CaSCLA(small_config(synthetic, dropout=0.3, label_dropout=0.2), synthetic.label_names)
    stock = _stock(model)
    model.load_state_dict(stock.state_dict())
    batch = collate(synthetic.split("train")[:5], model.config.modalities)
    results = []
    for m in (stock, model):
        torch.manual_seed(3)
        out = m.train()(batch)
        out.loss.backward()
        results.append(({"loss": out.loss, **out.losses}, [p.grad for p in m.parameters()], torch.get_rng_state()))
    (la, ga, sa), (lb, gb, sb) = results
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(ga, gb))
    assert torch.equal(sa, sb)
