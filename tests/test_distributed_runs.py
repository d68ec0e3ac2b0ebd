"""Distributed training runs end to end (issue 16): torchrun with 2 CPU
processes (gloo), the checkpoint evaluated in one process, resuming
(single-process and distributed) to the same result as an uninterrupted
run, SIGTERM, and a rank that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cascla_ext.train as T
from cascla_ext.cli import main
from cascla_ext.data import Corpus
from cascla_ext.train import TrainingStopped, TrainSettings, read_last, train
from conftest import small_config
from spawn_helpers import _free_port, requires_gloo, run_distributed

pytestmark = [requires_gloo, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _same_run(a: Path, b: Path) -> None:
    """Bitwise the same model.pt weights and the same metrics but for times."""
    wa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    drop = ("train_seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma["epochs"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in mb["epochs"]]
    assert (ma["best_epoch"], ma["status"]) == (mb["best_epoch"], mb["status"]) == (ma["best_epoch"], "finished")


def _sigterm_at(monkeypatch, call: int) -> None:
    """SIGTERM to this process when the training loop forms its ``call``-th batch."""
    real, seen = T._rank_share, [0]

    def share(chosen):
        seen[0] += 1
        if seen[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(chosen)

    monkeypatch.setattr(T, "_rank_share", share)


# ---------------------------------------------------------------------------
# torchrun: 2 processes, 2 epochs, evaluated in one process


def test_torchrun_two_processes_write_one_run_that_evaluates_alike(tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "cascla_ext", "train", "--out", str(run), "--epochs", "2", "--batch-size", "32",
           "--ema-decay", "0.9"]  # (the two-process resume test below trains the weights unaveraged)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One process printed: one result line, one line per epoch, nothing from rank 1.
    assert proc.stdout.count("best epoch") == 1, proc.stdout
    assert proc.stderr.count("epoch 1/2:") == 1 and "[rank1]" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == [".cascla.lock", "last.pt", "metrics.csv", "metrics.json",
                                                     "model.pt"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["settings"]["scla_scope"] == "global"
    assert metrics["settings"]["ema_decay"] == 0.9  # model.pt holds the average the scores below are of
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 2
    # The sharded, gathered validation scores are those of one process.
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--split", "val", "--json", "--quiet"]) == 0
    single = json.loads(capsys.readouterr().out)
    best = metrics["epochs"][metrics["best_epoch"] - 1]["val"]
    for k in ("weighted_f1", "macro_f1", "accuracy", "per_class_f1", "n"):
        assert best[k] == single[k], k


# ---------------------------------------------------------------------------
# Resuming


def small_corpus(corpus, n_train=14, n_val=6) -> Corpus:
    splits = {"train": corpus.split("train")[:n_train], "val": corpus.split("val")[:n_val], "test": []}
    return Corpus(corpus.name, splits, corpus.label_names, corpus.input_dims, corpus.clue_dim)


class _StopAfterEpoch(Exception):
    pass


def _stop_after(epoch):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise _StopAfterEpoch  # as a kill after last.pt of this epoch was written
    return on_epoch


def _resume_runs(config, corpus, root: Path, settings, sigterm_hook=None) -> None:
    """An uninterrupted run (a), one stopped after epoch 1 and resumed (b),
    one stopped by SIGTERM mid-epoch 2 and resumed (c); all must match (a)."""
    train(config, corpus, root / "a", settings)
    with pytest.raises(_StopAfterEpoch):
        train(config, corpus, root / "b", settings, on_epoch=_stop_after(1))
    train(config, corpus, root / "b", settings, resume=read_last(root / "b"))
    sigterm_hook()
    with pytest.raises(TrainingStopped, match="--resume"):
        train(config, corpus, root / "c", settings, stop_on_sigterm=True)
    state = read_last(root / "c")
    assert (state["epoch"], state["partial"]["step"]) == (2, 2)
    train(config, corpus, root / "c", settings, resume=state)


@pytest.mark.parametrize("ema_decay", [None, 0.8], ids=["weights", "weight-average"])
def test_resume_single_process_equals_uninterrupted(tmp_path, synthetic, monkeypatch, ema_decay):
    corpus = small_corpus(synthetic)
    settings = TrainSettings(epochs=3, batch_size=4, progress=False, schedule="cosine", ema_decay=ema_decay)
    steps = 4  # per epoch
    _resume_runs(small_config(synthetic), corpus, tmp_path, settings,
                 lambda: _sigterm_at(monkeypatch, steps + 2))
    for other in ("b", "c"):
        _same_run(tmp_path / "a", tmp_path / other)
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["status"] == "finished"


def _resume_worker(rank, world, config, corpus, root):
    from unittest import mock

    settings = TrainSettings(epochs=3, batch_size=4, progress=False)
    real, seen = T._rank_share, [None]

    def share(chosen):  # SIGTERM on rank 1 only, at step 2 of epoch 2 of run c: every rank stops there
        if seen[0] is not None:
            seen[0] += 1
            if seen[0] == 4 + 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(chosen)

    with mock.patch.object(T, "_rank_share", share):
        _resume_runs(config, corpus, Path(root), settings, lambda: seen.__setitem__(0, 0))


def test_resume_two_processes_equals_uninterrupted(tmp_path, synthetic):
    corpus = small_corpus(synthetic)
    run_distributed(_resume_worker, 2, small_config(synthetic), corpus, str(tmp_path), timeout=170)
    for other in ("b", "c"):
        _same_run(tmp_path / "a", tmp_path / other)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".cascla.lock", "last.pt", "metrics.csv",
                                                                 "metrics.json", "model.pt"]


def test_cli_resume(tmp_path, monkeypatch, capsys):
    flags = ["--quiet", "--epochs", "2", "--batch-size", "64", "--seed", "3"]
    assert main(["train", "--out", str(tmp_path / "a"), *flags]) == 0
    _sigterm_at(monkeypatch, 7 + 3)  # 7 steps an epoch: step 3 of epoch 2
    assert main(["train", "--out", str(tmp_path / "b"), *flags]) == 143
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stopped by SIGTERM after epoch 2, step 3 of 7" in err
    assert f"--resume {tmp_path / 'b'}" in err
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["status"] == "stopped"
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "b"), "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    _same_run(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()
    for bad, expected in ((tmp_path / "b", "has finished"), (tmp_path / "none", "no last.pt")):
        assert main(["train", "--resume", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert main(["train", "--epochs", "1"]) == 2
    assert "--out is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# A rank that dies


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_rank_ends_the_others_with_one_line(tmp_path, how):
    """Rank 1 killed (its sockets close: rank 0's next collective fails) or
    stopped with SIGSTOP (it hangs with its sockets open: rank 0's watchdog
    or the collective's timeout ends it) in epoch 2."""
    run, port, timeout = tmp_path / "run", _free_port(), 10
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "cascla_ext", "train", "--out", str(run), "--quiet",
                                       "--epochs", "50", "--dist-timeout", str(timeout)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.json").exists():  # written after epoch 1
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()[1]
            time.sleep(0.2)
        time.sleep(1)  # in epoch 2
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        killed = time.monotonic()
        code = procs[0].wait(timeout=timeout + 30)
        took = time.monotonic() - killed
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # (SIGKILL ends a stopped process too)
            p.wait()
    assert code != 0
    assert took < timeout + 20
    lines = [line for line in err.splitlines() if "rank 1" in line]
    assert len(lines) == 1 and "died or stopped responding" in lines[0], err
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1
    # (the watchdog exits at once: the file may still say running)
    assert metrics["status"] == "failed" or (how == "stopped" and metrics["status"] == "running")
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["epoch"], last["world_size"]) == (2, 2)  # resumable from the end of epoch 1


def _rank_zero_first_worker(rank: int, world_size: int, folder: Path) -> None:
    from cascla_ext.distributed import RankFailed, rank_zero_first

    def load():
        start = time.time()
        time.sleep(0.5 if rank == 0 else 0.0)  # rank 0's work takes longer: the others must still wait for it
        (folder / f"rank{rank}").write_text(f"{start} {time.time()}")
        return rank

    assert rank_zero_first(load) == rank

    def fails():
        if rank == 0:
            raise ValueError("bad file")
        return rank

    if rank == 0:
        with pytest.raises(ValueError, match="bad file"):
            rank_zero_first(fails)
    else:  # the others never run it, and hear which rank failed
        with pytest.raises(RankFailed, match="rank 0 failed: ValueError: bad file"):
            rank_zero_first(lambda: (folder / "ran").write_text("x"))


def test_rank_zero_loads_first_and_its_error_reaches_every_rank(tmp_path):
    """Feature extraction under torchrun (cli._load_corpus): rank 0 fills the
    cache, then the others read it, instead of every rank extracting (and
    fine-tuning the encoder) into the same folder at once."""
    run_distributed(_rank_zero_first_worker, 3, tmp_path, timeout=120)
    spans = {r: [float(x) for x in (tmp_path / f"rank{r}").read_text().split()] for r in range(3)}
    assert spans[0][1] <= min(spans[1][0], spans[2][0]), spans
    assert not (tmp_path / "ran").exists()
