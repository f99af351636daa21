"""Rehearsal (not in CI): peak memory of a packed export and of `load_quantized` + one forward, at real sizes.

Each phase runs in a fresh child process, so its peak RSS (`ru_maxrss`) is its own:

* export: the model is loaded (with `--offload-dir`: accelerate's device_map puts the embeddings,
  the head and every block on disk, so it never sits in memory), quantized by `quantize_model`
  (RTN: each weight is quantized when the export reads it), and written by `export_model`, which
  reads one block at a time (an offloaded block is loaded for it) and streams the shards;
* load: `load_quantized(export)` (meta skeleton filled tensor by tensor), then one forward; with
  `--keep-packed` the quantized weights stay as codes and are decoded per module in the forward.

Printed and written to `--json`: wall times, peak RSS, the RSS right after the imports (the
interpreter, torch, transformers), and the sizes the targets are stated in: one block, the index, the
packed folder, the loaded model's own tensors. Run one at a time, single-threaded:

    OMP_NUM_THREADS=1 python scripts/rehearse_load.py --model /work/exp/E/qwen3-8b-4l \\
        --export /work/exp/E/exports/qwen3-8b-4l-hif4 --offload-dir /work/exp/E/offload --json out.json
    OMP_NUM_THREADS=1 python scripts/rehearse_load.py --model smollm2-135m --export /tmp/smollm2-hif4
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROMPT = "The capital of France is Paris. The capital of Italy is"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class RssPeak:
    """The highest RSS seen while the context runs (sampled every 20 ms by a thread), so that one step's
    peak can be told apart from earlier ones (ru_maxrss covers the whole process)."""

    def __enter__(self) -> RssPeak:
        self.mb, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.mb = max(self.mb, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, rss_mb())


def tensor_bytes(module: Any) -> int:
    """Bytes of a module's distinct tensors (parameters and buffers, shared ones once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key not in seen and not t.is_meta:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _imports() -> None:
    """Everything a phase imports, so that the baseline RSS includes the libraries (transformers'
    modeling code alone is ~200 MB) and the measured steps only what they allocate."""
    import accelerate  # noqa: F401
    import torch
    import transformers.modeling_utils  # noqa: F401

    import lpq.export.reader  # noqa: F401
    import lpq.export.writer  # noqa: F401
    from lpq.formats import decode, encode

    torch.set_num_threads(1)
    decode(encode(torch.ones(1, 64), "hif4"))        # loads the C++ kernels


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    from lpq.config import from_dict
    from lpq.export import export_model
    from lpq.models.adapters import get_adapter
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import QuantRecipe, quantize_model

    _imports()
    base = rss_mb()
    t0 = time.perf_counter()
    device_map = None
    if args.offload_dir:
        from transformers import AutoConfig

        n = AutoConfig.from_pretrained(args.model).num_hidden_layers
        device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
                      **{f"model.layers.{i}": "disk" for i in range(n)}}
    loaded = load_model(ModelConfig(id=args.model, dtype="bfloat16", device_map=device_map,
                                    offload_dir=args.offload_dir))
    model = loaded.model
    t_model = time.perf_counter() - t0
    rss_model = rss_mb()
    block = get_adapter(model).blocks(model)[0]
    block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    recipe = from_dict({"format": args.format}, QuantRecipe)
    quantize_model(model, recipe)
    t1 = time.perf_counter()
    with RssPeak() as during:
        report = export_model(model, recipe, args.export, force=True, tokenizer=loaded.tokenizer,
                              max_shard_gb=args.shard_gb)
    t_export = time.perf_counter() - t1
    index = Path(args.export) / "lpq_index.json"
    return {"phase": "export", "model_load_s": round(t_model, 1), "export_s": round(t_export, 1),
            "offloaded": bool(args.offload_dir), "rss_after_imports_mb": round(base), "rss_after_model_load_mb":
            round(rss_model), "peak_rss_export_mb": round(during.mb), "peak_rss_mb": round(peak_rss_mb()),
            "block_bf16_mb": round(block_bytes / 2**20),
            "index_mb": round(index.stat().st_size / 2**20, 2), "folder_mb": round(report.folder_bytes / 2**20),
            "bits_per_param": report.bits_per_param}


def phase_load(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import lpq
    from lpq.export.resident import packed_resident
    from transformers import AutoTokenizer

    _imports()
    base = rss_mb()
    t0 = time.perf_counter()
    with RssPeak() as during_load:
        model = lpq.load_quantized(args.export, keep_packed=args.keep_packed)
    t_load = time.perf_counter() - t0
    rss_loaded = rss_mb()
    ids = AutoTokenizer.from_pretrained(args.export)(PROMPT, return_tensors="pt").input_ids
    t1 = time.perf_counter()
    with torch.no_grad(), RssPeak() as during_forward:
        logits = model(ids).logits
    t_fwd = time.perf_counter() - t1
    if not torch.isfinite(logits).all():
        raise SystemExit("the forward of the reloaded model gave non-finite logits")
    packed = sum(w.nbytes for w in packed_resident(model).values())
    return {"phase": "load", "keep_packed": args.keep_packed, "load_s": round(t_load, 1),
            "forward_s": round(t_fwd, 2), "tokens": ids.shape[1],
            "rss_after_imports_mb": round(base), "rss_after_load_mb": round(rss_loaded),
            "peak_rss_load_mb": round(during_load.mb), "peak_rss_forward_mb": round(during_forward.mb),
            "peak_rss_mb": round(peak_rss_mb()),
            "model_tensors_mb": round(tensor_bytes(model) / 2**20), "packed_weights_mb": round(packed / 2**20),
            "next_token": int(logits[0, -1].argmax())}


def run_phase(name: str, argv: list[str]) -> dict[str, Any]:
    """One phase in a fresh interpreter; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, __file__, "--phase", name, *argv], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="transformers folder or built-in id (export phase)")
    ap.add_argument("--export", required=True, help="packed export folder (written by the export phase)")
    ap.add_argument("--offload-dir", help="offload the model to disk here for the export (deleted afterwards)")
    ap.add_argument("--format", default="hif4")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--skip-export", action="store_true", help="only load an existing export")
    ap.add_argument("--skip-load", action="store_true", help="only export (the loaded model must fit in memory)")
    ap.add_argument("--keep-packed", action="store_true", help="load with keep_packed=True (codes in memory)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--phase", choices=["export", "load"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps((phase_export if args.phase == "export" else phase_load)(args)))
        return
    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if args.json:
        argv = [a for a in argv if a != str(args.json)]
    results = []
    if not args.skip_export:
        if not args.model:
            raise SystemExit("--model is needed for the export phase (or pass --skip-export)")
        results.append(run_phase("export", argv))
        if args.offload_dir:
            shutil.rmtree(args.offload_dir, ignore_errors=True)
    if not args.skip_load:
        results.append(run_phase("load", argv))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
