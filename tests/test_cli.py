"""The cascla command line: train + evaluate end to end, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cascla_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "cascla_ext", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--out", str(out), "--epochs", "2", "--quiet",
                 "--seed", "1"]) == 0
    assert "best epoch" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 1 and len(metrics["epochs"]) == 2
    assert metrics["best_epoch"] in (1, 2) and metrics["config"]["use_scla"] is True
    assert {"val", "train", "train_seconds"} <= set(metrics["epochs"][0])
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"weighted_f1", "accuracy", "per_class_f1", "n"} <= set(result)
    assert set(result["per_class_f1"]) == {"neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"}
    assert 0 < result["weighted_f1"] <= 1 and result["n"] > 1000
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "val"]) == 0
    table = capsys.readouterr().out
    assert "weighted F1" in table and "disgust" in table


def test_ablation_flags_reach_the_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--quiet", "--no-scla", "--no-ast",
                 "--no-causal", "--modalities", "t,a"]) == 0
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    assert (cfg["use_scla"], cfg["use_ast"], cfg["use_causal"]) == (False, False, False)
    assert cfg["modalities"] == ["t", "a"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--out", "X", "--bogus"], "unrecognized arguments: --bogus"),
        (["train"], "--out is required (the run folder), or --resume RUN_DIR"),
        (["train", "--out", "X", "--epochs", "0"], "expected a positive integer"),
        (["train", "--out", "X", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["train", "--out", "X", "--modalities", "t,x"], "unknown modality 'x'"),
        (["train", "--out", "X", "--device", "tpu"], "--device must be cpu or cuda"),
        (["evaluate", "--checkpoint", "/nonexistent/model.pt"], "does not exist"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    args = [a if a != "X" else str(tmp_path / "run") for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    proc = run_cli("train", "--out", str(f), "--epochs", "1", "--quiet")
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_version_and_help_name_every_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("cascla-ext ") and "torch" in out and "CUDA kernels" in out
    from cascla_ext.cli import build_parser

    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert action.help, f"{name} {action.option_strings} has no help"
                assert f"(default: {action.default})" in text or "(default" in action.help, \
                    f"{name} {action.option_strings}: default {action.default!r} not shown"


def test_one_log_line_per_epoch_and_a_csv(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: no progress bars
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss ") and lines[1].startswith("epoch 2/2: ")
    assert "ce " in lines[0] and "scla " in lines[0] and "val weighted F1" in lines[0] and "best" in lines[0]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and header[:3] == ["epoch", "loss", "ce"]
    first = dict(zip(header, rows[1].split(",")))
    assert float(first["val_weighted_f1"]) == pytest.approx(metrics["epochs"][0]["val"]["weighted_f1"], rel=1e-5)
    assert float(first["scla"]) == pytest.approx(metrics["epochs"][0]["train"]["scla"], rel=1e-5)
    assert first["supcon"] == ""  # a term this run does not have
    assert main(["train", "--out", str(tmp_path / "quiet"), "--epochs", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
