"""Trajectory state is never used stale (issue 14): interrupted pipeline calls, trajectories that
jump or interleave, guidance dropped mid-run, several threads, exceptions inside the model,
non-finite steps, copies in the middle of a trajectory.

Each test compares every output with what a correct computation gives: the same call in a clean
run of its own loop that starts at that call or at an earlier one of the loop (a reset is correct,
only slower); an output computed on another loop's or branch's state matches none of them.
"""

from __future__ import annotations

import copy
import pickle
import threading
import warnings

import pytest
import torch
from helpers import ddim_inputs, tiny_sd_pipeline, tiny_unet

import modiff_quant as mq
from modiff_quant.api import state_bytes

pytestmark = pytest.mark.usefixtures("no_grad")


def converted(recipe: str = "w8a4-modiff") -> torch.nn.Module:
    return mq.convert(mq.prepare(tiny_unet(), recipe))


def clean_run(inputs: list) -> list[torch.Tensor]:
    model = converted()
    with mq.sampling(model):
        return [model(x, t).sample for x, t in inputs]


def fresh(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The call as the first step of a new trajectory."""
    return converted()(x, t).sample


def correct(out: torch.Tensor, inputs: list, i: int) -> bool:
    """`out` is call i of a clean run of `inputs` that starts at call i or before."""
    return any(torch.equal(out, clean_run(inputs[start : i + 1])[-1]) for start in range(i, -1, -1))


def test_timestep_jump_after_a_broken_off_loop_starts_a_new_trajectory():
    """A bare loop stopped by an exception after 3 of 10 steps, then an img2img-style run from step
    6 of the same schedule: the jump (3 steps at once) starts a new trajectory, so the second run
    equals a clean run of its own, bit for bit."""
    inputs = ddim_inputs(tiny_unet(), steps=10)
    model = converted()
    for x, t in inputs[:3]:
        model(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = [model(x, t).sample for x, t in inputs[6:]]
    assert all(torch.equal(a, b) for a, b in zip(resumed, clean_run(inputs[6:])))


@pytest.mark.slow
def test_interleaved_trajectories_warn_and_never_mix_states():
    """Two same-shape loops offset in time on one model: the loop that starts while the other is
    mid-run is warned about, and no call ever computes on the other loop's state: each output is
    either its clean-run output or a fresh first step."""
    first = ddim_inputs(tiny_unet(), steps=20, seed=0)
    second = ddim_inputs(tiny_unet(), steps=20, seed=1)
    calls = [("a", i) for i in range(6)] + [c for i in range(6) for c in (("b", i), ("a", 6 + i))]
    clean = {"a": clean_run(first), "b": clean_run(second)}
    runs = {"a": first, "b": second}
    model = converted()
    with pytest.warns(RuntimeWarning, match="ended before the end of its schedule"):
        outputs = [(run, i, model(*runs[run][i]).sample) for run, i in calls]
    for run, i, out in outputs:
        assert correct(out, runs[run], i), (run, i)
    assert any(not torch.equal(out, clean[run][i]) for run, i, out in outputs)  # the restarts really happened


@pytest.mark.slow
def test_guidance_dropped_mid_run_warns_and_never_mixes_branches():
    """Two-call CFG without branch names that stops calling the uncond branch after 4 steps: the
    call that breaks the pattern starts a new trajectory with a warning."""
    cond = ddim_inputs(tiny_unet(), steps=8, seed=0)
    uncond = [(x.flip(-1) * 0.5, t) for x, t in cond]
    model = converted()
    outputs = []
    for i in range(4):
        outputs.append((i, model(*cond[i]).sample))
        model(*uncond[i])
    with pytest.warns(RuntimeWarning, match="guidance was dropped or added mid-run"):
        outputs += [(i, model(*cond[i]).sample) for i in range(4, 8)]
    for i, out in outputs:
        assert correct(out, cond, i), i
    assert not torch.equal(outputs[5][1], clean_run(cond)[5])  # the restart really happened


def test_threads_keep_their_own_trajectories():
    """One converted model, two threads stepping their own trajectories in lockstep: each thread's
    outputs equal a single-threaded run of its trajectory, bit for bit."""
    runs = [ddim_inputs(tiny_unet(), steps=8, seed=seed) for seed in (0, 1)]
    model = converted()
    barrier = threading.Barrier(2)
    outputs: dict[int, list[torch.Tensor]] = {}
    failures: list[BaseException] = []

    def sample(index: int) -> None:
        try:
            with torch.no_grad(), mq.sampling(model):
                outputs[index] = []
                for x, t in runs[index]:
                    barrier.wait()
                    outputs[index].append(model(x, t).sample)
        except BaseException as exc:  # reported below: an assertion in a thread would be lost
            failures.append(exc)

    threads = [threading.Thread(target=sample, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for index, inputs in enumerate(runs):
        assert all(torch.equal(a, b) for a, b in zip(outputs[index], clean_run(inputs)))
    assert state_bytes(model) == 0  # the finished threads' state went with them


def test_an_exception_inside_the_model_drops_the_half_advanced_state():
    """A call that raises after some layers advanced: the next call starts afresh instead of
    continuing from a state whose layers are at different steps."""
    inputs = ddim_inputs(tiny_unet(), steps=6)
    model = converted()
    for x, t in inputs[:3]:
        model(x, t)

    def fail(*_: object) -> None:
        raise KeyboardInterrupt  # not even an Exception: the state must still not be reused

    handle = model.up_blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        model(*inputs[3])
    handle.remove()
    assert torch.equal(model(*inputs[3]).sample, fresh(*inputs[3]))


@pytest.mark.parametrize("recipe", ["w8a4-modiff", "w8a4-modiff-lean", "w8a8-modiff-deepcache"])
def test_a_non_finite_step_does_not_poison_the_rest_of_the_trajectory(recipe):
    """A NaN input at one step gives a NaN output (as in the float model), but the state does not
    keep it: the next steps recover, equal to a trajectory that starts afresh there."""
    inputs = ddim_inputs(tiny_unet(), steps=8)
    model = converted(recipe)
    for x, t in inputs[:4]:
        model(x, t)
    poisoned = inputs[4][0].clone()  # an even step: deepcache computes every block on it
    poisoned[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(model(poisoned, inputs[4][1]).sample).all()
    recovered = [model(x, t).sample for x, t in inputs[5:]]
    assert all(torch.isfinite(out).all() for out in recovered)
    if recipe != "w8a8-modiff-deepcache":  # its skip schedule counts steps from the trajectory start
        restarted = converted(recipe)
        with mq.sampling(restarted):
            assert all(torch.equal(a, restarted(x, t).sample) for a, (x, t) in zip(recovered, inputs[5:]))


def test_a_deep_copy_mid_trajectory_continues_it_and_a_pickled_one_starts_afresh():
    """copy.deepcopy copies the state (no misleading StaleCacheError from the copied outputs);
    pickling drops it (threads do not travel), so the unpickled model starts a new trajectory."""
    inputs = ddim_inputs(tiny_unet(), steps=6)
    model = converted("w8a8-modiff-deepcache")
    for x, t in inputs[:3]:
        model(x, t)
    copied = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    assert all(torch.equal(model(x, t).sample, copied(x, t).sample) for x, t in inputs[3:])
    assert torch.equal(unpickled(*inputs[3]).sample, converted("w8a8-modiff-deepcache")(*inputs[3]).sample)


def sd_call(pipe, **kwargs) -> torch.Tensor:
    kwargs = {
        "guidance_scale": 7.5,
        "num_inference_steps": 10,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(1),
        **kwargs,
    }
    return pipe(["a red square", "a blue circle"], **kwargs).images


class Stop(Exception):
    pass


def stop_at(step: int):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Stop
        return kwargs

    return callback


def test_a_pipeline_call_ended_by_an_exception_leaves_no_state(tmp_path):
    """A txt2img call stopped by its step callback at step 3 of 10, then an img2img call (strength
    0.4) of a pipeline sharing the UNet: the image equals a clean img2img run, bit for bit; and an
    img2img call stopped the same way does not leak into the next one either."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = tiny_sd_pipeline(tmp_path)
    unet = mq.attach(pipe, "w8a4-modiff")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    assert mq.attach(img2img) is unet  # the same quantized UNet, now scoped by img2img's calls too
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    clean = sd_call(img2img, image=image, strength=0.4)
    with pytest.raises(Stop):
        sd_call(pipe, height=8, width=8, callback_on_step_end=stop_at(3))
    assert state_bytes(unet) == 0
    assert torch.equal(sd_call(img2img, image=image, strength=0.4), clean)
    with pytest.raises(Stop):
        sd_call(img2img, image=image, strength=0.9, callback_on_step_end=stop_at(2))
    assert state_bytes(unet) == 0
    assert torch.equal(sd_call(img2img, image=image, strength=0.4), clean)
    assert type(img2img).__name__ == "StableDiffusionImg2ImgPipeline" and isinstance(
        img2img, StableDiffusionImg2ImgPipeline
    )


def test_attach_without_a_recipe_needs_a_prepared_denoiser(tmp_path):
    with pytest.raises(ValueError, match="is not prepared: pass a recipe"):
        mq.attach(tiny_sd_pipeline(tmp_path))
