"""A deterministic synthetic conversation corpus: the built-in dataset.

It is built so that each part of CaSCLA has something to find:

- Emotions follow MELD's label proportions (fear and disgust about 2.5% each).
- Every utterance has a latent *event* (the emotion it would cause). Its own
  emotion is caused by one utterance: itself (35%), the same speaker's
  previous utterance (35%, an intra-speaker cause: the speaker's emotion
  carries on), or the previous utterance of another speaker (30%, an
  inter-speaker cause: the listener reacts, e.g. anger in one speaker causes
  surprise in another). So the label is often decided by an earlier utterance
  that only a speaker-aware causal look-back finds.
- The text features encode the utterance's own event and which kind of cause
  it has, and only faintly its emotion; audio carries a weak, and visual a
  weaker, direct signal of the emotion. Fusion therefore matters, and text
  alone is not enough.
- Six causal clue vectors per utterance, as ATOMIC/COMET would give: the
  intra clues (xReact, xEffect, xWant) encode the emotion the utterance
  causes in its own speaker, the inter clues (oReact, oEffect, oWant) the one
  it causes in others, with noise.
- 2 to 9 speakers per dialogue, 4 to 18 utterances.
- Optionally (``SyntheticSpec.shift`` > 0, ``--synthetic-shift``) a shift
  between training and deployment conditions, for adversarial training to
  guard against: every validation and test dialogue is recorded in its own
  conditions, a per-dialogue offset of each modality's features (standard
  deviation ``shift``), plus as much noise again per utterance. The training
  dialogues are as without it, and the shift is drawn from its own random
  stream, so the corpus with ``shift`` 0 is the same as before the option.

Same seed, same corpus, on every machine (numpy's PCG64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batch import Dialogue

LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
# MELD train proportions, in LABELS' order.
PRIORS = np.array([0.471, 0.121, 0.027, 0.068, 0.174, 0.026, 0.111])
# How another speaker reacts to an event: anger <-> surprise, fear <-> disgust
# swap (classes of about equal frequency, so the label proportions hold).
REACTION = np.array([0, 6, 5, 3, 4, 2, 1])
CAUSE_SELF, CAUSE_INTRA, CAUSE_INTER = 0, 1, 2


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and signal strengths of the synthetic corpus."""

    n_train: int = 400
    n_val: int = 60
    n_test: int = 100
    dims: tuple[tuple[str, int], ...] = (("t", 48), ("a", 24), ("v", 24))
    clue_dim: int = 16
    min_len: int = 4
    max_len: int = 18
    text_event: float = 0.9     # text: the utterance's own event
    text_cause: float = 0.9     # text: which kind of cause it has
    text_label: float = 0.08    # text: its emotion (faint)
    audio_label: float = 0.16
    visual_label: float = 0.10
    clue_signal: float = 0.9
    shift: float = 0.0          # validation/test conditions: per-dialogue offset and noise (std)


def make_synthetic(seed: int = 0, spec: SyntheticSpec | None = None) -> dict[str, list[Dialogue]]:
    """The synthetic corpus: {"train", "val", "test"} -> dialogues."""
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(seed)
    K = len(LABELS)
    dims = dict(spec.dims)

    def prototypes(n: int, d: int) -> np.ndarray:
        return rng.standard_normal((n, d)).astype(np.float32)

    event_t, cause_t, label_t = prototypes(K, dims["t"]), prototypes(3, dims["t"]), prototypes(K, dims["t"])
    label_a, label_v = prototypes(K, dims["a"]), prototypes(K, dims["v"])
    clue_x = rng.standard_normal((3, K, spec.clue_dim)).astype(np.float32)
    clue_o = rng.standard_normal((3, K, spec.clue_dim)).astype(np.float32)

    def dialogue(idx: str) -> Dialogue:
        n_speakers = int(rng.integers(2, 10))
        n = int(rng.integers(max(spec.min_len, n_speakers), spec.max_len + 1))
        speakers = np.empty(n, dtype=np.int64)
        speakers[0] = 0
        for i in range(1, n):  # turn-taking: mostly a new speaker, sometimes the same one again
            if rng.random() < 0.25:
                speakers[i] = speakers[i - 1]
            else:
                others = [s for s in range(n_speakers) if s != speakers[i - 1]]
                speakers[i] = others[int(rng.integers(len(others)))]
        events = rng.choice(K, size=n, p=PRIORS / PRIORS.sum())
        labels = np.empty(n, dtype=np.int64)
        causes = np.empty(n, dtype=np.int64)
        for i in range(n):
            same = [j for j in range(i) if speakers[j] == speakers[i]]
            other = [j for j in range(i) if speakers[j] != speakers[i]]
            r = rng.random()
            if r < 0.35 or (r < 0.70 and not same) or (r >= 0.70 and not other):
                causes[i], labels[i] = CAUSE_SELF, events[i]
            elif r < 0.70:
                causes[i], labels[i] = CAUSE_INTRA, events[same[-1]]
            else:
                causes[i], labels[i] = CAUSE_INTER, REACTION[events[other[-1]]]

        def noise(d: int) -> np.ndarray:
            return rng.standard_normal((n, d)).astype(np.float32)

        text = (spec.text_event * event_t[events] + spec.text_cause * cause_t[causes]
                + spec.text_label * label_t[labels] + noise(dims["t"]))
        feats = {"t": text}
        if "a" in dims:
            feats["a"] = spec.audio_label * label_a[labels] + noise(dims["a"])
        if "v" in dims:
            feats["v"] = spec.visual_label * label_v[labels] + noise(dims["v"])
        clues = np.empty((n, 6, spec.clue_dim), dtype=np.float32)
        for k in range(3):
            clues[:, k] = spec.clue_signal * clue_x[k][events] + rng.standard_normal((n, spec.clue_dim))
            clues[:, 3 + k] = spec.clue_signal * clue_o[k][REACTION[events]] + rng.standard_normal((n, spec.clue_dim))
        return Dialogue(id=idx, features=feats, speakers=speakers, labels=labels, clues=clues,
                        meta={"causes": causes, "events": events})

    splits = {
        split: [dialogue(f"synthetic-{split}-{i}") for i in range(n)]
        for split, n in (("train", spec.n_train), ("val", spec.n_val), ("test", spec.n_test))
    }
    if spec.shift:
        if not spec.shift > 0:
            raise ValueError(f"SyntheticSpec: shift must be >= 0, got {spec.shift}")
        shift_rng = np.random.default_rng([seed, 1])  # its own stream: the dialogues stay as they are
        for split in ("val", "test"):
            for d in splits[split]:
                for m, x in d.features.items():
                    offset = spec.shift * shift_rng.standard_normal(x.shape[1])
                    jitter = spec.shift * shift_rng.standard_normal(x.shape)
                    d.features[m] = (x + offset + jitter).astype(np.float32)
    return splits
