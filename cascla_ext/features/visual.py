"""Utterance-level visual features: frames sampled from each clip through a
torchvision CNN whose weights come from a local file (nothing downloads).

| backbone     | kind | width | frames, size (default) | paper setting                          |
| ------------ | ---- | ----- | ---------------------- | -------------------------------------- |
| densenet121  | 2-D  | 1024  | 8 frames, 224 x 224    | MELD: DenseNet per frame, mean-pooled  |
| r3d_18       | 3-D  | 512   | 16 frames, 112 x 112   | IEMOCAP: a 3-D CNN over the clip       |

2-D: each sampled frame goes through the network up to its global average
pooling; the frame vectors are averaged. 3-D: the sampled frames are one
clip (3, T, H, W). Frames are resized (bilinear, antialiased) to size x size
and normalised with the statistics the torchvision weights were trained
with (ImageNet for DenseNet, Kinetics-400 for R3D).

Weights: ``weights=PATH`` (a state dict saved with ``torch.save``, e.g.
torchvision's ``densenet121-a639ec97.pth``), else torchvision's file name in
the local torch hub cache (``$TORCH_HOME/hub/checkpoints``). A missing file
is a :class:`MissingWeightsError` that says where to put it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._extras import MEDIA, require
from .cache import file_sha256
from .media import Clip, ClipExtractor, read_frames

__all__ = ["DEFAULT_VISUAL_BACKBONE", "VISUAL_BACKBONES", "MissingWeightsError", "VisualExtractor",
           "default_weights_path"]

#: backbone -> (kind, width, default frames, default size, torchvision's weight file, mean, std)
VISUAL_BACKBONES = {
    "densenet121": ("2d", 1024, 8, 224, "densenet121-a639ec97.pth",
                    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "r3d_18": ("3d", 512, 16, 112, "r3d_18-b3b3357e.pth",
               (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)),
}
DEFAULT_VISUAL_BACKBONE = "densenet121"
# torchvision's DenseNet files predate its module names: "norm.1" -> "norm1"
_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                           r"running_var))$")


class MissingWeightsError(FileNotFoundError):
    """The CNN's weight file is not where it was looked for; the message says where to put it."""


def _torchvision():
    return require("torchvision", "visual features (cascla_ext.features.visual)", MEDIA)


def default_weights_path(backbone: str) -> Path:
    """Where torchvision's weights for ``backbone`` sit in the local torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VISUAL_BACKBONES[backbone][4]


def _build(backbone: str) -> torch.nn.Module:
    models = _torchvision().models
    if backbone == "densenet121":
        return models.densenet121(weights=None)
    return models.video.r3d_18(weights=None)


def _load_state(path: Path, backbone: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle, zip or tensor error: all mean "not a state dict file"
        raise ValueError(f"--visual-weights {path}: not a readable torch state dict "
                         f"({' '.join(str(err).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--visual-weights {path}: expected a state dict of tensors for {backbone}")
    if backbone == "densenet121":
        state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return state


class VisualExtractor(ClipExtractor):
    """Per-utterance visual features from a torchvision CNN with local weights.

    backbone: a name of ``VISUAL_BACKBONES``.
    weights: the weight file; None: torchvision's file in the torch hub cache.
    frames, size: frames sampled per clip and their side in pixels (defaults
        per backbone, see the table above).
    """

    kind = "visual"

    def __init__(self, backbone: str = DEFAULT_VISUAL_BACKBONE, weights: str | os.PathLike | None = None, *,
                 frames: int | None = None, size: int | None = None, device: str | torch.device = "cpu",
                 workers: int = 1, progress: bool = True):
        if backbone not in VISUAL_BACKBONES:
            raise ValueError(f"visual backbone must be one of {', '.join(VISUAL_BACKBONES)}, got {backbone!r}")
        spec = VISUAL_BACKBONES[backbone]
        self.backbone = backbone
        self.frames = spec[2] if frames is None else int(frames)
        self.size = spec[3] if size is None else int(size)
        if self.frames < 1 or self.size < 32:
            raise ValueError(f"visual frames must be >= 1 and size >= 32 pixels, got {self.frames} and {self.size}")
        path = Path(weights).expanduser() if weights is not None else default_weights_path(backbone)
        if not path.is_file():
            where = (f"--visual-weights {path} does not exist" if weights is not None
                     else f"no --visual-weights given and {path} (the local torch hub cache) does not exist")
            raise MissingWeightsError(
                f"visual features ({backbone}): {where}; nothing is downloaded: save the {backbone} weights "
                f"(torchvision's {spec[4]}, a state dict) to {default_weights_path(backbone)} or pass "
                "--visual-weights PATH")
        self.weights = str(path.resolve())
        self.weights_sha256 = file_sha256(path)
        model = _build(backbone)
        try:
            model.load_state_dict(_load_state(path, backbone))
        except RuntimeError as err:
            raise ValueError(f"--visual-weights {path}: not {backbone} weights "
                             f"({' '.join(str(err).split())[:200]})") from None
        if backbone == "r3d_18":
            model.fc = torch.nn.Identity()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.mean = torch.tensor(spec[5]).view(3, 1, 1)
        self.std = torch.tensor(spec[6]).view(3, 1, 1)
        self.workers = workers
        self.progress = progress

    def __repr__(self) -> str:
        return (f"VisualExtractor({self.backbone!r}, dim={self.dim}, frames={self.frames}, size={self.size}, "
                f"weights={self.weights!r})")

    @property
    def dim(self) -> int:
        return VISUAL_BACKBONES[self.backbone][1]

    @property
    def settings(self) -> dict:
        """What changes the features (and a checkpoint records)."""
        return {"backbone": self.backbone, "frames": self.frames, "size": self.size,
                "weights_sha256": self.weights_sha256}

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({**self.settings, "torchvision": _torchvision().__version__}, sort_keys=True)
        return f"{self.backbone}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def _pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, 3, size, size) normalised float32."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        """(dim,) features of (n, H, W, 3) uint8 RGB frames."""
        x = self._pixels(frames).to(self.device)
        if VISUAL_BACKBONES[self.backbone][0] == "2d":
            h = F.relu(self.model.features(x))
            h = F.adaptive_avg_pool2d(h, 1).flatten(1).mean(0)
        else:
            h = self.model(x.transpose(0, 1).unsqueeze(0))[0]
        return h.float().cpu().numpy()

    def from_clip(self, clip: Clip | str) -> np.ndarray:
        return self.from_frames(read_frames(clip, self.frames))
