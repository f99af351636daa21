"""`lpq inspect`: show, block by block, what a recipe quantizes in a model, and what it leaves alone."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import typer
import yaml

from lpq.config import ConfigError, _Where, from_dict
from lpq.models.hub import ModelConfig
from lpq.pipelines.ptq_config import ProtectConfig
from lpq.quant.recipe import QuantizerSpec, QuantRecipe, Scaling
from lpq.schema import RecipeVersion, recipe_version

STATUS = {"quantize": "quant", "protected": "PROT", "excluded": "excl"}
SHARED = ("version", "model", "quant", "protect")


@dataclass
class InspectRecipe:
    """What every recipe shares (SHARED); other sections of the file are ignored here. `protect` is
    lpq ptq's (its explicit blocks are shown as protected; auto-chosen ones are known only at run time)."""

    version: RecipeVersion = field(default=RecipeVersion.V1, kw_only=True)
    quant: QuantRecipe
    model: ModelConfig = field(default_factory=ModelConfig)
    protect: ProtectConfig | None = None

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
        if self.protect is not None and self.protect.blocks:
            if self.quant.protected_blocks:
                raise ValueError("list protected blocks under `protect.blocks` (lpq ptq) or "
                                 "`quant.protected_blocks`, not both")
            self.quant = dataclasses.replace(self.quant, protected_blocks=self.protect.blocks)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)


def load_inspect_recipe(path: Path) -> InspectRecipe:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "quant" not in data:
        raise ConfigError(f"{path}:1: the recipe needs a `quant:` section")
    shared = {k: data[k] for k in SHARED if k in data}
    return from_dict(shared, InspectRecipe, _Where(str(path), node))


def _describe(spec: QuantizerSpec | None) -> str:
    if spec is None:
        return "-"
    text = f"{spec.format} axis {spec.axis}, scaling {spec.scaling.value}"
    if spec.scaling != Scaling.NONE:
        text += f" ({spec.target.value}"
        text += f", history {spec.history_len} {spec.reduction.value})" if spec.scaling == Scaling.DELAYED else ")"
    return text


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _relative(name: str, adapter) -> str:
    """Module name relative to its block: model.layers.3.self_attn.q_proj -> self_attn.q_proj."""
    return name.split(".", adapter.blocks_path.count(".") + 2)[-1]


def _label(column: str, columns: list[str], kind: str) -> str:
    """Column header: last name components when they tell the columns apart, else the full names."""
    lasts = [c.rsplit(".", 1)[-1] for c in columns]
    short = len(set(lasts)) == len(lasts) and not any(x.isdigit() for x in lasts)
    name = column.rsplit(".", 1)[-1] if short else column
    return f"{name}[qkvp]" if kind == "attention" else name


def render(model: object, recipe: QuantRecipe) -> str:
    """The inspect report for an already loaded model."""
    from lpq.quant.apply import plan_quantization

    adapter, plan = plan_quantization(model, recipe)
    out = [f"family: {adapter.family}"]
    roles = [("weight", recipe.weight), ("input", recipe.input), ("grad", recipe.grad)]
    if recipe.attention:
        roles += [(f"attention {r}", getattr(recipe.attention, r)) for r in ("q", "k", "v", "p")]
    out += [f"  {role:12s} {_describe(spec)}" for role, spec in roles]
    budget = recipe.block_budget()
    out.append(f"protected blocks: {recipe.protected_blocks or 'none'} (budget {budget if budget is not None else 'none'}"
               f"{', over budget allowed' if recipe.allow_over_budget else ''})")
    out.append("cells: quant = quantized as above, PROT = protected block, excl = excluded, . = not in this block")
    for net_name, net in adapter.networks(model):
        entries = [e for e in plan if e.network == net_name]
        n_blocks = len(adapter.blocks(net))
        in_blocks = [e for e in entries if e.block is not None]
        cells = {(e.block, _relative(e.name, adapter)): STATUS[e.action] for e in in_blocks}
        columns = list(dict.fromkeys(_relative(e.name, adapter) for e in in_blocks))
        kinds = {_relative(e.name, adapter): e.kind for e in in_blocks}
        rows = [[str(b)] + [cells.get((b, c), ".") for c in columns] for b in range(n_blocks)]
        title = f"{net_name} ({type(net).__name__})" if net_name else type(net).__name__
        out += ["", f"{title}: {n_blocks} blocks under '{adapter.blocks_path}'",
                _table(rows, ["block"] + [_label(c, columns, kinds[c]) for c in columns])]
        outside = [[e.name, e.kind, e.reason] for e in entries if e.block is None]
        if outside:
            out += ["", "outside the blocks (high precision):", _table(outside, ["module", "type", "why"])]
        counts = {a: sum(1 for e in entries if e.action == a) for a in STATUS}
        out.append(f"\n{counts['quantize']} modules quantized, {counts['protected']} protected, "
                   f"{counts['excluded']} excluded")
    return "\n".join(out)


def inspect(config: Path = typer.Option(..., "--config", help="recipe YAML with `model:` and `quant:` sections"),
            model: str | None = typer.Option(None, "--model", help="override model.id")) -> None:
    """Per block, which modules get which quantizer, and which are protected or excluded."""
    from lpq.export.settings import refuse_runtime_export
    from lpq.models.hub import check_blocks, load_model

    try:
        recipe = load_inspect_recipe(config)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if model is not None:
        recipe.model.id = model
    try:
        refuse_runtime_export(recipe.model.id)
        check_blocks(recipe.model, recipe.quant.protected_blocks,
                     "protect.blocks" if recipe.protect is not None and recipe.protect.blocks else
                     "quant.protected_blocks")
        loaded = load_model(recipe.model)
        typer.echo(f"model: {recipe.model.id}\n" + render(loaded.model, recipe.quant))
        if recipe.protect is not None and recipe.protect.auto:
            typer.echo(f"protect.auto: lpq ptq also protects the {recipe.protect.auto} most sensitive blocks, "
                       "ranked when it runs (not shown above)")
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
