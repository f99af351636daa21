"""`lpq export`: load a model, quantize it with the recipe (round to nearest), write the checkpoint.

`lpq ptq` and `lpq train` call `lpq.export.export_model` themselves on the model they produced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from lpq.export.settings import KINDS, ExportSettings, check_runtime_quant
from lpq.models.hub import ModelConfig
from lpq.quant.recipe import QuantRecipe
from lpq.schema import RecipeVersion, recipe_version


@dataclass
class ExportRecipe:
    """Recipe file of `lpq export`: sections `model`, `quant` and `export`."""

    version: RecipeVersion = field(default=RecipeVersion.V1, kw_only=True)
    quant: QuantRecipe
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportSettings = field(default_factory=ExportSettings)

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
        check_runtime_quant(self.export.kind.value, self.quant)   # before the model loads


def register(app: typer.Typer) -> None:
    app.command("export")(export)


# Recipe key -> the command option that sets it (an error about the key names the option).
KEY_OPTIONS = {"model.id": "--model", "export.out": "--out", "export.kind": "--kind", "export.force": "--force"}


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def export(
    config: Path = typer.Option(..., "--config", help="recipe YAML with model:, quant: and export: sections"),
    model: str | None = typer.Option(None, "--model", help="model id, local folder or built-in (overrides model.id)"),
    out: Path | None = typer.Option(None, "--out", help="output folder (overrides export.out)"),
    kind: str | None = typer.Option(None, "--kind", help="packed (real bits, lpq.load_quantized), fake "
                                                         "(dequantized weights, stock from_pretrained), "
                                                         "compressed-tensors (vLLM) or gguf (llama.cpp)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
) -> None:
    """Quantize a model with a recipe and write a packed or fake-quantized checkpoint with a size report."""
    from lpq.config import ConfigError, load_config

    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(f"{kind!r} is not a kind; use one of {', '.join(KINDS)}", param_hint="--kind")
    overrides = {k: v for k, v in {"model.id": model, "export.out": str(out) if out else None,
                                   "export.kind": kind}.items() if v is not None}
    if force:
        overrides["export.force"] = True
    try:
        recipe = load_config(config, ExportRecipe, overrides, {k: KEY_OPTIONS[k] for k in overrides})
    except ConfigError as e:
        raise _fail(str(e)) from None
    if recipe.export.out is None:
        raise _fail("no output folder: pass --out or set export.out in the recipe")
    target = Path(recipe.export.out)
    from lpq.models.hub import resolve
    from lpq.outputs import check_output, locked_output, refuse_input_folders

    try:
        source = resolve(recipe.model)
        refuse_input_folders(target, {"model.id": source.path if source.kind == "local" else None})
    except ValueError as e:
        raise _fail(str(e)) from None

    try:
        # lpq.outputs' rules, checked before the model is loaded; the lock is held from here to the end.
        with locked_output(target, command="lpq export"):
            check_output(target, force=recipe.export.force, command="lpq export", staged=True)
            from lpq.export import export_model
            from lpq.models.hub import load_model
            from lpq.quant import quantize_model

            loaded = load_model(recipe.model)
            quantize_model(loaded.model, recipe.quant)
            report = export_model(loaded.model, recipe.quant, target, kind=recipe.export.kind,
                                  force=recipe.export.force, tokenizer=loaded.tokenizer,
                                  max_shard_gb=recipe.export.max_shard_gb)
    except (FileNotFoundError, NotImplementedError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {recipe.export.kind} export of {recipe.model.id} to {target}\n")
    typer.echo(report.text())
