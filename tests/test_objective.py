"""The objective's readings and options (issue 13): the balanced SCLA scale by
default (the literal Eq. 18 one field away), each term's gradient norm in the
metrics, the classifier losses for rare classes, and decision biases fitted
on the selection split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cascla_ext import CaSCLA, CaSCLAConfig, collate
from cascla_ext.cli import main
from cascla_ext.data import Corpus
from cascla_ext.train import TrainSettings, evaluate, fit_decision_bias, train
from conftest import assert_close, small_config

pytestmark = pytest.mark.usefixtures("one_thread")


def small_corpus(corpus, n_train=16, n_val=8) -> Corpus:
    splits = {"train": corpus.split("train")[:n_train], "val": corpus.split("val")[:n_val], "test": []}
    return Corpus(corpus.name, splits, corpus.label_names, corpus.input_dims, corpus.clue_dim)


def test_the_balanced_reading_is_the_default_and_the_literal_one_a_field_away(synthetic):
    assert CaSCLAConfig().scla_normalization == "balanced"
    assert CaSCLAConfig().scla_weight == 1.0  # the paper's lambda, which the balanced scale makes usable
    torch.manual_seed(0)
    batch = collate(synthetic.split("train")[:8])
    values = {}
    for reading in ("balanced", "literal"):
        torch.manual_seed(0)
        model = CaSCLA(small_config(synthetic, scla_normalization=reading, use_ast=False,
                                  use_text_augmentation=False), synthetic.label_names).eval()
        values[reading] = model(batch).losses
    valid = batch.labels[batch.mask]
    counts = torch.bincount(valid, minlength=7).double()
    mean_weight = float((len(valid) / counts[valid]).mean())  # gamma 1, P = 0 in eval mode
    assert values["literal"]["scla"].item() == pytest.approx(values["balanced"]["scla"].item() * mean_weight,
                                                             rel=1e-5)
    assert values["literal"]["ce"].item() == pytest.approx(values["balanced"]["ce"].item())
    with pytest.raises(ValueError, match="scla_normalization"):
        CaSCLAConfig(scla_normalization="paper")


def test_metrics_record_each_terms_gradient_norm(tmp_path, synthetic):
    metrics = train(small_config(synthetic), small_corpus(synthetic), tmp_path / "run",
                    TrainSettings(epochs=1, batch_size=4, progress=False))
    norms = metrics["epochs"][0]["grad_norm"]
    assert set(norms) == {"ce", "scla", "ce_adv"}
    assert all(math.isfinite(v) and v > 0 for v in norms.values())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][0]["grad_norm"] == norms


def test_grad_norms_are_the_weighted_terms_gradients_at_the_fused_features(synthetic):
    torch.manual_seed(0)
    model = CaSCLA(small_config(synthetic, scla_weight=0.5, use_ast=False), synthetic.label_names).train()
    batch = collate(synthetic.split("train")[:4])
    torch.manual_seed(1)
    out = model(batch, grad_norms=True)
    assert set(out.grad_norms) == {"ce", "scla"}
    # doubling lambda doubles the SCLA term's gradient (the same dropout masks: same seed)
    model.config.scla_weight = 1.0
    torch.manual_seed(1)
    again = model(batch, grad_norms=True)
    assert again.grad_norms["scla"] == pytest.approx(2 * out.grad_norms["scla"], rel=1e-4)
    assert again.grad_norms["ce"] == pytest.approx(out.grad_norms["ce"], rel=1e-4)


# --------------------------------------------------------------------------- classifier losses
@pytest.fixture
def logits_labels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(11, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 0, 0, 1, 1, 2, 0])


def model_with(loss: str, prior=(0.5, 0.25, 0.15, 0.1), **kw) -> CaSCLA:
    cfg = CaSCLAConfig.small(num_classes=4, input_dims={"t": 3, "a": 3, "v": 3}, clue_dim=2, classifier_loss=loss,
                             class_prior=prior, **kw)
    return CaSCLA(cfg)


def test_classifier_losses_are_their_formulas(logits_labels):
    logits, y = logits_labels
    prior = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    assert_close(model_with("ce").classifier_loss(logits, y), F.cross_entropy(logits, y))
    # logit adjustment: CE of logits + tau log prior
    assert_close(model_with("logit_adjusted", logit_adjust_tau=0.7).classifier_loss(logits, y),
                 F.cross_entropy(logits + 0.7 * prior.log(), y))
    # weighted: w_c = prior_c^-power, scaled to mean 1 under the prior
    w = prior ** -0.5
    w = w / (w * prior).sum()
    assert_close(model_with("weighted_ce").classifier_loss(logits, y), F.cross_entropy(logits, y, weight=w))
    # focal, by hand
    p = torch.softmax(logits, -1)[torch.arange(len(y)), y]
    assert_close(model_with("focal", focal_gamma=2.0).classifier_loss(logits, y),
                 (-(1 - p) ** 2 * p.log()).mean())
    assert_close(model_with("focal", focal_gamma=0.0).classifier_loss(logits, y), F.cross_entropy(logits, y))


def test_classifier_loss_settings_are_checked():
    with pytest.raises(ValueError, match="needs class_prior"):
        CaSCLAConfig.small(classifier_loss="weighted_ce")
    with pytest.raises(ValueError, match="class_prior must hold 7"):
        CaSCLAConfig.small(class_prior=(0.5, 0.5))
    with pytest.raises(ValueError, match="classifier_loss must be one of"):
        CaSCLAConfig.small(classifier_loss="hinge")
    with pytest.raises(ValueError, match="focal_gamma must be a finite number"):
        CaSCLAConfig.small(focal_gamma=float("nan"))


@pytest.mark.parametrize("loss", ["weighted_ce", "focal", "logit_adjusted"])
def test_each_classifier_loss_trains_end_to_end(tmp_path, capsys, loss):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--classifier-loss", loss]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["classifier_loss"] == loss and len(metrics["config"]["class_prior"]) == 7
    assert np.isfinite(metrics["epochs"][0]["train"]["ce"])


# --------------------------------------------------------------------------- decision biases
def test_fit_decision_bias_finds_a_better_threshold():
    rng = np.random.default_rng(0)
    y = np.array([0] * 90 + [1] * 10)
    # class 1 always scores a little below class 0: unbiased argmax never predicts it
    logp = np.stack([np.zeros(100), np.where(y == 1, -0.5, -2.0) + 0.1 * rng.standard_normal(100)], 1)
    bias, before, after = fit_decision_bias(logp, y, ["a", "b"], "macro_f1")
    assert before == pytest.approx((2 * 90 / 190 + 0) / 2)  # all predicted "a": F1 0.947 and 0
    assert after > 0.95 and bias[1] - bias[0] > 0.5
    # never worse, and zero where nothing helps
    bias, before, after = fit_decision_bias(np.log(np.eye(2)[y] * 0.98 + 0.01), y, ["a", "b"], "weighted_f1")
    assert after == before == 1.0 and not bias.any()


def test_minority_classes_and_the_minority_f1_score():
    from cascla_ext.metrics import minority_classes, summary_score

    names = ["a", "b", "c", "d"]
    # below half the uniform share (0.125), in label order
    assert minority_classes([0.5, 0.3, 0.1, 0.1], names) == ("c", "d")
    # none below it: the least frequent class
    assert minority_classes([0.3, 0.2, 0.25, 0.25], names) == ("b",)
    with pytest.raises(ValueError, match="3 classes"):
        minority_classes([0.5, 0.5], names[:3])
    result = {"weighted_f1": 0.8, "macro_f1": 0.5, "per_class_f1": {"a": 0.9, "b": 0.7, "c": 0.2, "d": 0.4}}
    assert summary_score(result, "minority_f1", ("c", "d")) == pytest.approx(0.5 * (0.8 + 0.3))
    assert summary_score(result, "mean_f1") == pytest.approx(0.65)
    with pytest.raises(ValueError, match="needs the minority classes"):
        summary_score(result, "minority_f1")
    with pytest.raises(ValueError, match="no score 'recall'"):
        summary_score(result, "recall")


def test_minority_decision_biases_raise_the_rare_class():
    rng = np.random.default_rng(1)
    y = np.array([0] * 90 + [1] * 10)
    logp = np.stack([np.zeros(100), np.where(y == 1, -0.5, -2.0) + 0.1 * rng.standard_normal(100)], 1)
    bias, before, after = fit_decision_bias(logp, y, ["a", "b"], "minority_f1", minority=("b",))
    assert before == pytest.approx(0.5 * (90 / 100 * 2 * 90 / 190 + 0))  # "b" never predicted: its F1 0
    assert after > 0.9 and bias[1] - bias[0] > 0.5


def test_decision_biases_are_fitted_on_the_selection_split_and_saved(tmp_path, synthetic):
    corpus = small_corpus(synthetic)
    metrics = train(small_config(synthetic), corpus, tmp_path / "run",
                    TrainSettings(epochs=2, batch_size=4, progress=False, decision_bias="mean_f1"))
    fitted = metrics["decision_bias"]
    assert fitted["score"] == "mean_f1" and fitted["selection_after"] >= fitted["selection_before"]
    model = CaSCLA.load(tmp_path / "run" / "model.pt")
    assert model.decision_bias.tolist() == pytest.approx(list(fitted["bias"].values()))
    # the saved model scores on the selection split what the metrics say
    again = evaluate(model, corpus.split("val"))
    assert again["weighted_f1"] == pytest.approx(metrics["selection_scores"]["weighted_f1"])
    assert 0.5 * (again["weighted_f1"] + again["macro_f1"]) == pytest.approx(fitted["selection_after"])
    with pytest.raises(ValueError, match="decision_bias must be one of"):
        TrainSettings(decision_bias="accuracy").validate()


@pytest.mark.parametrize("metric", ["macro_f1", "minority_f1"])
def test_select_metric_picks_the_epoch_with_the_best_score(tmp_path, synthetic, metric):
    from cascla_ext.metrics import minority_classes, summary_score

    corpus = small_corpus(synthetic)
    config = small_config(synthetic)
    config.class_prior = corpus.class_prior("train")
    metrics = train(config, corpus, tmp_path / "run",
                    TrainSettings(epochs=4, batch_size=4, lr=3e-3, progress=False, select_metric=metric))
    rare = minority_classes(config.class_prior, corpus.label_names)
    per_epoch = [summary_score(e["val"], metric, rare) for e in metrics["epochs"]]
    assert metrics["select_metric"] == metric
    assert metrics["best_epoch"] == 1 + int(np.argmax(per_epoch))  # the first of equal scores
    assert metrics["best_selection_score"] == pytest.approx(max(per_epoch))
    # each record names the epoch selected so far (what cascla tune's pruner reads)
    assert [e["best_epoch"] for e in metrics["epochs"]] == \
        [1 + int(np.argmax(per_epoch[:n])) for n in range(1, len(per_epoch) + 1)]
    chosen = metrics["epochs"][metrics["best_epoch"] - 1]["val"]
    assert metrics["best_val_weighted_f1"] == chosen["weighted_f1"]
    # the checkpoint is that epoch's model
    again = evaluate(CaSCLA.load(tmp_path / "run" / "model.pt"), corpus.split("val"))
    assert summary_score(again, metric, rare) == pytest.approx(max(per_epoch))
    with pytest.raises(ValueError, match="select_metric must be one of"):
        TrainSettings(select_metric="recall").validate()


def test_select_metric_flag_reaches_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--select-metric", "mean_f1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["select_metric"] == metrics["select_metric"] == "mean_f1"
    best = metrics["epochs"][0]["val"]
    assert metrics["best_selection_score"] == pytest.approx(0.5 * (best["weighted_f1"] + best["macro_f1"]))


def test_checkpoints_without_decision_biases_still_load(tmp_path, synthetic):
    model = CaSCLA(small_config(synthetic), synthetic.label_names)
    model.save(tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["state_dict"]["decision_bias"]
    torch.save(state, tmp_path / "old.pt")
    assert not CaSCLA.load(tmp_path / "old.pt").decision_bias.any()


# --------------------------------------------------------------------------- Table 5's alternative losses
@pytest.mark.parametrize("kind", ["supcon", "spcl"])
def test_the_contrastive_term_can_be_supcon_or_spcl(tmp_path, capsys, kind):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--contrastive", kind]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["contrastive"] == kind and metrics["config"]["use_scla"] is True
    record = metrics["epochs"][0]
    assert set(record["train"]) == {"loss", "ce", "ce_adv", kind} and np.isfinite(record["train"][kind])
    assert set(record["grad_norm"]) == {"ce", "ce_adv", kind} and not record["steps_without"]
    assert main(["evaluate", "--checkpoint", str(out / "model.pt"), "--split", "val", "--quiet"]) == 0


def test_contrastive_none_is_the_no_scla_ablation(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--contrastive", "none"]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["use_scla"] is False and config["contrastive"] == "scla"
    with pytest.raises(ValueError, match="contrastive must be one of"):
        CaSCLAConfig.small(contrastive="triplet")
