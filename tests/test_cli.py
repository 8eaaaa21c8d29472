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


def test_list_names_what_the_other_commands_take(capsys):
    from modiff_quant import shipped_recipes
    from modiff_quant.registry import BASE_QUANTIZERS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in shipped_recipes())
    assert ", ".join(BASE_QUANTIZERS.names()) in out and "digits16" in out and "ddim" in out


def test_version_names_the_package_and_torch(capsys):
    import torch

    import modiff_quant

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"modiff-quant {modiff_quant.__version__}, torch {torch.__version__}"


def test_bops_prints_without_a_json_file_and_writes_one_when_asked(capsys, tmp_path):
    assert main(["bops", "--model", "digits16", "--recipe", "w8a4-modiff"]) == 0
    assert "GBops per image-step" in capsys.readouterr().out
    assert main(["bops", "--model", "digits16", "--recipe", "w8a4-modiff", "--json", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b.json").is_file()


def test_every_option_has_help_and_the_base_quantizers_are_shown():
    """`--help` of every command describes each option; --base-quantizer lists its names."""
    import argparse

    from modiff_quant.cli import build_parser
    from modiff_quant.registry import BASE_QUANTIZERS

    def parsers(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    undocumented = [
        f"{parser.prog} {action.option_strings[0]}"
        for parser in parsers(build_parser())
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert undocumented == []
    evaluate = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert all(name in evaluate for name in BASE_QUANTIZERS.names())


def test_explain_and_bops_take_the_base_quantizer_swap(capsys):
    """What `eval --base-quantizer` will run can be seen first: explain lists the adapted settings."""
    assert main(["explain", "--model", "digits16", "--recipe", "w8a4-modiff", "--base-quantizer", "ptq4dm"]) == 0
    assert "defaults: a_granularity sample (from w8a8-modiff.yaml:17) -> tensor" in capsys.readouterr().out
    assert main(["bops", "--model", "digits16", "--base-quantizer", "ptq4dm"]) == 2
    assert "--base-quantizer: swaps the base quantizer of a --recipe, and none is given" in capsys.readouterr().err
