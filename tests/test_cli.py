"""The command line's lazy loading: `bemerc --help` lists every command from the registry without
importing a stage, and each listed line is the command's own help."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import typer.main
from typer.testing import CliRunner

from bemerc.cli import COMMANDS, app, load_command

runner = CliRunner()


def first_paragraph(command: click.Command) -> str:
    return " ".join((command.help or "").split("\n\n")[0].split())


def test_every_listed_help_line_is_the_commands_own():
    for name, (module, line) in COMMANDS.items():
        command = load_command(name)
        assert command is not None, f"{name}: bemerc.cli.{module} does not register it"
        assert first_paragraph(command) == " ".join(line.split()), name


def test_help_lists_every_command_and_imports_no_stage():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bemerc.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "heavy = [m for m in ('bemerc.store', 'bemerc.extract', 'bemerc.train', 'bemerc.serve', 'lancedb',\n"
        "                     'polars', 'torch', 'transformers') if m in sys.modules]\n"
        "print('IMPORTED', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IMPORTED []" in done.stdout
    for name in COMMANDS:
        assert f" {name} " in done.stdout


def test_a_command_loads_when_asked_and_an_unknown_one_is_refused():
    result = runner.invoke(app, ["store", "--help"])
    assert result.exit_code == 0 and "info" in result.output
    result = runner.invoke(app, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_the_group_is_built_by_typer_for_tests_and_scripts():
    group = typer.main.get_command(app)
    assert group.list_commands(click.Context(group)) == list(COMMANDS)


def test_tune_help_shows_the_tuning_defaults_from_tuneconfig_without_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from bemerc.cli import app\n"
        "result = CliRunner().invoke(app, ['tune', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "COLUMNS": "400"})  # one line per option
    assert "TORCH False" in done.stdout
    from bemerc.train.tune.config import TuneConfig

    config = TuneConfig(model="m")
    lines = {line.split()[1]: " ".join(line.split()) for line in done.stdout.splitlines() if line.startswith("│ --")}
    for option, value in [("--epochs", config.epochs), ("--project-epochs", config.project_epochs), ("--lr", f"{config.lr:g}"),
                          ("--batch-size", config.batch_size), ("--balance", f"{config.balance:g}"), ("--seed", config.seed)]:
        assert f"[default: ({value})]" in lines[option], lines[option]
