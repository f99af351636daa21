"""`lpq formats`: list the formats, show their value grids, quantize a tensor file and report the error."""
from __future__ import annotations

import math
import os
import uuid
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


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def _spec_or_exit(fmt: str, get_format):
    try:
        return get_format(fmt)
    except ValueError as e:
        raise _fail(str(e)) from None


def _load_tensors(path: Path) -> dict:
    """name -> tensor of a .npy file (one tensor, named after the file) or a .safetensors file."""
    import numpy as np
    import torch

    if not path.exists():
        raise _fail(f"{path} does not exist")
    if path.is_dir():
        raise _fail(f"{path} is a folder; give a .npy or .safetensors file")
    if path.suffix == ".npy":
        # Without the NPY magic, np.load would blame pickled data for any other file.
        with path.open("rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
            raise _fail(f"{path}: not a .npy file (no NPY header); save one array with np.save")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _fail(f"{path}: not a readable .npy file ({str(e).strip() or type(e).__name__})") from None
        if not isinstance(arr, np.ndarray):
            raise _fail(f"{path}: not a single .npy array (an .npz archive?); save one array with np.save")
        if not np.issubdtype(arr.dtype, np.floating):
            raise _fail(f"{path} holds {arr.dtype}, expected a floating-point array")
        if arr.dtype.itemsize not in (2, 4, 8):
            raise _fail(f"{path} holds {arr.dtype}; use float16, float32 or float64")
        # torch reads native byte order only; a big-endian file is converted, same values.
        return {path.stem: torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=False))}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise _fail(f"{path}: not a readable .safetensors file ({str(e).strip() or type(e).__name__})") from None
        if not tensors:
            raise _fail(f"{path} holds no tensors")
        return tensors
    raise _fail(f"{path}: expected a .npy or .safetensors file")


def _top_codes(packed):
    """Per element of `packed` (in its (rows, Lp) layout): whether its code is the largest magnitude
    its block can hold. HiF8: code 0x6E (32768, the largest finite value); 4-bit formats: element
    magnitude 7 (E2M1 6.0, HiF4 k = 7 at the element's micro-exponents)."""
    import torch

    codes = packed.codes
    if packed.fmt == "hif8":
        return (codes & 0x7F) == 0x6E
    nib = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], 2 * codes.shape[1])
    return (nib & 0x7) == 0x7


def _saturated(x, q, packed):
    """Finite elements clipped at the top of their block's range: top code, |x| beyond |q|."""
    import torch

    top = _top_codes(packed)
    if x.dim() == 0:
        top = top[0, 0]
    else:
        moved = list(x.shape)
        moved.append(moved.pop(packed.axis))
        top = top[:, : moved[-1]].reshape(moved).movedim(-1, packed.axis)
    return top & (x.abs() > q.abs()) & torch.isfinite(x) & torch.isfinite(q)


def error_stats(x, q, fmt: str, axis: int, backend: str | None = None) -> dict:
    """Statistics of q = fake_quant(x, fmt, axis).

    Errors (mse, max_abs_err, sqnr_db) cover the elements with a finite input. When some of them
    come out non-finite they are not finite either (inf, or nan with NaN outputs), and the counts say
    why: `overflow` (finite -> +-Inf), `nan_block` (finite -> NaN because its block holds a NaN).
    `saturated`: finite inputs clipped at the top of their block's range; `flushed`: nonzero -> 0;
    `nonfinite_in`: NaN/Inf inputs (left out of everything else). Each count also as *_pct of all
    elements."""
    import torch

    from lpq.formats import encode

    x = x.float()
    q = q.float()
    n = x.numel()
    finite = torch.isfinite(x)
    overflow = finite & torch.isinf(q)
    nan_block = finite & torch.isnan(q)
    err = (q - x)[finite]
    mse = err.pow(2).mean().item() if err.numel() else math.nan
    signal = x[finite].pow(2).mean().item() if err.numel() else math.nan
    if not math.isfinite(mse):
        sqnr = -math.inf if mse == math.inf else math.nan
    elif mse == 0:
        sqnr = math.inf if signal > 0 else math.nan      # exact; or an all-zero tensor: nothing to measure
    else:
        sqnr = 10 * math.log10(signal / mse) if signal > 0 else -math.inf
    counts = {
        "saturated": int(_saturated(x, q, encode(x, fmt, axis, backend=backend)).sum()),
        "overflow": int(overflow.sum()),
        "nan_block": int(nan_block.sum()),
        "flushed": int(((x != 0) & finite & (q == 0)).sum()),
        "nonfinite_in": int((~finite).sum()),
    }
    stats = {"n": n, "mse": mse, "max_abs_err": err.abs().max().item() if err.numel() else math.nan,
             "sqnr_db": sqnr, **counts}
    stats.update({f"{k}_pct": 100 * v / n if n else 0.0 for k, v in counts.items()})
    return stats


def _row(name: str, x, s: dict) -> list[str]:
    broken = s["overflow"] or s["nan_block"]

    def num(v: float, spec: str) -> str:
        if broken:
            return "non-finite"
        return "n/a" if math.isnan(v) else f"{v:{spec}}"

    return [name, "x".join(map(str, x.shape)) or "scalar", num(s["mse"], ".4g"), num(s["max_abs_err"], ".4g"),
            num(s["sqnr_db"], ".2f"), f"{s['saturated_pct']:.3f}", f"{s['overflow_pct']:.3f}",
            f"{s['nan_block_pct']:.3f}", f"{s['flushed_pct']:.3f}", str(s["nonfinite_in"])]


def _check_out(out: Path, src: Path, force: bool, n_tensors: int) -> None:
    """Refuse, before any work, an --out that would overwrite the input or a file without --force."""
    if out.suffix not in (".npy", ".safetensors"):
        raise _fail(f"--out {out}: expected a .npy or .safetensors path")
    if out.suffix == ".npy" and n_tensors != 1:
        raise _fail(f"--out {out}: a .npy file holds one tensor and {src} has {n_tensors}; use .safetensors")
    if not out.parent.is_dir():
        what = (f"{out.parent} is a file, not a folder" if out.parent.exists()
                else f"the folder {out.parent} does not exist; create it first")
        raise _fail(f"--out {out}: {what}")
    if out.is_dir():
        raise _fail(f"--out {out} is a folder; give a file name")
    if out.exists() or out.is_symlink():
        if out.exists() and os.path.samefile(out, src) or out.resolve() == src.resolve():
            raise _fail(f"--out {out} is the input file {src}; write the result to another file")
        if not force:
            raise _fail(f"--out {out} exists; pass --force to replace it")


def _write(out: Path, results: dict) -> None:
    """Write through a sibling temporary file renamed over `out`: an interrupted write leaves no half file."""
    import numpy as np
    import torch

    tmp = out.with_name(f".{out.name}.lpq-tmp-{uuid.uuid4().hex[:8]}")
    try:
        if out.suffix == ".npy":
            (q,) = results.values()
            with open(tmp, "wb") as f:
                # numpy has no bfloat16: widen it, keep every other dtype.
                np.save(f, (q.float() if q.dtype == torch.bfloat16 else q).numpy())
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in results.items()}, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@fmt_app.command("quantize")
def quantize(
    file: Path = typer.Argument(..., help="a .npy array or a .safetensors file"),
    fmt: str = typer.Option(..., "--fmt", help="format name (see `lpq formats list`)"),
    axis: int = typer.Option(-1, "--axis", help="quantization axis (blocks run along it)"),
    out: Path | None = typer.Option(None, "--out", help="write the fake-quantized result (.npy or .safetensors)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out file (never the input)"),
    backend: str | None = typer.Option(None, "--backend", help="cpp or ref (default: cpp when it builds)"),
) -> None:
    """Fake-quantize every tensor in FILE and print its error statistics.

    Errors are over the elements with a finite input; a 0-d tensor is one block of one value."""
    from lpq.formats import fake_quant, get_format

    _spec_or_exit(fmt, get_format)
    tensors = _load_tensors(file)
    if out is not None:
        _check_out(out, file, force, len(tensors))
    results, rows, notes = {}, [], []
    for name, x in tensors.items():
        if not x.is_floating_point():
            # An index or count (position ids, a step counter) has no format; the output keeps every tensor.
            typer.echo(f"kept {name} unchanged: dtype {x.dtype} is not floating point", err=True)
            results[name] = x
            continue
        try:
            q = fake_quant(x, fmt, axis if x.dim() else -1, backend=backend)
            s = error_stats(x, q, fmt, axis if x.dim() else -1, backend=backend)
        except (ValueError, RuntimeError) as e:
            raise _fail(f"{name}: {str(e).strip().splitlines()[0]}") from None
        results[name] = q
        rows.append(_row(name, x, s))
        if s["overflow"] or s["nan_block"]:
            notes.append(f"{name}: {s['overflow'] + s['nan_block']} of {s['n']} outputs are not finite "
                         f"({s['overflow']} overflowed to Inf, {s['nan_block']} in blocks that hold a NaN)")
    if not rows:
        raise _fail(f"{file} holds no floating-point tensor")
    typer.echo(_table(rows, ["tensor", "shape", "MSE", "max |err|", "SQNR dB", "% saturated", "% overflow",
                             "% NaN block", "% flushed", "non-finite in"]))
    for note in notes:
        typer.echo(note)
    if out is not None:
        _write(out, results)
        typer.echo(f"wrote {out}")
