"""The config built in one place (``CaSCLAConfig.for_corpus`` over the one
preset table), a validator without side effects, the one modality helper,
and the run's data settings as a typed record (``DataSpec``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cascla_ext.config import CaSCLAConfig
from cascla_ext.data import Corpus, Dialogue, load_dataset
from cascla_ext.modalities import MODALITIES, canonical_modality, parse_modalities

# The widths cli.py / config.py had before the preset table (the "before").
OLD_WIDTHS = {
    "small": dict(d_model=64, encoder_heads=4, encoder_ff=128, d_fused=64, d_hidden=48, d_feature=64,
                  label_embedding_dim=32, ranks={"t": 8, "a": 6, "v": 6}),
    "base": dict(d_model=256, encoder_heads=4, encoder_ff=512, d_fused=256, d_hidden=128, d_feature=256,
                 label_embedding_dim=128, ranks={"t": 16, "a": 16, "v": 16}),
    "paper": {},
}


def old_cli_config(corpus, widths, file_config=None, modalities=None, **flags) -> CaSCLAConfig:
    """What ``cascla train`` assembled before ``for_corpus``, step by step."""
    modalities = modalities or tuple(m for m in ("t", "a", "v") if m in corpus.input_dims)
    overrides = dict(file_config or {})
    overrides.update(num_classes=len(corpus.label_names), modalities=modalities,
                     input_dims={m: corpus.input_dims[m] for m in modalities}, clue_dim=corpus.clue_dim)
    overrides.update(flags)
    overrides["class_prior"] = corpus.class_prior("train")
    return CaSCLAConfig(**{**OLD_WIDTHS[widths], **overrides})


def fake_corpus(name, labels, dims, clue_dim, n=6, seed=0) -> Corpus:
    rng = np.random.default_rng(seed)

    def dialogue(i):
        k = int(rng.integers(2, 6))
        return Dialogue(f"{name}{i}", {m: rng.standard_normal((k, d)).astype(np.float32) for m, d in dims.items()},
                        np.arange(k) % 2, rng.integers(0, len(labels), k),
                        rng.standard_normal((k, 6, clue_dim)).astype(np.float32))

    splits = {s: [dialogue(i) for i in range(n)] for s in ("train", "val", "test")}
    return Corpus(name, splits, list(labels), dict(dims), clue_dim)


MELD_LIKE = ("meld", ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
             {"t": 384, "a": 88, "v": 1024}, 384)
IEMOCAP_LIKE = ("iemocap", ("happy", "sad", "neutral", "angry", "excited", "frustrated"), {"t": 384}, 1)


@pytest.mark.parametrize("kind", ["synthetic", "meld", "iemocap"])
@pytest.mark.parametrize("widths", ["small", "base", "paper"])
def test_for_corpus_is_what_the_cli_built(kind, widths):
    corpus = load_dataset("synthetic") if kind == "synthetic" else fake_corpus(
        *(MELD_LIKE if kind == "meld" else IEMOCAP_LIKE))
    assert CaSCLAConfig.for_corpus(corpus, widths) == old_cli_config(corpus, widths)
    flags = dict(use_scla=True, use_ast=False, use_causal=True, ops_backend="fused", gamma=1.5, epsilon=0.5)
    file = {"dropout": 0.2, "scla_weight": 0.3, "num_classes": 99}  # the data's own fields lose
    mods = ("t",) if kind != "meld" else ("t", "v")
    got = CaSCLAConfig.for_corpus(corpus, widths, **{**file, **flags, "modalities": mods})
    assert got == old_cli_config(corpus, widths, file, mods, **flags)
    assert got.num_classes == len(corpus.label_names) and got.input_dims == {m: corpus.input_dims[m] for m in mods}


def test_for_corpus_defaults_and_errors():
    synthetic = load_dataset("synthetic")
    assert CaSCLAConfig.for_corpus(synthetic) == CaSCLAConfig.for_corpus(synthetic, "small")
    iemocap = fake_corpus(*IEMOCAP_LIKE)
    assert CaSCLAConfig.for_corpus(iemocap).d_model == OLD_WIDTHS["base"]["d_model"]
    with pytest.raises(ValueError, match=r"dataset iemocap has no a, v features \(it has: t\)"):
        CaSCLAConfig.for_corpus(iemocap, modalities=("t", "a", "v"))
    with pytest.raises(ValueError, match="expected one of small, base, paper"):
        CaSCLAConfig.for_corpus(iemocap, "huge")


def test_the_preset_table_is_the_one_source():
    from cascla_ext import presets

    for widths, fields in OLD_WIDTHS.items():
        assert presets.preset_fields(widths) == fields
    assert CaSCLAConfig.small() == CaSCLAConfig(**OLD_WIDTHS["small"])
    assert CaSCLAConfig.base(dropout=0.3) == CaSCLAConfig(**{**OLD_WIDTHS["base"], "dropout": 0.3})
    # a preset's fields are copies: changing a config's ranks leaves the table alone
    CaSCLAConfig.small().ranks["t"] = 99
    assert CaSCLAConfig.small().ranks["t"] == 8


def test_validate_has_no_side_effects():
    cfg = CaSCLAConfig.small(modalities=("a", "v"), input_dims={"a": 4, "v": 4})
    assert cfg.use_text_augmentation is False  # normalised at construction, as before
    cfg.use_text_augmentation = True
    before = dataclasses.asdict(cfg)
    cfg.validate()  # checks, changes nothing
    assert dataclasses.asdict(cfg) == before and cfg.use_text_augmentation is True
    cfg = CaSCLAConfig.small(class_prior=[1, 1, 1, 1, 1, 1, 1])
    assert cfg.class_prior == (1.0,) * 7  # normalised at construction
    cfg.class_prior = [0.5] * 7
    cfg.validate()
    assert cfg.class_prior == [0.5] * 7
    cfg.class_prior = [0.5] * 3
    with pytest.raises(ValueError, match="class_prior must hold 7"):
        cfg.validate()


def test_one_modality_helper():
    from cascla_ext.nn.fusion import TensorRingFusion

    assert MODALITIES == ("t", "a", "v")
    assert [canonical_modality(n) for n in ("t", "text", "audio", "v", "x", 3)] == ["t", "t", "a", "v", None, None]
    assert parse_modalities(["visual", "t"]) == ("v", "t")
    with pytest.raises(ValueError, match="--modalities: unknown modality 'x'"):
        parse_modalities(["t", "x"], "--modalities")
    with pytest.raises(ValueError, match="modality 'text' given twice"):
        parse_modalities(["t", "text"])
    fusion = TensorRingFusion({"visual": 3, "text": 4}, out_dim=8, ranks=2)
    assert fusion.names == ["text", "visual"] and set(fusion.branches) == {"t", "v"}
