"""Quantization recipes: which format and scaling rule each tensor role gets, as versioned dataclasses.

A recipe is plain data: it loads from YAML with `lpq.config.from_dict(data, QuantRecipe)`, and
`lpq.config.to_dict` gives it back, so it can be stored next to a checkpoint. Roles:

* `weight`, `input` (the activation entering a linear, quantized along the reduction dim),
  `grad` (the gradient arriving at a linear's output in backward, TransformerEngine's
  `grad_output`: the operand of both backward GEMMs; used in training only);
* attention `q`, `k`, `v`, `p` (softmax probabilities), each along its matmul's reduction dim.

Per-tensor scaling (`scaling: none | current | delayed`) multiplies a tensor by a scale s before
the format's quantizer and divides after. Two rules choose s (`target`):

* `window` (default): HiF8 precision is tapered (3 mantissa bits for |exponent| <= 3, 2 for 4..7,
  1 for 8..15), so the FP8 habit of pushing amax up to the format's maximum moves the bulk of the
  tensor into the coarse binades (measured on SmolLM2-135M W8A8: no scaling +5.7 % WikiText-2 PPL,
  amax -> 2^8 +10.7 %, amax -> 2^15 +71 %). This rule picks s = 2^k with k = round(window_center -
  log2(RMS)), so the RMS lands at 2^window_center inside the fine window, lowered when needed so
  that amax * s <= 2^(15 - margin) (nothing overflows to Inf).
* `amax`: s = amax_target / amax / 2^margin (amax_target defaults to the format's largest value,
  32768 for HiF8), rounded down to a power of two unless `power_of_two: false`.

Power-of-two scales keep the scaling exact. Block formats (HiF4, MXFP4) carry their own scales,
so `scaling: none` is their natural setting. Example (HiF8 QAT with delayed scaling):

    quant:
      weight: {format: hif8, scaling: current}
      input:  {format: hif8, scaling: delayed, history_len: 16, reduction: max}
      grad:   {format: hif8, scaling: delayed}
      attention: {format: hif8}
      protected_blocks: [0, 29]
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from lpq.formats.spec import FORMATS, get_format
from lpq.schema import Choice, KeyedError, RecipeVersion, recipe_version

RECIPE_VERSION = RecipeVersion.V1

# The challenge's limits on blocks kept in high precision (docs: shared/docs/challenge.md).
BLOCK_BUDGETS = {n: s.protected_budget for n, s in FORMATS.items() if s.protected_budget is not None}


def block_budget(formats: Iterable[str]) -> int | None:
    """The challenge's limit on protected blocks for a recipe using `formats` (the strictest), or None."""
    limits = [BLOCK_BUDGETS[f] for f in formats if f in BLOCK_BUDGETS]
    return min(limits) if limits else None


def check_protected_budget(count: int, formats: Iterable[str], allow_over_budget: bool, key: str,
                           shown: str | None = None) -> None:
    """The one check of a number of protected blocks against the challenge budget, for every recipe that
    protects blocks (`quant.protected_blocks` of train/export/eval/inspect, `protect` of ptq). `key` is
    where the blocks come from, relative to the checking dataclass (`shown`: as the message names it,
    default `key`); raises KeyedError in one line."""
    formats = set(formats)
    budget = block_budget(formats)
    if budget is None or count <= budget or allow_over_budget:
        return
    fmts = "/".join(sorted(f for f in formats if BLOCK_BUDGETS.get(f) == budget))
    raise KeyedError(key, f"{count} protected blocks exceed the challenge budget of {budget} for {fmts} "
                          f"({shown or key}); set quant.allow_over_budget: true for research runs outside the "
                          f"challenge")


class QKRotation(Choice):
    """An orthogonal rotation of each head's Q and K rows before their quantizers. (Q H)(K H)^T = Q K^T, so
    it changes nothing in float; it spreads the few large channels of a head (RoPE's slow frequencies)
    over all of them before rounding (QuaRot's / SpinQuant's online Q/K rotation)."""

    NONE = "none"
    HADAMARD = "hadamard"   # Sylvester Hadamard over head_dim (powers-of-two blocks if head_dim is not one)


class Scaling(Choice):
    """How a per-tensor scale is found before the format's own quantization."""

    NONE = "none"          # the format's own block scale only
    CURRENT = "current"    # from this tensor's statistics, now
    DELAYED = "delayed"    # from an amax history of earlier steps (FP8-LM / TransformerEngine)


class ScaleTarget(Choice):
    """Where the per-tensor scale puts the tensor."""

    # HiF8-native: a power of two that puts the tensor's RMS at 2^window_center, inside the
    # 3-mantissa-bit window (|exponent| <= 3), lowered when needed so amax stays <= 2^15 (no Inf).
    WINDOW = "window"
    # The FP8 habit: amax -> amax_target (default: the format's largest finite value) / 2^margin.
    AMAX = "amax"


class Reduction(Choice):
    MAX = "max"
    MOST_RECENT = "most_recent"


# Largest finite value per format for the amax rule and the overflow guard; block formats have
# no fixed largest value (their block scale moves), so the amax rule needs an explicit target.
FORMAT_LIMITS = {n: s.limit for n, s in FORMATS.items() if s.limit is not None}


@dataclass
class QuantizerSpec:
    """One role's quantizer: format, axis, and the per-tensor scaling rule."""

    format: str
    axis: int = -1
    scaling: Scaling = Scaling.NONE
    target: ScaleTarget = ScaleTarget.WINDOW
    window_center: float = 0.0      # log2 of where the RMS goes (window rule)
    amax_target: float | None = None  # amax rule: value amax maps to; None: the format's max
    power_of_two: bool = True       # amax rule: round the scale down to a power of two (exact scaling)
    margin: int = 0                 # extra headroom, in powers of two (both rules)
    history_len: int = 16           # delayed scaling
    reduction: Reduction = Reduction.MAX

    def __post_init__(self) -> None:
        get_format(self.format)
        self.scaling = Scaling.parse(self.scaling, "scaling")
        self.target = ScaleTarget.parse(self.target, "target")
        self.reduction = Reduction.parse(self.reduction, "reduction")
        if self.history_len < 1:
            raise KeyedError("history_len", f"history_len must be >= 1, got {self.history_len}")
        if self.margin < 0:
            raise KeyedError("margin", f"margin must be >= 0, got {self.margin}")
        if not math.isfinite(self.window_center):
            raise KeyedError("window_center", f"window_center must be a finite log2 value, got {self.window_center}")
        limit = self.limit()
        if limit is not None and abs(self.window_center) > math.log2(limit):
            # Beyond the format's largest value the overflow guard would silently turn the rule into
            # an amax rule; below its reciprocal most of the tensor flushes to zero.
            bound = math.log2(limit)
            raise KeyedError("window_center", f"window_center {self.window_center:g} is outside {self.format}'s range: "
                             f"use -{bound:g} .. {bound:g} (log2 of where the RMS goes)")
        if self.amax_target is not None and not self.amax_target > 0:
            raise KeyedError("amax_target", f"amax_target must be > 0, got {self.amax_target}")
        if (self.scaling != Scaling.NONE and self.target == ScaleTarget.AMAX and self.amax_target is None
                and self.format not in FORMAT_LIMITS):
            raise ValueError(f"the amax scaling rule for block format {self.format!r} needs an explicit "
                             f"amax_target (its block scale has no fixed largest value)")

    def limit(self) -> float | None:
        """The largest magnitude the scaled tensor may reach, or None when the format has none."""
        return FORMAT_LIMITS.get(self.format)


@dataclass
class AttentionRecipe:
    """Attention quantization: Q and K along head_dim, V along the key sequence, P along the keys.

    `format: hif8` is a short form that fills q, k, v and p with default axes. `qk_rotation` rotates Q
    and K before they are quantized (QKRotation).
    """

    format: str | None = None
    q: QuantizerSpec | None = None
    k: QuantizerSpec | None = None
    v: QuantizerSpec | None = None
    p: QuantizerSpec | None = None
    qk_rotation: QKRotation = QKRotation.NONE

    def __post_init__(self) -> None:
        self.qk_rotation = QKRotation.parse(self.qk_rotation, "qk_rotation")
        if self.format is not None:
            axes = {"q": -1, "k": -1, "v": -2, "p": -1}
            for role, axis in axes.items():
                if getattr(self, role) is None:
                    setattr(self, role, QuantizerSpec(self.format, axis=axis))
        if not any(getattr(self, r) for r in ("q", "k", "v", "p")):
            raise ValueError("an attention section needs `format` or at least one of q, k, v, p")


@dataclass
class QuantRecipe:
    """What to quantize and how. YAML: `quant: {format: hif4, protected_blocks: [0, 29]}`."""

    version: RecipeVersion = RECIPE_VERSION
    format: str | None = None                 # short form: fills weight and input
    weight: QuantizerSpec | None = None
    input: QuantizerSpec | None = None
    grad: QuantizerSpec | None = None
    attention: AttentionRecipe | None = None
    protected_blocks: list[int] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)   # extra fnmatch patterns on module names
    allow_over_budget: bool = False
    adapter: str | None = None                # model family; None: detected from the model

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
        if self.format is not None:
            self.weight = self.weight or QuantizerSpec(self.format)
            self.input = self.input or QuantizerSpec(self.format)
        if not (self.weight or self.input or self.grad or self.attention):
            raise ValueError("the recipe quantizes nothing: set `format`, or weight/input/grad/attention")
        if any(b < 0 for b in self.protected_blocks):
            raise KeyedError("protected_blocks",
                             f"protected_blocks must be block indices >= 0, got {self.protected_blocks}")
        if len(set(self.protected_blocks)) != len(self.protected_blocks):
            raise KeyedError("protected_blocks", f"protected_blocks has duplicates: {self.protected_blocks}")
        check_protected_budget(len(self.protected_blocks), self.formats(), self.allow_over_budget,
                               "protected_blocks", shown="quant.protected_blocks")

    def formats(self) -> set[str]:
        specs = [self.weight, self.input, self.grad]
        if self.attention:
            specs += [self.attention.q, self.attention.k, self.attention.v, self.attention.p]
        return {s.format for s in specs if s is not None}

    def block_budget(self) -> int | None:
        """The challenge's limit on protected blocks for this recipe's formats (the strictest), or None."""
        return block_budget(self.formats())
