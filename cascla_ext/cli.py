"""The ``cascla`` command line (also ``python -m cascla_ext``).

    cascla train --dataset synthetic --out RUN_DIR [--epochs N] [--seed S] ...
    cascla evaluate --checkpoint RUN_DIR/model.pt --dataset synthetic --split test [--json]

Errors (unknown flags, impossible settings, missing files) exit with status 2
and one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


class CLIError(Exception):
    """An error to report in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _modalities(text: str) -> tuple[str, ...]:
    names = {"t": "t", "text": "t", "a": "a", "audio": "a", "v": "v", "visual": "v"}
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part not in names:
            raise argparse.ArgumentTypeError(f"unknown modality {part!r} (expected t, a, v)")
        if names[part] in out:
            raise argparse.ArgumentTypeError(f"modality {part!r} given twice")
        out.append(names[part])
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    parser = _Parser(prog="cascla", description="Train and evaluate CaSCLA (multimodal emotion "
                     "recognition in conversation).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,evaluate}")
    sub.required = True

    t = sub.add_parser("train", help="train a model, select the best epoch on validation")
    t.add_argument("--dataset", choices=DATASETS, default="synthetic")
    t.add_argument("--out", required=True, help="run directory: model.pt and metrics.json go here")
    t.add_argument("--epochs", type=_positive_int, default=20)
    t.add_argument("--seed", type=int, default=0, help="seed of the model and the batch order")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic corpus")
    t.add_argument("--batch-size", type=_positive_int, default=16, help="dialogues per batch")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="Adam learning rate (default: 1e-3 with the small preset, the paper's 1e-4 otherwise)")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--preset", choices=("small", "paper"), default=None,
                   help="model widths: small (CPU) or the paper's (d_m 1024, d_h 300); "
                        "default: small for the synthetic dataset")
    t.add_argument("--modalities", type=_modalities, default=None, help="subset of t,a,v (default: all)")
    t.add_argument("--no-scla", action="store_true", help="ablation: CE only (no SCLA loss)")
    t.add_argument("--no-ast", action="store_true", help="ablation: no adversarial samples")
    t.add_argument("--no-causal", action="store_true", help="ablation: no causal-aware interaction")
    t.add_argument("--gamma", type=float, default=None, help="SCLA class-weight exponent (paper: 0.5, 1.0 or 1.5)")
    t.add_argument("--scla-weight", type=float, default=None, help="lambda, the weight of the SCLA loss")
    t.add_argument("--reference-ops", action="store_true",
                   help="run the pure-PyTorch reference ops instead of the fused kernels (debugging)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="score a checkpoint on a dataset split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", choices=DATASETS, default="synthetic")
    e.add_argument("--data-seed", type=int, default=0)
    e.add_argument("--split", choices=("train", "val", "test"), default="test")
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _train(args) -> int:
    from .config import CaSCLAConfig
    from .data import load_dataset
    from .train import TrainSettings, train

    corpus = load_dataset(args.dataset, seed=args.data_seed)
    preset = args.preset or ("small" if args.dataset == "synthetic" else "paper")
    modalities = args.modalities or tuple(m for m in ("t", "a", "v") if m in corpus.input_dims)
    missing = [m for m in modalities if m not in corpus.input_dims]
    if missing:
        raise CLIError(f"cascla train: dataset {args.dataset} has no {', '.join(missing)} features")
    overrides = dict(
        num_classes=len(corpus.label_names), modalities=modalities,
        input_dims={m: corpus.input_dims[m] for m in modalities}, clue_dim=corpus.clue_dim,
        use_scla=not args.no_scla, use_ast=not args.no_ast, use_causal=not args.no_causal,
        ops_backend="reference" if args.reference_ops else "fused",
    )
    if args.gamma is not None:
        overrides["gamma"] = args.gamma
    if args.scla_weight is not None:
        overrides["scla_weight"] = args.scla_weight
    config = CaSCLAConfig.small(**overrides) if preset == "small" else CaSCLAConfig(**overrides)
    lr = args.lr if args.lr is not None else (1e-3 if preset == "small" else 1e-4)
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=args.seed,
                             device=args.device, progress=not args.quiet)
    metrics = train(config, corpus, args.out, settings)
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    print(f"best epoch {metrics['best_epoch']}: validation weighted F1 "
          f"{100 * best['val']['weighted_f1']:.2f}, accuracy {100 * best['val']['accuracy']:.2f} "
          f"({metrics['total_seconds']:.1f} s); wrote {args.out}/model.pt and {args.out}/metrics.json")
    return 0


def _evaluate(args) -> int:
    from .data import load_dataset
    from .metrics import format_table
    from .model import CaSCLA
    from .train import evaluate, resolve_device

    device = resolve_device(args.device)
    model = CaSCLA.load(args.checkpoint).to(device)
    corpus = load_dataset(args.dataset, seed=args.data_seed)
    if corpus.label_names != model.label_names:
        raise CLIError(f"cascla evaluate: the checkpoint's labels {model.label_names} are not the "
                       f"dataset's {corpus.label_names}")
    result = evaluate(model, corpus.split(args.split), args.batch_size, device)
    if args.json:
        keys = ("weighted_f1", "accuracy", "macro_f1", "per_class_f1", "support", "n")
        print(json.dumps({k: result[k] for k in keys}))
    else:
        print(f"{args.dataset} {args.split}: {result['n']} utterances")
        print(format_table(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"train": _train, "evaluate": _evaluate}[args.command](args)
    except CLIError as err:
        print(err, file=sys.stderr)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"cascla: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("cascla: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
