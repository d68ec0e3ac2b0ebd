"""Context-free fine-tuning of the text encoder on utterance labels.

Like COSMIC's RoBERTa fine-tuning: every utterance is classified on its own
(no dialogue context) by a linear head on the encoder's pooled embedding
(before L2 normalisation); the encoder's weights are then saved and the
head kept beside them. The result is written to a temporary directory beside
``out_dir`` and renamed into place, so ``out_dir`` holds a finished fine-tune
or nothing (an existing folder is never replaced or deleted); its marker file (``cascla_finetune.json``: the settings and a hash
of the data) lets a second call with the same settings reuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._io import atomic_write_json, dir_mode
from .text import TextEncoder, loading_bars, texts_sha256

__all__ = ["FINETUNE_MARKER", "finetune_encoder", "read_finetune_marker"]

FINETUNE_MARKER = "cascla_finetune.json"
HEAD_FILE = "cascla_classifier_head.pt"


def read_finetune_marker(out_dir: str | os.PathLike) -> dict | None:
    """The marker of a finished fine-tune in ``out_dir``, or None."""
    path = Path(out_dir) / FINETUNE_MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finetune_encoder(encoder: TextEncoder, texts: Sequence[str], labels: Sequence[int], num_labels: int,
                     out_dir: str | os.PathLike, *, epochs: int = 1, lr: float = 2e-5, batch_size: int = 32,
                     max_steps: int | None = None, seed: int = 0, progress: bool = True,
                     class_weighted: bool = True, max_length: int | None = None, head_lr: float = 1e-3,
                     weight_decay: float = 0.01, warmup_ratio: float = 0.1) -> TextEncoder:
    """Fine-tune ``encoder`` on (text, label) pairs; return a TextEncoder on the result.

    labels: ints in [0, num_labels); negative labels (unknown) are left out.
    max_length: tokens per utterance while training (None: the encoder's own).
    head_lr: learning rate of the freshly initialised linear head (the encoder uses ``lr``).
    class_weighted: weight the cross-entropy by inverse class frequency
        (n / (num_labels * count)), as for MELD's skewed labels.
    The schedule is AdamW with linear warm-up (``warmup_ratio`` of the steps)
    and linear decay; gradients are clipped to norm 1. The returned encoder
    keeps ``encoder``'s pooling, normalize, max_length, device and batch size;
    its ``finetune_info`` is the marker (settings, per-step losses, time).
    ``encoder`` itself is not modified (training runs on a fresh copy).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    texts = list(texts)
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(texts) != len(labels_arr):
        raise ValueError(f"finetune_encoder: {len(texts)} texts but {len(labels_arr)} labels")
    if labels_arr.size and labels_arr.max() >= num_labels:
        raise ValueError(f"finetune_encoder: label {int(labels_arr.max())} is out of range for "
                         f"num_labels={num_labels}")
    keep = np.flatnonzero(labels_arr >= 0)
    if keep.size == 0:
        raise ValueError("finetune_encoder: no labelled texts to train on")
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError("finetune_encoder: epochs, batch_size and max_steps must be >= 1")
    texts = [texts[i] for i in keep]
    labels_arr = labels_arr[keep]
    max_length = max_length or encoder.max_length

    settings = {
        "base_encoder": encoder.fingerprint, "num_labels": num_labels, "epochs": epochs, "lr": lr,
        "head_lr": head_lr, "batch_size": batch_size, "max_steps": max_steps, "seed": seed,
        "class_weighted": class_weighted, "max_length": max_length, "weight_decay": weight_decay,
        "warmup_ratio": warmup_ratio, "pooling": encoder.pooling, "n": len(texts),
        "data_sha256": hashlib.sha256((texts_sha256(texts) + labels_arr.tobytes().hex()).encode()).hexdigest(),
    }
    settings = json.loads(json.dumps(settings))  # compare as the marker will read back

    def finished(path: Path) -> TextEncoder:
        ft = TextEncoder(path, device=encoder.device, batch_size=encoder.batch_size,
                         max_length=encoder.max_length, pooling=encoder.pooling, normalize=encoder.normalize,
                         progress=progress)
        ft.finetune_info = read_finetune_marker(path)
        return ft

    marker = read_finetune_marker(out_dir)
    if marker is not None and marker.get("settings") == settings:
        return finished(out_dir)
    # Never replace or delete a folder this call did not create: an existing
    # fine-tune with other settings is the caller's to remove.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = ("holds a fine-tuned encoder with other settings" if marker is not None else
                f"exists and does not hold a fine-tuned encoder (no {FINETUNE_MARKER})")
        raise FileExistsError(f"finetune_encoder: {out_dir} {what}; refusing to overwrite it "
                              "(remove it or choose another folder)")

    from transformers import AutoModel, get_linear_schedule_with_warmup

    device = encoder.device
    n = len(texts)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    warmup = math.ceil(warmup_ratio * total)
    counts = np.bincount(labels_arr, minlength=num_labels)
    weight = (torch.tensor(n / (num_labels * np.maximum(counts, 1)), dtype=torch.float32, device=device)
              if class_weighted else None)
    y_all = torch.as_tensor(labels_arr)

    started = time.time()
    losses: list[float] = []
    fork_devices = [device] if device.type == "cuda" else []
    # Seed the head and dropout without touching the caller's random state.
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        with loading_bars(progress):
            model = AutoModel.from_pretrained(encoder.path, local_files_only=True).to(device).train()
        head = nn.Linear(encoder.dim, num_labels).to(device)
        no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in name]
        decay = [p for name, p in model.named_parameters() if not (p.ndim < 2 or "LayerNorm" in name)]
        optim = torch.optim.AdamW([
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            {"params": head.parameters(), "lr": head_lr, "weight_decay": 0.0},
        ])
        sched = get_linear_schedule_with_warmup(optim, warmup, total)
        gen = torch.Generator().manual_seed(seed)
        with tqdm(total=total, desc="fine-tune", unit="step", disable=not progress) as bar:
            step = 0
            while step < total:
                order = torch.randperm(n, generator=gen).tolist()
                for start in range(0, n, batch_size):
                    if step >= total:
                        break
                    idx = order[start:start + batch_size]
                    inputs = encoder.tokenize([texts[i] for i in idx], max_length=max_length)
                    hidden = model(**inputs).last_hidden_state
                    logits = head(encoder.pool(hidden, inputs["attention_mask"]))
                    loss = F.cross_entropy(logits, y_all[idx].to(device), weight=weight)
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
                    optim.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")

    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp makes it private; a model directory is not
        model.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
        torch.save({k: v.cpu() for k, v in head.state_dict().items()}, tmp / HEAD_FILE)
        atomic_write_json({"settings": settings, "steps": total, "losses": losses,
                           "seconds": round(time.time() - started, 3), "base_path": str(encoder.path)},
                          tmp / FINETUNE_MARKER)  # last: its presence means the rest is complete
        os.replace(tmp, out_dir)  # replaces at most an empty folder (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finished(out_dir)
