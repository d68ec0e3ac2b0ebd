"""Decoding media with PyAV, and the per-clip extraction loop that the audio
and visual extractors share (content-keyed cache, progress bar, threads,
failures as zero rows).

PyAV (the ``av`` wheel) bundles FFmpeg's libraries, so .wav, .flac, .mp4,
.avi and the rest decode with nothing installed on the system, audio is
resampled by FFmpeg's own resampler, and the same library writes the test
videos. (The ``ffmpeg-python`` bindings call an ``ffmpeg`` executable that
PyPI does not provide.)

Everything that can go wrong with one clip (missing file, not a media file,
no audio track, zero length, a decoder error) is a :class:`MediaError`; the
extraction loop turns it into a zero feature row and a :class:`MediaFailure`
in the report, never a crash.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._extras import MEDIA, require
from .cache import FeatureCache, file_sha256

__all__ = ["Clip", "ClipExtractor", "MediaError", "MediaFailure", "MediaResult", "as_clip", "decode_audio",
           "extract_clips", "read_frames"]

NOT_FOUND = "file not found"
#: Decoded frames ``read_frames`` holds at most (at least twice the frames asked for).
KEPT_FRAMES = 64


class MediaError(ValueError):
    """One clip could not be used; the message is the reason (the failure record names the clip)."""


def _av():
    return require("av", "decoding audio and video (cascla_ext.features.media)", MEDIA)


@dataclass(frozen=True)
class Clip:
    """A media file, or the span [start, end) in seconds of one (IEMOCAP's dialogue videos)."""

    path: str
    start: float | None = None
    end: float | None = None

    def __str__(self) -> str:
        if self.start is None and self.end is None:
            return self.path
        return f"{self.path} [{self.start or 0:.2f}-{'' if self.end is None else f'{self.end:.2f}'}s]"


def as_clip(clip) -> Clip:
    """A Clip from a Clip, a path (str or PathLike) or a ``(path, start, end)`` tuple."""
    if isinstance(clip, Clip):
        return clip
    if isinstance(clip, (tuple, list)):
        path, start, end = clip
        return Clip(os.fspath(path), None if start is None else float(start), None if end is None else float(end))
    return Clip(os.fspath(clip))


@dataclass(frozen=True)
class MediaFailure:
    index: int
    clip: str
    reason: str


@dataclass
class MediaResult:
    """(N, dim) float32 features (zero rows where a clip failed) and what failed."""

    features: np.ndarray
    failures: list[MediaFailure] = field(default_factory=list)
    cache_hits: int = 0
    missing: int = 0  # utterances with no clip at all (None)

    @property
    def ok(self) -> int:
        return len(self.features) - len(self.failures) - self.missing

    def summary(self, what: str) -> str:
        """One line: ``audio: features for 10 of 13 utterances; 3 given zero features (1 unreadable,
        1 file not found, 1 without a clip); first: <clip>: <reason>``."""
        n = len(self.features)
        line = f"{what}: features for {self.ok} of {n} utterances"
        bad = len(self.failures) + self.missing
        if bad:
            absent = sum(f.reason == NOT_FOUND for f in self.failures)
            parts = [(len(self.failures) - absent, "unreadable"), (absent, NOT_FOUND),
                     (self.missing, "without a clip")]
            line += f"; {bad} given zero features ({', '.join(f'{k} {w}' for k, w in parts if k)})"
            if self.failures:
                first = self.failures[0]
                line += f"; first: {first.clip}: {first.reason}"
        if self.cache_hits:
            line += f"; {self.cache_hits} from the cache"
        return line


def _open(path: str):
    av = _av()
    p = Path(path)
    if not p.is_file():
        raise MediaError(NOT_FOUND if not p.exists() else "not a regular file")
    if p.stat().st_size == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        return av.open(str(p))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise MediaError(f"not a readable media file ({_reason(err, path)})") from None


def _reason(err: BaseException, path: str | None = None) -> str:
    """The library's message in one line, without the file name FFmpeg appends (the summary names it)."""
    text = getattr(err, "strerror", None) or str(err)
    if path:
        text = text.replace(f": '{path}'", "").replace(path, "")
    return " ".join(text.split())[:200] or type(err).__name__


@contextlib.contextmanager
def _first_stream(clip: Clip, kind: str):
    """The open container and its first ``kind`` ("audio", "video") stream; MediaError if it has none."""
    with _open(clip.path) as container:
        streams = getattr(container.streams, kind)
        if not streams:
            raise MediaError(f"no {kind} track")
        yield container, streams[0]


def decode_audio(clip: Clip | str | os.PathLike, sample_rate: int) -> np.ndarray:
    """The clip's first audio track as mono float32 at ``sample_rate`` Hz (FFmpeg's resampler).

    Raises MediaError for a missing or unreadable file, no audio track, or no samples.
    """
    clip = as_clip(clip)
    av = _av()
    chunks = []
    with _first_stream(clip, "audio") as (container, stream):
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        try:
            for frame in container.decode(stream):
                chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        except (av.FFmpegError, OSError, ValueError) as err:
            raise MediaError(f"audio decoding failed ({_reason(err)})") from None
    x = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if clip.start is not None or clip.end is not None:
        lo = int(round((clip.start or 0.0) * sample_rate))
        hi = len(x) if clip.end is None else int(round(clip.end * sample_rate))
        x = x[lo:hi]
    if x.size == 0:
        raise MediaError("no audio samples (zero length)")
    if not np.isfinite(x).all():
        raise MediaError("audio holds NaN or infinite samples")
    return x


def _frame_time(frame, stream) -> float | None:
    if frame.time is not None:
        return float(frame.time)
    if frame.pts is not None and stream.time_base is not None:
        return float(frame.pts * stream.time_base)
    return None


def read_frames(clip: Clip | str | os.PathLike, n: int) -> np.ndarray:
    """``n`` frames spread evenly over the clip (or its span [start, end) in seconds), as (n, H, W, 3) uint8 RGB.

    Frames are picked at evenly spaced positions (``linspace`` over the decoded
    frames, first and last included); a clip with fewer frames repeats some.
    Memory stays bounded on long clips: at most ``max(KEPT_FRAMES, 2 n)``
    decoded frames are held; when that many are, every other one is dropped
    and from then on only every other frame is kept (the kept ones stay evenly
    spaced), so the picks come from an even subsample of a long clip.
    Raises MediaError for a missing or unreadable file, no video track, or no frames.
    """
    clip = as_clip(clip)
    av = _av()
    frames: list = []
    cap, stride, seen = max(KEPT_FRAMES, 2 * n), 1, 0
    with _first_stream(clip, "video") as (container, stream):
        stream.thread_type = "AUTO"
        try:
            if clip.start:
                if stream.time_base is not None:
                    container.seek(int(clip.start / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = _frame_time(frame, stream)
                if clip.start is not None and t is not None and t < clip.start:
                    continue
                if clip.end is not None and t is not None and t >= clip.end:
                    break
                if seen % stride == 0:
                    frames.append(frame)
                    if len(frames) >= cap:
                        frames, stride = frames[::2], stride * 2
                seen += 1
        except (av.FFmpegError, OSError, ValueError) as err:
            if not frames:
                raise MediaError(f"video decoding failed ({_reason(err)})") from None
            # a damaged tail: use the frames decoded before it
        if not frames:
            raise MediaError("no video frames" + (" in the span" if clip.start or clip.end else " (zero length)"))
        picks = np.linspace(0, len(frames) - 1, n).round().astype(int)
        return np.stack([frames[i].to_ndarray(format="rgb24") for i in picks])


class ClipExtractor:
    """What the audio and visual extractors share: ``extract`` over many clips.

    A subclass sets ``kind`` (the cache folder) and has ``dim``, ``fingerprint``,
    ``workers``, ``progress`` and ``from_clip(clip) -> (dim,)``.
    """

    kind = "media"

    def extract(self, clips: Sequence[Clip | str | os.PathLike | tuple | None], cache: FeatureCache | None = None,
                *, desc: str | None = None) -> MediaResult:
        """(N, dim) features of ``clips`` (None: no clip), zero rows for what fails; cached per file and span."""
        return extract_clips(clips, self.from_clip, dim=self.dim, cache=cache, kind=self.kind,
                             fingerprint=self.fingerprint, workers=self.workers, progress=self.progress,
                             desc=desc or self.kind)


def extract_clips(clips: Sequence[Clip | None], compute: Callable[[Clip], np.ndarray], *, dim: int,
                  cache: FeatureCache | None, kind: str, fingerprint: str, workers: int = 1,
                  progress: bool = True, desc: str = "media") -> MediaResult:
    """``compute(clip)`` for every clip, through the cache, in ``workers`` threads.

    The cache key is the extractor's ``fingerprint``, the SHA-256 of the file's
    bytes and the span, so a renamed file still hits and an edited one does
    not. ``None`` (no clip for the utterance) and clips that raise MediaError
    get a zero row and are counted in the result; any other exception is a bug
    and propagates.
    """
    from tqdm.auto import tqdm

    clips = [None if c is None else as_clip(c) for c in clips]
    out = np.zeros((len(clips), dim), dtype=np.float32)
    failures: list[MediaFailure] = []
    hits = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        clip = clips[i]
        try:
            try:
                sha = file_sha256(clip.path)
            except OSError:
                sha = None  # missing or unreadable: compute() says which
            key = {"extractor": fingerprint, "file_sha256": sha, "start": clip.start, "end": clip.end}
            cached = cache.load(kind, key) if (cache is not None and sha) else None
            if cached is not None and cached.shape == (dim,):
                with lock:
                    hits[0] += 1
                out[i] = cached
                return
            x = np.asarray(compute(clip), dtype=np.float32).reshape(-1)
            if x.shape != (dim,):
                raise AssertionError(f"{kind} extractor returned {x.shape}, expected ({dim},)")
            if cache is not None and sha:
                cache.store(kind, key, x)
            out[i] = x
        except MediaError as err:
            with lock:
                failures.append(MediaFailure(i, str(clip), str(err)))

    todo = [i for i, c in enumerate(clips) if c is not None]
    with tqdm(total=len(todo), desc=desc, unit="clip", disable=not progress) as bar:
        if workers <= 1:
            for i in todo:
                one(i)
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, todo):
                    bar.update(1)
    failures.sort(key=lambda f: f.index)
    return MediaResult(out, failures, hits[0], missing=len(clips) - len(todo))
