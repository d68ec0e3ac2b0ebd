"""The built-in corpus's optional shift between training and deployment
conditions (SyntheticSpec.shift, --synthetic-shift; issue 13: something for
adversarial training to guard against)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascla_ext.cli import main
from cascla_ext.data import load_dataset
from cascla_ext.data.synthetic import SyntheticSpec, make_synthetic


def test_shift_changes_only_validation_and_test_and_zero_is_the_plain_corpus():
    plain, shifted = make_synthetic(3), make_synthetic(3, SyntheticSpec(shift=0.5))
    zero = make_synthetic(3, SyntheticSpec(shift=0.0))
    for split in ("train", "val", "test"):
        for a, b, z in zip(plain[split], shifted[split], zero[split], strict=True):
            assert np.array_equal(a.labels, b.labels) and np.array_equal(a.speakers, b.speakers)
            assert np.array_equal(a.clues, b.clues)
            for m in a.features:
                assert np.array_equal(a.features[m], z.features[m])
                assert np.array_equal(a.features[m], b.features[m]) == (split == "train"), (split, m)
    # a per-dialogue offset: within a dialogue the added part shares a mean far from 0
    d_plain, d_shift = plain["test"][0], shifted["test"][0]
    added = d_shift.features["t"] - d_plain.features["t"]
    assert added.dtype == np.float32 and 0.3 < added.std() < 0.9
    with pytest.raises(ValueError, match="shift must be >= 0"):
        make_synthetic(0, SyntheticSpec(shift=-1.0))


def test_load_dataset_records_the_shift_and_rebuilds_it():
    corpus = load_dataset("synthetic", seed=2, shift=0.25)
    assert dict(corpus.spec.reader_options) == {"shift": 0.25}
    again = corpus.spec.load()
    assert np.array_equal(again.split("test")[1].features["a"], corpus.split("test")[1].features["a"])
    assert dict(load_dataset("synthetic", shift=0).spec.reader_options) == {}
    with pytest.raises(ValueError, match=r"unknown options \['layers'\]"):
        load_dataset("synthetic", layers=2)
    with pytest.raises(ValueError, match="shift must be a number >= 0"):
        load_dataset("synthetic", shift="big")


def test_cli_trains_and_evaluates_under_the_recorded_shift(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", "--quiet", "--synthetic-shift", "0.5"]) == 0
    assert json.loads((out / "metrics.json").read_text())["data"]["reader_options"] == {"shift": 0.5}
    capsys.readouterr()
    scores = {}
    for name, extra in (("recorded", []), ("none", ["--synthetic-shift", "0"])):
        assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--json", "--quiet", *extra]) == 0
        scores[name] = json.loads(capsys.readouterr().out)["weighted_f1"]
    assert scores["recorded"] != scores["none"]  # the checkpoint's shift is the default; the flag replaces it
    assert main(["train", "--dataset", "meld", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m"),
                 "--synthetic-shift", "1"]) == 2
    assert "--synthetic-shift is for the synthetic corpus, not meld" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "n"), "--synthetic-shift", "-1"]) == 2
    assert "--synthetic-shift must be >= 0, got -1.0" in capsys.readouterr().err
