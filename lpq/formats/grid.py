"""Block grids: what PTQ algorithms need from a block format, defined by the format family itself.

A block format stores elements on a grid scaled by per-block metadata (HiF4: E6M2 scale + micro-
exponents; MXFP4: a shared exponent). Algorithms need to

1. take the metadata the format's own rule picks (`default_meta`),
2. pick other legal metadata that lowers a weighted error (`search_meta`, scale search),
3. round elements onto *fixed* metadata, a few columns at a time (`element_scales` + `round`: GPTQ
   fixes a block's metadata at its first column, then rounds the block's columns one by one).

Each family module (`lpq.formats.hif4`, `lpq.formats.mx`) implements `BlockGrid` with its own
constants and rounding, so no format fact is repeated here or in the algorithms. With the default
metadata, `round(x, element_scales(default_meta(x)))` is `lpq.formats.fake_quant(x)` bit for bit,
NaN/Inf blocks included (tests/formats/test_grid.py).

All tensors are float32 2-D (rows, L), blocks are consecutive elements of a row, L a multiple of
the block (`pad` pads with zeros, as the formats do).
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch
from torch import Tensor

# Metadata and search spaces are family-specific values (tuples of tensors; small frozen
# dataclasses): algorithms pass them through without looking inside.
Meta = Any
SearchSpace = Any


class BlockGrid(Protocol):
    fmt: str
    block: int
    # The candidates scale search picks among by default, and the space holding only the format's
    # own rule (a search restricted to it returns default_meta exactly).
    default_space: SearchSpace
    only_default: SearchSpace

    def default_meta(self, x2d: Tensor) -> Meta:
        """The metadata the format's own rule gives each block of x2d."""

    def search_meta(self, x2d: Tensor, importance: Tensor | None = None, space: SearchSpace | None = None) -> Meta:
        """Per block, the metadata in `space` (default: default_space) minimizing
        sum_i importance_i (x_i - q_i)^2; importance: (L,) per column, None for ones. Ties keep the
        earlier candidate of the space."""

    def element_scales(self, meta: Meta) -> tuple[Tensor, ...]:
        """Per-element scale tensors (rows, L) of `meta`; slice them by columns with `columns`."""

    def round(self, x: Tensor, scales: tuple[Tensor, ...]) -> Tensor:
        """x (rows, n) rounded onto the grid of per-element scales (rows, n), exactly as the format."""


def columns(scales: tuple[Tensor, ...], start: int, stop: int) -> tuple[Tensor, ...]:
    """The per-element scales of columns start..stop-1."""
    return tuple(t[:, start:stop] for t in scales)


def block_grid(fmt: str) -> BlockGrid:
    """The BlockGrid of a format; a format without one (HiF8, ...) is refused with the ones that have one."""
    from lpq.formats.spec import FORMATS, get_format

    spec = get_format(fmt)
    grid = getattr(importlib.import_module(f"lpq.formats.{spec.family}"), "grid", None)
    found = grid(fmt) if grid is not None else None
    if found is None:
        usable = [n for n in FORMATS if has_grid(n)]
        raise ValueError(f"format {fmt!r} has no block grid for the PTQ algorithms; use one of {', '.join(usable)}")
    return found


def has_grid(fmt: str) -> bool:
    from lpq.formats.spec import get_format

    grid = getattr(importlib.import_module(f"lpq.formats.{get_format(fmt).family}"), "grid", None)
    return grid is not None and grid(fmt) is not None


def pad(x2d: Tensor, block: int) -> Tensor:
    L = x2d.shape[-1]
    Lp = -(-L // block) * block
    return x2d if Lp == L else torch.nn.functional.pad(x2d, (0, Lp - L))


def fake_quant(x: Tensor, fmt: str, search: bool = False, importance: Tensor | None = None) -> Tensor:
    """Quantize-dequantize along the last dim of any-shaped x with the format's rule or, with
    `search`, with searched metadata (importance: per-column weights of the error). float32 math,
    x's dtype back."""
    grid = block_grid(fmt)
    shape, L = x.shape, x.shape[-1]
    x2 = pad(x.reshape(-1, L).float(), grid.block)
    if importance is not None:
        importance = pad(importance.float().view(1, -1), grid.block).view(-1)
    meta = grid.search_meta(x2, importance) if search else grid.default_meta(x2)
    return grid.round(x2, grid.element_scales(meta))[:, :L].reshape(shape).to(x.dtype)
