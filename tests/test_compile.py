"""A converted model under `torch.compile`: a few graphs for a whole trajectory (first step,
steady state, 0-bit variants), no recompilation after the first trajectory, no graph break, and
the eager output, counted with dynamo's own counters.

`aot_eager` runs the traced graphs with the eager kernels, so its output must equal eager bit for
bit; inductor's kernels round differently (float32 ulps, as for the float model), which a
quantizer can turn into one code step, so its output is compared with eager by its error against
the float model instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from helpers import ddim_inputs, tiny_sd_pipeline, tiny_unet
from torch._dynamo.utils import counters

import modiff_quant as mq
from modiff_quant.api import needs_calibration
from modiff_quant.integer_kernels import unavailable_reason

MAX_GRAPHS = 4
FAST_QDIFFUSION = (
    "version: 1\nextends: w8a4-modiff-qdiffusion\ndefaults:\n"
    "  base_quantizer: {name: qdiffusion, weight_iters: 2, act_iters: 2, calibration_steps: 4, samples_per_step: 2}\n"
)


@dataclass
class Compiled:
    outputs: list[list[torch.Tensor]]  # per trajectory, per step
    graphs: int  # compiled graphs in all
    compiles: list[int]  # frames compiled (first compilations and recompilations) during each trajectory
    graph_breaks: int


def run_compiled(model, inputs, trajectories: int = 3, **options) -> Compiled:
    """`trajectories` sampling runs of the compiled model on the same inputs, from a fresh dynamo."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, **options)
    outputs, compiles = [], []
    for _ in range(trajectories):
        before = counters["frames"]["total"]
        with torch.no_grad(), mq.sampling(model):
            outputs.append([compiled(x, t).sample for x, t in inputs])
        compiles.append(counters["frames"]["total"] - before)
    return Compiled(outputs, counters["stats"]["unique_graphs"], compiles, sum(counters["graph_break"].values()))


def eager(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad(), mq.sampling(model):
        return [model(x, t).sample for x, t in inputs]


def converted(recipe, model, inputs):
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    if needs_calibration(quantized):
        with torch.no_grad(), mq.calibrate(quantized):
            for x, t in inputs:
                quantized(x, t)
    return mq.convert(quantized)


@pytest.fixture(scope="module")
def unet_and_inputs():
    model = tiny_unet()
    return model, ddim_inputs(model, 8)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w8a4-modiff", "qdiffusion", "w8a8-modiff-deepcache", "w8a4-modiff-attn8"])
def test_compiled_trajectories_take_few_graphs_never_recompile_and_equal_eager(recipe, unet_and_inputs, write_recipe):
    model, inputs = unet_and_inputs
    quantized = converted(write_recipe(FAST_QDIFFUSION) if recipe == "qdiffusion" else recipe, model, inputs)
    expected = eager(quantized, inputs)
    run = run_compiled(quantized, inputs, backend="aot_eager")
    assert run.graph_breaks == 0
    assert 2 <= run.graphs <= MAX_GRAPHS  # first step and steady state at least
    assert run.compiles[1:] == [0, 0], run.compiles  # the first trajectory compiled every variant
    for outputs in run.outputs:
        assert all(torch.equal(got, want) for got, want in zip(outputs, expected, strict=True))


@pytest.mark.slow
def test_inductor_keeps_the_graph_count_and_the_quality_of_eager(unet_and_inputs):
    model, inputs = unet_and_inputs
    quantized = converted("w8a4-modiff", model, inputs)
    expected = eager(quantized, inputs)
    run = run_compiled(quantized, inputs, trajectories=2)
    assert run.graph_breaks == 0 and run.graphs <= MAX_GRAPHS and run.compiles[1:] == [0]
    with torch.no_grad():
        reference = [model(x, t).sample for x, t in inputs]

    def error(outputs):
        return sum(float((got - want).pow(2).mean()) for got, want in zip(outputs, reference, strict=True))

    # the first step is float (first_step: fp): only float32 rounding separates it from eager
    torch.testing.assert_close(run.outputs[0][0], expected[0])
    assert error(run.outputs[0]) <= 1.5 * error(expected)  # code flips move the error both ways, a little
    assert all(torch.equal(a, b) for a, b in zip(run.outputs[0], run.outputs[1], strict=True))


@pytest.mark.slow
@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_integer_execution_compiles_whole_and_agrees_with_eager(unet_and_inputs):
    """Static code bounds, tensor scales and weights packed for any shape keep the int8 kernels in
    the graph; they are eager's kernels (a Linear runs as a 1×1 convolution), so the output
    differs from eager by float rounding only."""
    model, inputs = unet_and_inputs
    quantized = mq.set_execution(converted("w8a4-modiff", model, inputs), "integer")
    expected = eager(quantized, inputs)
    run = run_compiled(quantized, inputs, trajectories=2, backend="aot_eager")
    assert run.graph_breaks == 0 and 2 <= run.graphs <= MAX_GRAPHS and run.compiles[1:] == [0]
    for got, want in zip(run.outputs[1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_unet_in_a_pipeline_with_cfg_and_a_swapped_scheduler(tmp_path):
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_sd_pipeline(tmp_path)
    unet = mq.attach(pipe, "w8a4-modiff")

    def images():
        return pipe(
            ["a red square", "a blue circle"],
            num_inference_steps=4,
            guidance_scale=7.5,
            height=8,
            width=8,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    expected = images()
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(unet, backend="aot_eager")
    assert torch.equal(images(), expected)
    compiled = counters["frames"]["total"]
    assert torch.equal(images(), expected) and counters["frames"]["total"] == compiled
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.unet = unet
    euler = images()
    pipe.unet = torch.compile(unet, backend="aot_eager")
    assert torch.equal(images(), euler)
    assert sum(counters["graph_break"].values()) == 0
