"""Recipes and data for the training tests: tiny models, a few steps each."""
import json
import random
from pathlib import Path

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
