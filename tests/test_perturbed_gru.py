"""cascla_ext.ops.perturbed_gru: the fused kernels against the reference twin,
torch.nn.GRU, gradcheck, opcheck and torch.compile (spec: ops.md section 1)."""

from __future__ import annotations

import pytest
import torch

from cascla_ext import ops, reference
from conftest import assert_close, assert_compiled_matches_eager, requires_cuda

GRAD_NAMES = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "rho"]


def make_args(T=5, B=4, D=3, H=6, *, device="cpu", dtype=torch.float64, bias=True, rho=True,
              lengths=None, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).to(device)

    args = {
        "x": rnd(T, B, D),
        "h0": rnd(B, H),
        "w_ih": rnd(3 * H, D),
        "w_hh": rnd(3 * H, H),
        "b_ih": rnd(3 * H) if bias else None,
        "b_hh": rnd(3 * H) if bias else None,
        "rho": rnd(T, B, 3 * H) if rho else None,
    }
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return args, lengths


def run(fn, args, lengths, reverse, grad_out_seed=1):
    """Forward, then backward of a random linear function of (y, h_n); returns values and grads."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None)
              for k, v in args.items()}
    y, h = fn(*leaves.values(), lengths=lengths, reverse=reverse)
    g = torch.Generator().manual_seed(grad_out_seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    gh = torch.randn(h.shape, generator=g, dtype=h.dtype).to(h.device)
    ((y * gy).sum() + (h * gh).sum()).backward()
    grads = {k: (v.grad if v is not None else None) for k, v in leaves.items()}
    return y.detach(), h.detach(), grads


def check_against_reference(args, lengths, reverse, dtype=torch.float64):
    y, h, grads = run(ops.perturbed_gru, args, lengths, reverse)
    y_ref, h_ref, grads_ref = run(reference.perturbed_gru, args, lengths, reverse)
    assert_close(y, y_ref, dtype, msg="y")
    assert_close(h, h_ref, dtype, msg="h_n")
    for name in GRAD_NAMES:
        if args[name] is None:
            assert grads[name] is None
        else:
            assert_close(grads[name], grads_ref[name], dtype, msg=f"grad {name}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "lengths", [None, [5, 5, 5, 5], [5, 0, 1, 3], [1, 2, 0, 4]], ids=["none", "full", "mixed", "short"]
)
@pytest.mark.parametrize("with_rho", [True, False])
def test_matches_reference_float64(device, reverse, lengths, with_rho):
    args, lens = make_args(device=device, rho=with_rho, lengths=lengths)
    check_against_reference(args, lens, reverse)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_float32(device, bias):
    args, lens = make_args(T=9, B=7, D=11, H=13, device=device, dtype=torch.float32, bias=bias,
                           lengths=[9, 3, 0, 1, 9, 8, 2])
    for reverse in (False, True):
        check_against_reference(args, lens, reverse, dtype=torch.float32)


@pytest.mark.parametrize(
    "T,B,D,H",
    # the last one is large enough (B * H > 32k) that the CPU kernel splits the batch across threads
    [(1, 1, 1, 1), (2, 3, 1, 7), (7, 1, 5, 1), (4, 2, 9, 17), (3, 5, 2, 33), (3, 70, 2, 1001)],
    ids=lambda v: str(v),
)
def test_odd_sizes(device, T, B, D, H):
    """Sizes that are not multiples of any vector width, including 1."""
    lengths = [T - (b % T) for b in range(B)]
    args, lens = make_args(T, B, D, H, device=device, lengths=lengths)
    for reverse in (False, True):
        check_against_reference(args, lens, reverse)


def test_empty_sequences(device):
    """T = 0 gives an empty y and h_n = h0; B = 0 gives empty outputs."""
    args, _ = make_args(T=0, device=device)
    y, h = ops.perturbed_gru(*args.values())
    assert y.shape == (0, 4, 6)
    assert_close(h, args["h0"])
    args, _ = make_args(B=0, device=device)
    y, h = ops.perturbed_gru(*args.values())
    assert y.shape == (5, 0, 6) and h.shape == (0, 6)


def test_length_zero_keeps_h0_and_zero_output(device):
    args, lens = make_args(device=device, lengths=[0, 5, 0, 2])
    for reverse in (False, True):
        y, h = ops.perturbed_gru(*args.values(), lengths=lens, reverse=reverse)
        for b, L in enumerate(lens.tolist()):
            assert torch.all(y[L:, b] == 0), "padded steps must be exactly 0"
            if L == 0:
                assert torch.equal(h[b], args["h0"][b])


def test_lengths_as_list_and_on_device(device):
    args, lens = make_args(device=device, lengths=[5, 2, 1, 4])
    y1, h1 = ops.perturbed_gru(*args.values(), lengths=lens)
    y2, h2 = ops.perturbed_gru(*args.values(), lengths=[5, 2, 1, 4])
    y3, h3 = ops.perturbed_gru(*args.values(), lengths=lens.to(device=device, dtype=torch.int32))
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    assert torch.equal(y1, y3) and torch.equal(h1, h3)


def test_non_contiguous_inputs(device):
    args, lens = make_args(T=6, B=5, D=4, H=7, device=device, lengths=[6, 2, 0, 5, 1])
    # Same values, non-contiguous layouts: transposed storage, strided slices.
    nc = {
        "x": args["x"].transpose(0, 1).contiguous().transpose(0, 1),
        "h0": args["h0"].t().contiguous().t(),
        "w_ih": args["w_ih"].t().contiguous().t(),
        "w_hh": torch.stack([args["w_hh"], args["w_hh"]], dim=-1)[..., 0],
        "b_ih": torch.stack([args["b_ih"], args["b_ih"]], dim=-1)[:, 1],
        "b_hh": args["b_hh"].flip(0).flip(0),
        "rho": args["rho"].permute(2, 0, 1).contiguous().permute(1, 2, 0),
    }
    assert not any(v.is_contiguous() for k, v in nc.items() if k not in ("b_hh",))
    for reverse in (False, True):
        y, h, g = run(ops.perturbed_gru, nc, lens, reverse)
        y_ref, h_ref, g_ref = run(reference.perturbed_gru, args, lens, reverse)
        assert_close(y, y_ref)
        assert_close(h, h_ref)
        for name in GRAD_NAMES:
            assert_close(g[name], g_ref[name], msg=name)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_float64(device, reverse):
    args, lens = make_args(T=4, B=3, D=2, H=3, device=device, lengths=[4, 0, 2])
    inputs = tuple(v.detach().clone().requires_grad_(True) for v in args.values())
    assert torch.autograd.gradcheck(
        lambda *a: ops.perturbed_gru(*a, lengths=lens, reverse=reverse), inputs
    )


def test_gradcheck_without_bias_and_rho(device):
    args, _ = make_args(T=3, B=2, D=2, H=3, device=device, bias=False, rho=False)
    leaves = [args[k].detach().clone().requires_grad_(True) for k in ("x", "h0", "w_ih", "w_hh")]
    assert torch.autograd.gradcheck(lambda x, h0, wi, wh: ops.perturbed_gru(x, h0, wi, wh, None, None), leaves)


@pytest.mark.parametrize("case", ["full", "lengths_reverse", "no_bias"])
def test_opcheck(device, case):
    if case == "full":
        args, lens = make_args(device=device)
        reverse = False
    elif case == "lengths_reverse":
        args, lens = make_args(device=device, lengths=[5, 0, 1, 3])
        reverse = True
    else:
        args, lens = make_args(device=device, bias=False, rho=False)
        reverse = False
    inputs = [v.requires_grad_(True) if v is not None else None for v in args.values()]
    torch.library.opcheck(
        torch.ops.cascla_ext.perturbed_gru.default, (*inputs, lens, reverse)
    )


@pytest.mark.parametrize("batch_first_lengths", [None, [5, 3, 1, 4]])
def test_equals_nn_gru_without_perturbation(device, batch_first_lengths):
    """rho = 0 (or None) is exactly torch.nn.GRU; the reverse direction equals
    the reverse half of a bidirectional nn.GRU on a packed sequence."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    T, B, D, H = 5, 4, 3, 6
    gru = torch.nn.GRU(D, H, bidirectional=True).to(device)
    x = torch.randn(T, B, D, device=device)
    lengths = torch.tensor(batch_first_lengths or [T] * B)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h_n = gru(packed)
    out, _ = pad_packed_sequence(out, total_length=T)
    h0 = torch.zeros(B, H, device=device)
    p = dict(gru.named_parameters())
    for d, sfx in enumerate(["", "_reverse"]):
        rho = torch.zeros(T, B, 3 * H, device=device) if d == 0 else None
        y, h = ops.perturbed_gru(x, h0, p["weight_ih_l0" + sfx], p["weight_hh_l0" + sfx],
                                 p["bias_ih_l0" + sfx], p["bias_hh_l0" + sfx], rho,
                                 lengths, reverse=d == 1)
        assert_close(y, out[..., d * H:(d + 1) * H].detach(), torch.float32)
        assert_close(h, h_n[d].detach(), torch.float32)


def test_perturbation_enters_the_gates(device):
    """Each gate's slice of rho changes the output, and d y / d rho equals the
    gradient with respect to the gate pre-activations (checked via b_ih / b_hh:
    a constant rho on r or z is a bias shift)."""
    args, _ = make_args(device=device)
    y0, _ = ops.perturbed_gru(*args.values())
    H = args["h0"].shape[1]
    for gate in range(3):
        rho = torch.zeros_like(args["rho"])
        rho[..., gate * H:(gate + 1) * H] = 0.3
        y, _ = ops.perturbed_gru(*{**args, "rho": rho}.values())
        assert not torch.allclose(y, ops.perturbed_gru(*{**args, "rho": None}.values())[0])
        if gate < 2:  # for r and z, rho is exactly a shift of b_ih
            b_ih = args["b_ih"].clone()
            b_ih[gate * H:(gate + 1) * H] += 0.3
            y_bias, _ = ops.perturbed_gru(*{**args, "b_ih": b_ih, "rho": None}.values())
            assert_close(y, y_bias)
    assert y0.shape == (5, 4, H)
    # grad of rho summed over (t, b) equals grad of b_ih for every gate.
    _, _, grads = run(ops.perturbed_gru, args, None, False)
    assert_close(grads["rho"].sum((0, 1)), grads["b_ih"])


def test_torch_compile_fullgraph(device):
    args, lens = make_args(device=device, lengths=[5, 0, 1, 3])

    def f(x, h0, w_ih, w_hh, b_ih, b_hh, rho):
        y, h = ops.perturbed_gru(x, h0, w_ih, w_hh, b_ih, b_hh, rho, lens, True)
        return (y.sin().sum() + h.square().sum())

    assert_compiled_matches_eager(f, dict(zip(GRAD_NAMES, args.values())))


def test_double_backward_raises(device):
    args, _ = make_args(device=device)
    x = args["x"].requires_grad_(True)
    y, _ = ops.perturbed_gru(*args.values())
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


# --------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

BAD_SHAPES = [
    ("x", lambda a: a["x"][0], "x of shape \\(T, B, D\\)"),
    ("h0", lambda a: a["h0"][:, :0], "hidden size"),
    ("h0", lambda a: a["h0"][:3], "h0 of shape \\(4, 6\\)"),
    ("w_ih", lambda a: a["w_ih"][:, :2], "w_ih of shape \\(18, 3\\)"),
    ("w_hh", lambda a: a["w_hh"][:12], "w_hh of shape \\(18, 6\\)"),
    ("b_ih", lambda a: a["b_ih"][:5], "b_ih of shape \\(18,\\)"),
    ("b_hh", lambda a: a["b_hh"].reshape(3, 6), "b_hh of shape \\(18,\\)"),
    ("rho", lambda a: a["rho"][:, :2], "rho of shape \\(5, 4, 18\\)"),
]


@pytest.mark.parametrize("name,mutate,pattern", BAD_SHAPES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_SHAPES)])
def test_bad_shapes_raise(device, name, mutate, pattern):
    args, _ = make_args(device=device)
    args[name] = mutate(args)
    with pytest.raises(ValueError, match=pattern):
        ops.perturbed_gru(*args.values())


def test_bad_dtypes_raise(device):
    args, _ = make_args(device=device)
    with pytest.raises(TypeError, match="expected x to be float32 or float64"):
        ops.perturbed_gru(*{**args, "x": args["x"].to(torch.int64)}.values())
    with pytest.raises(TypeError, match="expected w_hh to have the dtype of x"):
        ops.perturbed_gru(*{**args, "w_hh": args["w_hh"].float()}.values())
    with pytest.raises(TypeError, match="lengths to be an integer tensor"):
        ops.perturbed_gru(*args.values(), lengths=torch.ones(4))


@pytest.mark.parametrize(
    "lengths,pattern",
    [([5, 6, 1, 1], r"lengths\[b\] in \[0, T\] = \[0, 5\], got lengths\[1\] = 6"),
     ([5, -1, 1, 1], r"got lengths\[1\] = -1"),
     ([5, 5, 5], r"lengths of shape \(4,\)")],
)
def test_bad_lengths_raise(device, lengths, pattern):
    args, _ = make_args(device=device)
    with pytest.raises(ValueError, match=pattern):
        ops.perturbed_gru(*args.values(), lengths=lengths)


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices_raise():
    args, _ = make_args(device="cuda")
    with pytest.raises(ValueError, match="expected w_ih on the device of x"):
        ops.perturbed_gru(*{**args, "w_ih": args["w_ih"].cpu()}.values())
    with pytest.raises(ValueError, match="expected rho on the device of x"):
        ops.perturbed_gru(*{**args, "rho": args["rho"].cpu()}.values())
    cpu_args, _ = make_args(device="cpu")
    with pytest.raises(ValueError, match="lengths on the CPU or on cpu"):
        ops.perturbed_gru(*cpu_args.values(), lengths=torch.tensor([5, 5, 5, 5], device="cuda"))


@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_at_model_size():
    """A realistic size (bidirectional MELD-like layer) on CUDA vs the CPU kernel, float32."""
    args, lens = make_args(T=24, B=32, D=100, H=300, dtype=torch.float32, scale=0.1,
                           lengths=[24 - (b % 24) for b in range(32)])
    for reverse in (False, True):
        y_c, h_c, g_c = run(ops.perturbed_gru, args, lens, reverse)
        cuda_args = {k: v.cuda() for k, v in args.items()}
        y_g, h_g, g_g = run(ops.perturbed_gru, cuda_args, lens, reverse)
        assert_close(y_g.cpu(), y_c, atol=1e-4, rtol=1e-3)
        assert_close(h_g.cpu(), h_c, atol=1e-4, rtol=1e-3)
        for name in GRAD_NAMES:
            assert_close(g_g[name].cpu(), g_c[name], atol=1e-3, rtol=1e-3, msg=name)


@requires_cuda
@pytest.mark.cuda
def test_cuda_runs_on_current_stream():
    """Inputs written on a side stream after a long sleep: kernels that ran on
    another stream would read them before they are ready."""
    args, lens = make_args(device="cuda", dtype=torch.float32, lengths=[5, 0, 1, 3])
    expected, expected_h = ops.perturbed_gru(*args.values(), lengths=lens)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        late = {k: v * 1.0 for k, v in args.items()}
        y, h = ops.perturbed_gru(*late.values(), lengths=lens)
    stream.synchronize()
    assert_close(y, expected)
    assert_close(h, expected_h)


# The opt-in persistent forward (CASCLA_GRU_PERSISTENT, csrc/cuda/perturbed_gru_persistent.cuh):
# "require" makes the op raise where the kernel does not fit, so these runs
# cannot pass on the per-step kernels by a silent fallback. The backward (the
# per-step kernels) reads what the persistent forward saved.
@pytest.mark.parametrize(
    "T,B,D,H,dtype,lengths",
    [(5, 4, 3, 6, torch.float64, [5, 0, 1, 3]),
     (9, 7, 11, 13, torch.float32, [9, 3, 0, 1, 9, 8, 2]),
     (24, 32, 600, 300, torch.float32, [24 - (b % 24) for b in range(32)]),  # MELD shape
     (31, 3, 5, 257, torch.float32, None)],  # odd sizes, H beyond one block per SM on most GPUs
    ids=["f64", "f32_odd", "meld", "wide"])
@requires_cuda
@pytest.mark.cuda
def test_persistent_forward_matches_reference(monkeypatch, T, B, D, H, dtype, lengths):
    scale = 0.5 if H < 100 else 0.05
    args, lens = make_args(T, B, D, H, device="cuda", dtype=dtype, lengths=lengths, scale=scale)
    monkeypatch.setenv("CASCLA_GRU_PERSISTENT", "require")
    for reverse in (False, True):
        y, h, grads = run(ops.perturbed_gru, args, lens, reverse)
        y_ref, h_ref, grads_ref = run(reference.perturbed_gru, args, lens, reverse)
        tol = {} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-3}
        assert_close(y, y_ref, dtype, msg="y", **tol)
        assert_close(h, h_ref, dtype, msg="h_n", **tol)
        for name in GRAD_NAMES:
            assert_close(grads[name], grads_ref[name], dtype, msg=f"grad {name}", **tol)
    monkeypatch.delenv("CASCLA_GRU_PERSISTENT")
    y_step, h_step, _ = run(ops.perturbed_gru, args, lens, True)  # the per-step kernels
    assert_close(y, y_step, dtype, msg="persistent vs per-step y", **tol)
    assert_close(h, h_step, dtype, msg="persistent vs per-step h_n", **tol)
