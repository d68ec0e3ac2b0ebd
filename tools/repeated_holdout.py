"""Compare rows of a results table on more hold-out dialogues than one hold-out has. Training data only.

IEMOCAP's hold-out is 11 dialogues, too few to see a one-point difference between two rows. This tool
draws the hold-out again with other seeds (the same 10% of the training dialogues, other dialogues:
``Corpus.with_holdout(0.1, seed=h)``), trains each row on the rest with the table's settings, records each
epoch's hold-out predictions and scores the row out of fold: the epoch picked by the preset's
select_metric on 4/5 of the hold-out dialogues, its predictions on the fifth pooled over the folds
(tools/crossfit_epoch_selection.py's cross-fit, 10 fold assignments). Frozen features only (a fine-tuned
encoder has trained on every hold-out but the fixed one). Validation and test are never read.

    python tools/repeated_holdout.py --dataset iemocap --rows "CaSCLA (defaults);w/o AST" \
        [--holdout-seeds 1,2,3,4,5] [--seeds 0,1] [--out runs/repeated_holdout] [--jobs 2]
"""
import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crossfit_epoch_selection as cf  # noqa: E402
import reproduce_results as rr  # noqa: E402

FEATURES = "frozen"


def _args(cli) -> argparse.Namespace:
    return rr.tool_args(cli.data_root)


def _corpus(cli, holdout_seed: int):
    full = rr.load_corpus(_args(cli), cli.dataset, FEATURES, holdout=None)
    return full.with_holdout(rr.HOLDOUT, seed=holdout_seed)


def record_run(cli, row: str, holdout_seed: int, seed: int) -> Path:
    """Train one row on one hold-out draw; save each epoch's hold-out predictions."""
    import torch

    torch.set_num_threads(1)
    corpus = _corpus(cli, holdout_seed)
    config = rr.make_config(corpus, row, cli.dataset, FEATURES)
    settings = rr.settings_for(_args(cli), cli.dataset, seed, row, FEATURES)
    out = Path(cli.out) / cli.dataset / rr.slug(row) / f"holdout_{holdout_seed}" / f"seed_{seed}"
    if (out / "epoch_preds.npz").is_file():
        return out
    cf.train_recording(config, corpus, out, settings)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=tuple(rr.DATA), required=True)
    p.add_argument("--rows", required=True, help="semicolon-separated rows of the table, e.g. 'CaSCLA (defaults);w/o AST'")
    p.add_argument("--holdout-seeds", default="1,2,3,4,5", help="hold-out draws (0 is the package's own)")
    p.add_argument("--seeds", default="0,1", help="training seeds per draw")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(rr.ROOT / "runs" / "repeated_holdout"))
    p.add_argument("--data-root", default=str(rr.ROOT.parent / "shared" / "data"))
    cli = p.parse_args(argv)
    rows = cli.rows.split(";")
    unknown = [r for r in rows if r not in rr.ALL_VARIANTS]
    if unknown:
        p.error(f"--rows: unknown row {unknown[0]!r}")
    try:
        hseeds = [int(s) for s in cli.holdout_seeds.split(",")]
        seeds = [int(s) for s in cli.seeds.split(",")]
    except ValueError:
        p.error("--holdout-seeds and --seeds: comma-separated integers expected")
    from cascla_ext.metrics import minority_classes

    corpus = _corpus(cli, hseeds[0])  # features cached before the workers start
    minority = minority_classes(corpus.class_prior("train"), corpus.label_names)
    criterion = rr.settings_for(_args(cli), cli.dataset, 0, rows[0], FEATURES).select_metric
    if criterion not in cf.CRITERIA:
        p.error(f"the preset picks the epoch by {criterion}; this tool cross-fits {' or '.join(cf.CRITERIA)}")
    jobs = [(r, h, s) for r in rows for h in hseeds for s in seeds]
    with ProcessPoolExecutor(max_workers=cli.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(record_run, [cli] * len(jobs), *zip(*jobs)))
    result = {"dataset": cli.dataset, "features": FEATURES, "criterion": criterion, "holdout_seeds": hseeds,
              "seeds": seeds, "rows": {}}
    per_run = {}
    for (row, h, s), path in zip(jobs, paths):
        folds = cf.crossfit(path, corpus.label_names, minority, 1000 * h + s)
        per_run[row, h, s] = float(np.mean([(f[f"{criterion}:weighted_f1"] + f[f"{criterion}:macro_f1"]) / 2
                                            for f in folds]))
    for row in rows:
        values = [per_run[row, h, s] for h in hseeds for s in seeds]
        result["rows"][row] = {"mean_f1": round(float(np.mean(values)), 4),
                               "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0}
        print(f"{row}: out-of-fold hold-out mean F1 {np.mean(values):.4f} over {len(values)} runs", flush=True)
    for row in rows[1:]:
        diff = [per_run[rows[0], h, s] - per_run[row, h, s] for h in hseeds for s in seeds]
        result["rows"][row]["paired_vs_first"] = {"mean": round(float(np.mean(diff)), 4),
                                                  "sd": round(float(np.std(diff, ddof=1)), 4),
                                                  "first_ahead": int(np.sum(np.array(diff) > 0))}
        print(f"{rows[0]} minus {row}: {np.mean(diff):+.4f} ± {np.std(diff, ddof=1):.4f} "
              f"(ahead on {int(np.sum(np.array(diff) > 0))} of {len(diff)})", flush=True)
    from cascla_ext._io import atomic_write_json

    atomic_write_json(result, Path(cli.out) / cli.dataset / "repeated_holdout.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
