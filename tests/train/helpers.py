"""Recipes and data for the training tests: tiny models, a few steps each."""
import json
import random
from pathlib import Path

import numpy as np

from lpq.config import from_dict
from lpq.train.recipe import TrainRecipe


def quant_section(scaling: str = "delayed", history_len: int = 4) -> dict:
    """HiF8 on every role: weight (current scaling), input, grad and attention q/k/v/p."""
    role = {"format": "hif8", "scaling": scaling, "history_len": history_len, "reduction": "max"}
    return {"weight": {"format": "hif8", "scaling": "current"}, "input": role, "grad": role,
            "attention": {"q": role, "k": role, "v": dict(role, axis=-2), "p": role}}


def write_corpus(path: Path) -> Path:
    """JSONL documents over tiny-llama's word vocabulary with a learnable pattern."""
    rng = random.Random(0)
    lines = []
    for _ in range(24):
        words = [f"w{(j * 7) % 50}" if j % 3 == 0 else f"w{rng.randrange(10)}" for j in range(120)]
        lines.append(json.dumps({"text": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_recipe(corpus: Path, out: Path, quant: dict | None = None, model: str = "tiny-llama",
                **train) -> TrainRecipe:
    cfg = {"output_dir": str(out), "steps": 6, "batch_size": 2, "lr": 1e-3, "bf16_warmup_steps": 2,
           "stats_every": 2, "lr_warmup_steps": 1}
    cfg.update(train)
    return from_dict({"model": {"id": model}, "quant": quant if quant is not None else quant_section(),
                      "train": cfg, "data": {"paths": [str(corpus)], "seq_len": 32, "eval_blocks": 4}},
                     TrainRecipe)


def write_clips(root, n=6):
    """Synthetic clips (moving gradients) in two file types, listed OpenS2V-style with absolute paths
    from another machine, plus one clip that does not exist."""
    rng = np.random.default_rng(0)
    (root / "part_1").mkdir(parents=True)
    records = []
    for i in range(n):
        t = np.arange(7)[:, None, None]
        y, x = np.mgrid[0:24, 0:40]
        frames = ((x[None] * 4 + t * 20 * (i + 1) + y[None] * i) % 256).astype(np.uint8)
        clip = np.stack([frames, np.roll(frames, i, axis=2), 255 - frames], axis=-1)
        clip = (clip + rng.integers(0, 8, clip.shape)).astype(np.uint8)
        if i % 2:
            from PIL import Image

            path = root / "part_1" / f"clip{i}.gif"
            imgs = [Image.fromarray(f) for f in clip]
            imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=40)
        else:
            path = root / "part_1" / f"clip{i}.npy"
            np.save(path, clip)
        records.append({"path": f"/home/datasets/OpenS2V-5M/part_1/{path.name}", "cap": f"w{i} w{i + 1} w3",
                        "num_frames": 7, "fps": 25.0})
    records.append({"path": "/home/datasets/OpenS2V-5M/part_9/gone.mp4", "cap": "w1", "num_frames": 7})
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in records))
    return captions
