"""The `lpq` command line. Thin: each job lives in lpq/pipelines/<module>.py and registers itself.

Commands are loaded on use: `lpq --help` lists them from the table below without importing any
pipeline (or torch), and `lpq <command>` imports only that command's module.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from lpq import cpu_numerics

cpu_numerics.pin()      # before any command imports torch: the same bits on every machine of a kind

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

# The click that typer runs on (its own copy in recent versions): its exceptions module, where the
# usage errors are defined.
_click_errors = importlib.import_module(typer.BadParameter.__module__)

# command -> (module in lpq.pipelines that registers it, one-line help for the command list)
COMMANDS = {
    "formats": ("formats", "Number formats: list, show value tables, quantize tensor files."),
    "ptq": ("ptq", "W4A4 post-training quantization with block-sequential calibration (resumable)."),
    "inspect": ("inspect", "Which modules of a model get which quantizer, per block."),
    "eval": ("eval", "Paired evaluation of a quantized model against its baseline."),
    "train": ("train", "Quantization-aware fine-tuning against a reference run of the same seed."),
    "prepare-data": ("train", "Encode captioned video clips into the Wan latent cache."),
    "export": ("export", "Quantize a model with a recipe and write a packed or fake-quantized checkpoint."),
    "recipes": ("recipes", "The shipped recipes: list them, print one."),
}


class LazyCommands(TyperGroup):
    """A command group whose commands are imported when they are run (or their own help is asked)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._resolving = False
        # Stubs carry the names and one-line help for the listing and for "did you mean" suggestions.
        self.commands = {name: TyperCommand(name, help=text) for name, (_, text) in COMMANDS.items()}

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in COMMANDS:
            return None
        return self._load(ctx, name) if self._resolving else self.commands[name]

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        self._resolving = True
        try:
            return super().resolve_command(ctx, args)
        finally:
            self._resolving = False

    @staticmethod
    def _load(ctx: Any, name: str) -> Any:
        sub = typer.Typer(add_completion=False)
        importlib.import_module(f"lpq.pipelines.{COMMANDS[name][0]}").register(sub)
        cmd = typer.main.get_command(sub)    # a group when the module registers several commands
        return cmd.get_command(ctx, name) if isinstance(cmd, TyperGroup) else cmd


app = typer.Typer(cls=LazyCommands, add_completion=False, no_args_is_help=True,
                  help="Quantize LLMs and video DiTs to HiFloat8 / HiFloat4 / MXFP4, evaluate, export.")


@app.callback()
def main() -> None:
    """Quantize LLMs and video DiTs to HiFloat8 / HiFloat4 / MXFP4, evaluate, export."""


def run() -> None:
    """The `lpq` executable: the app, with its usage errors (an unknown option, a missing argument, a
    value of the wrong type) on one line that names the command, as every other error of lpq is."""
    try:
        code = app(standalone_mode=False, prog_name="lpq")
    except _click_errors.NoArgsIsHelpError as e:    # `lpq` or a group alone: its help
        e.show()
        code = e.exit_code
    except _click_errors.ClickException as e:
        command = e.ctx.command_path if getattr(e, "ctx", None) else "lpq"
        message = " ".join(e.format_message().split())
        typer.echo(f"error: {command}: {message} (see {command} --help)", err=True)
        code = e.exit_code
    except typer.Abort:     # end of input at a prompt (an interrupt is exit 130, no message)
        typer.echo("error: aborted", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
