"""The quality figures `lpq ptq` reports for a causal LM: quantized model vs a fresh float copy."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def evaluate_causal_lm(loaded: Any, model_cfg: Any, ev: Any, out_dir: Path) -> dict:
    """WikiText-2 perplexity / KL / top-1 and paired MMLU of `loaded.model` against the float model."""
    from lpq.config import to_dict
    from lpq.eval import EvalSettings, distribution_shift, run_paired
    from lpq.models.hub import load_model

    res: dict[str, Any] = {"baseline": {}, "quantized": {}}
    if model_cfg.offload_dir:   # the baseline's offloaded weights must not overwrite the quantized model's
        model_cfg = dataclasses.replace(model_cfg, offload_dir=str(Path(model_cfg.offload_dir) / "baseline"))
    baseline = load_model(model_cfg).model
    if ev.wikitext2:
        text = Path(ev.wikitext2).read_text(encoding="utf-8")
        r = distribution_shift(baseline, loaded.model, loaded.tokenizer, text, ev.windows, ev.seq_len)
        res["baseline"]["wikitext2_ppl"] = r["baseline_ppl"]
        res["quantized"].update(wikitext2_ppl=r["candidate_ppl"], kl_div=r["kl_div"],
                                top1_agreement=r["top1_agreement"])
    if ev.mmlu:
        settings = EvalSettings(tasks=["mmlu"], limit=ev.mmlu_questions, seed=ev.seed, kl=False)
        r = run_paired(baseline, loaded.model, loaded.tokenizer, settings, out_dir / "eval",
                       model_name=model_cfg.id, recipe={"model": to_dict(model_cfg), "evaluation": to_dict(ev)}
                       )["tasks"]["mmlu"]
        res["baseline"]["mmlu_acc"] = r["baseline"]
        res["quantized"]["mmlu_acc"] = r["quantized"]
        res["mmlu_agreement"] = r["agreement"]
    return res
