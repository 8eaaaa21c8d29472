"""Sampling sharded over torchrun's processes (gloo on the CPU): the same images and metrics as
one process, rank 0 alone writing; commands that do not shard, and a bad timeout, refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import readme_example

from modiff_quant import distributed
from modiff_quant.cli import main

JOB = Path(__file__).with_name("distributed_job.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
QUALITY_KEYS = ("fd", "fd_fp", "fd_to_fp", "psnr_vs_fp", "eps_rel_error", "gbops_per_step", "cache_bytes_per_image")


@pytest.mark.parametrize(("count", "size"), [(8, 2), (7, 3), (2, 4), (1, 1), (0, 2)])
def test_shares_cover_every_index_once_in_rank_order(monkeypatch, count, size):
    shares = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: size)
        shares.append(list(distributed.share(count)))
    assert [i for share in shares for i in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_commands_that_do_not_shard_are_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["explain", "--model", "digits16", "--recipe", "w8a4-modiff"]) == 2
    assert "explain runs in one process; under torchrun run eval, demo, gate, plot" in capsys.readouterr().err


def test_a_bad_timeout_is_named_before_any_process_group(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "ten minutes")
    assert main(["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--steps", "2", "--samples", "2"]) == 2
    assert f"{distributed.TIMEOUT_VARIABLE}: expected a number of seconds > 0, got 'ten minutes'" in (
        capsys.readouterr().err
    )


def _run(command: list[str], cwd: Path | None = None, check: bool = True, **variables: str):
    """A job in a subprocess, one thread per process (as torchrun gives each); with `check`, its
    stderr's tail when it fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **variables}
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300, check=False)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def _eval(tmp_path, name: str, launcher: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    arguments = ["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--steps", "5", "--samples", "10"]
    done = _run([sys.executable, *launcher, "modiff_quant", *arguments, "--batch-size", "2", "--json", str(out)])
    return {"metrics": json.loads(out.read_text(encoding="utf-8")), "stdout": done.stdout, "stderr": done.stderr}


@pytest.mark.slow
def test_eval_under_torchrun_equals_one_process(tmp_path):
    """Two gloo processes share five batches (3 + 2): every quality key of the JSON is the one
    process's, bit for bit (one thread each, as torchrun gives every process); rank 0 alone
    prints the metrics and warns, and its bar counts both processes' batches."""
    one = _eval(tmp_path, "one", ["-m"])
    two = _eval(tmp_path, "two", [*TORCHRUN[1:], "-m"])
    assert {key: two["metrics"][key] for key in QUALITY_KEYS} == {key: one["metrics"][key] for key in QUALITY_KEYS}
    assert one["metrics"]["settings"]["processes"] == 1 and two["metrics"]["settings"]["processes"] == 2
    assert two["stdout"].count('"psnr_vs_fp"') == 1
    assert two["stderr"].count("FD from 10 samples") == one["stderr"].count("FD from 10 samples") == 1
    bars = [line for line in two["stderr"].replace("\r", "\n").splitlines() if "w8a4-modiff (2 processes)" in line]
    assert "5/5" in bars[-1] and "(2 processes)" not in one["stderr"]  # the batches of both processes


@pytest.mark.slow
def test_calibration_under_torchrun_gives_one_process_scales(tmp_path):
    """PTQ4DM's MoDiff calibration, its three batches recorded by two gloo processes (2 + 1),
    converts to the one process's model on every rank: every scale, zero point and weight equal."""
    runs = {"one": [sys.executable, str(JOB)], "two": [*TORCHRUN, str(JOB)]}
    states = {}
    for name, command in runs.items():
        out = tmp_path / f"{name}.pt"
        _run([*command, "w8a4-modiff-ptq4dm", str(out)])
        states[name] = torch.load(out)
    assert states["one"].keys() == states["two"].keys()
    scales = [key for key in states["one"] if "scale" in key]
    assert scales, "the recipe calibrated no scale"
    for key, value in states["one"].items():
        assert torch.equal(value, states["two"][key]), key


@pytest.mark.slow
def test_a_process_that_hangs_fails_the_job_within_the_timeout(tmp_path):
    """One process of two sleeps instead of calibrating: the other's gather gives up after the
    timeout (5 s here) with a message naming it, and torchrun stops the job."""
    start = time.perf_counter()
    command = [*TORCHRUN, str(JOB), "w8a4-modiff-ptq4dm", str(tmp_path / "x.pt"), "--stall-rank", "1"]
    done = _run(command, check=False, **{distributed.TIMEOUT_VARIABLE: "5"})
    assert done.returncode != 0 and time.perf_counter() - start < 90
    assert "ProcessGroupError: process 0 of 2: another process of the job failed or did not answer" in done.stderr
    assert not (tmp_path / "x.pt").exists()


def test_a_failed_process_group_is_a_one_line_error_with_exit_3(monkeypatch, capsys):
    def fail(items):
        raise distributed.ProcessGroupError("process 0 of 2: another process of the job failed")

    monkeypatch.setattr(distributed, "gathered", fail)
    assert main(["eval", "--model", "digits16", "--recipe", "w8a4-modiff", "--steps", "2", "--samples", "2"]) == 3
    last = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert last == "modiff-quant: error: process 0 of 2: another process of the job failed"


@pytest.mark.slow
def test_the_readme_sharded_pipeline_example_runs_as_one_process(tmp_path):
    """The README's own-job example, on digits16 as a DDIMPipeline: its samples under two gloo
    processes are the one process's, bit for bit."""
    example = readme_example("a sharded evaluation of your pipeline (torchrun --nproc-per-node N this_file.py)")
    model = Path(distributed.__file__).parent / "assets" / "digits16"
    job = tmp_path / "job.py"
    pipeline = f"DDIMPipeline(unet=UNet2DModel.from_pretrained({str(model)!r}), scheduler=DDIMScheduler())"
    imports = "from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel"
    example = example.replace('DDIMPipeline.from_pretrained("path/to/your-ddpm")', pipeline)
    job.write_text(example.replace("from diffusers import DDIMPipeline", imports), encoding="utf-8")
    samples = {}
    for processes in (1, 2):
        folder = tmp_path / str(processes)
        folder.mkdir()
        _run([*TORCHRUN[:-1], str(processes), str(job)], cwd=folder)
        samples[processes] = np.load(folder / "samples.npy")
    assert samples[1].shape == (32, 16, 16, 1) and np.array_equal(samples[1], samples[2])


def test_the_gate_stops_at_a_failed_process_group(tmp_path, monkeypatch, capsys):
    """A setting that raised fails its checks and the gate goes on, but a broken job is no
    setting's fault: every later setting would wait on it, so the gate stops at once."""
    path = tmp_path / "baseline.yaml"
    path.write_text(
        "version: 1\ndefaults: {model: digits16, steps: 2, samples: 2}\n"
        "settings:\n  a: {metrics: {fd: {value: 1}}}\n  b: {metrics: {fd: {value: 1}}}\n",
        encoding="utf-8",
    )
    calls = []

    def fail(items):
        calls.append(items)
        raise distributed.ProcessGroupError("process 1 of 2: another process of the job failed")

    monkeypatch.setattr(distributed, "gathered", fail)
    assert main(["gate", "--baseline", str(path)]) == 3 and len(calls) == 1
    assert "another process of the job failed" in capsys.readouterr().err
