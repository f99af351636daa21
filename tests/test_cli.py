"""The command table of `lpq/cli.py`: listing without imports, and each command's own help."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lpq.cli import COMMANDS
from tests.cli.helpers import lpq


def test_the_command_list_imports_no_pipeline_and_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from lpq.cli import app; "
            "out = CliRunner().invoke(app, ['--help']).output; "
            "assert all(name in out for name in %r), out; "
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('lpq.pipelines')]; "
            "sys.exit(repr(loaded) if loaded else 0)" % (list(COMMANDS),))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["ptq", "export", "inspect", "eval", "train"])
def test_each_command_help_shows_its_own_options_only(name):
    # A command is built in a Typer app of its own: without add_completion=False the shell-completion
    # options of a whole program would show up in every command's help.
    code, out = lpq(name, "--help")
    assert code == 0, out
    assert "--help" in out
    assert "completion" not in out, out
