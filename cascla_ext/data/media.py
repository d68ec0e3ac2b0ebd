"""Where each utterance's media is, in the released layouts of MELD and IEMOCAP.

Readers attach per-utterance clips to ``RawDialogue.meta``: ``meta["audio"]``
and ``meta["video"]``, lists as long as the dialogue holding a path, a
``(path, start, end)`` span in seconds, or None where the utterance has no
clip. A clip that is listed but missing or unreadable is found out at
extraction time (zero features and a count in the summary), not here.

MELD (``MELD.Raw``): one ``dia{D}_utt{U}.mp4`` per utterance, in a folder per
split: ``train_splits/``, ``dev_splits_complete/``,
``output_repeated_splits_test/`` as the archives unpack (``train/``, ``dev/``,
``test/`` are accepted too). The video's audio track gives the audio.

IEMOCAP (``IEMOCAP_full_release``): ``Session{n}/sentences/wav/<dialogue>/<utterance>.wav``
per utterance, and ``Session{n}/dialog/avi/DivX/<dialogue>.avi`` per dialogue,
cut by the time stamps of ``Session{n}/dialog/transcriptions/<dialogue>.txt``
(lines ``Ses01F_impro01_F000 [6.2901-8.2357]: Excuse me.``). COSMIC's text
pickle has no utterance ids, so each utterance is matched to the transcript
line with the same speaker and text, in order.
"""

from __future__ import annotations

import re
from pathlib import Path

from .raw import DataError

__all__ = ["MELD_MEDIA_FOLDERS", "iemocap_media", "meld_media_folders", "read_transcript"]

#: split -> folder names tried under --media-dir, first found wins.
MELD_MEDIA_FOLDERS = {
    "train": ("train_splits", "train"),
    "val": ("dev_splits_complete", "dev_splits", "dev"),
    "test": ("output_repeated_splits_test", "test_splits", "test"),
}
_TRANSCRIPT_LINE = re.compile(r"^(?P<id>Ses\d+[MF]_\S+?_(?P<spk>[MF])\S*)\s+\[(?P<start>\d+(?:\.\d*)?)-"
                              r"(?P<end>\d+(?:\.\d*)?)\]:\s?(?P<text>.*)$")


def _media_root(media_dir: str | Path, dataset: str) -> Path:
    root = Path(media_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{dataset}: --media-dir {root} is not a directory")
    return root.resolve()


def meld_media_folders(media_dir: str | Path, splits) -> dict[str, Path | None]:
    """The clip folder of each split present in ``splits`` (None where it has none).

    DataError if ``media_dir`` is not a folder or holds none of the expected ones.
    """
    root = _media_root(media_dir, "MELD")
    found = {s: next((root / n for n in MELD_MEDIA_FOLDERS[s] if (root / n).is_dir()), None) for s in splits}
    if not any(found.values()):
        names = ", ".join(n + "/" for s in splits for n in MELD_MEDIA_FOLDERS[s][:1])
        raise DataError(f"MELD: --media-dir {root} holds none of the clip folders of MELD's release ({names}, "
                        "each with dia<D>_utt<U>.mp4 files)")
    return found


def read_transcript(path: Path) -> list[tuple[str, str, float, float, str]]:
    """An IEMOCAP transcription file -> [(utterance id, speaker, start, end, text)] by start time."""
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"IEMOCAP: cannot read {path} ({err.strerror})") from None
    for line in text.splitlines():
        m = _TRANSCRIPT_LINE.match(line.strip())
        if m:
            out.append((m["id"], m["spk"], float(m["start"]), float(m["end"]), m["text"]))
    return sorted(out, key=lambda e: e[2])


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def iemocap_media(media_dir: str | Path, dialogue_id: str, speakers: list[str],
                  texts: list[str]) -> tuple[list, list, list]:
    """(audio clips, video spans, utterance ids) of one IEMOCAP dialogue; None where not matched."""
    root = _media_root(media_dir, "IEMOCAP")
    n = len(texts)
    audio: list = [None] * n
    video: list = [None] * n
    ids: list = [None] * n
    m = re.match(r"^Ses0*(\d+)", dialogue_id)
    if not m:
        return audio, video, ids
    session = root / f"Session{int(m.group(1))}"
    transcript = session / "dialog" / "transcriptions" / f"{dialogue_id}.txt"
    if not transcript.is_file():
        return audio, video, ids
    entries = read_transcript(transcript)
    avi = session / "dialog" / "avi" / "DivX" / f"{dialogue_id}.avi"
    pos = 0
    for j, (spk, text) in enumerate(zip(speakers, texts)):
        want = _norm(text)
        for k in range(pos, len(entries)):
            uid, e_spk, start, end, e_text = entries[k]
            if e_spk == spk and _norm(e_text) == want:
                ids[j] = uid
                audio[j] = str(session / "sentences" / "wav" / dialogue_id / f"{uid}.wav")
                video[j] = (str(avi), start, end)
                pos = k + 1
                break
    return audio, video, ids
