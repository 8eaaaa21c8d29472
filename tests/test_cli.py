"""The `modiff-quant` command line: explain, demo, and errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modiff_quant.cli import main


def test_explain_prints_every_layer_of_the_cifar_unet(capsys):
    assert main(["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff"]) == 0
    out = capsys.readouterr().out
    assert "113 layers" in out
    assert out.count(" Conv2d ") == 65 and out.count(" Linear ") == 48
    assert "conv_in " in out and " 4u " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modif"], "did you mean 'w8a4-modiff'"),
        (["explain", "--model", "cifar10-dpm", "--recipe", "w8a4-modiff"], "did you mean 'cifar10-ddpm'"),
    ],
)
def test_bad_names_exit_2_with_a_suggestion(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_recipe_errors_exit_2_with_file_and_line(capsys, write_recipe):
    path = write_recipe("version: 1\ndefaults:\n  a_bitz: 4\n")
    assert main(["explain", "--model", "cifar10-ddpm", "--recipe", str(path)]) == 2
    assert f"{path}:3: unknown setting 'a_bitz'; did you mean 'a_bits'" in capsys.readouterr().err


def test_console_script_is_installed():
    """pip install puts the command beside the interpreter of the environment it installs into."""
    executable = Path(sys.executable).parent / "modiff-quant"
    assert executable.is_file(), "pip install must provide the modiff-quant command"
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, check=True)
    assert "explain" in result.stdout and "demo" in result.stdout


def test_console_script_reports_a_bad_option_in_one_line(tmp_path):
    """The installed command: exit 2 and exactly one stderr line (argparse's own would print a
    usage block; --bops-float-bits -8 used to be accepted)."""
    executable = Path(sys.executable).parent / "modiff-quant"
    result = subprocess.run(
        [
            str(executable),
            "bops",
            "--model",
            "digits16",
            "--json",
            str(tmp_path / "b.json"),
            "--bops-float-bits",
            "-8",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "modiff-quant: error: argument --bops-float-bits: expected an integer from 1 to 64, got -8 "
        "(see 'modiff-quant bops --help')"
    ]
    assert not (tmp_path / "b.json").exists()
