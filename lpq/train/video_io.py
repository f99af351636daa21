"""Reading video clips as uint8 frames and shaping them into Wan VAE input.

Containers (.mp4, .webm, .mkv, .mov, .avi) are decoded with PyAV when it is installed; animated GIF/WebP
(Pillow), .npy arrays (T, H, W, 3) uint8 and folders of image frames need nothing extra.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CONTAINERS = {".mp4", ".webm", ".mkv", ".mov", ".avi"}
IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def read_frames(path: Path) -> Tensor:
    """All frames of a clip as uint8 (T, H, W, 3)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGES)
        if not files:
            raise ValueError(f"{path}: folder holds no image frames ({', '.join(sorted(IMAGES))})")
        arr = np.stack([_rgb(p) for p in files])
    elif path.suffix == ".npy":
        arr = np.load(path)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{path}: expected uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
    elif path.suffix.lower() in (".gif", ".webp"):
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            arr = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    elif path.suffix.lower() in CONTAINERS:
        arr = _decode_container(path)
    else:
        raise ValueError(f"{path}: unsupported video type; use {', '.join(sorted(CONTAINERS))}, .gif, .npy "
                         "or a folder of frames")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _decode_container(path: Path) -> np.ndarray:
    try:
        import av
    except ImportError:
        raise ImportError(f"{path}: decoding {path.suffix} needs PyAV (`pip install av`); or convert the clips "
                          "to frame folders / .npy") from None
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames decoded")
    return np.stack(frames)


def clip_to_vae_input(frames: Tensor, num_frames: int, height: int, width: int) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 (1, 3, num_frames, height, width) in [-1, 1].

    Frames are picked evenly over the whole clip (repeating frames when the clip is shorter); each frame is
    resized so it covers height x width, then center-cropped, as Wan's data pipelines do.
    """
    idx = torch.linspace(0, frames.shape[0] - 1, num_frames).round().long()
    x = frames[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1)        # (T, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(-1, 1)
    return x.permute(1, 0, 2, 3).unsqueeze(0)
