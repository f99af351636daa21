"""`lpq formats`: list the formats, show their value grids, quantize a tensor file and report the error."""
from __future__ import annotations

import math
from pathlib import Path

import typer

fmt_app = typer.Typer(no_args_is_help=True, help="Number formats: list, show value tables, quantize tensor files.")


def register(app: typer.Typer) -> None:
    app.add_typer(fmt_app, name="formats")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


@fmt_app.command("list")
def list_formats() -> None:
    """Name, block size, bits per value, largest finite value, rounding and overflow rule of each format."""
    from lpq.formats import FORMATS

    rows = [[s.name, str(s.block), f"{s.bits_per_value:g}", s.max_finite, s.rounding, s.overflow]
            for s in FORMATS.values()]
    typer.echo(_table(rows, ["format", "block", "bits/value", "max finite", "rounding", "overflow"]))


def _element_grid(name: str) -> list[float]:
    """Nonnegative element magnitudes relative to the block scale."""
    if name == "hif4":
        return sorted({k / 4 * 2 ** d for k in range(8) for d in range(3)})
    return [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # E2M1


@fmt_app.command("show")
def show(fmt: str = typer.Argument(..., help="format name, e.g. hif8")) -> None:
    """The value table of a format (for HiF8 the full 256-entry code table)."""
    from lpq.formats import get_format

    spec = _spec_or_exit(fmt, get_format)
    typer.echo(f"{spec.name}: {spec.description}")
    typer.echo(f"block {spec.block}, {spec.bits_per_value:g} bits/value, max finite {spec.max_finite}, "
               f"rounding: {spec.rounding}; overflow: {spec.overflow}\n")
    if spec.name == "hif8":
        from lpq.formats.hif8 import code_fields

        rows = []
        for code in range(256):
            f = code_fields(code)
            rows.append([f"0x{code:02X}", str(f["sign"]), str(f["dot"]), str(f["D"]), "-" if f["exponent"] is None else str(f["exponent"]),
                         str(f["mantissa_bits"]), str(f["mantissa"]), repr(f["value"])])
        typer.echo(_table(rows, ["code", "S", "dot", "D", "exp", "m bits", "m", "value"]))
        return
    grid = _element_grid(spec.name)
    typer.echo("element magnitudes (x block scale): " + ", ".join(f"{v:g}" for v in grid))
    if spec.name == "hif4":
        typer.echo("element = (k/4) * 2^(E1_8 + E1_16), k = 0..7; block scale S in E6M2: 2^(E-48) * (1 + M/4), "
                   "E = 0..63, M = 0..3, 2^-48 .. 49152 (E=63, M=3 is NaN)")
    elif spec.name == "nvfp4":
        typer.echo("block scale: float8 E4M3 (0 .. 448) per 16 elements, times one float32 scale per tensor")
    else:
        typer.echo("block scale: E8M0 2^(b-127), b = 0..254 (0xFF = NaN), one per 32 elements")


def _spec_or_exit(fmt: str, get_format):
    try:
        return get_format(fmt)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="fmt") from None


def _load_tensors(path: Path) -> dict:
    import numpy as np
    import torch

    if not path.is_file():
        raise typer.BadParameter(f"{path} does not exist", param_hint="FILE")
    if path.suffix == ".npy":
        arr = np.load(path)
        if not np.issubdtype(arr.dtype, np.floating):
            raise typer.BadParameter(f"{path} holds {arr.dtype}, expected a floating-point array")
        return {path.stem: torch.from_numpy(arr)}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    raise typer.BadParameter(f"{path}: expected a .npy or .safetensors file", param_hint="FILE")


def error_stats(x, q, fmt: str, axis: int) -> dict:
    """MSE, max abs error, SQNR (dB) and % saturated / overflowed / flushed of q = fake_quant(x)."""
    import torch

    from lpq.formats import encode

    x = x.float()
    q = q.float()
    finite = torch.isfinite(x)
    err = torch.where(finite & torch.isfinite(q), q - x, torch.zeros_like(x))
    mse = err.pow(2).mean().item()
    signal = torch.where(finite, x, torch.zeros_like(x)).pow(2).mean().item()
    overflow = (finite & ~torch.isfinite(q)).float().mean().item()
    flushed = ((x != 0) & finite & (q == 0)).float().mean().item()
    return {
        "mse": mse,
        "max_abs_err": err.abs().max().item() if err.numel() else 0.0,
        "sqnr_db": 10 * math.log10(signal / mse) if mse > 0 and signal > 0 else math.inf,
        "saturated_pct": 100 * _saturated(x, q, encode(x, fmt, axis)).float().mean().item(),
        "overflow_pct": 100 * overflow,
        "flushed_pct": 100 * flushed,
    }


def _saturated(x, q, packed):
    """Elements whose code is the top of its range while |x| lies beyond the value it got."""
    import torch

    codes = packed.codes
    if packed.fmt == "hif8":
        top = (codes & 0x7F) == 0x6E
    else:  # two 4-bit codes per byte, element 2i in the low nibble; magnitude 7 is the top code
        nib = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
        top = (nib & 0x7) == 0x7
    L = x.shape[packed.axis] if x.dim() else 1
    moved = list(x.shape)
    moved.append(moved.pop(packed.axis))
    top = top[:, :L].reshape(moved).movedim(-1, packed.axis) if x.dim() else top.reshape(())
    return top & (x.abs() > q.abs()) & torch.isfinite(q)


@fmt_app.command("quantize")
def quantize(
    file: Path = typer.Argument(..., help="a .npy array or a .safetensors file"),
    fmt: str = typer.Option(..., "--fmt", help="format name (see `lpq formats list`)"),
    axis: int = typer.Option(-1, "--axis", help="quantization axis (blocks run along it)"),
    out: Path | None = typer.Option(None, "--out", help="write the fake-quantized result (.npy or .safetensors)"),
    backend: str | None = typer.Option(None, "--backend", help="cpp or ref (default: cpp when it builds)"),
) -> None:
    """Fake-quantize every tensor in FILE and print its error statistics."""
    import numpy as np
    import torch

    from lpq.formats import fake_quant, get_format

    _spec_or_exit(fmt, get_format)
    tensors = _load_tensors(file)
    results, rows = {}, []
    for name, x in tensors.items():
        if not x.is_floating_point():
            typer.echo(f"skipping {name}: dtype {x.dtype} is not floating point", err=True)
            continue
        try:
            q = fake_quant(x, fmt, axis, backend=backend)
        except ValueError as e:
            raise typer.BadParameter(f"{name}: {e}") from None
        s = error_stats(x, q, fmt, axis if x.dim() else -1)
        results[name] = q
        rows.append([name, "x".join(map(str, x.shape)), f"{s['mse']:.4g}", f"{s['max_abs_err']:.4g}",
                     f"{s['sqnr_db']:.2f}", f"{s['saturated_pct']:.3f}", f"{s['overflow_pct']:.3f}",
                     f"{s['flushed_pct']:.3f}"])
    typer.echo(_table(rows, ["tensor", "shape", "MSE", "max |err|", "SQNR dB", "% saturated", "% overflow",
                             "% flushed"]))
    if out is not None:
        if out.suffix == ".npy":
            if len(results) != 1:
                raise typer.BadParameter("--out .npy needs a single tensor; use .safetensors", param_hint="--out")
            (q,) = results.values()
            # numpy has no bfloat16: widen it, keep every other dtype.
            np.save(out, (q.float() if q.dtype == torch.bfloat16 else q).numpy())
        elif out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in results.items()}, str(out))
        else:
            raise typer.BadParameter("expected a .npy or .safetensors path", param_hint="--out")
        typer.echo(f"wrote {out}")
