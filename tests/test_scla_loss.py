"""cascla_ext.ops.scla_loss: the fused kernels against the reference twin (and
the reference against the spec's equations written out term by term),
gradcheck, opcheck, torch.compile, stability at large similarities, bounded
memory at M = 65,536, and the errors (spec: ops.md section 3)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cascla_ext import ops, reference
from conftest import assert_close, assert_compiled_matches_eager, requires_cuda

REDUCTIONS = ["none", "sum", "mean"]
GRAD_NAMES = ["f", "f_aug", "z"]


def make_args(M=9, d=6, K=4, P=2, *, device="cpu", dtype=torch.float64, seed=0, scale=1.0,
              labels=None):
    """Anchors f, views f_aug near them, embeddings z, labels y (every class
    present unless `labels` says otherwise)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    f = scale * rnd(M, d)
    f_aug = f + 0.5 * scale * rnd(P, M, d)
    z = rnd(K, d)
    if labels is None:
        labels = (torch.arange(M) % K)[torch.randperm(M, generator=g)]
    y = torch.as_tensor(labels, dtype=torch.int64)
    return {"f": f.to(device, dtype), "f_aug": f_aug.to(device, dtype), "z": z.to(device, dtype),
            "y": y.to(device)}


def run(fn, args, seed=1, **kw):
    """Loss, then the gradients of a random linear function of it."""
    leaves = {k: args[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES}
    loss = fn(leaves["f"], leaves["f_aug"], leaves["z"], args["y"], **kw)
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype) + 0.5
    (loss * w).sum().backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    return loss.detach(), grads


def check_against_reference(args, dtype=torch.float64, atol=None, rtol=None, **kw):
    loss, grads = run(ops.scla_loss, args, **kw)
    loss_ref, grads_ref = run(reference.scla_loss, args, **kw)
    assert_close(loss, loss_ref, dtype, atol=atol, rtol=rtol, msg="loss")
    for name in GRAD_NAMES:
        assert_close(grads[name], grads_ref[name], dtype, atol=atol, rtol=rtol, msg=f"grad {name}")
    return loss, grads


def literal_loss(f, f_aug, z, y, alpha, beta, gamma):
    """The per-anchor losses of spec section 3, one scalar at a time (tiny M only)."""
    M, d = f.shape
    K, P = z.shape[0], f_aug.shape[0]
    y = y.tolist()

    def cov(u, v):
        return float(((u - u.mean()) * (v - v.mean())).sum()) / (d - 1)

    def sim(g, j):
        return float(g @ z[j]) / (M - 1) - 0.5 * sum(cov(g, f[l]) * cov(z[j], z[y[l]]) for l in range(M))

    out = []
    for i in range(M):
        S = sum(math.exp(sim(f[i], j)) for j in range(K))
        Aug = sum(math.exp(sim(f_aug[p, i], y[i])) for p in range(P))
        l_pos = 0.0
        for g in [f[i]] + [f_aug[p, i] for p in range(P)]:
            p_g = math.exp(sim(g, y[i])) / (S + Aug)
            l_pos -= math.log(p_g) * (1 - p_g) ** alpha
        l_neg = 0.0
        for k in range(K):
            if k != y[i]:
                q = math.exp(sim(f[i], k)) / S
                l_neg -= math.log1p(-q) * q ** beta
        out.append((M / y.count(y[i])) ** gamma * (l_pos + l_neg))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------
# The reference is the spec, and the op's raw outputs are what they say.


@pytest.mark.parametrize("P", [0, 1, 2])
@pytest.mark.parametrize("alpha,beta,gamma", [(2.0, 0.5, 1.0), (0.0, 0.0, 0.0), (1.3, 2.0, 1.5)])
def test_reference_is_the_literal_equations(P, alpha, beta, gamma):
    args = make_args(M=7, d=5, K=3, P=P, labels=[0, 1, 1, 2, 0, 0, 1])
    expected = literal_loss(args["f"], args["f_aug"], args["z"], args["y"], alpha, beta, gamma)
    got = reference.scla_loss(*args.values(), alpha=alpha, beta=beta, gamma=gamma, reduction="none")
    assert_close(got, expected)


def test_op_outputs_are_similarities_and_class_sums(device):
    """logits[i, k] = Sim(f_i, z_k), aug_logits[p, i] = Sim(f_aug[p, i], z_{y_i})
    with the M x M covariances of Eq. 12, class_sums[c] = sum of f_l with y_l = c."""
    args = make_args(M=8, d=5, K=3, P=2, device=device, labels=[0, 1, 1, 2, 0, 0, 1, 1])
    f, f_aug, z, y = args.values()
    loss, logits, aug_logits, class_sums = torch.ops.cascla_ext.scla_loss.default(
        f, f_aug, z, y, 2.0, 0.5, 1.0, "mean")
    M, d = f.shape

    def cov(u, v):
        return (u - u.mean(1, keepdim=True)) @ (v - v.mean(1, keepdim=True)).T / (d - 1)

    sim = lambda g: g @ z.T / (M - 1) - 0.5 * cov(g, f) @ cov(z, z)[:, y].T  # noqa: E731
    assert_close(logits, sim(f))
    assert_close(aug_logits, torch.stack([sim(f_aug[p]).gather(1, y[:, None])[:, 0] for p in range(2)]))
    assert_close(class_sums, torch.zeros(3, d, dtype=torch.float64, device=device).index_add(0, y, f))
    assert loss.shape == ()


# --------------------------------------------------------------------------
# Values and gradients against the reference.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("P", [0, 1, 2])
def test_matches_reference_float64(device, P, reduction):
    args = make_args(M=11, d=7, K=4, P=P, device=device)
    loss, grads = check_against_reference(args, reduction=reduction)
    assert loss.shape == ((11,) if reduction == "none" else ())
    assert grads["f_aug"].shape == (P, 11, 7)
    assert grads["z"].abs().sum() > 0 and grads["f"].abs().sum() > 0


def test_classes_absent_and_a_single_sample_class(device):
    """K = 6 with classes 1, 3 and 4 absent and class 5 held by one anchor:
    absent classes are still negatives, and get gradients through them."""
    labels = [0, 2, 2, 0, 5, 0, 2, 2, 0]
    args = make_args(M=9, d=6, K=6, P=2, device=device, labels=labels)
    for reduction in REDUCTIONS:
        _, grads = check_against_reference(args, reduction=reduction)
        assert torch.all(grads["z"][[1, 3, 4]].abs().sum(1) > 0)
    loss = ops.scla_loss(*args.values(), gamma=1.0, reduction="none")
    loss0 = ops.scla_loss(*args.values(), gamma=0.0, reduction="none")
    assert_close(loss[4], loss0[4] * 9.0)  # the single anchor of class 5 weighs M / 1


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.0, 0.5), (2.0, 0.0), (0.5, 3.0)])
@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_focusing_parameters_including_zero(device, alpha, beta, gamma):
    args = make_args(M=8, d=5, K=3, P=2, device=device)
    check_against_reference(args, alpha=alpha, beta=beta, gamma=gamma, reduction="none")


def test_alpha_beta_zero_is_cross_entropy_form(device):
    """With alpha = beta = gamma = 0, l_pos is the sum of -log p(g) and l_neg the
    sum of -log(1 - q): check against log_softmax directly."""
    args = make_args(M=6, d=5, K=3, P=1, device=device)
    f, f_aug, z, y = args.values()
    _, s, a, _ = torch.ops.cascla_ext.scla_loss.default(f, f_aug, z, y, 0.0, 0.0, 0.0, "none")
    t = torch.cat([s, a.T], 1)
    log_p = t.log_softmax(1)
    l_pos = -(log_p.gather(1, y[:, None])[:, 0] + log_p[:, -1])
    q = s.softmax(1)
    l_neg = -torch.log1p(-q).sum(1) + torch.log1p(-q.gather(1, y[:, None])[:, 0])
    assert_close(ops.scla_loss(f, f_aug, z, y, alpha=0, beta=0, gamma=0, reduction="none"),
                 l_pos + l_neg)


def test_one_class(device):
    """K = 1: no negatives; with P = 0 the only term is log 1 = 0."""
    args = make_args(M=5, d=4, K=1, P=2, device=device)
    check_against_reference(args, reduction="none")
    args = make_args(M=5, d=4, K=1, P=0, device=device)
    loss, grads = run(ops.scla_loss, args, reduction="sum")
    assert loss.item() == 0
    assert all(torch.all(g == 0) for g in grads.values())


def test_f_aug_none_is_p_zero(device):
    args = make_args(P=0, device=device)
    a = ops.scla_loss(args["f"], None, args["z"], args["y"])
    b = ops.scla_loss(*args.values())
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_similarities_are_finite_and_match(device, dtype):
    """|Sim| in the thousands: every p and q is 0 or 1 to double precision,
    the loss is the size of the margins, the gradients stay finite."""
    args = make_args(M=10, d=8, K=4, P=2, device=device, dtype=dtype, scale=30.0)
    f, f_aug, z, y = args.values()
    _, logits, aug_logits, _ = torch.ops.cascla_ext.scla_loss.default(f, f_aug, z, y, 2.0, 0.5, 1.0, "none")
    assert logits.abs().max() > 1000 and aug_logits.abs().max() > 1000
    loss, grads = run(ops.scla_loss, args, reduction="none")
    assert torch.isfinite(loss).all() and loss.max() > 100
    assert all(torch.isfinite(g).all() for g in grads.values())
    if dtype == torch.float64:
        check_against_reference(args, reduction="none")
        check_against_reference(args, reduction="mean", alpha=0.0, beta=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_similarities_stay_finite(device, dtype):
    """|Sim| around 1e6 and more (no reference: exp would overflow anywhere)."""
    args = make_args(M=12, d=16, K=5, P=2, device=device, dtype=dtype, scale=300.0)
    loss, grads = run(ops.scla_loss, args, reduction="none")
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_float32_matches_reference(device):
    args = make_args(M=64, d=40, K=7, P=2, device=device, dtype=torch.float32)
    for reduction in REDUCTIONS:
        check_against_reference(args, torch.float32, atol=1e-4, rtol=1e-4, reduction=reduction)


def test_float32_matches_float64_at_moderate_size(device):
    """The class sums and per-anchor math run in float64 internally; the
    float32 op stays close to the float64 op over a few thousand anchors."""
    args = make_args(M=3000, d=64, K=7, P=2, device=device)
    args32 = {k: (v.float() if v.is_floating_point() else v) for k, v in args.items()}
    loss, grads = run(ops.scla_loss, args, reduction="mean")
    loss32, grads32 = run(ops.scla_loss, args32, reduction="mean")
    assert_close(loss32.double(), loss, atol=1e-5, rtol=1e-5)
    for name in GRAD_NAMES:
        scale = grads[name].abs().max()
        assert_close(grads32[name].double() / scale, grads[name] / scale, atol=1e-5, rtol=1e-4, msg=name)


def test_non_contiguous_inputs(device):
    args = make_args(M=9, d=6, K=4, P=2, device=device)
    nc = {
        "f": args["f"].t().contiguous().t(),
        "f_aug": args["f_aug"].permute(2, 0, 1).contiguous().permute(1, 2, 0),
        "z": torch.stack([args["z"], args["z"]], dim=-1)[..., 1],
        "y": torch.stack([args["y"], args["y"]], dim=-1)[:, 0],
    }
    assert not any(v.is_contiguous() for v in nc.values())
    for reduction in REDUCTIONS:
        loss, grads = run(ops.scla_loss, nc, reduction=reduction)
        loss_ref, grads_ref = run(reference.scla_loss, args, reduction=reduction)
        assert_close(loss, loss_ref)
        for name in GRAD_NAMES:
            assert_close(grads[name], grads_ref[name], msg=name)


def test_labels_int32(device):
    args = make_args(device=device)
    a = ops.scla_loss(*args.values(), reduction="none")
    b = ops.scla_loss(args["f"], args["f_aug"], args["z"], args["y"].int(), reduction="none")
    assert torch.equal(a, b)


def test_permuting_anchors_permutes_losses(device):
    args = make_args(M=10, d=6, K=3, P=2, device=device)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3)).to(device)
    permuted = {"f": args["f"][perm], "f_aug": args["f_aug"][:, perm], "z": args["z"], "y": args["y"][perm]}
    a = ops.scla_loss(*args.values(), reduction="none")
    b = ops.scla_loss(*permuted.values(), reduction="none")
    assert_close(b, a[perm])


def test_deterministic(device):
    args = make_args(M=300, d=20, K=5, P=2, device=device, dtype=torch.float32)
    first = run(ops.scla_loss, args)
    second = run(ops.scla_loss, args)
    assert torch.equal(first[0], second[0])
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), name


# --------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("P", [0, 2])
def test_gradcheck_float64(device, P, reduction):
    args = make_args(M=6, d=4, K=3, P=P, device=device, labels=[0, 1, 1, 2, 0, 1])
    leaves = [args[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES]
    assert torch.autograd.gradcheck(
        lambda f, a, z: ops.scla_loss(f, a, z, args["y"], reduction=reduction), leaves)


def test_gradcheck_zero_focusing_and_large_values(device):
    args = make_args(M=5, d=4, K=3, P=1, device=device, labels=[0, 1, 1, 2, 0], scale=2.0)
    leaves = [args[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES]
    for alpha, beta in [(0.0, 0.0), (2.0, 0.5)]:
        assert torch.autograd.gradcheck(
            lambda f, a, z: ops.scla_loss(f, a, z, args["y"], alpha=alpha, beta=beta, gamma=1.5,
                                          reduction="none"), leaves)


@pytest.mark.parametrize("case", ["mean_p2", "none_p0", "sum_p1_absent_class"])
def test_opcheck(device, case):
    if case == "mean_p2":
        args, reduction = make_args(device=device), "mean"
    elif case == "none_p0":
        args, reduction = make_args(P=0, device=device), "none"
    else:
        args, reduction = make_args(M=6, K=4, P=1, device=device, labels=[0, 0, 1, 3, 3, 3]), "sum"
    f, f_aug, z, y = args.values()
    inputs = (f.requires_grad_(True), f_aug.requires_grad_(True), z.requires_grad_(True), y)
    torch.library.opcheck(torch.ops.cascla_ext.scla_loss.default, (*inputs, 2.0, 0.5, 1.0, reduction))


def test_torch_compile_fullgraph(device):
    args = make_args(device=device)
    y = args["y"]

    def f(feat, aug, z):
        return ops.scla_loss(feat, aug, z, y, reduction="sum") + ops.scla_loss(feat, None, z, y)

    assert_compiled_matches_eager(f, {k: args[k] for k in GRAD_NAMES})


def test_double_backward_raises(device):
    args = make_args(device=device)
    f = args["f"].requires_grad_(True)
    loss = ops.scla_loss(*args.values())
    (gf,) = torch.autograd.grad(loss, f, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gf.sum().backward()


# --------------------------------------------------------------------------
# Memory: M = 65,536 anchors of width 600 (float32, P = 2). The literal form
# needs M x M matrices (16 GB each in float32); the op needs its inputs, their
# gradients and O((M + K) d + M K) more.

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    import cascla_ext
    from cascla_ext import ops

    # This process's own peak RSS: Linux carries the parent's (pytest's) peak
    # into a child's ru_maxrss across fork/vfork + exec, so reset the
    # high-water mark (clear_refs 5) and read VmHWM where /proc has them.
    def peak_bytes():
        try:
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    torch.manual_seed(0)
    M, d, K, P = 65536, 600, 7, 2
    f = torch.randn(M, d, requires_grad=True)
    f_aug = torch.randn(P, M, d).requires_grad_(True)
    z = torch.randn(K, d, requires_grad=True)
    y = torch.randint(K, (M,))
    kb = peak_bytes
    before = kb()
    loss = ops.scla_loss(f, f_aug, z, y)
    loss.backward()
    print(json.dumps({"before": before, "peak": kb(), "loss": loss.item(),
                      "finite": bool(torch.isfinite(f.grad).all() and torch.isfinite(f_aug.grad).all()
                                     and torch.isfinite(z.grad).all()),
                      "input_bytes": 4 * (f.numel() + f_aug.numel())}))
""")


def test_memory_bounded_at_65536_anchors():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["finite"] and math.isfinite(r["loss"])
    grown = r["peak"] - r["before"]
    # The gradients of f and f_aug take input_bytes; everything else must be small.
    assert grown < 1.25 * r["input_bytes"], f"forward+backward grew RSS by {grown / 2**20:.0f} MiB"
    assert r["peak"] < 2 * 2**30, f"peak RSS {r['peak'] / 2**30:.2f} GiB"


# --------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

BAD_SHAPES = [
    ("f", lambda a: a["f"][0], ValueError, r"expected f of shape \(M, d\)"),
    ("f", lambda a: a["f"][:1], ValueError, r"at least 2 anchors.*got M = 1"),
    ("f", lambda a: a["f"][:, :1], ValueError, r"feature size d = f.size\(1\) >= 2.*got d = 1"),
    ("f_aug", lambda a: a["f_aug"][:, :5], ValueError, r"f_aug of shape \(\*, 9, 6\)"),
    ("f_aug", lambda a: a["f_aug"][..., :4], ValueError, r"f_aug of shape \(\*, 9, 6\)"),
    ("f_aug", lambda a: a["f_aug"][0], ValueError, r"f_aug of shape \(\*, 9, 6\)"),
    ("z", lambda a: a["z"][:, :5], ValueError, r"z of shape \(\*, 6\)"),
    ("z", lambda a: a["z"][:0], ValueError, r"z of shape \(K, d\) with K >= 1"),
    ("y", lambda a: a["y"][:5], ValueError, r"y of shape \(9,\)"),
]


@pytest.mark.parametrize("name,mutate,exc,pattern", BAD_SHAPES,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_SHAPES)])
def test_bad_shapes_raise(device, name, mutate, exc, pattern):
    args = make_args(device=device)
    args[name] = mutate(args)
    if name == "f":  # keep the others consistent so the error is about f
        M, d = args["f"].shape[0], args["f"].shape[-1]
        args["f_aug"] = args["f_aug"][:, :M, :d]
        args["z"] = args["z"][:, :d]
        args["y"] = args["y"][:M]
    with pytest.raises(exc, match=pattern):
        ops.scla_loss(*args.values())


@pytest.mark.parametrize("labels,pattern", [
    ([0, 1, 2, 3, 4, 0, 1, 2, 3], r"y\[i\] in \[0, K\) = \[0, 4\), got y\[4\] = 4"),
    ([0, 1, 2, 3, 0, 1, -1, 2, 3], r"got y\[6\] = -1"),
])
def test_labels_out_of_range_raise(device, labels, pattern):
    if device == "cuda":
        pytest.skip("on CUDA a bad label fails a device-side assert (no host check, no sync), which "
                    "ends the process's CUDA context: test_cuda_sync.py checks it in a subprocess")
    args = make_args(device=device)
    args["y"] = torch.tensor(labels, device=device)
    with pytest.raises(ValueError, match=pattern):
        ops.scla_loss(*args.values())


def test_bad_dtypes_raise(device):
    args = make_args(device=device)
    with pytest.raises(TypeError, match="expected f to be float32 or float64"):
        ops.scla_loss(*{**args, "f": args["f"].long()}.values())
    with pytest.raises(TypeError, match="expected z to have the dtype of f"):
        ops.scla_loss(*{**args, "z": args["z"].float()}.values())
    with pytest.raises(TypeError, match="expected f_aug to have the dtype of f"):
        ops.scla_loss(*{**args, "f_aug": args["f_aug"].float()}.values())
    with pytest.raises(TypeError, match="expected y to be an integer tensor"):
        ops.scla_loss(*{**args, "y": args["y"].double()}.values())


@pytest.mark.parametrize("kw,pattern", [
    ({"reduction": "avg"}, r"reduction to be one of 'none', 'sum', 'mean', got 'avg'"),
    ({"alpha": -1.0}, r"alpha .* >= 0, got -1"),
    ({"beta": float("nan")}, r"beta .* finite and >= 0"),
    ({"gamma": float("inf")}, r"gamma .* finite"),
])
def test_bad_parameters_raise(device, kw, pattern):
    args = make_args(device=device)
    with pytest.raises(ValueError, match=pattern):
        ops.scla_loss(*args.values(), **kw)


def test_backward_op_checks_its_arguments():
    args = make_args()
    f, f_aug, z, y = args.values()
    _, logits, aug_logits, class_sums = torch.ops.cascla_ext.scla_loss.default(f, f_aug, z, y, 2.0, 0.5, 1.0, "none")
    bwd = torch.ops.cascla_ext.scla_loss_backward.default
    with pytest.raises(ValueError, match=r"grad of shape \(9,\)"):
        bwd(torch.ones((), dtype=f.dtype), f, f_aug, z, y, logits, aug_logits, class_sums, 2.0, 0.5, 1.0, "none")
    with pytest.raises(ValueError, match=r"logits of shape \(9, 4\)"):
        bwd(torch.ones(9, dtype=f.dtype), f, f_aug, z, y, logits[:, :3], aug_logits, class_sums, 2.0, 0.5, 1.0, "none")
    with pytest.raises(TypeError, match="class_sums to be float64"):
        bwd(torch.ones(9, dtype=f.dtype), f, f_aug, z, y, logits, aug_logits, class_sums.float(), 2.0, 0.5, 1.0, "none")
    with pytest.raises(ValueError, match=r"got y\[0\] = 7"):
        bwd(torch.ones(9, dtype=f.dtype), f, f_aug, z, torch.full_like(y, 7), logits, aug_logits, class_sums, 2.0, 0.5, 1.0, "none")


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices_raise():
    args = make_args(device="cuda")
    with pytest.raises(ValueError, match="expected z on the device of f"):
        ops.scla_loss(*{**args, "z": args["z"].cpu()}.values())
    with pytest.raises(ValueError, match="expected f_aug on the device of f"):
        ops.scla_loss(*{**args, "f_aug": args["f_aug"].cpu()}.values())
    with pytest.raises(ValueError, match="expected y on cuda"):
        ops.scla_loss(*{**args, "y": args["y"].cpu()}.values())


# --------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("M,P", [(4096, 2), (1000, 0), (70000, 1)])
def test_cuda_matches_cpu_at_model_size(M, P):
    """Model widths on CUDA vs the CPU kernel, float32 (70,000 rows: several
    class-sum chunks and anchor blocks)."""
    args = make_args(M=M, d=600, K=7, P=P, dtype=torch.float32, scale=0.2)
    cuda_args = {k: v.cuda() for k, v in args.items()}
    for reduction in ("mean", "none"):
        loss_c, g_c = run(ops.scla_loss, args, reduction=reduction)
        loss_g, g_g = run(ops.scla_loss, cuda_args, reduction=reduction)
        assert_close(loss_g.cpu(), loss_c, atol=1e-4, rtol=1e-4)
        for name in GRAD_NAMES:
            assert g_g[name].shape == g_c[name].shape, name
            if g_c[name].numel() == 0:  # f_aug's gradient when P = 0
                continue
            scale = g_c[name].abs().max().clamp_min(1e-30)
            assert_close(g_g[name].cpu() / scale, g_c[name] / scale, atol=1e-4, rtol=1e-3, msg=name)


@requires_cuda
@pytest.mark.cuda
def test_cuda_runs_on_current_stream():
    """Inputs written on a side stream after a long sleep: kernels that ran on
    another stream would read them before they are ready."""
    args = make_args(M=2000, d=64, K=7, device="cuda", dtype=torch.float32)
    expected, expected_g = run(ops.scla_loss, args)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        late = {k: (v * 1 if v.is_floating_point() else v + 0) for k, v in args.items()}
        loss, grads = run(ops.scla_loss, late)
    stream.synchronize()
    assert_close(loss, expected)
    for name in GRAD_NAMES:
        assert_close(grads[name], expected_g[name], msg=name)
