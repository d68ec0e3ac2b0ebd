"""Mixed precision: every op, module and a full CaSCLA training step under
torch.autocast matches float32 within bfloat16's tolerance, with finite
gradients (issue 15). The ops compute in float32 under autocast (their
internal GEMMs are never handed half-precision operands); CPU autocast is
bfloat16 (float16 too), CUDA both (run where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from cascla_ext import CaSCLA, collate, ops
from cascla_ext.nn import PerturbedGRU, SCLALoss, TensorRingFusion
from conftest import requires_cuda, small_config

pytestmark = pytest.mark.usefixtures("one_thread")

AUTOCAST = [("cpu", torch.bfloat16), ("cpu", torch.float16),
            pytest.param("cuda", torch.bfloat16, marks=[requires_cuda, pytest.mark.cuda]),
            pytest.param("cuda", torch.float16, marks=[requires_cuda, pytest.mark.cuda])]
IDS = ["cpu-bf16", "cpu-fp16", "cuda-bf16", "cuda-fp16"]


def close(a, b, what=""):
    """Within bfloat16's tolerance (8 bits of mantissa), relative to b's scale."""
    scale = b.abs().max().clamp_min(1e-3)
    err = (a.float() - b.float()).abs().max() / scale
    assert err < 3e-2, f"{what}: relative error {err:.3g}"


def grads(tensors):
    return [t.grad.detach().clone() for t in tensors]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_both(fn, inputs, device, dtype):
    """fn(*inputs) in float32, and under autocast with low-precision copies of
    the floating inputs; returns both outputs and both sets of input grads."""
    a = leaves(*inputs)
    b = leaves(*[t.to(dtype) if t.is_floating_point() else t for t in inputs])
    out_a = fn(*a)
    with torch.autocast(device, dtype=dtype):
        out_b = fn(*b)
    out_a.float().sum().backward()
    out_b.float().sum().backward()
    return out_a, out_b, grads(a), grads(b)


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=IDS)
def test_perturbed_gru_under_autocast(device, dtype):
    g = torch.Generator().manual_seed(0)
    T, B, D, H = 7, 3, 5, 6
    x, h0 = torch.randn(T, B, D, generator=g), torch.randn(B, H, generator=g)
    w_ih, w_hh = 0.3 * torch.randn(3 * H, D, generator=g), 0.3 * torch.randn(3 * H, H, generator=g)
    b_ih, b_hh, rho = torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g), torch.randn(T, B, 3 * H, generator=g)
    inputs = [t.to(device) for t in (x, h0, w_ih, w_hh, b_ih, b_hh, rho)]

    def fn(*args):
        y, h_n = ops.perturbed_gru(*args, lengths=[7, 4, 1])
        return torch.cat([y.flatten(), h_n.flatten()])

    out_a, out_b, ga, gb = run_both(fn, inputs, device, dtype)
    assert out_b.dtype == dtype  # y and h_n come back in the autocast dtype, as nn.GRU's do
    close(out_b, out_a, "output")
    for name, a, b in zip(("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "rho"), ga, gb):
        assert torch.isfinite(b).all()
        close(b, a, f"grad {name}")


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=IDS)
def test_tr_attention_under_autocast(device, dtype):
    g = torch.Generator().manual_seed(1)
    B, T = 2, 5
    shapes = [(3, 4), (4, 3)]
    tensors = []
    for s, w in shapes:
        tensors += [torch.randn(B, T, s, generator=g), torch.randn(B, T, w, generator=g),
                    torch.randn(B, T, s, generator=g), torch.randn(B, T, w, generator=g)]
    mask = (torch.arange(T)[None] < torch.tensor([5, 3])[:, None]).to(device)
    tensors = [t.to(device) for t in tensors]

    def fn(*ts):
        q1, q2, k1, k2 = [ts[i::4] for i in range(4)]
        return torch.cat([o.flatten() for o in ops.tr_attention(q1, q2, k1, k2, mask)])

    out_a, out_b, ga, gb = run_both(fn, tensors, device, dtype)
    assert out_b.dtype == torch.float32  # a softmax: autocast keeps it in float32
    close(out_b, out_a, "output")
    for k, (a, b) in enumerate(zip(ga, gb)):
        assert torch.isfinite(b).all()
        close(b, a, f"grad {k}")


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=IDS)
def test_scla_loss_under_autocast(device, dtype):
    g = torch.Generator().manual_seed(2)
    M, d, K, P = 13, 8, 4, 2
    f, f_aug, z = torch.randn(M, d, generator=g), torch.randn(P, M, d, generator=g), torch.randn(K, d, generator=g)
    y = (torch.arange(M) % K).to(device)
    inputs = [t.to(device) for t in (f, f_aug, z)]
    out_a, out_b, ga, gb = run_both(lambda *a: ops.scla_loss(*a[:2], a[2], y), inputs, device, dtype)
    assert out_b.dtype == torch.float32  # a loss, in float32 like autocast's cross_entropy
    close(out_b, out_a, "loss")
    for name, a, b in zip(("f", "f_aug", "z"), ga, gb):
        assert torch.isfinite(b).all()
        close(b, a, f"grad {name}")


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=IDS)
def test_modules_accept_half_precision_activations(device, dtype):
    torch.manual_seed(0)
    gru = PerturbedGRU(6, 5, bidirectional=True, batch_first=True).to(device)
    ref = torch.nn.GRU(6, 5, bidirectional=True, batch_first=True).to(device)
    ref.load_state_dict(gru.state_dict())
    x = torch.randn(3, 4, 6, device=device)
    with torch.autocast(device, dtype=dtype):
        y, h = gru(x.to(dtype))  # a low-precision activation from an earlier layer
        y_ref, _ = ref(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    close(y, y_ref.float(), "PerturbedGRU vs nn.GRU")

    fusion = TensorRingFusion({"t": 6, "a": 4}, out_dim=5, ranks={"t": 3, "a": 2}).to(device)
    feats = {"t": torch.randn(2, 3, 6, device=device), "a": torch.randn(2, 3, 4, device=device)}
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    x32, _ = fusion(feats, mask)
    with torch.autocast(device, dtype=dtype):
        xl, _ = fusion({k: v.to(dtype) for k, v in feats.items()}, mask)
    close(xl, x32, "TensorRingFusion")

    scla = SCLALoss(4, 6, dropout=0.0).to(device)
    f, y = torch.randn(9, 6, device=device), torch.arange(9, device=device) % 4
    with torch.autocast(device, dtype=dtype):
        low = scla(f.to(dtype), y)
    close(low, scla(f, y), "SCLALoss")


@pytest.mark.parametrize("device,dtype", AUTOCAST[:1] + AUTOCAST[2:], ids=IDS[:1] + IDS[2:])
def test_a_full_training_step_under_autocast(synthetic, device, dtype):
    batch = collate(synthetic.split("train")[:4]).to(device)
    results = {}
    for name, amp in (("fp32", False), ("amp", True)):
        torch.manual_seed(0)
        model = CaSCLA(small_config(synthetic, dropout=0.0, label_dropout=0.0), synthetic.label_names).to(device)
        model.train()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            out = model(batch)
        out.loss.backward()
        results[name] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (out32, g32), (outl, gl) = results["fp32"], results["amp"]
    assert set(outl.losses) == {"ce", "scla", "ce_adv"}
    for k in out32.losses:
        close(outl.losses[k], out32.losses[k], f"loss {k}")
    assert set(gl) == set(g32)
    assert all(torch.isfinite(g).all() for g in gl.values())
    # the gradient of the whole model agrees in direction with float32's
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flatl = torch.cat([gl[n].float().flatten() for n in g32])
    assert torch.nn.functional.cosine_similarity(flat32, flatl, dim=0) > 0.97
