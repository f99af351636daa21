"""Issue 15, `lpq formats quantize`: bad files are one-line errors; statistics count NaN blocks, Inf
outputs and saturation correctly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lpq.formats import encode, fake_quant
from lpq.pipelines.formats import error_stats
from tests.cli.helpers import error_line, lpq, snapshot


def _quantize(tmp_path, name, *args):
    before = snapshot(tmp_path)
    code, out = lpq("formats", "quantize", tmp_path / name, *args)
    return code, out, before


def test_zero_dim_array_is_one_value(tmp_path):
    np.save(tmp_path / "s.npy", np.float32(3.3))
    code, out, _ = _quantize(tmp_path, "s.npy", "--fmt", "hif4", "--out", tmp_path / "q.npy")
    assert code == 0, out
    assert "scalar" in out
    q = np.load(tmp_path / "q.npy")
    assert q.shape == () and q == fake_quant(torch.tensor([3.3]), "hif4").item() == 3.5


@pytest.mark.parametrize("fmt", ["hif8", "hif4", "mxfp4"])
def test_an_empty_tensor_is_reported_and_written_with_its_shape(tmp_path, fmt):
    from safetensors.torch import load_file, save_file

    save_file({"empty": torch.zeros(0, 64), "w": torch.randn(2, 64)}, str(tmp_path / "m.safetensors"))
    code, out, _ = _quantize(tmp_path, "m.safetensors", "--fmt", fmt, "--out", tmp_path / "q.safetensors")
    assert code == 0, out
    assert any(line.split()[:3] == ["empty", "0x64", "n/a"] for line in out.splitlines()), out
    assert load_file(str(tmp_path / "q.safetensors"))["empty"].shape == (0, 64)


@pytest.mark.parametrize("name, data, message", [
    ("c.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4, 64), }",
     "c.npy: not a readable .npy file (EOF: reading array header"),
    ("c.safetensors", b"garbage\n", "c.safetensors: not a readable .safetensors file ("),
    ("e.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "e.safetensors holds no tensors"),
])
def test_corrupt_files_are_one_line_errors(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    code, out, before = _quantize(tmp_path, name, "--fmt", "hif8")
    assert code == 2 and message in error_line(out)
    assert snapshot(tmp_path) == before


def test_missing_out_folder_is_a_one_line_error(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2, 32), np.float32))
    code, out, before = _quantize(tmp_path, "x.npy", "--fmt", "hif8", "--out", tmp_path / "nodir" / "y.npy")
    assert code == 2 and "the folder" in error_line(out) and "nodir does not exist; create it first" in out
    assert snapshot(tmp_path) == before
    (tmp_path / "afile").write_text("the user's")
    before = snapshot(tmp_path)
    code, out, _ = _quantize(tmp_path, "x.npy", "--fmt", "hif8", "--out", tmp_path / "afile" / "y.npy")
    assert code == 2 and error_line(out).endswith(f"{tmp_path / 'afile'} is a file, not a folder"), out
    assert snapshot(tmp_path) == before


def test_unsupported_dtypes(tmp_path):
    np.save(tmp_path / "c.npy", np.ones(4, np.complex64))
    code, out, _ = _quantize(tmp_path, "c.npy", "--fmt", "hif8")
    assert code == 2 and "holds complex64, expected a floating-point array" in error_line(out)
    np.save(tmp_path / "b.npy", np.arange(64, dtype=">f4").reshape(1, 64))   # big-endian: read as the same values
    code, out, _ = _quantize(tmp_path, "b.npy", "--fmt", "hif8", "--out", tmp_path / "q.npy")
    assert code == 0, out
    assert np.array_equal(np.load(tmp_path / "q.npy"), fake_quant(torch.arange(64.0).reshape(1, 64), "hif8").numpy())


def test_integer_tensors_are_kept_unchanged_in_the_output(tmp_path):
    from safetensors.torch import load_file, save_file

    ids = torch.arange(10)
    save_file({"w": torch.randn(2, 64), "position_ids": ids}, str(tmp_path / "m.safetensors"))
    code, out, _ = _quantize(tmp_path, "m.safetensors", "--fmt", "hif4", "--out", tmp_path / "q.safetensors")
    assert code == 0 and "kept position_ids unchanged" in out, out
    q = load_file(str(tmp_path / "q.safetensors"))
    assert set(q) == {"w", "position_ids"} and torch.equal(q["position_ids"], ids)
    # A .npy holds one array: the integer tensor would be lost, so that is refused before any work.
    code, out, before = _quantize(tmp_path, "m.safetensors", "--fmt", "hif4", "--out", tmp_path / "q.npy")
    assert code == 2 and "a .npy file holds one tensor" in error_line(out)
    assert snapshot(tmp_path) == before


def test_nan_blocks_are_counted_separately_from_overflow(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    x[0, 3] = np.nan                                   # HiF4: the whole first 64-block becomes NaN
    np.save(tmp_path / "n.npy", x)
    code, out, _ = _quantize(tmp_path, "n.npy", "--fmt", "hif4")
    assert code == 0, out
    row = out.splitlines()[2].split()
    assert row[2:5] == ["non-finite"] * 3              # MSE, max |err|, SQNR
    assert row[6] == "0.000" and row[7] == f"{100 * 63 / 128:.3f}" and row[9] == "1"
    assert "n: 63 of 128 outputs are not finite (0 overflowed to Inf, 63 in blocks that hold a NaN)" in out


def test_inf_outputs_are_not_reported_as_exact(tmp_path):
    y = np.ones((1, 64), np.float32)
    y[0, 0] = 1e6                                      # HiF8: beyond 40960 -> Inf
    np.save(tmp_path / "i.npy", y)
    code, out, _ = _quantize(tmp_path, "i.npy", "--fmt", "hif8")
    assert code == 0, out
    row = out.splitlines()[2].split()
    assert row[2:5] == ["non-finite"] * 3 and row[6] == f"{100 / 64:.3f}"
    assert "1 of 64 outputs are not finite (1 overflowed to Inf, 0 in blocks that hold a NaN)" in out
    s = error_stats(torch.from_numpy(y), fake_quant(torch.from_numpy(y), "hif8"), "hif8", -1)
    assert s["mse"] == float("inf") and s["sqnr_db"] == float("-inf") and s["overflow"] == 1


def test_nonfinite_inputs_are_counted_and_left_out(tmp_path):
    x = torch.ones(1, 32)
    x[0, 0] = float("inf")
    s = error_stats(x, fake_quant(x, "mxfp4"), "mxfp4", -1)
    assert s["nonfinite_in"] == 1 and s["saturated"] == 0 and s["overflow"] == 0


def _top_magnitude(x: torch.Tensor, fmt: str, axis: int) -> torch.Tensor:
    """Independent of the statistics code: the largest magnitude each element's block can hold, by
    decoding the packed block with every element code set to its largest magnitude."""
    from lpq.formats import decode

    p = encode(x, fmt, axis)
    codes = torch.full_like(p.codes, 0x6E) if fmt == "hif8" else torch.full_like(p.codes, 0x77)
    return decode(type(p)(p.fmt, p.shape, p.axis, codes, p.scales, p.tensor_scale)).abs()


def _saturation_cases():
    hif8 = torch.tensor([1.0, 36000.0, 50000.0, -33000.0])                   # 32768 is the top, 40960 -> Inf
    mx = torch.ones(32)
    mx[0], mx[5] = 7.5, 6.0        # scale 2^(floor(log2 7.5) - 2) = 1: 7.5 -> 6 clipped; 6.0 exact
    h4 = torch.zeros(64)
    # S = 1 (from 7.0); elements 8..11 set E1_8 = 1; 12..15 reach 3.9 < 2 * 2 -> E1_16 = 0: the top there is
    # 7/4 * 2 = 3.5, so 3.9 is clipped while 7.0 (top 7/4 * 4) and 4.0 are exact.
    h4[0], h4[8], h4[12] = 7.0, 4.0, 3.9
    nv = torch.ones(32)
    # tensor scale 2688 / (448 * 6) = 1; the second block's scale 6.375 / 6 = 1.0625 rounds (E4M3, ties
    # to even) to 1.0, so 6.375 is clipped to 6.
    nv[0], nv[16] = 2688.0, 6.375
    return [("hif8", hif8, 2), ("mxfp4", mx, 1), ("mxfp4-toolkit", mx, None), ("mxfp4-rceil", mx, 0),
            ("hif4", h4, 1), ("nvfp4", nv, 1)]


@pytest.mark.parametrize("fmt, x, expected", _saturation_cases())
def test_saturation_per_format(fmt, x, expected):
    q = fake_quant(x, fmt)
    s = error_stats(x, q, fmt, -1)
    reference = (torch.isfinite(q) & (x.abs() > _top_magnitude(x, fmt, -1))).sum().item()
    assert s["saturated"] == reference
    if expected is not None:
        assert s["saturated"] == expected


@pytest.mark.parametrize("fmt", ["hif8", "hif4", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("shape, axis", [((64, 3), 0), ((2, 64, 3), 1), ((3, 2, 96), -1)])
def test_saturation_follows_the_quantization_axis(fmt, shape, axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    if fmt == "hif8":
        x = x * 1e4              # HiF8 has no block scale: reach its top value 32768 (and Inf above 40960)
    q = fake_quant(x, fmt, axis)
    reference = (torch.isfinite(q) & (x.abs() > _top_magnitude(x, fmt, axis))).sum().item()
    assert error_stats(x, q, fmt, axis)["saturated"] == reference > 0
