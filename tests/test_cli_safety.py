"""Bad command lines: one line `modiff-quant: error: ...` naming the culprit, exit status 2, no
traceback, and nothing sampled or calibrated first.

Sampling is where every expensive command spends its time (calibration samples too), so the
tests replace it with a function that raises `SamplingStarted`: a bad command line that gets that
far fails the test. A table holds the cases an adversarial review found; generated command lines
are the fuzz suite's (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from helpers import tiny_unet, tiny_vae
from safetensors.torch import save_file

import modiff_quant.evaluate
import modiff_quant.figure_data
from modiff_quant.cli import main
from modiff_quant.models import CIFAR10_DDPM_CONFIG

MESSAGE_LIMIT = 2000  # characters of one error line


class SamplingStarted(BaseException):
    """Raised where sampling would begin: the command line got past every check (a BaseException,
    as an interrupt, so that no error handling of the product, such as the gate's, catches it)."""


def _refuse_sampling(*args: Any, **kwargs: Any) -> Any:
    raise SamplingStarted("sampling started")


class Pickled:
    """A class that torch.load(weights_only=True) refuses to rebuild."""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Broken and good inputs of every kind the command line reads."""
    root = tmp_path_factory.mktemp("cli")
    (root / "afile").write_text("not a folder\n", encoding="utf-8")
    (root / "emptydir").mkdir()
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 16)
    torch.save({"conv_in.weight": torch.zeros(2, 2)}, root / "full.pt")
    (root / "truncated.pt").write_bytes((root / "full.pt").read_bytes()[:100])
    (root / "object.pt").write_bytes(pickle.dumps({"conv_in.weight": Pickled()}))
    torch.save({"conv_in.weight": 1}, root / "numbers.pt")
    from diffusers import UNet2DModel

    with torch.device("meta"):
        names = list(UNet2DModel(**CIFAR10_DDPM_CONFIG).state_dict())
    save_file({name: torch.zeros(1) for name in names}, root / "wrong-shapes.safetensors")
    (root / "bad-model").mkdir()
    (root / "bad-model" / "config.json").write_text("{", encoding="utf-8")
    tiny_vae().save_pretrained(root / "vae")
    tiny_unet().save_pretrained(root / "unet")
    (root / "typo.yaml").write_text("version: 1\ndefaults:\n  a_bitz: 4\n", encoding="utf-8")
    (root / "garbage.json").write_text("[1, 2", encoding="utf-8")
    (root / "list.json").write_text("[1, 2]", encoding="utf-8")
    fp_row = {"base": "dynamic", "scheme": "modiff", "w_bits": 8, "a_bits": 4, "fd": 30.0}
    (root / "results.json").write_text(
        json.dumps({"settings": {"steps": 2, "samples": 2}, "fp": {"fd": 20.0}, "rows": [fp_row]}), encoding="utf-8"
    )
    for name, text in BASELINES.items():
        (root / f"{name}.yaml").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def no_sampling() -> Iterator[None]:
    with (
        mock.patch.object(modiff_quant.evaluate, "sample", _refuse_sampling),
        mock.patch.object(modiff_quant.figure_data, "sample", _refuse_sampling),
    ):
        yield


_SETTING = "version: 1\ndefaults: {model: digits16, steps: 2, samples: 2}\nsettings:\n  a:\n    recipe: w8a4-modiff\n"
BASELINES = {
    "good-baseline": _SETTING + "    metrics: {fd: {value: 1}}\n",
    "value-abc": _SETTING + "    metrics: {fd: {value: abc}}\n",
    "value-nan": _SETTING + "    metrics: {fd: {value: .nan}}\n",
    "value-bool": _SETTING + "    metrics: {psnr_vs_fp: {value: true}}\n",
    "tolerance-negative": _SETTING + "    metrics: {fd: {value: 1, tolerance: -1}}\n",
    "tolerance-list": _SETTING + "    metrics: {fd: {value: 1, tolerance: [1]}}\n",
    "tolerance-percent": _SETTING + "    metrics: {fd: {value: 1, tolerance: abc%}}\n",
    "tolerance-typo": _SETTING + "    metrics: {fd: {value: 1, tolerence: 1}}\n",
    "ratio-abc": _SETTING
    + "    metrics: {fd: {value: 1}}\ncomparisons:\n  - {metric: fd, worse: a, better: a, ratio: abc}\n",
    "ratio-zero": _SETTING
    + "    metrics: {fd: {value: 1}}\ncomparisons:\n  - {metric: fd, worse: a, better: a, ratio: 0}\n",
    "margin-list": _SETTING
    + "    metrics: {fd: {value: 1}}\ncomparisons:\n  - {metric: psnr_vs_fp, worse: a, better: a, margin: [1]}\n",
    "worse-list": _SETTING
    + "    metrics: {fd: {value: 1}}\ncomparisons:\n  - {metric: fd, worse: [a], better: a, ratio: 2}\n",
    "defaults-number": "version: 1\ndefaults: 3\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n",
    "steps-zero": (
        "version: 1\ndefaults: {model: digits16, steps: 0}\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n"
    ),
    "steps-too-many": (
        "version: 1\ndefaults: {model: digits16, steps: 2000}\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n"
    ),
    "seed-text": "version: 1\ndefaults: {model: digits16, seed: x}\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n",
    "sampler-unknown": (
        "version: 1\ndefaults: {model: digits16, sampler: euler}\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n"
    ),
    "model-unknown": "version: 1\ndefaults: {model: digits61}\nsettings:\n  a:\n    metrics: {fd: {value: 1}}\n",
    "second-recipe-unknown": _SETTING
    + "    metrics: {fd: {value: 1}}\n  b:\n    recipe: w8a4-modif\n    metrics: {fd: {value: 1}}\n",
}

D = "{d}"  # the `files` folder, substituted per case
BAD_COMMAND_LINES = [
    # (argv, a text of the one line that names the culprit)
    (
        ["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--json", f"{D}/m.json", "--steps", "0"],
        "argument --steps: expected an integer >= 1, got 0",
    ),
    (["demo", "--samples", "0", "--out", f"{D}/o"], "argument --samples"),
    (["demo", "--batch-size", "0", "--out", f"{D}/o"], "argument --batch-size"),
    (["demo", "--seed", "-1", "--out", f"{D}/o"], "argument --seed"),
    (["demo", "--steps", "ten", "--out", f"{D}/o"], "argument --steps: expected an integer >= 1, got 'ten'"),
    (["demo", "--steps", "1001", "--out", f"{D}/o"], "steps must be an integer from 1 to 1000"),
    (["demo", "--sampler", "euler", "--out", f"{D}/o"], "argument --sampler: invalid choice: 'euler'"),
    (
        [
            "eval",
            "--model",
            "digits16",
            "--recipe",
            "w8a4-modiff",
            "--json",
            f"{D}/m.json",
            "--calibration-samples",
            "0",
        ],
        "argument --calibration-samples",
    ),
    (
        ["demo", "--out", f"{D}/afile/sub"],
        f"argument --out: '{D}/afile/sub' cannot be created: {D}/afile is not a folder",
    ),
    (["demo", "--out", f"{D}/afile"], "argument --out: '{d}/afile' is a file, not a folder"),
    (
        ["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--json", f"{D}/emptydir"],
        "argument --json: '{d}/emptydir' is a folder, not a file",
    ),
    (["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--json", f"{D}/afile/m.json"], "argument --json"),
    (
        ["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--json", f"{D}/m.json", "--out", f"{D}/afile"],
        "argument --out",
    ),
    (
        [
            "eval",
            "--model",
            "digits16",
            "--recipe",
            "w8a4-modiff",
            "--json",
            f"{D}/m.json",
            "--calibration-cache",
            f"{D}/afile",
        ],
        "argument --calibration-cache",
    ),
    (["bops", "--model", "digits16", "--json", f"{D}/b.json", "--steps", "-5"], "argument --steps"),
    (
        ["bops", "--model", "digits16", "--json", f"{D}/b.json", "--bops-float-bits", "0"],
        "argument --bops-float-bits: expected an integer from 1 to 64, got 0",
    ),
    (
        ["bops", "--model", "digits16", "--json", f"{D}/b.json", "--bops-float-bits", "-8"],
        "argument --bops-float-bits",
    ),
    (
        ["plot", "fd-vs-bits", "--results", f"{D}/results.json", "--w-bits", "0", "--out", f"{D}/o"],
        "argument --w-bits",
    ),
    # weights files: not a checkpoint, truncated, wrong shapes, a folder without a model, refused by weights_only, ...
    (
        ["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff", "--weights", f"{D}/garbage.pt"],
        f"{D}/garbage.pt: cannot be read as a torch state dict: torch.load(weights_only=True) refuses it",
    ),
    (
        ["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff", "--weights", f"{D}/garbage.safetensors"],
        f"{D}/garbage.safetensors: cannot be read as a safetensors file",
    ),
    (
        ["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff", "--weights", f"{D}/truncated.pt"],
        f"{D}/truncated.pt: cannot be read as a torch state dict",
    ),
    (
        ["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff", "--weights", f"{D}/object.pt"],
        f"{D}/object.pt: cannot be read as a torch state dict: torch.load(weights_only=True) refuses it",
    ),
    (
        ["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff", "--weights", f"{D}/numbers.pt"],
        f"{D}/numbers.pt: not a state dict",
    ),
    (
        ["explain", "--model", "cifar10-ddpm", "--recipe", "w8a4-modiff", "--weights", f"{D}/full.pt"],
        f"{D}/full.pt: not a state dict of this model (missing 327",
    ),
    (
        ["bops", "--model", "cifar10-ddpm", "--json", f"{D}/b.json", "--weights", f"{D}/wrong-shapes.safetensors"],
        f"{D}/wrong-shapes.safetensors: ",
    ),
    (
        [
            "eval",
            "--model",
            "cifar10-ddpm",
            "--recipe",
            "w8a4-modiff",
            "--json",
            f"{D}/m.json",
            "--weights",
            f"{D}/emptydir",
        ],
        f"{D}/emptydir: cannot be read as a diffusers UNet2DModel folder",
    ),
    (
        [
            "eval",
            "--model",
            "cifar10-ddpm",
            "--recipe",
            "w8a4-modiff",
            "--json",
            f"{D}/m.json",
            "--weights",
            f"{D}/missing.pt",
        ],
        f"weights '{D}/missing.pt': no such file or folder",
    ),
    (
        ["demo", "--weights", f"{D}/garbage.pt", "--out", f"{D}/o"],
        f"weights '{D}/garbage.pt': only the built-in architectures",
    ),
    # models, recipes, base quantizers, layers, results files
    (
        ["demo", "--model", f"{D}/bad-model", "--out", f"{D}/o"],
        f"{D}/bad-model: cannot be read as a diffusers model folder",
    ),
    (
        ["explain", "--model", f"{D}/emptydir", "--recipe", "w8a4-modiff"],
        f"model '{D}/emptydir' is neither a built-in model",
    ),
    (
        ["demo", "--model", f"{D}/vae", "--out", f"{D}/o"],
        f"{D}/vae: holds a AutoencoderKL, not an unconditional denoiser called as model(sample, timestep)",
    ),
    (["eval", "--model", "digits16", "--recipe", "w8a4-modif", "--json", f"{D}/m.json"], "did you mean 'w8a4-modiff'"),
    (
        ["eval", "--model", "digits16", "--recipe", f"{D}/typo.yaml", "--json", f"{D}/m.json"],
        f"{D}/typo.yaml:3: unknown setting 'a_bitz'",
    ),
    (
        [
            "eval",
            "--model",
            "digits16",
            "--recipe",
            "w8a4-modiff",
            "--base-quantizer",
            "statik",
            "--json",
            f"{D}/m.json",
        ],
        "unknown base quantizer 'statik'",
    ),
    (["demo", "--recipes", "w8a4-plain", "w8a4-modif", "--out", f"{D}/o"], "did you mean 'w8a4-modiff'"),
    (["plot", "distributions", "--layers", "conv_inn", "--out", f"{D}/o"], "'conv_inn' is not a Linear/Conv layer"),
    (
        ["plot", "distributions", "--steps", "1", "--out", f"{D}/o"],
        "temporal differences need at least 2 sampling steps",
    ),
    (["plot", "step-error", "--recipe", "w8a4-modif", "--out", f"{D}/o"], "did you mean 'w8a4-modiff'"),
    (
        ["plot", "fd-vs-bits", "--results", f"{D}/missing.json", "--out", f"{D}/o"],
        f"results file '{D}/missing.json' not found",
    ),
    (["plot", "fd-vs-bits", "--results", f"{D}/garbage.json", "--out", f"{D}/o"], f"{D}/garbage.json"),
    (["plot", "fd-vs-bits", "--results", f"{D}/list.json", "--out", f"{D}/o"], f"{D}/list.json"),
    (
        ["plot", "fd-vs-bits", "--results", f"{D}/results.json", "--w-bits", "4", "--out", f"{D}/o"],
        "no rows with w_bits 4",
    ),
    # gate baselines: malformed values, tolerances and comparisons, settings the harness refuses
    (["gate", "--baseline", f"{D}/missing.yaml"], f"{D}/missing.yaml:1: cannot read the file"),
    (
        ["gate", "--baseline", f"{D}/value-abc.yaml"],
        f"{D}/value-abc.yaml:6: metric 'fd': value must be a finite number",
    ),
    (
        ["gate", "--baseline", f"{D}/value-nan.yaml"],
        f"{D}/value-nan.yaml:6: metric 'fd': value must be a finite number",
    ),
    (
        ["gate", "--baseline", f"{D}/value-bool.yaml"],
        f"{D}/value-bool.yaml:6: metric 'psnr_vs_fp': value must be a finite number",
    ),
    (
        ["gate", "--baseline", f"{D}/tolerance-negative.yaml"],
        f"{D}/tolerance-negative.yaml:6: tolerance must be a number >= 0 or 'N%', got -1",
    ),
    (["gate", "--baseline", f"{D}/tolerance-list.yaml"], f"{D}/tolerance-list.yaml:6: tolerance must be"),
    (["gate", "--baseline", f"{D}/tolerance-percent.yaml"], f"{D}/tolerance-percent.yaml:6: tolerance must be"),
    (
        ["gate", "--baseline", f"{D}/tolerance-typo.yaml"],
        f"{D}/tolerance-typo.yaml:6: metric 'fd': unknown key 'tolerence'",
    ),
    (
        ["gate", "--baseline", f"{D}/ratio-abc.yaml"],
        f"{D}/ratio-abc.yaml:8: ratio must be a positive finite number, got 'abc'",
    ),
    (["gate", "--baseline", f"{D}/ratio-zero.yaml"], f"{D}/ratio-zero.yaml:8: ratio must be a positive"),
    (["gate", "--baseline", f"{D}/margin-list.yaml"], f"{D}/margin-list.yaml:8: margin must be a finite number"),
    (["gate", "--baseline", f"{D}/worse-list.yaml"], f"{D}/worse-list.yaml:8: comparison names unknown setting ['a']"),
    (["gate", "--baseline", f"{D}/defaults-number.yaml"], f"{D}/defaults-number.yaml:2: defaults must be a mapping"),
    (["gate", "--baseline", f"{D}/steps-zero.yaml"], f"{D}/steps-zero.yaml:2: steps: expected an integer >= 1, got 0"),
    (
        ["gate", "--baseline", f"{D}/steps-too-many.yaml"],
        f"{D}/steps-too-many.yaml:4: setting 'a': steps must be an integer from 1 to 1000",
    ),
    (["gate", "--baseline", f"{D}/seed-text.yaml"], f"{D}/seed-text.yaml:2: seed: expected an integer"),
    (["gate", "--baseline", f"{D}/sampler-unknown.yaml"], f"{D}/sampler-unknown.yaml:2: sampler: expected one of"),
    (["gate", "--baseline", f"{D}/model-unknown.yaml"], f"{D}/model-unknown.yaml:4: setting 'a': model 'digits61'"),
    (
        ["gate", "--baseline", f"{D}/second-recipe-unknown.yaml"],
        f"{D}/second-recipe-unknown.yaml:7: setting 'b': recipe 'w8a4-modif'",
    ),
    # execution options
    (["demo", "--device", "cuda:7"], "device: 'cuda:7' is not available on this machine"),
    (["demo", "--device", "gpu"], "device: 'gpu' is not a torch device"),
    (["demo", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["gate", "--baseline", "b.yaml", "--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    # the parser itself
    ([], "the following arguments are required: command"),
    (["sample"], "argument command: invalid choice: 'sample'"),
    (["demo", "--stpes", "5"], "unrecognized arguments: --stpes 5"),
    (["eval", "--model", "digits16", "--json", f"{D}/m.json"], "the following arguments are required: --recipe"),
]


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """Exit status (or 'sampling' when sampling started) and stderr of one in-process call."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code: int | str = main(argv)
        except SamplingStarted:
            code = "sampling"
    return code, err.getvalue()


def assert_one_line_error(code: int | str, err: str, culprit: str) -> None:
    assert code == 2, f"exit status {code!r}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    assert lines[0].startswith("modiff-quant: error: "), lines[0]
    assert culprit in lines[0], f"{culprit!r} is not named in: {lines[0]}"
    assert len(lines[0]) <= MESSAGE_LIMIT


@pytest.mark.parametrize(("argv", "culprit"), BAD_COMMAND_LINES)
def test_bad_command_lines_are_one_line_errors_before_sampling(files, argv, culprit):
    code, err = run_cli([arg.format(d=files) for arg in argv])
    assert_one_line_error(code, err, culprit.format(d=files))


def test_a_good_command_line_reaches_sampling(files):
    """The tests above would pass for a command that refused everything."""
    assert run_cli(["gate", "--baseline", str(files / "good-baseline.yaml")]) == ("sampling", "")
    code, err = run_cli(["demo", "--steps", "3", "--samples", "2", "--out", str(files / "o")])
    assert code == "sampling" and err.startswith("modiff-quant: warning: FD from 2 samples") and err.count("\n") == 1
    assert run_cli(["demo", "--model", str(files / "unet"), "--samples", "2", "--out", str(files / "o")]) == (
        "sampling",
        "",
    )  # a diffusers folder (a Path once failed inside diffusers)


def test_only_documented_errors_are_user_errors(monkeypatch):
    """Anything but a documented error is a bug: main lets it through, traceback and all."""

    def bug(args: argparse.Namespace) -> None:
        raise KeyError("a bug")

    def system(args: argparse.Namespace) -> None:
        raise OSError("no path involved")

    for fault in (bug, system):
        monkeypatch.setattr("modiff_quant.cli._explain", fault)
        with pytest.raises((KeyError, OSError)):
            main(["explain", "--model", "digits16", "--recipe", "w8a4-modiff"])


@pytest.mark.parametrize("base", ["static", "qdiffusion", "ptq4dm", "brevitas", "torchao_int4"])
def test_a_base_quantizer_swap_of_a_shipped_recipe_reaches_sampling(base):
    """`eval --base-quantizer B` on the default recipe: the settings B cannot serve are adapted,
    so the run starts sampling instead of failing on per-sample scales."""
    argv = ["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--base-quantizer", base, "--samples", "128"]
    assert run_cli(argv) == ("sampling", "")
