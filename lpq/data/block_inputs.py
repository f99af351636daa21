"""Block inputs for block-sequential calibration: capture the first block's inputs, then walk the blocks.

No graph tracing: a forward pre-hook on block 0 records (hidden_states, other args, kwargs) for each
calibration batch. For LLMs it then stops the forward (the rest of the model never runs); for Wan
the denoising loop must run to produce latents at every timestep, so the hook only records. Each
block is then run on the recorded inputs to produce the next block's inputs; only one set of hidden
states is alive at a time, kept on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


class _Stop(Exception):
    """Raised by the capture hook to end an LLM forward after block 0's inputs are recorded."""


@dataclass
class BlockInputs:
    """Inputs of one block for every calibration batch: hidden states plus the rest of the call."""

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    def tokens(self) -> int:
        return sum(h[..., 0].numel() for h in self.hidden)


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def block_device(block: nn.Module) -> torch.device:
    for p in block.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def capture(first_block: nn.Module, feed: Callable[[], None], stop: bool) -> BlockInputs:
    """Record first_block's inputs while `feed()` runs the model; `stop` ends each forward there."""
    rec = BlockInputs()

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        rec.hidden.append(hidden.detach().cpu())
        rec.args.append(_to(rest, "cpu"))
        rec.kwargs.append({k: _to(v, "cpu") for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
        if stop:
            raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        feed()
    finally:
        handle.remove()
    if not rec.hidden:
        raise RuntimeError("calibration produced no inputs for the first block")
    return rec


def feed_causal_lm(model: nn.Module, tokens: Tensor, batch_size: int) -> Callable[[], None]:
    """A feed that runs the LLM on token batches, swallowing the capture hook's early stop."""
    def run() -> None:
        device = block_device(model)
        for i in range(0, tokens.shape[0], batch_size):
            try:
                with torch.no_grad():
                    model(input_ids=tokens[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    return run


def block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: BlockInputs, index: int) -> Tensor:
    """block(inputs[index]) on the block's device; the output back on CPU."""
    dev = block_device(block)
    with torch.no_grad():
        out = block(inputs.hidden[index].to(dev), *_to(inputs.args[index], dev), **_to(inputs.kwargs[index], dev))
    return block_output(out).detach().cpu()


def iterate(block: nn.Module, inputs: BlockInputs) -> Iterator[Tensor]:
    for i in range(len(inputs)):
        yield run_block(block, inputs, i)


def advance(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The next block's inputs: this block's outputs, with the same other arguments."""
    return BlockInputs([out for out in iterate(block, inputs)], inputs.args, inputs.kwargs)
