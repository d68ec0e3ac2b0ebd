"""The config built in one place (``CaSCLAConfig.for_corpus`` over the one
preset table), a validator without side effects, the one modality helper,
and the run's data settings as a typed record (``DataSpec``)."""

from __future__ import annotations

import dataclasses
import re

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


# =========================================================================== DataSpec
from cascla_ext.data import DataSpec, FeatureOptions  # noqa: E402

#: A ``data`` entry as cascla train wrote it before DataSpec (a real dataset, fine-tuned encoder).
OLD_DATA = {"dataset": "meld", "data_seed": 0, "data_dir": "/data/meld",
            "features": {"encoder": None, "clues": "atomic", "atomic_dir": "/data/atomic", "comet": None,
                         "finetune_encoder": True, "finetune_epochs": 1, "finetune_dir": "/cache/finetuned/meld-1",
                         "audio": None, "audio_sample_rate": 16000, "visual": None, "visual_weights": None,
                         "visual_weights_sha256": None, "visual_frames": None, "visual_size": None,
                         "media_extractors": None},
            "reader_options": {"media_dir": "/data/clips"}, "preset": "base", "widths": "base", "holdout": 0.1}


def test_data_spec_round_trip_of_the_old_format():
    spec = DataSpec.from_dict(OLD_DATA)
    assert spec.to_dict() == OLD_DATA  # the format checkpoints and metrics.json have always held
    assert isinstance(spec.features, FeatureOptions) and spec.features.clues == "atomic"
    assert spec.features.may_finetune is False  # recorded settings never name a folder to write to
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dataset = "iemocap"
    # older records hold fewer entries: the rest take their defaults
    old = DataSpec.from_dict({"dataset": "synthetic"})
    assert (old.dataset, old.data_seed, old.data_dir, old.holdout) == ("synthetic", 0, None, None)
    assert old.features.to_dict() == FeatureOptions().to_dict()  # what made a record without options
    assert DataSpec.from_dict({"dataset": "jsonl", "features": {"clues": "none"}, "colour": 3}).features.clues == "none"
    for bad, expect in [(5, "'data' entry is a int"), ({"dataset": "x"}, "data['dataset'] is 'x'"),
                        ({"dataset": "meld", "holdout": 2.0}, "data['holdout'] is 2.0"),
                        ({"dataset": "meld", "features": {"finetune_dir": 3}}, "data['features']['finetune_dir']"),
                        ({"dataset": "meld", "features": {"colour": 1}}, "unknown entry 'colour'")]:
        with pytest.raises(ValueError, match=re.escape(expect)):
            DataSpec.from_dict(bad)
    assert DataSpec(reader_options={"unsafe_pickle": True, "text_layers": "mean"}).reader_options == \
        {"text_layers": "mean"}  # trusting a file is never recorded


def test_load_dataset_returns_its_spec_and_leaves_the_options_alone(synthetic):
    assert synthetic.spec == DataSpec("synthetic", features=FeatureOptions())
    again = synthetic.spec.load()
    assert again.input_dims == synthetic.input_dims and again.spec.to_dict() == synthetic.spec.to_dict()
    options = FeatureOptions(progress=False)
    held = load_dataset("synthetic", seed=1, features=options, holdout=0.2)
    assert held.spec.holdout == 0.2 and held.spec.data_seed == 1 and held.splits["holdout"]
    rebuilt = held.spec.load()
    assert [d.id for d in rebuilt.splits["holdout"]] == [d.id for d in held.splits["holdout"]]
    # the spec keeps its own copy of the options
    options.clues = "none"
    assert held.spec.features.clues == "auto"


def test_prepare_corpus_resolves_into_the_spec_not_the_options():
    from cascla_ext.data import RawCorpus, RawDialogue, prepare_corpus

    rng = np.random.default_rng(0)

    def raw(i):
        return RawDialogue(f"d{i}", ["a", "b"], ["A", "B"], ["x", "y"], features={"t": rng.random((2, 3))},
                           clues=rng.random((2, 6, 4)).astype(np.float32))

    corpus = prepare_corpus(RawCorpus("toy", ["x", "y"], {"train": [raw(0), raw(1)], "val": [raw(2)]}),
                            options := FeatureOptions(use_cache=False, progress=False))
    assert options.clues == "auto"  # not written back
    assert corpus.spec.features.clues == "data" and corpus.input_dims == {"t": 3} and corpus.clue_dim == 4


def test_a_checkpoint_records_the_spec_and_old_ones_load(tmp_path, synthetic, capsys):
    import torch

    from cascla_ext.cli import _checkpoint_data, main
    from cascla_ext.train import TrainSettings, train

    from conftest import small_config

    spec = dataclasses.replace(synthetic.spec, preset="small", widths="small")
    metrics = train(small_config(synthetic), synthetic, tmp_path / "run", TrainSettings(epochs=1, progress=False),
                    spec)
    assert metrics["data"] == spec.to_dict()
    model, back = _checkpoint_data(str(tmp_path / "run" / "model.pt"))
    assert back.to_dict() == spec.to_dict()
    # a checkpoint written before DataSpec: a plain dict of fewer entries, or none (only "dataset")
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for name, change in [("partial", lambda s: s.update(data={"dataset": "synthetic", "data_seed": 0,
                                                              "features": {"clues": "auto"}})),
                         ("none", lambda s: (s.pop("data"), s.update(dataset="synthetic")))]:
        old = dict(state)
        change(old)
        torch.save(old, tmp_path / f"{name}.pt")
        _, spec_old = _checkpoint_data(str(tmp_path / f"{name}.pt"))
        assert spec_old.dataset == "synthetic" and spec_old.data_seed == 0
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(tmp_path / f"{name}.pt"), "--split", "val", "--quiet",
                     "--json"]) == 0
        assert '"weighted_f1"' in capsys.readouterr().out
