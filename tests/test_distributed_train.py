"""Distributed training (issue 16): a step of a 2-rank DistributedDataParallel
run is the single-process step on the same global batch.

Each spawned worker (gloo, CPU) builds the same model twice from one seed:
one takes the single-process step on the whole global batch, the other is
wrapped in DDP and takes the step on its rank's share of the batch exactly
as ``cascla_ext.train`` does (``_rank_batch``, ``global_label_counts``,
``_step_values``). The losses and every parameter's gradient must agree to
1e-5 (float32), without dropout and with it: every rank draws the global
batch's masks from the stream one process draws them from
(cascla_ext.nn.dropout), so the two steps see the same masks and the ranks'
random states stay the same. The label-embedding dropout mask is checked to
be the same on every rank.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from cascla_ext import CaSCLA, CaSCLAConfig, collate
from cascla_ext.distributed import global_label_counts
from cascla_ext.train import _rank_batch, _step_values
from spawn_helpers import assert_close, requires_gloo, run_distributed

pytestmark = requires_gloo
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _config(meta, **overrides) -> CaSCLAConfig:
    names, dims, clue_dim, prior = meta
    values = dict(num_classes=len(names), input_dims=dims, clue_dim=clue_dim, class_prior=prior, dropout=0.0,
                  label_dropout=0.0)
    return CaSCLAConfig.small(**{**values, **overrides})


def _check_step(config, names, chosen, where):
    """One single-process step and one DDP step from the same weights: same loss, terms, gradients."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    single = CaSCLA(config, names)
    model = copy.deepcopy(single)
    torch.manual_seed(1)  # the dropout masks: the same stream for both steps
    out = single(collate(chosen, config.modalities), grad_norms=True)
    out.loss.backward()
    after = torch.get_rng_state()

    model.distribute("global")
    net = DistributedDataParallel(model)  # as train() with the global scope
    batch = _rank_batch(chosen, config.modalities)
    counts = global_label_counts(batch.labels, batch.mask, config.num_classes)
    torch.manual_seed(1)
    dout = net(batch, grad_norms=True, label_counts=counts)
    dout.loss.backward()
    for p in dout.no_grad:  # as train()
        p.grad = None
    # Every rank drew what one process draws: the streams are where its is.
    assert torch.equal(torch.get_rng_state(), after), f"{where}: random state"

    values = _step_values(dout, config, dist.get_world_size())
    assert set(values) == {"loss", *out.losses}, f"{where}: terms {set(values)} vs {set(out.losses)}"
    for k, v in values.items():
        expected = out.loss if k == "loss" else out.losses[k]
        assert_close(torch.tensor(v, dtype=torch.float32), expected.detach(), **TOL, msg=f"{where}: {k}")
    assert set(dout.grad_norms) == set(out.grad_norms), where
    for k, v in out.grad_norms.items():
        assert abs(dout.grad_norms[k] - v) <= 1e-4 * max(1.0, v), f"{where}: grad norm {k}"
    checked = 0
    for (name, p), q in zip(single.named_parameters(), model.parameters()):
        if p.grad is None:  # unused in the single-process step: untouched by DDP too
            assert q.grad is None, f"{where}: {name} has a gradient, single-process none"
            continue
        assert_close(q.grad, p.grad, **TOL, msg=f"{where}: gradient of {name}")
        checked += 1
    assert checked > 10, where


def _step_worker(rank, world, meta, overrides, layouts):
    config = _config(meta, **overrides)
    for chosen in layouts:
        _check_step(config, meta[0], chosen, f"{overrides} {len(chosen)} dialogues rank {rank}")


def _edge_worker(rank, world, meta, cases):
    for overrides, chosen, what in cases:
        _check_step(_config(meta, **overrides), meta[0], chosen, f"{what} rank {rank}")
    # The label-embedding dropout: one mask, the same z on every rank.
    model = CaSCLA(_config(meta, label_dropout=0.5), meta[0])
    model.distribute("global")
    model.train()
    z = model.scla.label_embeddings().detach()
    zs = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(zs, z)
    assert all(torch.equal(zs[0], other) for other in zs[1:])
    assert (z == 0).float().mean() > 0.2  # the dropout is on


def _meta(corpus):
    return corpus.label_names, corpus.input_dims, corpus.clue_dim, corpus.class_prior()


def _hide_labels(d, keep: int):
    labels = np.full(len(d), -1, dtype=np.int64)
    labels[:keep] = d.labels[:keep]
    import dataclasses

    return dataclasses.replace(d, labels=labels)


DROPOUT = {"dropout": 0.3, "label_dropout": 0.2}


@pytest.mark.parametrize("overrides", [{}, {"use_scla": False}, {"use_ast": False}, {"use_causal": False},
                                       DROPOUT, {**DROPOUT, "use_causal": False},
                                       {**DROPOUT, "ast_norm": "weights", "epsilon": 0.05}],
                         ids=["full", "no_scla", "no_ast", "no_causal", "dropout", "dropout_no_causal",
                              "ast_on_weights"])
def test_two_rank_step_equals_single_process_step(synthetic, overrides):
    """AST, the textual view and SCLA on (and each ablation; with dropout on
    the features and the label embeddings; with AST on the GRU's input
    weights, whose gradient sums over every rank): 2 ranks with shares of 3 and 2
    dialogues; 3 dialogues of very different lengths (rank 1's one is
    shorter than the global batch's longest, rank 0's two shorter in the
    last layout)."""
    train = synthetic.split("train")
    layouts = [train[:5], train[10:13], [train[28], train[29], train[26]]]
    assert [max(map(len, x[::2])) < max(map(len, x)) for x in layouts[1:]] == [False, True]
    assert max(map(len, layouts[1][1::2])) < max(map(len, layouts[1]))
    run_distributed(_step_worker, 2, _meta(synthetic), overrides, layouts, timeout=120)


def test_two_rank_step_edge_cases(synthetic):
    """A rank without a dialogue (a last batch of one), a rank without a
    labelled utterance, one labelled utterance over both ranks (no SCLA term:
    its parameters get no gradient), the weighted and focal classifier
    losses (global denominators) and the literal SCLA scale; the first two
    with dropout too (the rank without a dialogue draws the global masks
    and uses none of them)."""
    train = synthetic.split("train")
    cases = [
        ({}, train[20:21], "one dialogue"),
        (DROPOUT, train[20:21], "one dialogue, dropout"),
        (DROPOUT, [train[21], _hide_labels(train[22], 0)], "rank 1 unlabelled, dropout"),
        ({}, [train[21], _hide_labels(train[22], 0)], "rank 1 unlabelled"),
        ({}, [_hide_labels(train[23], 1), _hide_labels(train[24], 0)], "one labelled utterance"),
        ({"classifier_loss": "weighted_ce"}, train[25:30], "weighted_ce"),
        ({"classifier_loss": "focal"}, train[25:30], "focal"),
        ({"scla_normalization": "literal"}, train[25:30], "literal"),
    ]
    run_distributed(_edge_worker, 2, _meta(synthetic), cases, timeout=120)
