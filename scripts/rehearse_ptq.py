"""Rehearsal (not in CI): `lpq ptq` (block Hadamard + GPTQ, W4A4) on a Qwen3-8B-shaped checkpoint with
disk offload and a small CPU `max_memory`, then `load_quantized` + one forward of its export.

The checkpoint comes from scripts/make_random_checkpoint.py (random weights: the point is time and
memory at the real shapes, not accuracy; evaluation is off). Calibration is cut down to fit a CPU
(`--sequences` x `--seq-len` tokens of the shared calibration text). What it measures, printed and
written to `<out>.rehearsal.json` (beside `<out>`, which belongs to lpq ptq):

* wall time of the run and per block (blocks_s / layers, from the run's report.json),
* peak RSS of the `lpq ptq` process, against the target 2 blocks + embeddings + 1.5 GB (bf16 sizes
  from the config: embeddings = input embedding + output head), and its peak before the export step
  (RSS sampled every 0.2 s, `<out>.rss_timeline.json`),
* load_quantized + one forward of the export, in a fresh process (scripts/rehearse_load.py), unless
  `--skip-load` (the reloaded model holds every weight dequantized in bf16, 16 GB for the 8B shape,
  unless `--keep-packed` keeps the codes: about the export's size).

    OMP_NUM_THREADS=1 python scripts/rehearse_ptq.py --model /work/exp/E/qwen3-8b-4l --out /work/exp/E/ptq-4l
    OMP_NUM_THREADS=1 python scripts/rehearse_ptq.py --model /work/exp/E/qwen3-8b-random --out /work/exp/E/ptq-8b \\
        --skip-load                                      # the long run; needs the streaming export in ptq
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rehearse_load import run_phase  # noqa: E402  (a sibling script)

GB = 1e9


def sizes(model_dir: Path) -> dict[str, float]:
    """bf16 bytes of one block and of the embeddings (input table + output head) from config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    h, i, heads, kv, d = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                          c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    block = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i + 2 * h + 2 * d      # q,o + k,v + mlp + norms
    embeddings = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2)
    return {"layers": c["num_hidden_layers"], "block_gb": 2 * block / GB, "embeddings_gb": 2 * embeddings / GB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="checkpoint folder (make_random_checkpoint.py)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--format", default="hif4")
    ap.add_argument("--max-memory-cpu", default="2GiB", help="accelerate's CPU budget; the rest goes to disk")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calibration", default=str(Path(__file__).resolve().parents[2] / "shared/data/calib/"
                                                   "fortunes_calib.txt"))
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--keep-packed", action="store_true", help="reload with keep_packed=True (codes in memory)")
    args = ap.parse_args()

    # lpq owns `out` (it refuses a folder it did not write): the rehearsal's own files go beside it.
    side = lambda suffix: args.out.with_name(f"{args.out.name}.{suffix}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recipe = {
        "model": {"id": str(args.model), "dtype": "bfloat16", "device_map": "auto",
                  "max_memory": {"cpu": args.max_memory_cpu}, "offload_dir": str(args.out / "offload_weights")},
        "quant": {"format": args.format},
        "calibration": {"text_file": args.calibration, "num_sequences": args.sequences, "seq_len": args.seq_len,
                        "batch_size": 1},
        "algorithms": [{"name": "hadamard"}, {"name": "gptq"}],
        "protect": {"blocks": []},
        "evaluation": None,
        "export": {"out": str(args.out / "export"), "force": True},
        "output_dir": str(args.out),
    }
    config = side("recipe.yaml")
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "lpq.cli", "ptq", "--config", str(config), "--out", str(args.out)])
    timeline = []                      # (seconds, RSS GB) of the ptq process, every 0.2 s
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            timeline.append((time.perf_counter() - t0, kb * 1024 / GB))
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    if child.returncode:
        raise SystemExit(f"lpq ptq failed (exit {child.returncode})")
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB
    report = json.loads((args.out / "report.json").read_text())
    s = sizes(args.model)
    target = 2 * s["block_gb"] + s["embeddings_gb"] + 1.5
    timings = report.get("timings", {})
    result = {"model": str(args.model), "layers": s["layers"], "calibration_tokens": args.sequences * args.seq_len,
              "max_memory_cpu": args.max_memory_cpu, "wall_s": round(wall), "timings_s": timings,
              "per_block_s": round(timings["blocks_s"] / s["layers"], 1) if "blocks_s" in timings else None,
              "peak_rss_gb": round(peak_gb, 2), "report_peak_rss_gb": round(report.get("peak_rss_mb", 0) / 1024, 2),
              # the export is the run's last step: the peak before it is the blocks' (and model loading's)
              "peak_rss_before_export_gb": round(max((r for t, r in timeline if t < wall - timings.get("export_s", 0)),
                                                     default=0), 2),
              "block_bf16_gb": round(s["block_gb"], 3), "embeddings_bf16_gb": round(s["embeddings_gb"], 3),
              "target_gb": round(target, 2), "within_target": peak_gb <= target}
    side("rss_timeline.json").write_text(json.dumps([(round(t, 1), round(r, 3)) for t, r in timeline]))
    print(json.dumps(result), flush=True)
    if not args.skip_load:
        load_args = ["--export", str(args.out / "export")] + ["--keep-packed"] * args.keep_packed
        result["load"] = run_phase("load", load_args)
    side("rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
