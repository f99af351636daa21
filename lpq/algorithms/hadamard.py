"""Block-diagonal Hadamard rotation aligned with the format's block (32 for MXFP4, 64 for HiF4).

For a linear y = x W^T and an orthogonal symmetric H, y = (x H)(W H)^T: the weight is rotated once
(`rotate_weight`) and the input online (`fwht`). A block-diagonal H spreads an outlier over exactly
the elements that share its scale, and it needs no power-of-two hidden size: the row is cut into
blocks of `block`, and a tail that is shorter is cut into smaller powers of two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lpq.algorithms.step import Phase, Step, register
from lpq.formats._build import load_kernel

if TYPE_CHECKING:
    from lpq.algorithms.context import BlockContext, RunContext


def block_sizes(n: int, block: int) -> list[int]:
    """Sizes of the diagonal blocks along a row of length n: full blocks, then powers of two."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
    sizes = [block] * (n // block)
    rest = n % block
    while rest:
        p = 1 << (rest.bit_length() - 1)
        sizes.append(p)
        rest -= p
    return sizes


def fwht_ref(x2d: Tensor, sizes: list[int]) -> Tensor:
    """Pure-PyTorch reference of the kernel: same butterflies, same float32 operations."""
    out, off = [], 0
    chunks = []
    for s in sizes:
        chunks.append((off, s))
        off += s
    y = x2d.float().clone()
    # Consecutive runs of equal size are transformed together.
    i = 0
    while i < len(chunks):
        j = i
        while j < len(chunks) and chunks[j][1] == chunks[i][1]:
            j += 1
        start, b = chunks[i][0], chunks[i][1]
        stop = chunks[j - 1][0] + b
        seg = y[:, start:stop].reshape(y.shape[0], -1, b)
        h = 1
        while h < b:
            v = seg.view(seg.shape[0], seg.shape[1], b // (2 * h), 2, h)
            a, c = v[:, :, :, 0, :], v[:, :, :, 1, :]
            seg = torch.stack((a + c, a - c), dim=3).reshape(seg.shape)
            h *= 2
        seg = seg * torch.tensor(1.0 / math.sqrt(b), dtype=torch.float32)
        out.append(seg.reshape(y.shape[0], -1))
        i = j
    return torch.cat(out, dim=1) if out else y


def _fwht_nograd(x: Tensor, block: int, backend: str | None) -> Tensor:
    shape, n = x.shape, x.shape[-1]
    sizes = block_sizes(n, block)
    x2d = x.reshape(-1, n).float().contiguous()
    ext = None if backend == "ref" or x.device.type != "cpu" else load_kernel("fwht")
    y = ext.fwht(x2d, sizes) if ext is not None else fwht_ref(x2d, sizes)
    return y.reshape(shape).to(x.dtype)


class _FWHT(torch.autograd.Function):
    """The kernel is not differentiable; blockdiag(H) is symmetric orthogonal, so dx = fwht(dy)."""

    @staticmethod
    def forward(ctx, x: Tensor, block: int, backend: str | None) -> Tensor:
        ctx.block, ctx.backend = block, backend
        return _fwht_nograd(x, block, backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _fwht_nograd(grad, ctx.block, ctx.backend), None, None


def fwht(x: Tensor, block: int, backend: str | None = None) -> Tensor:
    """x @ blockdiag(H) along the last dim (any shape, any float dtype; float32 math, x's dtype back).

    Differentiable: gradients go through the same transform."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FWHT.apply(x, block, backend)
    return _fwht_nograd(x, block, backend)


def rotate_weight(weight: Tensor, block: int) -> Tensor:
    """W H for a (out, in) weight: the rotation that cancels an online `fwht` of the input."""
    return fwht(weight, block)


def hadamard_matrix(n: int, block: int) -> Tensor:
    """The dense (n, n) block-diagonal matrix, for tests and for fusing into small weights."""
    return fwht(torch.eye(n), block)


@dataclass
class HadamardSettings:
    block: int | None = None             # block size; default: the input format's block (weight's if weight-only)
    linears: list[str] | None = None     # fnmatch patterns of the linears (relative to a block) to rotate; default all

    def __post_init__(self) -> None:
        if self.block is not None and (self.block <= 0 or self.block & (self.block - 1)):
            raise ValueError(f"hadamard block must be a power of two, got {self.block}")


@register
class Hadamard(Step):
    """Data-free, on every block: W <- W H offline and x -> x H online (the linear's InputTransform)."""

    name = "hadamard"
    Settings = HadamardSettings
    phase = Phase.TRANSFORM
    transform_part = "rotation"

    def online_parts(self) -> tuple[str, ...]:
        return ("rotation",)

    def on_prepare_block(self, run: RunContext, block: BlockContext) -> None:
        from lpq.formats import get_format
        from lpq.quant.transforms import InputTransform

        size = self.settings.block or get_format(run.input_format or run.weight_format).block
        patterns = self.settings.linears
        for name, lin in block.linears().items():
            if patterns is not None and not any(fnmatch(name, p) for p in patterns):
                continue
            with torch.no_grad():
                lin.weight.copy_(rotate_weight(lin.weight.float(), size).to(lin.weight.dtype))
            lin.input_transform = InputTransform(size)
