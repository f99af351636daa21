import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lpq.cli import app
from lpq.formats import fake_quant
from lpq.pipelines.formats import error_stats

runner = CliRunner()


def text(result) -> str:
    """The output with rich's error-box borders and line wrapping removed."""
    return " ".join(result.output.replace("│", " ").split())


def test_list_names_every_format():
    r = runner.invoke(app, ["formats", "list"])
    assert r.exit_code == 0, r.output
    for name in ("hif8", "hif4", "mxfp4", "mxfp4-rceil", "mxfp4-toolkit", "nvfp4"):
        assert name in r.output
    assert "40960" in r.output


def test_show_hif8_prints_all_256_codes():
    r = runner.invoke(app, ["formats", "show", "hif8"])
    assert r.exit_code == 0, r.output
    assert "0x6E" in r.output and "32768" in r.output and "0xFF" in r.output
    assert sum(line.startswith("0x") for line in r.output.splitlines()) == 256


def test_show_unknown_format_is_a_clear_error():
    r = runner.invoke(app, ["formats", "show", "fp5"])
    assert r.exit_code != 0
    assert "unknown format 'fp5'" in text(r)


def test_quantize_npy_writes_the_fake_quant_result(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = runner.invoke(app, ["formats", "quantize", "--fmt", "hif4", str(tmp_path / "x.npy"), "--axis", "0",
                            "--out", str(tmp_path / "y.npy")])
    assert r.exit_code == 0, r.output
    assert "SQNR dB" in r.output
    expected = fake_quant(torch.from_numpy(x), "hif4", axis=0)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "y.npy")), expected)


def test_quantize_safetensors_all_tensors(tmp_path):
    save_file({"a": torch.randn(3, 64), "b": torch.randn(2, 32).bfloat16()}, str(tmp_path / "t.safetensors"))
    r = runner.invoke(app, ["formats", "quantize", "--fmt", "mxfp4", str(tmp_path / "t.safetensors"),
                            "--out", str(tmp_path / "q.safetensors")])
    assert r.exit_code == 0, r.output
    out = load_file(str(tmp_path / "q.safetensors"))
    assert out["b"].dtype == torch.bfloat16 and set(out) == {"a", "b"}


def test_quantize_rejects_missing_and_non_float_files(tmp_path):
    r = runner.invoke(app, ["formats", "quantize", "--fmt", "hif8", str(tmp_path / "none.npy")])
    assert r.exit_code != 0 and "does not exist" in text(r)
    np.save(tmp_path / "i.npy", np.arange(10))
    r = runner.invoke(app, ["formats", "quantize", "--fmt", "hif8", str(tmp_path / "i.npy")])
    assert r.exit_code != 0 and "floating-point" in text(r)
    (tmp_path / "text.npy").write_text("not an array")        # not blamed on pickled data
    r = runner.invoke(app, ["formats", "quantize", "--fmt", "hif8", str(tmp_path / "text.npy")])
    assert r.exit_code != 0 and "not a .npy file (no NPY header)" in text(r) and "pickle" not in text(r)
    np.savez(tmp_path / "z.npy", a=np.zeros(3))                # an archive under a .npy name
    (tmp_path / "z.npy.npz").rename(tmp_path / "z.npy")
    r = runner.invoke(app, ["formats", "quantize", "--fmt", "hif8", str(tmp_path / "z.npy")])
    assert r.exit_code != 0 and "not a single .npy array" in text(r)


def test_error_stats_counts_overflow_saturation_and_flush():
    x = torch.tensor([1.0, 36000.0, 50000.0, 1e-9, -3.0])
    s = error_stats(x, fake_quant(x, "hif8"), "hif8", -1)
    assert s["overflow_pct"] == pytest.approx(20.0)     # 50000 -> Inf
    assert s["saturated_pct"] == pytest.approx(20.0)    # 36000 -> 32768
    assert s["flushed_pct"] == pytest.approx(20.0)      # 1e-9 -> 0
    # 6.5 x block scale is beyond E2M1's top value 6: saturated; a block of ordinary values is not.
    y = torch.tensor([[7.0] + [1.0] * 31])
    assert error_stats(y, fake_quant(y, "mxfp4"), "mxfp4", -1)["saturated_pct"] == pytest.approx(100 / 32)
