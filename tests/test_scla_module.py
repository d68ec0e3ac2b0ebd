"""cascla_ext.nn.SCLALoss: the label embeddings of Eqs. 10-11 and the loss on
top of the fused op (model.md item 8)."""

from __future__ import annotations

import pytest
import torch

from cascla_ext import ops, reference
from cascla_ext.nn import SCLALoss
from conftest import assert_close

K, D = 5, 12


def batch(M=20, P=2, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(M, D, generator=g, dtype=dtype).to(device)
    f_aug = (f.cpu() + 0.3 * torch.randn(P, M, D, generator=g, dtype=dtype)).to(device)
    y = (torch.arange(M) % K)[torch.randperm(M, generator=g)].to(device)
    return f, f_aug, y


def test_defaults_are_the_papers():
    loss = SCLALoss(K, D)
    assert (loss.alpha, loss.beta, loss.gamma) == (2.0, 0.5, 1.0)
    assert loss.reduction == "mean" and loss.backend == "fused"
    assert loss.embedding.weight.shape == (K, D) and loss.proj.weight.shape == (D, D)
    assert loss.dropout.p == 0.1
    custom = SCLALoss(K, D, embedding_dim=3, dropout=0.0, alpha=1.0, beta=0.0, gamma=1.5, reduction="sum")
    assert custom.embedding.weight.shape == (K, 3) and custom.proj.weight.shape == (D, 3)
    assert (custom.alpha, custom.beta, custom.gamma, custom.reduction) == (1.0, 0.0, 1.5, "sum")
    assert "gamma=1.5" in repr(custom)


def test_label_embeddings_are_eqs_10_11(device):
    torch.manual_seed(0)
    mod = SCLALoss(K, D, embedding_dim=7).to(device).eval()
    e = torch.clamp(mod.embedding.weight, min=0)
    expected = torch.clamp(e @ mod.proj.weight.T + mod.proj.bias, min=0)
    assert_close(mod.label_embeddings(), expected)
    assert_close(mod.embeddings, expected)
    assert not mod.embeddings.requires_grad
    assert (mod.embeddings >= 0).all()


def test_forward_is_the_op_on_the_embeddings(device):
    torch.manual_seed(0)
    mod = SCLALoss(K, D, gamma=1.5, reduction="none").to(device).eval()
    f, f_aug, y = batch(device=device)
    z = mod.label_embeddings()
    assert_close(mod(f, y, f_aug), ops.scla_loss(f, f_aug, z, y, 2.0, 0.5, 1.5, "none"))
    assert_close(mod(f, y), ops.scla_loss(f, None, z, y, 2.0, 0.5, 1.5, "none"))
    # f_aug as a sequence of views, as the model passes [f_text, f_adv].
    assert_close(mod(f, y, [f_aug[0], f_aug[1]]), mod(f, y, f_aug))
    assert_close(mod(f, y, []), mod(f, y))


def test_reference_backend_agrees(device):
    torch.manual_seed(0)
    fused = SCLALoss(K, D, dropout=0.0).to(device)
    ref = SCLALoss(K, D, dropout=0.0, backend="reference").to(device)
    ref.load_state_dict(fused.state_dict())
    f, f_aug, y = batch(device=device)
    out_f, out_r = fused(f, y, f_aug), ref(f, y, f_aug)
    assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    out_f.backward()
    out_r.backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_gradients_reach_features_views_and_embedding_parameters(device):
    torch.manual_seed(0)
    mod = SCLALoss(K, D).to(device)
    f, f_aug, y = batch(device=device)
    f.requires_grad_(True)
    f_aug.requires_grad_(True)
    mod(f, y, f_aug).backward()
    for t in (f, f_aug, mod.embedding.weight, mod.proj.weight, mod.proj.bias):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_gradcheck_through_the_module_float64(device):
    torch.manual_seed(0)
    mod = SCLALoss(3, 4, embedding_dim=3, dropout=0.0, dtype=torch.float64).to(device)
    with torch.no_grad():  # keep every ReLU away from its kink
        mod.embedding.weight.copy_(torch.rand(3, 3) + 0.1)
        mod.proj.weight.copy_(torch.rand(4, 3) + 0.1)
    f = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    f_aug = torch.randn(1, 6, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 1], device=device)
    params = (mod.embedding.weight, mod.proj.weight, mod.proj.bias)

    def fn(f, f_aug, *p):
        return torch.func.functional_call(mod, dict(zip(["embedding.weight", "proj.weight", "proj.bias"], p)),
                                          (f, y, f_aug))

    assert torch.autograd.gradcheck(fn, (f, f_aug, *params))


def test_dropout_only_in_training(device):
    torch.manual_seed(0)
    mod = SCLALoss(K, D, dropout=0.5).to(device)
    f, f_aug, y = batch(device=device)
    mod.train()
    z1, z2 = mod.label_embeddings(), mod.label_embeddings()
    assert not torch.equal(z1, z2)
    assert not torch.equal(mod(f, y, f_aug), mod(f, y, f_aug))
    mod.eval()
    assert torch.equal(mod.label_embeddings(), mod.embeddings)
    assert torch.equal(mod(f, y, f_aug), mod(f, y, f_aug))


def test_float64_features_with_float32_module(device):
    mod = SCLALoss(K, D).to(device).eval()
    f, f_aug, y = batch(device=device, dtype=torch.float64)
    out = mod(f, y, f_aug)
    assert out.dtype == torch.float64
    assert_close(out.float(), mod(f.float(), y, f_aug.float()), atol=1e-5, rtol=1e-5)


def test_training_separates_the_classes(device):
    """A few Adam steps on features and embeddings lower the loss, and the
    features move towards their own label embedding (the loss does its job)."""
    torch.manual_seed(0)
    mod = SCLALoss(K, D, dropout=0.0).to(device)
    f, f_aug, y = batch(M=40, device=device)
    f = f.clone().requires_grad_(True)
    opt = torch.optim.Adam([f, *mod.parameters()], lr=0.05)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = mod(f, y, f + 0.1 * (f_aug - f))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < 0.7 * losses[0]
    _, logits, _, _ = torch.ops.cascla_ext.scla_loss.default(
        f.detach(), f.new_empty(0, 40, D), mod.embeddings, y, 2.0, 0.5, 1.0, "none")
    assert (logits.argmax(1) == y).float().mean() > 0.8  # from 0.15 at the start


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_classes=0, dim=D), "num_classes >= 1"),
    (dict(num_classes=K, dim=1), "dim >= 2"),
    (dict(num_classes=K, dim=D, dropout=1.0), r"dropout in \[0, 1\)"),
    (dict(num_classes=K, dim=D, alpha=-1.0), "alpha >= 0"),
    (dict(num_classes=K, dim=D, reduction="avg"), "reduction"),
    (dict(num_classes=K, dim=D, backend="triton"), "backend"),
])
def test_bad_arguments_raise(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SCLALoss(**kwargs)


def test_label_out_of_range_raises(device):
    if device == "cuda":
        pytest.skip("on CUDA a bad label fails a device-side assert (no host check, no sync), which "
                    "ends the process's CUDA context: test_cuda_sync.py checks it in a subprocess")
    mod = SCLALoss(K, D).to(device)
    f, f_aug, y = batch(device=device)
    y = y.clone()
    y[3] = K
    with pytest.raises(ValueError, match=r"got y\[3\] = 5"):
        mod(f, y, f_aug)


def test_state_dict_names():
    assert set(SCLALoss(K, D).state_dict()) == {"embedding.weight", "proj.weight", "proj.bias"}


def test_reference_backend_uses_reference():
    mod = SCLALoss(K, D, backend="reference").eval()
    f, f_aug, y = batch()
    assert_close(mod(f, y, f_aug), reference.scla_loss(f, f_aug, mod.embeddings, y))


@pytest.mark.parametrize("P,gamma,reduction", [(0, 1.0, "mean"), (2, 1.0, "mean"), (1, 1.5, "none"),
                                               (2, 0.5, "sum")])
def test_balanced_normalization_rescales_eq_18(device, P, gamma, reduction):
    """balanced = literal / (mean_i (M / n_{y_i})^gamma * (1 + P)), written out here."""
    f, f_aug, y = batch(M=17, P=max(P, 1), device=device)
    f_aug = f_aug[:P] if P else None
    y = torch.where(y == 4, torch.zeros_like(y), y)  # an absent class, unequal counts
    torch.manual_seed(0)
    literal = SCLALoss(K, D, gamma=gamma, reduction=reduction).to(device).eval()
    balanced = SCLALoss(K, D, gamma=gamma, reduction=reduction, normalization="balanced").to(device).eval()
    balanced.load_state_dict(literal.state_dict())
    counts = {c: int((y == c).sum()) for c in y.tolist()}
    weights = [(len(y) / counts[c]) ** gamma for c in y.tolist()]
    expected_scale = 1.0 / (sum(weights) / len(weights) * (1 + P))
    assert_close(balanced(f, y, f_aug), literal(f, y, f_aug) * expected_scale)
    assert "normalization='balanced'" in repr(balanced)
    with pytest.raises(ValueError, match="normalization"):
        SCLALoss(K, D, normalization="paper")
