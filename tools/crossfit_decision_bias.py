"""Do per-class decision biases help out of sample? Asked of the hold-out only (never validation or test).

For the trained runs of tools/reproduce_results.py (their model.pt, without biases), cross-fitted: the
hold-out dialogues in 5 folds, each fold's predictions shifted by the biases fitted on the other 4 (80%
of the hold-out, close to the whole hold-out that --decision-bias fits them on), the pooled out-of-fold
predictions scored on the whole hold-out against the same predictions without biases; 10 fold assignments
per run; biases maximising mean_f1, macro_f1 and minority_f1 (cascla_ext.metrics.summary_score) against
none. This is how each tuned preset's decision biases were chosen (cascla_ext/tuned/*.json):

    python tools/crossfit_decision_bias.py [--out runs/results] [--data-root ../shared/data] \
        [--tables finetuned/meld,frozen/meld,frozen/iemocap,finetuned/iemocap]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_results as rr

from cascla_ext import CaSCLA
from cascla_ext._io import atomic_write_json
from cascla_ext.metrics import minority_classes, scores, summary_score
from cascla_ext.train import fit_decision_bias, predict_dialogues

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out", default=str(rr.ROOT / "runs" / "results"), help="reproduce_results.py's --out")
p.add_argument("--data-root", default=str(rr.ROOT.parent / "shared" / "data"))
p.add_argument("--tables", default="finetuned/meld,frozen/meld,frozen/iemocap,finetuned/iemocap",
               help="FEATURES/DATASET pairs, comma-separated (the others in the JSON file are kept)")
cli = p.parse_args()
torch.set_num_threads(1)
result_file = Path(cli.out) / "crossfit_decision_bias.json"
out = json.loads(result_file.read_text()) if result_file.is_file() else {}
for features, ds in (t.strip().split("/") for t in cli.tables.split(",")):
    args = rr.tool_args(cli.data_root, cli.out)
    # The runs trained without decision biases: the defaults row where the preset has none.
    with_bias = rr.settings_for(args, ds, 0, "CaSCLA (defaults)", features).decision_bias != "none"
    variant = "w/o decision biases" if with_bias else "CaSCLA (defaults)"
    runs = sorted((rr.run_dir(args, features, ds, variant, 0).parent).glob("seed_*/model.pt"))
    if not runs:
        print(f"{features} {ds}: no {variant!r} runs under {cli.out}; skipped", flush=True)
        continue
    corpus = rr.load_corpus(args, ds, features)
    hold = corpus.split("holdout")
    rare = ["fear", "disgust"] if ds == "meld" else ["happy"]
    minority = minority_classes(corpus.class_prior("train"), corpus.label_names)
    res = []
    for path in runs:
        seed = int(path.parent.name.removeprefix("seed_"))
        model = CaSCLA.load(path); model.decision_bias.zero_()
        probs = predict_dialogues(model, hold, 32, "cpu")
        lp = [np.log(p + 1e-12) for p in probs]; ys = [x.labels for x in hold]
        rng = np.random.default_rng(seed)
        for rep in range(10):
            fold = rng.permutation(len(hold)) % 5
            row = {"seed": seed}
            for obj in ("none", "mean_f1", "macro_f1", "minority_f1"):
                pred, true = [], []
                for k in range(5):
                    fit = [i for i in range(len(hold)) if fold[i] != k]; test = [i for i in range(len(hold)) if fold[i] == k]
                    la = np.concatenate([lp[i] for i in fit]); ya = np.concatenate([ys[i] for i in fit])
                    lb = np.concatenate([lp[i] for i in test]); yb = np.concatenate([ys[i] for i in test])
                    bias = 0 if obj == "none" else fit_decision_bias(la[ya >= 0], ya[ya >= 0], corpus.label_names, obj,
                                                                        minority=minority)[0]
                    pred.append((lb[yb >= 0] + bias).argmax(-1)); true.append(yb[yb >= 0])
                s = scores(np.concatenate(true), np.concatenate(pred), corpus.label_names)
                row |= {f"{obj}:w": s["weighted_f1"], f"{obj}:macro": s["macro_f1"],
                        f"{obj}:mean": summary_score(s, "mean_f1"),
                        f"{obj}:minority": summary_score(s, "minority_f1", minority)}
                row |= {f"{obj}:{c}": s["per_class_f1"][c] for c in rare}
            res.append(row)
    agg = {k: round(float(np.mean([r[k] for r in res])), 4) for k in res[0] if k != "seed"}
    agg["mean_f1 wins"] = float(np.mean([r["mean_f1:mean"] > r["none:mean"] for r in res])); agg["n"] = len(res)
    out[f"{features}/{ds}"] = agg
    print(features, ds, json.dumps(agg), flush=True)
    atomic_write_json(out, result_file)
