"""The CaSCLA model: shapes and masks, causality, AST, ablations, gradients,
determinism, checkpoints, a short training run, and the fused ops in use."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cascla_ext import CaSCLA, CaSCLAConfig, collate
from cascla_ext.data import load_dataset
from cascla_ext.data.synthetic import LABELS
from cascla_ext.nn import CausalInteraction
from cascla_ext.train import TrainSettings, evaluate, train
from conftest import assert_close


@pytest.fixture(scope="module")
def corpus():
    return load_dataset("synthetic")


def make_model(corpus, device="cpu", dtype=torch.float32, **overrides):
    overrides.setdefault("dropout", 0.0)
    overrides.setdefault("label_dropout", 0.0)
    modalities = overrides.pop("modalities", ("t", "a", "v"))
    cfg = CaSCLAConfig.small(input_dims={m: corpus.input_dims[m] for m in modalities},
                             clue_dim=corpus.clue_dim, modalities=modalities, **overrides)
    torch.manual_seed(0)
    return CaSCLA(cfg, list(LABELS)).to(device=device, dtype=dtype)


def make_batch(corpus, n=6, device="cpu", dtype=torch.float32, start=0):
    batch = collate(corpus.split("train")[start:start + n]).to(device)
    batch.features = {m: x.to(dtype) for m, x in batch.features.items()}
    batch.clues = batch.clues.to(dtype)
    return batch


def test_collate_pads_dialogues(corpus):
    dialogues = corpus.split("train")[:5]
    batch = collate(dialogues)
    T = max(len(d) for d in dialogues)
    assert batch.mask.shape == (5, T) and batch.clues.shape == (5, T, 6, corpus.clue_dim)
    for b, d in enumerate(dialogues):
        n = len(d)
        assert batch.mask[b, :n].all() and not batch.mask[b, n:].any()
        assert torch.equal(batch.labels[b, :n], torch.as_tensor(d.labels))
        assert (batch.labels[b, n:] == -1).all() and (batch.speakers[b, n:] == -1).all()
        assert torch.equal(batch.features["t"][b, :n], torch.as_tensor(d.features["t"]))
        assert (batch.features["t"][b, n:] == 0).all()


def test_shapes_and_loss_terms(corpus, device):
    model = make_model(corpus, device).train()
    batch = make_batch(corpus, device=device)
    out = model(batch)
    B, T = batch.mask.shape
    assert out.logits.shape == (B, T, len(LABELS))
    assert out.features.shape == (B, T, model.config.d_feature)
    assert set(out.losses) == {"ce", "ce_adv", "scla"}
    assert torch.isfinite(out.loss)
    expected = out.losses["ce"] + out.losses["scla"] + out.losses["ce_adv"]
    assert_close(out.loss, expected)


def test_padding_never_changes_real_outputs(corpus, device):
    model = make_model(corpus, device).eval()
    batch = make_batch(corpus, device=device)
    ref = model(batch).logits
    noisy = copy.copy(batch)
    pad = ~batch.mask
    noisy.features = {m: torch.where(pad.unsqueeze(-1), torch.randn_like(x) * 10, x)
                      for m, x in batch.features.items()}
    noisy.clues = torch.where(pad[..., None, None], torch.randn_like(batch.clues) * 10, batch.clues)
    out = model(noisy).logits
    assert_close(out[batch.mask], ref[batch.mask], atol=1e-5, rtol=1e-4)


def test_batch_composition_does_not_matter(corpus):
    """A dialogue's outputs are the same alone or padded in a batch with longer ones."""
    model = make_model(corpus).eval()
    dialogues = corpus.split("train")[:4]
    together = model(collate(dialogues)).logits
    for b, d in enumerate(dialogues):
        alone = model(collate([d])).logits[0]
        assert_close(together[b, : len(d)], alone, atol=1e-5, rtol=1e-4)


def test_causal_interaction_looks_only_back():
    """The interaction at utterance i never uses h or clues of utterances j > i."""
    torch.manual_seed(0)
    B, T, D = 3, 9, 12
    mod = CausalInteraction(D, 10, d_hidden=6)
    h, ci, co = torch.randn(B, T, D), torch.randn(B, T, D), torch.randn(B, T, D)
    speakers = torch.randint(0, 3, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    base = mod(h, ci, co, speakers, mask)
    for i in range(T - 1):
        h2, ci2, co2 = h.clone(), ci.clone(), co.clone()
        h2[:, i + 1:] += torch.randn(B, T - i - 1, D)
        ci2[:, i + 1:] += 1.0
        co2[:, i + 1:] -= 1.0
        out = mod(h2, ci2, co2, speakers, mask)
        assert_close(out[:, : i + 1], base[:, : i + 1])
        assert not torch.allclose(out[:, i + 1:], base[:, i + 1:])


def test_causal_masks_follow_speakers():
    from cascla_ext.nn.causal import causal_masks

    speakers = torch.tensor([[0, 1, 0, 2]])
    mask = torch.tensor([[True, True, True, False]])
    intra, inter = causal_masks(speakers, mask)
    assert intra[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert inter[0].int().tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_future_clues_never_change_earlier_features(corpus):
    """Model level: clue vectors enter only through the backward-looking
    interaction, so changing those of utterance j changes no f_i with i < j."""
    model = make_model(corpus).eval()
    batch = make_batch(corpus, n=3)
    base = model(batch).features
    j = 5
    changed = copy.copy(batch)
    changed.clues = batch.clues.clone()
    changed.clues[:, j:] += 3.0
    out = model(changed).features
    assert_close(out[:, :j], base[:, :j])
    assert not torch.allclose(out[:, j:][batch.mask[:, j:]], base[:, j:][batch.mask[:, j:]])


def test_ast_perturbation_increases_the_loss(corpus, device):
    """rho_adv = epsilon g / ||g|| is an ascent step: the CE of the
    adversarial pass is above the clean CE it was computed from."""
    model = make_model(corpus, device, use_scla=False, epsilon=0.5).train()
    batch = make_batch(corpus, device=device)
    out = model(batch)
    assert out.perturbation is not None and len(out.perturbation) == 2
    for rho, b_len in zip(out.perturbation, [batch.lengths] * 2):
        norms = rho.flatten(1).norm(dim=1)
        assert_close(norms, torch.full_like(norms, 0.5), atol=1e-5, rtol=1e-4)
        assert not rho.requires_grad
    assert out.losses["ce_adv"] > out.losses["ce"]


def test_ast_off_means_no_perturbation(corpus):
    model = make_model(corpus, use_ast=False).train()
    out = model(make_batch(corpus))
    assert out.perturbation is None and "ce_adv" not in out.losses
    model = make_model(corpus).eval()  # evaluation never perturbs
    out = model(make_batch(corpus))
    assert out.perturbation is None and "ce_adv" not in out.losses


def test_ablations_remove_exactly_their_part(corpus):
    full = make_model(corpus)
    names = {n.split(".")[0] for n, _ in full.named_parameters()}
    assert {"scla", "interaction", "clue_intra", "clue_inter"} <= names

    no_scla = make_model(corpus, use_scla=False)
    assert not any(n.startswith("scla.") for n, _ in no_scla.named_parameters())
    assert set(no_scla.train()(make_batch(corpus)).losses) == {"ce", "ce_adv"}

    no_causal = make_model(corpus, use_causal=False)
    assert not any(n.split(".")[0] in ("interaction", "clue_intra", "clue_inter")
                   for n, _ in no_causal.named_parameters())
    batch = make_batch(corpus)
    base = no_causal.eval()(batch).logits
    batch.clues = torch.randn_like(batch.clues)
    assert_close(no_causal(batch).logits, base)  # clues are not used at all

    no_ast = make_model(corpus, use_ast=False)
    assert set(no_ast.train()(make_batch(corpus)).losses) == {"ce", "scla"}
    # everything else is the same model: identical parameter sets
    assert {n for n, _ in no_ast.named_parameters()} == {n for n, _ in full.named_parameters()}


@pytest.mark.parametrize("modalities", [("t",), ("a",), ("t", "v"), ("a", "v"), ("t", "a", "v")])
def test_any_subset_of_modalities(corpus, modalities):
    model = make_model(corpus, modalities=modalities).train()
    assert model.config.use_text_augmentation == ("t" in modalities)
    out = model(make_batch(corpus))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_gradients_reach_every_parameter(corpus, device):
    model = make_model(corpus, device).train()
    out = model(make_batch(corpus, n=8, device=device))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_fused_and_reference_ops_agree(corpus):
    """The whole model with the fused ops equals it with the reference twins (float64)."""
    fused = make_model(corpus, dtype=torch.float64).train()
    ref = make_model(corpus, dtype=torch.float64, ops_backend="reference").train()
    ref.load_state_dict(fused.state_dict())
    batch = make_batch(corpus, dtype=torch.float64)
    out_f, out_r = fused(batch), ref(batch)
    for k in out_f.losses:
        assert_close(out_f.losses[k], out_r.losses[k], msg=k)
    out_f.loss.backward()
    out_r.loss.backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, q.grad, atol=1e-8, rtol=1e-6, msg=n)


def test_fused_ops_run_in_a_training_step(corpus):
    model = make_model(corpus).train()
    batch = make_batch(corpus)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(batch).loss.backward()
    names = {e.key for e in prof.key_averages()}
    for op in ("perturbed_gru", "tr_attention", "scla_loss"):
        assert f"cascla_ext::{op}" in names, op
        assert f"cascla_ext::{op}_backward" in names, op


def test_checkpoint_round_trip(corpus, tmp_path):
    model = make_model(corpus).eval()
    path = tmp_path / "model.pt"
    model.save(path, note="x")
    loaded = CaSCLA.load(path).eval()
    assert loaded.config == model.config and loaded.label_names == model.label_names
    batch = make_batch(corpus)
    assert torch.equal(loaded(batch).logits, model(batch).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a CaSCLA checkpoint"):
        CaSCLA.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaSCLA.load(tmp_path / "missing.pt")


def test_bad_config_and_batch_raise(corpus):
    with pytest.raises(ValueError, match="unknown modality 'x'"):
        CaSCLAConfig.small(modalities=("t", "x"))
    with pytest.raises(ValueError, match="eta must be in"):
        CaSCLAConfig.small(eta=2.0)
    with pytest.raises(ValueError, match="divisible by encoder_heads"):
        CaSCLAConfig.small(d_model=30, encoder_heads=4)
    model = make_model(corpus)
    batch = make_batch(corpus)
    batch.features = {"t": batch.features["t"]}
    with pytest.raises(ValueError, match="no features for modality 'a'"):
        model(batch)
    batch = make_batch(corpus)
    batch.clues = None
    with pytest.raises(ValueError, match="needs clue vectors"):
        model(batch)


def test_same_seed_same_result(corpus, tmp_path):
    cfg = make_model(corpus).config
    small = copy.copy(corpus)
    small.splits = {"train": corpus.split("train")[:48], "val": corpus.split("val")[:16]}
    settings = TrainSettings(epochs=2, batch_size=16, seed=3, progress=False)
    a = train(cfg, small, tmp_path / "a", settings)
    b = train(cfg, small, tmp_path / "b", settings)
    assert [e["val"] for e in a["epochs"]] == [e["val"] for e in b["epochs"]]
    assert [e["train"] for e in a["epochs"]] == [e["train"] for e in b["epochs"]]
    sa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_short_training_beats_majority_baseline(corpus, tmp_path):
    cfg = make_model(corpus, dropout=0.1).config
    metrics = train(cfg, corpus, tmp_path, TrainSettings(epochs=4, progress=False))
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "metrics.json").is_file()
    assert 1 <= metrics["best_epoch"] <= 4 and len(metrics["epochs"]) == 4
    model = CaSCLA.load(tmp_path / "model.pt")
    result = evaluate(model, corpus.split("test"))
    y = np.concatenate([d.labels for d in corpus.split("test")])
    majority = np.bincount(y).argmax()
    from cascla_ext.metrics import scores

    baseline = scores(y, np.full_like(y, majority), list(LABELS))["weighted_f1"]
    assert result["weighted_f1"] > baseline + 0.15, (result["weighted_f1"], baseline)


def test_fusion_gain_scales_the_gru_input(corpus):
    """fusion_gain multiplies the fused x before the GRU: default sqrt(d_fused), 1.0 = literal Eq. 6."""
    default = make_model(corpus)
    assert default.fusion_gain == pytest.approx(default.config.d_fused ** 0.5)
    literal = make_model(corpus, fusion_gain=1.0)
    literal.load_state_dict(default.state_dict())
    seen = {}
    for name, model in (("default", default), ("literal", literal)):
        handle = model.gru.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0]))
        model.eval()
        model(make_batch(corpus))
        handle.remove()
    assert_close(seen["default"], seen["literal"] * default.fusion_gain)
    with pytest.raises(ValueError, match="fusion_gain must be > 0"):
        CaSCLAConfig.small(fusion_gain=0.0)


def test_step_invariant_work_runs_once_per_forward(synthetic):
    """The clue projections and causal masks do not depend on the view: the
    clean, adversarial and textual passes share one computation of them, and
    the prepared path gives exactly what the module's own forward gives."""
    from conftest import small_config

    torch.manual_seed(0)
    model = CaSCLA(small_config(synthetic), synthetic.label_names).train()
    calls = []
    for name in ("clue_intra", "clue_inter"):
        getattr(model, name).register_forward_hook(lambda *a, name=name: calls.append(name))
    model.interaction.intra.f_e.register_forward_hook(lambda *a: calls.append("f_e"))
    out = model(collate(synthetic.split("train")[:3]))
    assert set(out.losses) == {"ce", "scla", "ce_adv"}  # three passes through the interaction
    assert sorted(calls) == ["clue_inter", "clue_intra", "f_e"]

    mod = model.interaction.eval()
    g = torch.Generator().manual_seed(1)
    B, T, D = 2, 5, mod.out.in_features // 3
    h, ci, ce = (torch.randn(B, T, D, generator=g) for _ in range(3))
    speakers = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, -1, -1]])
    mask = speakers >= 0
    torch.testing.assert_close(mod.apply_prepared(h, mod.prepare(ci, ce, speakers, mask)),
                               mod(h, ci, ce, speakers, mask), rtol=0, atol=0)
