"""cascla tune: a search on the hold-out (never validation or test) with
Optuna, resumable from its SQLite study, parallel workers, pruning, and
best.json that cascla train --config reads; one-line errors.

Trials train the built-in synthetic corpus for one epoch (two for pruning)
with a 2-parameter space and a fast fixed config (no adversarial samples,
batches of 32), on one torch thread."""

from __future__ import annotations

import json
import os
import sys

import pytest

from cascla_ext.cli import main

optuna = pytest.importorskip("optuna", reason="the [tune] extra is not installed (pip install 'cascla-ext[tune]')")

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = {"lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
         "scla_weight": {"type": "categorical", "choices": [0.1, 1.0]}}
FIXED = {"config": {"use_ast": False}, "settings": {"batch_size": 32}}


@pytest.fixture
def files(tmp_path):
    space, fixed = tmp_path / "space.json", tmp_path / "fixed.json"
    space.write_text(json.dumps(SPACE))
    fixed.write_text(json.dumps(FIXED))
    return space, fixed


def tune(out, files, *extra: str) -> list[str]:
    space, fixed = files
    return ["tune", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--space", str(space),
            "--config", str(fixed), "--quiet", *extra]


def study_trials(out):
    study = optuna.load_study(study_name="cascla", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_study_on_the_holdout_resumes_and_best_json_trains(tmp_path, files, monkeypatch, capsys):
    import cascla_ext.train as train_module
    from cascla_ext.data import Corpus

    splits, calls = set(), []
    real_split, real_train = Corpus.split, train_module.train
    monkeypatch.setattr(Corpus, "split", lambda self, name: (splits.add(name), real_split(self, name))[1])

    def spy(config, corpus, out_dir, settings, *args, **kwargs):
        calls.append((settings.select_split, sorted(corpus.splits)))
        return real_train(config, corpus, out_dir, settings, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    out = tmp_path / "study"
    assert main(tune(out, files, "--trials", "3")) == 0
    assert "best hold-out weighted_f1" in capsys.readouterr().out
    # Trained and scored on train and the hold-out only: validation and test never touched.
    assert splits == {"train", "holdout"}, splits
    assert len(calls) == 3 and all(select == "holdout" and "holdout" in names for select, names in calls)
    trials = study_trials(out)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    best = json.loads((out / "best.json").read_text())
    top = max(trials, key=lambda t: t.value)
    assert best["value"] == top.value and best["trial"] == top.number
    metrics = json.loads((out / "trials" / str(top.number) / "metrics.json").read_text())
    assert metrics["select_split"] == "holdout" and metrics["data"]["holdout"] == 0.1
    assert best["value"] == metrics["epochs"][metrics["best_epoch"] - 1]["val"]["weighted_f1"]
    assert best["config"] == {"use_ast": False, "scla_weight": top.params["scla_weight"]}
    assert best["settings"] == {"batch_size": 32, "lr": top.params["lr"], "epochs": 1}
    assert (best["n_complete"], best["n_pruned"], best["dataset"], best["objective"]) == \
        (3, 0, "synthetic", "weighted_f1")

    # The same command with --trials 4 resumes: one more trial, the first three untouched.
    stamps = {n: (out / "trials" / str(n) / "metrics.json").stat().st_mtime_ns for n in range(3)}
    calls.clear()
    assert main(tune(out, files, "--trials", "4")) == 0
    assert len(calls) == 1 and len(study_trials(out)) == 4
    assert stamps == {n: (out / "trials" / str(n) / "metrics.json").stat().st_mtime_ns for n in range(3)}
    assert json.loads((out / "best.json").read_text())["n_complete"] == 4
    capsys.readouterr()
    # ... and only with the settings it was created with.
    assert main(tune(out, files, "--trials", "4", "--objective", "macro_f1")) == 2
    assert "holds a study with other settings (--objective" in one_line_error(capsys)

    # train --config best.json: the file's settings, but a flag given wins.
    monkeypatch.setattr(train_module, "train", real_train)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--config", str(out / "best.json"), "--lr", "0.0021",
                 "--quiet"]) == 0
    best = json.loads((out / "best.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["settings"]["lr"] == 0.0021 and best["settings"]["lr"] != 0.0021
    assert metrics["settings"]["batch_size"] == 32 and len(metrics["epochs"]) == 1
    assert metrics["config"]["scla_weight"] == best["config"]["scla_weight"]
    assert metrics["config"]["use_ast"] is False
    assert metrics["data"]["config_file"] == str((out / "best.json").resolve())


def test_trial_seeds_score_a_trial_by_the_mean_of_its_seeds(tmp_path, files, capsys):
    out = tmp_path / "study"
    assert main(tune(out, files, "--trials", "1", "--trial-seeds", "2", "--seed", "3")) == 0
    (trial,) = study_trials(out)
    scores = []
    for seed in (3, 4):
        m = json.loads((out / "trials" / "0" / f"seed_{seed}" / "metrics.json").read_text())
        assert m["seed"] == seed and m["select_split"] == "holdout"
        scores.append(m["epochs"][m["best_epoch"] - 1]["val"]["weighted_f1"])
    assert trial.user_attrs["seeds"] == [3, 4] and trial.user_attrs["per_seed"] == scores
    assert trial.value == pytest.approx(sum(scores) / 2)
    assert list(trial.intermediate_values) == [1]  # the pruner sees the first seed's epoch only
    best = json.loads((out / "best.json").read_text())
    assert best["trial_seeds"] == 2 and best["value"] == trial.value
    capsys.readouterr()
    # A study keeps its number of seeds per trial.
    assert main(tune(out, files, "--trials", "2", "--seed", "3")) == 2
    assert "holds a study with other settings (--trial-seeds: 2 there, 1 here)" in one_line_error(capsys)


def test_jobs_run_trials_in_parallel_worker_processes(tmp_path, files):
    out = tmp_path / "study"
    assert main(tune(out, files, "--trials", "2", "--jobs", "2")) == 0
    trials = study_trials(out)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.user_attrs["pid"] != os.getpid() for t in trials)  # in the workers
    best = json.loads((out / "best.json").read_text())
    assert best["n_complete"] == 2 and best["value"] == max(t.value for t in trials)
    assert not (out / ".tickets").exists()


def test_pruned_trials_are_recorded_as_pruned(tmp_path, files, monkeypatch):
    seen = []

    def prune(self, study, trial):  # prune every trial once one is complete (the real rule is a median)
        seen.append((self._n_startup_trials, self._n_warmup_steps, trial.last_step))
        return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", prune)
    out = tmp_path / "study"
    assert main(tune(out, files, "--trials", "2", "--epochs", "2", "--prune-startup", "1",
                     "--prune-warmup", "0")) == 0
    S = optuna.trial.TrialState
    assert [t.state for t in study_trials(out)] == [S.COMPLETE, S.PRUNED]
    assert seen and all(s[:2] == (1, 1) for s in seen)  # startup 1; no warm-up: prunable from epoch 1
    pruned = json.loads((out / "trials" / "1" / "metrics.json").read_text())
    assert len(pruned["epochs"]) == 1 and pruned["status"] == "failed" and "pruned" in pruned["error"]
    best = json.loads((out / "best.json").read_text())
    assert (best["trial"], best["n_complete"], best["n_pruned"]) == (0, 1, 1)
    # A trial left running by a process that died is marked failed when the study is resumed.
    optuna.load_study(study_name="cascla", storage=f"sqlite:///{out / 'study.db'}").ask()
    assert main(tune(out, files, "--trials", "2", "--epochs", "2", "--prune-startup", "1",
                     "--prune-warmup", "0")) == 0
    assert [t.state for t in study_trials(out)] == [S.COMPLETE, S.PRUNED, S.FAIL]


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
     "unknown hyper-parameter 'learning_rate' (not a CaSCLAConfig or TrainSettings field"),
    ({"epochs": {"type": "int", "low": 1, "high": 9}}, "'epochs' cannot be searched"),
    ({"dropout": {"type": "float", "low": 0.0, "high": 1.0}}, "dropout must be in [0, 1)"),
    ({"batch_size": {"type": "float", "low": 4, "high": 8}}, "'batch_size': 4.0 does not fit"),
    ({"lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}}, "a log scale needs 'low' > 0"),
    ({"gamma": {"type": "categorical", "choices": []}}, "'choices' must be a non-empty list"),
])
def test_a_bad_space_is_one_line_before_anything_runs(tmp_path, capsys, space, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    out = tmp_path / "study"
    assert main(["tune", "--dataset", "synthetic", "--out", str(out), "--trials", "1", "--space", str(path)]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"cascla tune: --space {path}: ") and message in line, line
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ({"config": {"dropuot": 0.2}}, "config field 'dropuot' (not a CaSCLAConfig field; did you mean 'dropout'?)"),
    ({"settings": {"learning_rate": 0.1}}, "unknown settings field 'learning_rate'"),
    ({"settings": {"lr": "fast"}}, "settings['lr'] is 'fast', expected a number"),
    ({"value": 0.5}, "holds neither a 'config' nor a 'settings' object"),
    ([1, 2], "expected a JSON object"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "best.json"
    path.write_text(json.dumps(content))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--config", str(path), "--quiet"]) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"cascla train: --config {path}: ") and message in line, line
    assert not run.exists()


def test_without_optuna_tune_says_which_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", "--dataset", "synthetic", "--out", str(tmp_path / "s"), "--trials", "1"]) == 2
    assert one_line_error(capsys) == "cascla-ext: cascla tune needs the [tune] extra: pip install 'cascla-ext[tune]'"


def test_minority_f1_objective_scores_the_rare_classes_of_the_training_labels(tmp_path, files, capsys):
    from cascla_ext.data import load_dataset
    from cascla_ext.metrics import minority_classes

    out = tmp_path / "study"
    assert main(tune(out, files, "--trials", "1", "--objective", "minority_f1")) == 0
    assert "best hold-out minority_f1" in capsys.readouterr().out
    best = json.loads((out / "best.json").read_text())
    corpus = load_dataset("synthetic", holdout=0.1)  # as tune loads it
    rare = minority_classes(corpus.class_prior("train"), corpus.label_names)
    metrics = json.loads((out / "trials" / str(best["trial"]) / "metrics.json").read_text())
    selected = metrics["epochs"][metrics["best_epoch"] - 1]["val"]
    per_class = selected["per_class_f1"]
    assert {"fear", "disgust"} <= set(rare) and set(best["holdout_minority_f1"]) == set(rare)
    assert best["value"] == pytest.approx(0.5 * (selected["weighted_f1"] + sum(per_class[c] for c in rare) / len(rare)))
