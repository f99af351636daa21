"""The `lpq` command line. Thin: each job lives in lpq/pipelines/<job>.py and registers itself."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Quantize LLMs and video DiTs to HiFloat8 / HiFloat4 / MXFP4, evaluate, export.")

# Each module defines `register(app)`; a command is listed here only once it works.
COMMAND_MODULES = [
    "formats",
    "ptq",
    "inspect",
    "eval",
    "train",
    "export",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"lpq.pipelines.{_name}").register(app)

if __name__ == "__main__":
    app()
