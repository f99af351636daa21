"""Write a Qwen3-8B-shaped transformers checkpoint with random bf16 weights, one tensor at a time.

For rehearsals at real sizes on a machine without the real weights (not in CI). The model is never
built: tensor names and shapes come from a skeleton on the meta device, each tensor is drawn, written
to the safetensors shards (lpq.export.tensor_io.ShardWriter) and dropped, so memory stays at one
tensor (the largest is the 151,936 x 4,096 embedding, 1.2 GB in bf16).

Values follow Qwen3's own initialization (`_init_weights`): linears and embeddings normal(0,
initializer_range = 0.02), RMSNorm weights 1. Each tensor has its own seeded generator, so a rerun
writes identical files. The tokenizer is SmolLM2-135M's (lpq's built-in, 49,152 tokens: every id is
valid in Qwen3's 151,936-token vocabulary; the extra embedding rows are simply never looked up).

    python scripts/make_random_checkpoint.py --out /work/exp/E/qwen3-8b-random            # 36 layers, ~16.4 GB
    python scripts/make_random_checkpoint.py --out /work/exp/E/qwen3-8b-4l --layers 4     # same shapes, 4 blocks
"""
from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import torch

# Qwen3-8B's config.json (hub: Qwen/Qwen3-8B).
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
                hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645)
ROWS_PER_DRAW = 1024         # rows drawn at a time (float32 scratch of 1024 x 12288 = 50 MB at most)


def _random(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1, shape[-1])
    for r in range(0, flat.shape[0], ROWS_PER_DRAW):
        rows = flat[r:r + ROWS_PER_DRAW]
        rows.copy_(torch.randn(rows.shape, generator=g).mul_(std))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="new folder (refused if it exists)")
    ap.add_argument("--layers", type=int, default=QWEN3_8B["num_hidden_layers"])
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from lpq.export.tensor_io import ShardWriter, write_hf_index
    from lpq.models.hub import smollm2_dir

    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    config = Qwen3Config(**{**QWEN3_8B, "num_hidden_layers": args.layers}, dtype="bfloat16")
    with init_empty_weights():
        skeleton = Qwen3ForCausalLM(config)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    total = 0
    with ShardWriter(tmp, "model", {"format": "pt"}, int(args.shard_gb * 1e9)) as out:
        for name, p in skeleton.state_dict().items():
            if name.endswith("norm.weight"):
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                t = _random(name, tuple(p.shape), config.initializer_range, args.seed)
            out.add(name, t)
            total += t.numel() * t.element_size()
            del t
        weight_map, files = out.close()
    if len(files) > 1:
        write_hf_index(tmp, "model", weight_map, total)
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(tmp)
    (tmp / "random_checkpoint.json").write_text(json.dumps(
        {"made_by": "scripts/make_random_checkpoint.py", "layers": args.layers, "seed": args.seed,
         "bytes": total, "files": files, "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    tmp.rename(args.out)
    print(f"{args.out}: {args.layers} layers, {total / 1e9:.2f} GB of bf16 tensors in {len(files)} files, "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
