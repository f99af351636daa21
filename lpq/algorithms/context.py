"""What PTQ steps see: the run (model, recipe, networks) and one block with its calibration inputs.

The model is the runtime model from the start: `quantize_model` made its linears `QuantLinear`s
(quantization switched off until a block is done), so a step edits the same modules that are
evaluated and exported: weights through `set_quantized_weight`, online transforms through
`QuantLinear.input_transform` (an `InputTransform`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn

from lpq.data.block_inputs import BlockInputs, iterate, run_block
from lpq.memory import release_freed_memory
from lpq.models.offload import is_offloaded
from lpq.quant.apply import set_quant_enabled_in
from lpq.quant.linear import QuantLinear

if TYPE_CHECKING:
    from lpq.algorithms.step import Step
    from lpq.models.adapters import Adapter
    from lpq.models.hub import LoadedModel
    from lpq.models.kinds import ModelKind
    from lpq.pipelines.ptq_config import PTQConfig


@dataclass
class Stage:
    """One stack of blocks calibrated in order: an LLM's decoder, or one transformer of a Wan pipeline."""

    name: str                  # the network's name in the model ("" for a plain model)
    net: nn.Module
    offset: int                # global index of its first block
    blocks: list[nn.Module]


@dataclass
class RunContext:
    cfg: PTQConfig
    loaded: LoadedModel
    adapter: Adapter
    stages: list[Stage]
    out_dir: Path
    checkpoint_dir: Path
    calibration_data: Any = None     # what the model kind feeds (token windows, prompts)
    _float: Any = field(default=None, repr=False)
    _windows: dict = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> ModelKind:
        return self.adapter.model_kind

    @property
    def offloaded(self) -> bool:
        return any(is_offloaded(st.net) for st in self.stages)

    @property
    def weight_format(self) -> str:
        return self.cfg.quant.weight.format

    @property
    def input_format(self) -> str | None:
        return self.cfg.quant.input.format if self.cfg.quant.input is not None else None

    def require_whole_model(self, what: str) -> None:
        """Refuse a step that works on every weight at once when accelerate offloads some of them."""
        if self.offloaded:
            raise ValueError(f"{what}, which offloaded weights (model.device_map with cpu/disk offload) do not "
                             f"allow; drop it or load the model whole")

    def float_model(self) -> Any:
        """The unquantized model, loaded once per run as the recipe loads it (offloaded weights go to a
        folder of their own so they cannot overwrite the quantized model's); steps and the evaluation
        share it, read-only."""
        if self._float is None:
            from lpq.models.hub import load_model

            model_cfg = self.cfg.model
            if model_cfg.offload_dir:
                model_cfg = dataclasses.replace(model_cfg, offload_dir=str(Path(model_cfg.offload_dir) / "float"))
            self._float = load_model(model_cfg).model
        return self._float

    def release_float_model(self) -> None:
        """Let the unquantized model's memory go (a step that has taken what it needs from it); the next
        `float_model()` loads it again, the same weights from the same files."""
        self._float = None
        gc.collect()
        release_freed_memory()

    def text_windows(self, num: int, seq_len: int) -> Tensor:
        """`num` windows of `seq_len` tokens of the calibration text (refused for models without text); cut
        once per run (a step's check and its work ask for the same ones)."""
        if (num, seq_len) not in self._windows:
            self._windows[num, seq_len] = self.kind.text_windows(self.loaded, self.cfg.calibration, num, seq_len)
        return self._windows[num, seq_len]

    def resume_file(self, step: Step) -> Path:
        """Where a step keeps its own progress within this run: named by the step and a hash of its
        settings, so a rerun with other settings starts that step over (removed when the whole run
        starts over)."""
        from lpq.config import to_dict

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(json.dumps(to_dict(step.settings), sort_keys=True).encode()).hexdigest()[:10]
        return self.checkpoint_dir / f"{step.name}-{digest}.pt"


@dataclass
class LinearGroup:
    """Linears of a block that read the same tensor (q/k/v, gate/up): quantized together."""

    names: list[str]
    linears: list[QuantLinear]


class _Reached(Exception):
    """Raised by a capture hook: the rest of the block's forward is not needed."""


_GROUPS: dict[tuple, list[list[str]]] = {}


@dataclass
class BlockContext:
    index: int                      # global block index (over every stage)
    stage: Stage
    module: nn.Module
    inputs: BlockInputs | None      # None while blocks are prepared (data-free)
    protected: bool = False
    stats: dict[str, Any] = field(default_factory=dict)

    def linears(self) -> dict[str, QuantLinear]:
        """The block's linears that get quantized, by name relative to the block."""
        return {n: m for n, m in self.module.named_modules() if isinstance(m, QuantLinear) and not m.is_plain()}

    def all_linears(self) -> dict[str, QuantLinear]:
        """Every QuantLinear of the block, quantized or kept in high precision (for transforms)."""
        return {n: m for n, m in self.module.named_modules() if isinstance(m, QuantLinear)}

    def groups(self) -> list[LinearGroup]:
        """The quantized linears grouped by shared input, in forward order (found by watching one
        forward; blocks of one model share their structure, so the answer is kept per block class)."""
        lins = self.linears()
        key = (type(self.module).__qualname__, tuple(lins))
        if key not in _GROUPS:
            _GROUPS[key] = self._watch_groups(lins)
        return [LinearGroup(names, [lins[n] for n in names]) for names in _GROUPS[key]]

    def _watch_groups(self, lins: dict[str, QuantLinear]) -> list[list[str]]:
        seen: dict[int, list[str]] = {}
        alive = []   # hold the inputs so a freed tensor's address cannot be reused within the forward
        def watch(name: str, x: Tensor) -> None:
            alive.append(x)
            seen.setdefault(id(x), []).append(name)

        with self._hooks(lins, watch):
            next(iterate(self.module, self._first_batch()))
        groups = list(seen.values())
        # Linears the watched batch did not reach (unrouted experts) are quantized last, one by one.
        return groups + [[n] for n in lins if not any(n in g for g in groups)]

    def _first_batch(self) -> BlockInputs:
        return BlockInputs(self.inputs.hidden[:1], self.inputs.args[:1], self.inputs.kwargs[:1])

    @contextlib.contextmanager
    def _hooks(self, lins: dict[str, nn.Module], fn) -> Iterator[None]:
        """fn(name, raw input) before each linear's forward (before its input transform)."""
        def hook(name: str):
            def pre(module: nn.Module, args: tuple) -> None:
                fn(name, args[0])
            return pre

        handles = [lin.register_forward_pre_hook(hook(name), prepend=True) for name, lin in lins.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def set_quant_enabled(self, on: bool) -> None:
        set_quant_enabled_in(self.module, on)

    def outputs(self, batches: int | None = None) -> list[Tensor]:
        """The block's outputs on its calibration inputs (the first `batches` batches), as it is now."""
        inputs = self.inputs if batches is None else BlockInputs(
            self.inputs.hidden[:batches], self.inputs.args[:batches], self.inputs.kwargs[:batches])
        return list(iterate(self.module, inputs))

    def input_absmax(self, names: list[str]) -> dict[str, Tensor]:
        """Per input channel, max |x| over the calibration inputs of each named linear, before its
        input transform, with the block's quantization off."""
        lins = self.all_linears()
        amax: dict[str, Tensor] = {}

        def record(name: str, x: Tensor) -> None:
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)

        self.set_quant_enabled(False)
        with self._hooks({n: lins[n] for n in names}, record):
            for _ in iterate(self.module, self.inputs):
                pass
        return amax

    def linear_inputs(self, name: str) -> Iterator[Tensor]:
        """For each calibration batch, the input of linear `name` as its matmul sees it (input
        transform, then input quantization), with the block's quantization on: the linears before
        it are already quantized. The forward stops once the linear has its input."""
        lin = self.all_linears()[name]
        got: list[Tensor] = []

        def stop(m, args):
            got.append(lin.prepare_input(args[0]).detach())
            raise _Reached

        self.set_quant_enabled(True)
        handle = lin.register_forward_pre_hook(stop)
        try:
            for i in range(len(self.inputs)):
                try:
                    run_block(self.module, self.inputs, i)
                except _Reached:
                    pass
                if got:
                    yield got.pop()
        finally:
            handle.remove()
