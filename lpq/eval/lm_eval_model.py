"""lm-eval model `lpq`: evaluate a packed lpq export with its activation and attention quantizers on.

    lpq-lm-eval run --model lpq --model_args pretrained=EXPORT_DIR --tasks hellaswag ...
    python -m lpq.eval.lm_eval_model run --model lpq --model_args pretrained=EXPORT_DIR ...

lm-eval 0.4.13 has no plugin discovery for models: its registry holds its own MODEL_MAPPING and
whatever classes imported modules register with `@register_model`. Importing this module registers
`lpq`; the `lpq-lm-eval` console script (and `python -m lpq.eval.lm_eval_model`) is lm-eval's own
command line with that import done first, so every lm-eval option, output file and task works as
usual. In Python: `import lpq.eval.lm_eval_model` and then `simple_evaluate(model="lpq", ...)`.

The model is `lpq.load_quantized(pretrained)`: the decoded weights, the recipe's input, expert and
attention quantizers, and the online transforms, so lm-eval scores what the export computes.
`keep_packed=True` keeps the quantized weights as codes, decoded per module in each forward (memory
about the export's size, same scores). Every other argument is lm-eval's HFLM's (batch_size,
max_length, device, ...), which runs it.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

# Where the other export kinds run (lm-eval has models for the first two).
RUNTIMES = {"fake": "--model hf (transformers)", "compressed-tensors": "--model vllm, or --model hf in bfloat16",
            "gguf": "llama.cpp"}


@contextlib.contextmanager
def hidden_quantization_config(model: Any) -> Iterator[None]:
    """HFLM parses config.quantization_config even for a ready model and rejects methods transformers does
    not know (an lpq export's own); it does not need it for a ready model, so it is hidden meanwhile."""
    config = getattr(model, "config", None)
    hidden = config.__dict__.pop("quantization_config", None) if config is not None else None
    try:
        yield
    finally:
        if hidden is not None:
            config.quantization_config = hidden


@register_model("lpq")
class LpqLM(HFLM):
    """HFLM around `lpq.load_quantized(pretrained)` and the tokenizer saved beside it."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str | None = None,
                 verify: bool = True, keep_packed: bool = False, **kwargs: Any) -> None:
        import torch
        from transformers import AutoTokenizer

        from lpq.export import load_quantized

        folder = Path(pretrained)
        manifest = folder / "lpq_export.json"
        if not manifest.is_file():
            raise ValueError(f"model lpq: {folder} is not an lpq export (no lpq_export.json); give "
                             f"pretrained=<folder written by lpq export / lpq ptq, kind packed>")
        kind = json.loads(manifest.read_text()).get("kind")
        if kind != "packed":
            raise ValueError(f"model lpq evaluates packed exports; {folder} is a {kind} export: evaluate it with "
                             f"{RUNTIMES.get(kind, 'the runtime it was written for')}")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"     # lm-eval's CLI passes cuda by default
        model = load_quantized(folder, device=device, verify=verify, keep_packed=keep_packed)
        tok = AutoTokenizer.from_pretrained(tokenizer or str(folder))
        with hidden_quantization_config(model):
            super().__init__(pretrained=model, tokenizer=tok, device=device, **kwargs)


def main() -> None:
    """lm-eval's command line with the `lpq` model registered (console script `lpq-lm-eval`)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
