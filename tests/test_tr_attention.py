"""cascla_ext.ops.tr_attention: the fused kernels against the reference twin and
the spec written out by hand, gradcheck, opcheck, masks and errors (spec:
ops.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from cascla_ext import ops, reference
from conftest import assert_close, requires_cuda

OP = torch.ops.cascla_ext.tr_attention.default


def ring_shapes(ranks):
    n = len(ranks)
    return [(ranks[m], ranks[(m + 1) % n]) for m in range(n)]


def make_inputs(B=3, T=5, ranks=(2, 3, 4), *, device="cpu", dtype=torch.float64, seed=0,
                lengths=None, mask=None, scale=1.0):
    """Lists q1, q2, k1, k2 for a ring of the given ranks, and a (B, T) bool mask."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device, dtype)

    shapes = ring_shapes(ranks)
    q1 = [rnd(B, T, s) for s, _ in shapes]
    q2 = [rnd(B, T, w) for _, w in shapes]
    k1 = [rnd(B, T, s) for s, _ in shapes]
    k2 = [rnd(B, T, w) for _, w in shapes]
    if mask is None:
        lengths = [T] * B if lengths is None else lengths
        mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return q1, q2, k1, k2, torch.as_tensor(mask, dtype=torch.bool).to(device)


def leaves(lists):
    return [[t.detach().clone().requires_grad_(True) for t in lst] for lst in lists]


def run(fn, q1, q2, k1, k2, mask, scale=None, seed=1):
    """Forward, then backward of a random linear function of the outputs."""
    lq1, lq2, lk1, lk2 = leaves([q1, q2, k1, k2])
    outs = fn(lq1, lq2, lk1, lk2, mask, scale)
    g = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    sum((o * go).sum() for o, go in zip(outs, gouts)).backward()
    grads = [[t.grad for t in lst] for lst in (lq1, lq2, lk1, lk2)]
    return [o.detach() for o in outs], grads


def check_against_reference(inputs, scale=None, dtype=torch.float64, ref_inputs=None, **tol):
    outs, grads = run(ops.tr_attention, *inputs, scale=scale)
    outs_ref, grads_ref = run(reference.tr_attention, *(ref_inputs or inputs), scale=scale)
    assert len(outs) == len(outs_ref)
    for m, (o, r) in enumerate(zip(outs, outs_ref)):
        assert o.shape == r.shape
        assert_close(o, r.to(o.dtype), dtype, msg=f"Out_{m}", **tol)
    for name, gl, rl in zip(("q1", "q2", "k1", "k2"), grads, grads_ref):
        for m, (gr, rr) in enumerate(zip(gl, rl)):
            assert gr is not None
            assert_close(gr, rr.to(gr.dtype), dtype, msg=f"grad {name}[{m}]", **tol)


RANKS = {"n1": (4,), "n2": (3, 5), "n3": (2, 3, 4), "n3_rank16": (16, 8, 5), "n4": (3, 1, 2, 5)}
MASKS = {
    "full": [6, 6, 6],
    "empty_and_full": [6, 0, 2],
    "holes": [[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0]],
}


@pytest.mark.parametrize("ranks", list(RANKS.values()), ids=list(RANKS))
@pytest.mark.parametrize("mask", list(MASKS.values()), ids=list(MASKS))
def test_matches_reference_float64(device, ranks, mask):
    if isinstance(mask[0], int):
        inputs = make_inputs(3, 6, ranks, device=device, lengths=mask)
    else:
        inputs = make_inputs(3, 6, ranks, device=device, mask=mask)
    check_against_reference(inputs)


@pytest.mark.parametrize("ranks", [(16, 8, 12), (3, 1, 2, 5), (6, 9)], ids=["n3", "n4", "n2"])
def test_matches_reference_float32(device, ranks):
    """float32 runs the vectorised CPU paths (float64 the plain loops the CUDA kernels share)."""
    inputs = make_inputs(4, 19, ranks, device=device, dtype=torch.float32,
                         lengths=[19, 7, 0, 1])
    ref64 = [[t.double() for t in lst] for lst in inputs[:4]] + [inputs[4]]
    check_against_reference(inputs, dtype=torch.float32, ref_inputs=ref64, atol=1e-5, rtol=1e-4)


def test_long_dialogues_and_explicit_scale(device):
    """T beyond one CUDA chunk of 16 utterances, and a given scale."""
    inputs = make_inputs(2, 41, (5, 3, 4), device=device, lengths=[41, 23])
    check_against_reference(inputs, scale=0.7)
    check_against_reference(inputs, scale=-2.0)


def test_reference_is_the_spec_by_hand():
    """The reference against the formulas of ops.md written out for one dialogue."""
    q1, q2, k1, k2, mask = make_inputs(2, 4, (2, 3, 4), lengths=[3, 4])
    outs = reference.tr_attention(q1, q2, k1, k2, mask)
    b = 0
    n = 3
    thetas, pooled = [], []
    for m in range(n):
        s, w = q1[m].shape[-1], q2[m].shape[-1]
        th = torch.zeros(4, s, w, dtype=torch.float64)
        for t in range(4):
            L = torch.tensor([[q1[m][b, t, i] * k1[m][b, t, i] * q2[m][b, t, j] * k2[m][b, t, j]
                               / math.sqrt(s * w) for j in range(w)] for i in range(s)])
            e = torch.exp(L - L.max())
            th[t] = e / e.sum()
        thetas.append(th)
        pooled.append(th[:3].sum(0) / 3)  # dialogue 0 has 3 real utterances
    for m in range(n):
        P = pooled[(m + 1) % n] @ pooled[(m + 2) % n]
        for t in range(4):
            want = thetas[m][t] @ P if t < 3 else torch.zeros(q1[m].shape[-1], q1[m].shape[-1],
                                                              dtype=torch.float64)
            assert_close(outs[m][b, t], want)


def test_internal_outputs(device):
    """theta: softmax rows (sum 1) at real utterances, 0 at padding; pooled: their mean."""
    q1, q2, k1, k2, mask = make_inputs(3, 5, (3, 4), device=device, lengths=[5, 2, 0])
    out, theta, pooled = OP(q1, q2, k1, k2, mask)
    for m in range(2):
        sums = theta[m].sum((2, 3))
        assert_close(sums, mask.to(sums.dtype))
        count = mask.sum(1).clamp(min=1).to(theta[m].dtype)
        assert_close(pooled[m], theta[m].sum(1) / count[:, None, None])


def test_empty_dialogues_give_zeros_not_nan(device):
    q1, q2, k1, k2, mask = make_inputs(3, 4, (2, 3, 4), device=device, lengths=[0, 4, 0])
    outs, grads = run(ops.tr_attention, q1, q2, k1, k2, mask)
    for o in outs:
        assert torch.isfinite(o).all()
        assert torch.all(o[0] == 0) and torch.all(o[2] == 0)
        assert o[1].abs().sum() > 0
    for gl in grads:
        for gr in gl:
            assert torch.isfinite(gr).all()
            assert torch.all(gr[0] == 0) and torch.all(gr[2] == 0)
    # A batch with no real utterance at all.
    outs, grads = run(ops.tr_attention, q1, q2, k1, k2, torch.zeros_like(mask))
    assert all(torch.all(o == 0) for o in outs)
    assert all(torch.all(gr == 0) for gl in grads for gr in gl)


def test_padding_never_changes_real_outputs(device):
    """Garbage (even inf/nan) at padded utterances changes neither the outputs nor the
    gradients of the real ones; padded outputs and gradients are 0."""
    q1, q2, k1, k2, mask = make_inputs(3, 6, (2, 3, 4), device=device, lengths=[6, 3, 1])
    outs, grads = run(ops.tr_attention, q1, q2, k1, k2, mask)
    pad = ~mask
    noisy = []
    for lst in (q1, q2, k1, k2):
        new = []
        for t in lst:
            t = t.clone()
            t[pad] = 1e3 * torch.randn_like(t[pad])
            t[1, 4] = float("inf")
            t[2, 5] = float("nan")
            new.append(t)
        noisy.append(new)
    outs2, grads2 = run(ops.tr_attention, *noisy, mask)
    for o, o2 in zip(outs, outs2):
        assert torch.equal(o, o2)
        assert torch.all(o2[pad] == 0)
    for gl, gl2 in zip(grads, grads2):
        for gr, gr2 in zip(gl, gl2):
            assert torch.equal(gr, gr2)
            assert torch.all(gr2[pad] == 0)


def test_mask_dtypes(device):
    q1, q2, k1, k2, mask = make_inputs(3, 5, (2, 3), device=device, lengths=[5, 1, 0])
    want = ops.tr_attention(q1, q2, k1, k2, mask)
    for other in (mask.to(torch.int64), mask.to(torch.uint8), mask.to(torch.float32)):
        got = ops.tr_attention(q1, q2, k1, k2, other)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_non_contiguous_inputs(device):
    inputs = make_inputs(3, 7, (3, 5, 2), device=device, lengths=[7, 0, 4])
    q1, q2, k1, k2, mask = inputs
    nc = [
        [t.transpose(0, 1).contiguous().transpose(0, 1) for t in q1],
        [torch.stack([t, t], dim=-1)[..., 1] for t in q2],
        [t.permute(2, 0, 1).contiguous().permute(1, 2, 0) for t in k1],
        [t.flip(1).contiguous().flip(1) if i else t.transpose(0, 1).contiguous().transpose(0, 1)
         for i, t in enumerate(k2)],
        mask.t().contiguous().t(),
    ]
    assert not any(t.is_contiguous() for t in nc[0] + nc[1] + nc[2])
    assert not nc[4].is_contiguous()
    outs, grads = run(ops.tr_attention, *nc)
    outs_ref, grads_ref = run(reference.tr_attention, *inputs)
    for o, r in zip(outs, outs_ref):
        assert_close(o, r)
    for gl, rl in zip(grads, grads_ref):
        for gr, rr in zip(gl, rl):
            assert_close(gr, rr)


@pytest.mark.parametrize(
    "B,T,ranks",
    [(1, 1, (1,)), (1, 1, (1, 1, 1)), (2, 3, (7, 1)), (1, 2, (9, 17, 3)), (5, 1, (33, 2))],
    ids=lambda v: str(v),
)
def test_odd_sizes(device, B, T, ranks):
    """Sizes that are not multiples of any vector width, rank 1, a single utterance."""
    lengths = [T - (b % (T + 1)) for b in range(B)]
    check_against_reference(make_inputs(B, T, ranks, device=device, lengths=lengths))


def test_empty_batch_and_no_utterances(device):
    for B, T in ((0, 4), (3, 0)):
        q1, q2, k1, k2, mask = make_inputs(B, T, (2, 3), device=device)
        out, theta, pooled = OP(q1, q2, k1, k2, mask)
        assert [tuple(o.shape) for o in out] == [(B, T, 2, 2), (B, T, 3, 3)]
        assert [tuple(p.shape) for p in pooled] == [(B, 2, 3), (B, 3, 2)]
        assert all(torch.all(p == 0) for p in pooled)
        outs, grads = run(ops.tr_attention, q1, q2, k1, k2, mask)
        assert all(gr.shape == t.shape for gl, lst in zip(grads, (q1, q2, k1, k2))
                   for gr, t in zip(gl, lst))


def test_large_logits_are_stable(device):
    inputs = make_inputs(2, 4, (3, 4, 2), device=device, scale=30.0, lengths=[4, 2])
    outs, grads = run(ops.tr_attention, *inputs)
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.isfinite(gr).all() for gl in grads for gr in gl)
    check_against_reference(inputs, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("ranks", [(3,), (2, 3), (2, 1, 3)], ids=["n1", "n2", "n3"])
def test_gradcheck_float64(device, ranks):
    q1, q2, k1, k2, mask = make_inputs(2, 3, ranks, device=device, lengths=[3, 1], scale=0.7)
    flat = [t.detach().clone().requires_grad_(True) for lst in (q1, q2, k1, k2) for t in lst]
    n = len(ranks)

    def fn(*xs):
        return tuple(ops.tr_attention(xs[:n], xs[n:2 * n], xs[2 * n:3 * n], xs[3 * n:], mask))

    assert torch.autograd.gradcheck(fn, flat)


@pytest.mark.parametrize("case", ["n1", "n3_mask", "n2_scale"])
def test_opcheck(device, case):
    if case == "n1":
        q1, q2, k1, k2, mask = make_inputs(2, 3, (3,), device=device)
        scale = None
    elif case == "n3_mask":
        q1, q2, k1, k2, mask = make_inputs(3, 4, (2, 3, 4), device=device, lengths=[4, 0, 2])
        scale = None
    else:
        q1, q2, k1, k2, mask = make_inputs(2, 3, (3, 2), device=device, lengths=[1, 3])
        scale = 0.5
    args = [[t.requires_grad_(True) for t in lst] for lst in (q1, q2, k1, k2)]
    torch.library.opcheck(OP, (*args, mask, scale))


def test_opcheck_backward_op(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3), device=device, lengths=[3, 1])
    out, theta, pooled = OP(q1, q2, k1, k2, mask)
    grads = [torch.randn_like(o) for o in out]
    torch.library.opcheck(torch.ops.cascla_ext.tr_attention_backward.default,
                          (grads, q1, q2, k1, k2, mask, None, theta, pooled))


def test_no_grad_and_partial_requires_grad(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3), device=device, lengths=[3, 2])
    with torch.no_grad():
        outs = ops.tr_attention(q1, q2, k1, k2, mask)
    assert all(not o.requires_grad for o in outs)
    x = q2[1].clone().requires_grad_(True)
    outs = ops.tr_attention(q1, [q2[0], x], k1, k2, mask)
    outs[0].sum().backward()  # only Out_0 used: gradient through the pooled A_1
    ref = q2[1].clone().requires_grad_(True)
    reference.tr_attention(q1, [q2[0], ref], k1, k2, mask)[0].sum().backward()
    assert x.grad.abs().sum() > 0
    assert_close(x.grad, ref.grad)


def test_double_backward_raises(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3), device=device)
    lq1 = [t.clone().requires_grad_(True) for t in q1]
    out = ops.tr_attention(lq1, q2, k1, k2, mask)
    (g,) = torch.autograd.grad(out[0].square().sum(), lq1[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


@requires_cuda
def test_cuda_matches_cpu_float32():
    inputs = make_inputs(5, 37, (16, 16, 16), dtype=torch.float32, lengths=[37, 20, 0, 1, 16])
    cpu_outs, cpu_grads = run(ops.tr_attention, *inputs)
    cuda_inputs = [[t.cuda() for t in lst] for lst in inputs[:4]] + [inputs[4].cuda()]
    outs, grads = run(ops.tr_attention, *cuda_inputs)
    for o, r in zip(outs, cpu_outs):
        assert_close(o.cpu(), r, atol=1e-5, rtol=1e-4)
    for gl, rl in zip(grads, cpu_grads):
        for gr, rr in zip(gl, rl):
            assert_close(gr.cpu(), rr, atol=1e-5, rtol=1e-4)


# ---- errors: each names the argument and what was expected ----


def test_error_rank_mismatch_around_the_ring(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3, 4), device=device)
    bad_q2 = [q2[0], q2[1][..., :3], q2[2]]
    bad_k2 = [k2[0], k2[1][..., :3], k2[2]]
    with pytest.raises(ValueError, match=r"rank mismatch around the ring: q2\[1\] has w_1 = 3 but q1\[2\] has s_2 = 4"):
        ops.tr_attention(q1, bad_q2, k1, bad_k2, mask)
    with pytest.raises(ValueError, match=r"rank mismatch around the ring: q2\[0\] has w_0 = 3 but q1\[0\] has s_0 = 2"):
        ops.tr_attention(q1[:1], q2[:1], k1[:1], k2[:1], mask)


def test_error_shapes(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3), device=device)
    with pytest.raises(ValueError, match=r"k1\[1\] of shape \(2, 3, 3\)"):
        ops.tr_attention(q1, q2, [k1[0], k1[1][..., :2]], k2, mask)
    with pytest.raises(ValueError, match=r"k2\[0\] of shape \(2, 3, 3\)"):
        ops.tr_attention(q1, q2, k1, [k2[0][..., :1], k2[1]], mask)
    with pytest.raises(ValueError, match=r"q2\[1\] of shape \(2, 3, \*\)"):
        ops.tr_attention(q1, [q2[0], q2[1][:1]], k1, k2, mask)
    with pytest.raises(ValueError, match=r"q1\[0\] of shape \(B, T, s_0\)"):
        ops.tr_attention([q1[0][0], q1[1]], q2, k1, k2, mask)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\)"):
        ops.tr_attention(q1, q2, k1, k2, mask[:, :2])
    with pytest.raises(ValueError, match=r"q2 to hold n = 2 tensors"):
        ops.tr_attention(q1, q2[:1], k1, k2, mask)
    with pytest.raises(ValueError, match=r"q1 to hold one tensor per modality"):
        ops.tr_attention([], [], [], [], mask)
    with pytest.raises(ValueError, match=r"rank s_0 >= 1"):
        ops.tr_attention([q1[0][..., :0], q1[1]], q2, [k1[0][..., :0], k1[1]], k2, mask)


def test_error_dtypes_and_scale(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3), device=device)
    with pytest.raises(TypeError, match=r"q2\[0\] to have the dtype of q1\[0\]"):
        ops.tr_attention(q1, [q2[0].float(), q2[1]], k1, k2, mask)
    with pytest.raises(TypeError, match=r"q1\[0\] to be float32 or float64"):
        ops.tr_attention([t.long() for t in q1], q2, k1, k2, mask)
    with pytest.raises(ValueError, match="finite scale"):
        ops.tr_attention(q1, q2, k1, k2, mask, scale=float("nan"))


def test_error_backward_op_arguments(device):
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3), device=device)
    out, theta, pooled = OP(q1, q2, k1, k2, mask)
    bwd = torch.ops.cascla_ext.tr_attention_backward.default
    with pytest.raises(ValueError, match=r"grad_out\[1\] of shape \(2, 3, 3, 3\)"):
        bwd([out[0], out[0]], q1, q2, k1, k2, mask, None, theta, pooled)
    with pytest.raises(ValueError, match=r"theta to hold n = 2 tensors"):
        bwd(out, q1, q2, k1, k2, mask, None, theta[:1], pooled)
    with pytest.raises(ValueError, match=r"pooled\[0\] of shape \(2, 2, 3\)"):
        bwd(out, q1, q2, k1, k2, mask, None, theta, [pooled[1], pooled[1]])


@requires_cuda
def test_error_mixed_devices():
    q1, q2, k1, k2, mask = make_inputs(2, 3, (2, 3))
    with pytest.raises(ValueError, match=r"k1\[1\] on the device of q1\[0\] \(cpu\)"):
        ops.tr_attention(q1, q2, [k1[0], k1[1].cuda()], k2, mask)
    with pytest.raises(ValueError, match=r"mask on the device of q1\[0\]"):
        ops.tr_attention([t.cuda() for t in q1], [t.cuda() for t in q2], [t.cuda() for t in k1],
                         [t.cuda() for t in k2], mask)


@requires_cuda
def test_error_too_many_modalities_on_cuda():
    q1, q2, k1, k2, mask = make_inputs(1, 2, (2,) * 17, device="cuda")
    with pytest.raises(ValueError, match="at most 16 modalities on CUDA"):
        ops.tr_attention(q1, q2, k1, k2, mask)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 600.0), (torch.float64, 1e5)])
@pytest.mark.parametrize("ranks", [(8,), (5,), (3, 4)])
def test_large_logits_match_the_reference(device, dtype, scale, ranks):
    """Logits of ~1e10 (float32) and ~1e19 (float64): the softmax is one-hot
    (or close to it) and finite in the reference, and the fused op must agree.
    The fused CPU kernel once gave a uniform Theta (float32) or NaN (float64)
    here: its max and its exponent saw differently rounded products (one
    contracted into an FMA)."""
    inputs = make_inputs(B=2, T=3, ranks=ranks, device=device, dtype=dtype, seed=4, scale=scale)
    outs = ops.tr_attention(*inputs)
    outs_ref = reference.tr_attention(*inputs)
    for out, ref in zip(outs, outs_ref):
        assert torch.isfinite(ref).all()
        assert torch.isfinite(out).all()
        assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=1e-4)
    if len(ranks) == 1:  # Out = Theta: one entry carries (nearly) all the mass
        theta = outs[0].flatten(2)
        assert (theta.max(dim=-1).values > 0.99).all()
