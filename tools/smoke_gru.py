"""Quick end-to-end check of perturbed_gru on one device: values and gradients
against the reference, with padded sequences, both directions, and an error.
    python tools/smoke_gru.py [cpu|cuda]"""
import sys

import torch

import cascla_ext
from cascla_ext import ops, reference

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
print(cascla_ext.build_info(), flush=True)
torch.manual_seed(0)
T, B, D, H = 5, 4, 3, 6
for dt in (torch.float64, torch.float32):
    def leaf(*shape):
        return torch.randn(*shape, dtype=dt, device=device, requires_grad=True)
    args = [leaf(T, B, D), leaf(B, H), leaf(3 * H, D), leaf(3 * H, H), leaf(3 * H), leaf(3 * H), leaf(T, B, 3 * H)]
    for rev in (False, True):
        for lengths in (None, [5, 5, 5, 5], [5, 0, 1, 3]):
            lens = None if lengths is None else torch.tensor(lengths)
            print(dt, rev, lengths, flush=True)
            outs = []
            for fn in (ops.perturbed_gru, reference.perturbed_gru):
                y, h = fn(*args, lens, rev)
                grads = torch.autograd.grad(y.sin().sum() + h.sum(), args)
                outs.append((y, h, *grads))
            err = max((a - b).abs().max().item() for a, b in zip(*outs))
            print("  max abs diff", err, flush=True)
            assert err < (1e-9 if dt == torch.float64 else 1e-4), err
    try:
        ops.perturbed_gru(*args, torch.tensor([7, 1, 1, 1]), False)
    except ValueError as e:
        print("error ok:", e, flush=True)
print("SMOKE OK")
