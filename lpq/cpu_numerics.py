"""Bit-identical CPU results on every machine of a kind: pin the kernels torch, MKL and oneDNN pick.

torch (ATen), MKL and oneDNN choose their CPU kernels by the machine's vector instructions (AVX2,
AVX-512, AVX-512 BF16). Those kernels sum in different orders, so the same recipe gives results that
differ in the last bits between, e.g., an AVX2-only and an AVX-512 machine of the same nominal kind
(2-core AMD EPYC VMs come as both), and PTQ's sensitivity ranking, GPTQ and the 60-step norm
distillation amplify those bits into different models (measured: +5.1 % vs +5.9 % WikiText-2
perplexity for the same default recipe). The `lpq` command line therefore pins every library to
the AVX2 level before torch is imported; the thread count is pinned per run (`threads`).

Set LPQ_CPU_NUMERICS=native to let the libraries use the machine's widest instructions (faster on
AVX-512 machines, e.g. bfloat16 matmuls; results then depend on the machine). Variables the user set
are kept. GPU numerics are not affected.
"""
from __future__ import annotations

import os

PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",      # torch's vectorized kernels (reductions, softmax, norms, ...)
    "MKL_CBWR": "AVX2",                 # MKL's conditional numerical reproducibility branch (matmuls)
    "ONEDNN_MAX_CPU_ISA": "AVX2",       # oneDNN (some convolutions, bf16 paths)
}


def pin() -> dict[str, str]:
    """Set the pinning variables (those not set already) unless LPQ_CPU_NUMERICS=native; call before
    torch is imported. Returns the profile in effect."""
    if os.environ.get("LPQ_CPU_NUMERICS", "pinned") != "native":
        for key, value in PINNED.items():
            os.environ.setdefault(key, value)
    return profile()


def profile() -> dict[str, str]:
    """What decides the CPU numerics of this process (for reports)."""
    out = {k: os.environ.get(k, "unset") for k in PINNED}
    out["LPQ_CPU_NUMERICS"] = os.environ.get("LPQ_CPU_NUMERICS", "pinned")
    return out


def native_bf16_matmul() -> bool:
    """Whether this process's CPU bfloat16 matmuls run on bfloat16 instructions (AVX512-BF16 or AMX at the
    level oneDNN may use). Not under the pinned profile, where they are emulated: measured ~90x slower than
    float32 on a 2-core AVX512-BF16 EPYC (`F.linear` 1024 x 576 by 576 x 1536: 2 against 178 GFLOP/s)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
