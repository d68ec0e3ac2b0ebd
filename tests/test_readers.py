"""Dataset readers: real MELD / IEMOCAP files where present, and tiny files in
tmp_path for every format (fake COSMIC pickles included) and every error kind."""

from __future__ import annotations

import collections
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from cascla_ext.data.batch import CLUE_RELATIONS
from cascla_ext.data.cosmic import ATOMIC_RELATIONS, LAYOUTS, hold_out, read_cosmic
from cascla_ext.data.iemocap import IEMOCAP_LABELS, read_iemocap
from cascla_ext.data.jsonl import read_jsonl, read_jsonl_file
from cascla_ext.data.meld import MELD_LABELS, normalize_text, read_meld
from cascla_ext.data.raw import SPLITS, DataError, RawCorpus
from cascla_ext.data.readers import READERS, read_raw

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MELD_DIR = SHARED_DATA / "meld"
IEMOCAP_PKL = SHARED_DATA / "iemocap" / "iemocap.pkl"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: real data is in ../shared/data")
    return path


def raises(match_all: list[str], fn, *args, exc=DataError, **kwargs) -> str:
    """Call fn, expect ``exc``, check that every string in ``match_all`` is in the message."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for part in match_all:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# =========================================================================== MELD, real files

@pytest.fixture(scope="module")
def meld_real() -> RawCorpus:
    need(MELD_DIR / "train_sent_emo.csv")
    need(MELD_DIR / "dev_sent_emo.csv")
    return read_meld(MELD_DIR)


def test_meld_real_counts(meld_real):
    assert meld_real.label_names == list(MELD_LABELS)
    assert meld_real.label_names == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    train, val, test = (meld_real.splits[s] for s in SPLITS)
    assert (len(train), sum(map(len, train))) == (1038, 9989)
    assert (len(val), sum(map(len, val))) == (114, 1109)
    assert test == []
    ids = {d.id for d in train}
    assert "train/dia0" in ids and "train/dia12" in ids and "train/dia60" not in ids
    assert [d.id for d in train] == [f"train/dia{i}" for i in sorted(d.meta["dialogue_id"] for d in train)]
    assert all(d.id.startswith("val/dia") for d in val)


def test_meld_real_labels_and_order(meld_real):
    train = meld_real.splits["train"]
    counts = collections.Counter(y for d in train for y in d.labels)
    assert set(counts) == set(MELD_LABELS)
    assert counts["neutral"] == 4710 and counts.most_common(1)[0][0] == "neutral"
    assert counts["fear"] < 0.04 * 9989 and counts["disgust"] < 0.04 * 9989
    for d in meld_real.dialogues():
        assert len(d.texts) == len(d.speakers) == len(d.labels) == len(d.meta["utterance_ids"])
        assert d.meta["utterance_ids"] == sorted(d.meta["utterance_ids"])
        assert all(isinstance(s, str) and s for s in d.speakers)
    first = train[0]
    assert first.meta["utterance_ids"][:3] == [0, 1, 2] and first.meta["lines"][:3] == [2, 3, 4]
    assert first.speakers[:2] == ["Chandler", "The Interviewer"]
    assert first.meta["sentiments"][0] == "neutral"


def test_meld_real_text_normalised(meld_real):
    texts = [t for d in meld_real.dialogues() for t in d.texts]
    assert texts[0] == "also I was the point person on my company's transition from the KL-5 to GR-6 system."
    joined = "".join(texts)
    for artefact in ("\u2019", "\u2018", "\u201c", "\u201d", "\u2026", "\u00e2\u20ac", "\x92", "\x85"):
        assert artefact not in joined
    assert "\u2014" in joined  # em dashes are real punctuation: kept
    assert "\u00e9" in joined  # accented letters kept
    assert sum(t.count("...") for t in texts) >= 148


# =========================================================================== MELD, small files

HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
          "Season", "Episode", "StartTime", "EndTime"]


def meld_row(i, text, speaker, emotion, dia, utt):
    return [str(i), text, speaker, emotion, "neutral", str(dia), str(utt), "1", "1", "00:00:01,000",
            "00:00:02,000"]


def write_csv(path: Path, rows, header=HEADER, encoding="utf-8") -> Path:
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n")
    if header is not None:
        w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def test_meld_grouping_order_and_text(tmp_path):
    write_csv(tmp_path / "train_sent_emo.csv", [
        meld_row(1, "second", "B", "Joy", 3, 5),
        meld_row(2, "It\u2019s \u201cfine\u201d\u2026", "A", "neutral", 3, 0),
        meld_row(3, "multi\nline", "A", "anger", 1, 0),
        meld_row(4, "You\u00e2\u20ac\u2122re caf\u00e9 \u2014 ok", "C", "surprise", 3, 2),
    ])
    write_csv(tmp_path / "test_sent_emo.csv", [meld_row(1, "t", "A", "fear", 0, 0)])
    c = read_meld(tmp_path)
    assert c.name == "meld" and c.splits["val"] == []
    (d1, d3), (t0,) = c.splits["train"], c.splits["test"]
    assert [d1.id, d3.id, t0.id] == ["train/dia1", "train/dia3", "test/dia0"]
    assert d3.meta["utterance_ids"] == [0, 2, 5]  # ordered by Utterance_ID, gaps allowed
    assert d3.texts == ['It\'s "fine"...', "You're caf\u00e9 \u2014 ok", "second"]
    assert d3.speakers == ["A", "C", "B"] and d3.labels == ["neutral", "surprise", "joy"]
    assert d1.texts == ["multi\nline"]
    assert d3.meta["lines"] == [3, 6, 2]  # the quoted newline makes row 3 span lines 4-5


def test_meld_required_columns_only_and_cp1252(tmp_path):
    rows = [["Oh\u2019s it\u2026", "Monica", "sadness", "7", "1"], ["Hi", "Ross", "disgust", "7", "0"]]
    write_csv(tmp_path / "dev_sent_emo.csv", rows,
              header=["Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"], encoding="cp1252")
    (d,) = read_meld(tmp_path).splits["val"]
    assert d.id == "val/dia7" and d.texts == ["Hi", "Oh's it..."] and d.labels == ["disgust", "sadness"]


@pytest.mark.parametrize("text, expected", [
    ("plain ASCII", "plain ASCII"),
    ("company\u2019s", "company's"),
    ("company\u00e2\u20ac\u2122s", "company's"),  # UTF-8 read as cp1252
    ("company\x92s", "company's"),  # cp1252 read as Latin-1
    ("wait\x85", "wait..."),
    ("\u00e2\u20ac\u0153Hi\u00e2\u20ac\x9d", '"Hi"'),
    ("\u00c3\u00a9clair", "\u00e9clair"),
    ("caf\u00e9 na\u00efve \u00fcber", "caf\u00e9 na\u00efve \u00fcber"),  # real accents kept
    ("you\u2014you \u2013 \u00a0x", "you\u2014you \u2013 \u00a0x"),  # dashes, nbsp kept
    ("it\x97s", "it\u2014s"),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_meld_errors(tmp_path):
    raises(["train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv", str(tmp_path)], read_meld, tmp_path)
    raises(["not a directory"], read_meld, tmp_path / "nope")

    p = write_csv(tmp_path / "train_sent_emo.csv", [["x", "A", "1", "0"]],
                  header=["Utterance", "Speaker", "Dialogue_ID", "Utterance_ID"])
    raises([f"{p}:1", "missing column Emotion"], read_meld, tmp_path)

    p.write_text("")
    raises([str(p), "empty file"], read_meld, tmp_path)
    write_csv(p, [])
    raises([str(p), "no utterances"], read_meld, tmp_path)

    write_csv(p, [meld_row(1, "a", "A", "joy", 0, 0), meld_row(2, "b", "B", "happy", 0, 1)])
    raises([f"{p}:3", "unknown emotion 'happy'", "neutral, surprise"], read_meld, tmp_path)

    write_csv(p, [meld_row(1, "a", "A", "joy", 0, 0), meld_row(2, "b", "B", "joy", 0, 1),
                  meld_row(3, "c", "A", "joy", 0, 0)])
    raises([f"{p}:4", "duplicate utterance", "Dialogue_ID 0, Utterance_ID 0", "line 2"], read_meld, tmp_path)

    write_csv(p, [meld_row(1, "a", "A", "joy", "x1", 0)])
    raises([f"{p}:2", "Dialogue_ID 'x1' is not an integer"], read_meld, tmp_path)

    write_csv(p, [meld_row(1, "a", "A", "joy", 0, 0), ["2", "b", "B", "joy", "0"]])
    raises([f"{p}:3", "no value for", "Utterance_ID"], read_meld, tmp_path)


# =========================================================================== IEMOCAP

def test_iemocap_real():
    c = read_iemocap(need(IEMOCAP_PKL).parent)
    assert c.name == "iemocap" and c.label_names == list(IEMOCAP_LABELS)
    assert c.label_names == ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
    assert (len(c.splits["train"]), len(c.splits["val"]), len(c.splits["test"])) == (108, 12, 0)
    assert sum(len(d) for d in c.dialogues()) == 5810
    counts = collections.Counter(y for d in c.dialogues() for y in d.labels)
    assert counts == {"frustrated": 1468, "neutral": 1324, "angry": 933, "sad": 839, "excited": 742,
                      "happy": 504}
    assert {s for d in c.dialogues() for s in d.speakers} == {"M", "F"}
    assert all(d.id.startswith("Ses0") for d in c.dialogues())
    assert len({d.id for d in c.dialogues()}) == 120
    direct = read_raw("iemocap", IEMOCAP_PKL)  # a direct path to the pickle works too
    assert [d.id for d in direct.dialogues()] == [d.id for d in c.dialogues()]


def iemocap_obj(**changes):
    spk = {"d1": ["M", "F", "M"], "d2": ["F", "M"], "d3": ["M"]}
    lab = {"d1": [0, 5, 2], "d2": [np.int64(3), 4], "d3": [1]}
    sen = {"d1": ["Hi.", "Hey.", "Bye."], "d2": ["No.", "Yes!"], "d3": ["Mm."]}
    obj = {"speakers": spk, "labels": lab, "sentences": sen, "train": ["d1", "d3"], "test": [],
           "valid": ["d2"]}
    for key, value in changes.items():
        if "." in key:
            field, vid = key.split(".")
            obj[field][vid] = value
        else:
            obj[key] = value
    return [obj[k] for k in ("speakers", "labels", "sentences", "train", "test", "valid")]


def write_pickle(path: Path, obj) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)
    return path


def test_iemocap_small(tmp_path):
    write_pickle(tmp_path / "iemocap.pkl", iemocap_obj())
    c = read_iemocap(tmp_path)
    assert [d.id for d in c.splits["train"]] == ["d1", "d3"] and [d.id for d in c.splits["val"]] == ["d2"]
    d1 = c.splits["train"][0]
    assert d1.labels == ["happy", "frustrated", "neutral"] and d1.speakers == ["M", "F", "M"]
    assert c.splits["val"][0].labels == ["angry", "excited"]
    # ids stored as a set come out sorted
    write_pickle(tmp_path / "iemocap.pkl", iemocap_obj(train={"d3", "d1"}))
    assert [d.id for d in read_iemocap(tmp_path).splits["train"]] == ["d1", "d3"]


@pytest.mark.parametrize("changes, expected", [
    ({"labels.d1": [0, 6, 2]}, ["'d1'", "utterance 1", "label 6", "0..5"]),
    ({"labels.d2": [0, "sad"]}, ["'d2'", "utterance 1", "label 'sad'"]),
    ({"sentences.d1": ["a", "b"]}, ["'d1'", "mismatched lengths", "3 speakers", "2 sentences"]),
    ({"train": ["d1", "d9"]}, ["'d9'", "missing from speakers, labels, sentences"]),
    ({"valid": ["d2", "d1"]}, ["'d1'", "listed twice"]),
    ({"speakers.d3": [], "labels.d3": [], "sentences.d3": []}, ["'d3'", "no utterances"]),
    ({"speakers.d3": [1]}, ["'d3'", "utterance 0", "speaker 1 is not a string"]),
    ({"train": [], "valid": []}, ["all empty"]),
])
def test_iemocap_errors(tmp_path, changes, expected):
    p = write_pickle(tmp_path / "iemocap.pkl", iemocap_obj(**changes))
    raises([str(p), *expected], read_iemocap, tmp_path)


def test_iemocap_file_errors(tmp_path):
    raises([str(tmp_path / "iemocap.pkl"), "not found"], read_iemocap, tmp_path)
    p = write_pickle(tmp_path / "iemocap.pkl", iemocap_obj()[:5])
    raises([str(p), "list of 6 items", "got a list of 5"], read_iemocap, tmp_path)
    write_pickle(p, {"speakers": {}})
    raises([str(p), "got a dict"], read_iemocap, tmp_path)
    p.write_bytes(b"not a pickle at all")
    raises([str(p), "not a readable pickle"], read_iemocap, tmp_path)
    p.write_bytes(pickle.dumps(iemocap_obj())[:50])
    raises([str(p), "not a readable pickle"], read_iemocap, tmp_path)


# =========================================================================== COSMIC feature pickles

def fake_cosmic(tmp_path: Path, dataset: str, layout: str, n_dialogues: int = 20, one_hot: bool = True,
                comet: bool = True, seed: int = 0) -> dict:
    """Write ``<dataset>_features_roberta.pkl`` (+ comet) in ``layout``; return what went in.

    Text layer k (1..4) of utterance j is filled with 10 * k + j; COMET
    relation r (ATOMIC order) with r, so tests can see which went where.
    """
    rng = np.random.default_rng(seed)
    n_labels = 7 if dataset == "meld" else 6
    vids = ([f"{dataset}_{i:02d}" for i in range(n_dialogues)] if dataset == "iemocap"
            else list(range(n_dialogues)))  # COSMIC's MELD ids are ints
    n = {v: int(rng.integers(1, 6)) for v in vids}
    spk_idx = {v: rng.integers(0, 3, n[v]) for v in vids}
    speakers = {v: [np.eye(9)[k].tolist() if one_hot else "MF"[k % 2] for k in spk_idx[v]] for v in vids}
    labels = {v: rng.integers(0, n_labels, n[v]).tolist() for v in vids}
    text = [{v: [np.full(1024, 10 * k + j, np.float32) for j in range(n[v])] for v in vids}
            for k in (1, 2, 3, 4)]
    audio = {v: rng.standard_normal((n[v], 100)).astype(np.float32) for v in vids}
    visual = {v: rng.standard_normal((n[v], 512)).astype(np.float32) for v in vids}
    sentences = {v: [f"utt {j}\x92s" for j in range(n[v])] for v in vids}
    utt_ids = {v: [f"{v}_u{j}" for j in range(n[v])] for v in vids}
    n_test = n_dialogues // 5
    train, test = vids[: n_dialogues - 2 * n_test], vids[n_dialogues - n_test:]
    valid = vids[n_dialogues - 2 * n_test: n_dialogues - n_test]
    sentiment = {v: [0] * n[v] for v in vids}
    masks = {v: np.zeros((n[v], n[v])) for v in vids}
    items = {
        "cosmic-iemocap": [speakers, labels, *text, sentences, train, test, valid],
        "cosmic-meld": [speakers, labels, sentiment, *text, sentences, train, test, valid],
        "cauain-meld": [speakers, labels, sentiment, *text, masks, masks, masks, masks, sentences, train, test,
                        valid],
        "multimodal": [utt_ids, speakers, labels, *text, audio, visual, sentences, train + valid, test],
        "multimodal-valid": [utt_ids, speakers, labels, *text, audio, visual, sentences, train, test, valid],
        "multimodal-sentiment": [utt_ids, speakers, labels, sentiment, *text, audio, visual, sentences,
                                 train + valid, test],
        "dialoguernn": [utt_ids, speakers, labels, text[0], audio, visual, sentences, train + valid, test],
        "dialoguernn-meld": [utt_ids, speakers, labels, text[0], audio, sentences, train + valid, test,
                             sentiment],
    }[layout]
    write_pickle(tmp_path / f"{dataset}_features_roberta.pkl", items)
    if comet:
        rel = [{v: [np.full(768, r, np.float32) for _ in range(n[v])] for v in vids}
               for r in range(len(ATOMIC_RELATIONS))]
        write_pickle(tmp_path / f"{dataset}_features_comet.pkl", rel)
    return {"vids": vids, "n": n, "labels": labels, "spk_idx": spk_idx, "train": train, "valid": valid,
            "test": test, "audio": audio, "visual": visual}


@pytest.mark.parametrize("dataset", ["meld", "iemocap"])
def test_cosmic_layout_with_valid(tmp_path, dataset):
    truth = fake_cosmic(tmp_path, dataset, f"cosmic-{dataset}")
    c = read_raw("cosmic", tmp_path)  # dataset told from the file names
    names = MELD_LABELS if dataset == "meld" else IEMOCAP_LABELS
    assert c.label_names == list(names) and c.name == f"cosmic-{dataset}"
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert [d.id for d in c.splits[split]] == [str(v) for v in truth[key]]
    for d in c.dialogues():
        v = d.meta["pickle_id"]
        n = truth["n"][v]
        assert set(d.features) == {"t"}  # COSMIC's pickles have no audio/visual
        t = d.features["t"]
        assert t.shape == (n, 1024) and t.dtype == np.float32
        np.testing.assert_allclose(t[:, 0], 25 + np.arange(n))  # mean of 10k + j over k = 1..4
        assert d.clues.shape == (n, 6, 768) and d.clues.dtype == np.float32
        assert d.labels == [names[k] for k in truth["labels"][v]]
        assert d.speakers == [f"speaker{k}" for k in truth["spk_idx"][v]]
        assert d.texts == [f"utt {j}'s" for j in range(n)]
        assert "held_out" not in d.meta


def test_cosmic_clue_order(tmp_path):
    fake_cosmic(tmp_path, "meld", "cosmic-meld", n_dialogues=5)
    d = read_cosmic(tmp_path).splits["train"][0]
    assert CLUE_RELATIONS == ("xReact", "xEffect", "xWant", "oReact", "oEffect", "oWant")
    expected = [ATOMIC_RELATIONS.index(r) for r in CLUE_RELATIONS]
    assert expected == [5, 4, 3, 8, 7, 6]
    np.testing.assert_array_equal(d.clues[:, :, 0], np.tile(expected, (len(d), 1)))
    np.testing.assert_array_equal(d.clues[:, :, -1], np.tile(expected, (len(d), 1)))


def test_cosmic_text_layers(tmp_path):
    fake_cosmic(tmp_path, "iemocap", "cosmic-iemocap", n_dialogues=5, one_hot=False)
    d = {k: read_cosmic(tmp_path, dataset="iemocap", text_layers=k).splits["train"][0]
         for k in ("mean", "concat", "1", "2", "3", "4")}
    n = len(d["mean"])
    assert d["mean"].speakers[0] in ("M", "F")  # letters are kept
    assert d["concat"].features["t"].shape == (n, 4096)
    for k in (1, 2, 3, 4):
        t = d[str(k)].features["t"]
        assert t.shape == (n, 1024)
        np.testing.assert_array_equal(t[:, 0], 10 * k + np.arange(n))
        np.testing.assert_array_equal(d["concat"].features["t"][:, 1024 * (k - 1)], 10 * k + np.arange(n))
    np.testing.assert_array_equal(read_cosmic(tmp_path, text_layers=2).splits["train"][0].features["t"],
                                  d["2"].features["t"])
    raises(["text_layers", "mean, concat, 1, 2, 3, 4", "'5'"], read_cosmic, tmp_path, text_layers="5",
           exc=ValueError)


@pytest.mark.parametrize("dataset", ["meld", "iemocap"])
def test_cosmic_multimodal_held_out_val(tmp_path, dataset):
    truth = fake_cosmic(tmp_path, dataset, "multimodal", n_dialogues=30)
    c = read_cosmic(tmp_path)
    pool = truth["train"] + truth["valid"]  # this layout has no validation ids
    train, val = c.splits["train"], c.splits["val"]
    assert len(pool) == 24 and len(val) == 2 and len(train) == 22  # 10%, rounded
    assert sorted([d.id for d in train + val]) == sorted(str(v) for v in pool)
    assert all(d.meta["held_out"] for d in val) and not any("held_out" in d.meta for d in train)
    exp_train, exp_val = hold_out(pool)
    assert [d.id for d in val] == [str(v) for v in exp_val]
    assert [d.id for d in train] == [str(v) for v in exp_train]
    assert [d.id for d in c.splits["test"]] == [str(v) for v in truth["test"]]
    assert [d.id for d in read_cosmic(tmp_path).splits["val"]] == [d.id for d in val]  # deterministic
    d = train[0]
    v = d.meta["pickle_id"]
    n = truth["n"][v]
    assert set(d.features) == {"t", "a", "v"}
    assert d.features["a"].shape == (n, 100) and d.features["v"].shape == (n, 512)
    np.testing.assert_array_equal(d.features["a"], truth["audio"][v])
    assert d.meta["utterance_ids"] == [f"{v}_u{j}" for j in range(n)]
    assert d.clues.shape == (n, 6, 768)


def test_hold_out_rules():
    ids = list(range(50))
    train, val = hold_out(ids)
    assert len(val) == 5 and val == sorted(val) and set(train) | set(val) == set(ids)
    assert hold_out(ids[::-1]) == (train[::-1], val)  # the draw ignores the stored order
    assert hold_out(["b", "a"]) in ((["b"], ["a"]), (["a"], ["b"]))
    assert hold_out(["only"]) == (["only"], [])


@pytest.mark.parametrize("layout", ["cauain-meld", "multimodal-valid", "multimodal-sentiment", "dialoguernn",
                                    "dialoguernn-meld"])
def test_cosmic_other_layouts(tmp_path, layout):
    truth = fake_cosmic(tmp_path, "meld", layout, n_dialogues=10, comet=False)
    c = read_cosmic(tmp_path / "meld_features_roberta.pkl")  # a direct path works too
    assert c.dialogues()[0].meta["layout"] == layout
    assert all(d.clues is None for d in c.dialogues())  # no COMET pickle
    has_av = {"a", "v"} if layout.startswith("multimodal") or layout == "dialoguernn" else set()
    if layout == "dialoguernn-meld":
        has_av = {"a"}
    assert set(c.dialogues()[0].features) == {"t"} | has_av
    assert sum(map(len, c.dialogues())) == sum(truth["n"].values())
    if layout in ("dialoguernn", "dialoguernn-meld"):
        raises(["text_layers=2", "1 text feature set"], read_cosmic, tmp_path, text_layers="2", exc=ValueError)


def test_cosmic_file_errors(tmp_path):
    raises([str(tmp_path), "meld_features_roberta.pkl", "iemocap_features_roberta.pkl"], read_cosmic, tmp_path)
    fake_cosmic(tmp_path, "meld", "cosmic-meld", n_dialogues=5)
    raises(["iemocap_features_roberta.pkl"], read_cosmic, tmp_path, dataset="iemocap")
    raises(["unknown dataset 'dailydialog'"], read_cosmic, tmp_path, dataset="dailydialog", exc=ValueError)
    fake_cosmic(tmp_path, "iemocap", "cosmic-iemocap", n_dialogues=5)
    raises(["both meld and iemocap", "dataset="], read_cosmic, tmp_path)
    assert read_cosmic(tmp_path, dataset="iemocap").label_names == list(IEMOCAP_LABELS)
    odd = write_pickle(tmp_path / "features.pkl", [{}] * 7)
    raises([str(odd), "cannot tell the dataset"], read_cosmic, odd)
    raises([str(odd), "list of 7 items is not a known", "docs/data-formats.md"], read_cosmic, odd,
           dataset="meld")
    write_pickle(odd, [{}] * 10)
    raises([str(odd), "no layout fits", "cosmic-iemocap"], read_cosmic, odd, dataset="meld")


def _rewrite(path: Path, edit) -> Path:
    with open(path, "rb") as fh:
        obj = pickle.load(fh)
    edit(obj)
    return write_pickle(path, obj)


@pytest.mark.parametrize("edit, expected", [
    (lambda o: o[1].__setitem__(0, [7] + o[1][0][1:]), ["dialogue 0", "utterance 0", "label 7", "0..6"]),
    (lambda o: o[0].__setitem__(0, [[1, 1, 0]] + o[0][0][1:]), ["dialogue 0", "utterance 0", "one-hot"]),
    (lambda o: o[7].__setitem__(0, o[7][0][:-1] + ["x", "y"]), ["dialogue 0", "mismatched lengths"]),
    (lambda o: o[3].__setitem__(0, o[3][0][:-1] + [np.zeros(1024), np.zeros(1024)]),
     ["dialogue 0", "mismatched lengths", "t1 features"]),
    (lambda o: o[4].pop(0), ["dialogue 0", "t2 features missing"]),
    (lambda o: o[4].__setitem__(1, "junk"), ["dialogue 1", "t2 features not an (n, d) array"]),
    (lambda o: o[8].append(999), ["dialogue 999", "missing from speakers, labels, sentences"]),
    (lambda o: o[9].append(0), ["dialogue 0", "in both the train and the test ids"]),
    (lambda o: o[1].__setitem__(0, []), ["dialogue 0", "no utterances"]),
])
def test_cosmic_data_errors(tmp_path, edit, expected):
    fake_cosmic(tmp_path, "meld", "cosmic-meld", n_dialogues=5, comet=False)
    p = _rewrite(tmp_path / "meld_features_roberta.pkl", edit)
    raises([str(p), *expected], read_cosmic, tmp_path)


def test_cosmic_unread_items_may_be_anything(tmp_path):
    fake_cosmic(tmp_path, "meld", "cosmic-meld", n_dialogues=5, comet=False)
    _rewrite(tmp_path / "meld_features_roberta.pkl", lambda o: o.__setitem__(2, None))  # sentiment labels
    assert len(read_cosmic(tmp_path).dialogues()) == 5


def test_cosmic_comet_errors(tmp_path):
    fake_cosmic(tmp_path, "meld", "cosmic-meld", n_dialogues=5)
    comet = tmp_path / "meld_features_comet.pkl"
    _rewrite(comet, lambda o: o[5].pop(1))  # xReact
    raises([str(comet), "dialogue 1", "missing from the COMET pickle (xReact)"], read_cosmic, tmp_path)
    _rewrite(comet, lambda o: o[5].__setitem__(1, [np.zeros(768)] * 9))
    raises([str(comet), "dialogue 1", "mismatched lengths", "COMET xReact"], read_cosmic, tmp_path)
    write_pickle(comet, [{}] * 8)
    raises([str(comet), "list of 9 dicts", "got 8 items"], read_cosmic, tmp_path)
    write_pickle(comet, {r: {} for r in ATOMIC_RELATIONS if r != "oWant"})
    raises([str(comet), "no oWant"], read_cosmic, tmp_path)


def test_layout_table_is_unambiguous():
    names = [lay.name for lay in LAYOUTS]
    assert len(names) == len(set(names))
    for lay in LAYOUTS:
        assert {"speakers", "labels", "sentences", "train", "test"} <= set(lay.fields)
        assert lay.text_fields in (("t",), ("t1", "t2", "t3", "t4"))


# =========================================================================== JSON Lines

def dialogue(did, *utts, split=None):
    obj = {"id": did, "utterances": [dict(zip(("speaker", "text", "label"), u)) for u in utts]}
    if split:
        obj["split"] = split
    return obj


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines),
                    encoding="utf-8")
    return path


def test_jsonl_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [
        dialogue("d1", ("A", "Hi!", "joy"), ("B", "Hello.", "neutral")),
        "",
        "   ",
        dialogue("d2", ("A", "Ugh", "anger"), ("A", "Fine", None), ("B", "Ok")),
    ])
    write_jsonl(tmp_path / "test.jsonl", [dialogue("t1", ("X", "Wow", "joy"), split="test")])
    c = read_jsonl(tmp_path)
    assert c.name == "jsonl" and c.label_names == ["anger", "joy", "neutral"]  # sorted, from train
    assert [d.id for d in c.splits["train"]] == ["d1", "d2"] and c.splits["val"] == []
    d2 = c.splits["train"][1]
    assert d2.labels == ["anger", None, None] and d2.speakers == ["A", "A", "B"]
    assert d2.meta["line"] == 4 and d2.meta["file"].endswith("train.jsonl")
    assert c.splits["test"][0].texts == ["Wow"]
    (tmp_path / "labels.json").write_text(json.dumps(["neutral", "joy", "anger", "fear"]))
    assert read_jsonl(tmp_path).label_names == ["neutral", "joy", "anger", "fear"]
    assert read_raw("jsonl", tmp_path, label_names=["joy", "anger", "neutral"]).label_names == \
        ["joy", "anger", "neutral"]


def test_jsonl_text_kept_verbatim(tmp_path):
    write_jsonl(tmp_path / "val.jsonl", [dialogue(7, ("A", "It\u2019s caf\u00e9\u2026", "x"))])
    (d,) = read_jsonl(tmp_path).splits["val"]
    assert d.id == "7" and d.texts == ["It\u2019s caf\u00e9\u2026"]


def test_jsonl_file(tmp_path):
    p = write_jsonl(tmp_path / "chat.jsonl", [
        dialogue("a", ("A", "x", "joy")),
        dialogue("b", ("A", "y")),
        dialogue("c", ("A", "z", "sad"), split="train"),
        dialogue("d", ("A", "w", "joy"), split="dev"),
    ])
    names = ["sad", "neutral", "joy"]
    c = read_jsonl_file(p, label_names=names)
    assert c.label_names == names
    assert {s: [d.id for d in ds] for s, ds in c.splits.items()} == {"train": ["c"], "val": ["d"],
                                                                      "test": ["a", "b"]}
    assert [d.id for d in read_jsonl_file(p, names, split="val").splits["val"]] == ["a", "b", "d"]
    raises([f"{p}:1", "unknown label 'joy'", "seen in the training dialogues", "pass label_names"],
           read_jsonl_file, p)  # names from train: [sad]
    assert read_jsonl(p, label_names=names).splits["test"][0].id == "a"
    raises(["split must be one of"], read_jsonl_file, p, split="holdout", exc=ValueError)


@pytest.mark.parametrize("line, expected", [
    ('{"id": "x", "utterances": [}', ["invalid JSON"]),
    ('[1, 2]', ["expected a JSON object"]),
    ('{"utterances": []}', ['missing "id"']),
    ('{"id": "", "utterances": []}', ['"id" must be a non-empty string']),
    ('{"id": "x"}', ["dialogue 'x'", 'missing "utterances"']),
    ('{"id": "x", "utterances": "hi"}', ["dialogue 'x'", '"utterances" must be a list']),
    ('{"id": "x", "utterances": []}', ["dialogue 'x'", "empty dialogue"]),
    ('{"id": "x", "utterances": [{"speaker": "A"}]}', ["dialogue 'x', utterance 0", 'missing "text"']),
    ('{"id": "x", "utterances": [{"text": "t"}]}', ["utterance 0", 'missing "speaker"']),
    ('{"id": "x", "utterances": [{"speaker": "A", "text": 3}]}', ['"text" must be a string']),
    ('{"id": "x", "utterances": [{"speaker": "A", "text": "t", "label": 2}]}', ['"label" must be']),
    ('{"id": "x", "utterances": ["hi"]}', ["utterance 0", "expected an object"]),
    ('{"id": "x", "split": "holdout", "utterances": [{"speaker": "A", "text": "t"}]}', ["unknown \"split\""]),
    ('{"id": "x", "split": "test", "utterances": [{"speaker": "A", "text": "t"}]}',
     ['"split": \'test\'', "the train file"]),
    ('{"id": "d1", "utterances": [{"speaker": "A", "text": "t"}]}', ["duplicate dialogue id 'd1'", ":1"]),
])
def test_jsonl_errors(tmp_path, line, expected):
    p = write_jsonl(tmp_path / "train.jsonl", [dialogue("d1", ("A", "Hi", "joy")), "", line])
    raises([f"{p}:3", *expected], read_jsonl, tmp_path)


def test_jsonl_file_errors(tmp_path):
    raises(["train.jsonl, val.jsonl, test.jsonl", str(tmp_path)], read_jsonl, tmp_path)
    raises(["does not exist"], read_jsonl, tmp_path / "missing")
    raises([str(tmp_path / "x.jsonl"), "not found"], read_jsonl_file, tmp_path / "x.jsonl")
    write_jsonl(tmp_path / "train.jsonl", [dialogue("d1", ("A", "Hi", "joy"))])
    p = write_jsonl(tmp_path / "val.jsonl", [dialogue("v1", ("A", "Hi", "anger"))])
    raises([f"{p}:1", "unknown label 'anger'", "seen in the training dialogues", "add a labels.json"],
           read_jsonl, tmp_path)
    write_jsonl(p, [dialogue("d1", ("A", "Hi", "joy"))])
    raises([f"{p}:1", "duplicate dialogue id 'd1'", "train.jsonl:1"], read_jsonl, tmp_path)
    write_jsonl(p, [])
    raises([str(p), "no dialogues"], read_jsonl, tmp_path)
    p.unlink()
    labels = tmp_path / "labels.json"
    for content, expected in (("{bad", "invalid JSON"), ('{"a": 1}', "non-empty list"),
                              ('["joy", "joy"]', "joy listed twice"), ('["joy", 3]', "non-empty strings")):
        labels.write_text(content)
        raises([str(labels), expected], read_jsonl, tmp_path)
    labels.write_text('["neutral"]')
    raises([f"{tmp_path / 'train.jsonl'}:1", "unknown label 'joy'", f"from {labels}"], read_jsonl, tmp_path)
    (tmp_path / "train.jsonl").write_bytes(b'{"id": "\xff"}\n')
    raises([str(tmp_path / "train.jsonl") + ":1", "not UTF-8"], read_jsonl, tmp_path)


# =========================================================================== read_raw

def test_read_raw(tmp_path):
    assert READERS == {"meld": read_meld, "iemocap": read_iemocap, "cosmic": read_cosmic, "jsonl": read_jsonl}
    raises(["unknown dataset reader 'friends'", "meld, iemocap, cosmic, jsonl"], read_raw, "friends", tmp_path,
           exc=ValueError)
    raises(["meld", str(tmp_path / "nope"), "does not exist"], read_raw, "meld", tmp_path / "nope")
    f = tmp_path / "train_sent_emo.csv"
    write_csv(f, [meld_row(1, "a", "A", "joy", 0, 0)])
    raises(["meld", str(f), "not a directory"], read_raw, "meld", f)
    raises(["unknown option text_layers", "it takes: media_dir"], read_raw, "meld", tmp_path, text_layers="mean",
           exc=ValueError)
    assert read_raw("meld", str(tmp_path)).splits["train"][0].labels == ["joy"]
    assert issubclass(DataError, ValueError)
