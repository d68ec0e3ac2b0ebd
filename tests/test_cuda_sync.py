"""GPU-only claims of issue 18, written where no GPU is at hand (they skip
with the reason naming it) and run by tools/gpu_check.sh where one is lent:

- no op synchronises with the host: each one's forward and backward (and a
  whole CaSCLA training step) under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises on any host synchronisation (``.item()``, a blocking copy,
  ``nonzero``, ...);
- a whole CaSCLA training step (AST, textual view, SCLA) captured in a CUDA
  graph replays with eager's loss and gradients.

The CPU test at the end checks here what makes the training step sync-free:
selecting the labelled utterances by ``Batch.valid_index`` gives what the
boolean mask gives.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch

from cascla_ext import CaSCLA, collate, ops
from cascla_ext.data import GlobalLayout
from cascla_ext.nn import SCLALoss
from conftest import assert_close, requires_cuda, small_config



def cuda_only(test):
    """Runs where a CUDA GPU is lent; skipped elsewhere with conftest's reason ("no CUDA GPU ...")."""
    return pytest.mark.cuda(requires_cuda(test))


@contextmanager
def no_host_sync():
    """Any host synchronisation inside raises RuntimeError."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def gru_inputs(device):
    g = torch.Generator().manual_seed(0)
    T, B, D, H = 9, 4, 7, 5
    tensors = (torch.randn(T, B, D, generator=g), torch.randn(B, H, generator=g),
               0.3 * torch.randn(3 * H, D, generator=g), 0.3 * torch.randn(3 * H, H, generator=g),
               torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g),
               torch.randn(T, B, 3 * H, generator=g))
    return leaves(*[t.to(device) for t in tensors])


@pytest.mark.parametrize("lengths_on", ["cuda", "cpu"])
@pytest.mark.parametrize("reverse", [False, True])
@cuda_only
def test_perturbed_gru_runs_without_host_sync(lengths_on, reverse):
    inputs = gru_inputs("cuda")
    lengths = torch.tensor([9, 4, 1, 0], device=lengths_on)
    ops.perturbed_gru(*inputs, lengths=lengths, reverse=reverse)  # warm-up (library, cuBLAS handles)
    with no_host_sync():
        y, h_n = ops.perturbed_gru(*inputs, lengths=lengths, reverse=reverse)
        (y.square().sum() + h_n.sum()).backward()
    assert all(t.grad is not None for t in inputs)
    y_cpu, h_cpu = ops.perturbed_gru(*[t.detach().cpu() for t in inputs], lengths=lengths.cpu(), reverse=reverse)
    assert_close(y.detach().cpu(), y_cpu)
    assert_close(h_n.detach().cpu(), h_cpu)


@cuda_only
def test_tr_attention_runs_without_host_sync():
    g = torch.Generator().manual_seed(1)
    B, T, ranks = 3, 7, (4, 3, 5)
    n = len(ranks)
    lists = [[torch.randn(B, T, ranks[(m + shift) % n], generator=g).cuda().requires_grad_(True)
              for m in range(n)] for shift in (0, 1, 0, 1)]  # q1 (s_m), q2 (w_m), k1, k2
    q1, q2, k1, k2 = lists
    mask = (torch.arange(T)[None, :] < torch.tensor([7, 3, 0])[:, None]).cuda()
    ops.tr_attention(q1, q2, k1, k2, mask)  # warm-up
    with no_host_sync():
        outs = ops.tr_attention(q1, q2, k1, k2, mask)
        sum((o * (i + 1)).square().sum() for i, o in enumerate(outs)).backward()
    assert all(t.grad is not None for group in lists for t in group)


@cuda_only
def test_scla_loss_runs_without_host_sync():
    g = torch.Generator().manual_seed(2)
    M, d, K, P = 40, 16, 7, 2
    f, f_aug, z = leaves(*[t.cuda() for t in (torch.randn(M, d, generator=g), torch.randn(P, M, d, generator=g),
                                              torch.randn(K, d, generator=g))])
    y = torch.randint(0, K, (M,), generator=g).cuda()
    ops.scla_loss(f, f_aug, z, y)  # warm-up
    for reduction in ("mean", "none"):
        with no_host_sync():
            loss = ops.scla_loss(f, f_aug, z, y, reduction=reduction)
            loss.sum().backward()
    assert f.grad is not None and f_aug.grad is not None and z.grad is not None
    # and the module, with the balanced normalisation (its class counts on the device)
    module = SCLALoss(K, d, normalization="balanced").cuda()
    module(f, y, f_aug)
    with no_host_sync():
        module(f, y, f_aug).backward()


def training_batch(corpus, device):
    """Four training dialogues on ``device``, lengths too (a GPU copy of the
    CPU lengths would be a host-staged copy, which a CUDA graph cannot hold)."""
    batch = collate(corpus.split("train")[:4]).to(device)
    assert batch.valid_index is not None
    return dataclasses.replace(batch, lengths=batch.lengths.to(device))


def training_model(corpus, device):
    """AST, the textual view and SCLA on (the defaults); no dropout, so that
    eager and replayed steps draw no random numbers that could differ."""
    torch.manual_seed(0)
    cfg = small_config(corpus, dropout=0.0, label_dropout=0.0)
    assert cfg.use_ast and cfg.use_scla and cfg.use_text_augmentation and cfg.contrastive == "scla"
    return CaSCLA(cfg, corpus.label_names).to(device).train()


def train_step(model, batch):
    out = model(batch)
    out.loss.backward()
    return out


@cuda_only
def test_a_training_step_runs_without_host_sync(synthetic):
    model, batch = training_model(synthetic, "cuda"), training_batch(synthetic, "cuda")
    train_step(model, batch)  # warm-up
    model.zero_grad(set_to_none=True)
    with no_host_sync():
        out = train_step(model, batch)
    assert set(out.losses) == {"ce", "scla", "ce_adv"}


@cuda_only
@pytest.mark.parametrize("layout", [False, True], ids=["one_process", "rows_of_a_global_batch"])
def test_a_training_step_with_dropout_runs_without_host_sync(synthetic, layout):
    """Dropout on (cascla_ext.nn.dropout): its masks drawn on the GPU, also
    for a global batch of which the batch is every second row (sliced, no
    index read back), and the encoder's own attention in training."""
    torch.manual_seed(0)
    model = CaSCLA(small_config(synthetic, dropout=0.3, label_dropout=0.2), synthetic.label_names).to("cuda")
    batch = training_batch(synthetic, "cuda")
    if layout:
        longest = max(len(d) for d in synthetic.split("train")[:4]) + 3
        batch = dataclasses.replace(batch, global_layout=GlobalLayout(slice(1, 8, 2), 8, longest))
    train_step(model.train(), batch)  # warm-up
    model.zero_grad(set_to_none=True)
    with no_host_sync():
        out = train_step(model, batch)
    assert set(out.losses) == {"ce", "scla", "ce_adv"}


@cuda_only
def test_a_training_step_replays_in_a_cuda_graph(synthetic):
    model, batch = training_model(synthetic, "cuda"), training_batch(synthetic, "cuda")
    params = dict(model.named_parameters())

    eager = train_step(model, batch)
    assert set(eager.losses) == {"ce", "scla", "ce_adv"}
    eager_loss = eager.loss.detach().clone()
    eager_grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}

    # Warm-up on a side stream (PyTorch's recipe for whole-network capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            train_step(model, batch)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)  # the captured backward allocates the grads from the graph's pool
    with torch.cuda.graph(graph):
        static = train_step(model, batch)
    for _ in range(2):  # a second replay overwrites, it does not accumulate
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static.loss, eager_loss, atol=1e-5, rtol=1e-4)
        replayed = {n: p.grad for n, p in params.items() if p.grad is not None}
        assert set(replayed) == set(eager_grads)
        for n, g in eager_grads.items():
            assert_close(replayed[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_valid_index_selects_what_the_mask_selects(synthetic):
    """CPU: Batch.to's valid_index (the sync-free selection) gives the
    boolean mask's loss terms and gradients, bit for bit."""
    batch = collate(synthetic.split("train")[:4])
    assert batch.mask[0, 1] and batch.labels[0, 1] >= 0
    batch.labels[0, 1] = -1  # an unlabelled real utterance
    moved = batch.to("cpu")
    assert moved.valid_index is not None
    want = (batch.mask & (batch.labels >= 0)).flatten().nonzero().squeeze(1)
    assert torch.equal(moved.valid_index, want)
    results = []
    for b in (dataclasses.replace(moved, valid_index=None), moved):
        model = training_model(synthetic, "cpu")
        out = train_step(model, b)
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_mask, g_mask), (out_index, g_index) = results
    assert set(out_mask.losses) == set(out_index.losses) == {"ce", "scla", "ce_adv"}
    for k in out_mask.losses:
        assert torch.equal(out_index.losses[k], out_mask.losses[k]), k
    assert set(g_index) == set(g_mask)
    for n in g_mask:
        assert torch.equal(g_index[n], g_mask[n]), n


BAD_LABEL_SCRIPT = """
import torch, cascla_ext
from cascla_ext import ops
f = torch.randn(9, 6, device="cuda", requires_grad=True)
z = torch.randn(4, 6, device="cuda")
y = torch.tensor([0, 1, 2, 3, LABEL, 0, 1, 2, 3], device="cuda")
loss = ops.scla_loss(f, None, z, y)  # queued: no host check of y on a GPU
print("queued", flush=True)
loss.backward()
torch.cuda.synchronize()
print("no assert", flush=True)
"""


@pytest.mark.parametrize("label", [4, -1])
@cuda_only
def test_a_bad_label_on_cuda_is_a_device_side_assert(label):
    """What the README says for CUDA: no ValueError (that needs a host read),
    the kernels check the labels, and a later call fails with a
    device-side assert (in a subprocess: the assert ends the CUDA context)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", BAD_LABEL_SCRIPT.replace("LABEL", str(label))],
                          capture_output=True, text=True, timeout=120)
    # (an asynchronous error may already surface at a later launch check inside the op)
    assert "no assert" not in proc.stdout
    assert "ValueError" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr, proc.stderr[-2000:]
