from pathlib import Path

from typer.testing import CliRunner

from lpq.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_inspect_tiny_wan22_table():
    result = CliRunner().invoke(app, ["inspect", "--config", str(ROOT / "configs" / "inspect_tiny_wan22.yaml")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "transformer (WanTransformer3DModel): 2 blocks" in out and "transformer_2 (WanTransformer3DModel)" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("0 ", "1 ")]
    assert len(rows) == 4
    assert all(set(r[1:]) == {"PROT"} for r in rows if r[0] == "0")
    assert all(r.count("excl") == 1 and r.count("quant") == 9 for r in rows if r[0] == "1")
    assert "proj_out" in out and "default exclude 'condition_embedder*'" in out


def test_inspect_reports_recipe_errors_with_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  id: tiny-llama\nquant:\n  format: hif4\n  protected_blocks: [0, 1, 2]\n")
    result = CliRunner().invoke(app, ["inspect", "--config", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml:5" in result.output and "budget of 2" in result.output   # the protected_blocks line


def test_inspect_shows_the_protection_of_a_ptq_recipe(tmp_path):
    """lpq ptq lists its protected blocks under `protect:`, not quant.protected_blocks: shown, checked, noted."""
    head = "model:\n  id: tiny-llama\nquant:\n  format: hif4\ncalibration: {domains: {wikitext2: 1}}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(head + "protect:\n  blocks: [1]\n")
    result = CliRunner().invoke(app, ["inspect", "--config", str(recipe)])
    assert result.exit_code == 0 and "protected blocks: [1] (budget 2)" in result.output, result.output
    assert [line.split()[1:] for line in result.output.splitlines() if line.startswith("1 ")] == [["PROT"] * 7]
    recipe.write_text(head + "protect:\n  blocks: [7]\n")
    result = CliRunner().invoke(app, ["inspect", "--config", str(recipe)])
    assert result.exit_code == 2 and "protect.blocks: block 7 is out of range: tiny-llama has 2 blocks" in result.output
    recipe.write_text(head + "protect:\n  auto: 2\n")
    result = CliRunner().invoke(app, ["inspect", "--config", str(recipe)])
    assert result.exit_code == 0 and "protect.auto: lpq ptq also protects the 2 most sensitive blocks" in result.output
