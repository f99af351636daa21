"""The `lpq ptq` recipe: YAML sections as dataclasses (validated by lpq.config).

`algorithms` is a list of steps, each `{name: <step>, <its settings>}`; the steps and their settings
are defined by the step modules (lpq/algorithms/step.py: registry, phases, order rules).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lpq.algorithms.step import Step, StepSpec, check_order
from lpq.config import RecipePath
from lpq.data.calibration import CalibrationConfig
from lpq.eval.settings import DomainEvalSettings, Split
from lpq.export.settings import RUNTIME_ONLINE_PARTS, ExportSettings, check_runtime_quant
from lpq.models.hub import ModelConfig
from lpq.quant.recipe import QuantRecipe, check_protected_budget
from lpq.schema import KeyedError, RecipeVersion, recipe_version


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
            raise KeyedError("auto", f"protect.auto must be >= 0, got {self.auto}")
        if self.blocks is not None and any(b < 0 for b in self.blocks):
            raise KeyedError("blocks", f"protect.blocks must be block indices >= 0, got {self.blocks}")
        if self.blocks is not None and len(set(self.blocks)) != len(self.blocks):
            raise KeyedError("blocks", f"protect.blocks has duplicates: {self.blocks}")
        if self.sequences < 1 or self.seq_len < 2:
            raise ValueError(f"protect needs sequences >= 1 and seq_len >= 2 to rank blocks, got {self.sequences} "
                             f"and {self.seq_len}")

    def count(self) -> int:
        return self.auto if self.auto is not None else len(self.blocks or [])


@dataclass
class EvalConfig:
    """Evaluation at the end, quantized vs the unquantized model (LLMs): lpq/eval/ptq_quality.py."""

    wikitext2: RecipePath | None = None   # WikiText-2 test text (None: the shared data's wikitext2/test.txt)
    windows: int = 40                     # its first windows scored for perplexity (0: none)
    seq_len: int = 512                    # of those windows
    kl_windows: int | None = None         # of those, the first ones for KL and top-1 (None: all of them)
    batch_size: int = 2                   # windows per forward
    # Perplexity on built-in text domains (lpq.data.domains: validation parts; `split: test` only for
    # wikitext2), paired with the float model: the settings lpq train's domain_eval shares. None: none.
    domain_eval: DomainEvalSettings | None = None
    # Short form of domain_eval: `domains` scored with `domain_windows` windows each (default 8) and this
    # section's seq_len and batch_size. The recipe keeps it as domain_eval (recipe.yaml shows that).
    domains: list[str] | None = None
    domain_windows: int | None = None
    mmlu: bool = False                    # paired MMLU subset via lpq.eval (data: shared/data/mmlu)
    mmlu_questions: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kl_windows is None:
            self.kl_windows = self.windows
        for name in ("windows", "seq_len", "kl_windows", "batch_size", "mmlu_questions"):
            low = {"seq_len": 2, "windows": 0, "kl_windows": 0}.get(name, 1)
            if getattr(self, name) < low:
                raise KeyedError(name, f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.windows and self.wikitext2 is None:
            from lpq.data.domains import data_dir

            self.wikitext2 = data_dir() / "wikitext2" / "test.txt"
        if self.kl_windows > self.windows:
            raise KeyedError("kl_windows", f"kl_windows ({self.kl_windows}) must be <= windows ({self.windows})")
        self._fold_short_form()
        if self.domain_eval is not None:
            self._check_domain_eval(self.domain_eval)

    def _fold_short_form(self) -> None:
        if self.domains is None and self.domain_windows is None:
            return
        if self.domain_eval is not None:
            raise ValueError("set domain_eval, or its short form domains / domain_windows, not both")
        if self.domain_windows is not None and self.domain_windows < 1:
            raise KeyedError("domain_windows", f"domain_windows must be >= 1, got {self.domain_windows}")
        if self.domains:
            given = {"windows": self.domain_windows} if self.domain_windows is not None else {}
            self.domain_eval = DomainEvalSettings(domains=self.domains, seq_len=self.seq_len,
                                                  batch_size=self.batch_size, **given)
        self.domains = self.domain_windows = None

    @staticmethod
    def _check_domain_eval(de: DomainEvalSettings) -> None:
        """What lpq ptq's reader of the domains (lpq.data.domains) cannot do."""
        from lpq.data.domains import Part, check_domain

        if de.data_dir is not None:
            raise ValueError("domain_eval.data_dir: lpq ptq reads the built-in domains from $LPQ_DATA_DIR (else "
                             "../shared/data beside the repository); set that instead")
        for name in de.domains:
            check_domain(name, Part.TEST if de.split is Split.TEST else Part.VALIDATION)

    def to_config(self) -> dict:
        """The section as lpq.config.to_dict writes it: the short form is already folded into domain_eval."""
        from lpq.config import to_dict

        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("domains", "domain_windows")}


@dataclass
class PTQConfig:
    version: RecipeVersion = field(default=RecipeVersion.V1, kw_only=True)
    quant: QuantRecipe
    calibration: CalibrationConfig
    algorithms: list[StepSpec]
    model: ModelConfig = field(default_factory=ModelConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    evaluation: EvalConfig | None = field(default_factory=EvalConfig)
    export: ExportSettings | None = field(default_factory=ExportSettings)   # None: no checkpoint
    output_dir: str = "runs/ptq"
    skip_linears: list[str] = field(default_factory=list)   # block-relative names kept in high precision
    # CPU threads of the run: CPU results are bit-identical for the same thread count (reductions are
    # split by thread) and the pinned CPU numerics of lpq/cpu_numerics.py. 0: every core.
    threads: int = 2

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
        if self.quant.weight is None:
            raise ValueError("quant.weight is required for PTQ (set quant.format, or quant.weight for a weight-only "
                             "recipe)")
        if self.quant.protected_blocks:
            raise ValueError("list protected blocks under `protect.blocks` (or use protect.auto), "
                             "not quant.protected_blocks")
        check_protected_budget(self.protect.count(), self.quant.formats(), self.quant.allow_over_budget,
                               "protect.auto" if self.protect.auto is not None else "protect.blocks")
        check_order(self.algorithms)
        steps = self.steps()
        for i, step in enumerate(steps):
            try:
                step.check_recipe(self.quant)
            except ValueError as e:
                raise KeyedError(f"algorithms[{i}]", f"{step.name}: {e}") from None
        if self.export is not None:
            self._check_runtime_export(self.export.kind.value, steps)
        if self.threads < 0:
            raise KeyedError("threads", f"threads must be >= 0 (0: every core), got {self.threads}")

    def _check_runtime_export(self, kind: str, steps: list[Step]) -> None:
        """An export for another runtime (vLLM, llama.cpp) refused now, not after the last block."""
        if kind not in RUNTIME_ONLINE_PARTS:
            return
        check_runtime_quant(kind, self.quant)
        for i, step in enumerate(steps):
            left = [p for p in step.online_parts() if p not in RUNTIME_ONLINE_PARTS[kind]]
            if left:
                raise KeyedError(f"algorithms[{i}]", f"{step.name} leaves an online input {left[0]} on quantized "
                                 f"linears (lpq.quant.InputTransform), which export kind {kind} cannot run; drop "
                                 f"the step (or its option that adds it) or export kind packed")

    @property
    def weight_format(self) -> str:
        return self.quant.weight.format

    def runtime_recipe(self) -> QuantRecipe:
        """quant, with skip_linears as exclusions (`*.<name>` patterns on the modules' full names)."""
        extra = [f"*.{name}" for name in self.skip_linears if f"*.{name}" not in self.quant.exclude]
        return dataclasses.replace(self.quant, exclude=[*self.quant.exclude, *extra]) if extra else self.quant

    def steps(self) -> list[Step]:
        """Fresh step objects, in recipe order."""
        return [spec.build() for spec in self.algorithms]
