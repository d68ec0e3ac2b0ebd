"""Utterance-level acoustic features with openSMILE (the ``opensmile`` package,
which ships the native library and the configurations: nothing downloads).

One functionals vector per utterance, from the clip's first audio track
(.wav, .flac, or the audio of a video file) decoded and resampled to mono at
``sample_rate`` by PyAV. Feature sets (``AUDIO_FEATURE_SETS``):

| name         | width | what                                                           |
| ------------ | ----- | -------------------------------------------------------------- |
| eGeMAPSv02   | 88    | the extended Geneva minimalistic set (default)                 |
| ComParE_2016 | 6373  | the ComParE 2016 challenge set                                 |
| IS10         | 1582  | INTERSPEECH 2010 paralinguistics, the set of MELD's baselines  |
| IS09         | 384   | INTERSPEECH 2009 emotion challenge                             |
| emobase      | 988   | openSMILE's emobase                                            |

Functionals span many orders of magnitude (energies near 1e6 beside ratios
near 1e-3), and the model's first layer is a plain linear projection, so by
default each value x becomes ``sign(x) * log1p(|x|)`` (``compress=True``): a
fixed transform that needs no statistics of the training data, so
evaluate and predict rebuild exactly the same features. NaN or infinite
outputs (a clip too short for a descriptor) become 0.
"""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np

from .._extras import MEDIA, require
from .media import Clip, ClipExtractor, MediaError, decode_audio

__all__ = ["AUDIO_FEATURE_SETS", "DEFAULT_AUDIO_FEATURES", "DEFAULT_SAMPLE_RATE", "AudioExtractor"]

#: Feature set name -> width of its functionals vector.
AUDIO_FEATURE_SETS = {"eGeMAPSv02": 88, "ComParE_2016": 6373, "IS10": 1582, "IS09": 384, "emobase": 988}
DEFAULT_AUDIO_FEATURES = "eGeMAPSv02"
DEFAULT_SAMPLE_RATE = 16000


def _opensmile():
    return require("opensmile", "audio features (cascla_ext.features.audio)", MEDIA)


class AudioExtractor(ClipExtractor):
    """openSMILE functionals of utterance clips.

    feature_set: a name of ``AUDIO_FEATURE_SETS``.
    sample_rate: the rate audio is resampled to before openSMILE (16 kHz, the
        rate IEMOCAP is recorded at; MELD's 48 kHz AAC is resampled down).
    compress: apply ``sign(x) * log1p(|x|)`` to the functionals.
    workers: clips processed in parallel (threads: decoding and openSMILE
        run in native code).
    """

    kind = "audio"

    def __init__(self, feature_set: str = DEFAULT_AUDIO_FEATURES, *, sample_rate: int = DEFAULT_SAMPLE_RATE,
                 compress: bool = True, workers: int = 1, progress: bool = True):
        if feature_set not in AUDIO_FEATURE_SETS:
            raise ValueError(f"audio feature set must be one of {', '.join(AUDIO_FEATURE_SETS)}, "
                             f"got {feature_set!r}")
        if not isinstance(sample_rate, int) or not 8000 <= sample_rate <= 192000:
            raise ValueError(f"audio sample_rate must be an integer in 8000..192000 Hz, got {sample_rate!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.opensmile = _opensmile()
        self.feature_set = feature_set
        self.sample_rate = sample_rate
        self.compress = compress
        self.workers = workers
        self.progress = progress
        self._local = threading.local()
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return (f"AudioExtractor({self.feature_set!r}, dim={self.dim}, sample_rate={self.sample_rate}, "
                f"compress={self.compress})")

    @property
    def dim(self) -> int:
        return AUDIO_FEATURE_SETS[self.feature_set]

    @property
    def settings(self) -> dict:
        """What changes the features (and a checkpoint records)."""
        return {"feature_set": self.feature_set, "sample_rate": self.sample_rate, "compress": self.compress}

    def _smile(self):
        smile = getattr(self._local, "smile", None)
        if smile is None:  # one per thread: a Smile object is not documented as thread-safe
            smile = self.opensmile.Smile(feature_set=getattr(self.opensmile.FeatureSet, self.feature_set),
                                         feature_level=self.opensmile.FeatureLevel.Functionals)
            self._local.smile = smile
        return smile

    @property
    def fingerprint(self) -> str:
        """``opensmile-<set>-<16 hex>``: the settings, the opensmile version and its config file's bytes."""
        if self._fingerprint is None:
            with open(self._smile().config_path, "rb") as fh:
                config = hashlib.sha256(fh.read()).hexdigest()
            blob = json.dumps({**self.settings, "opensmile": self.opensmile.__version__, "config": config},
                              sort_keys=True)
            self._fingerprint = f"opensmile-{self.feature_set}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
        return self._fingerprint

    def from_signal(self, signal: np.ndarray) -> np.ndarray:
        """(dim,) float32 functionals of a mono signal at ``sample_rate``."""
        # opensmile feeds openSMILE 16-bit samples (x * 32768 cast to int16): clip first, or a
        # full-scale peak (AAC overshoots) wraps around to the opposite sign
        signal = np.clip(np.asarray(signal, dtype=np.float32).reshape(1, -1), -1.0, 32767 / 32768)
        try:
            frame = self._smile().process_signal(signal, self.sample_rate)
        except Exception as err:  # openSMILE's own errors (e.g. a clip shorter than one frame)
            raise MediaError(f"openSMILE failed ({' '.join(str(err).split())[:200]})") from None
        x = frame.to_numpy(dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,):
            raise MediaError(f"openSMILE gave {x.size} values, expected {self.dim} for {self.feature_set}")
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if self.compress:
            x = np.sign(x) * np.log1p(np.abs(x))
        return x.astype(np.float32)

    def from_clip(self, clip: Clip | str) -> np.ndarray:
        """(dim,) features of one clip; MediaError if it cannot be decoded."""
        return self.from_signal(decode_audio(clip, self.sample_rate))
