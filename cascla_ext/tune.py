"""``cascla tune``: hyper-parameter search with Optuna, selecting on the hold-out.

    cascla tune --dataset D [--data-dir DIR ...] --out STUDY_DIR --trials N [--jobs J] [--epochs E]
                [--objective weighted_f1|macro_f1|mean_f1] [--space default|FILE.json] [--timeout S]

- Every trial trains on the training split less the hold-out (10% of the
  training dialogues, split off before features are extracted, as
  ``cascla train --select-on holdout`` does) and is scored on the hold-out:
  the score of the epoch ``train`` selects (the best hold-out weighted F1),
  as weighted F1, macro F1 or their mean. Validation and test are never
  touched.
- The study is ``STUDY_DIR/study.db`` (SQLite). Running the same command
  again resumes it: trials are added until ``N`` are finished (complete or
  pruned); a trial that failed (diverged, interrupted) is not counted.
- ``--jobs J`` runs J worker processes against the same database; the
  corpus is loaded (and its features cached) once, before they start.
- A median pruner stops trials whose hold-out score at an epoch is below the
  median of the finished trials' at that epoch.
- ``STUDY_DIR/best.json`` holds the best trial's settings in the shape
  ``cascla train --config`` reads: ``{"config": {...}, "settings": {...}}``.

Optuna is imported only by :func:`run` and :func:`work` (the ``[tune]``
extra); :func:`read_config_file` and :func:`load_space` need none of it.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import math
import os
import subprocess
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import minority_classes, summary_score

__all__ = ["DEFAULT_SPACE", "OBJECTIVES", "ConfigFile", "TuneError", "TuneSetup", "load_space",
           "read_config_file", "run", "work"]

#: The study's name inside study.db.
STUDY_NAME = "cascla"
#: What a trial maximises on the hold-out (at the epoch ``train`` selects).
OBJECTIVES = ("weighted_f1", "macro_f1", "mean_f1", "minority_f1")
#: The search space ``--space default`` means (the JSON format of ``--space FILE``).
DEFAULT_SPACE: dict[str, dict] = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "scla_weight": {"type": "float", "low": 0.03, "high": 3.0, "log": True},
    "gamma": {"type": "categorical", "choices": [0.5, 1.0, 1.5]},
    "epsilon": {"type": "float", "low": 0.1, "high": 3.0, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.4},
    "classifier_loss": {"type": "categorical", "choices": ["ce", "logit_adjusted", "weighted_ce"]},
    "batch_size": {"type": "categorical", "choices": [4, 8, 16, 32]},
}
#: CaSCLAConfig fields the data decides (a config file's are ignored, a space may not search them).
DATA_FIELDS = ("num_classes", "input_dims", "clue_dim", "class_prior")
#: Fields a search space may not name, and why.
NOT_SEARCHABLE = {
    **{name: "it is set from the data" for name in DATA_FIELDS},
    "modalities": "it is a set of modalities; fix it with --config",
    "ranks": "it is a per-modality dict; fix it with --config",
    "epochs": "--epochs sets it (the pruner's steps are epochs)",
    "seed": "--seed sets it",
    "select_split": "tuning always selects on the hold-out",
    "device": "--device sets it",
    "threads": "each trial runs on 1 thread on the CPU",
    "progress": "it is not a hyper-parameter",
    "tensorboard": "it is not a hyper-parameter",
}
#: TrainSettings that tune sets itself (a --config file's are replaced).
TUNE_OWN_SETTINGS = ("epochs", "seed", "select_split", "device", "threads", "progress", "tensorboard")


class TuneError(ValueError):
    """A setting, a space file or a config file is not usable: the message is one line."""


# --- config files (``cascla train --config``, ``cascla tune --config``) ---------------------------


def _field_hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _kinds(hint) -> tuple[type, ...]:
    """The JSON value types a field of this annotation accepts."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(k for arg in typing.get_args(hint) for k in _kinds(arg))
    if hint is tuple or origin is tuple or hint is list or origin is list:
        return (list, tuple)
    if hint is dict or origin is dict:
        return (dict,)
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (float, int)
    return (hint,) if isinstance(hint, type) else (object,)


def _fits(value, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in kinds or object in kinds
    return isinstance(value, kinds)


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {"NoneType": "null", "list": "a list", "tuple": "a list", "dict": "an object", "float": "a number",
             "int": "an integer", "str": "a string", "bool": "true or false"}
    out = []
    for k in kinds:
        name = names.get(k.__name__, k.__name__)
        if name not in out and not (k is int and float in kinds):
            out.append(name)
    return " or ".join(out)


def _unknown(name: str, known, what: str, why: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"unknown {what} {name!r} ({why}" + (f"; did you mean {close[0]!r}?)" if close else ")")


@dataclass
class ConfigFile:
    """A config file's overrides: CaSCLAConfig fields, TrainSettings fields, and the preset."""

    path: str
    config: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    preset: str | None = None


def read_config_file(path: str | os.PathLike, command: str = "cascla train") -> ConfigFile:
    """Read a config file: a JSON object with a ``config`` object (CaSCLAConfig
    fields), a ``settings`` object (TrainSettings fields) and optionally
    ``preset`` (small, base, paper); other keys are ignored (best.json's
    value and counts, a metrics.json's epochs). The data's own fields
    (``num_classes``, ``input_dims``, ``clue_dim``, ``class_prior``) are
    ignored too, so a run's metrics.json can be read. An unknown field or a
    value of the wrong type raises :class:`TuneError` naming the file and
    the field."""
    from .config import CaSCLAConfig
    from .train import TrainSettings

    where = f"{command}: --config {path}"
    try:
        text = Path(path).expanduser().read_text()
    except OSError as err:
        raise TuneError(f"{where}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise TuneError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TuneError(f"{where}: expected a JSON object with 'config' and 'settings', got a "
                        f"{type(data).__name__}")
    if "config" not in data and "settings" not in data:
        raise TuneError(f"{where}: holds neither a 'config' nor a 'settings' object (best.json's shape: "
                        '{"config": {...}, "settings": {...}})')
    out = ConfigFile(str(path))
    for section, cls in (("config", CaSCLAConfig), ("settings", TrainSettings)):
        values = data.get(section, {})
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise TuneError(f"{where}: {section!r} is a {type(values).__name__}, expected an object")
        hints = _field_hints(cls)
        for name, value in values.items():
            if name not in hints:
                raise TuneError(f"{where}: {_unknown(name, hints, f'{section} field', f'not a {cls.__name__} field')}")
            if section == "settings" and name == "progress":
                raise TuneError(f"{where}: settings['progress'] cannot come from a file (use --quiet)")
            if section == "config" and name in DATA_FIELDS:
                continue  # the data decides
            kinds = _kinds(hints[name])
            if not _fits(value, kinds):
                raise TuneError(f"{where}: {section}[{name!r}] is {value!r}, expected {_kind_names(kinds)}")
            getattr(out, section)[name] = value
    if out.settings.get("select_split", "val") not in ("val", "holdout"):
        raise TuneError(f"{where}: settings['select_split'] is {out.settings['select_split']!r}, expected "
                        "'val' or 'holdout'")
    preset = data.get("preset")
    if preset is not None:
        from .presets import WIDTHS

        if preset not in WIDTHS:
            raise TuneError(f"{where}: 'preset' is {preset!r}, expected one of {', '.join(WIDTHS)}")
        out.preset = preset
    return out


# --- search spaces ---------------------------------------------------------------------------------


def _check_value(name: str, value, where: str, base_config: dict, preset: str) -> None:
    """``value`` fits the field ``name`` (type and range), with the other settings at ``base_config``."""
    from .config import CaSCLAConfig
    from .presets import config_for
    from .train import TrainSettings

    config_hints, settings_hints = _field_hints(CaSCLAConfig), _field_hints(TrainSettings)
    kinds = _kinds(config_hints.get(name) or settings_hints[name])
    if not _fits(value, kinds):
        raise TuneError(f"{where}: {name!r}: {value!r} does not fit (expected {_kind_names(kinds)})")
    try:
        if name in config_hints:
            values = dict(num_classes=2, class_prior=(0.5, 0.5), **{**base_config, name: value})
            config_for(preset, **values)
        else:
            TrainSettings(**{name: value}).validate()
    except (ValueError, TypeError) as err:
        raise TuneError(f"{where}: {name!r}: {' '.join(str(err).split())}") from None


def load_space(spec: str, *, base_config: dict | None = None, preset: str = "small") -> dict[str, dict]:
    """The search space: :data:`DEFAULT_SPACE` for ``"default"``, else read from
    the JSON file ``spec``: an object mapping each name (a CaSCLAConfig or
    TrainSettings field) to ``{"type": "float", "low": L, "high": H, "log": false,
    "step": null}``, ``{"type": "int", "low": L, "high": H, "log": false, "step": 1}``
    or ``{"type": "categorical", "choices": [...]}`` (numbers, strings, true/false,
    null). Bounds and choices are checked against the field (its type and its
    valid range); anything wrong raises :class:`TuneError` in one line."""
    if spec == "default":
        space, where = DEFAULT_SPACE, "cascla tune: the default space"
    else:
        where = f"cascla tune: --space {spec}"

        def no_duplicates(pairs):
            seen = {}
            for k, v in pairs:
                if k in seen:
                    raise TuneError(f"{where}: {k!r} is given twice")
                seen[k] = v
            return seen

        try:
            text = Path(spec).expanduser().read_text()
        except OSError as err:
            raise TuneError(f"{where}: cannot read it ({err.strerror or err}); expected 'default' or a JSON "
                            "file") from None
        try:
            space = json.loads(text, object_pairs_hook=no_duplicates)
        except (json.JSONDecodeError, RecursionError) as err:
            raise TuneError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(space, dict) or not space:
            raise TuneError(f"{where}: expected a non-empty JSON object of name -> "
                            '{"type": "float"|"int"|"categorical", ...}')
    from .config import CaSCLAConfig
    from .train import TrainSettings

    known = set(_field_hints(CaSCLAConfig)) | set(_field_hints(TrainSettings))
    out = {}
    for name, dist in space.items():
        if name not in known:
            why = "not a CaSCLAConfig or TrainSettings field"
            raise TuneError(f"{where}: {_unknown(name, known, 'hyper-parameter', why)}")
        if name in NOT_SEARCHABLE:
            raise TuneError(f"{where}: {name!r} cannot be searched: {NOT_SEARCHABLE[name]}")
        if not isinstance(dist, dict):
            raise TuneError(f"{where}: {name!r} is {dist!r}, expected an object with a 'type'")
        kind = dist.get("type")
        allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
                   "categorical": {"type", "choices"}}
        if kind not in allowed:
            raise TuneError(f"{where}: {name!r}: 'type' is {kind!r}, expected 'float', 'int' or 'categorical'")
        extra = sorted(set(dist) - allowed[kind])
        if extra:
            raise TuneError(f"{where}: {name!r}: unknown key {extra[0]!r} for type {kind!r} (keys: "
                            f"{', '.join(sorted(allowed[kind]))})")
        if kind == "categorical":
            choices = dist.get("choices")
            if not isinstance(choices, list) or not choices:
                raise TuneError(f"{where}: {name!r}: 'choices' must be a non-empty list")
            for c in choices:
                if not (c is None or isinstance(c, (bool, int, float, str))):
                    raise TuneError(f"{where}: {name!r}: choice {c!r} is not a number, string, true/false or "
                                    "null")
            if len({json.dumps(c) for c in choices}) != len(choices):
                raise TuneError(f"{where}: {name!r}: 'choices' repeat")
            values = list(choices)
            out[name] = {"type": kind, "choices": list(choices)}
        else:
            number = int if kind == "int" else (int, float)
            low, high = dist.get("low"), dist.get("high")
            log, step = dist.get("log", False), dist.get("step")
            for key, v in (("low", low), ("high", high)):
                if isinstance(v, bool) or not isinstance(v, number) or not math.isfinite(v):
                    raise TuneError(f"{where}: {name!r}: {key!r} is {v!r}, expected "
                                    f"{'an integer' if kind == 'int' else 'a finite number'}")
            if not low <= high:
                raise TuneError(f"{where}: {name!r}: 'low' ({low}) is above 'high' ({high})")
            if not isinstance(log, bool):
                raise TuneError(f"{where}: {name!r}: 'log' is {log!r}, expected true or false")
            if log and not low > 0:
                raise TuneError(f"{where}: {name!r}: a log scale needs 'low' > 0, got {low}")
            if step is not None:
                if isinstance(step, bool) or not isinstance(step, number) or not step > 0 or not math.isfinite(step):
                    raise TuneError(f"{where}: {name!r}: 'step' is {step!r}, expected a positive "
                                    f"{'integer' if kind == 'int' else 'number'}")
                if log and not (kind == "int" and step == 1):
                    raise TuneError(f"{where}: {name!r}: 'step' and a log scale do not go together")
            values = [low, high] if kind == "int" else [float(low), float(high)]
            out[name] = {"type": kind, "low": values[0], "high": values[1], "log": log}
            if step is not None:
                out[name]["step"] = step
        for v in values:
            _check_value(name, v, where, base_config or {}, preset)
    return out


def suggest(trial, space: dict[str, dict]) -> dict:
    """One value per name of ``space`` from an Optuna trial."""
    out = {}
    for name, d in space.items():
        if d["type"] == "categorical":
            out[name] = trial.suggest_categorical(name, d["choices"])
        elif d["type"] == "int":
            out[name] = trial.suggest_int(name, d["low"], d["high"], step=d.get("step", 1), log=d["log"])
        else:
            out[name] = trial.suggest_float(name, d["low"], d["high"], step=d.get("step"), log=d["log"])
    return out


def split_params(params: dict) -> tuple[dict, dict]:
    """(CaSCLAConfig overrides, TrainSettings overrides) of a trial's parameters."""
    from .config import CaSCLAConfig

    config_fields = set(_field_hints(CaSCLAConfig))
    return ({k: v for k, v in params.items() if k in config_fields},
            {k: v for k, v in params.items() if k not in config_fields})


# --- the study -------------------------------------------------------------------------------------


@dataclass
class TuneSetup:
    """What one study searches; everything in :meth:`record` must be the same to resume it."""

    study_dir: Path
    trials: int
    dataset: str
    epochs: int
    seed: int
    objective: str
    space: dict
    preset: str
    data: dict                      # dataset, data_seed, data_dir, features, reader_options, holdout
    fixed_config: dict = field(default_factory=dict)
    fixed_settings: dict = field(default_factory=dict)
    device: str = "cpu"
    pruner: str = "median"
    prune_startup: int = 5
    prune_warmup: int = 1
    quiet: bool = False
    # Seeds per trial (seed, seed + 1, ...): the trial's value is the mean of
    # their hold-out scores, and the pruner sees the first seed's epochs.
    trial_seeds: int = 1

    def record(self) -> dict:
        """The settings a resumed study must share (JSON types)."""
        return json.loads(json.dumps({
            "dataset": self.dataset, "data": self.data, "epochs": self.epochs, "seed": self.seed,
            "objective": self.objective, "space": self.space, "preset": self.preset,
            "fixed_config": self.fixed_config, "fixed_settings": self.fixed_settings,
            # (only where it differs from 1, so that studies from before the option resume)
            **({"trial_seeds": self.trial_seeds} if self.trial_seeds != 1 else {})}))

    @property
    def db(self) -> Path:
        return self.study_dir / "study.db"


def _optuna():
    from ._extras import MissingExtraError, require

    try:
        optuna = require("optuna", "cascla tune", extra="tune")
    except MissingExtraError as err:
        raise TuneError(str(err)) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(optuna, setup: TuneSetup):
    return optuna.storages.RDBStorage(f"sqlite:///{setup.db.resolve()}",
                                      engine_kwargs={"connect_args": {"timeout": 60}})


def _sampler(optuna, setup: TuneSetup, salt: int):
    seed = (setup.seed * 1_000_003 + salt) % 2**32
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _pruner(optuna, setup: TuneSetup):
    if setup.pruner == "none":
        return optuna.pruners.NopPruner()
    # A trial reports at steps 1..epochs; step < n_warmup_steps is never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=setup.prune_startup, n_warmup_steps=setup.prune_warmup + 1)


def _counts(optuna, study) -> dict:
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    return {"n_trials": len(trials), "n_complete": sum(t.state == S.COMPLETE for t in trials),
            "n_pruned": sum(t.state == S.PRUNED for t in trials), "n_failed": sum(t.state == S.FAIL for t in trials),
            "n_running": sum(t.state == S.RUNNING for t in trials)}


def best_summary(optuna, study, setup: TuneSetup) -> dict | None:
    """best.json's content, or None while no trial is complete."""
    S = optuna.trial.TrialState
    complete = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE,)) if t.value is not None]
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    config, settings = split_params(best.params)
    counts = _counts(optuna, study)
    return {
        "dataset": setup.dataset, "objective": setup.objective, "select_split": "holdout",
        "value": best.value, "trial": best.number, "preset": setup.preset,
        "config": {**setup.fixed_config, **config},
        "settings": {**setup.fixed_settings, **settings, "epochs": setup.epochs},
        "params": dict(best.params),
        "n_complete": counts["n_complete"], "n_pruned": counts["n_pruned"], "n_failed": counts["n_failed"],
        "n_trials": counts["n_trials"], "study": str(setup.db), "run_dir": best.user_attrs.get("run_dir"),
        "data": setup.data, "seed": setup.seed, "trial_seeds": setup.trial_seeds,
        **{k: best.user_attrs[k] for k in ("holdout_weighted_f1", "holdout_macro_f1", "holdout_minority_f1")
           if k in best.user_attrs},
    }


def write_best(optuna, study, setup: TuneSetup) -> dict | None:
    from ._io import atomic_write_json

    best = best_summary(optuna, study, setup)
    if best is not None:
        atomic_write_json(best, setup.study_dir / "best.json")
    return best


def _format_params(params: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k} {fmt(v)}" for k, v in params.items())


def _trial_line(optuna, study, trial, setup: TuneSetup) -> str:
    S = optuna.trial.TrialState
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    epochs = len(trial.intermediate_values)
    what = f"{epochs} epoch{'s' if epochs != 1 else ''}, {seconds:.1f} s"
    if trial.state == S.COMPLETE:
        head = f"trial {trial.number} complete: hold-out {setup.objective} {trial.value:.4f}"
    elif trial.state == S.PRUNED:
        head = f"trial {trial.number} pruned after epoch {trial.last_step}"
    else:
        head = f"trial {trial.number} failed ({trial.user_attrs.get('error', 'see its metrics.json')})"
    line = f"{head} ({_format_params(trial.params)}; {what})"
    try:
        best = study.best_trial
        line += f"; best {best.value:.4f} (trial {best.number})"
    except ValueError:
        pass
    return line


class _Tickets:
    """How many trials this invocation may still start, shared by its workers
    through a file under an advisory lock (so that J workers start exactly N trials)."""

    def __init__(self, path: Path):
        self.path = path

    def reset(self, n: int) -> None:
        self.path.write_text(f"{n}\n")

    def take(self) -> bool:
        with open(self.path, "r+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                left = int(fh.read().strip() or 0)
            except ValueError:
                left = 0
            if left <= 0:
                return False
            fh.seek(0)
            fh.truncate()
            fh.write(f"{left - 1}\n")
            return True


def make_objective(optuna, setup: TuneSetup, corpus, spec) -> Callable:
    """The Optuna objective: train one trial into ``trials/<number>/``, selecting
    (and scoring) on the hold-out, reporting each epoch to the pruner."""
    from . import train as train_module
    from .config import CaSCLAConfig
    from .presets import LEARNING_RATE

    threads = 1 if setup.device == "cpu" else None
    minority = minority_classes(corpus.class_prior("train"), corpus.label_names)
    lr_default = LEARNING_RATE[setup.preset]
    try:  # before any trial: the data must have the modalities the fixed config names
        modalities = corpus.pick_modalities(setup.fixed_config.get("modalities"))
    except ValueError as err:
        raise TuneError(f"cascla tune: {err}") from None

    def objective(trial) -> float:
        params = suggest(trial, setup.space)
        config_over, settings_over = split_params(params)
        run_dir = setup.study_dir / "trials" / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("pid", os.getpid())
        seeds = [setup.seed + i for i in range(setup.trial_seeds)]
        try:
            config = CaSCLAConfig.for_corpus(corpus, setup.preset,
                                             **{**setup.fixed_config, **config_over, "modalities": modalities})
            runs = [train_module.TrainSettings(**{
                "lr": lr_default, **setup.fixed_settings, **settings_over, "epochs": setup.epochs,
                "seed": seed, "device": setup.device, "progress": False, "select_split": "holdout",
                "threads": threads, "tensorboard": False}) for seed in seeds]
            for settings in runs:
                settings.validate()
        except ValueError as err:  # a combination the space allows but the model does not
            trial.set_user_attr("error", " ".join(str(err).split()))
            return float("nan")  # recorded as failed

        import torch

        per_seed, best_epochs = [], []
        for i, settings in enumerate(runs):
            seen: dict[int, dict] = {}  # epoch -> its hold-out scores

            def on_epoch(record: dict, report: bool = i == 0) -> None:
                seen[record["epoch"]] = record["val"]
                if report:  # the pruner compares trials on the first seed's epochs, at the epoch train selected
                    selected = seen[record["best_epoch"]]
                    trial.report(summary_score(selected, setup.objective, minority), record["epoch"])
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned by cascla tune after epoch {record['epoch']}")

            out = run_dir if len(runs) == 1 else run_dir / f"seed_{settings.seed}"
            try:
                metrics = train_module.train(config, corpus, out, settings, spec, overwrite=True,
                                             on_epoch=on_epoch)
            except (train_module.TrainingDiverged, torch.cuda.OutOfMemoryError) as err:
                trial.set_user_attr("error", " ".join(str(err).split())[:300])
                return float("nan")
            per_seed.append(metrics.get("selection_scores") or metrics["epochs"][metrics["best_epoch"] - 1]["val"])
            best_epochs.append(metrics["best_epoch"])
        trial.set_user_attr("best_epoch", best_epochs[0] if len(runs) == 1 else best_epochs)
        for key in ("weighted_f1", "macro_f1", "accuracy"):
            trial.set_user_attr(f"holdout_{key}", sum(s[key] for s in per_seed) / len(per_seed))
        trial.set_user_attr("holdout_minority_f1", {c: sum(s["per_class_f1"][c] for s in per_seed) / len(per_seed)
                                                    for c in minority})
        values = [summary_score(s, setup.objective, minority) for s in per_seed]
        if len(runs) > 1:
            trial.set_user_attr("seeds", seeds)
            trial.set_user_attr("per_seed", values)
        return sum(values) / len(values)

    return objective


def work(setup: TuneSetup, corpus, spec, *, index: int = 0, deadline: float | None = None) -> None:
    """One worker: run trials against study.db while this invocation's tickets last."""
    optuna = _optuna()
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(optuna, setup),
                              pruner=_pruner(optuna, setup))
    # Each worker (and each resumption) samples from its own stream.
    study.sampler = _sampler(optuna, setup, 1009 * len(study.get_trials(deepcopy=False)) + index)
    tickets = _Tickets(setup.study_dir / ".tickets")
    objective = make_objective(optuna, setup, corpus, spec)

    def after_trial(study, trial) -> None:
        write_best(optuna, study, setup)
        if not setup.quiet:
            print(_trial_line(optuna, study, trial, setup), file=sys.stderr, flush=True)
        if not tickets.take():
            study.stop()

    if not tickets.take():
        return
    timeout = None if deadline is None else deadline - time.time()
    if timeout is not None and timeout <= 0:
        return
    study.optimize(objective, n_trials=setup.trials, timeout=timeout, callbacks=[after_trial],
                   gc_after_trial=False, show_progress_bar=False)


@contextlib.contextmanager
def _study_lock(study_dir: Path):
    from .runs import RunFolderError, folder_lock

    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(study_dir, ".tune.lock", f"cascla tune: --out {study_dir} is in use by another cascla "
                                                  "tune ({holder}); wait for it to finish"):
            yield
    except RunFolderError as err:
        raise TuneError(str(err)) from None


def _open_study(optuna, setup: TuneSetup):
    """Create the study, or load it and check it searches what this command asks."""
    study = optuna.create_study(study_name=STUDY_NAME, storage=_storage(optuna, setup), direction="maximize",
                                load_if_exists=True, sampler=_sampler(optuna, setup, 0),
                                pruner=_pruner(optuna, setup))
    mine = setup.record()
    theirs = study.user_attrs.get("setup")
    if theirs is None or not study.get_trials(deepcopy=False):  # new, or nothing to keep (a failed start)
        study.set_user_attr("setup", mine)
    elif theirs != mine:
        key = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
        show = {"data": "the data or feature options", "space": "--space", "fixed_config": "--config",
                "fixed_settings": "--config"}.get(key, f"--{key.replace('_', '-')}")
        unset = 1 if key == "trial_seeds" else None  # a record leaves out trial_seeds 1
        raise TuneError(f"cascla tune: {setup.db} holds a study with other settings ({show}: "
                        f"{json.dumps(theirs.get(key, unset))[:80]} there, {json.dumps(mine.get(key, unset))[:80]} "
                        "here); "
                        "pass the same settings to resume it, or choose another --out")
    return study


def run(setup: TuneSetup, load_corpus: Callable[[], tuple], *, jobs: int = 1, timeout: float | None = None,
        worker_command: list[str] | None = None) -> dict:
    """Run (or resume) the study: load the corpus once (``load_corpus()`` returns
    ``(corpus, spec)``, spec the run's DataSpec), then trials until ``setup.trials`` are finished,
    in-process (``jobs`` 1) or in ``jobs`` worker processes started with
    ``worker_command + ["--worker", i, "--deadline", t]``. Writes best.json and
    returns ``{"best": ..., counts}``."""
    optuna = _optuna()
    study_dir = setup.study_dir
    if study_dir.exists() and not study_dir.is_dir():
        raise TuneError(f"cascla tune: --out {study_dir} exists and is not a directory")
    with _study_lock(study_dir):
        study = _open_study(optuna, setup)
        S = optuna.trial.TrialState
        # Under the lock no other cascla tune runs this study: a running trial is a dead one's.
        for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, state=S.FAIL)
        corpus, spec = load_corpus()
        deadline = None if timeout is None else time.time() + timeout  # the trials' time, not the data's
        counts = _counts(optuna, study)
        left = setup.trials - counts["n_complete"] - counts["n_pruned"]
        failed_workers = []
        if left > 0:
            tickets = _Tickets(study_dir / ".tickets")
            tickets.reset(left)
            jobs = max(1, min(jobs, left))
            if not setup.quiet:
                print(f"cascla tune: {left} trial{'s' if left != 1 else ''} to run "
                      f"({counts['n_complete'] + counts['n_pruned']} of {setup.trials} finished), "
                      f"{jobs} worker{'s' if jobs != 1 else ''}", file=sys.stderr, flush=True)
            if jobs == 1:
                work(setup, corpus, spec, index=0, deadline=deadline)
            else:
                failed_workers = _run_workers(worker_command, jobs, deadline, setup.device)
            with contextlib.suppress(FileNotFoundError):
                (study_dir / ".tickets").unlink()
        study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(optuna, setup))
        best = write_best(optuna, study, setup)
        counts = _counts(optuna, study)
    if failed_workers:
        raise TuneError(f"cascla tune: worker {failed_workers[0][0]} exited with status {failed_workers[0][1]} "
                        f"(its error is above); the study keeps what finished: run the command again to resume")
    return {"best": best, **counts}


def _run_workers(command: list[str] | None, jobs: int, deadline: float | None, device: str) -> list[tuple]:
    if not command:
        raise TuneError("cascla tune: --jobs > 1 needs the command line to start workers with")
    import cascla_ext

    root = str(Path(cascla_ext.__file__).resolve().parent.parent)  # the workers run this same code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in
                                                                [os.environ.get("PYTHONPATH")] if p])}
    if device == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = []
    try:
        for i in range(jobs):
            extra = ["--worker", str(i)] + ([] if deadline is None else ["--deadline", repr(deadline)])
            procs.append(subprocess.Popen(command + extra, env=env))
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=30)
        raise
    return [(i, c) for i, c in enumerate(codes) if c != 0]


def format_summary(result: dict, setup: TuneSetup, train_hint: str) -> str:
    n = result["n_trials"]
    lines = [(f"study {setup.db}: {result['n_complete']} complete, {result['n_pruned']} pruned, "
              f"{result['n_failed']} failed ({n} trial{'s' if n != 1 else ''})")]
    finished = result["n_complete"] + result["n_pruned"]
    if finished < setup.trials:
        lines.append(f"{finished} of --trials {setup.trials} finished: run the same command again to add the rest")
    best = result["best"]
    if best is None:
        lines.append("no trial is complete yet: no best.json")
        return "\n".join(lines)
    lines.append(f"best hold-out {setup.objective} {best['value']:.4f} (trial {best['trial']}): "
                 f"{_format_params(best['params'])}")
    lines.append(f"wrote {setup.study_dir / 'best.json'}; train with it: {train_hint}")
    return "\n".join(lines)

