"""Evaluation settings of recipes, torch-free: the `eval:` section (`lpq eval`, `lpq train`), the per-domain
perplexity settings shared by `lpq ptq` and `lpq train` (`DomainEvalSettings`), and where evaluation data
is found."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lpq.schema import Choice, KeyedError


class Task(Choice):
    """A task of `lpq eval`: the language-model tasks (LM_TASKS, lpq/eval/tasks/) or `video` (Wan)."""

    MMLU = "mmlu"
    GSM8K = "gsm8k"
    GPQA = "gpqa"
    MATH500 = "math500"
    WIKITEXT2 = "wikitext2"
    VIDEO = "video"


LM_TASKS = tuple(t.value for t in Task if t is not Task.VIDEO)


class Split(Choice):
    """Which part of each text domain is scored: `valid` to choose settings on, `test` for final reports."""

    VALID = "valid"
    TEST = "test"


@dataclass
class DomainEvalSettings:
    """Perplexity of a model on built-in text domains (names of lpq.data.domains), the same token windows
    for the model and its reference, compared window by window (paired bootstrap). `lpq ptq` reads it as
    `evaluation.domain_eval`, `lpq train` as `domain_eval` (with its own defaults and the held-out corpus);
    each command's reader says which domains and parts it has."""

    domains: list[str] = field(default_factory=list)
    split: Split = Split.VALID
    windows: int = 8                       # per domain (fewer when a domain's text is short)
    seq_len: int = 512
    batch_size: int = 2                    # windows per forward
    data_dir: str | None = None            # default: $LPQ_DATA_DIR, else ../shared/data beside the repo
    bootstrap: int = 10000                 # paired bootstrap resamples of the 95 % CI

    def __post_init__(self) -> None:
        from lpq.data.domains import check_names

        self.split = Split.parse(self.split, "split")
        check_names(self.domains)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains has duplicates: {self.domains}")
        for name in ("windows", "seq_len", "batch_size", "bootstrap"):
            low = 2 if name == "seq_len" else 1
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class VideoSettings:
    """Wan pipeline runs: the same prompts and seeds for baseline and candidate."""

    prompts_file: str | None = None        # JSON list of {"prompt_en": ...} or of strings; default: data_dir/video/vbench_prompts.json
    num_prompts: int = 2
    dimension: str | None = "temporal_flickering"   # keep only VBench prompts tagged with it; None: all
    seeds: list[int] = field(default_factory=lambda: [0])
    height: int = 16
    width: int = 16
    num_frames: int = 9
    steps: int = 2
    guidance_scale: float = 5.0
    max_sequence_length: int = 16
    vbench_python: str | None = None        # python of a separate venv with vbench installed (optional)

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("num_prompts must be >= 1")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")


@dataclass
class EvalSettings:
    """What to evaluate and how. Everything that can change a score is here and lands in results.json."""

    tasks: list[Task] = field(default_factory=lambda: [Task.MMLU, Task.WIKITEXT2])
    limit: int | None = None               # items per task: a seeded random subset, identical for both models
    task_limits: dict[str, int] = field(default_factory=dict)   # per-task item counts, overriding `limit`
    seed: int = 0                          # subset selection and bootstrap
    data_dir: str | None = None            # default: $LPQ_DATA_DIR, else ../shared/data next to the repo
    gpqa_file: str | None = None           # your local GPQA CSV/JSONL (see docs/eval.md); default data_dir/gpqa/
    batch_size: int = 8                    # requests per forward for multiple choice and generation
    window_batch_size: int = 2             # long-text windows per forward (perplexity, KL): logits are large
    max_length: int = 2048                 # context length given to lm-eval (rolling perplexity windows)
    chat_template: bool = False            # wrap prompts in the tokenizer's chat template
    enable_thinking: bool | None = None    # Qwen3 thinking mode, passed to the chat template; None: not passed
    think_end_token: str = "</think>"      # with thinking on, the answer is what follows it
    num_fewshot: int | None = None         # None: each task's default (gsm8k 5, others 0)
    max_gen_toks: int | None = None        # None: each task's default
    bootstrap: int = 10000                 # paired bootstrap resamples
    kl: bool = True                        # distribution shift (KL, top-1) on kl_text
    kl_text: str | None = None             # default: data_dir/wikitext2/test.txt
    kl_windows: int = 40
    kl_seq_len: int = 512
    cache_dir: str | None = None           # baseline cache; default $LPQ_CACHE/eval
    use_cache: bool = True
    video: VideoSettings = field(default_factory=VideoSettings)

    def __post_init__(self) -> None:
        self.tasks = [Task.parse(t, "task") for t in self.tasks]
        if not self.tasks and not self.kl:      # no task: the distribution shift alone is a valid evaluation
            raise KeyedError("tasks", f"nothing to evaluate: no task and kl off; name tasks "
                             f"({', '.join(t.value for t in Task)}) or turn kl on")
        twice = [t.value for i, t in enumerate(self.tasks) if t in self.tasks[:i]]
        if twice:
            raise KeyedError("tasks", f"tasks lists {twice[0]!r} twice")
        if self.video.vbench_python and Task.VIDEO not in self.tasks:
            raise KeyedError("video.vbench_python", "vbench_python scores the generated videos: it needs the "
                             f"'video' task (tasks: {', '.join(t.value for t in self.tasks)})")
        if self.limit is not None and self.limit < 1:
            raise KeyedError("limit", "limit must be >= 1 (or null for all items)")
        for task, n in self.task_limits.items():
            if task not in LM_TASKS or n < 1:
                raise ValueError(f"task_limits: {task}: {n} is not allowed; use tasks from {', '.join(LM_TASKS)} "
                                 f"with counts >= 1")
        if self.enable_thinking and not self.chat_template:
            raise ValueError("enable_thinking needs chat_template: true (thinking is a chat-template switch)")
        for name in ("batch_size", "window_batch_size", "max_length", "kl_windows", "kl_seq_len", "bootstrap"):
            if getattr(self, name) < 1:
                raise KeyedError(name, f"{name} must be >= 1, got {getattr(self, name)}")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """`data_dir` (the recipe's), else $LPQ_DATA_DIR, else ../shared/data beside the repo if present."""
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    if os.environ.get("LPQ_DATA_DIR"):
        return Path(os.environ["LPQ_DATA_DIR"]).expanduser().resolve()
    shared = repo_root().parent / "shared" / "data"
    return shared.resolve() if shared.is_dir() else None


def check_paths(settings: EvalSettings) -> None:
    """The data folder and the VBench python the settings name exist: they are read only after the
    models ran (lpq eval: both models; lpq train: every run), so they are checked before."""
    given = settings.data_dir or os.environ.get("LPQ_DATA_DIR")
    if given and not Path(given).expanduser().is_dir():
        what = "does not exist" if not Path(given).expanduser().exists() else "is not a folder"
        raise FileNotFoundError(f"data folder {given} (--data-dir, eval.data_dir or $LPQ_DATA_DIR) {what}")
    python = settings.video.vbench_python
    if python and not (Path(python).expanduser().is_file() and os.access(Path(python).expanduser(), os.X_OK)):
        raise FileNotFoundError(f"--vbench / eval.video.vbench_python: {python} is not an executable file (give the "
                                "python of a venv with vbench installed)")


def kl_text_path(settings: EvalSettings) -> Path:
    if settings.kl_text:
        path = Path(settings.kl_text).expanduser()
    else:
        data = resolve_data_dir(settings.data_dir)
        if data is None:
            raise FileNotFoundError("no text for the distribution-shift measure: set eval.kl_text (any text "
                                    "file) or a data dir holding wikitext2/test.txt (--data-dir or $LPQ_DATA_DIR)")
        path = data / "wikitext2" / "test.txt"
    if not path.is_file():
        raise FileNotFoundError(f"distribution-shift text {path} not found: set eval.kl_text to a text file "
                                f"or --data-dir to a folder with wikitext2/test.txt")
    return path
