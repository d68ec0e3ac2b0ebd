"""Training and evaluation loops for CaSCLA."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as D
from ._io import atomic_torch_save, atomic_write, atomic_write_json
from .config import CaSCLAConfig
from .data import Batch, Corpus, DataSpec, Dialogue, GlobalLayout, collate
from .distributed import SCOPES
from .metrics import SUMMARY_SCORES, minority_classes, scores, summary_score
from .model import CaSCLA

__all__ = ["DECISION_BIAS_SCORES", "LAST_CHECKPOINT", "ResumeError", "TrainSettings", "TrainingDiverged",
           "TrainingStopped", "data_record", "evaluate", "fit_decision_bias", "fit_model_decision_bias",
           "predict_dialogues", "read_last", "seed_everything", "summarise_scores", "train", "train_seeds"]


def progress_bar(iterable, *, enabled: bool, **kwargs):
    """A tqdm bar over ``iterable`` where one helps: enabled, stderr a terminal
    (a log file gets the per-epoch lines instead of carriage returns), and
    tqdm installed. Otherwise the iterable itself."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def _log(message: str, bar=None) -> None:
    """One line on stderr (above the progress bar when there is one)."""
    if hasattr(bar, "write"):
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def epoch_line(record: dict, epochs: int, best_epoch: int, best: float, select_split: str) -> str:
    """The per-epoch log line: training losses by term, the selection split's
    weighted and macro F1, the best so far, and the time."""
    train = record["train"]
    terms = ", ".join(f"{k} {v:.3f}" for k, v in train.items() if k != "loss")
    loss = f"loss {train['loss']:.3f} ({terms})" if "loss" in train else "no labelled batch"
    val = record["val"]
    seconds = record["train_seconds"] + record["eval_seconds"]
    return (f"epoch {record['epoch']}/{epochs}: {loss}; {select_split} weighted F1 {100 * val['weighted_f1']:.2f}, "
            f"macro F1 {100 * val['macro_f1']:.2f}; best {100 * best:.2f} (epoch {best_epoch}); {seconds:.1f} s")


#: The columns of metrics.csv, one row per epoch (per-class F1 stays in metrics.json).
CSV_COLUMNS = ("epoch", "loss", "ce", "scla", "supcon", "spcl", "ce_adv", "val_weighted_f1", "val_macro_f1",
               "val_accuracy", "train_seconds", "eval_seconds")


def metrics_csv(epochs: list[dict]) -> str:
    """metrics.json's epochs as CSV (empty cells where a term is absent)."""
    lines = [",".join(CSV_COLUMNS)]
    for r in epochs:
        row = {"epoch": r["epoch"], **r["train"], **{f"val_{k}": r["val"][k] for k in
                                                    ("weighted_f1", "macro_f1", "accuracy")},
               "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"]}
        lines.append(",".join("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float)
                                                             else str(row[c])) for c in CSV_COLUMNS))
    return "\n".join(lines) + "\n"


#: Learning-rate schedules and precisions TrainSettings accepts.
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    """A per-step LR scheduler from PyTorch's: linear warm-up from 1/(warmup+1)
    of the rate over ``warmup_ratio`` of the steps, then constant, linear
    decay to 0 or cosine decay to 0 over the rest."""
    from torch.optim import lr_scheduler as S

    warmup = math.ceil(warmup_ratio * total_steps)
    rest = max(1, total_steps - warmup)
    if schedule == "constant":
        after = S.ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif schedule == "linear":
        after = S.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=rest)
    else:
        after = S.CosineAnnealingLR(optimizer, T_max=rest, eta_min=0.0)
    if not warmup:
        return after
    ramp = S.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return S.SequentialLR(optimizer, [ramp, after], milestones=[warmup])


#: What TrainSettings.decision_bias may maximise on the selection split.
DECISION_BIAS_SCORES = ("none", "weighted_f1", "macro_f1", "mean_f1", "minority_f1")


def fit_decision_bias(log_probs: np.ndarray, y: np.ndarray, label_names: Sequence[str], score: str = "mean_f1",
                      grid: Sequence[float] = tuple(np.arange(-3.0, 3.01, 0.25)), passes: int = 2,
                      minority: Sequence[str] | None = None) -> tuple[np.ndarray, float, float]:
    """Per-class biases b (K,) added to the log-probabilities that maximise
    ``score`` (weighted_f1, macro_f1, mean_f1, or minority_f1 over the classes
    ``minority`` names: :func:`~cascla_ext.metrics.summary_score`) of argmax(log_probs + b) on
    labelled utterances (y >= 0), by coordinate ascent over ``grid``, one
    class at a time, ``passes`` times; a change is kept only if it raises the
    score. Returns (b, score before, score after). Fit on a selection split
    (the hold-out or validation), never on test."""
    keep = y >= 0
    log_probs, y = np.asarray(log_probs, dtype=np.float64)[keep], np.asarray(y)[keep]
    K = log_probs.shape[1]

    def value(b: np.ndarray) -> float:
        return summary_score(scores(y, (log_probs + b).argmax(-1), label_names), score, minority)

    b = np.zeros(K)
    before = best = value(b)
    for _ in range(passes):
        improved = False
        for k in range(K):
            for v in grid:
                trial = b.copy()
                trial[k] = v
                s = value(trial)
                if s > best + 1e-12:
                    best, b, improved = s, trial, True
        if not improved:
            break
    return b, before, best


def fit_model_decision_bias(model: CaSCLA, dialogues: Sequence[Dialogue], score: str, batch_size: int = 32,
                            device: str | torch.device = "cpu") -> tuple[np.ndarray, float, float]:
    """Fit ``model``'s per-class decision biases on ``dialogues`` (a selection
    split) to maximise ``score`` (:func:`fit_decision_bias`; minority_f1's
    classes from the model's training prior) and set them in the model;
    returns (biases, score before, score after)."""
    minority = None
    if score == "minority_f1":
        if model.config.class_prior is None:
            raise ValueError("decision_bias minority_f1 needs the model's class_prior (the training labels' frequencies)")
        minority = minority_classes(model.config.class_prior, model.label_names)
    model.decision_bias.zero_()
    probs = predict_dialogues(model, dialogues, batch_size, device)
    y = np.concatenate([d.labels for d in dialogues])
    bias, before, after = fit_decision_bias(np.log(np.concatenate(probs) + 1e-12), y, model.label_names, score,
                                            minority=minority)
    model.decision_bias.copy_(torch.as_tensor(bias, dtype=model.decision_bias.dtype))
    return bias, before, after


class TrainingDiverged(RuntimeError):
    """A loss term, the gradient or the weights became NaN or infinite: the
    run stops (no checkpoint of the diverged model is written)."""


@dataclass
class TrainSettings:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    grad_clip: float | None = 5.0
    select_split: str = "val"  # the split that picks the best epoch ("val" or "holdout"), never "test"
    # What picks the best epoch on select_split (metrics.summary_score):
    # "weighted_f1" (the papers' metric), "macro_f1", "mean_f1", "minority_f1"
    # (the minority classes from the training labels' prior) or "accuracy".
    select_metric: str = "weighted_f1"
    # Per-class decision biases fitted on the selection split after training
    # (fit_decision_bias): "none", or the score they maximise there:
    # "weighted_f1", "macro_f1", "mean_f1" (the mean of the two) or
    # "minority_f1" (metrics.summary_score).
    decision_bias: str = "none"
    # Stop when the selection split's select_metric has not improved for this
    # many epochs (None: train all epochs; epochs stays the maximum).
    patience: int | None = None
    # Learning-rate schedule over all steps (PyTorch's schedulers): "constant",
    # "linear" (decay to 0) or "cosine" (to 0), after a linear warm-up over
    # warmup_ratio of the steps.
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    # "fp32", or autocast to "bf16" / "fp16" (fp16 with a gradient scaler);
    # the fused ops accumulate in float32 either way.
    precision: str = "fp32"
    # Weight averaging: evaluate, select and save an exponential moving
    # average of the weights (Polyak averaging, updated after every optimizer
    # step with this decay and bias-corrected as Adam's moments are, so the
    # first steps are not held back by the initial weights; WeightAverage)
    # instead of the weights as trained. None: no averaging.
    ema_decay: float | None = None
    # torch threads for the run (None: leave torch's setting).
    threads: int | None = None
    # Also write TensorBoard event files to <run>/tensorboard (needs tensorboard).
    tensorboard: bool = False
    # In a torch.distributed run (torchrun): where the SCLA loss takes its
    # batch statistics, "global" (all ranks' anchors: the single-process
    # objective) or "local" (each rank's own). Unused in one process.
    scla_scope: str = "global"

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"TrainSettings: {msg}")

        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            fail(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            fail(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float))
                                               and math.isfinite(self.grad_clip) and self.grad_clip > 0):
            fail(f"grad_clip must be a finite number > 0 or None, got {self.grad_clip!r}")
        if self.select_split == "test":
            raise ValueError("the best epoch is never selected on the test split")
        if self.select_metric not in SUMMARY_SCORES:
            fail(f"select_metric must be one of {', '.join(SUMMARY_SCORES)}, got {self.select_metric!r}")
        if self.decision_bias not in DECISION_BIAS_SCORES:
            fail(f"decision_bias must be one of {', '.join(DECISION_BIAS_SCORES)}, got {self.decision_bias!r}")
        for name in ("patience", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                fail(f"{name} must be a positive integer or None, got {value!r}")
        if self.schedule not in SCHEDULES:
            fail(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            fail(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, (int, float))
                                               and not isinstance(self.ema_decay, bool) and 0 < self.ema_decay < 1):
            fail(f"ema_decay must be a number in (0, 1) or None, got {self.ema_decay!r}")
        if self.precision not in PRECISIONS:
            fail(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.scla_scope not in SCOPES:
            fail(f"scla_scope must be one of {', '.join(SCOPES)}, got {self.scla_scope!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available on this machine")
    return torch.device(device)


def batches(dialogues: Sequence[Dialogue], batch_size: int, modalities: Sequence[str],
            shuffle: bool = False, generator: torch.Generator | None = None):
    order = (torch.randperm(len(dialogues), generator=generator).tolist() if shuffle
             else list(range(len(dialogues))))
    for start in range(0, len(order), batch_size):
        yield collate([dialogues[i] for i in order[start:start + batch_size]], modalities)


@torch.no_grad()
def predict_dialogues(model: CaSCLA, dialogues: Sequence[Dialogue], batch_size: int = 32,
                      device: str | torch.device = "cpu", progress: bool = False) -> list[np.ndarray]:
    """Class probabilities per dialogue: a list of (n_utterances, K) arrays."""
    model.eval()
    # The batches one process would form; in a distributed run each rank
    # predicts every world_size-th one and all gather them, so every
    # probability is computed exactly as in one process.
    starts = D.shard(list(enumerate(range(0, len(dialogues), batch_size))))
    done: dict[int, list[np.ndarray]] = {}
    for k, start in progress_bar(starts, enabled=progress, desc="predict", leave=False):
        batch = collate([dialogues[i] for i in range(start, min(start + batch_size, len(dialogues)))],
                        model.config.modalities)
        probs = model.predict(batch.to(device)).cpu().numpy()
        done[k] = [probs[b, :n] for b, n in enumerate(batch.lengths.tolist())]
    if D.is_distributed():
        done = {k: v for part in D.all_gather_objects(done) for k, v in part.items()}
    return [p for k in sorted(done) for p in done[k]]


def evaluate(model: CaSCLA, dialogues: Sequence[Dialogue], batch_size: int = 32,
             device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Scores of ``model`` on ``dialogues`` (utterances with a label)."""
    probs = predict_dialogues(model, dialogues, batch_size, device, progress)
    y_true = np.concatenate([d.labels for d in dialogues])
    y_pred = np.concatenate([p.argmax(-1) for p in probs])
    keep = y_true >= 0
    return scores(y_true[keep], y_pred[keep], model.label_names)


def _check_finite(what: str, value: float, epoch: int, step: int, steps: int) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"training diverged at epoch {epoch}, step {step} of {steps}: {what} is {value} "
                               "(try a lower --lr, or check the data and the loss weights)")


class WeightAverage:
    """The exponential moving average of a model's weights that
    ``TrainSettings.ema_decay`` asks for. ``model``: a copy of the trained
    model holding the average (in eval mode, without gradients); call
    :meth:`update` after each optimizer step. The average is bias-corrected
    (Adam's correction): after t steps it is
    ``sum_i d^(t-i) w_i (1 - d) / (1 - d^t)``, so the first step copies the
    weights. Buffers are copied, not averaged."""

    def __init__(self, model: CaSCLA, decay: float):
        self.decay, self.updates = float(decay), 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: CaSCLA) -> None:
        self.updates += 1
        weight = (1 - self.decay) / (1 - self.decay ** self.updates)  # of the new weights
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), weight)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.model.load_state_dict(state["model"])


class TrainingStopped(RuntimeError):
    """SIGTERM (``stop_on_sigterm``): the run finished its current step,
    wrote ``last.pt`` and stopped; ``cascla train --resume RUN_DIR`` continues it."""


class ResumeError(ValueError):
    """``--resume``: the run folder has no usable ``last.pt``; the message says why."""


#: The resumable state a run writes beside model.pt after every epoch (and on SIGTERM).
LAST_CHECKPOINT = "last.pt"
LAST_FORMAT = 1


def read_last(run_dir: str | os.PathLike) -> dict:
    """The state in ``run_dir/last.pt``, checked, for ``train(..., resume=...)``.
    In a distributed run rank 0 reads it and every rank gets it (the folder
    need only exist where rank 0 runs); an unusable file raises
    :class:`ResumeError` on every rank."""
    state, error = None, None
    if D.rank() == 0:
        try:
            state = _read_last(Path(run_dir).expanduser())
        except ResumeError as err:
            error = err
    D.agree(error)
    return D.broadcast_object(state)


def _read_last(run_dir: Path) -> dict:
    path = run_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise ResumeError(f"--resume {run_dir}: there is no {LAST_CHECKPOINT} to resume from (a run writes it "
                          "after its first epoch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file
        raise ResumeError(f"--resume {run_dir}: {path.name} is not readable ({err})") from None
    if not isinstance(state, dict) or state.get("format") != LAST_FORMAT:
        raise ResumeError(f"--resume {run_dir}: {path.name} is not a cascla resume state")
    try:
        status = json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "finished":
        raise ResumeError(f"--resume {run_dir}: the run has finished (metrics.json); there is nothing to resume")
    if state["world_size"] != D.world_size():
        raise ResumeError(f"--resume {run_dir}: the run was trained by {state['world_size']} processes, this one "
                          f"has {D.world_size()}; resume it with as many (torchrun --nproc-per-node ...)")
    return state


def data_record(data: DataSpec | dict | None, corpus: Corpus) -> dict:
    """The ``data`` entry a run records (checkpoints, last.pt, metrics.json,
    summary.json): ``data``'s (a :class:`DataSpec`, or a dict in its format),
    else the corpus's own spec, else just its name."""
    if data is None:
        data = corpus.spec or DataSpec(dataset=corpus.name)
    elif isinstance(data, dict):
        data = DataSpec.from_dict(data)
    return data.to_dict()


def train(config: CaSCLAConfig, corpus: Corpus, out_dir: str | os.PathLike,
          settings: TrainSettings, data: DataSpec | dict | None = None, *, overwrite: bool = False,
          on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None,
          stop_on_sigterm: bool = False) -> dict:
    """Train on corpus' train split, pick the epoch with the best weighted F1
    on ``settings.select_split`` (validation by default, never the test
    split), write ``model.pt`` (that epoch) and ``metrics.json`` to
    ``out_dir``. ``data`` (a :class:`DataSpec`: the dataset and feature
    settings; default ``corpus.spec``) goes into the checkpoint so that
    ``cascla evaluate``/``predict`` rebuild the same features. Returns the
    metrics.

    The run folder is claimed for the run (:func:`cascla_ext.runs.claim_run_dir`:
    a second run into it fails, a finished run is not overwritten unless
    ``overwrite``). ``metrics.json`` carries ``status`` (running, finished,
    failed, interrupted, stopped) and names the epoch of the checkpoint beside it
    (``checkpoint``); it is written before each new checkpoint, and again
    when a run stops early, so the two describe the same epoch. A loss term,
    gradient or weight that is not finite stops the run with
    :class:`TrainingDiverged` before any checkpoint of that model is written.

    After every epoch ``last.pt`` holds what continuing needs (model,
    optimizer, scheduler, the random states of every rank, the position in
    the batch order, the metrics so far); ``resume`` (:func:`read_last` of
    the folder) continues from it, to the same model and metrics as a run
    without the interruption (bitwise on the CPU, with the same number of
    processes). ``stop_on_sigterm``: SIGTERM ends the current step, writes
    ``last.pt`` and raises :class:`TrainingStopped`.

    In a ``torch.distributed`` run (every rank calls this; docs/distributed.md)
    the model is wrapped in DistributedDataParallel, each global batch of
    ``settings.batch_size`` dialogues is split across the ranks, the loss
    terms are normalised over the global batch (so a step is the
    single-process step), evaluation is sharded and gathered, and rank 0
    alone writes files.

    ``on_epoch(record)`` is called after each epoch's record (its ``val``
    scores are the selection split's; its ``best_epoch`` the epoch selected
    so far, by ``settings.select_metric``) is written; an exception it raises
    (e.g. a hyper-parameter search pruning the run) ends training like any
    other, with the metrics saying so.

    Batches with one labelled utterance train on the cross-entropy terms
    alone (the SCLA loss needs two samples), batches with none are skipped;
    both are counted per epoch (``steps``, ``steps_without``).
    """
    from .runs import claim_run_dir

    settings.validate()
    config.validate()
    data_info = data_record(data, corpus)
    device = resolve_device(settings.device)
    if D.world_size() > settings.batch_size:
        raise ValueError(f"--batch-size {settings.batch_size} is the global batch (dialogues per step over all "
                         f"processes): expected at least the number of processes, {D.world_size()}")
    train_set, val_set = corpus.split("train"), corpus.split(settings.select_split)
    with D.on_rank_zero(lambda: claim_run_dir(out_dir, overwrite=overwrite or resume is not None)):
        with _sigterm_flag(stop_on_sigterm) as stop:
            return _train(config, corpus, Path(out_dir).expanduser(), settings, data_info, device, train_set,
                          val_set, on_epoch, resume, stop)


@contextlib.contextmanager
def _sigterm_flag(enabled: bool):
    """A dict whose "set" turns True on SIGTERM while the block runs (main thread only)."""
    flag = {"set": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["set"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rank_share(chosen: list[Dialogue]) -> list[Dialogue]:
    """This rank's dialogues of a global batch (all of them in one process).
    A rank left without any (a last batch smaller than the world) takes the
    first one with every label hidden: it joins the step's collectives and
    contributes nothing."""
    if not D.is_distributed():
        return chosen
    mine = D.shard(chosen)
    return mine or [dataclasses.replace(chosen[0], labels=np.full(len(chosen[0]), -1, dtype=np.int64))]


def _rank_batch(chosen: list[Dialogue], modalities: Sequence[str]) -> Batch:
    """This rank's batch of a global batch (:func:`_rank_share`, collated),
    with its place in the global batch (``global_layout``: its rows, the
    global batch's size and padded length), so that dropout draws the masks
    one process draws for the global batch (docs/distributed.md). The rank
    that takes the first dialogue with its labels hidden takes its row."""
    batch = collate(_rank_share(chosen), modalities)
    if not D.is_distributed():
        return batch
    rows = D.shard_rows(len(chosen))
    if rows.start >= len(chosen):
        rows = slice(0, 1)
    return dataclasses.replace(batch, global_layout=GlobalLayout(rows, len(chosen), max(map(len, chosen))))


def _train(config, corpus, out_dir, settings, data_info, device, train_set, val_set, on_epoch=None,
           resume=None, stop=None) -> dict:
    rank, world = D.rank(), D.world_size()
    writes = rank == 0  # rank 0 alone writes files and prints
    progress = settings.progress and (writes or bool(os.environ.get("CASCLA_LOG_ALL_RANKS")))
    stop = stop if stop is not None else {"set": False}
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    # Every rank the same seed: each draws the global batch's dropout masks
    # from the same stream (cascla_ext.nn.dropout), the single-process one.
    seed_everything(settings.seed)
    model = CaSCLA(config, corpus.label_names).to(device)
    if resume is not None:
        model.load_state_dict(resume["model"])
    # What is evaluated, selected and saved: the trained weights or their average.
    ema = WeightAverage(model, settings.ema_decay) if settings.ema_decay else None
    if ema is not None and resume is not None:
        ema.load_state_dict(resume["ema"])
    judged = ema.model if ema is not None else model
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        import torch.distributed as dist

        # With NCCL the SCLA loss's all-reduce (in the backward) gets its own
        # communicator, so it cannot interleave with DDP's gradient buckets.
        model.distribute(settings.scla_scope, dist.new_group() if device.type == "cuda" else None)
        # With the local scope a rank may leave the contrastive term's
        # parameters unused (fewer than 2 labelled utterances of its own);
        # with the global one the model keeps every parameter in the graph.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=config.use_scla and settings.scla_scope == "local")
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    amp_dtype = PRECISIONS[settings.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    board = _tensorboard(out_dir) if settings.tensorboard and writes else None
    generator = torch.Generator().manual_seed(settings.seed)
    metrics = {
        "dataset": corpus.name,
        "seed": settings.seed,
        "settings": {k: v for k, v in vars(settings).items() if k != "progress"},
        "config": config.to_dict(),
        "label_names": corpus.label_names,
        "data": data_info,
        "select_split": settings.select_split,
        "world_size": world,
        "status": "running",
        "epochs": [],
        "best_epoch": None,
        "best_val_weighted_f1": None,
        "select_metric": settings.select_metric,
        "best_selection_score": None,
        "checkpoint": None,
    }
    steps_per_epoch = (len(train_set) + settings.batch_size - 1) // settings.batch_size
    scheduler = make_scheduler(optimizer, settings.schedule, settings.epochs * steps_per_epoch,
                               settings.warmup_ratio)
    start = time.perf_counter()
    # The classes select_metric "minority_f1" scores (from the training labels' prior).
    minority = (minority_classes(config.class_prior or corpus.class_prior("train"), corpus.label_names)
                if settings.select_metric == "minority_f1" else None)
    saved: dict | None = None  # the checkpoint on disk: {"file", "epoch", "val_weighted_f1"}
    best_state: dict | None = None  # its weights (for the decision biases)
    first_epoch, partial = 1, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        generator.set_state(resume["generator"])
        metrics, saved, best_state = resume["metrics"], resume["saved"], resume["best_model"]
        metrics["status"] = "running"
        metrics.pop("error", None)
        first_epoch, partial = resume["epoch"], resume["partial"]
        D.set_rng_state(resume["rng"][rank])
    previous_seconds = metrics.get("total_seconds", 0.0)

    def write_metrics() -> None:
        metrics["total_seconds"] = previous_seconds + time.perf_counter() - start
        if writes:
            atomic_write(out_dir / "metrics.csv", lambda fh: fh.write(metrics_csv(metrics["epochs"])))
            atomic_write_json(metrics, out_dir / "metrics.json")

    def write_last(epoch: int, epoch_generator: torch.Tensor, acc: dict | None) -> None:
        """last.pt: continue at ``epoch`` (``acc``: its steps so far, None at its start)."""
        rngs = D.all_gather_objects(D.rng_state())
        metrics["total_seconds"] = previous_seconds + time.perf_counter() - start
        if writes:
            atomic_torch_save({
                "format": LAST_FORMAT, "world_size": world, "epoch": epoch, "generator": epoch_generator,
                "partial": acc, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "metrics": metrics, "saved": saved,
                "best_model": best_state, "ema": ema.state_dict() if ema is not None else None,
                "config": config.to_dict(), "label_names": corpus.label_names,
                "settings": metrics["settings"], "data": data_info}, out_dir / LAST_CHECKPOINT)

    def stopped(epoch: int, step: int) -> TrainingStopped:
        where = f"epoch {epoch}, step {step} of {steps_per_epoch}" if step else f"epoch {epoch - 1}"
        return TrainingStopped(f"stopped by SIGTERM after {where}; {out_dir / LAST_CHECKPOINT} holds the run: "
                               f"continue it with cascla train --resume {out_dir}")

    epoch_bar = progress_bar(range(first_epoch, settings.epochs + 1), enabled=progress, desc="epochs")
    try:
        for epoch in epoch_bar:
            net.train()
            epoch_generator = generator.get_state()
            order = torch.randperm(len(train_set), generator=generator).tolist()
            acc = partial or {"step": 0, "sums": {}, "counts": {}, "without": {}, "norms": {}, "seconds": 0.0}
            partial = None
            sums, counts, without, norms = acc["sums"], acc["counts"], acc["without"], acc["norms"]
            t0 = time.perf_counter() - acc["seconds"]
            step = acc["step"]
            step_bar = progress_bar(range(step + 1, steps_per_epoch + 1), enabled=progress,
                                    total=steps_per_epoch, initial=step, desc=f"epoch {epoch}", leave=False)
            # The gradient norm of each term at the shared features, on about
            # eight steps an epoch (an extra backward per term on those steps).
            every = max(1, steps_per_epoch // 8)
            expected = _expected_terms(config)
            for step in step_bar:
                chosen = [train_set[i] for i in order[(step - 1) * settings.batch_size:step * settings.batch_size]]
                batch = _rank_batch(chosen, config.modalities).to(device)
                label_counts = None
                if world > 1:
                    label_counts = D.global_label_counts(batch.labels, batch.mask, config.num_classes)
                    if not label_counts.sum() > 0:  # skipped on every rank alike
                        without["labels"] = without.get("labels", 0) + 1
                        _end_step(acc, step, sums, counts, without, norms, t0)
                        if D.any_rank(stop["set"], device):
                            write_last(epoch, epoch_generator, acc)
                            raise stopped(epoch, step)
                        continue
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = net(batch, grad_norms=(step - 1) % every == 0, label_counts=label_counts)
                for k, v in out.grad_norms.items():
                    norms.setdefault(k, []).append(v)
                if out.loss is None:  # no labelled utterance in the batch
                    without["labels"] = without.get("labels", 0) + 1
                    _end_step(acc, step, sums, counts, without, norms, t0)
                    if stop["set"]:
                        write_last(epoch, epoch_generator, acc)
                        raise stopped(epoch, step)
                    continue
                for term in expected - set(out.losses):
                    without[term] = without.get(term, 0) + 1
                values = _step_values(out, config, world)
                for k, v in values.items():
                    _check_finite(f"the {k} loss" if k != "loss" else "the total loss", v, epoch, step,
                                  steps_per_epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()
                for p in out.no_grad:
                    p.grad = None
                if settings.grad_clip:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                    if not scaler.is_enabled():  # with fp16 the scaler skips steps with inf gradients
                        _check_finite("the gradient norm", float(norm), epoch, step, steps_per_epoch)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                if hasattr(step_bar, "set_postfix"):
                    step_bar.set_postfix(loss=f"{values['loss']:.3f}")
                _end_step(acc, step, sums, counts, without, norms, t0)
                if D.any_rank(stop["set"], device):
                    write_last(epoch, epoch_generator, acc)
                    raise stopped(epoch, step)
            bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                raise TrainingDiverged(f"training diverged in epoch {epoch}: the weights {bad[0]}"
                                       f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} are not "
                                       "finite (try a lower --lr)")
            train_time = time.perf_counter() - t0
            val = evaluate(judged, val_set, settings.batch_size, device)
            record = {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train": {k: v / counts[k] for k, v in sums.items()},
                "steps": step,
                "steps_without": without,
                # the mean L2 norm of each weighted term's gradient at the fused features
                "grad_norm": {k: sum(v) / len(v) for k, v in norms.items()},
                "val": {k: val[k] for k in ("weighted_f1", "macro_f1", "accuracy", "per_class_f1", "n")},
                "train_seconds": train_time,
                "eval_seconds": time.perf_counter() - t0 - train_time,
            }
            metrics["epochs"].append(record)
            score = summary_score(val, settings.select_metric, minority)
            # (a run resumed from a last.pt of before select_metric selected on weighted F1)
            best = metrics.get("best_selection_score", metrics["best_val_weighted_f1"])
            if best is None or score > best:
                metrics["best_epoch"], metrics["best_val_weighted_f1"] = epoch, val["weighted_f1"]
                metrics["best_selection_score"] = score
                # The metrics name the checkpoint's epoch before it is written.
                metrics["checkpoint"] = {"file": "model.pt", "epoch": epoch}
                write_metrics()
                if writes:
                    judged.save(out_dir / "model.pt", dataset=corpus.name, epoch=epoch, seed=settings.seed,
                                data=data_info)
                saved = {"epoch": epoch, "val_weighted_f1": val["weighted_f1"]}
                best_state = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
            record["best_epoch"] = metrics["best_epoch"]  # the epoch selected so far (on_epoch reads it)
            if progress:
                _log(epoch_line(record, settings.epochs, metrics["best_epoch"], metrics["best_val_weighted_f1"],
                                settings.select_split), epoch_bar)
            if board is not None:
                for k, v in {**{f"train/{k}": v for k, v in record["train"].items()},
                             **{f"{settings.select_split}/{k}": record["val"][k]
                                for k in ("weighted_f1", "macro_f1", "accuracy")},
                             **{f"grad_norm/{k}": v for k, v in record["grad_norm"].items()}}.items():
                    board.add_scalar(k, v, epoch)
                board.flush()
            write_metrics()
            write_last(epoch + 1, generator.get_state(), None)
            if on_epoch is not None:
                on_epoch(record)
            if settings.patience is not None and epoch - metrics["best_epoch"] >= settings.patience:
                metrics["stopped_early"] = epoch  # no better selection score for `patience` epochs
                if progress:
                    _log(f"stopping early after epoch {epoch}: no better {settings.select_split} {settings.select_metric} "
                         f"for {settings.patience} epochs", epoch_bar)
                break
            if epoch < settings.epochs and D.any_rank(stop["set"], device):
                raise stopped(epoch + 1, 0)
        if settings.decision_bias != "none" and saved:
            # Refit the biases of the selected epoch's model on the selection split.
            judged.load_state_dict(best_state)
            bias, before, after = fit_model_decision_bias(judged, val_set, settings.decision_bias,
                                                          settings.batch_size, device)
            metrics["decision_bias"] = {"score": settings.decision_bias, "bias": dict(zip(corpus.label_names,
                                                                                           bias.tolist())),
                                        "selection_before": before, "selection_after": after}
            final = evaluate(judged, val_set, settings.batch_size, device)
            metrics["selection_scores"] = {k: final[k] for k in ("weighted_f1", "macro_f1", "accuracy",
                                                                  "per_class_f1", "n")}
            write_metrics()
            if writes:
                judged.save(out_dir / "model.pt", dataset=corpus.name, epoch=saved["epoch"], seed=settings.seed,
                            data=data_info)
    except BaseException as err:
        # Describe what is on disk: the last checkpoint written, not a pending one.
        metrics["status"] = ("stopped" if isinstance(err, TrainingStopped) else
                             "interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        metrics["error"] = str(err) or type(err).__name__
        metrics["checkpoint"] = {"file": "model.pt", "epoch": saved["epoch"]} if saved else None
        metrics["best_epoch"] = saved["epoch"] if saved else None
        metrics["best_val_weighted_f1"] = saved["val_weighted_f1"] if saved else None
        try:
            write_metrics()
        except OSError:
            pass  # the original error matters more (e.g. a full disk)
        raise
    finally:
        if board is not None:
            board.close()
    metrics["status"] = "finished"
    write_metrics()
    return metrics


def _end_step(acc: dict, step: int, sums: dict, counts: dict, without: dict, norms: dict, t0: float) -> None:
    """Record a finished step in the epoch's accumulators (what last.pt keeps mid-epoch)."""
    acc.update(step=step, sums=sums, counts=counts, without=without, norms=norms,
               seconds=time.perf_counter() - t0)


def _step_values(out, config: CaSCLAConfig, world: int) -> dict[str, float]:
    """The step's loss and terms as floats: in a distributed run their global
    values (the mean over the ranks of each rank's N-scaled part; a term some
    ranks lack, the local scope's contrastive one, over the ranks that have it)."""
    values = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.losses.items()}}
    if world == 1:
        return {k: float(v) for k, v in values.items()}
    names = ["loss", "ce", "ce_adv", config.contrastive]
    table = torch.zeros(len(names), 2, dtype=torch.float64, device=out.loss.device)
    for i, k in enumerate(names):
        if k in values:
            table[i, 0], table[i, 1] = values[k].double(), 1.0
    table = D.all_reduce_sum(table)
    return {k: float(table[i, 0] / table[i, 1]) for i, k in enumerate(names) if k in values}


def _tensorboard(out_dir: Path):
    """A TensorBoard writer for <run>/tensorboard, or one clear error if tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _expected_terms(config: CaSCLAConfig) -> set[str]:
    """The loss terms a fully labelled training batch has."""
    return {"ce"} | ({config.contrastive} if config.use_scla else set()) | ({"ce_adv"} if config.use_ast else set())


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "values": [float(v) for v in a]}


def summarise_scores(runs: Sequence[dict], label_names: Sequence[str]) -> dict:
    """Mean and standard deviation (and the values) over runs of the scores
    :func:`evaluate` returns: weighted F1, accuracy, macro F1, each class's F1."""
    return {
        "n": runs[0]["n"],
        **{k: _mean_std([r[k] for r in runs]) for k in ("weighted_f1", "accuracy", "macro_f1")},
        "per_class_f1": {c: _mean_std([r["per_class_f1"][c] for r in runs]) for c in label_names},
    }


def train_seeds(config: CaSCLAConfig, corpus: Corpus, out_dir: str | os.PathLike, settings: TrainSettings,
                seeds: Sequence[int], data: DataSpec | dict | None = None,
                report_splits: Sequence[str] = ("val",), *, overwrite: bool = False) -> dict:
    """Train once per seed into ``out_dir/seed_<s>/``, score each run's best
    checkpoint on its selection split and on ``report_splits`` (never test
    unless asked), and write ``out_dir/summary.json``: per split, the mean
    and standard deviation over seeds of weighted F1, accuracy, macro F1 and
    each class's F1. Returns the summary."""
    from .runs import claim_run_dir

    with D.on_rank_zero(lambda: claim_run_dir(out_dir, overwrite=overwrite)):
        return _train_seeds(config, corpus, Path(out_dir).expanduser(), settings, seeds, data_record(data, corpus),
                            report_splits, overwrite)


def _train_seeds(config, corpus, out_dir: Path, settings, seeds, data_info, report_splits, overwrite) -> dict:
    from dataclasses import replace as dc_replace

    runs = []
    splits = [settings.select_split] + [s for s in report_splits
                                        if s != settings.select_split and corpus.splits.get(s)]
    for seed in seeds:
        run_dir = out_dir / f"seed_{seed}"
        metrics = train(config, corpus, run_dir, dc_replace(settings, seed=seed), data_info, overwrite=overwrite)
        # The selection split was scored at the best epoch already; the others
        # are scored with that epoch's checkpoint.
        scored = {settings.select_split: metrics.get("selection_scores")
                  or metrics["epochs"][metrics["best_epoch"] - 1]["val"]}
        if splits[1:]:
            model = _load_on_every_rank(run_dir / "model.pt").to(resolve_device(settings.device))
            scored.update({s: evaluate(model, corpus.split(s), settings.batch_size, settings.device)
                           for s in splits[1:]})
        runs.append({"seed": seed, "best_epoch": metrics["best_epoch"], "scores": scored,
                     "seconds": metrics["total_seconds"]})
    summary = {"dataset": corpus.name, "seeds": list(seeds), "select_split": settings.select_split,
               "config": config.to_dict(), "data": data_info, "splits": {}}
    keep = ("weighted_f1", "accuracy", "macro_f1", "per_class_f1")
    for s in splits:
        summary["splits"][s] = summarise_scores([r["scores"][s] for r in runs], corpus.label_names)
    summary["runs"] = [{**r, "scores": {s: {k: r["scores"][s][k] for k in keep} for s in splits}}
                       for r in runs]
    if D.rank() == 0:
        atomic_write_json(summary, out_dir / "summary.json")
    return summary


def _load_on_every_rank(path: Path) -> CaSCLA:
    """The model of a checkpoint that rank 0 wrote, on every rank (read by rank 0)."""
    if not D.is_distributed():
        return CaSCLA.load(path)
    model, error = None, None
    if D.rank() == 0:
        try:
            model = CaSCLA.load(path)
        except (OSError, ValueError) as err:
            error = err
    D.agree(error)
    config, names, weights = D.broadcast_object(
        (model.config.to_dict(), model.label_names, model.state_dict()) if model is not None else None)
    if model is None:
        model = CaSCLA(CaSCLAConfig.from_dict(config), names)
        model.load_state_dict(weights)
    return model
