"""Does picking the epoch by the minority classes' score help out of sample? Asked of the hold-out only.

Training picks the epoch on the hold-out, so the hold-out cannot also judge how it is picked without
bias. This tool trains a table's defaults row again (same preset, same seeds; tools/reproduce_results.py's
settings) recording each epoch's hold-out predictions, then cross-fits the choice: the hold-out dialogues
in 5 folds, the epoch picked on 4 of them by weighted F1 (the default) or by minority F1
(--select-metric minority_f1) and its predictions on the fifth pooled over the folds; 10 fold assignments
per seed. Validation and test are never read.

    python tools/crossfit_epoch_selection.py --dataset meld --features finetuned [--seeds 0,1,2,3,4] \
        [--out runs/epoch_selection] [--data-root ../shared/data] [--jobs 2]
"""
import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_results as rr  # noqa: E402

CRITERIA = ("weighted_f1", "minority_f1")
VARIANT = "CaSCLA (defaults)"


def _args(cli) -> argparse.Namespace:
    return rr.tool_args(cli.data_root, cli.out)


def train_recording(config, corpus, out: Path, settings) -> None:
    """Train a run, saving each epoch's hold-out predictions in ``out/epoch_preds.npz`` (written last)."""
    import cascla_ext.train as T

    epochs, real = [], T.evaluate

    def spy(model, dialogues, *a, **k):  # train() scores the selection split (the hold-out) each epoch
        probs = T.predict_dialogues(model, dialogues, *a, **k)
        epochs.append(np.concatenate([p.argmax(-1) for p in probs]))
        return real(model, dialogues, *a, **k)

    T.evaluate = spy
    try:
        T.train(config, corpus, out, settings, overwrite=True)
    finally:
        T.evaluate = real
    hold = corpus.split("holdout")
    tmp = out / "epoch_preds.tmp.npz"
    np.savez(tmp, preds=np.stack(epochs[:settings.epochs]), labels=np.concatenate([d.labels for d in hold]),
             lengths=np.array([len(d.labels) for d in hold]))
    tmp.replace(out / "epoch_preds.npz")


def record_run(cli, seed: int) -> Path:
    """Train one seed of the defaults row; save each epoch's hold-out predictions (``epoch_preds.npz``)."""
    import torch

    torch.set_num_threads(1)
    args = _args(cli)
    corpus = rr.load_corpus(args, cli.dataset, cli.features)
    config = rr.make_config(corpus, VARIANT, cli.dataset, cli.features)
    settings = rr.settings_for(args, cli.dataset, seed, VARIANT, cli.features)
    out = Path(cli.out) / cli.features / cli.dataset / f"seed_{seed}"
    train_recording(config, corpus, out, settings)
    return out


def crossfit(path: Path, label_names, minority, seed: int) -> list[dict]:
    from cascla_ext.metrics import scores, summary_score

    data = np.load(path / "epoch_preds.npz")
    preds, y, lengths = data["preds"], data["labels"], data["lengths"]
    dialogue = np.repeat(np.arange(len(lengths)), lengths)
    keep = y >= 0
    preds, y, dialogue = preds[:, keep], y[keep], dialogue[keep]
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(10):
        fold = (rng.permutation(len(lengths)) % 5)[dialogue]
        row = {"seed": seed}
        for crit in CRITERIA:
            pred = np.empty_like(y)
            for k in range(5):
                fit, test = fold != k, fold == k
                per_epoch = [summary_score(scores(y[fit], p[fit], label_names), crit, minority) for p in preds]
                pred[test] = preds[int(np.argmax(per_epoch))][test]
            s = scores(y, pred, label_names)
            row |= {f"{crit}:weighted_f1": s["weighted_f1"], f"{crit}:macro_f1": s["macro_f1"],
                    f"{crit}:minority_f1": summary_score(s, "minority_f1", minority),
                    **{f"{crit}:{c}": s["per_class_f1"][c] for c in minority}}
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=tuple(rr.DATA), default="meld")
    p.add_argument("--features", choices=rr.FEATURES, default="finetuned")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(rr.ROOT / "runs" / "epoch_selection"))
    p.add_argument("--data-root", default=str(rr.ROOT.parent / "shared" / "data"))
    cli = p.parse_args()
    seeds = [int(s) for s in cli.seeds.split(",")]
    from cascla_ext.metrics import minority_classes

    corpus = rr.load_corpus(_args(cli), cli.dataset, cli.features)  # features cached before the workers start
    minority = minority_classes(corpus.class_prior("train"), corpus.label_names)
    with ProcessPoolExecutor(max_workers=cli.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(record_run, [cli] * len(seeds), seeds))
    rows = [r for path, seed in zip(paths, seeds) for r in crossfit(path, corpus.label_names, minority, seed)]
    agg = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0] if k != "seed"}
    agg["minority_f1 wins"] = float(np.mean([r["minority_f1:minority_f1"] > r["weighted_f1:minority_f1"]
                                             for r in rows]))
    agg |= {"n": len(rows), "seeds": seeds, "minority_classes": list(minority)}
    from cascla_ext._io import atomic_write_json

    atomic_write_json(agg, Path(cli.out) / cli.features / cli.dataset / "crossfit_epoch_selection.json")
    print(json.dumps(agg, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
