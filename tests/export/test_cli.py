"""`lpq export`: recipe YAML + flags -> checkpoint and printed size report."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from lpq.export import load_quantized
from lpq.pipelines.export import register

RECIPE = """\
model:
  id: tiny-llama
quant:
  format: mxfp4
export:
  kind: packed
"""


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)         # keep `export` a subcommand, as in lpq.cli
    register(app)
    return app


def test_export_command(app, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    args = ["export", "--config", str(tmp_path / "r.yaml"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| quantized weights (mxfp4, 14 tensors) | 73,728 | 0.04 MB | 4.250 | 26.6 % |" in result.output
    assert "4.250" in (out / "README.md").read_text()
    assert load_quantized(out).model.layers[0].mlp.up_proj.weight_quantizer.spec.format == "mxfp4"

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "holds the output of an earlier lpq run" in again.output
    assert "pass --force" in again.output

    fake = CliRunner().invoke(app, args + ["--force", "--kind", "fake", "--model", "tiny-qwen3"])
    assert fake.exit_code == 0, fake.output
    assert (out / "model.safetensors").is_file() and '"model_type": "qwen3"' in (out / "config.json").read_text()


def test_bad_recipe_names_file_and_line(app, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE.replace("kind: packed", "kind: zip"))
    result = CliRunner().invoke(app, ["export", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "r.yaml:6" in result.output and "'export.kind'" in result.output


def test_no_output_folder(app, tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    result = CliRunner().invoke(app, ["export", "--config", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2 and "pass --out or set export.out" in result.output
