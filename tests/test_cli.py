"""The command table of `lpq/cli.py`: listing without imports, and each command's own help."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lpq.cli import COMMANDS
from tests.cli.helpers import error_line, lpq, lpq_process


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


@pytest.mark.parametrize("args, names", [
    (["formats", "quantize", "t.safetensors", "--format", "hif4"], ["lpq formats quantize", "--format", "--fmt"]),
    (["formats", "quantize"], ["lpq formats quantize", "'file'"]),
    (["inspect"], ["lpq inspect", "'--config'"]),
    (["nope"], ["lpq:", "'nope'"]),
])
def test_usage_errors_are_one_line_naming_the_command(args, names):
    # The executable's entry point (lpq.cli:run, as `python -m lpq.cli`): a mistyped option or a missing
    # argument fails like every other error, one line and exit 2, not a framed box or a traceback.
    code, out = lpq_process(*args)
    assert code == 2, out
    assert out.strip() == error_line(out), out
    assert all(n in out for n in names), out


def test_the_executable_reports_an_abort_and_lets_other_errors_through(monkeypatch, capsys):
    # run() named an Abort class that typer's click does not have: every exception that reached its
    # last `except` (end of input at a prompt, any error a command did not catch) became an AttributeError.
    import typer

    from lpq import cli

    def aborts(**kwargs):
        raise typer.Abort()

    monkeypatch.setattr(cli, "app", aborts)
    with pytest.raises(SystemExit) as stop:
        cli.run()
    assert stop.value.code == 1 and capsys.readouterr().err == "error: aborted\n"

    def fails(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "app", fails)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run()


def test_lpq_alone_prints_the_command_list():
    code, out = lpq_process()
    assert "Traceback" not in out and all(name in out for name in COMMANDS), out
