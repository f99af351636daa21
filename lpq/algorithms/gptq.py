"""GPTQ with the format's own quantizer in the loop, re-derived from the math.

For a linear layer with input Gram matrix H = sum x x^T, quantizing weight column j to q_j and
spreading the error over the not-yet-quantized columns with the inverse Hessian minimizes
||X W^T - X Q^T||^2 greedily (optimal brain surgeon, one column at a time). With U the upper Cholesky
factor of H^-1, the update after column j is W[:, j+1:] -= (w_j - q_j) / U_jj * U[j, j+1:]; updates
are applied lazily in batches of columns for speed.

Block formats: a 32/64 block's scales (MXFP4 exponent; HiF4 E6M2 scale + micro-exponents) are fixed
when GPTQ reaches the block's first column, from the block's *current* (already error-compensated)
weights, optionally by scale search weighted with 1/U_jj^2 (the OBS cost of each column); the block's
columns are then rounded one by one onto those fixed scales. With act-order (columns by decreasing
H_jj) the blocks are scattered over the order, so their scales are fixed up front from the original
weights ("static" scales).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lpq.algorithms.context import BlockContext, LinearGroup, RunContext
from lpq.algorithms.step import Phase, Step, register
from lpq.formats.grid import block_grid, columns
from lpq.quant.recipe import QuantRecipe


@dataclass
class GPTQSettings:
    damp: float = 0.01            # fraction of mean(diag H) added to the diagonal
    act_order: bool = False       # columns by decreasing H_jj
    scale_search: bool = True     # format-native scale search when a block's scales are fixed
    lazy_batch: int = 128         # columns per lazy update; a multiple of the format block

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
        if self.lazy_batch <= 0 or self.lazy_batch % 64:
            raise ValueError(f"lazy_batch must be a positive multiple of 64, got {self.lazy_batch}")


class Hessian:
    """Running H = sum x x^T over the rows of inputs to one linear layer (float32, or float64 by
    choice), on the device of the first input."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float32):
        self.n, self.dtype = n, dtype
        self.H: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if self.H is None:
            self.H = torch.zeros(self.n, self.n, dtype=self.dtype, device=x2.device)
        self.H.addmm_(x2.T, x2)
        self.count += x2.shape[0]

    def mean(self) -> Tensor:
        """The mean Gram matrix, made from the running sum in place (an (n, n) float32 matrix is 604 MB
        at n = 12288): the accumulator is emptied, so call it once."""
        if self.count == 0:
            raise ValueError("no calibration inputs reached this layer")
        H, self.H, count, self.count = self.H, None, self.count, 0
        return H.div_(count).float().cpu()


def layer_hessian(block: BlockContext, name: str) -> Tensor | None:
    """Mean input Gram matrix of linear `name` over the block's calibration inputs, as quantized at
    inference; None when no calibration input reached it (an unrouted expert)."""
    lin = block.all_linears()[name]
    hess = Hessian(lin.in_features)
    for x in block.linear_inputs(name):
        hess.add(x)
    return hess.mean() if hess.count else None


@register
class GPTQ(Step):
    """Per group of linears sharing an input: GPTQ against the Hessian of that input, with the
    format's own grid in the loop; RTN for a group no calibration input reached."""

    name = "gptq"
    Settings = GPTQSettings
    phase = Phase.QUANTIZE

    def check_recipe(self, quant: QuantRecipe) -> None:
        block_grid(quant.weight.format)     # GPTQ rounds onto fixed block metadata: the format needs a grid

    def quantize_group(self, run: RunContext, block: BlockContext, group: LinearGroup) -> None:
        weights = [lin.weight for lin in group.linears]
        W = torch.cat([w.detach().float() for w in weights])
        hessian = layer_hessian(block, group.names[0])
        t0 = time.perf_counter()
        if hessian is None:
            from lpq.formats.grid import fake_quant

            Q = fake_quant(W, run.weight_format)
        else:
            Q, loss = gptq_quantize(W, hessian, run.weight_format, self.settings)
            block.stats.setdefault("layer_loss", {})["+".join(group.names)] = loss
        block.stats["gptq_seconds"] = block.stats.get("gptq_seconds", 0.0) + time.perf_counter() - t0
        for lin, q in zip(group.linears, Q.split([w.shape[0] for w in weights])):
            lin.set_quantized_weight(q.to(lin.weight.dtype))


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean diag)^-1; raises the damping until it factors.

    H (contiguous) is scratch, overwritten: an (n, n) float32 Hessian is 604 MB at n = 12288, so at
    most two such matrices exist at once. Its diagonal is damped in place and restored after a failed
    attempt; once H factors, its storage receives the inverse."""
    mean_diag = H.diagonal().mean().clamp(min=1e-12)
    diag = H.diagonal().clone()
    for attempt in range(8):
        H.diagonal().add_(damp * (10 ** attempt) * mean_diag)
        try:
            L = torch.linalg.cholesky(H)
        except torch._C._LinAlgError:
            H.diagonal().copy_(diag)
            continue
        # The inverse is exactly symmetric (LAPACK makes one triangle, torch mirrors it); written
        # through the transposed view, which is column-major as LAPACK works, it needs no temporary.
        torch.cholesky_inverse(L, out=H.mT)
        del L
        try:
            return torch.linalg.cholesky(H, upper=True)
        except torch._C._LinAlgError:
            raise RuntimeError("GPTQ: the inverse of the damped Hessian is not positive definite in float32; "
                               "raise the gptq step's `damp` setting") from None
    raise RuntimeError("GPTQ: the Hessian could not be factored even with strong damping")


def gptq_quantize(weight: Tensor, H: Tensor, fmt: str, settings: GPTQSettings | None = None) -> tuple[Tensor, float]:
    """Quantize a (out, in) weight along `in` against the input Gram matrix H (in, in).

    H is used as scratch (a float32 H is overwritten, not copied). Returns the quantized weight
    (weight's dtype; exactly on the format's grid) and the GPTQ loss sum (w - q)^2 / U_jj^2 / 2 (the
    OBS estimate of the output error added).
    """
    s = settings or GPTQSettings()
    block_grid(fmt)
    # The column loop is thousands of small ops: extra threads only add synchronization, which
    # costs orders of magnitude when the cores are shared (measured: 4.4 s vs 151 s on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, H, fmt, s)
    finally:
        torch.set_num_threads(threads)


def _gptq(weight: Tensor, H: Tensor, fmt: str, s: GPTQSettings) -> tuple[Tensor, float]:
    grid = block_grid(fmt)
    block = grid.block
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight columns {cols}")
    pad = -cols % block
    W = torch.nn.functional.pad(weight.float(), (0, pad))
    # H is ours to overwrite (the caller's scratch); pad and float() copy it only when they must.
    H = torch.nn.functional.pad(H.float(), (0, pad, 0, pad)) if pad else H.float()
    n = cols + pad
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = invperm = static = None
    if s.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        invperm = torch.argsort(perm)
        meta = grid.search_meta(W, H.diagonal()) if s.scale_search else grid.default_meta(W)
        static = tuple(t[:, perm] for t in grid.element_scales(meta))
        W = W[:, perm]
        H = H[perm][:, perm]
    U = _inverse_cholesky(H, s.damp)
    del H
    Q = torch.zeros_like(W)
    loss = torch.zeros(rows)
    col_weight = 1.0 / U.diagonal() ** 2

    for i1 in range(0, n, s.lazy_batch):
        i2 = min(i1 + s.lazy_batch, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static is None and j % block == 0:
                # Fix this block's scales from its current, error-compensated weights.
                wb = W1[:, i:i + block]
                meta = grid.search_meta(wb, col_weight[j:j + block]) if s.scale_search else grid.default_meta(wb)
                scales_blk = grid.element_scales(meta)
                blk_start = i
            if static is not None:
                sc = columns(static, j, j + 1)
            else:
                sc = columns(scales_blk, i - blk_start, i - blk_start + 1)
            w = W1[:, i:i + 1]
            q = grid.round(w, sc)
            Q[:, j:j + 1] = q
            d = U1[i, i]
            err = (w - q) / d
            loss += (err.squeeze(1) ** 2) / 2
            W1[:, i:] -= err * U1[i:i + 1, i:]
            E1[:, i:i + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if invperm is not None:
        Q = Q[:, invperm]
    return Q[:, :cols].to(weight.dtype), float(loss.sum())
