"""Where does HiF8 lose accuracy? Quantize one role at a time (or a whole recipe) and score it per domain.

For each variant the model (pretrained, or a trained `final/` folder) is quantized with only the named
quantizers, and every domain's windows are scored against the same model unquantized: relative
perplexity increase with a paired-bootstrap 95 % CI (`lpq.train.domains`). Delayed-scaling variants are
first calibrated like a trained model's history: `--calib-steps` training-mode forwards on the
training corpus (batches of the recipe's size and length), then evaluated with the stored scales.

The `grad` role has no forward effect; it is scored by the error it puts into the parameter gradient
of a training step (bf16 autocast, as `lpq train`): relative L2 error and cosine against the
unquantized gradient, averaged over `--grad-batches` batches.

Results are appended as JSON lines to `--out` (a rerun skips variants already there).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/study_qat_roles.py --grid roles --out /tmp/roles.jsonl
    .venv/bin/python scripts/study_qat_roles.py --variant 'p_amax3={"attention": {"p": {"format": "hif8",
        "scaling": "current", "target": "amax", "amax_target": 8}}}' --out /tmp/p.jsonl

`--pair RUN_DIR` scores the models an `lpq train` run trained instead: every quantized run's `final/`
(its quantizers re-applied as trained, with their saved scales) against the reference's `final/`,
on the domains and on any `--text NAME=FILE[+FILE...]` (plain text: a domain no training mix holds):

    .venv/bin/python scripts/study_qat_roles.py --pair runs/smollm2_hif8 --domains "" --windows 8 \
        --text licenses=/usr/share/common-licenses/GPL-3+/usr/share/common-licenses/Apache-2.0 --out /tmp/pair.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from lpq.config import from_dict
from lpq.models.hub import ModelConfig, load_model
from lpq.quant import QuantRecipe, quantize_model, update_delayed_scales
from lpq.train.data import text_splits
from lpq.train.domains import DomainEvalConfig, compare_domains, domain_windows, score_domains
from lpq.train.recipe import DataConfig


def _spec(scaling: str, **rule) -> dict:
    return {"format": "hif8", "scaling": scaling, **rule}


def _role_recipe(role: str, spec: dict) -> dict:
    if role in ("weight", "input", "grad"):
        return {role: spec}
    return {"attention": {role: dict(spec, axis=-2 if role == "v" else -1)}}


def grid_roles(scaling: str) -> dict[str, dict]:
    """Each forward role alone under the window rule and the amax rule (2^k targets): weights over
    a wide grid, activations over the points the weight grid showed to matter, P (in [0, 1]) over
    amax targets inside the fine window."""
    out = {}
    grids = {"weight": ((-1, 0, 1, 2), (8, 11, 15)), "p": ((0,), (3, 5, 7)), "input": ((-3, -2, -1, 0, 2), (8,))}
    for role in ("p", "v", "k", "q", "input", "weight"):
        s = "current" if role == "weight" else scaling
        centres, targets = grids.get(role, ((-1, 0, 2), (8,)))
        for c in centres:
            out[f"{role}/window{c:+d}"] = _role_recipe(role, _spec(s, target="window", window_center=c))
        for k in targets:
            out[f"{role}/amax2^{k}"] = _role_recipe(role, _spec(s, target="amax", amax_target=2.0 ** k))
    return out


def grid_grad(scaling: str) -> dict[str, dict]:
    out = {}
    for c in (-2, 0, 2):
        out[f"grad/window{c:+d}"] = {"grad": _spec(scaling, target="window", window_center=c)}
    for k in (8, 15):
        out[f"grad/amax2^{k}"] = {"grad": _spec(scaling, target="amax", amax_target=2.0 ** k)}
    return out


def grid_blocks(base: dict, num_blocks: int) -> dict[str, dict]:
    """`base` (a whole quant section) in one block at a time: each block's share of the error, what
    protecting it would save (to first order)."""
    return {f"block{i:02d}": {**base, "protected_blocks": [b for b in range(num_blocks) if b != i]}
            for i in range(num_blocks)}


def calibrate(model, blocks: torch.Tensor, steps: int, batch_size: int) -> None:
    """Fill delayed-scaling histories the way training does: training-mode forwards (no grad), one
    batch per step, then fold the last step's statistics in."""
    model.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(steps):
            ids = blocks[(i * batch_size) % (len(blocks) - batch_size):][:batch_size]
            model(input_ids=ids, use_cache=False)
    update_delayed_scales(model)
    model.eval()


def grad_error(base, recipe: QuantRecipe, blocks: torch.Tensor, batches: int, batch_size: int) -> dict:
    """Relative L2 error and cosine of the full parameter gradient with `recipe` (grad role) vs without."""
    qmodel = quantize_model(copy.deepcopy(base), recipe)

    def flat_grad(model, ids):
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    errs, coss = [], []
    for i in range(batches):
        ids = blocks[i * batch_size:(i + 1) * batch_size]
        g0, g1 = flat_grad(base, ids), flat_grad(qmodel, ids)
        errs.append(float((g1 - g0).norm() / g0.norm()))
        coss.append(float(torch.nn.functional.cosine_similarity(g0, g1, dim=0)))
    return {"grad_rel_err": sum(errs) / len(errs), "grad_cosine": sum(coss) / len(coss)}


def trained_model(run_dir: Path, label: str, quant: QuantRecipe | None):
    """A run's `final/` model in float32; a quantized run with its quantizers and their saved buffers."""
    from safetensors.torch import load_file

    folder = run_dir / label / "final"
    loaded = load_model(ModelConfig(id=str(folder), dtype="float32"))
    model = loaded.model
    if quant is not None:
        quantize_model(model, quant)
        state = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise SystemExit(f"{folder}: {len(unexpected)} saved tensors fit no module, e.g. {unexpected[0]}")
    return model.eval(), loaded.tokenizer


def pair_runs(args: argparse.Namespace) -> None:
    """Each quantized run of a finished `lpq train` against its reference, window by window."""
    from lpq.eval.shift import token_windows
    from lpq.train.compare import quant_for_mode
    from lpq.train.recipe import load_recipe

    run_dir = args.pair
    recipe = load_recipe(run_dir / "recipe.yaml")
    report = json.loads((run_dir / "train_report.json").read_text())
    ref_model, tok = trained_model(run_dir, report["reference"], None)
    domains = [d for d in args.domains.split(",") if d]
    windows = domain_windows(DomainEvalConfig(domains=domains, split=args.split, windows=args.windows,
                                              seq_len=args.seq_len, batch_size=1), tok) if domains else {}
    for item in args.text:
        name, _, files = item.partition("=")
        text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files.split("+"))
        windows[name] = token_windows(tok, text, args.windows, args.seq_len)
    ref = score_domains(ref_model, windows, 1)
    del ref_model
    for label, entry in report["runs"].items():
        if not entry.get("quantized"):
            continue
        quant = quant_for_mode(recipe.quant, entry["scaling"]) if recipe.train.compare else recipe.quant
        model, _ = trained_model(run_dir, label, quant)
        row = {"variant": f"pair:{label}", "run": str(run_dir), "split": args.split, "seq_len": args.seq_len,
               "domains": compare_domains(ref, score_domains(model, windows, 1), args.seq_len)}
        del model
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{label}: " + ", ".join(f"{d} {v['ppl_increase_pct']:+.2f}% ({v['ci95_low']:+.2f}..{v['ci95_high']:+.2f})"
                                      for d, v in row["domains"].items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or a trained final/ folder")
    ap.add_argument("--grid", choices=["roles", "grad", "blocks", "none"], default="none")
    ap.add_argument("--base", default=None, help="blocks grid: the JSON quant section quantized one block at a time")
    ap.add_argument("--scaling", choices=["current", "delayed"], default="current",
                    help="scaling of the activation roles in the grids (weights: current)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON quant section (repeatable)")
    ap.add_argument("--domains", default="wikitext2,gsm8k,chat,fortunes")
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-steps", type=int, default=16, help="delayed scaling: training-mode forwards first")
    ap.add_argument("--calib-batch", type=int, default=2)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--grad-batches", type=int, default=2)
    ap.add_argument("--pair", type=Path, default=None,
                    help="a finished `lpq train` output folder: its quantized runs against its reference")
    ap.add_argument("--text", action="append", default=[], help="--pair: NAME=FILE[+FILE...] plain-text domain")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.pair is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pair_runs(args)
        return

    loaded = load_model(ModelConfig(id=args.model))
    base, tok = loaded.model.eval(), loaded.tokenizer
    dcfg = DomainEvalConfig(domains=args.domains.split(","), split=args.split, windows=args.windows,
                            seq_len=args.seq_len, batch_size=1)
    windows = domain_windows(dcfg, tok)
    splits = text_splits(DataConfig(seq_len=args.calib_seq_len, eval_blocks=32), tok)
    # The pydoc domain: training text the pretrained model has not been tuned on, away from the
    # calibration batches at the start and from the held-out tail.
    windows["pydoc"] = splits.train.reshape(-1)[-args.windows * args.seq_len:].view(args.windows, args.seq_len)

    variants = {}
    if args.grid == "roles":
        variants.update(grid_roles(args.scaling))
    elif args.grid == "grad":
        variants.update(grid_grad(args.scaling))
    elif args.grid == "blocks":
        if args.base is None:
            raise SystemExit("--grid blocks needs --base (a quant section as JSON)")
        variants.update(grid_blocks(json.loads(args.base), base.config.num_hidden_layers))
    for item in args.variant:
        name, _, data = item.partition("=")
        variants[name] = json.loads(data)
    done = set()
    if args.out.is_file():
        done = {json.loads(line)["variant"] for line in args.out.read_text().splitlines() if line.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    ref = None
    for name, section in variants.items():
        if name in done:
            continue
        recipe = from_dict({**section, "allow_over_budget": True}, QuantRecipe)
        t0 = time.perf_counter()
        row: dict = {"variant": name, "model": args.model, "quant": section, "split": args.split,
                     "seq_len": args.seq_len}
        if recipe.grad is not None and not (recipe.weight or recipe.input or recipe.attention):
            row.update(grad_error(base, recipe, splits.train, args.grad_batches, args.calib_batch))
        else:
            if ref is None:
                ref = score_domains(base, windows, 1)
            model = quantize_model(copy.deepcopy(base), recipe)
            if any(getattr(s, "scaling", None) and s.scaling.value == "delayed"
                   for s in (recipe.weight, recipe.input, *(getattr(recipe.attention, r, None) for r in "qkvp"))):
                calibrate(model, splits.train, args.calib_steps, args.calib_batch)
            model.eval()
            row["domains"] = compare_domains(ref, score_domains(model, windows, 1), args.seq_len, bootstrap=2000)
            del model
        row["seconds"] = time.perf_counter() - t0
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        summary = ", ".join(f"{d} {v['ppl_increase_pct']:+.2f}%" for d, v in row.get("domains", {}).items())
        print(f"{name}: {summary or {k: v for k, v in row.items() if k.startswith('grad_')}} ({row['seconds']:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
