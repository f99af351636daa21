"""Paired video evaluation of Wan pipelines: same prompts, same seeds, baseline vs candidate.

Metrics need no downloaded weights: VBench's temporal-flickering score of each video, and, against
the baseline video of the same prompt and seed, per-frame PSNR and SSIM of the decoded frames and
the MSE of the final latents (captured at the last denoising step, before the VAE).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lpq.eval.settings import EvalSettings, VideoSettings, resolve_data_dir
from lpq.eval.stats import mean_abs_pct_loss, paired_compare

PSNR_CAP_DB = 100.0   # identical frames have infinite PSNR; JSON has no infinity


def load_prompts(settings: EvalSettings) -> list[str]:
    """The first `num_prompts` prompts of the prompt file (VBench format or a list of strings)."""
    vs = settings.video
    if vs.prompts_file:
        path = Path(vs.prompts_file).expanduser()
    else:
        data = resolve_data_dir(settings.data_dir)
        path = (data / "video" / "vbench_prompts.json") if data else Path("video/vbench_prompts.json")
    if not path.is_file():
        raise FileNotFoundError(f"video prompts {path} not found: set eval.video.prompts_file to a JSON list of "
                                f'strings or of {{"prompt_en": ...}} objects, or --data-dir to a folder with '
                                f"video/vbench_prompts.json")
    items = json.loads(path.read_text())
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(item)
        elif vs.dimension is None or vs.dimension in item.get("dimension", []):
            prompts.append(item["prompt_en"])
    if len(prompts) < vs.num_prompts:
        raise ValueError(f"{path} has {len(prompts)} prompts"
                         f"{f' tagged {vs.dimension!r}' if vs.dimension else ''}, fewer than num_prompts={vs.num_prompts}")
    return prompts[:vs.num_prompts]


def generate(pipe, prompt: str, seed: int, vs: VideoSettings) -> tuple[np.ndarray, torch.Tensor]:
    """Frames (T, H, W, 3) float32 in [0, 1] and the final latents of one seeded generation."""
    captured: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe, step, _t, kwargs):
        captured["latents"] = kwargs["latents"].detach().float().cpu().clone()
        return kwargs

    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt=prompt, height=vs.height, width=vs.width, num_frames=vs.num_frames,
                   num_inference_steps=vs.steps, guidance_scale=vs.guidance_scale, generator=generator,
                   max_sequence_length=vs.max_sequence_length, output_type="np",
                   callback_on_step_end=keep_latents, callback_on_step_end_tensor_inputs=["latents"])
    frames = np.asarray(out.frames[0], dtype=np.float32)
    return frames, captured["latents"]


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def flicker_score(frames_uint8: np.ndarray) -> float:
    """VBench temporal flickering: (255 - mean |frame_t+1 - frame_t|) / 255 on 8-bit frames; 1 = static."""
    if frames_uint8.shape[0] < 2:
        raise ValueError("temporal flickering needs at least 2 frames")
    diffs = np.abs(frames_uint8[1:].astype(np.float64) - frames_uint8[:-1].astype(np.float64))
    mae = diffs.reshape(diffs.shape[0], -1).mean(1).mean()
    return float((255.0 - mae) / 255.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the PSNR (dB) of frames in [0, 1]; capped at PSNR_CAP_DB."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(a.shape[0], -1).mean(1)
    per_frame = [PSNR_CAP_DB if m <= 10 ** (-PSNR_CAP_DB / 10) else -10.0 * math.log10(m) for m in mse]
    return float(np.mean(per_frame))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over frames and channels (Gaussian window, data range 1, valid region only)."""
    x = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3])
    y = torch.from_numpy(b.astype(np.float64)).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3])
    size = min(window, a.shape[1], a.shape[2])
    size -= 1 - size % 2                                   # odd, and no larger than the frame
    w = _gaussian_window(size, sigma)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx = F.conv2d(x * x, w) - mx ** 2
    vy = F.conv2d(y * y, w) - my ** 2
    cxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def save_video(frames_uint8: np.ndarray, folder: Path, fps: int = 8) -> None:
    """PNG frames plus an animated GIF for viewing (PIL only; no video encoder needed)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames_uint8]
    for i, im in enumerate(images):
        im.save(folder / f"frame_{i:04d}.png")
    images[0].save(folder / "video.gif", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def run_vbench(python: str, videos: Path, out: Path, dimensions: list[str]) -> dict:
    """Run the real VBench in its own venv (`python`) on the saved PNG frames; returns its scores."""
    runner = Path(__file__).with_name("vbench_runner.py")
    cmd = [python, str(runner), "--frames", str(videos), "--out", str(out), "--dimensions", ",".join(dimensions)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"VBench run failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_paired_video(baseline, candidate, settings: EvalSettings, out_dir: str | Path, model_name: str = "wan",
                     recipe: dict | None = None) -> dict:
    """Generate every (prompt, seed) with both pipelines, save frames, compare; returns results.json."""
    from tqdm.auto import tqdm

    from lpq.config import to_dict
    from lpq.eval.report import write_report

    vs = settings.video
    out = Path(out_dir)
    prompts = load_prompts(settings)
    jobs = [(p, s) for p in prompts for s in vs.seeds]
    per_video, t0 = [], time.time()
    for k, (prompt, seed) in enumerate(tqdm(jobs, desc="videos (baseline + quantized)", unit="video")):
        fb, lb = generate(baseline, prompt, seed, vs)
        fc, lc = generate(candidate, prompt, seed, vs)
        ub, uc = to_uint8(fb), to_uint8(fc)
        save_video(ub, out / "videos" / "baseline" / f"v{k:03d}_seed{seed}")
        save_video(uc, out / "videos" / "quantized" / f"v{k:03d}_seed{seed}")
        latent_mse = float(((lb - lc) ** 2).mean())
        per_video.append({"prompt": prompt, "seed": seed, "flicker_baseline": flicker_score(ub),
                          "flicker_quantized": flicker_score(uc), "psnr_db": psnr(fb, fc), "ssim": ssim(fb, fc),
                          "latent_mse": latent_mse, "latent_rel_mse": latent_mse / max(float((lb ** 2).mean()), 1e-30)})
    flicker = paired_compare([v["flicker_baseline"] for v in per_video], [v["flicker_quantized"] for v in per_video],
                             iters=settings.bootstrap, seed=settings.seed)
    results: dict = {
        "model": model_name,
        "tasks": {"video_flicker": {**flicker, "agreement": None, "metric": "vbench_temporal_flickering",
                                    "kind": "video", "higher_is_better": True,
                                    "data": ", ".join(prompts), "subset": f"{len(prompts)} prompts x seeds {vs.seeds}"}},
        "video": {"n": len(per_video), "psnr_db": float(np.mean([v["psnr_db"] for v in per_video])),
                  "ssim": float(np.mean([v["ssim"] for v in per_video])),
                  "latent_mse": float(np.mean([v["latent_mse"] for v in per_video])),
                  "per_video": per_video},
    }
    results["mean_abs_pct_loss"] = mean_abs_pct_loss([flicker["rel_loss_pct"]])
    results["mean_abs_pct_loss_tasks"] = ["video_flicker"]
    if vs.vbench_python:
        dims = ["temporal_flickering"]
        results["vbench"] = {
            "baseline": run_vbench(vs.vbench_python, out / "videos" / "baseline", out / "vbench" / "baseline", dims),
            "quantized": run_vbench(vs.vbench_python, out / "videos" / "quantized", out / "vbench" / "quantized",
                                    dims)}
    results["timing_s"] = {"total": round(time.time() - t0, 2)}
    results.update({"chat_template": None, "enable_thinking": None, "settings": to_dict(settings), "recipe": recipe,
                    "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}})
    write_report(results, out)
    return results
