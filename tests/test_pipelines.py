"""`attach` on diffusers pipelines built from config: state reset per pipeline call, classifier-free
guidance batched or as two calls (named by `cache_context` or not), schedulers swapped freely."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UNet2DModel,
)
from diffusers.models.cache_utils import CacheMixin
from helpers import tiny_dit_pipeline, tiny_sd_pipeline, tiny_unet

import modiff_quant as mq
from modiff_quant.api import _tracker, is_converted, is_prepared, state_bytes

PROMPTS = ["a red square", "a blue circle"]


def sd_images(pipe, steps: int = 8, **kwargs) -> torch.Tensor:
    kwargs = {"guidance_scale": 7.5, "height": 8, "width": 8, "output_type": "pt", **kwargs}
    return pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_stable_diffusion_with_cfg_through_attach_is_finite_and_repeatable(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    float_images = sd_images(pipe)
    unet = mq.attach(pipe, "w8a4-modiff")
    assert unet is pipe.unet and is_converted(unet)  # dynamic recipe: nothing to calibrate
    first = sd_images(pipe)
    assert state_bytes(unet) == 0  # the pipeline's end-of-call reset reached the MoDiff state
    second = sd_images(pipe)
    assert first.shape == (2, 3, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.equal(first, float_images)  # quantization is really on


@pytest.mark.parametrize(
    "scheduler",
    [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler],
)
def test_swapping_the_scheduler_needs_nothing_else(tmp_path, scheduler):
    pipe = tiny_sd_pipeline(tmp_path)
    unet = mq.attach(pipe, "w8a4-modiff")
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    steps_seen = []

    def record_step(pipe, i, t, kwargs):
        steps_seen.append(_tracker(unet).position[1])
        return kwargs

    first = sd_images(pipe, steps=6, callback_on_step_end=record_step)
    assert len(steps_seen) >= 6 and steps_seen == list(
        range(len(steps_seen))
    )  # one trajectory, never restarted (Heun: 2 calls a step)
    assert torch.isfinite(first).all() and torch.equal(first, sd_images(pipe, steps=6))


def test_dit_pipeline_transformer_and_ddim_pipeline_unet(tmp_path):
    dit = tiny_dit_pipeline()
    mq.attach(dit, "w8a4-modiff")

    def run():
        return dit([0, 1], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np").images

    assert (run() == run()).all()
    ddim = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False))
    ddim.set_progress_bar_config(disable=True)
    mq.attach(ddim, "w8a4-modiff")
    images = [
        ddim(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(1), output_type="np").images
        for _ in range(2)
    ]
    assert (images[0] == images[1]).all()


class CachingUNet(UNet2DModel, CacheMixin):
    """A class-conditional UNet with diffusers' CacheMixin, as the transformers of the pipelines
    that call the CFG branches separately (Flux, Wan, QwenImage, ...)."""


def caching_unet() -> CachingUNet:
    torch.manual_seed(0)
    config = dict(tiny_unet().config)
    return CachingUNet(**{k: v for k, v in config.items() if not k.startswith("_")} | {"num_class_embeds": 3}).eval()


def two_call_cfg(model, order: tuple[str, str], named: bool, steps: int = 6) -> tuple[list, dict[str, list]]:
    """A CFG loop calling the model once per branch and step; returns each call's inputs and outputs."""
    labels = {"cond": torch.tensor([0, 1]), "uncond": torch.tensor([2, 2])}
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs, outputs = [], {"cond": [], "uncond": []}
    with torch.no_grad():
        for t in scheduler.timesteps:
            inputs.append((x, t))
            for branch in order:
                if named:
                    with model.cache_context(branch):
                        outputs[branch].append(model(x, t, class_labels=labels[branch]).sample)
                else:
                    outputs[branch].append(model(x, t, class_labels=labels[branch]).sample)
            eps = outputs["uncond"][-1] + 4.0 * (outputs["cond"][-1] - outputs["uncond"][-1])
            x = scheduler.step(eps, t, x).prev_sample
    model._reset_stateful_cache()  # what the pipeline does at the end of its call
    return inputs, outputs


@pytest.mark.parametrize("named", [True, False], ids=["cache_context", "detected"])
@pytest.mark.parametrize("order", [("uncond", "cond"), ("cond", "uncond")])
def test_cfg_as_two_calls_keeps_one_state_per_branch(named, order):
    model = caching_unet()
    mq.attach(model, "w8a4-modiff")
    inputs, outputs = two_call_cfg(model, order, named)
    labels = {"cond": torch.tensor([0, 1]), "uncond": torch.tensor([2, 2])}
    for branch in order:  # each branch alone, in a trajectory of its own, from the same inputs
        with torch.no_grad(), mq.sampling(model):
            alone = [model(x, t, class_labels=labels[branch]).sample for x, t in inputs]
        assert all(torch.equal(a, b) for a, b in zip(alone, outputs[branch])), branch


def test_attach_errors_name_the_components(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    with pytest.raises(
        ValueError, match=r"no model component 'transformer' \(its model components: vae, text_encoder, unet\)"
    ):
        mq.attach(pipe, "w8a4-modiff", component="transformer")
    pipe.unet = None
    with pytest.raises(ValueError, match=r"neither a unet nor a transformer; name the denoiser with component="):
        mq.attach(pipe, "w8a4-modiff")


@pytest.mark.slow
def test_calibrate_through_the_pipeline_then_ship_the_denoiser(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    unet = mq.attach(pipe, "w8a4-modiff-ptq4dm")
    assert not is_converted(unet)  # static scales: calibrate first
    with torch.no_grad(), mq.calibrate(unet):
        sd_images(pipe, steps=6)
        sd_images(pipe, steps=6, guidance_scale=3.0)
    mq.convert(unet)
    expected = sd_images(pipe, steps=6)
    assert torch.isfinite(expected).all() and torch.equal(sd_images(pipe, steps=6), expected)
    mq.save_quantized(unet, tmp_path / "unet")
    shipped = tiny_sd_pipeline(tmp_path, seed=1)  # other float weights: every UNet tensor comes from the files
    shipped.text_encoder, shipped.vae = pipe.text_encoder, pipe.vae
    loaded = mq.attach(shipped, tmp_path / "unet")
    assert is_converted(loaded) and torch.equal(sd_images(shipped, steps=6), expected)
    assert state_bytes(loaded) == 0


def test_save_pretrained_of_a_modiff_model_refuses_and_names_what_to_use(tmp_path):
    """diffusers' save would write the quantized layers as plain float ones, which reload without
    MoDiff: the denoiser's and the pipeline's save_pretrained refuse, naming save_quantized; the
    folder save_quantized writes loads without the float checkpoint."""
    pipe = tiny_sd_pipeline(tmp_path)
    unet = mq.attach(pipe, "w8a4-modiff")
    for save in (unet.save_pretrained, pipe.save_pretrained):
        with pytest.raises(RuntimeError, match=r"save_quantized\(model, folder\).*load_quantized\(folder\)"):
            save(tmp_path / "pretrained")
    expected = sd_images(pipe, steps=4)
    mq.save_quantized(unet, tmp_path / "unet")
    pipe.unet = mq.load_quantized(tmp_path / "unet")
    mq.attach(pipe)
    assert torch.equal(sd_images(pipe, steps=4), expected)


@pytest.mark.slow
def test_oneshot_calibrates_on_pipeline_calls_converts_and_saves_as_the_manual_route(tmp_path):
    """llm-compressor's habit: one call does prepare, calibrate (on the pipeline calls given, or the
    user's loop), convert and save; the result equals attach + calibrate + convert by hand."""
    calls = [
        {
            "prompt": PROMPTS,
            "num_inference_steps": 5,
            "height": 8,
            "width": 8,
            "generator": torch.Generator().manual_seed(0),
        }
    ]
    pipe = tiny_sd_pipeline(tmp_path)
    unet = mq.oneshot(pipe, "w8a4-modiff-ptq4dm", calibration=calls, output_dir=tmp_path / "saved")
    assert unet is pipe.unet and is_converted(unet)
    by_hand = tiny_sd_pipeline(tmp_path)
    manual = mq.attach(by_hand, "w8a4-modiff-ptq4dm")
    with torch.no_grad(), mq.calibrate(manual):
        by_hand(**{**calls[0], "generator": torch.Generator().manual_seed(0)})
    mq.convert(manual)
    assert torch.equal(sd_images(pipe, steps=4), sd_images(by_hand, steps=4))
    looped = tiny_sd_pipeline(tmp_path)  # the user's own loop instead of calls
    mq.oneshot(
        looped,
        "w8a4-modiff-ptq4dm",
        calibration=lambda p: p(**{**calls[0], "generator": torch.Generator().manual_seed(0)}),
    )
    assert torch.equal(sd_images(looped, steps=4), sd_images(pipe, steps=4))
    by_hand.unet = mq.load_quantized(tmp_path / "saved")
    mq.attach(by_hand)
    assert torch.equal(sd_images(by_hand, steps=4), sd_images(pipe, steps=4))


def test_oneshot_without_needed_calibration_data_fails_before_the_model_changes(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"w8a4-modiff-ptq4dm: layer 'conv_in' \(Conv2d, base quantizer ptq4dm\) needs calibration data",
    ):
        mq.oneshot(pipe, "w8a4-modiff-ptq4dm")
    with pytest.raises(ValueError, match="calibration for a bare model must be your sampling loop"):
        mq.oneshot(pipe.unet, "w8a4-modiff-ptq4dm", calibration=["a prompt"])
    assert not is_prepared(pipe.unet)
    assert is_converted(mq.oneshot(pipe, "w8a4-modiff"))  # dynamic scales: nothing to calibrate


def test_from_pretrained_with_a_modiff_quantization_config_resets_state_and_refuses_to_save(tmp_path):
    """diffusers' own loading route (accelerate installed, the `accelerate` extra): the UNet binds
    on the pipeline's first call, the pipeline call resets its MoDiff state at the end as attach
    does, the float convolutions are announced, and save_pretrained refuses instead of writing
    what does not reload."""
    from diffusers import PipelineQuantizationConfig, StableDiffusionPipeline, TorchAoConfig
    from modiff_quant.backends.torchao_config import MoDiffConfig

    tiny_sd_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
    mapping = {"unet": TorchAoConfig(MoDiffConfig(a_bits=8, options={"w_bits": 8}))}
    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "pipe", quantization_config=PipelineQuantizationConfig(quant_mapping=mapping), dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match=r"convolutions .* stay float.*use modiff_quant.attach"):
        images = sd_images(pipe, steps=4)
    assert is_converted(pipe.unet) and torch.isfinite(images).all()
    assert state_bytes(pipe.unet) == 0  # reset by the pipeline's end-of-call cache reset
    assert torch.equal(sd_images(pipe, steps=4), images)
    with pytest.raises(RuntimeError, match="save_quantized"):
        pipe.save_pretrained(tmp_path / "again")
