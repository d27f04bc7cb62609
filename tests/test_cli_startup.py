"""The command line loads a command's module only when that command runs: help, version, a
mistyped command and ``spkft client`` never import torch, torchaudio or OpenVINO."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from spkft.tui.cli import COMMANDS, app, load_command

HEAVY = ("torch", "torchaudio", "openvino", "onnxruntime", "onnx")
PROBE = """
import sys
from spkft.tui.cli import main
sys.argv = ["spkft", *{args!r}]
try:
    main()
except SystemExit:
    pass
print("loaded:", *sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["trian"], ["client", "--help"],
                                  ["client", "info", "--server", "127.0.0.1:1"], ["models", "--help"]],
                         ids=lambda a: " ".join(a[:2]))
def test_commands_that_need_no_model_load_no_model_code(args):
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == "loaded:", result.stdout + result.stderr


def test_a_command_that_needs_the_model_loads_it():
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=["train", "--help"], heavy=HEAVY)],
                            capture_output=True, text=True, timeout=120)
    assert "torch" in result.stdout.splitlines()[-1].split()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_listed_help_is_the_commands_own(name):
    assert load_command(name).get_short_help_str(limit=500) == COMMANDS[name].help


def test_help_lists_every_command_and_a_typo_gets_a_suggestion():
    runner = CliRunner()
    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0
    words = " ".join(listed.output.split()).replace("- ", "-")  # undo the wrapping to the terminal width
    for name, command in COMMANDS.items():
        assert f" {name} {command.help}" in words
    typo = runner.invoke(app, ["trian"])
    assert typo.exit_code == 2 and "No such command 'trian'. Did you mean 'train'?" in typo.output
