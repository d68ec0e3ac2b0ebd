"""tools/reproduce_results.py: the page it builds from finished rows (the
experiments themselves take an hour of CPU and are not run here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cascla_ext.train import summarise_scores

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "reproduce_results.py"
LABELS = ["neutral", "fear"]


def _scores(wf1: float) -> dict:
    return {"n": 10, "weighted_f1": wf1, "accuracy": wf1 + 0.01, "macro_f1": wf1 - 0.1,
            "per_class_f1": {"neutral": 0.8, "fear": wf1 / 2}}


def _rows(out: Path, features: str, ds: str, finetune_epochs=None) -> None:
    rows = {"CaSCLA (lambda 0.1)": summarise_scores([_scores(0.5), _scores(0.52)], LABELS),
            "Logistic regression (context-free)": summarise_scores([_scores(0.4), _scores(0.4)], LABELS)}
    meta = {"seeds": [0, 1], "epochs": 3, "finetune_epochs": finetune_epochs, "torch": "x", "threads": 1,
            "finished": "2026-01-01 00:00", "label_names": LABELS, "n_val": 10}
    (out / features / ds).mkdir(parents=True)
    (out / features / ds / "rows.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def _tool():
    """tools/reproduce_results.py as a module."""
    import importlib

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module("reproduce_results")
    finally:
        sys.path.remove(str(ROOT / "tools"))


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=120)


def test_page_from_finished_rows_keeps_the_discussion(tmp_path):
    out, doc = tmp_path / "runs", tmp_path / "results.md"
    _rows(out, "frozen", "meld")
    _rows(out, "finetuned", "iemocap", finetune_epochs=2)
    doc.write_text("# old\n\nold tables\n\n## Discussion\n\nWhat reproduces.\n")
    r = _run("--doc-only", "--out", out, "--doc", doc)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert "old tables" not in text and text.rstrip().endswith("What reproduces.")
    assert "### MELD validation (10 utterances), frozen encoder, seeds 0, 1" in text
    assert "### IEMOCAP validation (10 utterances), encoder fine-tuned for 2 epochs, seeds 0, 1" in text
    # mean ± sample standard deviation over the two seeds, in points
    assert "| CaSCLA (lambda 0.1) | 51.00 ± 1.41 | 41.00 ± 1.41 | 52.00 ± 1.41 | 80.0 | 25.5 |" in text
    assert "| Logistic regression (context-free) | 40.00 ± 0.00 |" in text


def test_a_table_whose_raw_numbers_are_elsewhere_is_kept_as_it_was(tmp_path):
    """Raw runs live on the machine that ran them: rebuilding the page after
    rerunning one table keeps the others (and the batch-size table) verbatim
    and replaces the rerun one."""
    out, doc = tmp_path / "runs", tmp_path / "results.md"
    _rows(out, "finetuned", "iemocap", finetune_epochs=2)
    old_meld = ("### MELD validation (1109 utterances), frozen encoder, seeds 0, 1, 2; tuned preset, 10 epochs\n\n"
                "| model | weighted F1 |\n| --- | --- |\n| CaSCLA (defaults) | 51.62 ± 0.95 |")
    old_study = ("### Batch size (the paper's Table 5): MELD validation weighted F1, fine-tuned encoder, seeds 0\n\n"
                 "| contrastive term | batch 4 |\n| --- | --- |\n| SCLA | 56.45 ± 0.57 |")
    doc.write_text("# Results\n\nold protocol\n\n" + old_meld + "\n\n### IEMOCAP validation (647 utterances), "
                   "encoder fine-tuned for 2 epochs, seeds 0\n\n| model |\n| --- |\n| stale row |\n\n"
                   + old_study + "\n\n## Discussion\n\nWhat reproduces.\n")
    r = _run("--doc-only", "--out", out, "--doc", doc)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert old_meld in text and old_study in text and "stale row" not in text and "old protocol" not in text
    assert "### IEMOCAP validation (10 utterances), encoder fine-tuned for 2 epochs, seeds 0, 1" in text
    # the page's order: frozen tables, fine-tuned tables, then the batch-size study, then the discussion
    assert text.index(old_meld) < text.index("### IEMOCAP validation (10") < text.index(old_study)
    assert text.rstrip().endswith("What reproduces.")


def test_bad_arguments_and_no_results_fail_clearly(tmp_path):
    r = _run("--doc-only", "--out", tmp_path / "nothing", "--doc", tmp_path / "r.md")
    assert r.returncode != 0 and "no results under" in r.stderr and not (tmp_path / "r.md").exists()
    r = _run("--variants", "CaSCLA (huge)", "--doc", tmp_path / "r.md")
    assert r.returncode == 2 and "unknown variants" in r.stderr
    r = _run("--features", "warm", "--doc", tmp_path / "r.md")
    assert r.returncode == 2 and "unknown features or datasets: ['warm']" in r.stderr


def test_the_batch_size_study_is_the_papers_table_5(tmp_path):
    out, doc = tmp_path / "runs", tmp_path / "results.md"
    _rows(out, "frozen", "meld")
    rows = {f"{name}, batch {b}": summarise_scores([_scores(0.5 + b / 1000), _scores(0.5 + b / 1000)], LABELS)
            for name in ("SCLA", "SupCon") for b in (4, 8, 16, 32)}
    meta = {"seeds": [0, 1], "epochs": 3, "finetune_epochs": None, "torch": "x", "threads": 1,
            "finished": "2026-01-01 00:00", "label_names": LABELS, "n_val": 10}
    (out / "frozen" / "meld" / "batch_size.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    r = _run("--doc-only", "--out", out, "--doc", doc)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert "### Batch size (the paper's Table 5): MELD validation weighted F1, frozen encoder, seeds 0, 1" in text
    assert "| SCLA | 50.40 ± 0.00 | 50.80 ± 0.00 | 51.60 ± 0.00 | 53.20 ± 0.00 |" in text
    assert "| SPCL-style | - | - | - | - |" in text  # not run: shown as missing, not invented
    r = _run("--study", "batch-size", "--variants", "w/o AST", "--doc", tmp_path / "r.md")
    assert r.returncode == 2 and "unknown variants ['w/o AST']" in r.stderr


def test_a_field_added_later_at_its_default_keeps_a_run_finished():
    tool = _tool()
    key = {"config": {"d_model": 8, "ast_norm": "dialogue"}, "settings": {"lr": 0.001, "patience": None}}
    old = {"config": {"d_model": 8}, "settings": {"lr": 0.001}}  # written before ast_norm/patience existed
    assert tool.same_run(old, key)
    assert not tool.same_run(old, {**key, "config": {"d_model": 8, "ast_norm": "utterance"}})  # not the default
    assert not tool.same_run({**old, "config": {"d_model": 16}}, key)
    assert not tool.same_run({"config": {"d_model": 8, "gone": 1}, "settings": {"lr": 0.001}}, key)


def test_a_run_another_row_finished_with_the_same_settings_is_copied(tmp_path):
    import argparse

    tool = _tool()
    args = argparse.Namespace(out=str(tmp_path))
    key = {"config": {"d_model": 8}, "settings": {"lr": 0.001, "batch_size": 16}}
    src = tool.run_dir(args, "finetuned", "meld", "CaSCLA (defaults)", 0)
    src.mkdir(parents=True)
    (src / "scores.json").write_text(json.dumps({"key": key, "val": {"weighted_f1": 0.5}}))
    (src / "model.pt").write_bytes(b"weights")
    (src / "last.pt").write_bytes(b"big")
    dst = tool.run_dir(args, "finetuned", "meld", "SCLA, batch 16", 0)
    assert not tool.reuse_identical(args, "finetuned", "meld", "SCLA, batch 16", 0,
                                    {**key, "settings": {"lr": 0.001, "batch_size": 8}})  # other settings: train
    assert not dst.exists()
    dst.mkdir(parents=True)
    (dst / "metrics.json").write_text("{}")  # an unfinished run of this row: replaced
    assert tool.reuse_identical(args, "finetuned", "meld", "SCLA, batch 16", 0, key)
    assert tool.finished(dst, key) and (dst / "model.pt").read_bytes() == b"weights"
    assert not (dst / "last.pt").exists() and not (dst / "metrics.json").exists()
    assert not dst.with_name(dst.name + ".copy").exists()


def test_earlier_rows_keep_their_seeds(tmp_path):
    tool = _tool()
    path = tmp_path / "rows.json"
    assert tool.earlier_rows(path) == {}  # none yet
    path.write_text(json.dumps({"meta": {"seeds": [0, 1, 2, 3, 4]},
                                "rows": {"old": {"weighted_f1": [0.5, 0.0]},
                                         "new": {"weighted_f1": [0.6, 0.0], "seeds": [0, 1]}}}))
    assert tool.earlier_rows(path) == {"old": {"seeds": [0, 1, 2, 3, 4], "weighted_f1": [0.5, 0.0]},
                                       "new": {"seeds": [0, 1], "weighted_f1": [0.6, 0.0]}}
    path.write_text("{not json")
    assert tool.earlier_rows(path) == {}


def test_a_run_trained_with_decision_biases_becomes_the_run_without_them(tmp_path):
    """A preset that drops its decision biases turns a finished run into the
    plain one (the biases are fitted after training): remove_bias zeroes them
    in the checkpoint and scores it again, as posthoc_bias does the reverse."""
    import argparse
    import dataclasses

    import torch

    from cascla_ext import CaSCLA, CaSCLAConfig
    from cascla_ext.data import load_dataset
    from cascla_ext.train import TrainSettings, evaluate

    tool = _tool()
    corpus = load_dataset("synthetic", holdout=0.1)
    config = CaSCLAConfig.for_corpus(corpus, "small")
    biased = TrainSettings(epochs=1, seed=0, select_split="holdout", decision_bias="mean_f1")
    plain = dataclasses.replace(biased, decision_bias="none")
    path = tool.run_dir(argparse.Namespace(out=str(tmp_path)), "frozen", "meld", "w/o SCLA", 0)
    path.mkdir(parents=True)
    torch.manual_seed(0)
    model = CaSCLA(config, corpus.label_names)
    model.decision_bias.copy_(torch.linspace(-3, 3, config.num_classes))
    model.save(path / "model.pt", settings={"decision_bias": "mean_f1", "seed": 0})
    (path / "scores.json").write_text(json.dumps({"key": tool.run_key(config, biased), "best_epoch": 1,
                                                  "seconds": 2.0, "val": evaluate(model, corpus.split("val"))}))
    assert tool.finished(path, tool.run_key(config, biased)) and not tool.finished(path, tool.run_key(config, plain))
    assert tool.remove_bias(corpus, config, plain, path) == 0
    back, extra = CaSCLA.load_checkpoint(path / "model.pt")
    assert torch.count_nonzero(back.decision_bias) == 0 and extra["settings"] == {"decision_bias": "none", "seed": 0}
    done = tool.finished(path, tool.run_key(config, plain))
    assert done and done["best_epoch"] == 1 and done["seconds"] == 2.0
    model.decision_bias.zero_()
    assert done["val"]["weighted_f1"] == evaluate(model, corpus.split("val"))["weighted_f1"]
    assert done["holdout"]["n"] == sum(len(d.labels) for d in corpus.split("holdout"))


def test_crossfit_epoch_selection_picks_each_criterions_epoch_out_of_fold(tmp_path):
    """tools/crossfit_epoch_selection.crossfit: epoch 0 serves the majority class, epoch 1 the rare one;
    picked on 4/5 of the dialogues and scored on the fifth, weighted F1 takes epoch 0 and minority F1 epoch 1."""
    import importlib

    import numpy as np

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        tool = importlib.import_module("crossfit_epoch_selection")
    finally:
        sys.path.remove(str(ROOT / "tools"))
    # 20 dialogues of 10 utterances: utterance 0 of each is "fear" (1), the rest "neutral" (0), one unlabelled.
    y = np.zeros((20, 10), dtype=np.int64)
    y[:, 0] = 1
    y[:, 9] = -1
    majority = np.zeros_like(y)                      # never predicts fear
    rare = np.where(np.arange(10) < 4, 1, 0) + 0 * y  # finds every fear, at the cost of 3 neutral each
    np.savez(tmp_path / "epoch_preds.npz", preds=np.stack([majority.ravel(), rare.ravel()]), labels=y.ravel(),
             lengths=np.full(20, 10))
    rows = tool.crossfit(tmp_path, LABELS, ("fear",), seed=0)
    assert len(rows) == 10
    for row in rows:  # every fold agrees, so the pooled out-of-fold scores are those of one epoch
        assert row["weighted_f1:fear"] == 0.0 and row["minority_f1:fear"] == 0.4  # 2*20 / (20 + 80)
        assert row["minority_f1:minority_f1"] > row["weighted_f1:minority_f1"]
        assert row["weighted_f1:weighted_f1"] > row["minority_f1:weighted_f1"]


def test_each_row_sets_model_or_training_fields_that_exist():
    import dataclasses

    from cascla_ext import CaSCLAConfig
    from cascla_ext.train import TrainSettings

    tool = _tool()
    settings = {f.name for f in dataclasses.fields(TrainSettings)}
    config = {f.name for f in dataclasses.fields(CaSCLAConfig)}
    assert set(tool.SETTINGS_FIELDS) <= settings
    for variant, fields in tool.ALL_VARIANTS.items():
        for name in fields:
            # a training setting must be routed to TrainSettings, not to the model's config
            assert name in (tool.SETTINGS_FIELDS if name in settings else config), (variant, name)
    # the weight-averaging rows train with and without it whatever the preset says
    assert tool.ALL_VARIANTS["w/o weight averaging"] == {"ema_decay": None}


def test_class_confusions_describes_one_class_of_a_confusion_matrix(tmp_path):
    import importlib

    import numpy as np

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        tool = importlib.import_module("class_confusions")
    finally:
        sys.path.remove(str(ROOT / "tools"))
    cm = np.array([[50, 5, 1],   # true neutral: 5 predicted as disgust
                   [2, 3, 1],    # true disgust: 3 right, 2 missed to neutral, 1 to anger
                   [4, 7, 20]])  # true anger: 7 predicted as disgust
    d = tool.describe(cm, 1, ["neutral", "disgust", "anger"])
    assert d["support"] == 6 and d["predicted"] == 15 and d["tp"] == 3
    assert d["precision"] == pytest.approx(0.2) and d["recall"] == pytest.approx(0.5)
    assert d["f1"] == pytest.approx(2 * 0.2 * 0.5 / 0.7) and d["share"] == pytest.approx(6 / 93)
    assert d["false_positives_from"] == {"neutral": 5, "anger": 7} and d["misses_to"] == {"neutral": 2, "anger": 1}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "class_confusions.py"), "--dataset", "meld",
                           "--features", "frozen", "--label", "disgust", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--out: no finished runs under" in proc.stderr


def test_repeated_holdout_refuses_unknown_rows_and_bad_seeds(tmp_path):
    tool = ROOT / "tools" / "repeated_holdout.py"
    for extra, message in (((("--rows", "CaSCLA (defaults);w/o everything")), "--rows: unknown row 'w/o everything'"),
                           (("--rows", "w/o AST", "--seeds", "0,x"), "comma-separated integers expected")):
        proc = subprocess.run([sys.executable, str(tool), "--dataset", "iemocap", "--out", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())
