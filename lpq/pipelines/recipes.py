"""`lpq recipes list|show`: the recipes shipped in the source tree's configs/ folder.

`lpq ptq --scheme hif4|mxfp4|nvfp4` resolves to the default recipe of that format (SCHEMES).
"""
from __future__ import annotations

from pathlib import Path

import typer

# --scheme of `lpq ptq` -> the shipped default recipe for that format
SCHEMES = {"hif4": "w4a4_hif4", "mxfp4": "w4a4_mxfp4", "nvfp4": "w4a4_nvfp4"}
_COMMAND_OF = (("algorithms", "ptq"), ("train", "train"), ("eval", "eval"), ("export", "export"))

recipes_app = typer.Typer(no_args_is_help=True, help="The recipes shipped with lpq (configs/).")


def register(app: typer.Typer) -> None:
    app.add_typer(recipes_app, name="recipes")


def recipes_dir() -> Path:
    folder = Path(__file__).resolve().parents[2] / "configs"
    if not folder.is_dir():
        raise FileNotFoundError(f"no shipped recipes at {folder}: they live in the configs/ folder of lpq's source "
                                f"tree; install lpq from its repository (scripts/setup.sh)")
    return folder


def shipped_recipe(name: str) -> Path:
    """The path of a shipped recipe by name (file stem), with the closest names when there is none."""
    import difflib

    folder = recipes_dir()
    path = folder / f"{Path(name).stem}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped recipes: {', '.join(names)}"
        raise FileNotFoundError(f"no shipped recipe {name!r}{hint}")
    return path


def _describe(path: Path) -> tuple[str, str]:
    import yaml

    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    command = next((c for key, c in _COMMAND_OF if key in data), "inspect")
    first = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
    return command, first


@recipes_app.command("list")
def list_recipes() -> None:
    """Name, command and one-line description of each shipped recipe."""
    try:
        folder = recipes_dir()
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    rows = [(p.stem, *_describe(p)) for p in sorted(folder.glob("*.yaml"))]
    width = max(len(r[0]) for r in rows)
    for name, command, text in rows:
        typer.echo(f"{name.ljust(width)}  {command.ljust(7)}  {text}")
    typer.echo(f"\n`lpq recipes show NAME` prints one; `lpq ptq --scheme {'|'.join(SCHEMES)}` runs a default.")


@recipes_app.command("show")
def show_recipe(name: str = typer.Argument(..., help="recipe name, e.g. w4a4_hif4")) -> None:
    """Print a shipped recipe (copy it to start your own)."""
    try:
        path = shipped_recipe(name)
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"# {path}\n" + path.read_text(encoding="utf-8"), nl=False)
