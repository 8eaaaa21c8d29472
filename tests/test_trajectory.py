"""Trajectory lifecycle (DESIGN §4): resets, new-trajectory detection, CFG branches, determinism,
and the prepare -> calibrate -> convert mode errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ddim_inputs, tiny_unet

import modiff_quant as mq
from modiff_quant.layers import QuantizedLayer

pytestmark = pytest.mark.usefixtures("no_grad")

W8A4 = "w8a4-modiff"


def converted(recipe: str = W8A4, model: torch.nn.Module | None = None) -> torch.nn.Module:
    return mq.convert(mq.prepare(model if model is not None else tiny_unet(), recipe))


def run(model: torch.nn.Module, inputs: list) -> list[torch.Tensor]:
    return [model(x, t).sample for x, t in inputs]


@pytest.mark.slow
def test_same_sampling_twice_is_bit_identical():
    """Acceptance: two identical runs give identical outputs, inside sampling() or by detection."""
    model = converted()
    inputs = ddim_inputs(tiny_unet(), steps=20)
    with mq.sampling(model):
        first = run(model, inputs)
    with mq.sampling(model):
        second = run(model, inputs)
    third = run(model, inputs)  # no context: the timestep jump back to the start resets the state
    fourth = run(model, inputs)
    for outputs in (second, third, fourth):
        assert all(torch.equal(a, b) for a, b in zip(first, outputs))


def test_state_is_not_reset_between_steps():
    """Regression for the reference code's per-step reset_cache(): with state kept, step 2 onward
    must differ from running every step as a first step (which is full precision)."""
    model = converted()
    inputs = ddim_inputs(tiny_unet(), steps=10)
    with mq.sampling(model):
        modulated = run(model, inputs)
    fresh = []
    for x, t in inputs:
        mq.reset(model)
        fresh.append(model(x, t).sample)
    assert torch.equal(modulated[0], fresh[0])
    assert not any(torch.equal(a, b) for a, b in zip(modulated[2:], fresh[2:]))


def test_batch_size_change_mid_run_starts_a_new_trajectory_with_a_warning():
    """Acceptance: a batch-size change never mixes states: the call after it equals a fresh first
    step for the new batch, and the user is told."""
    model = converted()
    inputs = ddim_inputs(tiny_unet(), steps=6, batch=2)
    other = ddim_inputs(tiny_unet(), steps=6, batch=3, seed=1)
    with mq.sampling(model):
        run(model, inputs[:3])
        with pytest.warns(RuntimeWarning, match=r"changed from shape \[2, 1, 8, 8\].*to shape \[3, 1, 8, 8\]"):
            switched = model(*other[3]).sample
    with mq.sampling(model):
        fresh = model(*other[3]).sample
    assert torch.equal(switched, fresh)


def test_dtype_change_starts_a_new_trajectory():
    """A dtype change is a new trajectory too (states of another dtype are never combined)."""
    model = converted()
    x, t = ddim_inputs(tiny_unet(), steps=3)[1]
    with mq.sampling(model):
        model(x, t)
        with pytest.warns(RuntimeWarning, match="float64"):
            model.double()(x.double(), t)


def test_timestep_going_up_resets_silently():
    """A new DDIM run starts at a higher timestep: a normal new trajectory, no warning."""
    model = converted()
    inputs = ddim_inputs(tiny_unet(), steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = run(model, inputs)
        second = run(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def cfg_inputs(steps: int) -> tuple[list, list]:
    cond = ddim_inputs(tiny_unet(), steps=steps, seed=0)
    uncond = [(x.flip(-1) * 0.5, t) for x, t in cond]
    return cond, uncond


def test_cfg_branches_called_separately_keep_one_state_each():
    """Classifier-free guidance calling the model twice per step (same timestep) must give each
    branch exactly what a model seeing only that branch would give."""
    cond, uncond = cfg_inputs(8)
    model = converted()
    with mq.sampling(model):
        interleaved = [(model(*c).sample, model(*u).sample) for c, u in zip(cond, uncond)]
    alone_cond, alone_uncond = converted(), converted()
    with mq.sampling(alone_cond), mq.sampling(alone_uncond):
        expected = [(alone_cond(*c).sample, alone_uncond(*u).sample) for c, u in zip(cond, uncond)]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(interleaved, expected))


def test_explicit_branch_context_overrides_detection():
    """`branch()` names the CFG branch explicitly, e.g. for pipelines that vary the timestep input."""
    cond, uncond = cfg_inputs(5)
    model, reference = converted(), converted()
    with mq.sampling(model):
        got = []
        for c, u in zip(cond, uncond):
            with mq.branch(model, "cond"):
                got.append(model(*c).sample)
            with mq.branch(model, "uncond"):
                model(*u)
    with mq.sampling(reference):
        expected = run(reference, cond)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_sampling_context_resets_on_enter_and_exit():
    """State never leaks out of, or into, a sampling() block."""
    model = converted()
    inputs = ddim_inputs(tiny_unet(), steps=4)
    with mq.sampling(model):
        run(model, inputs)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    assert layers and all(not layer.states() for layer in layers) and mq.api.state_bytes(model) == 0


def test_running_before_convert_is_an_error():
    """Prepared-but-not-converted models are not silently float: the error says what to call."""
    model = mq.prepare(tiny_unet(), W8A4)
    x, t = ddim_inputs(tiny_unet(), steps=2)[0]
    with pytest.raises(
        RuntimeError,
        match=r"time_embedding.linear_1: the model is prepared but not converted; call modiff_quant.convert\(model\)",
    ):
        model(x, t)


def test_lifecycle_misuse_errors():
    """Preparing twice, converting twice, calibrating a converted model and using an unprepared
    model are all clear errors."""
    model = mq.prepare(tiny_unet(), W8A4)
    with pytest.raises(RuntimeError, match="already prepared by modiff_quant: the model"):
        mq.prepare(model, W8A4)
    with pytest.raises(RuntimeError, match=r"already prepared by modiff_quant: 0, 1;"):
        mq.prepare(torch.nn.Sequential(model.conv_in, model.time_embedding.linear_1), W8A4)
    mq.convert(model)
    with pytest.raises(RuntimeError, match="convert"):
        mq.convert(model)
    with pytest.raises(RuntimeError, match="calibrate"), mq.calibrate(model):
        pass
    with pytest.raises(RuntimeError, match="not prepared"), mq.sampling(tiny_unet()):
        pass


def test_prepare_keeps_module_identity_names_and_classes():
    """Layers are re-classed in place: same objects, same state_dict keys for weights, still
    isinstance of their torch class, so code around the model keeps working."""
    model = tiny_unet()
    before = dict(model.named_modules())
    keys = set(model.state_dict())
    mq.prepare(model, W8A4)
    after = dict(model.named_modules())
    conv = after["conv_in"]
    assert conv is before["conv_in"] and isinstance(conv, torch.nn.Conv2d) and type(conv).__name__ == "QuantConv2d"
    assert keys <= set(model.state_dict())
    assert len(mq.plan_of(model).layers) == sum(
        isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in before.values()
    )


def test_diffusers_sampler_loops_are_one_trajectory_each():
    """Real diffusers scheduler loops (DDIM, DDPM, DPM-Solver) drive a prepared model as one
    trajectory: every call advances the step, nothing resets mid-run, and outputs are finite.
    (Closed-loop image quality needs trained weights; the digits16 tests cover it.)"""
    from modiff_quant.samplers import make_scheduler, sample

    model = converted("w8a4-modiff")
    tracker = model._modiff_tracker
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for sampler in ("ddim", "ddpm", "dpm-solver"):
        with warnings.catch_warnings(), mq.sampling(model):
            warnings.simplefilter("error", RuntimeWarning)
            images = sample(model, noise, make_scheduler(sampler), 12, progress=False)
            assert tracker.position == (0, 11), sampler
        assert torch.isfinite(images).all()
