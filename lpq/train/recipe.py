"""The `lpq train` recipe: YAML sections `model`, `quant`, `train`, `data` and optional `export`, `eval`.

`quant` is the runtime's `QuantRecipe` (roles, scaling, protected blocks); `train` and `data` are defined
here. Everything is validated by `lpq.config`, so a bad key or value is reported with file and line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpq.config import load_config
from lpq.eval.settings import DomainEvalSettings, EvalSettings, Split  # noqa: F401  (Split: domain_eval.split)
from lpq.export.settings import ExportSettings, check_runtime_quant
from lpq.models.hub import ModelConfig
from lpq.quant.recipe import QuantRecipe
from lpq.schema import Choice, KeyedError, RecipeVersion, recipe_version


class LrSchedule(Choice):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Optimizer(Choice):
    ADAMW = "adamw"
    SGD = "sgd"


class MixedPrecision(Choice):
    # "bf16": float32 master weights and optimizer state, bfloat16 autocast compute (both runs).
    BF16 = "bf16"
    NO = "no"


class Distributed(Choice):
    DDP = "ddp"
    FSDP = "fsdp"


class TimestepSampling(Choice):
    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"


class WanExpert(Choice):
    HIGH_NOISE = "transformer"
    LOW_NOISE = "transformer_2"


@dataclass
class FlowMatchConfig:
    """Wan flow-matching objective: x_t = (1 - s) x0 + s noise, target velocity noise - x0."""

    shift: float | None = None            # None: the pipeline scheduler's shift
    timestep_sampling: TimestepSampling = TimestepSampling.UNIFORM
    expert: WanExpert = WanExpert.HIGH_NOISE   # Wan2.2: "transformer" (high noise) or "transformer_2" (low noise)
    eval_timesteps: int = 4               # fixed noise levels per held-out sample for the eval loss

    def __post_init__(self) -> None:
        if self.shift is not None and self.shift <= 0:
            raise KeyedError("shift", f"shift must be > 0, got {self.shift}")
        self.expert = WanExpert.parse(self.expert, "expert")
        if self.eval_timesteps < 1:
            raise KeyedError("eval_timesteps", f"eval_timesteps must be >= 1, got {self.eval_timesteps}")


class CompareMode(Choice):
    """A per-tensor scaling mode a compared run applies to every role of `quant` that scales per tensor."""

    CURRENT = "current"
    DELAYED = "delayed"


@dataclass
class TrainConfig:
    output_dir: Path = Path("runs/train")
    steps: int = 300
    batch_size: int = 4                   # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: LrSchedule = LrSchedule.COSINE
    lr_warmup_steps: int = 0
    min_lr_ratio: float = 0.1             # cosine/linear decay ends at lr * min_lr_ratio
    optimizer: Optimizer = Optimizer.ADAMW
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16_warmup_steps: int = 0            # steps trained unquantized before HiF8 turns on
    mixed_precision: MixedPrecision = MixedPrecision.BF16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0             # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    stats_every: int = 10                 # per-quantizer amax/scale/overflow statistics
    seed: int = 0
    reference_run: bool = True            # also train the unquantized reference with the same seed
    # Quantized runs side by side, one per per-tensor scaling mode ("current", "delayed"): each applies
    # that mode to every role of `quant` that scales per tensor. Empty: one quantized run, exactly as
    # `quant` says.
    compare: list[CompareMode] = field(default_factory=list)
    num_processes: int = 1
    distributed: Distributed = Distributed.DDP
    flow: FlowMatchConfig = field(default_factory=FlowMatchConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_processes", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise KeyedError(name, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "bf16_warmup_steps", "checkpoint_every", "stats_every"):
            if getattr(self, name) < 0:
                raise KeyedError(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bf16_warmup_steps >= self.steps:
            raise KeyedError("bf16_warmup_steps", f"bf16_warmup_steps ({self.bf16_warmup_steps}) must be < steps ({self.steps}), "
                             "or quantization never turns on")
        if not 0 <= self.seed < 2**32:
            raise KeyedError("seed", f"seed must be in [0, 2**32), got {self.seed}")
        if not self.lr > 0:
            raise KeyedError("lr", f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise KeyedError("min_lr_ratio", f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise KeyedError("betas", f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise KeyedError("max_grad_norm", f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        self.compare = [CompareMode.parse(m, "compare: scaling mode") for m in self.compare]
        if len(set(self.compare)) != len(self.compare):
            raise KeyedError("compare", f"compare lists a mode twice: {self.compare}")


class DataKind(Choice):
    TEXT = "text"                   # causal LM: .txt / .jsonl, tokenized into fixed-length blocks
    WAN_LATENTS = "wan_latents"     # Wan: the cache written by `lpq prepare-data`


PYDOC_TOPICS = "pydoc-topics"      # Python's own documentation topics: English text on every machine


@dataclass
class VideoPrepConfig:
    """What `lpq prepare-data` reads and how it shapes clips before the VAE."""

    captions: Path | None = None          # JSONL/JSON of {"path", "cap"} records (OpenS2V layout)
    video_root: Path | None = None        # relative "path"s resolve here; absolute ones are re-rooted by name
    num_frames: int = 81                  # 4k + 1, as Wan's VAE needs
    height: int = 480
    width: int = 832
    max_sequence_length: int = 512
    limit: int | None = None              # first N clips only

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4:
            raise KeyedError("num_frames", f"num_frames must be 4k + 1 for Wan's VAE, got {self.num_frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")


MIX_TRAIN_BLOCKS = 1024            # training blocks of a `data.mix` when max_train_blocks is not set
# Domains `data.mix` can train on (lpq.train.domains.train_documents: the parts no scored window reads).
MIX_DOMAINS = ("wikitext2", "gsm8k", "chat", "python", "pydoc", "fortunes")


@dataclass
class DataConfig:
    kind: DataKind = DataKind.TEXT
    # Text/JSONL files or "pydoc-topics" (the default when neither `paths` nor `mix` is given).
    paths: list[str] | None = None
    # Or a mix of built-in text domains (MIX_DOMAINS) -> relative weight: training and
    # held-out blocks of each domain's training part (text no domain_eval window reads), shared out by weight.
    mix: dict[str, float] | None = None
    data_dir: str | None = None           # `mix` data: default $LPQ_DATA_DIR, else ../shared/data
    text_field: str = "text"              # JSONL key holding the text
    seq_len: int = 128
    eval_blocks: int = 32                 # held out from the end of the corpus (Wan: samples)
    max_train_blocks: int | None = None   # with `mix`: the total over its domains (default MIX_TRAIN_BLOCKS)
    cache_dir: Path | None = None         # Wan latent cache (written by prepare-data)
    video: VideoPrepConfig = field(default_factory=VideoPrepConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise KeyedError("seq_len", f"seq_len must be >= 2, got {self.seq_len}")
        if self.eval_blocks < 1:
            raise KeyedError("eval_blocks", f"eval_blocks must be >= 1, got {self.eval_blocks}")
        if self.max_train_blocks is not None and self.max_train_blocks < 1:
            raise KeyedError("max_train_blocks", f"max_train_blocks must be >= 1, got {self.max_train_blocks}")
        if self.kind is DataKind.WAN_LATENTS and self.cache_dir is None:
            raise ValueError("kind 'wan_latents' needs cache_dir (the folder `lpq prepare-data` writes)")
        if self.mix is not None:
            self._check_mix()
        elif self.paths is None:
            self.paths = [PYDOC_TOPICS]
        if self.kind is DataKind.TEXT and self.mix is None and not self.paths:
            raise ValueError("paths must name at least one text/JSONL file or 'pydoc-topics'")

    def _check_mix(self) -> None:
        if self.kind is not DataKind.TEXT:
            raise ValueError(f"mix is a mix of text domains; it needs kind 'text', not {self.kind.value!r}")
        if self.paths is not None:
            raise ValueError("set either paths or mix, not both")
        bad = [d for d in self.mix if d not in MIX_DOMAINS]
        if bad:
            raise KeyedError(f"mix.{bad[0]}", f"mix: unknown domain {bad[0]!r}; allowed: {', '.join(MIX_DOMAINS)}")
        if not self.mix:
            raise KeyedError("mix", "mix needs at least one domain")
        for name, weight in self.mix.items():
            if not weight > 0:
                raise KeyedError(f"mix.{name}", f"mix.{name}: weights must be > 0, got {weight}")
        for name, count in (("eval_blocks", self.eval_blocks), ("max_train_blocks", self.max_train_blocks)):
            if count is not None and count < len(self.mix):
                raise KeyedError(name, f"{name} ({count}) must be >= the number of mix domains ({len(self.mix)}): "
                                 "each gets at least one block")

    @property
    def train_blocks(self) -> int | None:
        """The number of training blocks asked for (None: all the corpus gives)."""
        if self.mix is not None and self.max_train_blocks is None:
            return MIX_TRAIN_BLOCKS
        return self.max_train_blocks


# The text domains lpq.train.domains reads (with its own valid/test halves), of lpq.data.domains' names.
DOMAINS = ("wikitext2", "gsm8k", "chat", "fortunes")
HELD_OUT = "train_heldout"              # the training corpus's held-out blocks


@dataclass
class DomainEvalConfig(DomainEvalSettings):
    """The `domain_eval:` section: the shared per-domain settings (lpq.eval.settings.DomainEvalSettings)
    with lpq train's defaults (every domain it reads, test halves), plus the held-out training text."""

    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    split: Split = Split.TEST
    seq_len: int = 256
    batch_size: int = 4
    held_out: bool = True                 # also score the training corpus's held-out blocks

    def __post_init__(self) -> None:
        super().__post_init__()
        other = [d for d in self.domains if d not in DOMAINS]
        if other:
            raise ValueError(f"domain {other[0]!r} is not scored by lpq train; its domains: {', '.join(DOMAINS)}")


@dataclass
class TrainRecipe:
    version: RecipeVersion = RecipeVersion.V1
    model: ModelConfig = field(default_factory=ModelConfig)
    # None (section absent): plain fine-tuning, no quantized run. Annotated without `| None` because
    # lpq.config reports errors inside a union member only as "matches none of"; this way a bad key
    # in the section is named with its own line.
    quant: QuantRecipe = None  # type: ignore[assignment]
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The HiF8 model is exported after training when present (None: no export); not `| None`, as quant.
    export: ExportSettings = None  # type: ignore[assignment]
    # `lpq eval` of the HiF8-trained model against the BF16-trained one after both runs (None: skip).
    eval: EvalSettings = None  # type: ignore[assignment]
    # Perplexity of every trained model on several text domains, each quantized run paired with the
    # reference (None: skip).
    domain_eval: DomainEvalConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
        if self.train.compare and self.quant is None:
            raise ValueError("train.compare needs a `quant:` section (the runs it compares are quantized)")
        if self.domain_eval is not None and self.data.kind is not DataKind.TEXT:
            raise ValueError("domain_eval scores text domains; it needs data.kind 'text' (a causal LM)")
        if self.export is not None and self.quant is not None:
            check_runtime_quant(self.export.kind.value, self.quant)   # before training, not after


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """Read and validate a training recipe; `overrides` are dotted keys set afterwards (`train.steps`), given
    as `--set KEY=VALUE` (an error about one names that option)."""
    return load_config(path, TrainRecipe, overrides, {k: f"--set {k}" for k in overrides or {}})
