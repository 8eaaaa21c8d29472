"""Sampling and calibration sharded over torchrun's processes (gloo on the CPU): the same images,
metrics and converted model as one process, rank 0 alone writing; observers that combine across
processes; commands that do not shard, and a bad timeout, refused."""

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
from torch import Tensor

from modiff_quant import distributed
from modiff_quant.base_quantizer import ObservedActivationQuantizer, SplitActivationQuantizer
from modiff_quant.cli import main
from modiff_quant.observers import Observer, observation_stream
from modiff_quant.quant import Granularity, QuantSpec
from modiff_quant.registry import OBSERVERS

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


def _calibrated(tmp_path, recipe: str | Path) -> dict[str, list[dict]]:
    """`distributed_job.py` alone and under two gloo processes: each process's saved state and
    model-call count."""
    runs = {"one": [sys.executable, str(JOB)], "two": [*TORCHRUN, str(JOB)]}
    saved = {}
    for name, command in runs.items():
        out = tmp_path / f"{name}.pt"
        _run([*command, str(recipe), str(out)])
        saved[name] = [torch.load(tmp_path / f"{name}-rank{rank}.pt") for rank in range(1 if name == "one" else 2)]
    return saved


@pytest.mark.slow
def test_calibration_under_torchrun_gives_one_process_scales(tmp_path):
    """PTQ4DM's MoDiff calibration, its three batches recorded by two gloo processes (2 + 1), each
    process observing half the calibration samples (L_2.4 search samples combined): every rank
    converts to the one process's model, every scale, zero point and weight equal."""
    saved = _calibrated(tmp_path, "w8a4-modiff-ptq4dm")
    one = saved["one"][0]["state"]
    assert [key for key in one if "scale" in key], "the recipe calibrated no scale"
    for rank in saved["two"]:
        assert rank["state"].keys() == one.keys()
        for key, value in one.items():
            assert torch.equal(value, rank["state"][key]), key
    # the replay is split, not repeated: each process runs the model far fewer times than one alone
    assert max(rank["calls"] for rank in saved["two"]) < 0.75 * saved["one"][0]["calls"]


@pytest.mark.slow
def test_reconstruction_under_torchrun_averages_gradients(tmp_path):
    """Q-Diffusion under two gloo processes: each learns on half of every batch and the gradients
    are summed, so both ranks hold one model, the one process's up to summation order, which Adam
    and the rounding decisions amplify (0.4 % of the weights round the other way and step sizes
    move 0.4 % here): step sizes within 1 % and at most 1 % of the weights rounded differently."""
    recipe = tmp_path / "short.yaml"
    recipe.write_text(
        "version: 1\nextends: w8a4-modiff-qdiffusion\ndefaults:\n"
        "  base_quantizer: {name: qdiffusion, weight_iters: 30, act_iters: 10, samples_per_step: 4}\n",
        encoding="utf-8",
    )
    saved = _calibrated(tmp_path, recipe)
    one, (first, second) = saved["one"][0]["state"], saved["two"]
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    weights = [key for key, value in one.items() if key.endswith(".weight") and value.dim() > 1]
    scales = [key for key in one if key.endswith("scale")]
    assert weights and scales
    for key in scales:
        torch.testing.assert_close(first["state"][key], one[key], rtol=1e-2, atol=0, msg=key)
    changed = sum(int((first["state"][key] != one[key]).sum()) for key in weights)
    assert changed <= 0.01 * sum(one[key].numel() for key in weights)


@pytest.mark.slow
def test_gptq_and_bias_correction_under_torchrun_add_the_processes_sums(tmp_path):
    """GPTQ's Hessians and bias correction's mean inputs, each process summing its share of the
    samples and the float64 sums added in rank order: both ranks hold one model, the one
    process's up to that order (rounded to float32, no weight and no bias moves here)."""
    saved = _calibrated(tmp_path, "w8a4-modiff-gptq")
    one, (first, second) = saved["one"][0]["state"], saved["two"]
    for key, value in one.items():
        assert torch.equal(first["state"][key], second["state"][key]), key
        assert torch.equal(first["state"][key], value), key
    assert max(rank["calls"] for rank in saved["two"]) < 0.75 * saved["one"][0]["calls"]


@pytest.mark.slow
def test_a_process_that_hangs_fails_the_job_within_the_timeout(tmp_path):
    """One process of two sleeps instead of calibrating: the other's gather gives up after the
    timeout (5 s here) with a message naming it, and torchrun stops the job."""
    start = time.perf_counter()
    command = [*TORCHRUN, str(JOB), "w8a4-modiff-ptq4dm", str(tmp_path / "x.pt"), "--stall-rank", "1"]
    done = _run(command, check=False, **{distributed.TIMEOUT_VARIABLE: "5"})
    assert done.returncode != 0 and time.perf_counter() - start < 90
    assert "ProcessGroupError: process 0 of 2: another process of the job failed or did not answer" in done.stderr
    assert not list(tmp_path.glob("x-rank*.pt"))


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


def _observed(name: str, streams: list[Tensor], **options) -> Observer:
    """An observer of `name` that saw `streams`, each as its own observation stream."""
    observer = OBSERVERS.get(name)(QuantSpec(4, False, Granularity("channel")), **options)
    for index, stream in streams:
        with observation_stream(index):
            observer.observe(stream)
    return observer


@pytest.mark.parametrize("name", ["minmax", "ema_minmax", "mse"])
@pytest.mark.parametrize("split", [0, 1, 5, 9])
def test_observers_of_two_processes_combine_into_one_process(name, split):
    """Two processes observe streams 0..split-1 and split..8: the combined observer is the one that
    saw all nine in order; exactly, but for the moving average (rounding of its linear recurrence)."""
    generator = torch.Generator().manual_seed(0)
    streams = [(index, torch.randn(3, 4, 5, 5, generator=generator) * (index + 1)) for index in range(9)]
    options = {"max_values": 100} if name == "mse" else {}  # the sample drops values, so its keys matter
    whole = _observed(name, streams, **options)
    parts = [_observed(name, streams[:split], **options), _observed(name, streams[split:], **options)]
    combined = OBSERVERS.get(name)(QuantSpec(4, False, Granularity("channel")), **options)
    assert combined.combines
    combined.combine([part.statistics() for part in parts], torch.device("cpu"))
    if name == "ema_minmax":
        torch.testing.assert_close(combined.qparams(), whole.qparams(), rtol=1e-6, atol=1e-7)
    else:
        for got, want in zip(combined.qparams(), whole.qparams()):
            assert torch.equal(got, want)
    if name == "mse":
        assert torch.equal(combined.statistics()["values"], whole.statistics()["values"])


def test_an_observer_that_changes_observing_without_combining_is_not_sharded():
    """A plugin observer that keeps its own statistics but does not say how they combine is
    replayed in full by every process rather than combined wrongly."""

    class Counting(OBSERVERS.get("minmax")):
        def observe(self, x: Tensor) -> None:
            super().observe(x * 2)

    assert not Counting(QuantSpec(4, False, Granularity("tensor"))).combines


def test_activation_quantizers_say_whether_they_combine():
    """A split quantizer combines part by part; Brevitas' running range combines, its per-call
    statistics (Brevitas' own state) do not, so those are replayed in full by every process."""
    from modiff_quant.backends.brevitas import BrevitasQuantizer

    spec = QuantSpec(4, False, Granularity("tensor"))
    streams = [torch.randn(2, 6, 3, 3) * scale for scale in (1.0, 3.0, 0.5)]
    built = {
        "split": lambda: SplitActivationQuantizer(
            ObservedActivationQuantizer(spec, 1, "mse"), ObservedActivationQuantizer(spec, 1, "minmax")
        ),
        "brevitas range": lambda: BrevitasQuantizer().activation_quantizer(spec, 1),
    }
    for name, build in built.items():
        whole, parts, combined = build(), [build(), build()], build()
        for quantizer in (whole, *parts, combined):
            if isinstance(quantizer, SplitActivationQuantizer):
                quantizer.split_at = 4
        for index, stream in enumerate(streams):
            with observation_stream(index):
                whole.observe(stream)
                parts[index // 2].observe(stream)
        assert combined.combines, name
        combined.combine([part.statistics() for part in parts], torch.device("cpu"))
        for quantizer in (whole, combined):
            quantizer.freeze()
        assert torch.equal(whole(streams[1]), combined(streams[1])), name
    assert not BrevitasQuantizer(calibration="per_call").activation_quantizer(spec, 1).combines
