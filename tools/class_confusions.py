"""Where one class's F1 goes: its confusions in a results table's finished runs, on validation and the hold-out.

For each row of a table that tools/reproduce_results.py trained (runs/results/FEATURES/DATASET/<row>/seed_*/),
the selected model (model.pt) predicts the validation split and the hold-out; the tool prints, as means
over the seeds, the class's share of the labels, how often it is predicted against how often it occurs,
its precision and recall, and which classes its false positives and its misses come from. It reads
validation only to describe the reported numbers, never to choose anything.

    python tools/class_confusions.py --dataset meld --features finetuned --label disgust \
        [--rows "CaSCLA (defaults);w/o SCLA"] [--out runs/results] [--data-root ../shared/data] [--json FILE]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_results as rr  # noqa: E402

SPLITS = ("val", "holdout")


def describe(cm: np.ndarray, k: int, labels: list[str]) -> dict:
    """One class's row of a (mean) confusion matrix: rows true, columns predicted."""
    support, predicted, tp = float(cm[k].sum()), float(cm[:, k].sum()), float(cm[k, k])
    others = [j for j in range(len(labels)) if j != k]
    return {"share": support / float(cm.sum()), "support": support, "predicted": predicted, "tp": tp,
            "precision": tp / predicted if predicted else 0.0, "recall": tp / support if support else 0.0,
            "f1": 2 * tp / (support + predicted) if support + predicted else 0.0,
            "false_positives_from": {labels[j]: float(cm[j, k]) for j in others},
            "misses_to": {labels[j]: float(cm[k, j]) for j in others}}


def top(counts: dict) -> str:
    """The three largest counts, largest first."""
    return ", ".join(f"{c} {v:.1f}" for c, v in sorted(counts.items(), key=lambda x: -x[1])[:3])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(rr.DATA))
    p.add_argument("--features", required=True, choices=rr.FEATURES)
    p.add_argument("--label", required=True, help="the class to describe, e.g. disgust")
    p.add_argument("--rows", default=None, help="semicolon-separated rows (default: every row with runs)")
    p.add_argument("--out", default="runs/results", help="reproduce_results.py's --out")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    cli = p.parse_args(argv)
    table = Path(cli.out) / cli.features / cli.dataset
    wanted = cli.rows.split(";") if cli.rows else [v for v in rr.ALL_VARIANTS if (table / rr.slug(v)).is_dir()]
    unknown = [r for r in wanted if r not in rr.ALL_VARIANTS]
    if unknown:
        p.error(f"--rows: unknown row {unknown[0]!r}")
    runs = {r: sorted((table / rr.slug(r)).glob("seed_*/model.pt")) for r in wanted}
    runs = {r: paths for r, paths in runs.items() if paths}
    if not runs:
        p.error(f"--out: no finished runs under {table}")
    from cascla_ext import CaSCLA
    from cascla_ext.metrics import confusion_matrix
    from cascla_ext.train import predict_dialogues

    corpus = rr.load_corpus(rr.tool_args(cli.data_root, finetune_epochs=cli.finetune_epochs), cli.dataset,
                            cli.features)
    if cli.label not in corpus.label_names:
        p.error(f"--label: {cli.dataset} has no class {cli.label!r} (it has {', '.join(corpus.label_names)})")
    k, K = corpus.label_names.index(cli.label), len(corpus.label_names)
    labels = {split: np.concatenate([d.labels for d in corpus.split(split)]) for split in SPLITS}
    result = {}
    for row, paths in runs.items():
        result[row] = {"seeds": len(paths)}
        cms = {split: [] for split in SPLITS}
        for path in paths:
            model = CaSCLA.load(path)
            for split, y in labels.items():
                pred = np.concatenate([q.argmax(-1) for q in predict_dialogues(model, corpus.split(split))])
                cms[split].append(confusion_matrix(y[y >= 0], pred[y >= 0], K))
        for split in SPLITS:
            d = result[row][split] = describe(np.mean(cms[split], axis=0), k, corpus.label_names)
            print(f"{row} ({len(paths)} seeds), {split}: {cli.label} {100 * d['share']:.1f}% of labels, "
                  f"predicted {d['predicted']:.1f} times for {d['support']:.0f}, precision {d['precision']:.2f}, "
                  f"recall {d['recall']:.2f}, F1 of the pooled counts {100 * d['f1']:.1f}; false positives from {top(d['false_positives_from'])}; "
                  f"misses to {top(d['misses_to'])}", flush=True)
    if cli.json:
        from cascla_ext._io import atomic_write_json

        atomic_write_json({"dataset": cli.dataset, "features": cli.features, "label": cli.label, "rows": result},
                          Path(cli.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
