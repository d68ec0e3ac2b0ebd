"""Causal clues: six vectors per utterance, one per ATOMIC relation.

The paper (section 3.2) feeds ``(u_i [MASK] r)`` to COMET and takes the hidden
state of its last encoder layer as the clue for relation r. ``CometClues`` does
exactly that with a local seq2seq checkpoint; ``AtomicClues`` is an offline
stand-in for when no COMET model is at hand: it retrieves the ATOMIC events
nearest to the utterance and averages the embeddings of their inferences.

Both return (N, 6, d_c) float32 arrays in ``CLUE_RELATIONS`` order
(xReact, xEffect, xWant, oReact, oEffect, oWant).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.batch import CLUE_KINDS, CLUE_RELATIONS
from .cache import FeatureCache, file_sha256
from .text import TextEncoder, loading_bars, model_dir_fingerprint, resolve_model_path, texts_sha256

__all__ = ["CLUE_KINDS", "AtomicClues", "CometClues", "clue_extractor", "readable_atomic"]

REWRITE_VERSION = 1  # bump when readable_atomic changes: it is part of the cache keys

# Placeholder -> (first mention, first mention possessive, later mention, later possessive).
_PEOPLE = {
    "x": ("someone", "someone's", "them", "their"),
    "y": ("someone else", "someone else's", "them", "their"),
    "z": ("another person", "another person's", "them", "their"),
}
_PERSON = re.compile(r"\bperson\s?([xyz])\b(\s?'\s?s\b)?", re.IGNORECASE)
_BLANK = re.compile(r"_{2,}")
_DETACHED_S = re.compile(r"\s+'s\b")
_SPACE = re.compile(r"\s+")


def readable_atomic(text: str) -> str:
    """An ATOMIC event or inference as plain English for a sentence encoder.

    "PersonX" (also "personx", "Person X") becomes "someone" at its first
    mention and "them" after it; "PersonY" "someone else", then "them";
    "PersonZ" "another person", then "them"; a possessive ('s) takes the
    possessive forms ("someone's", "their"). Third person keeps ATOMIC's verbs
    grammatical ("someone pays their bills"), where "I" would not ("I pays").
    "___" becomes "something"; tokenised possessives ("god 's") are rejoined;
    whitespace is collapsed and the text lower-cased (ATOMIC's casing is noise,
    and the default encoder is uncased anyway).

    Example: "PersonX pays PersonX's ___ to PersonY" -> "someone pays their
    something to someone else".
    """
    seen: set[str] = set()

    def person(m: re.Match) -> str:
        who = m.group(1).lower()
        first, first_pos, later, later_pos = _PEOPLE[who]
        possessive = m.group(2) is not None
        word = (later_pos if possessive else later) if who in seen else (first_pos if possessive else first)
        seen.add(who)
        return word

    text = _DETACHED_S.sub("'s", text)
    text = _PERSON.sub(person, text)
    text = _BLANK.sub("something", text)
    return _SPACE.sub(" ", text).strip().lower()


def _atomic_files(atomic_dir: Path) -> list[Path]:
    if not atomic_dir.is_dir():
        raise FileNotFoundError(f"AtomicClues: {atomic_dir} is not a directory (expected ATOMIC CSV files)")
    files = sorted(atomic_dir.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"AtomicClues: no *.csv files in {atomic_dir} (expected ATOMIC v4 CSVs, e.g. "
                                f"v4_atomic_dev.csv, with columns event, {', '.join(CLUE_RELATIONS)})")
    return files


def _parse_tails(cell: str, where: str) -> list[str]:
    cell = cell.strip()
    if not cell:
        return []
    try:
        values = json.loads(cell)
    except ValueError as exc:
        raise ValueError(f"AtomicClues: {where}: not a JSON list of strings: {cell[:80]!r}") from exc
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise ValueError(f"AtomicClues: {where}: not a JSON list of strings: {cell[:80]!r}")
    return [v for v in values if isinstance(v, str)]


def load_atomic(files: Sequence[Path], max_events: int | None = None) -> tuple[list[str], list[list[list[str]]]]:
    """Events (as written) and, per event and relation (CLUE_RELATIONS order), their readable tails.

    Rows of the same event are merged: the union of their tails per relation,
    in order of first appearance, with "none" and empty tails dropped. Events
    are numbered in order of first appearance over the files (sorted by name);
    ``max_events`` keeps the first N.
    """
    tails: dict[str, list[dict[str, None]]] = {}
    for path in files:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("event", *CLUE_RELATIONS) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"AtomicClues: {path} lacks the column(s) {', '.join(missing)} "
                                 f"(it has: {', '.join(reader.fieldnames or []) or 'nothing'})")
            for line, row in enumerate(reader, start=2):
                event = (row["event"] or "").strip()
                if not event:
                    continue
                per_rel = tails.setdefault(event, [{} for _ in CLUE_RELATIONS])
                for r, rel in enumerate(CLUE_RELATIONS):
                    for tail in _parse_tails(row[rel] or "", f"{path.name} line {line} column {rel}"):
                        tail = readable_atomic(tail)
                        if tail and tail != "none":
                            per_rel[r][tail] = None
    events = list(tails)
    if max_events is not None:
        events = events[:max_events]
    return events, [[list(d) for d in tails[e]] for e in events]


class AtomicClues:
    """Offline stand-in for COMET: clues retrieved from ATOMIC by embedding similarity.

    At construction every *.csv in ``atomic_dir`` is read (``load_atomic``), and
    the unique readable events and unique tails are encoded with ``encoder``
    (through ``cache``, keyed by the encoder's fingerprint, the files' names,
    sizes and mtimes, ``max_events`` and the rewriting rules). An event's tail
    vector for relation r is the mean embedding of its tails for r.

    ``clues(texts)``: per text, the cosine similarity to every event, the
    ``top_k`` nearest events weighted by softmax(sim / temperature), and per
    relation the weighted mean of those events' tail vectors; events without a
    tail for r are left out and the weights renormalised over the rest; where
    none of them has one, the clue is the zero vector.

    Attributes: ``events`` (as written in ATOMIC), ``event_texts`` (readable),
    ``tails`` (per event, per relation: readable tails), ``event_embeddings``
    (E, d), ``tail_means`` (E, 6, d), ``has_tails`` (E, 6) bool.
    """

    def __init__(self, atomic_dir: str | os.PathLike, encoder: TextEncoder, *, top_k: int = 8,
                 temperature: float = 0.05, cache: FeatureCache | None = None, max_events: int | None = None,
                 progress: bool = True):
        if top_k < 1 or temperature <= 0:
            raise ValueError(f"AtomicClues: top_k must be >= 1 and temperature > 0, "
                             f"got {top_k} and {temperature}")
        self.atomic_dir = Path(atomic_dir).expanduser().resolve()
        self.encoder = encoder
        self.top_k = top_k
        self.temperature = temperature
        self.progress = progress
        self.files = _atomic_files(self.atomic_dir)
        self.events, self.tails = load_atomic(self.files, max_events)
        if not self.events:
            raise ValueError(f"AtomicClues: no events in {', '.join(str(f) for f in self.files)}")
        self.event_texts = [readable_atomic(e) for e in self.events]

        unique_tails = sorted({t for per_rel in self.tails for ts in per_rel for t in ts})
        self._key = {
            "encoder": encoder.fingerprint,
            # Content, not modification times: a copied or re-checked-out ATOMIC
            # folder (a CI machine, a new data mount) hits the same cache entries.
            "files": [[f.name, f.stat().st_size, file_sha256(f)] for f in self.files],
            "max_events": max_events, "rewrite": REWRITE_VERSION,
        }

        def encode(kind: str, texts: list[str]) -> np.ndarray:
            key = {**self._key, "what": kind, "n": len(texts), "texts_sha256": texts_sha256(texts)}
            compute = lambda: encoder.encode(texts, progress=progress, desc=f"ATOMIC {kind}")  # noqa: E731
            return compute() if cache is None else cache.get_or_compute(f"atomic_{kind}", key, compute)

        self.event_embeddings = encode("events", self.event_texts)
        tail_emb = encode("tails", unique_tails) if unique_tails else np.zeros((0, encoder.dim), np.float32)
        self._event_unit = self.event_embeddings / np.maximum(
            np.linalg.norm(self.event_embeddings, axis=1, keepdims=True), 1e-12)

        # Mean tail embedding per (event, relation): scatter-add rows into E * 6 slots.
        index = {t: i for i, t in enumerate(unique_tails)}
        slots, rows = [], []
        for e, per_rel in enumerate(self.tails):
            for r, ts in enumerate(per_rel):
                slots.extend([e * len(CLUE_RELATIONS) + r] * len(ts))
                rows.extend(index[t] for t in ts)
        n_slots = len(self.events) * len(CLUE_RELATIONS)
        sums = torch.zeros(n_slots, encoder.dim, dtype=torch.float64)
        slots_t = torch.tensor(slots, dtype=torch.long)
        sums.index_add_(0, slots_t, torch.from_numpy(tail_emb).double()[torch.tensor(rows, dtype=torch.long)])
        counts = torch.bincount(slots_t, minlength=n_slots).double()
        self.has_tails = (counts > 0).numpy().reshape(len(self.events), len(CLUE_RELATIONS))
        self.tail_means = (sums / counts.clamp_min(1).unsqueeze(1)).float().numpy().reshape(
            len(self.events), len(CLUE_RELATIONS), encoder.dim)

    def __repr__(self) -> str:
        return (f"AtomicClues({str(self.atomic_dir)!r}, events={len(self.events)}, dim={self.dim}, "
                f"top_k={self.top_k}, temperature={self.temperature})")

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def fingerprint(self) -> str:
        """A short stable id of everything that determines the clues, for cache keys."""
        blob = json.dumps({**self._key, "top_k": self.top_k, "temperature": self.temperature}, sort_keys=True)
        return f"atomic-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def retrieve(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) indices of the nearest events (most similar first) and their softmax weights."""
        q = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        sims = q @ self._event_unit.T  # (N, E)
        k = min(self.top_k, sims.shape[1])
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.broadcast_to(np.arange(k), sims.shape).copy()
        top = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        idx, top = np.take_along_axis(idx, order, axis=1), np.take_along_axis(top, order, axis=1)
        logits = (top - top[:, :1]) / self.temperature
        w = np.exp(logits)
        return idx, w / w.sum(axis=1, keepdims=True)

    def __call__(self, texts: Sequence[str], *, embeddings: np.ndarray | None = None,
                 chunk: int = 256) -> np.ndarray:
        """(N, 6, dim) float32 clues for ``texts``.

        embeddings: the texts' embeddings from ``self.encoder`` where the caller
            has them already (e.g. the text features), to skip encoding again.
        """
        texts = list(texts)
        if embeddings is None:
            embeddings = self.encoder.encode(texts, progress=self.progress, desc="encode (clues)")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(texts), self.dim):
            raise ValueError(f"AtomicClues: embeddings have shape {embeddings.shape}, expected "
                             f"({len(texts)}, {self.dim})")
        out = np.zeros((len(texts), len(CLUE_RELATIONS), self.dim), dtype=np.float32)
        for start in range(0, len(texts), chunk):
            idx, w = self.retrieve(embeddings[start:start + chunk])
            wr = w[:, :, None] * self.has_tails[idx]  # (n, k, 6): weights of the events that have tails for r
            total = wr.sum(axis=1, keepdims=True)
            wr = np.divide(wr, total, out=np.zeros_like(wr), where=total > 0)
            out[start:start + chunk] = np.einsum("nkr,nkrd->nrd", wr, self.tail_means[idx])
        return out


class CometClues:
    """The paper's clues from a local COMET-style seq2seq checkpoint (e.g. COMET-BART).

    For every text and relation r the input is ``f"{text} {mask} {r}"`` (mask:
    the tokenizer's mask token, else "[MASK]"; the text is stripped first).
    Only the encoder runs; the clue is the last encoder layer's hidden state at
    the last non-padding token. That token is the end-of-sequence token (</s>
    for BART, which BART's own sequence-classification head reads too); the
    encoder is bidirectional, so its state has attended to the whole input, the
    relation included. Padding is masked, so a text's clues do not depend on
    what it is batched with.
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu", batch_size: int = 32,
                 max_length: int = 64, progress: bool = True):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.path = resolve_model_path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        with loading_bars(progress):
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model = AutoModelForSeq2SeqLM.from_pretrained(self.path, local_files_only=True).eval()
        self.encoder = model.get_encoder().to(self.device)
        self.mask = self.tokenizer.mask_token or "[MASK]"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = model.config
        self._dim = int(getattr(config, "d_model", None) or config.hidden_size)

    def __repr__(self) -> str:
        return f"CometClues({str(self.path)!r}, dim={self.dim}, device={str(self.device)!r})"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({**model_dir_fingerprint(self.path), "max_length": self.max_length,
                           "mask": self.mask, "relations": CLUE_RELATIONS}, sort_keys=True)
        return f"comet-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def inputs(self, text: str) -> list[str]:
        """The six encoder inputs for one text, in CLUE_RELATIONS order."""
        return [f"{text.strip()} {self.mask} {rel}".strip() for rel in CLUE_RELATIONS]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 6, dim) float32 clues for ``texts``."""
        queries = [q for t in texts for q in self.inputs(t)]
        out = np.empty((len(queries), self.dim), dtype=np.float32)
        order = sorted(range(len(queries)), key=lambda i: -len(queries[i]))
        with torch.inference_mode(), tqdm(total=len(queries), desc="COMET clues", unit="input",
                                          disable=not self.progress) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tokenizer([queries[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                mask = enc["attention_mask"]
                hidden = self.encoder(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
                positions = torch.arange(mask.shape[1], device=mask.device)
                last = (mask * positions).argmax(dim=1)  # last non-padding position (left or right padding)
                out[idx] = hidden[torch.arange(len(idx), device=hidden.device), last].float().cpu().numpy()
                bar.update(len(idx))
        return out.reshape(len(texts), len(CLUE_RELATIONS), self.dim)


def clue_extractor(kind: str, *, atomic_dir: str | os.PathLike | None = None, encoder: TextEncoder | None = None,
                   comet_path: str | os.PathLike | None = None, cache: FeatureCache | None = None,
                   device: str | torch.device = "cpu", progress: bool = True, **kwargs
                   ) -> AtomicClues | CometClues | None:
    """A clue extractor by kind; "none" gives None (the model then runs without clues).
    The one dispatch on the kind (``cascla_ext.data.prepare`` extracts with it).

    "atomic": ``AtomicClues(atomic_dir, encoder or TextEncoder(device=device), cache=cache, **kwargs)``.
    "comet": ``CometClues(comet_path, device=device, **kwargs)``.
    """
    if kind == "none":
        return None
    if kind == "atomic":
        if atomic_dir is None:
            raise ValueError("clue_extractor('atomic'): pass atomic_dir, the folder of ATOMIC CSV files")
        return AtomicClues(atomic_dir, encoder or TextEncoder(device=device), cache=cache, progress=progress,
                           **kwargs)
    if kind == "comet":
        if comet_path is None:
            raise ValueError("clue_extractor('comet'): pass comet_path, a local COMET seq2seq checkpoint")
        return CometClues(comet_path, device=device, progress=progress, **kwargs)
    raise ValueError(f"unknown clue kind {kind!r}; available: {', '.join(CLUE_KINDS)}")
