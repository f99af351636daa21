"""The quality figures `lpq ptq` reports for a causal LM: quantized model vs its float model.

* Perplexity on WikiText-2 *test* (the first `windows` windows, as every earlier lpq figure) and on
  each built-in text domain of `domain_eval` (lpq/data/domains.py; validation parts unless `split:
  test`), per window, with the paired-bootstrap CI of the increase;
* KL(float || quantized) and top-1 agreement of the next-token distributions on the first
  `kl_windows` WikiText-2 test windows;
* optionally a paired MMLU subset.

The float model's per-window log-likelihoods are cached on disk (keyed by a hash of its weights
and of the token windows), so only the quantized model runs when the same float model was scored
before; the KL needs both models' logits and always runs both.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def _cache_file(model: Any, ids: torch.Tensor) -> Path:
    from lpq.eval.cache import model_fingerprint
    from lpq.train.domains import WINDOW_NLL_VERSION

    h = hashlib.sha256(model_fingerprint(model).encode())
    h.update(f"window_nll v{WINDOW_NLL_VERSION}".encode())
    h.update(ids.contiguous().numpy().tobytes())
    h.update(str(tuple(ids.shape)).encode())
    root = Path(os.environ.get("LPQ_CACHE", Path.home() / ".cache" / "lpq")) / "eval" / "window_nll"
    return root / f"{h.hexdigest()[:24]}.json"


def baseline_nll(model: Any, ids: torch.Tensor, batch_size: int) -> list[float]:
    """Per-window summed NLL of the float model, from the cache when it has scored these windows."""
    from lpq.train.domains import window_nll

    if any(t.device.type == "meta" for t in model.state_dict().values()):
        return window_nll(model, ids, batch_size)      # offloaded: hashing would read every weight
    path = _cache_file(model, ids)
    if path.is_file():
        return json.loads(path.read_text())
    nll = window_nll(model, ids, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(nll))
    tmp.replace(path)
    return nll


WIKITEXT2_TEST = "wikitext2_test"      # the `windows` WikiText-2 test windows among the scored sets


def evaluation_windows(tokenizer: Any, ev: Any) -> dict[str, torch.Tensor]:
    """The token windows scored: WikiText-2 test, then each domain of `ev.domain_eval`."""
    from lpq.data.domains import Part, domain_windows
    from lpq.eval.settings import Split
    from lpq.eval.shift import token_windows

    sets: dict[str, torch.Tensor] = {}
    if ev.windows:
        sets[WIKITEXT2_TEST] = token_windows(tokenizer, Path(ev.wikitext2).read_text(encoding="utf-8"),
                                             ev.windows, ev.seq_len)
    de = ev.domain_eval
    if de is not None:
        part = Part.TEST if de.split is Split.TEST else Part.VALIDATION
        for name in de.domains:
            sets[name] = domain_windows(name, part, tokenizer, de.windows, de.seq_len)
    return sets


def evaluate_causal_lm(loaded: Any, baseline: Any, ev: Any, out_dir: Path) -> dict:
    """Quality of `loaded.model` against its float model `baseline` (see the module docstring)."""
    from lpq.eval import EvalSettings, distribution_shift, run_paired
    from lpq.train.domains import compare_domains, window_nll

    res: dict[str, Any] = {"baseline": {}, "quantized": {}}
    sets = evaluation_windows(loaded.tokenizer, ev)
    de = ev.domain_eval
    # The WikiText-2 test windows follow this section's settings, the domains those of domain_eval.
    batch = {name: ev.batch_size if name == WIKITEXT2_TEST else de.batch_size for name in sets}
    base = {name: baseline_nll(baseline, ids, batch[name]) for name, ids in sets.items()}
    cand = {name: window_nll(loaded.model, ids, batch[name]) for name, ids in sets.items()}
    res["domains"] = {}
    if WIKITEXT2_TEST in sets:
        res["domains"].update(compare_domains({WIKITEXT2_TEST: base[WIKITEXT2_TEST]},
                                              {WIKITEXT2_TEST: cand[WIKITEXT2_TEST]}, ev.seq_len))
    if de is not None:
        names = [name for name in sets if name != WIKITEXT2_TEST]
        res["domains"].update(compare_domains({n: base[n] for n in names}, {n: cand[n] for n in names},
                                              de.seq_len, de.bootstrap))
    if WIKITEXT2_TEST in res["domains"] and ev.kl_windows:
        wt = res["domains"][WIKITEXT2_TEST]
        res["baseline"]["wikitext2_ppl"] = wt["ppl_reference"]
        res["quantized"]["wikitext2_ppl"] = wt["ppl"]
        r = distribution_shift(baseline, loaded.model, loaded.tokenizer,
                               Path(ev.wikitext2).read_text(encoding="utf-8"), ev.kl_windows, ev.seq_len)
        res["quantized"].update(kl_div=r["kl_div"], top1_agreement=r["top1_agreement"])
    if ev.mmlu:
        settings = EvalSettings(tasks=["mmlu"], limit=ev.mmlu_questions, seed=ev.seed, kl=False)
        r = run_paired(baseline, loaded.model, loaded.tokenizer, settings, out_dir / "eval",
                       model_name=loaded.name)["tasks"]["mmlu"]
        res["baseline"]["mmlu_acc"] = r["baseline"]
        res["quantized"]["mmlu_acc"] = r["quantized"]
        res["mmlu_agreement"] = r["agreement"]
    return res
