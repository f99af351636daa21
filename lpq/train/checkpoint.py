"""Checkpoints: model (with the quantizers' scaling buffers), optimizer and RNG through accelerate's
save_state (sharded correctly under FSDP), plus the LR scheduler and the loop's own state.

A checkpoint is written to a temporary folder and renamed when complete, so a run killed while saving
leaves the previous checkpoint intact; only the newest `keep` are kept.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

PREFIX = "step_"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(accelerator, scheduler, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Every rank calls this (accelerate saves per-rank RNG and, under FSDP, shards)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()   # save_state has no barrier: every rank's RNG file must be in tmp
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "lr_scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in final.parent.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, scheduler, path: Path) -> dict:
    """Restore model, optimizer, RNG (via accelerate) and the scheduler; returns the loop state."""
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
