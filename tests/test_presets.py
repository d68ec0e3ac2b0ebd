"""Presets: one table of widths and training defaults, and the tuned presets
(cascla_ext/tuned/*.json) that ``cascla train`` uses by default."""

from __future__ import annotations

import json

import pytest

from cascla_ext import presets
from cascla_ext.cli import main
from cascla_ext.config import CaSCLAConfig
from cascla_ext.data import DATASETS
from cascla_ext.tune import read_config_file

TUNED = {"dataset": "synthetic", "select_split": "holdout", "preset": "small",
         "config": {"scla_weight": 0.37, "dropout": 0.15},
         "settings": {"lr": 0.0021, "batch_size": 8, "epochs": 1},
         "study": {"trials": 3, "objective": "mean_f1", "value": 0.5}}


def test_widths_and_learning_rates():
    assert presets.config_for("small").d_model == CaSCLAConfig.small().d_model
    assert presets.config_for("base", dropout=0.2).dropout == 0.2
    assert presets.config_for("paper").d_hidden == CaSCLAConfig().d_hidden == 300
    assert presets.LEARNING_RATE == {"small": 1e-3, "base": 1e-3, "paper": 1e-4}
    with pytest.raises(ValueError, match="expected one of small, base, paper for the widths, got 'tuned'"):
        presets.config_for("tuned")


def test_shipped_tuned_presets_are_valid_config_files():
    names = presets.tuned_presets()
    for name in names:
        dataset, kind = name.rsplit("-", 1)
        assert dataset in DATASETS and kind in ("frozen", "finetuned"), name
        path = presets.tuned_path(dataset, kind == "finetuned")
        file = read_config_file(path)
        assert file.preset in presets.WIDTHS and file.settings  # config: {} where the base values stay
        data = json.loads(path.read_text())
        # found on the hold-out, never validation or test; where it came from is recorded
        assert data["select_split"] == "holdout" and data["dataset"] == dataset
        assert {"trials", "objective", "value"} <= set(data["study"])


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "synthetic-frozen.json").write_text(json.dumps(TUNED))
    monkeypatch.setattr(presets, "TUNED_DIR", folder)
    return folder


def _train(tmp_path, name, *args):
    out = tmp_path / name
    assert main(["train", "--dataset", "synthetic", "--out", str(out), "--quiet", *args]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_train_uses_the_datasets_tuned_preset_by_default(tmp_path, tuned_dir):
    m = _train(tmp_path, "default")
    assert m["config"]["scla_weight"] == 0.37 and m["config"]["dropout"] == 0.15
    assert (m["settings"]["lr"], m["settings"]["batch_size"], len(m["epochs"])) == (0.0021, 8, 1)  # not 20
    assert m["data"]["preset"] == "tuned" and m["data"]["widths"] == "small"
    assert m["data"]["config_file"] == str((tuned_dir / "synthetic-frozen.json").resolve())
    # a flag given wins over the preset's value
    m = _train(tmp_path, "flag", "--lr", "0.003")
    assert (m["settings"]["lr"], m["config"]["scla_weight"], len(m["epochs"])) == (0.003, 0.37, 1)
    # --preset tuned says the same as the default
    assert _train(tmp_path, "named", "--preset", "tuned")["config"]["scla_weight"] == 0.37


@pytest.mark.parametrize("args", [["--preset", "small"], ["--preset", "paper"], ["--config", "OTHER"]])
def test_another_preset_or_a_config_file_replaces_the_tuned_one(tmp_path, tuned_dir, args):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config": {"dropout": 0.05}, "settings": {"epochs": 1}}))
    args = [str(other) if a == "OTHER" else a for a in args]
    m = _train(tmp_path, "run", "--epochs", "1", *args)
    assert m["config"]["scla_weight"] == CaSCLAConfig().scla_weight
    assert m["data"]["preset"] != "tuned" and m["config"]["dropout"] != 0.15
    if "paper" in args:
        assert m["settings"]["lr"] == 1e-4 and m["config"]["d_hidden"] == 300


def test_tuned_preset_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(presets, "TUNED_DIR", tmp_path / "none")
    assert main(["train", "--out", str(tmp_path / "a"), "--preset", "tuned"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cascla train: --preset tuned: no tuned preset for synthetic with the frozen encoder "
                   "(there are: none)")
    assert main(["train", "--out", str(tmp_path / "b"), "--preset", "tuned", "--config", "x.json"]) == 2
    assert "--preset tuned and --config both name the run's defaults" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
