"""Size and load time of SmolLM2-135M exports: packed and fake, per format, against the bf16 folder.

    .venv/bin/python scripts/bench_export.py [--formats hif4 mxfp4 hif8] [--out runs/bench_export]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["hif4", "mxfp4", "hif8"])
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here (default: a temp folder)")
    args = parser.parse_args()

    from lpq.config import from_dict
    from lpq.export import export_model, load_quantized
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import QuantRecipe, quantize_model

    root = args.out or Path(tempfile.mkdtemp(prefix="lpq-bench-export-"))
    base = load_model(ModelConfig("smollm2-135m", dtype="bfloat16"))
    base.model.save_pretrained(root / "bf16")
    base.tokenizer.save_pretrained(root / "bf16")
    bf16_mb = _folder_mb(root / "bf16")
    print(f"bf16 folder: {bf16_mb:.2f} MB")
    print("| format | kind | quantized bits/param | quantized vs bf16 | folder MB | folder vs bf16 folder "
          "| export s | load s | bit-exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    ids = base.tokenizer("The capital of France is", return_tensors="pt").input_ids
    for fmt in args.formats:
        for kind in ("packed", "fake"):
            lm = load_model(ModelConfig("smollm2-135m", dtype="bfloat16"))
            recipe = from_dict({"format": fmt}, QuantRecipe)
            quantize_model(lm.model, recipe)
            with torch.no_grad():
                expected = lm.model(ids).logits
            out = root / f"{fmt}-{kind}"
            t0 = time.perf_counter()
            report = export_model(lm.model, recipe, out, kind=kind, force=True, tokenizer=lm.tokenizer)
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            if kind == "packed":
                model = load_quantized(out)
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(out)
            t_load = time.perf_counter() - t0
            with torch.no_grad():
                exact = torch.equal(model(ids).logits, expected) if kind == "packed" else "n/a (A unquantized)"
            folder_mb = _folder_mb(out)
            print(f"| {fmt} | {kind} | {report.bits_per_param:.3f} | {100 * report.quantized_ratio:.1f} % "
                  f"| {folder_mb:.2f} | {100 * folder_mb / bf16_mb:.1f} % | {t_export:.2f} | {t_load:.2f} | {exact} |")
    if args.out is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
