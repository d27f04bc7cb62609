"""The ``spkft-tui`` command line: --help, --version, and a bad --config as one line and exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spkft.core import __version__
from spkft.tui.wizard import main, parse_args


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("spkft-tui ")
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0 and "--config FILE" in capsys.readouterr().out


def test_a_bad_config_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: -1\n")
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(path)])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.startswith("error: 1 problem(s)") and "optim.lr" in err


def test_it_runs_as_a_module_without_loading_the_wizard_for_version():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "spkft.tui.wizard", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"spkft-tui {__version__}"
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "textual" not in imported


def test_the_app_module_loads_without_torch():
    # The first screen can only show before torch has loaded if the app needs none of it.
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import spkft.tui.wizard.app"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "textual" in imported
    assert not {"torch", "torchaudio", "onnx", "openvino", "grpc", "numpy"} & imported
