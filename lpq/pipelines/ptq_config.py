"""The `lpq ptq` recipe: YAML sections as dataclasses (validated by lpq.config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lpq.algorithms import grid
from lpq.data.calibration import CalibrationConfig
from lpq.export.settings import ExportSettings
from lpq.models.hub import ModelConfig
from lpq.quant.recipe import QuantRecipe

# Settings each algorithm accepts; anything else in its YAML entry is an error.
STEP_SETTINGS = {
    "rotate_residual": {"seed"},
    "rtn": set(),
    "scale_search": set(),
    "smoothquant": {"alpha"},
    "hadamard": {"block", "linears"},
    "gptq": {"damp", "act_order", "scale_search", "lazy_batch"},
    "norm_distill": {"steps", "lr", "sequences", "seq_len", "batch_size"},
}
WEIGHT_STEPS = ("rtn", "scale_search", "gptq")
AFTER_WEIGHT_STEPS = ("norm_distill",)   # work on the finished quantized model
_DEFAULTS = {"seed": 0, "alpha": 0.5, "block": None, "linears": None, "damp": 0.01, "act_order": False,
             "scale_search": True, "lazy_batch": 128, "steps": 60, "lr": 1e-3, "sequences": 64, "seq_len": 512,
             "batch_size": 2}


@dataclass
class StepConfig:
    """One algorithm. `name` picks it; only that algorithm's settings may be given."""

    name: Literal["rotate_residual", "rtn", "scale_search", "smoothquant", "hadamard", "gptq", "norm_distill"]
    seed: int | None = None              # rotate_residual: seed of the random orthogonal matrix
    alpha: float | None = None           # smoothquant: migration strength
    block: int | None = None             # hadamard: block size (default: the format's block)
    linears: list[str] | None = None     # hadamard: fnmatch patterns of the linears to rotate (default: all)
    damp: float | None = None            # gptq: dampening, fraction of mean(diag H)
    act_order: bool | None = None        # gptq: columns by decreasing H_jj
    scale_search: bool | None = None     # gptq: format-native scale search when fixing a block's scales
    lazy_batch: int | None = None        # gptq: columns per lazy update
    steps: int | None = None             # norm_distill: optimizer steps
    lr: float | None = None              # norm_distill: Adam learning rate (cosine decay)
    sequences: int | None = None         # norm_distill: windows of calibration text to train on
    seq_len: int | None = None           # norm_distill: tokens per window
    batch_size: int | None = None        # norm_distill: windows per step

    def __post_init__(self) -> None:
        given = {k for k in _DEFAULTS if getattr(self, k) is not None}
        bad = given - STEP_SETTINGS[self.name]
        if bad:
            allowed = ", ".join(sorted(STEP_SETTINGS[self.name])) or "none"
            raise ValueError(f"algorithm {self.name!r} has no setting {sorted(bad)[0]!r}; its settings: {allowed}")
        for k in STEP_SETTINGS[self.name]:
            if getattr(self, k) is None:
                setattr(self, k, _DEFAULTS[k])
        if self.name == "norm_distill" and min(self.steps, self.sequences, self.seq_len, self.batch_size) < 1:
            raise ValueError("norm_distill steps, sequences, seq_len and batch_size must be >= 1")
        if self.name == "norm_distill" and self.lr <= 0:
            raise ValueError(f"norm_distill lr must be > 0, got {self.lr}")
        if self.name == "hadamard" and self.block is not None and (self.block <= 0 or self.block & (self.block - 1)):
            raise ValueError(f"hadamard block must be a power of two, got {self.block}")


@dataclass
class ProtectConfig:
    """Blocks kept in high precision: an explicit list, or `auto: k` by sensitivity (within the budget)."""

    blocks: list[int] | None = None
    auto: int | None = None
    sequences: int = 8                    # calibration sequences used to score sensitivity
    seq_len: int = 256

    def __post_init__(self) -> None:
        if self.blocks is not None and self.auto is not None:
            raise ValueError("set either protect.blocks or protect.auto, not both")
        if self.auto is not None and self.auto < 0:
            raise ValueError(f"protect.auto must be >= 0, got {self.auto}")
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise ValueError(f"protect.blocks must be block indices >= 0, got {self.blocks}")

    def count(self) -> int:
        return self.auto if self.auto is not None else len(self.blocks or [])


@dataclass
class EvalConfig:
    """Evaluation at the end, quantized vs the unquantized model (LLMs)."""

    wikitext2: str | None = "../shared/data/wikitext2/test.txt"
    windows: int = 40
    seq_len: int = 512
    mmlu: bool = False                    # paired MMLU subset via lpq.eval (data: shared/data/mmlu)
    mmlu_questions: int = 400
    seed: int = 0


@dataclass
class PTQConfig:
    quant: QuantRecipe
    calibration: CalibrationConfig
    algorithms: list[StepConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    evaluation: EvalConfig | None = field(default_factory=EvalConfig)
    export: ExportSettings | None = field(default_factory=ExportSettings)   # None: no checkpoint
    output_dir: str = "runs/ptq"
    skip_linears: list[str] = field(default_factory=list)   # relative names inside a block kept high precision

    def __post_init__(self) -> None:
        for role in ("weight", "input"):
            spec = getattr(self.quant, role)
            if spec is None:
                raise ValueError(f"quant.{role} is required for W4A4 PTQ (set quant.format)")
            grid.check_format(spec.format)
        if self.quant.protected_blocks:
            raise ValueError("list protected blocks under `protect.blocks` (or use protect.auto), "
                             "not quant.protected_blocks")
        budget = self.quant.block_budget()
        if budget is not None and self.protect.count() > budget and not self.quant.allow_over_budget:
            raise ValueError(f"protect asks for {self.protect.count()} blocks; the budget for "
                             f"{self.quant.weight.format} is {budget}")
        names = [s.name for s in self.algorithms]
        weight_steps = [n for n in names if n in WEIGHT_STEPS]
        if len(weight_steps) != 1:
            raise ValueError(f"algorithms must have exactly one weight quantizer ({', '.join(WEIGHT_STEPS)}); "
                             f"got {names}")
        w = names.index(weight_steps[0])
        if any(n not in AFTER_WEIGHT_STEPS for n in names[w + 1:]) or any(n in AFTER_WEIGHT_STEPS for n in names[:w]):
            raise ValueError(f"{', '.join(AFTER_WEIGHT_STEPS)} must come after the weight quantizer "
                             f"{weight_steps[0]}, and nothing else may; got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"each algorithm may appear once; got {names}")
        if "rotate_residual" in names and names[0] != "rotate_residual":
            raise ValueError("rotate_residual rewrites the whole model before calibration; list it first")

    @property
    def weight_format(self) -> str:
        return self.quant.weight.format

    @property
    def act_format(self) -> str:
        return self.quant.input.format

    def step(self, name: str) -> StepConfig | None:
        return next((s for s in self.algorithms if s.name == name), None)
