"""What a user (or someone else's file) feeds the package must not crash a
run, run code, touch files outside the run, or report a diverged run as a
result. Each test here failed before the fix it guards (issue 12)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cascla_ext import CaSCLA, CaSCLAConfig, collate, ops, reference
from cascla_ext._io import atomic_torch_save, atomic_write_json
from cascla_ext.cli import main
from cascla_ext.data import Corpus, Dialogue
from cascla_ext.metrics import scores
from cascla_ext.runs import RunFolderError, claim_run_dir
from cascla_ext.train import TrainingDiverged, TrainSettings, train
from conftest import small_config


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_corpus(corpus, n_train=12, n_val=4, length=None, unlabelled=()) -> Corpus:
    """A few synthetic dialogues, cut to ``length`` utterances; the training
    dialogues at positions ``unlabelled`` lose their labels."""
    def cut(d: Dialogue, i: int | None = None) -> Dialogue:
        n = len(d) if length is None else min(length, len(d))
        labels = d.labels[:n].copy()
        if i is not None and i in unlabelled:
            labels[:] = -1
        return Dialogue(d.id, {m: x[:n] for m, x in d.features.items()}, d.speakers[:n], labels,
                        None if d.clues is None else d.clues[:n])
    splits = {"train": [cut(d, i) for i, d in enumerate(corpus.split("train")[:n_train])],
              "val": [cut(d) for d in corpus.split("val")[:n_val]], "test": []}
    return Corpus("synthetic", splits, corpus.label_names, corpus.input_dims, corpus.clue_dim)


# =========================================================================== batches with < 2 labels
def test_forward_with_one_labelled_utterance_trains_on_the_defined_terms(synthetic):
    torch.manual_seed(0)
    model = CaSCLA(small_config(synthetic), synthetic.label_names)
    one = tiny_corpus(synthetic, length=1).split("train")[:1]
    batch = collate(one)
    model.train()
    out = model(batch)
    assert set(out.losses) == {"ce", "ce_adv"}  # no SCLA term with M = 1
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()  # eval mode with labels: CE only
    with torch.no_grad():
        out = model(batch)
    assert set(out.losses) == {"ce"} and torch.isfinite(out.loss)


def test_forward_without_labelled_utterances_has_no_loss(synthetic):
    model = CaSCLA(small_config(synthetic), synthetic.label_names).train()
    batch = collate(tiny_corpus(synthetic, unlabelled={0}).split("train")[:1])
    out = model(batch)
    assert out.loss is None and out.losses == {} and out.logits.shape[0] == 1


def test_batch_size_one_on_one_utterance_dialogues_trains_and_counts(tmp_path, synthetic):
    corpus = tiny_corpus(synthetic, n_train=6, length=1, unlabelled={2})
    metrics = train(small_config(synthetic), corpus, tmp_path / "run",
                    TrainSettings(epochs=2, batch_size=1, progress=False))
    assert metrics["status"] == "finished"
    for record in metrics["epochs"]:
        assert record["steps"] == 6
        # every step lacks the SCLA term (M = 1); one step has no label at all
        assert record["steps_without"] == {"scla": 5, "labels": 1}
        assert set(record["train"]) == {"loss", "ce", "ce_adv"}
        assert all(np.isfinite(v) for v in record["train"].values())


def test_a_short_last_batch_trains(tmp_path, synthetic):
    # 5 dialogues of one utterance in batches of 2: the last batch has M = 1
    corpus = tiny_corpus(synthetic, n_train=5, length=1)
    metrics = train(small_config(synthetic), corpus, tmp_path / "run",
                    TrainSettings(epochs=1, batch_size=2, progress=False))
    assert metrics["epochs"][0]["steps"] == 3 and metrics["epochs"][0]["steps_without"] == {"scla": 1}


# =========================================================================== diverged runs
@pytest.mark.parametrize("field,value", [("use_ast", 0), ("use_scla", "false"), ("ast_view", None),
                                         ("use_causal", 1.0), ("use_text_augmentation", "no")])
def test_config_rejects_switches_that_are_not_booleans(field, value):
    """A hand-written config's "false" is truthy: a switch must be a real bool."""
    with pytest.raises(ValueError, match=f"CaSCLAConfig: {field} must be true or false, got {value!r}"):
        CaSCLAConfig.small(**{field: value})


@pytest.mark.parametrize("field,value", [("epsilon", float("nan")), ("scla_weight", float("inf")),
                                         ("alpha", float("-inf")), ("fusion_gain", float("nan")),
                                         ("eta", float("nan")), ("dropout", float("nan"))])
def test_config_rejects_non_finite_values(field, value):
    with pytest.raises(ValueError, match=f"CaSCLAConfig: {field} must be a finite number"):
        CaSCLAConfig.small(**{field: value})


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0),
                                         ("weight_decay", float("nan")), ("grad_clip", float("inf"))])
def test_train_settings_reject_non_finite_values(field, value):
    with pytest.raises(ValueError, match=f"TrainSettings: {field} must be"):
        TrainSettings(**{field: value}).validate()


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--scla-weight", "nan"),
                                        ("--gamma", "inf"), ("--scla-weight", "-1")])
def test_cli_rejects_non_finite_numbers(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_diverging_run_stops_with_one_line_and_no_nan_checkpoint(tmp_path, synthetic, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--quiet", "--epochs", "3", "--lr", "1e30"])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "diverged" in err and "epoch 1" in err and "step" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "diverged" in metrics["error"]
    if (out / "model.pt").exists():  # only ever a finite model
        state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())
        assert metrics["checkpoint"]["epoch"] == torch.load(out / "model.pt", weights_only=True)["epoch"]
    else:
        assert metrics["checkpoint"] is None and metrics["best_epoch"] is None


def test_a_nan_loss_term_is_named(tmp_path, synthetic, monkeypatch):
    real = CaSCLA.forward

    def poisoned(self, batch, **kwargs):
        out = real(self, batch, **kwargs)
        if "scla" in out.losses:
            out.losses["scla"] = out.losses["scla"] * float("nan")
        return out

    monkeypatch.setattr(CaSCLA, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 of \d+: the scla loss is nan"):
        train(small_config(synthetic), tiny_corpus(synthetic), tmp_path / "run",
              TrainSettings(epochs=1, batch_size=4, progress=False))
    assert not (tmp_path / "run" / "model.pt").exists()


# =========================================================================== checkpoints are data
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1"]) == 0
    return out / "model.pt"


def _rewrite(src: Path, dst: Path, change) -> Path:
    state = torch.load(src, weights_only=True)
    change(state)
    torch.save(state, dst)
    return dst


@pytest.mark.parametrize("what,change,expect", [
    ("no config", lambda s: s.pop("config"), "'config' is missing"),
    ("bad config", lambda s: s["config"].update(d_model="big"), "config does not describe a model"),
    ("unknown config field", lambda s: s["config"].update(colour=1), "config does not describe a model"),
    ("shapes", lambda s: s["config"].update(d_hidden=40), "weights do not fit its config"),
    ("missing weight", lambda s: s["state_dict"].pop("classifier.weight"), "weights do not fit its config"),
    ("data not a dict", lambda s: s.update(data=5), "'data' entry is a int"),
    ("data dataset", lambda s: s.update(data={"dataset": "../../etc"}), "data['dataset']"),
    ("data features", lambda s: s["data"].update(features={"finetune_dir": 3}), "finetune_dir"),
    ("labels", lambda s: s.update(label_names="abc"), "'label_names' is missing or not a list"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, checkpoint, capsys, what, change, expect):
    bad = _rewrite(checkpoint, tmp_path / "bad.pt", change)
    assert main(["evaluate", "--checkpoint", str(bad), "--split", "val", "--quiet"]) == 2, what
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and expect in err, err


def test_a_file_that_is_no_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x02}q\x00.")  # a pickle, not a zip: never unpickled as code
    assert main(["evaluate", "--checkpoint", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a CaSCLA checkpoint" in err


# =========================================================================== run folders
def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json({"a": 1}, tmp_path / "a.json")
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "x.pt")
        os.umask(0o077)
        atomic_write_json({"a": 1}, tmp_path / "b.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "x.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import cascla_ext._io as io_mod

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        fh = real_fdopen(fd, mode, *args, **kwargs)
        return Full(fh) if "b" in mode else fh  # only the checkpoint (binary) write fails

    monkeypatch.setattr(io_mod.os, "fdopen", fdopen)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert not list(out.glob(".*.tmp")) and not (out / "model.pt").exists()
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1"]) == 0
    before = (out / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "model.pt").read_bytes() == before
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--seed", "3", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3


def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with claim_run_dir(out):
        assert main(["train", "--out", str(out), "--quiet", "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "in use by another cascla run" in err and f"pid {os.getpid()}" in err
        assert not (out / "metrics.json").exists()


def _claim_and_hang(path, ready):
    with claim_run_dir(path):
        ready.set()
        time.sleep(60)


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path):
    out = tmp_path / "run"
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_claim_and_hang, args=(out, ready))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunFolderError, match="in use"), claim_run_dir(out):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    with claim_run_dir(out) as claimed:  # the kernel dropped the lock with the process
        assert claimed == out


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "a" / "run"
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(tmp_path / "missing"), "--out", str(out),
                 "--quiet"]) == 2
    assert not (tmp_path / "a").exists()
    with pytest.raises(ZeroDivisionError), claim_run_dir(out):
        1 / 0  # noqa: B018 - fails inside the claim before anything is written
    assert not (tmp_path / "a").exists()
    capsys.readouterr()
    assert main(["train", "--out", "", "--quiet"]) == 2
    assert "--out must name a folder" in capsys.readouterr().err


def test_metrics_and_checkpoint_name_the_same_epoch(tmp_path, synthetic, monkeypatch):
    corpus = tiny_corpus(synthetic)
    metrics = train(small_config(synthetic), corpus, tmp_path / "done",
                    TrainSettings(epochs=2, batch_size=4, progress=False))
    saved = torch.load(tmp_path / "done" / "model.pt", weights_only=True)
    assert metrics["checkpoint"] == {"file": "model.pt", "epoch": saved["epoch"]}
    assert metrics["best_epoch"] == saved["epoch"] and metrics["status"] == "finished"

    # Interrupted while the second checkpoint is being written: the metrics
    # describe the checkpoint that is on disk.
    calls = []
    real_save = CaSCLA.save

    def save(self, path, **extra):
        calls.append(extra["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(self, path, **extra)

    monkeypatch.setattr(CaSCLA, "save", save)
    monkeypatch.setattr("cascla_ext.train.evaluate", lambda model, ds, *a, **k: {  # every epoch a new best
        "weighted_f1": 0.1 * (len(calls) + 1), "macro_f1": 0.0, "accuracy": 0.0, "per_class_f1": {}, "n": 1})
    with pytest.raises(KeyboardInterrupt):
        train(small_config(synthetic), corpus, tmp_path / "cut", TrainSettings(epochs=3, batch_size=4,
                                                                               progress=False))
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    saved = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert metrics["status"] == "interrupted"
    assert metrics["checkpoint"]["epoch"] == metrics["best_epoch"] == saved["epoch"] == 1


# =========================================================================== smaller ones
def test_macro_f1_follows_scikit_learn():
    # class 2 is predicted but never true: scikit-learn averages over {0, 1, 2}
    result = scores(np.array([0, 0, 1]), np.array([0, 2, 1]), ["a", "b", "c"])
    f1_a, f1_b, f1_c = 2 * 1 / (2 + 1), 1.0, 0.0
    assert result["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)
    # a class neither true nor predicted does not count
    result = scores(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"])
    assert result["macro_f1"] == pytest.approx(1.0)


@pytest.mark.parametrize("fn", [ops.perturbed_gru, reference.perturbed_gru])
def test_float_lengths_in_a_list_are_rejected_like_a_float_tensor(fn):
    T, B, D, H = 4, 2, 3, 5
    args = (torch.randn(T, B, D), torch.zeros(B, H), torch.randn(3 * H, D), torch.randn(3 * H, H), None, None)
    with pytest.raises(TypeError, match="integer tensor"):
        fn(*args, lengths=torch.tensor([2.5, 3.0]))
    with pytest.raises(TypeError, match="integer tensor"):
        fn(*args, lengths=[2.5, 3.0])
    y, _ = fn(*args, lengths=[2, 3])
    assert (y[3] == 0).all() and (y[2, 0] == 0).all() and (y[2, 1] != 0).any()


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.jsonl:1" in err and "nested too deeply" in err
    assert not out.exists()


class _Payload:
    """Unpickling this writes a marker file: stands for code a crafted pickle runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def test_cli_reads_pickles_as_data_unless_told(tmp_path, capsys):
    import pickle

    marker = tmp_path / "pwned"
    data = tmp_path / "iemocap.pkl"
    data.write_bytes(pickle.dumps([_Payload(marker)]))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "iemocap", "--data-dir", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to load the global" in err and str(data) in err
    assert not marker.exists() and not out.exists()
    # the explicit escape hatch does unpickle with plain pickle (the file is then not IEMOCAP's layout)
    assert main(["train", "--dataset", "iemocap", "--data-dir", str(data), "--out", str(out), "--quiet",
                 "--unsafe-pickle"]) == 2
    assert marker.read_text() == "ran"
