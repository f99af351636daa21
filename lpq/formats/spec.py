"""The registry of number formats: what each name means, in one table."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormatSpec:
    name: str
    family: str           # module in lpq.formats (and lpq/csrc/<family>.cpp) that implements it
    block: int            # elements sharing a scale (1: no block scale)
    bits_per_value: float
    max_finite: str       # largest finite magnitude, as text (some depend on a scale)
    rounding: str
    overflow: str
    description: str
    # The challenge's limit on transformer blocks kept in high precision when this format is used
    # (shared/docs/challenge.md); None: the challenge sets none.
    protected_budget: int | None = None
    # Largest finite magnitude of the format on its own (no block scale): the ceiling a per-tensor
    # scale must respect; None for block formats, whose block scale moves it.
    limit: float | None = None


FORMATS: dict[str, FormatSpec] = {
    s.name: s
    for s in [
        FormatSpec("hif8", "hif8", 1, 8.0, "32768", "ties away from zero (TA)",
                   "|x| >= 40960 -> Inf; |x| < 2^-23 -> +0",
                   "HiFloat8, official toolkit semantics (HiFloat8 @ fb5bea0)", protected_budget=5, limit=32768.0),
        FormatSpec("hif4", "hif4", 64, 4.5, "344064 (7 x 49152)",
                   "elements half away; E6M2 scale RNE",
                   "elements saturate at 1.75 x 2^d x S",
                   "HiFloat4: E6M2 scale + E1 per 8 + E1 per 4 + S1P2 elements; CUDA-kernel semantics",
                   protected_budget=2),
        FormatSpec("mxfp4", "mx", 32, 4.25, "6 x 2^127", "RNE",
                   "saturate at 6 x scale; non-finite block -> NaN scale",
                   "OCP MXFP4: E2M1 + E8M0, floor shared exponent from the fp32 bits", protected_budget=5),
        FormatSpec("mxfp4-rceil", "mx", 32, 4.25, "6 x 2^127", "RNE",
                   "scale = 2^ceil(log2(amax/6)) never saturates; non-finite block -> NaN scale",
                   "MXFP4 with the RCEIL scale rule (cuBLAS / torchao RCEIL)", protected_budget=5),
        FormatSpec("mxfp4-toolkit", "mx", 32, 4.25, "6 x 2^125", "half away from zero",
                   "saturate at 6 x scale; NaN poisons the block; Inf -> 6 x 2^125",
                   "the HiFloat4 toolkit's QType('mxfp4') (formats.md 3.5)", protected_budget=5),
        FormatSpec("nvfp4", "mx", 16, 4.5, "6 x 448 x tensor scale", "RNE",
                   "saturate at 6 x block scale",
                   "NVFP4: E2M1 + E4M3 scale per 16 + fp32 per-tensor scale (comparison format)"),
    ]
}


def get_format(name: str) -> FormatSpec:
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]
