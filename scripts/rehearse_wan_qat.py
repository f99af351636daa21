"""Rehearsal (not in CI): one HiF8 QAT step of a Wan2.1-T2V-1.3B-shaped transformer, with attention
quantization, at reduced token counts on this CPU, and the extrapolation to 81 x 480 x 832.

The transformer is diffusers' WanTransformer3DModel with Wan2.1-T2V-1.3B's config (30 layers, dim 1536,
12 heads of 128, ffn 8960, in/out 16 channels, text_dim 4096, patch (1, 2, 2)) and random weights.
It is quantized with the `quant:` section of configs/wan21_hif8.yaml (HiF8 weights with current
scaling; inputs, gradients and attention Q/K/V/P with delayed scaling) and trained for one step on the
flow-matching objective of lpq/train/wan_objective.py (x_t = (1 - s) x0 + s noise at timestep 1000 s,
target noise - x0, MSE; s drawn with Wan2.1's shift 5) on random latents and random 512-token text
embeddings, with per-block gradient checkpointing as the recipe (train.gradient_checkpointing).

What differs from a GPU run, to fit this 24 GB, 2-core machine: float32 weights and compute (the
recipe's master weights; a GPU computes under bf16 autocast, and this CPU has no bf16 matmul units:
bf16 was measured 12x slower here), and plain SGD applied to each parameter as soon as its gradient is
complete, which then is freed (so all gradients are never held at once; the GPU run holds them, plus
AdamW's two states: 4 + 8 bytes per parameter more); the token counts are small (latent frames x
(height/16) x (width/16)).
Each token count runs in its own process. The step's own memory is the peak of live tensor bytes
during the step less the weights (torch's MemTracker: exact, whatever glibc does with freed memory);
the RSS peak minus the RSS after building and quantizing the model is printed beside it. Fitting time
and memory over the token counts gives per-token costs; the script prints them with the extrapolation
to 21 latent frames x 30 x 52 = 32,760 tokens.

    OMP_NUM_THREADS=1 python scripts/rehearse_wan_qat.py --tokens 390 780 1560 --attention materialized \\
        --json /work/exp/E/wan_qat_materialized.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from rehearse_load import RssPeak, peak_rss_mb, rss_mb  # noqa: E402  (a sibling script)

WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
FULL_TOKENS = 21 * 30 * 52          # 81 frames -> 21 latent frames; 480 x 832 -> 60 x 104 latents -> 30 x 52 patches
TEXT_TOKENS = 512
SHIFT = 5.0                         # Wan2.1 T2V 480p flow shift
LR = 1e-5                           # the recipe's


def latent_shape(tokens: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of the first video shape with exactly `tokens`
    2 x 2 patches: fewest frames, then widest rows of 52, 26 or 13 patches (832, 416, 208 pixels)."""
    for frames in range(1, 22):
        for width in (52, 26, 13):
            per_frame = tokens // frames
            if tokens % frames == 0 and per_frame % width == 0:
                return frames, 2 * (per_frame // width), 2 * width
    raise SystemExit(f"{tokens} tokens: no latent shape found; use a multiple of 13")


def one_step(args: argparse.Namespace) -> dict:
    import torch
    import yaml
    from diffusers import WanTransformer3DModel
    from torch.distributed._tools.mem_tracker import MemTracker

    from lpq.config import from_dict
    from lpq.quant import AttentionQuantizers, QuantRecipe, quantize_model
    from lpq.train.recipe import FlowMatchConfig
    from lpq.train.wan_objective import WanFlowObjective, sample_sigmas

    torch.set_num_threads(1)
    base = rss_mb()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**WAN21_1_3B, "num_layers": args.layers})
    recipe = from_dict(yaml.safe_load((REPO / "configs/wan21_hif8.yaml").read_text())["quant"], QuantRecipe)
    quantize_model(model, recipe)
    impls = set()
    for m in model.modules():
        if isinstance(m, AttentionQuantizers):
            m.impl = args.attention
            impls.add(m.impl)
    model.enable_gradient_checkpointing()
    model.train()
    params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0
    rss_model = rss_mb()

    frames, h, w = latent_shape(args.one)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, frames, h, w, generator=gen)
    emb = torch.randn(1, TEXT_TOKENS, 4096, generator=gen)
    sigma = sample_sigmas(1, gen, FlowMatchConfig(shift=SHIFT), SHIFT, 0.0, 1.0)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    batch = {"noisy": (1 - s) * x0 + s * noise, "timestep": sigma * 1000, "target": noise - x0, "embeds": emb}
    def sgd_and_free(p: torch.nn.Parameter) -> None:
        with torch.no_grad():
            p.add_(p.grad, alpha=-LR)
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(sgd_and_free)
    # RSS alone misleads here: glibc keeps freed blocks and its mmap threshold moves, so the RSS
    # high-water mark of a step at a few hundred tokens says little about the per-token cost. The
    # tensor figures count live tensor storages exactly (torch's MemTracker sees every allocation
    # made through the dispatcher, the C++ kernels' included) and are what the extrapolation uses.
    tracker = MemTracker()
    tracker.track_external(model, *[t for t in batch.values() if torch.is_tensor(t)])
    t1 = time.perf_counter()
    with RssPeak() as step, tracker:
        loss = WanFlowObjective.loss(model, batch)
        t_fwd = time.perf_counter() - t1
        after_fwd = _tensor_mb(tracker.get_tracker_snapshot("current"))
        loss.backward()
        peak = _tensor_mb(tracker.get_tracker_snapshot("peak"))
    step_s = time.perf_counter() - t1
    if not torch.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss.item()}")
    return {"tokens": args.one, "latent": [frames, h, w], "layers": args.layers, "params": params,
            "attention_impl": sorted(impls), "loss": round(loss.item(), 4), "build_s": round(build_s, 1),
            "forward_s": round(t_fwd, 1), "step_s": round(step_s, 1), "rss_after_imports_mb": round(base),
            "rss_model_mb": round(rss_model), "peak_step_mb": round(step.mb),
            "step_extra_mb": round(step.mb - rss_model), "peak_rss_mb": round(peak_rss_mb()),
            "tensors_after_forward_mb": after_fwd, "tensors_peak_mb": peak,
            "step_tensor_mb": round(peak["total"] - peak["parameters"] - peak["buffers"])}


def _tensor_mb(snapshot: dict) -> dict[str, int]:
    """MemTracker's snapshot (one device here) as MB per kind of tensor."""
    (per_kind,) = snapshot.values()
    names = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Activation": "activations",
             "Temp": "temporaries", "Optstate": "optimizer", "Other": "other", "Total": "total"}
    return {names[getattr(k, "value", k)]: round(v / 2**20) for k, v in per_kind.items()}


def fit(xs: list[float], ys: list[float], degree: int) -> list[float]:
    """Least-squares polynomial coefficients (constant first)."""
    import torch

    a = torch.tensor([[x ** k for k in range(degree + 1)] for x in xs], dtype=torch.float64)
    sol = torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64).unsqueeze(1)).solution
    return sol.squeeze(1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[390, 780, 1560], help="video tokens per step")
    ap.add_argument("--attention", choices=["auto", "tiled", "materialized"], default="materialized")
    ap.add_argument("--layers", type=int, default=WAN21_1_3B["num_layers"], help="fewer only to try the script")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_step(args)))
        return
    runs = []
    for n in args.tokens:
        cmd = [sys.executable, __file__, "--one", str(n), "--attention", args.attention, "--layers", str(args.layers)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    result = {"attention": args.attention, "runs": runs}
    if len(runs) >= 2:
        xs = [r["tokens"] for r in runs]
        # Tiled attention makes every per-token cost linear; the materialized path adds a square term.
        degree = 1 if args.attention == "tiled" or len(runs) == 2 else 2
        at = lambda c, n: sum(ck * n ** k for k, ck in enumerate(c))
        tensors = fit(xs, [r["step_tensor_mb"] for r in runs], degree)
        rss = fit(xs, [r["step_extra_mb"] for r in runs], degree)
        step = fit(xs, [r["step_s"] for r in runs], degree)
        weights_mb = runs[-1]["tensors_peak_mb"]["parameters"] + runs[-1]["tensors_peak_mb"]["buffers"]
        result["fit"] = {"degree": degree, "step_tensor_mb": tensors, "step_rss_extra_mb": rss, "step_s": step}
        result["extrapolated_to_32760_tokens"] = {
            "step_tensor_gb": round(at(tensors, FULL_TOKENS) / 1024, 1),
            "with_weights_gb": round((at(tensors, FULL_TOKENS) + weights_mb) / 1024, 1),
            "step_rss_extra_gb": round(at(rss, FULL_TOKENS) / 1024, 1),
            "step_s_this_cpu": round(at(step, FULL_TOKENS))}
        print(json.dumps({k: result[k] for k in ("fit", "extrapolated_to_32760_tokens")}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
