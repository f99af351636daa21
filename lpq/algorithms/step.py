"""The PTQ step protocol: each algorithm is a `Step` with a settings dataclass, registered by name.

The pipeline (lpq/pipelines/ptq.py) knows no algorithm by name. It walks the model and calls the
hooks of the recipe's steps, phase by phase, in the recipe's order within a phase:

1. `on_model_start(run)`: whole-model edits of the float model, before anything is captured
   (e.g. the residual-stream rotation);
2. `on_prepare_block(run, block)`: data-free edits of each block, applied to every block before
   the sensitivity ranking sees the model (e.g. the block Hadamard);
3. for each block in order, with the block's inputs from the already-quantized blocks before it:
   `on_block_start(run, block)` (data-driven transforms, e.g. SmoothQuant), then for each group of
   linears sharing one input, in forward order, `quantize_group(run, block, group)` of the recipe's
   one weight quantizer (RTN, GPTQ, ...), then `on_block_end(run, block)`;
4. `on_model_end(run)` on the finished quantized model (e.g. end-to-end norm distillation); it
   returns the entries it adds to the report, and `report_line` says them in one line.

A step's `phase` says where it may stand in a recipe: MODEL steps first, then TRANSFORM steps, then
exactly one QUANTIZE step, then REFINE steps. Within TRANSFORM, a step that writes the input scale
of a linear's online transform must come before one that writes its rotation (the runtime's
InputTransform divides by the scale, then rotates). `check_order` refuses any other order with the
rule it breaks. `check_recipe(quant)` refuses quantizer formats the step cannot work with when the
recipe is read (before any model loads); `check(run)` refuses a model or setup the step cannot handle,
before any work.

State that must survive an interruption is returned by `state_dict()` and given back with
`load_state_dict()`: the pipeline saves it with every finished block. Per-linear state lives in the
runtime modules themselves (QuantLinear, InputTransform), which the block checkpoint holds.

To add an algorithm: one module with a dataclass of settings and a `@register` Step subclass; list
its module in BUILTIN_STEPS (or import it before loading the recipe, as a plugin would).
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from lpq.algorithms.context import BlockContext, LinearGroup, RunContext
    from lpq.models.kinds import ModelKind
    from lpq.quant.recipe import QuantRecipe


class Phase(enum.IntEnum):
    MODEL = 0       # rewrites the whole float model before calibration
    TRANSFORM = 1   # function-preserving edits of blocks of the float model
    QUANTIZE = 2    # puts the weights of each group of linears on the format's grid (exactly one)
    REFINE = 3      # works on the finished quantized model


@dataclasses.dataclass
class NoSettings:
    """A step without settings."""


class Step:
    name: ClassVar[str]
    Settings: ClassVar[type] = NoSettings
    phase: ClassVar[Phase]
    # Which part of a linear's online InputTransform this step writes: "scale" or "rotation".
    transform_part: ClassVar[str | None] = None

    def __init__(self, settings: Any = None):
        self.settings = settings if settings is not None else self.Settings()

    def check_recipe(self, quant: QuantRecipe) -> None:
        """Raise ValueError for quantizer formats this step cannot work with (called as the recipe is read)."""

    def check_kind(self, kind: ModelKind) -> None:
        """Raise ValueError for a kind of model this step cannot work on (known from the model's files,
        checked before any folder is made or weight read)."""

    def online_parts(self) -> tuple[str, ...]:
        """The parts of the linears' online input transform ("scale", "rotation") this step always leaves
        in the quantized model, for any model: what an export's runtime must apply."""
        return ()

    def check(self, run: RunContext) -> None:
        """Raise ValueError for a model or setup this step cannot handle (called before any work)."""

    def on_model_start(self, run: RunContext) -> None:
        pass

    def on_prepare_block(self, run: RunContext, block: BlockContext) -> None:
        pass

    def on_block_start(self, run: RunContext, block: BlockContext) -> None:
        pass

    def quantize_group(self, run: RunContext, block: BlockContext, group: LinearGroup) -> None:
        raise NotImplementedError(f"{self.name} does not quantize weights")

    def on_block_end(self, run: RunContext, block: BlockContext) -> None:
        pass

    def on_model_end(self, run: RunContext) -> dict | None:
        return None

    def report_line(self, entries: dict) -> str | None:
        """One line for report.md about what on_model_end returned (None: nothing to say)."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# name -> module defining it; imported on first use, so a recipe loads only the steps it names.
BUILTIN_STEPS = {
    "rotate_residual": "lpq.algorithms.rotation",
    "smoothquant": "lpq.algorithms.smoothquant",
    "hadamard": "lpq.algorithms.hadamard",
    "rtn": "lpq.algorithms.rtn",
    "scale_search": "lpq.algorithms.rtn",
    "gptq": "lpq.algorithms.gptq",
    "norm_distill": "lpq.algorithms.norm_distill",
}
_REGISTRY: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make a Step available to recipes under `cls.name`."""
    if not getattr(cls, "name", None) or not isinstance(getattr(cls, "phase", None), Phase):
        raise TypeError(f"{cls.__name__} needs a `name` and a `phase` to be registered as a step")
    if not dataclasses.is_dataclass(cls.Settings):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass")
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"step name {cls.name!r} is already taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def step_names() -> list[str]:
    return sorted(set(BUILTIN_STEPS) | set(_REGISTRY))


def step_class(name: str) -> type[Step]:
    if name not in _REGISTRY and name in BUILTIN_STEPS:
        importlib.import_module(BUILTIN_STEPS[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; use one of " + ", ".join(repr(n) for n in step_names()))
    return _REGISTRY[name]


@dataclasses.dataclass
class StepSpec:
    """One `algorithms:` entry of a recipe: `name` and that step's own settings (flat in YAML)."""

    name: str
    settings: Any = None

    def __post_init__(self) -> None:
        cls = step_class(self.name)
        if self.settings is None:
            self.settings = cls.Settings()
        elif not isinstance(self.settings, cls.Settings):
            raise TypeError(f"settings of {self.name!r} must be {cls.Settings.__name__}")

    def build(self) -> Step:
        return step_class(self.name)(self.settings)

    # lpq.config hooks: the YAML entry is {name: ..., <settings>...}, or the name alone for the defaults
    @classmethod
    def from_config(cls, value: Any, convert, error) -> StepSpec:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise error("", f"an algorithm entry needs `name` (one of {', '.join(step_names())}), got {value!r}")
        name = value["name"]
        try:
            step = step_class(name)
        except ValueError as e:
            raise error("name", str(e)) from None
        rest = {k: v for k, v in value.items() if k != "name"}
        fields = [f.name for f in dataclasses.fields(step.Settings) if f.init]
        unknown = [k for k in rest if k not in fields]
        if unknown:
            raise error(str(unknown[0]), f"algorithm {name!r} has no setting {unknown[0]!r}; its settings: "
                        + (", ".join(fields) or "none"))
        return cls(name, convert(rest, step.Settings))

    def to_config(self) -> dict:
        from lpq.config import to_dict

        return {"name": self.name, **to_dict(self.settings)}


def check_order(specs: list[StepSpec]) -> None:
    """Refuse step orders that cannot work, naming the rule (see the module docstring)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"each algorithm may appear once; got {names}")
    steps = [step_class(n) for n in names]
    quantizers = [c.name for c in steps if c.phase == Phase.QUANTIZE]
    if len(quantizers) != 1:
        options = ", ".join(n for n in step_names() if step_class(n).phase == Phase.QUANTIZE)
        raise ValueError(f"algorithms must have exactly one weight quantizer ({options}); got {names}")
    for before, after in zip(steps, steps[1:]):
        if after.phase < before.phase:
            wrong = before if before.phase == Phase.REFINE else after
            raise ValueError(f"{wrong.name} must come {_where(wrong.phase, quantizers[0])}: steps run in the order "
                             f"model -> transform -> weight quantizer -> refine; got {names}")
    parts = [(c.name, c.transform_part) for c in steps if c.transform_part]
    for (a, pa), (b, pb) in zip(parts, parts[1:]):
        if pa == "rotation" and pb == "scale":
            raise ValueError(f"{b} writes the input scale of the linears' online transform and {a} its rotation; "
                             f"the runtime divides by the scale first, then rotates, so list {b} before {a}")


def _where(phase: Phase, quantizer: str) -> str:
    return {Phase.MODEL: "first (it rewrites the whole float model)",
            Phase.TRANSFORM: f"before the weight quantizer {quantizer}",
            Phase.QUANTIZE: "after the transforms and before the refine steps",
            Phase.REFINE: f"after the weight quantizer {quantizer}"}[phase]
