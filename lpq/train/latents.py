"""`lpq prepare-data` for Wan: captioned clips -> cached normalized VAE latents and text embeddings.

Layout of the cache folder: `manifest.json` (settings, and one record per sample: file, caption, source)
and `samples/NNNNNN.safetensors` with `latents` (C, F, h, w) and `prompt_embeds` (L, D). Latents are the
VAE posterior mean, normalized with the VAE's latents_mean/std exactly as WanPipeline un-normalizes them
before decoding. Samples are written one by one, so an interrupted preparation continues where it stopped.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lpq.data.files import json_records, read_user_text
from lpq.train.recipe import VideoPrepConfig
from lpq.train.video_io import clip_to_vae_input, read_frames

CACHE_VERSION = 1


def read_caption_records(cfg: VideoPrepConfig) -> list[dict]:
    """(video path, caption) records from OpenS2V-style JSON/JSONL (`path` + `cap`, or `video` + `caption`)."""
    if cfg.captions is None or not cfg.captions.exists():
        where = "" if cfg.captions is None or cfg.captions.is_absolute() else f" (from {Path.cwd()})"
        raise FileNotFoundError(f"data.video.captions: {cfg.captions} does not exist{where}")
    path, text = read_user_text(cfg.captions, "data.video.captions")
    out = []
    for i, rec in json_records(path, text):
        path = rec.get("path", rec.get("video")) if isinstance(rec, dict) else None
        cap = rec.get("cap", rec.get("caption")) if isinstance(rec, dict) else None
        if not isinstance(path, str) or not isinstance(cap, str):
            raise ValueError(f"{cfg.captions}:{i}: a record needs string fields path/video and cap/caption")
        out.append({"path": path, "caption": cap})
    return out[: cfg.limit] if cfg.limit is not None else out


def locate(path: str, root: Path | None) -> Path | None:
    """The clip file: `path` itself, or under `root` by its shortest matching tail (re-roots absolute paths)."""
    p = Path(path)
    if root is None:
        return p if p.exists() else None
    parts = p.parts[1:] if p.is_absolute() else p.parts
    for k in range(len(parts)):
        candidate = root.joinpath(*parts[k:])
        if candidate.exists():
            return candidate
    return None


def _normalize(pipe, mean_latents: Tensor) -> Tensor:
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    return (mean_latents.float() - mean) / std


@dataclass
class Clips:
    """The caption records whose clip files exist: (record index, record, file), and the paths not found."""

    found: list[tuple[int, dict, Path]]
    missing: list[str]


def find_clips(cfg: VideoPrepConfig) -> Clips:
    """Read the captions and locate every clip (before any model or folder: a wrong root fails here)."""
    records = read_caption_records(cfg)
    found, missing = [], []
    for i, rec in enumerate(records):
        src = locate(rec["path"], cfg.video_root)
        if src is None:
            missing.append(rec["path"])
        else:
            found.append((i, rec, src))
    if not found:
        raise FileNotFoundError(f"none of the {len(records)} clips in {cfg.captions} was found"
                                + (f" under {cfg.video_root}" if cfg.video_root else "")
                                + "; set data.video.video_root to the folder that holds them")
    return Clips(found, missing)


@torch.no_grad()
def prepare_latent_cache(pipe, clips: Clips, cfg: VideoPrepConfig, out_dir: Path, model_id: str) -> dict:
    """Encode every clip found (`find_clips`); the missing ones are counted in the manifest. Returns the manifest."""
    from tqdm import tqdm

    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    store_dtype = pipe.transformer.dtype
    samples, missing = [], clips.missing
    for i, rec, src in tqdm(clips.found, desc="prepare-data", unit="clip", dynamic_ncols=True):
        name = f"{i:06d}.safetensors"   # named by record, so a re-run reuses what was already encoded
        target = samples_dir / name
        if not target.is_file():
            _encode_one(pipe, src, rec["caption"], cfg, target, store_dtype)
        samples.append({"file": name, "caption": rec["caption"], "source": str(src)})
    if missing:
        print(f"lpq prepare-data: {len(missing)} of {len(missing) + len(samples)} clips not found, skipped "
              f"(first: {missing[0]})", file=sys.stderr)
    manifest = {"version": CACHE_VERSION, "model": model_id, "num_frames": cfg.num_frames,
                "height": cfg.height, "width": cfg.width, "max_sequence_length": cfg.max_sequence_length,
                "missing": len(missing), "samples": samples}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _encode_one(pipe, src: Path, caption: str, cfg: VideoPrepConfig, target: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    x = clip_to_vae_input(read_frames(src), cfg.num_frames, cfg.height, cfg.width).to(pipe.vae.dtype)
    latents = _normalize(pipe, pipe.vae.encode(x).latent_dist.mean)[0]
    embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                   max_sequence_length=cfg.max_sequence_length, device=torch.device("cpu"))
    tmp = target.with_suffix(".tmp")
    save_file({"latents": latents.to(dtype).contiguous(), "prompt_embeds": embeds[0].to(dtype).contiguous()},
              str(tmp))
    tmp.rename(target)


class LatentCache:
    """Read access to a prepared cache; `batch` stacks samples as float32."""

    def __init__(self, cache_dir: Path):
        manifest_path = cache_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{cache_dir} is not a prepared latent cache (no manifest.json); run "
                                    "`lpq prepare-data --config <recipe>` first")
        self.dir = cache_dir
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"{cache_dir}: cache version {self.manifest.get('version')}, expected "
                             f"{CACHE_VERSION}; prepare it again")
        self.files = [cache_dir / "samples" / s["file"] for s in self.manifest["samples"]]

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        from safetensors.torch import load_file

        items = [load_file(str(self.files[i])) for i in indices]
        return (torch.stack([it["latents"] for it in items]).float(),
                torch.stack([it["prompt_embeds"] for it in items]).float())
