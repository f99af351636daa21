"""Calibration data: token sequences for LLMs (text file, JSONL, hub dataset) and prompts for Wan.

LLM calibration is `num_sequences` non-overlapping windows of `seq_len` tokens cut from the
tokenized text, evenly spread over it (deterministic: no sampling), so a run is reproducible and a
resumed run sees the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lpq.config import RecipePath
from lpq.data.files import json_records, read_user_text
from lpq.schema import KeyedError


@dataclass
class CalibrationConfig:
    """Where calibration data comes from. Exactly one of `domains`, `text_file`, `jsonl`, `dataset`,
    `prompts`.

    `domains`: built-in text domains (lpq/data/domains.py) -> relative weight; the `num_sequences`
    windows are shared out by weight, cut from each domain's calibration part, and interleaved
    domain by domain (so every batch, and every prefix of the data, holds the mix)."""

    domains: dict[str, float] | None = None
    text_file: RecipePath | None = None
    jsonl: RecipePath | None = None
    jsonl_field: str = "text"
    dataset: str | None = None            # hub dataset id (needs network or a local HF cache)
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_field: str = "text"
    num_sequences: int = 64
    seq_len: int = 512
    batch_size: int = 8
    # Wan: a prompt list (text file, one per line, or a JSON list / JSONL with `prompt`/`caption`)
    prompts: RecipePath | None = None
    num_prompts: int = 4
    timesteps: int = 8                    # denoising steps sampled per prompt
    height: int = 480
    width: int = 832
    num_frames: int = 17

    def __post_init__(self) -> None:
        sources = [s for s in (self.domains, self.text_file, self.jsonl, self.dataset, self.prompts) if s is not None]
        if len(sources) != 1:
            raise ValueError("set exactly one of domains, text_file, jsonl, dataset, prompts "
                             f"(got {len(sources)})")
        if self.domains is not None:
            from lpq.data.domains import check_names

            check_names(self.domains)
            if not self.domains:
                raise KeyedError("domains", "domains needs at least one domain")
            for name, weight in self.domains.items():
                if not weight > 0:
                    raise KeyedError(f"domains.{name}", f"domains.{name}: weights must be > 0, got {weight}")
        for name in ("num_sequences", "seq_len", "batch_size", "num_prompts", "timesteps"):
            if getattr(self, name) < 1:
                raise KeyedError(name, f"{name} must be >= 1, got {getattr(self, name)}")


def read_text(cfg: CalibrationConfig) -> str:
    """The raw calibration text of an LLM recipe; a file that cannot be read as such is refused in one
    line naming the key, the file and the line."""
    if cfg.text_file is not None:
        p, text = read_user_text(cfg.text_file, "calibration.text_file")
        if not text.strip():
            raise ValueError(f"calibration.text_file: {p} holds no text")
        return text
    if cfg.jsonl is not None:
        p, text = read_user_text(cfg.jsonl, "calibration.jsonl")
        texts = []
        for i, row in json_records(p, text, jsonl=True):
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{i}: expected a JSON object per line, got {type(row).__name__}")
            if cfg.jsonl_field not in row:
                raise ValueError(f"{p}:{i}: no field {cfg.jsonl_field!r} (fields: {', '.join(row) or 'none'}); "
                                 f"set calibration.jsonl_field")
            texts.append(str(row[cfg.jsonl_field]))
        if not texts:
            raise ValueError(f"calibration.jsonl: {p} holds no records")
        return "\n\n".join(texts)
    if cfg.dataset is not None:
        from datasets import load_dataset

        ds = load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.dataset_split)
        if cfg.dataset_field not in ds.column_names:
            raise ValueError(f"dataset {cfg.dataset} has no column {cfg.dataset_field!r} (columns: "
                             f"{', '.join(ds.column_names)}); set calibration.dataset_field")
        return "\n\n".join(str(t) for t in ds[cfg.dataset_field])
    raise ValueError("this calibration config holds prompts (for Wan), not text")


def token_windows(ids: Any, num: int, seq_len: int) -> Any:
    """`num` non-overlapping windows of `seq_len` tokens spread evenly over a 1-D id tensor."""
    import torch

    total = ids.numel() // seq_len
    if total < num:
        raise ValueError(f"the calibration text holds {total} windows of {seq_len} tokens ({ids.numel()} tokens), "
                         f"fewer than the {num} asked for: give more text, or fewer / shorter sequences")
    starts = torch.linspace(0, total - 1, num).round().long() * seq_len
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def domain_shares(weights: dict[str, float], total: int) -> dict[str, int]:
    """`total` windows shared out by weight (largest remainders; every domain gets at least one)."""
    if total < len(weights):
        raise ValueError(f"{total} sequences cannot hold one window of each of {len(weights)} domains")
    norm = sum(weights.values())
    raw = {d: total * w / norm for d, w in weights.items()}
    shares = {d: max(1, int(r)) for d, r in raw.items()}
    for d in sorted(raw, key=lambda d: raw[d] - int(raw[d]), reverse=True):
        if sum(shares.values()) >= total:
            break
        shares[d] += 1
    while sum(shares.values()) > total:          # the at-least-one rule overshot: take from the largest
        shares[max(shares, key=shares.get)] -= 1
    return shares


def calibration_tokens(cfg: CalibrationConfig, tokenizer) -> Any:
    """(num_sequences, seq_len) int64 token ids (a torch tensor) for an LLM."""
    import torch

    if cfg.domains is not None:
        from lpq.data.domains import Part, domain_windows

        parts = [domain_windows(d, Part.CALIBRATION, tokenizer, n, cfg.seq_len)
                 for d, n in domain_shares(cfg.domains, cfg.num_sequences).items()]
        order = sorted(((i, k) for k, p in enumerate(parts) for i in range(p.shape[0])))
        return torch.stack([parts[k][i] for i, k in order])
    ids = tokenizer(read_text(cfg), return_tensors="pt").input_ids[0]
    return token_windows(ids, cfg.num_sequences, cfg.seq_len)


def read_prompts(cfg: CalibrationConfig) -> list[str]:
    """Prompt list for Wan calibration: plain lines, a JSON list, or JSONL with `prompt`/`caption`."""
    if cfg.prompts is None:
        raise ValueError("calibration.prompts is required for a Wan model")
    p, text = read_user_text(cfg.prompts, "calibration.prompts")
    prompts: list[str] = []
    if p.suffix in (".json", ".jsonl"):
        for _, item in json_records(p, text):
            if isinstance(item, dict):
                item = item.get("prompt_en") or item.get("prompt") or item.get("caption") or item.get("text")
            prompts.append(item if isinstance(item, str) else None)
    else:
        prompts = [l.strip() for l in text.splitlines() if l.strip()]
    prompts = [q for q in prompts if q]
    if not prompts:
        raise ValueError(f"no prompts found in {p}")
    return prompts[:cfg.num_prompts]
