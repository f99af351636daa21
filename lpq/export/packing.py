"""Find a network's quantized weights and turn each into its real bits (and back), bit-exactly.

The weight exported is the one the module uses in an eval forward (`quantized_weight`): for RTN
it is fake_quant of the parameter, for GPTQ the on-grid values written by `set_quantized_weight`.
A weight quantizer with per-tensor scaling computes `fake_quant(w * s) / s`; the codes are those
of `w * s` and `s` is stored as `<key>.prescale` (one value per group: per expert for MoE).
Every packed weight is decoded again at export and must reproduce the forward weight bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lpq.export.ongrid import encode_on_grid
from lpq.formats import Packed, decode, encode
from lpq.quant.attention import AttentionQuantizers
from lpq.quant.experts import QuantExperts
from lpq.quant.linear import QuantLinear
from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.recipe import Scaling
from lpq.quant.transforms import InputTransform


@dataclass
class QuantizedWeight:
    key: str                    # state-dict key of the parameter
    module: nn.Module           # QuantLinear or QuantExperts
    attr: str                   # "weight", "gate_up_proj" or "down_proj"
    quantizer: TensorQuantizer

    @property
    def fmt(self) -> str:
        return self.quantizer.spec.format

    @property
    def axis(self) -> int:
        return self.quantizer.spec.axis

    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def forward_weight(self) -> Tensor:
        """The weight an eval forward multiplies by (call with the module in eval mode).

        A quantized copy this computes is not left in the module's cache when none was there: an
        export goes through every weight, and keeping them all would hold a second model."""
        experts = isinstance(self.module, QuantExperts)
        cache = self.module._caches[self.attr] if experts else self.module._cache
        was_empty = cache.value is None
        w = self.module.quantized_weight(self.attr) if experts else self.module.quantized_weight()
        if was_empty:
            cache.invalidate()
        return w

    def prescale(self) -> Tensor | None:
        """The per-tensor (per-group) scale the quantizer multiplies by, or None without scaling."""
        if self.quantizer.spec.scaling == Scaling.NONE:
            return None
        s = self.quantizer.scale.detach().float().cpu()
        return torch.where(s > 0, s, torch.ones_like(s))   # 0: the quantizer never ran

    def set(self, w_q: Tensor) -> None:
        """Make `w_q` (on the format grid) the weight an eval forward uses, without re-quantizing it."""
        if isinstance(self.module, QuantExperts):
            self.module.set_quantized_weight(self.attr, w_q)
        else:
            self.module.set_quantized_weight(w_q)


def quantized_weights(net: nn.Module) -> list[QuantizedWeight]:
    """Every weight of `net` with a weight quantizer; refuses states an export cannot reproduce."""
    out: list[QuantizedWeight] = []
    disabled = [n for n, m in net.named_modules()
                if isinstance(m, (QuantLinear, QuantExperts, AttentionQuantizers)) and not m.quant_enabled
                and not _without_quantizers(m)]
    if disabled:
        raise ValueError(f"quantization is disabled on {len(disabled)} modules (e.g. {disabled[0]}); an export "
                         f"stores the recipe's model, so enable them (set_quant_enabled) or list their blocks in "
                         f"the recipe's protected_blocks")
    for name, m in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, QuantLinear):
            if m.weight_quantizer is not None:
                out.append(QuantizedWeight(prefix + "weight", m, "weight", m.weight_quantizer))
        elif isinstance(m, QuantExperts):
            for attr, q in (("gate_up_proj", m.gate_up_weight_quantizer), ("down_proj", m.down_weight_quantizer)):
                if q is not None:
                    out.append(QuantizedWeight(prefix + attr, m, attr, q))
    return out


def _without_quantizers(m: nn.Module) -> bool:
    """A QuantLinear that only carries an input transform: quant_enabled does not change what it computes."""
    return isinstance(m, QuantLinear) and m.weight_quantizer is None and m.input_quantizer is None


def input_transforms(net: nn.Module) -> dict[str, dict]:
    """The index entry of every QuantLinear input transform: {module name: {"hadamard_block": int | None,
    "input_scale": state-dict key of the scale | None}}; refuses transforms that are not InputTransform."""
    out: dict[str, dict] = {}
    for name, m in net.named_modules():
        if not isinstance(m, QuantLinear) or m.input_transform is None:
            continue
        t = m.input_transform
        if not isinstance(t, InputTransform):
            raise TypeError(f"{name}.input_transform is a {type(t).__name__}, which cannot be exported; use "
                            f"lpq.quant.InputTransform(hadamard_block, input_scale) (a plain callable only works "
                            f"in memory)")
        out[name] = {"hadamard_block": t.hadamard_block,
                     "input_scale": f"{name}.input_transform.input_scale" if t.input_scale is not None else None}
    return out


def _per_group(s: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (groups,) scale over `like`: one value, or one per leading-dim slice."""
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (like.dim() - 1)))


_DECODE_ROWS_BYTES = 1 << 26      # float32 bytes decoded at a time by unpack


def unpack(p: Packed, prescale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weight values of packed bits, exactly as the quantizer's dequantization computes them.

    Decoded a few rows at a time straight into the result (blocks never span rows, and scaling
    and the cast are elementwise, so the bits are those of a whole-tensor decode), so a large
    weight needs no float32 copy of itself."""
    if p.axis != len(p.shape) - 1 or len(p.shape) < 2 or math.prod(p.shape) == 0:
        ys = decode(p)
        if prescale is not None:
            ys = ys / _per_group(prescale, ys)
        return ys.to(dtype)
    rows, length = math.prod(p.shape[:-1]), p.shape[-1]
    if p.codes.shape[0] != rows or (p.scales is not None and p.scales.shape[0] != rows):
        raise ValueError(f"codes for {rows} rows expected, got {tuple(p.codes.shape)}")
    out = torch.empty(rows, length, dtype=dtype, device=p.codes.device)
    # One scale per leading-dim slice (expert) or for the whole tensor: a value per row.
    row_scale = None if prescale is None else prescale.float().reshape(-1).repeat_interleave(
        rows // prescale.numel())[:, None]
    step = max(1, _DECODE_ROWS_BYTES // (4 * length))
    for r in range(0, rows, step):
        part = Packed(p.fmt, (min(step, rows - r), length), 1, p.codes[r:r + step],
                      None if p.scales is None else p.scales[r:r + step], p.tensor_scale)
        ys = decode(part)
        if row_scale is not None:
            ys = ys / row_scale[r:r + step]
        out[r:r + step] = ys.to(dtype)
    return out.reshape(p.shape)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _pack_whole(fmt: str, axis: int, param: Tensor, w_q: Tensor, s: Tensor | None) -> Packed | None:
    """The first encoding of (param, w_q) whose decode is w_q bit for bit; `s`: one scale per group of
    the leading dim, or None."""
    scaled = lambda t: t.float() * _per_group(s, t) if s is not None else t.float()
    candidates = (lambda: encode(scaled(param), fmt, axis),
                  lambda: encode(scaled(w_q), fmt, axis),
                  lambda: encode_on_grid(scaled(w_q), fmt, axis))
    for make in candidates:     # in order, until one reproduces w_q: usually the first
        p = make()
        if p is not None and _same_bits(unpack(p, s, w_q.dtype), w_q):
            return p
    return None


# float32 bytes of a weight packed at a time: the exact-code search costs ~120 bytes per value, so a
# 16 MB chunk (4 M values) is ~0.5 GB; at 64 MB a 4,096 x 4,096 q_proj took 2 GB and made the peak of
# the 36-layer Qwen3-8B-shaped PTQ run (docs/scale.md).
_PACK_ROWS_BYTES = 1 << 24


def pack(qw: QuantizedWeight, w_q: Tensor) -> Packed | None:
    """The bits of the forward weight `w_q`, or None when no encoding reproduces it exactly.

    Tried in order: the format's encoder on the (scaled) parameter, which is what RTN quantized;
    on w_q itself (on-grid weights, e.g. from GPTQ, in formats whose re-encoding is exact); a
    search for codes that decode to exactly w_q (HiF4 weights with searched block scales).
    A weight quantized along its last dim is packed a few rows at a time (blocks never span rows;
    the search alone takes ~100 bytes per value), each chunk taking the first encoding that
    reproduces its rows; formats with a per-tensor scale (nvfp4) are packed whole."""
    s = qw.prescale()
    param = qw.parameter().detach().cpu()
    axis = qw.axis % w_q.dim()
    rows = math.prod(w_q.shape[:-1])
    length = w_q.shape[-1] if w_q.dim() else 1
    step = max(1, _PACK_ROWS_BYTES // (4 * length))
    if axis != w_q.dim() - 1 or w_q.dim() < 2 or rows <= step:
        return _pack_whole(qw.fmt, qw.axis, param, w_q, s)
    p2, w2 = param.reshape(rows, length), w_q.reshape(rows, length)
    row_s = None if s is None else s.reshape(-1).repeat_interleave(rows // s.numel())
    parts = []
    for r in range(0, rows, step):
        part = _pack_whole(qw.fmt, 1, p2[r:r + step], w2[r:r + step], None if row_s is None else row_s[r:r + step])
        if part is None or part.tensor_scale is not None:
            # A per-tensor scale (nvfp4) differs chunk by chunk: the whole tensor decides (and a
            # weight no encoding reproduces fails there too).
            return _pack_whole(qw.fmt, qw.axis, param, w_q, s)
        parts.append(part)
    return Packed(qw.fmt, tuple(w_q.shape), axis, torch.cat([q.codes for q in parts]),
                  None if parts[0].scales is None else torch.cat([q.scales for q in parts]), None)
