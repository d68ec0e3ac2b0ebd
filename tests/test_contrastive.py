"""cascla_ext.nn.SupConLoss and SPCLLoss, the contrastive losses of the
paper's batch-size study (Table 5): the vectorised losses against their
literal twins in cascla_ext.reference (values and gradients, float64 and
float32, odd sizes, non-contiguous inputs), hand-computed examples that pin the
formulas themselves, gradcheck, the degenerate cases (no positive, tiny
temperature), SPCLLoss's per-class queue, and the argument errors."""

from __future__ import annotations

import math

import pytest
import torch

from cascla_ext import reference
from cascla_ext.nn import SPCLLoss, SupConLoss
from cascla_ext.nn.contrastive import spcl_loss, supcon_loss
from conftest import assert_close, requires_cuda

K, D = 7, 5
SIZES = [1, 2, 7, 33]
VIEWS = [0, 1, 2]
DTYPES = [torch.float64, torch.float32]


def make_labels(M: int, g: torch.Generator) -> torch.Tensor:
    """M labels over K = 7 classes with classes 3, 5 and 6 absent and class 4
    a single sample (M = 2: two single-sample classes)."""
    rest = torch.tensor([0, 1, 2])[torch.randint(0, 3, (M - 1,), generator=g)]
    return torch.cat([torch.tensor([4]), rest])[torch.randperm(M, generator=g)]


def make_batch(M: int, P: int, *, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    """f (M, D), views f_aug (P, M, D) near f, labels y (make_labels)."""
    g = torch.Generator().manual_seed(seed)
    f = scale * torch.randn(M, D, generator=g, dtype=torch.float64)
    f_aug = f + 0.5 * scale * torch.randn(P, M, D, generator=g, dtype=torch.float64)
    y = make_labels(M, g) if M else torch.zeros(0, dtype=torch.int64)
    return f.to(device, dtype), f_aug.to(device, dtype), y.to(device)


def value_and_grads(loss_fn, f, f_aug, y, *, noncontiguous=False):
    """loss_fn(f, f_aug, y) on fresh leaves and its gradients w.r.t. f and
    f_aug (zeros where unused). noncontiguous: f is passed transposed in
    memory, f_aug as a slice, y as a strided slice (same values)."""
    fl = f.detach().clone().requires_grad_(True)
    al = f_aug.detach().clone().requires_grad_(True)
    fi, ai, yi = fl, al, y
    if noncontiguous:
        fi = fl.T.contiguous().T  # strides (1, M)
        ai = torch.cat([al, al], -1)[..., : al.shape[-1]]  # strides (M 2D, 2D, 1)
        yi = torch.stack([y, torch.full_like(y, -1)], 1)[:, 0]  # stride 2
        if f.shape[0] > 1:
            assert not fi.is_contiguous() and not ai.is_contiguous() and not yi.is_contiguous()
    loss = loss_fn(fi, ai, yi)
    grads = torch.autograd.grad(loss, [fl, al], materialize_grads=True)
    return loss.detach(), grads


def spcl_module(dtype, device, *, queue_size=64, seed=1):
    """An SPCLLoss (K = 7) whose queue holds classes 0, 1 and 3 (3 is absent
    from make_labels' batches: a prototype with no anchor), so 2, 4, 5, 6 have
    none until a batch brings them."""
    mod = SPCLLoss(K, D, temperature=0.1, queue_size=queue_size, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    warm = torch.randn(12, D, generator=g, dtype=torch.float64).to(device, dtype)
    mod(warm, torch.tensor([0, 1, 3] * 4, device=device))
    assert mod.queue_total.tolist() == [4, 4, 0, 4, 0, 0, 0]
    return mod


# --------------------------------------------------------------------------- hand-computed


def test_supcon_by_hand():
    # Normalised samples z0 = (1, 0), z1 = (0, 1), z2 = (c, c), z3 = (-1, 0),
    # labels 0, 0, 0, 1; tau = 0.5, so s/tau = 2 z_i.z_a. Anchor 3 has no
    # positive and is left out; the others have two positives each.
    f = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-0.5, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    c = 1 / math.sqrt(2)
    l0 = math.log(math.exp(0) + math.exp(2 * c) + math.exp(-2)) - 0.5 * (0 + 2 * c)
    l1 = math.log(math.exp(0) + math.exp(2 * c) + math.exp(0)) - 0.5 * (0 + 2 * c)
    l2 = math.log(math.exp(2 * c) + math.exp(2 * c) + math.exp(-2 * c)) - 0.5 * (2 * c + 2 * c)
    expected = (l0 + l1 + l2) / 3
    assert SupConLoss(temperature=0.5)(f, y).item() == pytest.approx(expected, rel=1e-12)
    assert reference.supcon_loss(f, None, y, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_supcon_by_hand_with_a_view_and_no_normalisation():
    # d = 1, tau = 1, not normalised: samples 1, 2 (f) and 0.5, -1 (the view),
    # labels 0, 1, 0, 1: each sample's one positive is its other view.
    f = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    f_aug = torch.tensor([[[0.5], [-1.0]]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    e = math.exp
    losses = [
        -(0.5 - math.log(e(2) + e(0.5) + e(-1))),  # z = 1: others 2, 0.5, -1; positive 0.5
        -(-2 - math.log(e(2) + e(1) + e(-2))),  # z = 2: others 2, 1, -2; positive -2
        -(0.5 - math.log(e(0.5) + e(1) + e(-0.5))),  # z = 0.5: others 0.5, 1, -0.5; positive 0.5
        -(-2 - math.log(e(-1) + e(-2) + e(-0.5))),  # z = -1: others -1, -2, -0.5; positive -2
    ]
    loss = SupConLoss(temperature=1.0, normalize=False)(f, y, f_aug)
    assert loss.item() == pytest.approx(sum(losses) / 4, rel=1e-12)


def test_spcl_by_hand_at_given_prototypes():
    # z0 = (1, 0), z1 = (0, 1), labels 0, 1; prototypes c0 = (1, 0), c1 = (c, c),
    # class 2 none (zero row); tau = 0.5.
    f = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    protos = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    c, e = 1 / math.sqrt(2), math.exp
    # anchor 0: positive c0 (s = 1); negatives z1 (0), c1 (c)
    l0 = -math.log(e(2) / (e(0) + e(2) + e(2 * c)))
    # anchor 1: positive c1 (s = c); negatives z0 (0), c0 (0)
    l1 = -math.log(e(2 * c) / (e(0) + e(0) + e(2 * c)))
    expected = (l0 + l1) / 2
    assert spcl_loss(f, None, y, protos, 0.5).item() == pytest.approx(expected, rel=1e-12)
    assert reference.spcl_loss(f, None, y, protos, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_spcl_module_by_hand():
    # A fresh queue: the prototypes are the means of the batch's own
    # normalised class members, c0 = ((1, 0) + (0, 1)) / 2, c1 = (-1, 0).
    # tau = 1, anchors z0 = (1, 0), z1 = (0, 1), z2 = (-1, 0), labels 0, 0, 1.
    f = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    mod = SPCLLoss(2, 2, temperature=1.0, dtype=torch.float64)
    c, e = 1 / math.sqrt(2), math.exp
    # anchor 0: positives z1 (0), c0 (c); negatives z2 (-1), c1 (-1)
    l0 = math.log(e(0) + e(c) + 2 * e(-1)) - math.log(e(0) + e(c))
    # anchor 1: positives z0 (0), c0 (c); negatives z2 (0), c1 (0)
    l1 = math.log(e(0) + e(c) + 2 * e(0)) - math.log(e(0) + e(c))
    # anchor 2: positive c1 (1, its own detached direction); negatives z0 (-1), z1 (0), c0 (-c)
    l2 = math.log(e(1) + e(-1) + e(0) + e(-c)) - 1
    assert mod(f, y).item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-12)
    assert_close(mod.last_prototypes, torch.tensor([[0.5, 0.5], [-1.0, 0.0]], dtype=torch.float64))


# --------------------------------------------------------------------------- against the twins


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("P", VIEWS)
@pytest.mark.parametrize("M", SIZES)
def test_supcon_matches_twin(M, P, dtype):
    f, f_aug, y = make_batch(M, P, dtype=dtype, seed=M * 10 + P)
    mod = SupConLoss(temperature=0.1)
    got, got_g = value_and_grads(lambda a, b, c: mod(a, c, b), f, f_aug, y)
    want, want_g = value_and_grads(lambda a, b, c: reference.supcon_loss(a, b, c, 0.1), f, f_aug, y)
    assert got.dtype == dtype and got.shape == ()
    assert_close(got, want)
    for name, a, b in zip(["f", "f_aug"], got_g, want_g):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("P", VIEWS)
@pytest.mark.parametrize("M", SIZES)
def test_spcl_matches_twin(M, P, dtype):
    f, f_aug, y = make_batch(M, P, dtype=dtype, seed=M * 10 + P)
    mod = spcl_module(dtype, "cpu")
    before = mod.prototypes(f, y)
    got, got_g = value_and_grads(lambda a, b, c: mod(a, c, b), f, f_aug, y)
    protos = mod.last_prototypes
    assert_close(protos, before)  # prototypes(f, y) foretells what forward uses
    # Classes 5 and 6 never seen: no prototype; 2 and 4 only through this batch.
    assert (protos[5:] == 0).all() and (protos[:5].abs().sum(1) > 0)[[0, 1, 3]].all()
    want, want_g = value_and_grads(lambda a, b, c: reference.spcl_loss(a, b, c, protos, 0.1), f, f_aug, y)
    assert got.dtype == dtype and got.shape == ()
    assert_close(got, want)
    for name, a, b in zip(["f", "f_aug"], got_g, want_g):
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("M,P", [(2, 2), (7, 1), (33, 2)])
def test_noncontiguous_inputs(M, P):
    f, f_aug, y = make_batch(M, P, seed=3)
    protos = spcl_module(torch.float64, "cpu").prototypes()
    cases = {
        "supcon": (lambda a, b, c: SupConLoss()(a, c, b), lambda a, b, c: reference.supcon_loss(a, b, c)),
        "spcl": (lambda a, b, c: spcl_loss(a, b, c, protos), lambda a, b, c: reference.spcl_loss(a, b, c, protos)),
    }
    for name, (fast, twin) in cases.items():
        got, got_g = value_and_grads(fast, f, f_aug, y, noncontiguous=True)
        want, want_g = value_and_grads(twin, f, f_aug, y)
        assert_close(got, want, msg=name)
        for a, b in zip(got_g, want_g):
            assert_close(a, b, msg=name)


def test_spcl_at_arbitrary_prototypes_matches_twin():
    # Prototypes of any length (not unit), some classes without one, labels
    # whose class has no prototype and no other member (anchor skipped).
    f, f_aug, y = make_batch(7, 1, seed=4)
    g = torch.Generator().manual_seed(5)
    protos = 3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    protos[[2, 4, 6]] = 0  # class 4 (a single sample) has no prototype: only its view is a positive
    for P in (0, 1):
        fa = f_aug[:P]
        got, got_g = value_and_grads(lambda a, b, c: spcl_loss(a, b, c, protos, 0.2), f, fa, y)
        want, want_g = value_and_grads(lambda a, b, c: reference.spcl_loss(a, b, c, protos, 0.2), f, fa, y)
        assert_close(got, want)
        for a, b in zip(got_g, want_g):
            assert_close(a, b)


def test_views_as_a_sequence_or_none():
    f, f_aug, y = make_batch(7, 2, seed=6)
    for mod in (SupConLoss(), spcl_module(torch.float64, "cpu").eval()):
        assert_close(mod(f, y, [f_aug[0], f_aug[1]]), mod(f, y, f_aug))
        assert_close(mod(f, y, []), mod(f, y))
        assert_close(mod(f, y, f_aug[:0]), mod(f, y, None))


def test_gradcheck():
    g = torch.Generator().manual_seed(7)
    f = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f_aug = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 3])  # class 3: a single sample (its views are its positives)
    assert torch.autograd.gradcheck(lambda a, b: SupConLoss(0.5)(a, y, b), (f, f_aug))
    assert torch.autograd.gradcheck(lambda a, b: SupConLoss(0.5, normalize=False)(a, y, b), (f, f_aug))
    # SPCL at given prototypes (the module's are detached means of f, so a
    # numerical derivative through them is not what it computes); class 3
    # has none (a zero row).
    assert torch.autograd.gradcheck(
        lambda a, b, p: spcl_loss(a, b, y, torch.cat([p, p.new_zeros(1, 3)]), 0.5), (f, f_aug, protos))
    fixed = torch.cat([protos.detach(), protos.new_zeros(1, 3)])
    assert torch.autograd.gradcheck(lambda a: spcl_loss(a, None, y, fixed, 0.5), (f,))


# --------------------------------------------------------------------------- degenerate cases


def _zero_with_finite_grad(loss, *inputs):
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, inputs, materialize_grads=True):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("M", [0, 1, 3])
def test_no_anchor_has_a_positive(M):
    # Distinct labels and no views: SupCon has no positive pair anywhere; SPCL
    # neither when no class has a prototype (M = 1: the anchor's row has no
    # other entry at all).
    f = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    y = torch.arange(M)
    _zero_with_finite_grad(SupConLoss()(f, y), f)
    _zero_with_finite_grad(supcon_loss(f, None, y, 0.1, False), f)
    _zero_with_finite_grad(spcl_loss(f, None, y, torch.zeros(K, D, dtype=torch.float64)), f)
    assert reference.supcon_loss(f, None, y).item() == 0.0
    assert reference.spcl_loss(f, None, y, torch.zeros(K, D, dtype=torch.float64)).item() == 0.0


def test_spcl_module_on_an_empty_batch():
    mod = spcl_module(torch.float64, "cpu")
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    f = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    _zero_with_finite_grad(mod(f, torch.zeros(0, dtype=torch.int64)), f)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_tiny_temperature_and_large_logits_stay_finite(dtype):
    f, f_aug, y = make_batch(33, 2, dtype=dtype, seed=8)
    protos = spcl_module(dtype, "cpu").prototypes()
    cases = [
        (lambda a, b: supcon_loss(a, b, y, 1e-4), lambda a, b: reference.supcon_loss(a, b, y, 1e-4)),
        (lambda a, b: supcon_loss(1e3 * a, 1e3 * b, y, 0.1, False),  # logits ~ 1e7
         lambda a, b: reference.supcon_loss(1e3 * a, 1e3 * b, y, 0.1, False)),
        (lambda a, b: spcl_loss(a, b, y, protos, 1e-4), lambda a, b: reference.spcl_loss(a, b, y, protos, 1e-4)),
    ]
    for fast, twin in cases:
        a = f.detach().clone().requires_grad_(True)
        b = f_aug.detach().clone().requires_grad_(True)
        loss = fast(a, b)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        if dtype == torch.float64:  # the twin agrees up to the rounding of logits ~ 1/tau
            want = twin(f, f_aug)
            assert_close(loss.detach(), want, atol=1e-6 * want.abs().item(), rtol=1e-9)


# --------------------------------------------------------------------------- SPCLLoss's queue


def test_queue_fills_per_class():
    mod = SPCLLoss(3, 2, queue_size=4, dtype=torch.float64)
    assert mod.queue.shape == (3, 4, 2) and mod.queue_total.dtype == torch.int64
    f = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    mod(f, torch.tensor([0, 0, 1]))
    c = 1 / math.sqrt(2)
    assert mod.queue_total.tolist() == [2, 1, 0]
    expected = torch.zeros(3, 4, 2, dtype=torch.float64)
    expected[0, 0], expected[0, 1], expected[1, 0] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), c
    assert_close(mod.queue, expected)
    assert_close(mod.last_prototypes, torch.tensor([[0.5, 0.5], [c, c], [0.0, 0.0]], dtype=torch.float64))
    assert not mod.last_prototypes.requires_grad


def test_queue_keeps_the_last_queue_size():
    # Against per-class Python lists: push each batch's normalised anchors in
    # row order, keep the last Q; the prototype is the mean of what is kept.
    Q, Kq = 4, 3
    mod = SPCLLoss(Kq, D, queue_size=Q, dtype=torch.float64)
    pools: list[list[torch.Tensor]] = [[] for _ in range(Kq)]
    g = torch.Generator().manual_seed(9)
    # Six of class 0 (> Q) in one batch; batches without class 2.
    batches = [[0, 1, 0], [0] * 6 + [2], [1, 1], [2, 0, 2, 2, 2, 1], [0]]
    for step, labels in enumerate(batches):
        f = torch.randn(len(labels), D, generator=g, dtype=torch.float64)
        mod(f, torch.tensor(labels))
        for row, k in zip(f, labels):
            pools[k] = (pools[k] + [row / row.norm()])[-Q:]
        for k in range(Kq):
            assert mod.queue_total[k].item() == sum(b.count(k) for b in batches[: step + 1])
            kept = torch.stack(pools[k]) if pools[k] else torch.zeros(0, D, dtype=torch.float64)
            assert_close(mod.queued(k), kept)
            assert_close(mod.last_prototypes[k], kept.mean(0) if pools[k] else torch.zeros(D, dtype=torch.float64))
    assert mod.queue_total.tolist() == [10, 4, 5]


def test_queue_not_updated_in_eval_mode():
    mod = spcl_module(torch.float64, "cpu")
    f, f_aug, y = make_batch(7, 2, seed=10)
    mod.eval()
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    first = mod(f, y, f_aug)
    second = mod(f, y, f_aug)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert_close(first, second)
    # Eval uses the same prototypes as training would (the batch pushed), unstored.
    assert_close(first, spcl_loss(f, f_aug, y, mod.prototypes(f, y)))
    mod.train()
    assert_close(mod(f, y, f_aug), first)
    assert not torch.equal(mod.queue_total, state["queue_total"])


def test_state_dict_round_trip_and_reset():
    a = spcl_module(torch.float64, "cpu", queue_size=3)
    f, f_aug, y = make_batch(7, 1, seed=11)
    a(f, y, f_aug)
    sd = a.state_dict()
    assert set(sd) == {"queue", "queue_total"}
    b = SPCLLoss(K, D, queue_size=3, dtype=torch.float64)
    b.load_state_dict(sd)
    assert torch.equal(b.queue, a.queue) and torch.equal(b.queue_total, a.queue_total)
    f2, f_aug2, y2 = make_batch(33, 2, seed=12)
    assert_close(b.eval()(f2, y2, f_aug2), a.eval()(f2, y2, f_aug2))
    b.reset()
    assert (b.queue == 0).all() and (b.queue_total == 0).all() and b.last_prototypes is None
    assert (b.prototypes() == 0).all()
    assert_close(b(f2, y2, f_aug2), SPCLLoss(K, D, queue_size=3, dtype=torch.float64)(f2, y2, f_aug2))


def test_float32_queue_takes_float64_features():
    mod = SPCLLoss(K, D)  # float32 buffers
    f, f_aug, y = make_batch(7, 2, seed=13)
    loss = mod(f, y, f_aug)
    assert loss.dtype == torch.float64 and mod.queue.dtype == torch.float32
    assert_close(loss, reference.spcl_loss(f, f_aug, y, mod.last_prototypes))
    assert mod.queue_total.sum().item() == 7


# --------------------------------------------------------------------------- errors


def test_constructor_errors():
    for bad in (0, -0.1, float("inf"), float("nan"), "0.1"):
        with pytest.raises(ValueError, match="temperature"):
            SupConLoss(temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            SPCLLoss(K, D, temperature=bad)
    with pytest.raises(ValueError, match="num_classes"):
        SPCLLoss(0, D)
    with pytest.raises(ValueError, match="dim"):
        SPCLLoss(K, 0)
    with pytest.raises(ValueError, match="queue_size"):
        SPCLLoss(K, D, queue_size=0)


@pytest.mark.parametrize("which", ["supcon", "spcl"])
def test_forward_errors(which):
    mod = SupConLoss() if which == "supcon" else SPCLLoss(K, D, dtype=torch.float64)
    f, f_aug, y = make_batch(7, 2, seed=14)
    bad = [
        ((f[0], y, None), r"f of shape \(M, d\)"),
        ((f.long(), y, None), "f to be a floating-point"),
        ((f, y[:6], None), r"y of shape \(M,\)"),
        ((f, y[:, None], None), r"y of shape \(M,\)"),
        ((f, y.float(), None), "y to be an int64"),
        ((f, y, f_aug[0]), r"f_aug of shape \(P, M, d\)"),
        ((f, y, f_aug[:, :6]), r"f_aug of shape \(P, M, d\)"),
        ((f, y, f_aug.float()), "f_aug of f's dtype"),
        ((f, y, [f_aug[0], f_aug[1, :6]]), "every view in f_aug"),
    ]
    if which == "spcl":
        bad += [
            ((f[:, :4], y, None), r"f of shape \(M, 5\)"),
            ((f, y + 3, None), r"labels y in \[0, 7\)"),
            ((f, y - 1, None), r"labels y in \[0, 7\)"),
        ]
    for (a, b, c), match in bad:
        with pytest.raises(ValueError, match=match):
            mod(a, b, c)
    with pytest.raises(ValueError, match="prototypes"):
        spcl_loss(f, None, y, torch.zeros(K, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="prototypes"):
        spcl_loss(f, None, y, torch.zeros(K, D))
    with pytest.raises(ValueError, match=r"labels y in \[0, 3\)"):
        spcl_loss(f, None, y, torch.ones(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(f, None, y, 0.0)


# --------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_cuda_matches_twin_without_host_syncs(dtype):
    f, f_aug, y = make_batch(33, 2, dtype=dtype, device="cuda", seed=15)
    supcon = SupConLoss()
    spcl = spcl_module(dtype, "cuda")
    protos = spcl.prototypes(f, y)
    for mod, twin in ((supcon, lambda a, b, c: reference.supcon_loss(a, b, c)),
                      (spcl, lambda a, b, c: reference.spcl_loss(a, b, c, protos))):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got, got_g = value_and_grads(lambda a, b, c: mod(a, c, b), f, f_aug, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want, want_g = value_and_grads(twin, f, f_aug, y)
        assert got.device.type == "cuda"
        assert_close(got, want)
        for a, b in zip(got_g, want_g):
            assert_close(a, b)
    assert spcl.queue.device.type == "cuda" and spcl.queue_total.sum().item() == 12 + 33
