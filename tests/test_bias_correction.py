"""`w_bias_correction`: the quantized weight's mean error moved into the bias at convert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import ddim_inputs, tiny_unet
from safetensors.torch import load_file
from torch import nn

import modiff_quant as mq
from modiff_quant.conversion.bias_correction import mean_output_shift
from modiff_quant.layers import QuantizedLayer


def recipe_text(correct: bool, w_bits: int = 4, extra: str = "") -> str:
    return (
        "version: 1\ndefaults:\n  scheme: plain\n  base_quantizer: dynamic\n"
        f"  w_bits: {w_bits}\n  a_bits: float\n  w_bias_correction: {str(correct).lower()}\n{extra}"
    )


def quantize(model: nn.Module, recipe, inputs, cache_dir=None) -> nn.Module:
    quantized = mq.prepare(copy.deepcopy(model), recipe)
    with mq.calibrate(quantized), torch.no_grad():
        for x, t in inputs:
            quantized(x, t)
    return mq.convert(quantized, cache_dir=cache_dir)


def outputs(model: nn.Module, inputs) -> torch.Tensor:
    with mq.sampling(model), torch.no_grad():
        return torch.stack([model(x, t).sample for x, t in inputs])


@pytest.mark.parametrize(
    ("layer", "apply"),
    [
        (nn.Linear(6, 5), lambda layer, w, x: F.linear(x, w)),
        (nn.Conv1d(6, 4, 3), lambda layer, w, x: F.conv1d(x, w)),
        (nn.Conv2d(6, 4, 3, stride=2), lambda layer, w, x: F.conv2d(x, w, stride=2)),
        (nn.Conv2d(6, 4, 3, groups=2), lambda layer, w, x: F.conv2d(x, w, groups=2)),
    ],
    ids=["linear", "conv1d", "conv2d", "grouped"],
)
def test_mean_output_shift_is_the_weight_error_applied_to_the_mean_input(layer, apply):
    """ΔW·E[x]: the layer's own operation on an input whose channels are constant at their means
    (no padding, so no border), for each layer shape and for grouped convolutions."""
    error = torch.randn_like(layer.weight)
    mean = torch.randn(6)
    constant = mean if isinstance(layer, nn.Linear) else mean.view(1, 6, *[1] * (layer.weight.dim() - 2))
    if not isinstance(layer, nn.Linear):
        constant = constant.expand(1, 6, *[7] * (layer.weight.dim() - 2))
    expected = apply(layer, error, constant)
    expected = expected if isinstance(layer, nn.Linear) else expected.flatten(2)[0, :, 0]
    shift = mean_output_shift(error, mean, getattr(layer, "groups", 1))
    torch.testing.assert_close(shift, expected, rtol=1e-5, atol=1e-5)


def test_bias_correction_cancels_the_mean_error_of_quantized_weights(write_recipe):
    """W4 weights on a real trajectory, each layer fed its full-precision inputs: the mean output
    error per channel vanishes on linear layers (exact) and shrinks on convolutions (the zero
    padding at their borders is not modelled); without the setting the biases stay as they were."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=8)
    seen: dict[str, list[torch.Tensor]] = {}
    layers = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0])) for n, m in layers.items()
    ]
    with torch.no_grad():
        for x, t in inputs:
            model(x, t)
    for hook in hooks:
        hook.remove()

    def mean_error(layer: nn.Module, name: str) -> torch.Tensor:
        """Per output channel, the mean of (quantized − float) output over the recorded inputs."""
        float_layer = layers[name]
        differences = []
        for x in seen[name]:
            run = F.linear if isinstance(float_layer, nn.Linear) else float_layer._conv_forward
            differences.append(
                (run(x, layer.weight, layer.bias) - float_layer(x)).movedim(1 if x.dim() == 4 else -1, -1)
            )
        return torch.cat([d.reshape(-1, d.shape[-1]) for d in differences]).mean(0).abs()

    errors = {}
    for correct in (False, True):
        quantized = quantize(model, write_recipe(recipe_text(correct), f"{correct}.yaml"), inputs)
        modules = dict(quantized.named_modules())
        with torch.no_grad():
            errors[correct] = {name: mean_error(modules[name], name) for name in layers}
        moved = [n for n in layers if not torch.equal(modules[n].bias, layers[n].bias)]
        assert moved if correct else not moved
    for name, layer in layers.items():
        before, after = errors[False][name].max().item(), errors[True][name].max().item()
        if isinstance(layer, nn.Linear):
            assert after < 1e-3 * before + 1e-6, name
    convolutions = [name for name, layer in layers.items() if isinstance(layer, nn.Conv2d)]
    total = {correct: sum(errors[correct][name].sum().item() for name in convolutions) for correct in errors}
    assert total[True] < 0.5 * total[False], total


def test_the_corrected_bias_survives_the_calibration_cache_and_a_checkpoint(write_recipe, tmp_path):
    """A cached calibration restores the corrected biases (they are in the file), and
    save_quantized/load_quantized give the same outputs bit for bit."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=4)
    recipe = write_recipe(recipe_text(True, w_bits=8))
    first = quantize(model, recipe, inputs, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    assert any(key.endswith("/bias") for key in load_file(cached))
    second = quantize(model, recipe, inputs, cache_dir=tmp_path / "cache")
    expected = outputs(first, inputs)
    assert torch.equal(outputs(second, inputs), expected)
    mq.save_quantized(first, tmp_path / "saved")
    loaded = mq.load_quantized(tiny_unet(), tmp_path / "saved")
    assert torch.equal(outputs(loaded, inputs), expected)


def test_a_cached_bias_for_a_layer_that_keeps_none_is_a_damaged_cache(write_recipe, tmp_path):
    from safetensors.torch import save_file

    model = tiny_unet()
    inputs = ddim_inputs(model, steps=3)
    recipe = write_recipe(
        "version: 1\ndefaults:\n  scheme: plain\n  base_quantizer: static\n  a_granularity: tensor\n"
    )
    quantize(model, recipe, inputs, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    save_file({**tensors, "conv_in/bias": model.conv_in.bias.detach().clone()}, path)
    with pytest.warns(RuntimeWarning, match=r"damaged .*'conv_in': a bias is saved, but this layer keeps none"):
        quantize(model, recipe, inputs, cache_dir=tmp_path)


def test_what_bias_correction_cannot_do_is_said_before_any_work(write_recipe):
    """A layer without a bias is refused at prepare (file:line); convert without calibration
    data says that bias correction needs it; explain marks the corrected layers."""
    no_bias = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.raises(mq.RecipeError, match=r"recipe.yaml:7: layer '0' \(Linear\): it has no bias"):
        mq.prepare(no_bias, write_recipe(recipe_text(True)))
    model = mq.prepare(tiny_unet(), write_recipe(recipe_text(True), "b.yaml"))
    with pytest.raises(RuntimeError, match=r"need calibration data \(.*bias correction"):
        mq.convert(model)
    explained = mq.load_recipe(write_recipe(recipe_text(True), "c.yaml")).resolve(tiny_unet()).explain()
    assert "4+bc" in explained and "'+bc' = bias correction" in explained


def test_packed_torchao_weights_are_corrected_through_their_kernel(write_recipe):
    """torchao's int4 Linear weights are packed and cannot be unpacked: the shift is what the
    packed weight computes on the mean input, so each such layer maps its mean input to the float
    layer's output."""
    model = tiny_unet()
    inputs = ddim_inputs(model, steps=3)
    recipe = "version: 1\nextends: w8a4-modiff-torchao\ndefaults:\n  w_bits: 4\n  w_bias_correction: true\n"
    quantized = quantize(model, write_recipe(recipe), inputs)
    packed = {
        n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedLayer) and m.plan.has_weight and m.packed
    }
    assert packed
    sums: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: sums.update({n: sums.get(n, 0) + a[0].flatten(0, -2).double().mean(0)})
        )
        for n in packed
    ]
    with torch.no_grad():
        for x, t in inputs:
            model(x, t)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name, layer in packed.items():
            mean = (sums[name] / len(inputs)).float()[None]
            expected = model.get_submodule(name)(mean)
            torch.testing.assert_close(F.linear(mean, layer.weight) + layer.bias, expected, rtol=0, atol=2e-3)
