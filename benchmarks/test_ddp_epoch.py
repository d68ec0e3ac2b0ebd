"""ddp_epoch: the scaling of a training epoch with 1 and 2 processes
(torch.distributed, gloo on the CPU), and what the SCLA loss communicates
per step compared with an all-gather of the features.

Each world size runs ``cascla_ext.train.train`` (2 epochs on the built-in
synthetic corpus, ``CaSCLAConfig.small``) in that many spawned processes
with one torch thread each; the measured figure is epoch 2's
``train_seconds`` from ``metrics.json`` (epoch 1 warms up), so process
start-up, data loading and evaluation are not counted. The benchmark times
the 2-process run once (``rounds=1``) and records in ``extra_info``:

- ``epoch_seconds`` per world size, ``throughput_ratio`` = dialogues/s with
  2 processes over dialogues/s with 1 (ideal: 2; on a machine with fewer
  free cores than processes it is below 1);
- ``scla_bytes_per_step``: the payload of the SCLA loss's collectives on
  one rank per step, measured (every ``all_reduce`` of the (K, d + 1)
  float64 table, forward and backward - and once more on the steps that
  log the per-term gradient norms - and the K class counts of the
  balanced scale), and ``allgather_bytes_per_step``: what an all-gather of
  the features would move instead, ``2 * M (1 + P) d * 4`` (the float32
  features f and its P views of the global batch, and their gradients in
  the backward), with M the mean labelled utterances per global batch.

Timings from a loaded or shared machine say little: run it alone on a
quiet machine with at least 2 free cores. ``--quick``: 16 training
dialogues (it checks that everything runs).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import device_name, pick

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
N_TRAIN = pick(400, 16)
N_VAL = pick(60, 4)
BATCH = pick(16, 4)


def _corpus():
    from cascla_ext.data import Corpus, load_dataset

    full = load_dataset("synthetic")
    splits = {"train": full.split("train")[:N_TRAIN], "val": full.split("val")[:N_VAL], "test": []}
    return Corpus(full.name, splits, full.label_names, full.input_dims, full.clue_dim)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        from cascla_ext.config import CaSCLAConfig
        from cascla_ext.train import TrainSettings, train

        corpus = _corpus()
        config = CaSCLAConfig.small(num_classes=len(corpus.label_names), input_dims=corpus.input_dims,
                                    clue_dim=corpus.clue_dim, class_prior=corpus.class_prior())
        K, d = config.num_classes, config.d_feature
        counted = {"table": 0, "counts": 0}
        real = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):  # the SCLA loss's payload on this rank
            if tensor.dtype == torch.float64 and tuple(tensor.shape) == (K, d + 1):
                counted["table"] += tensor.numel() * tensor.element_size()
            elif tensor.dtype == torch.float64 and tuple(tensor.shape) == (K,):
                counted["counts"] += tensor.numel() * tensor.element_size()
            return real(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        try:
            metrics = train(config, corpus, Path(out) / f"world{world}",
                            TrainSettings(epochs=2, batch_size=BATCH, progress=False, threads=1))
        finally:
            dist.all_reduce = real
        if rank == 0:
            steps = 2 * metrics["epochs"][0]["steps"]
            # The label counts all-reduce (K float64 before each forward) has the same
            # shape as the balanced scale's: half of the (K,) payload is the loop's.
            info = {"epoch_seconds": metrics["epochs"][1]["train_seconds"],
                    "scla_bytes_per_step": (counted["table"] + counted["counts"] / 2) / steps if world > 1 else 0,
                    "K": K, "d": d, "views": 1 + int(config.use_ast) + int(config.use_text_augmentation)}
            (Path(out) / f"world{world}.json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


def _run(world: int, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(world, port, str(out)), nprocs=world, join=True, start_method="spawn")
    return json.loads((out / f"world{world}.json").read_text())


@pytest.mark.benchmark(group="ddp_epoch")
def test_ddp_epoch(benchmark, tmp_path):
    one = _run(1, tmp_path)
    two = benchmark.pedantic(_run, args=(2, tmp_path), rounds=1, iterations=1)
    corpus = _corpus()
    train = corpus.split("train")
    steps = (len(train) + BATCH - 1) // BATCH
    M = sum(int((d.labels >= 0).sum()) for d in train) / steps  # labelled utterances per global batch
    P = two["views"] - 1
    allgather = 2 * M * (1 + P) * two["d"] * 4
    # Forward and backward: 2 tables and the counts; on the steps that log the
    # per-term gradient norms (about 8 an epoch) a third table (that extra backward).
    table, counts = two["K"] * (two["d"] + 1) * 8, two["K"] * 8
    assert 2 * table + counts <= two["scla_bytes_per_step"] <= 3 * table + counts, two
    ratio = one["epoch_seconds"] / two["epoch_seconds"]
    benchmark.extra_info.update(
        group="ddp_epoch", op="train_epoch", impl="ddp_gloo", device="cpu", device_name=device_name("cpu"),
        shape=f"synthetic_{len(train)}dialogues_B{BATCH}", mode="train_epoch", torch=torch.__version__,
        epoch_seconds={"1": one["epoch_seconds"], "2": two["epoch_seconds"]}, throughput_ratio=ratio,
        scla_bytes_per_step=two["scla_bytes_per_step"], allgather_bytes_per_step=allgather,
        labelled_per_step=M, K=two["K"], d=two["d"], P=P)
    print(f"\nddp_epoch: 1 process {one['epoch_seconds']:.2f} s, 2 processes {two['epoch_seconds']:.2f} s "
          f"(throughput x{ratio:.2f}); per step the SCLA loss moves {two['scla_bytes_per_step'] / 1e3:.1f} KB, "
          f"an all-gather of the features {allgather / 1e3:.1f} KB (M = {M:.1f}, P = {P}, d = {two['d']})")
