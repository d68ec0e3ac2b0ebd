"""Training the way researchers train (issue 15): early stopping, learning-rate
schedules from PyTorch's schedulers, mixed precision, threads, TensorBoard;
and the adversarial-training options (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cascla_ext import CaSCLA, collate
from cascla_ext.cli import main
from cascla_ext.data import Corpus
from cascla_ext.train import TrainSettings, WeightAverage, evaluate, make_scheduler, train
from conftest import small_config

pytestmark = pytest.mark.usefixtures("one_thread")


def small_corpus(corpus, n_train=12, n_val=6) -> Corpus:
    splits = {"train": corpus.split("train")[:n_train], "val": corpus.split("val")[:n_val], "test": []}
    return Corpus(corpus.name, splits, corpus.label_names, corpus.input_dims, corpus.clue_dim)


def lrs(schedule: str, total: int, warmup_ratio: float) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, schedule, total, warmup_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    assert lrs("constant", 5, 0.0) == [1.0] * 5
    linear = lrs("linear", 10, 0.0)
    assert linear[0] == pytest.approx(1.0) and linear[5] == pytest.approx(0.5) and linear[-1] == pytest.approx(0.1)
    cosine = lrs("cosine", 10, 0.0)
    assert cosine[0] == pytest.approx(1.0) and cosine[5] == pytest.approx(0.5) and 0 < cosine[-1] < 0.05
    warm = lrs("linear", 10, 0.2)  # 2 warm-up steps from 1/3, then linear decay over 8
    assert warm[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and warm[-1] == pytest.approx(1 / 8)
    assert all(b <= a + 1e-12 for a, b in zip(warm[2:], warm[3:]))


def test_settings_are_checked():
    for field, value in (("patience", 0), ("schedule", "step"), ("warmup_ratio", 1.0), ("precision", "fp8"),
                         ("threads", 0), ("ema_decay", 1.0), ("ema_decay", 0.0), ("ema_decay", True)):
        with pytest.raises(ValueError, match=f"TrainSettings: {field} must"):
            TrainSettings(**{field: value}).validate()


def test_patience_stops_early(tmp_path, synthetic, monkeypatch):
    # the selection score never improves after epoch 1
    monkeypatch.setattr("cascla_ext.train.evaluate", lambda *a, **k: {
        "weighted_f1": 0.5, "macro_f1": 0.3, "accuracy": 0.5, "per_class_f1": {}, "n": 1})
    metrics = train(small_config(synthetic), small_corpus(synthetic), tmp_path / "run",
                    TrainSettings(epochs=10, batch_size=6, progress=False, patience=2))
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3] and metrics["stopped_early"] == 3
    assert metrics["best_epoch"] == 1 and metrics["status"] == "finished"


def test_cli_training_flags_reach_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "2", "--schedule", "cosine", "--warmup-ratio",
                 "0.1", "--weight-decay", "1e-5", "--grad-clip", "0", "--patience", "3", "--precision", "bf16",
                 "--threads", "1", "--ast-norm", "utterance", "--ast-weight", "0.5", "--epsilon", "0.5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    s, c = metrics["settings"], metrics["config"]
    assert (s["schedule"], s["warmup_ratio"], s["weight_decay"], s["grad_clip"], s["patience"], s["precision"],
            s["threads"]) == ("cosine", 0.1, 1e-5, None, 3, "bf16", 1)
    assert (c["ast_norm"], c["ast_weight"], c["epsilon"]) == ("utterance", 0.5, 0.5)
    assert metrics["epochs"][1]["lr"] < metrics["epochs"][0]["lr"] < 1e-3  # cosine decay
    assert all(math.isfinite(v) for v in metrics["epochs"][-1]["train"].values())
    for bad in (["--warmup-ratio", "1"], ["--precision", "fp64"], ["--threads", "0"]):
        assert main(["train", "--out", str(tmp_path / "x"), "--quiet", *bad]) == 2
        assert bad[0] in capsys.readouterr().err


def test_cpu_runs_use_one_thread_by_default(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", "--epochs", "1"]) == 0
    assert seen == [1]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["settings"]["threads"] == 1


def test_tensorboard_is_optional(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert main(["train", "--out", str(tmp_path / "run"), "--quiet", "--epochs", "1", "--log",
                     "tensorboard"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install tensorboard" in err
        return
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", "--epochs", "1", "--log", "tensorboard"]) == 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("ast_norm", ["dialogue", "utterance"])
def test_adversarial_perturbation_norms(synthetic, ast_norm):
    torch.manual_seed(0)
    model = CaSCLA(small_config(synthetic, ast_norm=ast_norm, epsilon=0.7), synthetic.label_names).train()
    batch = collate(synthetic.split("train")[:3])
    out = model(batch)
    for rho in out.perturbation:  # (B, T, 3H) per GRU direction
        if ast_norm == "dialogue":
            norms = rho.flatten(1).norm(dim=1)
            assert torch.allclose(norms, torch.full_like(norms, 0.7), rtol=1e-4)
        else:
            norms = rho.norm(dim=2)[batch.mask]  # every real utterance gets epsilon
            assert torch.allclose(norms, torch.full_like(norms, 0.7), rtol=1e-4)


def test_weight_perturbation_is_fgm_on_the_gru_input_weights(synthetic):
    """ast_norm="weights": the adversarial features are those of the GRU with
    W_ih, b_ih moved by epsilon along the clean CE's gradient at them (each
    scaled to norm epsilon, as SACL's FGM does), in float64."""
    torch.manual_seed(0)
    cfg = small_config(synthetic, ast_norm="weights", epsilon=0.05, dropout=0.0, label_dropout=0.0,
                       use_scla=False)
    model = CaSCLA(cfg, synthetic.label_names).double().train()
    batch = collate(synthetic.split("train")[:3])
    batch = dataclasses.replace(batch, features={m: v.double() for m, v in batch.features.items()},
                                clues=None if batch.clues is None else batch.clues.double())
    out = model(batch)
    gru = model.gru
    names = [f"{p}_l0{s}" for s in ("", "_reverse") for p in ("weight_ih", "bias_ih")]
    params = [getattr(gru, n) for n in names]
    # The clean CE alone (AST off, same parameters) and its gradient at W_ih, b_ih.
    clean = CaSCLA(dataclasses.replace(cfg, use_ast=False), synthetic.label_names).double().train()
    clean.load_state_dict(model.state_dict())
    grads = torch.autograd.grad(clean(batch).losses["ce"], [getattr(clean.gru, n) for n in names])
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(0.05 * g / g.norm())
        shifted = dataclasses.replace(cfg, use_ast=False, use_scla=False)
        moved = CaSCLA(shifted, synthetic.label_names).double().train()
        moved.load_state_dict(model.state_dict())
        ce_moved = moved(batch).losses["ce"]
    assert torch.allclose(out.losses["ce_adv"].detach(), ce_moved, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(out.losses["ce"].detach(), ce_moved)  # the perturbation does something
    for rho in out.perturbation:
        assert (rho[~batch.mask] == 0).all()


def test_ast_weight_scales_the_adversarial_term(synthetic):
    batch = collate(synthetic.split("train")[:3])
    totals = {}
    for w in (1.0, 0.25):
        torch.manual_seed(0)
        model = CaSCLA(small_config(synthetic, ast_weight=w, dropout=0.0, label_dropout=0.0),
                       synthetic.label_names).train()
        out = model(batch)
        totals[w] = (out.loss, out.losses)
    (l1, t1), (l2, _) = totals[1.0], totals[0.25]
    assert torch.allclose(l1 - l2, 0.75 * t1["ce_adv"], rtol=1e-4)


def test_ast_ce_mean_keeps_the_classifier_weight_at_one(synthetic):
    """ast_ce="mean": loss = (ce + w ce_adv) / (1 + w) + lambda scla, against
    Eq. 21's sum; the terms themselves are the same."""
    batch = collate(synthetic.split("train")[:3])
    outs = {}
    for mode in ("sum", "mean"):
        torch.manual_seed(0)
        model = CaSCLA(small_config(synthetic, ast_ce=mode, ast_weight=0.5, dropout=0.0, label_dropout=0.0),
                       synthetic.label_names).train()
        outs[mode] = model(batch)
    t = outs["sum"].losses
    assert all(torch.allclose(t[k], outs["mean"].losses[k]) for k in t)
    lam = small_config(synthetic).scla_weight
    assert torch.allclose(outs["sum"].loss, t["ce"] + 0.5 * t["ce_adv"] + lam * t["scla"], rtol=1e-5)
    assert torch.allclose(outs["mean"].loss, (t["ce"] + 0.5 * t["ce_adv"]) / 1.5 + lam * t["scla"], rtol=1e-5)
    with pytest.raises(ValueError, match="ast_ce must be one of sum, mean"):
        small_config(synthetic, ast_ce="avg").validate()


def test_ast_view_off_keeps_the_adversarial_features_out_of_the_contrastive_term(synthetic):
    """ast_view=False: the SCLA term is the one without AST (no extra view),
    the adversarial cross-entropy is still there."""
    batch = collate(synthetic.split("train")[:3])
    outs = {}
    for name, extra in (("no_view", {"ast_view": False}), ("no_ast", {"use_ast": False}), ("view", {})):
        torch.manual_seed(0)
        cfg = small_config(synthetic, dropout=0.0, label_dropout=0.0, use_text_augmentation=False, **extra)
        outs[name] = CaSCLA(cfg, synthetic.label_names).train()(batch)
    assert torch.allclose(outs["no_view"].losses["scla"], outs["no_ast"].losses["scla"])
    assert not torch.allclose(outs["view"].losses["scla"], outs["no_ast"].losses["scla"])
    assert "ce_adv" in outs["no_view"].losses


def test_on_epoch_sees_each_record_and_can_stop_the_run(tmp_path, synthetic):
    seen = []

    def on_epoch(record):
        seen.append(record["epoch"])
        if record["epoch"] == 2:
            raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        train(small_config(synthetic), small_corpus(synthetic), tmp_path / "run",
              TrainSettings(epochs=5, batch_size=6, progress=False), on_epoch=on_epoch)
    assert seen == [1, 2]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == "pruned" and len(metrics["epochs"]) == 2


# ---------------------------------------------------------------------------
# Weight averaging (TrainSettings.ema_decay, --ema-decay)


def test_weight_average_is_the_bias_corrected_moving_average():
    torch.manual_seed(0)
    model, decay = torch.nn.Linear(3, 2), 0.9
    model.register_buffer("count", torch.zeros(()))
    avg = WeightAverage(model, decay)
    assert not any(p.requires_grad for p in avg.model.parameters()) and not avg.model.training
    history = []
    for t in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.count += 1
        history.append([p.detach().clone() for p in model.parameters()])
        avg.update(model)
        for j, got in enumerate(avg.model.parameters()):
            want = sum(decay ** (t - i) * (1 - decay) * w[j] for i, w in enumerate(history, 1)) / (1 - decay ** t)
            torch.testing.assert_close(got, want)
        assert float(avg.model.count) == t  # buffers are copied
    torch.testing.assert_close(list(WeightAverage(model, decay).model.parameters())[0], history[-1][0])
    # the first update copies the weights: nothing of the initial ones is left
    fresh = WeightAverage(torch.nn.Linear(3, 2), decay)
    fresh.update(model)
    for a, b in zip(fresh.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b)


def test_ema_run_evaluates_selects_and_saves_the_average(tmp_path, synthetic):
    corpus, config = small_corpus(synthetic), small_config(synthetic)
    plain = train(config, corpus, tmp_path / "plain", TrainSettings(epochs=1, batch_size=4, progress=False))
    averaged = train(config, corpus, tmp_path / "ema",
                     TrainSettings(epochs=1, batch_size=4, progress=False, ema_decay=0.7))
    assert averaged["settings"]["ema_decay"] == 0.7
    last_plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    last_ema = torch.load(tmp_path / "ema" / "last.pt", weights_only=True)
    assert last_plain["ema"] is None and last_ema["ema"]["updates"] == 3  # 12 dialogues in batches of 4
    saved = torch.load(tmp_path / "ema" / "model.pt", weights_only=True)["state_dict"]
    differs = False
    for k, trained in last_ema["model"].items():
        assert torch.equal(trained, last_plain["model"][k]), k  # the same training either way
        assert torch.equal(saved[k], last_ema["ema"]["model"][k]), k  # model.pt: the average
        differs |= not torch.equal(saved[k], trained)
    assert differs
    # the recorded scores are the saved (averaged) model's
    model = CaSCLA.load(tmp_path / "ema" / "model.pt")
    val = evaluate(model, corpus.split("val"), 4)
    assert averaged["epochs"][0]["val"]["weighted_f1"] == pytest.approx(val["weighted_f1"])
    assert plain["epochs"][0]["train"] == averaged["epochs"][0]["train"]


def test_ema_decay_flag_reaches_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--epochs", "1", "--ema-decay", "0.95"]) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"]["ema_decay"] == 0.95
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "bad"), "--quiet", "--ema-decay", "1.5"]) != 0
    assert "--ema-decay: expected a fraction in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
