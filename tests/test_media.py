"""Audio and visual features from raw media (the [media] extra): decoding,
openSMILE and CNN features, the cache, MELD / IEMOCAP / JSONL media layouts,
and a --modalities t,a,v run through the CLI. All media is made here: speech
synthesised with espeak-ng, videos written with PyAV's encoders."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="PyAV (av) is not installed: pip install 'cascla-ext[media]'")
pytest.importorskip("opensmile", reason="opensmile is not installed: pip install 'cascla-ext[media]'")
pytest.importorskip("torchvision", reason="torchvision is not installed: pip install 'cascla-ext[media]'")
pytest.importorskip("transformers", reason="transformers is not installed: pip install 'cascla-ext[erc]'")

import av  # noqa: E402

from cascla_ext.data.raw import DataError  # noqa: E402
from cascla_ext.features import FeatureCache  # noqa: E402
from cascla_ext.features.audio import AudioExtractor  # noqa: E402
from cascla_ext.features.media import Clip, MediaError, decode_audio, read_frames  # noqa: E402
from cascla_ext.features.visual import MissingWeightsError, VisualExtractor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (apt-get install espeak-ng): "
                                                         "the tests synthesise speech with it")
RATE = 16000
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]


# --------------------------------------------------------------------------- media made in the test

def speak(path: Path, text: str, voice: str = "en") -> Path:
    subprocess.run([ESPEAK, "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


def tone(seconds: float = 0.8, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _mux(out, stream, frame=None) -> None:
    """Encode ``frame`` (None: flush the encoder) and write its packets."""
    for packet in stream.encode(frame):
        out.mux(packet)


def _mux_audio(out, stream, samples: np.ndarray, fmt: str) -> None:
    """All of ``samples`` as one mono frame at RATE, then the encoder flushed."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format=fmt, layout="mono")
    frame.sample_rate, frame.pts = RATE, 0
    _mux(out, stream, frame)
    _mux(out, stream)


def write_video(path: Path, colours=COLOURS, audio: np.ndarray | None = None, fps: int = 10,
                frames_per_colour: int = 3) -> Path:
    """A small .mp4 (MPEG-4 video, AAC audio at 16 kHz where ``audio`` is given) of coloured frames."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=RATE, layout="mono") if audio is not None else None
        for colour in colours:
            img = np.empty((48, 64, 3), np.uint8)
            img[:] = colour
            for _ in range(frames_per_colour):
                _mux(out, v, av.VideoFrame.from_ndarray(img, format="rgb24"))
        _mux(out, v)
        if a is not None:
            _mux_audio(out, a, audio, "fltp")
    return path


def write_flac(path: Path, signal: np.ndarray) -> Path:
    with av.open(str(path), "w") as out:
        _mux_audio(out, out.add_stream("flac", rate=RATE, layout="mono"), (signal * 32767).astype(np.int16), "s16")
    return path


def random_weights(path: Path, backbone: str) -> Path:
    """A state dict of a randomly initialised torchvision CNN, standing in for released weights."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.densenet121() if backbone == "densenet121" else torchvision.models.video.r3d_18()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """One clip of each kind: speech (.wav, .flac, .mp4), a video without an audio
    track, a zero-length file, a corrupt file, and a path that does not exist."""
    d = tmp_path_factory.mktemp("media")
    out = {}
    if ESPEAK:
        out["wav"] = speak(d / "speech.wav", "I can't believe you did that to me")
        speech = decode_audio(out["wav"], RATE)
    else:
        speech = tone()
    out["flac"] = write_flac(d / "speech.flac", speech)
    out["mp4"] = write_video(d / "speech.mp4", audio=speech)
    out["silent_video"] = write_video(d / "silent.mp4", colours=COLOURS[::-1])
    out["tone_video"] = write_video(d / "tone.mp4", colours=COLOURS[:2], audio=tone())
    (d / "empty.mp4").write_bytes(b"")
    out["empty"] = d / "empty.mp4"
    with wave.open(str(d / "zero.wav"), "wb") as w:  # a valid header, no samples
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"")
    out["zero_wav"] = d / "zero.wav"
    with av.open(str(d / "zero.mp4"), "w") as zero:  # video and audio streams declared, nothing encoded
        v = zero.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        zero.add_stream("aac", rate=RATE, layout="mono")
        zero.start_encoding()
    out["zero_mp4"] = d / "zero.mp4"
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out["corrupt"] = d / "corrupt.mp4"
    out["missing"] = d / "missing.mp4"
    return out


@pytest.fixture(scope="module")
def densenet_weights(tmp_path_factory) -> Path:
    return random_weights(tmp_path_factory.mktemp("weights") / "densenet121.pth", "densenet121")


def test_torchvision_is_the_build_for_this_torch():
    # torchvision's compiled ops load only with the torch it was built for
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2], f"torchvision {torchvision.__version__} with torch {torch.__version__}"


# --------------------------------------------------------------------------- decoding

@needs_espeak
def test_decode_wav_flac_and_video_audio_track_agree(media):
    wav = decode_audio(media["wav"], RATE)
    flac = decode_audio(media["flac"], RATE)
    mp4 = decode_audio(media["mp4"], RATE)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert 1.0 < len(wav) / RATE < 5.0  # espeak-ng's sentence: a second or two
    np.testing.assert_allclose(flac, wav, atol=1e-3)  # 16-bit FLAC of the same samples
    assert abs(len(mp4) - len(wav)) < 0.15 * RATE  # AAC adds priming and padding
    # resampling follows the rate asked for
    assert abs(len(decode_audio(media["wav"], 8000)) - len(wav) / 2) <= 2


def test_decode_errors_are_media_errors(media):
    cases = {"silent_video": "no audio track", "empty": "empty file", "corrupt": "not a readable media file",
             "missing": "file not found", "zero_wav": r"no audio samples \(zero length\)",
             "zero_mp4": "no audio track"}
    for name, reason in cases.items():
        with pytest.raises(MediaError, match=reason):
            decode_audio(media[name], RATE)
    for name, reason in (("flac", "no video track"), ("zero_mp4", "no video track"), ("empty", "empty file")):
        with pytest.raises(MediaError, match=reason):
            read_frames(media[name], 4)


def test_read_frames_samples_evenly_and_spans(media):
    frames = read_frames(media["silent_video"], 4)  # 12 frames: 3 of each colour, reversed order
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    # frames 0, 4, 7 and 11 of 12: the four colours in the clip's (reversed) order
    means = frames.reshape(4, -1, 3).mean(1)
    assert np.abs(means - np.array(COLOURS[::-1])).max() < 25
    # a span [0.6, 0.9] s of a 10 fps clip holds only the third colour (frames 6-8 of the original order)
    span = read_frames(Clip(str(media["silent_video"]), 0.6, 0.85), 2)
    assert np.abs(span.reshape(2, -1, 3).mean(1) - COLOURS[::-1][2]).max() < 25
    with pytest.raises(MediaError, match="no video frames"):
        read_frames(Clip(str(media["silent_video"]), 50.0, 60.0), 2)


def test_read_frames_holds_few_frames_of_a_long_clip(tmp_path, monkeypatch):
    import cascla_ext.features.media as M

    path = write_video(tmp_path / "long.mp4", frames_per_colour=25)  # 100 frames, 25 of each colour
    full = read_frames(path, 4)
    monkeypatch.setattr(M, "KEPT_FRAMES", 4)  # hold at most 8: the clip is thinned to every 16th frame
    thin = read_frames(path, 4)
    for frames in (full, thin):
        assert np.abs(frames.reshape(4, -1, 3).mean(1) - np.array(COLOURS)).max() < 25


# --------------------------------------------------------------------------- audio features

@needs_espeak
@pytest.mark.parametrize("feature_set,dim", [("eGeMAPSv02", 88), ("IS10", 1582)])
def test_audio_features_shape_and_determinism(media, feature_set, dim):
    extractor = AudioExtractor(feature_set, progress=False)
    assert extractor.dim == dim
    a = extractor.extract([media["wav"], media["mp4"], media["tone_video"]]).features
    b = AudioExtractor(feature_set, progress=False, workers=2).extract(
        [media["wav"], media["mp4"], media["tone_video"]]).features
    assert a.shape == (3, dim) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # deterministic, also in parallel
    assert np.abs(a[0]).sum() > 0
    # the same speech through AAC stays close to the wav, a tone does not (the median over
    # the features: a few ratios such as stddevNorm, std / mean, swing where the mean is near 0)
    assert np.median(np.abs(a[0] - a[1])) < 0.25 * np.median(np.abs(a[0] - a[2]))


def test_audio_unusable_clips_get_zero_rows_and_a_count(media):
    clips = [media["tone_video"], media["silent_video"], media["empty"], media["corrupt"], media["missing"], None,
             media["zero_wav"], media["zero_mp4"]]
    result = AudioExtractor(progress=False).extract(clips)
    assert result.features.shape == (8, 88)
    assert np.abs(result.features[0]).sum() > 0
    assert not result.features[1:].any()
    assert [f.index for f in result.failures] == [1, 2, 3, 4, 6, 7] and result.missing == 1 and result.ok == 1
    assert result.failures[0].reason == "no audio track"
    line = result.summary("audio")
    assert "features for 1 of 8 utterances" in line
    assert "7 given zero features (5 unreadable, 1 file not found, 1 without a clip)" in line


def test_audio_full_scale_samples_are_clipped_not_wrapped():
    # openSMILE gets int16 samples: 1.2 must become 32767, not wrap to a negative value
    extractor = AudioExtractor(progress=False)
    loud = tone(0.8) * 4.0  # peaks near 1.8
    clipped = np.clip(loud, -1.0, 32767 / 32768)
    np.testing.assert_array_equal(extractor.from_signal(loud), extractor.from_signal(clipped))


def test_audio_rejects_unknown_feature_set():
    with pytest.raises(ValueError, match="eGeMAPSv02"):
        AudioExtractor("GeMAPS_v9")


def test_audio_cache_hits_by_content(media, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    extractor = AudioExtractor(progress=False)
    first = extractor.extract([media["tone_video"], media["flac"]], cache)
    assert first.cache_hits == 0
    entries = sorted((tmp_path / "cache" / "audio").glob("*.npy"))
    assert len(entries) == 2
    copy = tmp_path / "renamed.mp4"
    shutil.copy(media["tone_video"], copy)
    again = AudioExtractor(progress=False).extract([copy, media["flac"]], cache)
    assert again.cache_hits == 2  # keyed by the bytes, not the name
    np.testing.assert_array_equal(again.features, first.features)
    # another feature set, another entry; a changed file, a miss
    AudioExtractor("IS09", progress=False).extract([copy], cache)
    assert len(list((tmp_path / "cache" / "audio").glob("*.npy"))) == 3
    write_video(copy, colours=COLOURS[:1], audio=tone(0.5, 440.0))
    changed = extractor.extract([copy], cache)
    assert changed.cache_hits == 0 and not np.array_equal(changed.features[0], first.features[0])
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave nothing half-written


# --------------------------------------------------------------------------- visual features

@pytest.mark.parametrize("backbone,dim", [("densenet121", 1024), ("r3d_18", 512)])
def test_visual_features_with_random_weights(media, tmp_path, backbone, dim):
    weights = random_weights(tmp_path / f"{backbone}.pth", backbone)
    extractor = VisualExtractor(backbone, weights, frames=4, size=64, progress=False)
    clips = [media["silent_video"], media["tone_video"], media["flac"], media["corrupt"]]
    result = extractor.extract(clips)
    assert result.features.shape == (4, dim) and np.isfinite(result.features).all()
    assert np.abs(result.features[:2]).sum(1).min() > 0 and not result.features[2:].any()
    assert [f.reason for f in result.failures][0] == "no video track"
    assert not np.allclose(result.features[0], result.features[1])  # other colours, other features
    again = VisualExtractor(backbone, weights, frames=4, size=64, progress=False).extract(clips[:2]).features
    np.testing.assert_allclose(again, result.features[:2], rtol=1e-5, atol=1e-6)


def test_visual_weights_missing_or_wrong_are_one_clear_error(tmp_path, densenet_weights, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError, match=r"densenet121-a639ec97\.pth.*--visual-weights PATH") as err:
        VisualExtractor("densenet121")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MissingWeightsError, match="--visual-weights .*nope.pth does not exist"):
        VisualExtractor("densenet121", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not r3d_18 weights"):
        VisualExtractor("r3d_18", densenet_weights)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        VisualExtractor("densenet121", tmp_path / "junk.pth")
    # the local torch hub cache is where the default is looked up
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    cached.parent.mkdir(parents=True)
    shutil.copy(densenet_weights, cached)
    assert VisualExtractor("densenet121").weights == str(cached.resolve())


# --------------------------------------------------------------------------- dataset layouts

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]
MELD_ROWS = {  # (dialogue, utterance, speaker, text, emotion)
    "train": [(0, 0, "Ross", "This is wonderful news!", "joy"), (0, 1, "Rachel", "Get out of my room!", "anger"),
              (0, 2, "Ross", "The meeting is at noon.", "neutral"), (1, 0, "Monica", "I love it, thanks!", "joy"),
              (1, 1, "Joey", "Stop lying to me!", "anger"), (2, 0, "Ross", "It is Tuesday.", "neutral"),
              (2, 1, "Chandler", "Yay, we won!", "joy"), (3, 0, "Rachel", "I am so furious with you.", "anger"),
              (3, 1, "Ross", "I put the keys on the table.", "neutral")],
    "val": [(0, 0, "Ross", "We won the game!", "joy"), (0, 1, "Rachel", "Leave me alone!", "anger"),
            (1, 0, "Joey", "It is Monday.", "neutral"), (1, 1, "Monica", "So happy for you!", "joy")],
}


def write_meld(tmp_path: Path, *, corrupt: tuple = (), silent: tuple = (), absent: tuple = ()) -> tuple[Path, Path]:
    """MELD's CSVs and clips as released: train_splits/ and dev_splits_complete/ of dia{D}_utt{U}.mp4."""
    data, clips = tmp_path / "meld", tmp_path / "MELD.Raw"
    data.mkdir()
    folders = {"train": ("train_sent_emo.csv", "train_splits"), "val": ("dev_sent_emo.csv", "dev_splits_complete")}
    rng = np.random.default_rng(0)
    for split, (csv_name, folder) in folders.items():
        (clips / folder).mkdir(parents=True)
        with open(data / csv_name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(MELD_HEADER)
            for k, (d, u, speaker, text, emotion) in enumerate(MELD_ROWS[split]):
                w.writerow([k + 1, text, speaker, emotion, "neutral", d, u, 1, 1, "00:00:01,000", "00:00:02,000"])
                key, path = (split, d, u), clips / folder / f"dia{d}_utt{u}.mp4"
                if key in absent:
                    continue
                if key in corrupt:
                    path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
                    continue
                freq = {"joy": 440.0, "anger": 300.0, "neutral": 180.0}[emotion]
                colour = {"joy": COLOURS[3], "anger": COLOURS[0], "neutral": COLOURS[2]}[emotion]
                write_video(path, colours=[colour, COLOURS[(k + u) % 4]], frames_per_colour=2,
                            audio=None if key in silent else tone(0.6, freq + 10 * k))
    return data, clips


def test_meld_media_layout_matches_utterance_ids(tmp_path):
    from cascla_ext.data.meld import read_meld

    data, clips = write_meld(tmp_path, absent=(("train", 1, 1),))
    raw = read_meld(data, media_dir=clips)
    d0 = raw.splits["train"][0]
    assert d0.meta["audio"] == [str(clips.resolve() / "train_splits" / f"dia0_utt{u}.mp4") for u in range(3)]
    assert d0.meta["video"] == d0.meta["audio"]
    val = raw.splits["val"][1]
    assert val.meta["audio"][1] == str(clips.resolve() / "dev_splits_complete" / "dia1_utt1.mp4")
    # utterance ids with gaps keep their own clip names
    train_csv = data / "train_sent_emo.csv"
    train_csv.write_text(train_csv.read_text().replace(",2,1,1,1,", ",2,5,1,1,"))  # dialogue 2: utterances 0, 5
    raw = read_meld(data, media_dir=clips)
    assert raw.splits["train"][2].meta["audio"][1].endswith("dia2_utt5.mp4")
    assert "audio" not in read_meld(data).splits["train"][0].meta  # no --media-dir, no clips
    with pytest.raises(DataError, match="train_splits/"):
        read_meld(data, media_dir=tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        read_meld(data, media_dir=tmp_path / "nowhere")


def _iemocap(tmp_path: Path) -> tuple[Path, Path]:
    """COSMIC's text pickle and an IEMOCAP_full_release tree: sentence wavs,
    the dialogue .avi and its transcript (with a line COSMIC dropped)."""
    dialogue = "Ses01F_impro01"
    speakers, texts = ["F", "M", "F"], ["Excuse me.", "Do you have your forms?", "Yeah."]
    data = tmp_path / "iemocap"
    data.mkdir()
    with open(data / "iemocap.pkl", "wb") as fh:
        pickle.dump([{dialogue: speakers, "Ses02M_script01_1": ["M"]}, {dialogue: [2, 3, 2], "Ses02M_script01_1": [0]},
                     {dialogue: texts, "Ses02M_script01_1": ["Hello."]}, [dialogue], ["Ses02M_script01_1"], []], fh)
    root = tmp_path / "IEMOCAP_full_release"
    session = root / "Session1"
    (session / "dialog" / "transcriptions").mkdir(parents=True)
    (session / "dialog" / "transcriptions" / f"{dialogue}.txt").write_text(
        f"{dialogue}_F000 [000.0000-000.3000]: Excuse me.\n"
        f"{dialogue}_M000 [000.3000-000.6000]: [LAUGHTER]\n"  # not in COSMIC's pickle
        f"{dialogue}_M001 [000.6000-000.9000]: Do you have  your forms?\n"
        f"{dialogue}_F001 [000.9000-001.1500]: Yeah.\n"
        "M: unrelated line\n")
    (session / "dialog" / "avi" / "DivX").mkdir(parents=True)
    write_video(session / "dialog" / "avi" / "DivX" / f"{dialogue}.avi", frames_per_colour=3)
    wavs = session / "sentences" / "wav" / dialogue
    wavs.mkdir(parents=True)
    for k, uid in enumerate(("F000", "M001", "F001")):
        # FLAC bytes under a .wav name: decoded by content, not by the name
        write_flac(wavs / f"{dialogue}_{uid}.wav", tone(0.3, 200.0 + 50 * k))
    return data, root


def test_iemocap_media_layout_matches_transcript(tmp_path):
    from cascla_ext.data.iemocap import read_iemocap

    data, root = _iemocap(tmp_path)
    raw = read_iemocap(data, media_dir=root)
    d = raw.splits["train"][0]
    assert d.meta["utterance_ids"] == ["Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses01F_impro01_F001"]
    wav_dir = root.resolve() / "Session1" / "sentences" / "wav" / "Ses01F_impro01"
    assert d.meta["audio"] == [str(wav_dir / f"{u}.wav") for u in d.meta["utterance_ids"]]
    avi = str(root.resolve() / "Session1" / "dialog" / "avi" / "DivX" / "Ses01F_impro01.avi")
    assert d.meta["video"] == [(avi, 0.0, 0.3), (avi, 0.6, 0.9), (avi, 0.9, 1.15)]
    # a dialogue without a transcript gets no clips, and is not an error
    assert raw.splits["test"][0].meta["audio"] == [None]
    # the spans cut the dialogue video: the first utterance sees the first colour only
    frames = read_frames(Clip(*d.meta["video"][0]), 2)
    assert np.abs(frames.reshape(2, -1, 3).mean(1) - COLOURS[0]).max() < 25


def test_iemocap_audio_and_3d_visual_features(tmp_path):
    # the paper's IEMOCAP setting: a 3-D CNN over each utterance's span of the dialogue video
    from cascla_ext.data import FeatureOptions, load_dataset

    data, root = _iemocap(tmp_path)
    weights = random_weights(tmp_path / "r3d.pth", "r3d_18")
    options = FeatureOptions(audio="IS10", visual="r3d_18", visual_weights=str(weights), visual_frames=4,
                             visual_size=32, use_cache=False, progress=False)
    corpus = load_dataset("iemocap", data_dir=str(data), features=options, media_dir=str(root))
    assert corpus.input_dims == {"t": 384, "a": 1582, "v": 512}
    d = corpus.split("train")[0]
    assert d.features["a"].any(axis=1).all() and d.features["v"].any(axis=1).all()
    # three utterances, three spans of different colours: three different visual vectors
    assert len({tuple(np.round(v, 4)) for v in d.features["v"]}) == 3
    assert not corpus.split("test")[0].features["a"].any()  # no transcript: zeros, counted
    # what extraction resolved is in the corpus's spec (the options given are not changed)
    assert [line.split(": ", 2)[2].split(";")[0] for line in corpus.spec.features.media_report] == \
        ["features for 3 of 4 utterances"] * 2


def test_jsonl_media_paths(tmp_path):
    from cascla_ext.data.jsonl import read_jsonl_file

    (tmp_path / "clips").mkdir()
    path = tmp_path / "dialogues.jsonl"
    utts = [{"speaker": "A", "text": "Hi", "audio": "clips/a.wav", "video": "clips/a.mp4"},
            {"speaker": "B", "text": "Yo", "audio": str(tmp_path / "b.flac")}, {"speaker": "A", "text": "Bye"}]
    path.write_text(json.dumps({"id": "d1", "utterances": utts}) + "\n"
                    + json.dumps({"id": "d2", "utterances": [{"speaker": "A", "text": "x"}]}) + "\n")
    raw = read_jsonl_file(path)
    d1, d2 = raw.splits["test"]
    assert d1.meta["audio"] == [str(tmp_path / "clips" / "a.wav"), str(tmp_path / "b.flac"), None]
    assert d1.meta["video"] == [str(tmp_path / "clips" / "a.mp4"), None, None]
    assert d2.meta["audio"] == [None]
    path.write_text(json.dumps({"id": "d1", "utterances": [{"speaker": "A", "text": "x", "audio": 3}]}) + "\n")
    with pytest.raises(DataError, match=r'dialogues.jsonl:1: dialogue .d1., utterance 0: "audio" must be a media'):
        read_jsonl_file(path)


def test_prepare_extracts_media_with_zero_rows_for_bad_clips(tmp_path):
    from cascla_ext.data import FeatureOptions, load_dataset

    data, clips = write_meld(tmp_path, corrupt=(("train", 0, 1),), silent=(("train", 1, 0),),
                             absent=(("val", 1, 1),))
    options = FeatureOptions(audio="eGeMAPSv02", cache_dir=str(tmp_path / "cache"), progress=False)
    corpus = load_dataset("meld", data_dir=str(data), features=options, media_dir=str(clips))
    assert corpus.input_dims["a"] == 88 and "v" not in corpus.input_dims
    train = corpus.split("train")
    assert not train[0].features["a"][1].any() and train[0].features["a"][0].any()
    assert not train[1].features["a"][0].any()
    assert not corpus.split("val")[1].features["a"][1].any()
    report = corpus.spec.features.media_report  # what extraction resolved (the options given are not changed)
    assert len(report) == 1
    assert "features for 10 of 13 utterances; 3 given zero features (2 unreadable, 1 file not found)" \
        in report[0]
    first = str(clips.resolve() / "train_splits" / "dia0_utt1.mp4")
    assert f"first: {first}: not a readable media file (Invalid data" in report[0]
    # without media, asking for audio is one clear error
    with pytest.raises(DataError, match="audio features need media: pass --media-dir"):
        load_dataset("meld", data_dir=str(data), features=FeatureOptions(audio="eGeMAPSv02", use_cache=False,
                                                                          progress=False))


# --------------------------------------------------------------------------- the CLI end to end

@pytest.mark.slow
def test_cli_train_evaluate_predict_with_audio_and_visual(tmp_path, densenet_weights, capsys):
    from cascla_ext.cli import main
    from cascla_ext.model import CaSCLA

    data, clips = write_meld(tmp_path, corrupt=(("train", 0, 1),), absent=(("val", 1, 1),))
    (data / "test_sent_emo.csv").write_text((data / "dev_sent_emo.csv").read_text())
    shutil.copytree(clips / "dev_splits_complete", clips / "output_repeated_splits_test")
    cache, run = tmp_path / "cache", tmp_path / "run"
    common = ["--cache-dir", str(cache), "--quiet"]
    rc = main(["train", "--dataset", "meld", "--data-dir", str(data), "--media-dir", str(clips), "--out", str(run),
               "--modalities", "t,a,v", "--visual-weights", str(densenet_weights), "--visual-frames", "2",
               "--visual-size", "64", "--epochs", "2", "--batch-size", "2", "--preset", "small", *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = "features for 14 of 17 utterances; 3 given zero features (1 unreadable, 2 file not found)"
    lines = err.strip().splitlines()
    assert lines[0].startswith("meld: audio (opensmile-eGeMAPSv02-") and summary in lines[0]
    assert lines[1].startswith("meld: visual (densenet121-") and summary in lines[1]
    model, extra = CaSCLA.load_checkpoint(run / "model.pt")
    assert model.config.modalities == ("t", "a", "v")
    assert model.config.input_dims["a"] == 88 and model.config.input_dims["v"] == 1024
    features = extra["data"]["features"]
    assert features["audio"] == "eGeMAPSv02" and features["audio_sample_rate"] == 16000
    assert features["visual"] == "densenet121"
    assert features["visual_frames"] == 2 and features["visual_size"] == 64
    assert features["visual_weights"] == str(densenet_weights.resolve())
    assert len(features["visual_weights_sha256"]) == 64
    assert extra["data"]["reader_options"]["media_dir"] == str(clips.resolve())
    assert features["media_extractors"]["a"].startswith("opensmile-eGeMAPSv02-")
    assert features["media_extractors"]["v"].startswith("densenet121-")

    # evaluate rebuilds the same features from the cache (same extractor fingerprints)
    n_cached = len(list(cache.rglob("*.npy")))
    rc = main(["evaluate", "--checkpoint", str(run / "model.pt"), "--split", "test", "--json", *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["n"] == 4
    assert len(list(cache.rglob("*.npy"))) == n_cached
    assert [line.rsplit("; ", 1)[1] for line in err.strip().splitlines()] == ["14 from the cache"] * 2

    # a checkpoint whose audio came from another extractor build: rebuilt, with a warning naming both
    state = torch.load(run / "model.pt", weights_only=False)
    state["data"]["features"]["media_extractors"]["a"] = "opensmile-eGeMAPSv02-0000000000000000"
    torch.save(state, tmp_path / "older.pt")
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "older.pt"), "--split", "test", "--json", *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "warning: the audio features are rebuilt with opensmile-eGeMAPSv02-" in err
    assert "trained on opensmile-eGeMAPSv02-0000000000000000's" in err

    # other weights than the checkpoint's: refused in one line
    other = random_weights(tmp_path / "other.pth", "densenet121")
    with torch.no_grad():
        state = torch.load(other)
        state["features.conv0.weight"] += 1
        torch.save(state, other)
    rc = main(["evaluate", "--checkpoint", str(run / "model.pt"), "--visual-weights", str(other), *common])
    out, err = capsys.readouterr()
    assert rc == 2 and "not the weights the model was trained with" in err and err.count("\n") == 1

    # predict reads the clips a JSON Lines file names
    lines = {"id": "p1", "utterances": [
        {"speaker": "A", "text": "We won!", "audio": str(clips / "train_splits" / "dia2_utt1.mp4"),
         "video": str(clips / "train_splits" / "dia2_utt1.mp4")},
        {"speaker": "B", "text": "Get out!", "audio": "missing.wav"}]}
    (tmp_path / "in.jsonl").write_text(json.dumps(lines) + "\n")
    rc = main(["predict", "--checkpoint", str(run / "model.pt"), "--input", str(tmp_path / "in.jsonl"), "--json",
               *common])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 2
    assert "audio" in err and "features for 1 of 2 utterances" in err
    rc = main(["predict", "--checkpoint", str(run / "model.pt"), "--input", str(tmp_path / "in.jsonl"),
               "--media-dir", str(clips), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "--media-dir is for meld and iemocap" in err


def test_cli_media_errors_are_one_line(tmp_path, capsys):
    from cascla_ext.cli import main

    data, clips = write_meld(tmp_path)
    rc = main(["train", "--dataset", "meld", "--data-dir", str(data), "--out", str(tmp_path / "run"),
               "--modalities", "t,a", "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "audio features need media: pass --media-dir" in err and err.count("\n") == 1
    rc = main(["train", "--dataset", "meld", "--data-dir", str(data), "--media-dir", str(clips), "--out",
               str(tmp_path / "run"), "--audio-features", "nope", "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "--audio-features must be one of eGeMAPSv02" in err
    rc = main(["train", "--dataset", "meld", "--data-dir", str(data), "--media-dir", str(clips), "--out",
               str(tmp_path / "run"), "--modalities", "t,v", "--visual-weights", str(tmp_path / "no.pth"),
               "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "no.pth does not exist" in err and "--visual-weights PATH" in err and err.count("\n") == 1
    rc = main(["train", "--dataset", "jsonl", "--data-dir", str(data), "--media-dir", str(clips), "--out",
               str(tmp_path / "run"), "--quiet", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "--media-dir is for meld and iemocap" in err and '"audio", "video"' in err


def test_synthetic_with_all_modalities_needs_no_media_extractor(tmp_path):
    # the built-in corpus has its own audio and visual features: --modalities t,a,v extracts nothing
    import os
    import sys

    code = (f"import sys; from cascla_ext.cli import main; "
            f"rc = main(['train', '--dataset', 'synthetic', '--modalities', 't,a,v', '--epochs', '1', '--out', "
            f"{str(tmp_path / 'run')!r}, '--quiet']); "
            "print(rc, sorted(m for m in sys.modules if m.startswith('cascla_ext.features')))")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout
