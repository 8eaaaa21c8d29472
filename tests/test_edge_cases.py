"""Edge cases real models and loops produce: shared layers, foreign layer subclasses, NumPy
timesteps, pickling, autograd, shape changes inside a layer, empty and unbatched inputs."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import modiff_quant as mq
from modiff_quant.quant import QuantSpec, quantize_minmax

W8A4 = "version: 1\ndefaults:\n  a_bits: 4\n  a_granularity: tensor\n"


class Twice(nn.Module):
    """Calls one layer at two call sites per model call (tied weights, reused blocks)."""

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) + self.second(torch.sin(3 * x))


def trajectory(steps: int = 15) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base, drift = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    return [base + 0.05 * k * drift for k in range(steps)]


@torch.no_grad()
def test_a_layer_called_twice_per_step_keeps_one_state_per_call_site(write_recipe):
    """A shared layer must behave exactly like two separate copies of it: differences are taken
    between steps of the same call site, never between the two call sites."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    separate = mq.convert(mq.prepare(Twice(copy.deepcopy(layer), copy.deepcopy(layer)), write_recipe(W8A4)))
    shared = mq.convert(mq.prepare(Twice(layer, layer), write_recipe(W8A4)))
    with mq.sampling(shared), mq.sampling(separate):
        for x in trajectory():
            assert torch.equal(shared(x), separate(x))


def test_failed_prepare_leaves_the_model_untouched(write_recipe):
    """Every layer's quantizers are built during resolution, so a setting a base quantizer rejects
    fails with the recipe line before any layer is changed."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    recipe = write_recipe("version: 1\ndefaults:\n  base_quantizer: static\n  a_granularity: sample\n")
    with pytest.raises(
        mq.RecipeError, match=r"recipe.yaml:3: layer '0' \(Linear\): granularity 'sample' has no static scale"
    ):
        mq.prepare(model, recipe)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear] and not hasattr(model, "_modiff_tracker")
    mq.prepare(model, "w8a4-modiff")  # still preparable


def test_bad_observer_options_fail_at_recipe_load(write_recipe):
    recipe = write_recipe(
        "version: 1\ndefaults:\n  base_quantizer: {name: static, observer: mse, observer_options: {p: -1}}\n"
    )
    with pytest.raises(mq.RecipeError, match=r"recipe.yaml:3: .*invalid L_p search options: p=-1"):
        mq.load_recipe(recipe)


def test_warmup_with_calibrated_scales_is_rejected(write_recipe):
    """A static delta scale sized for temporal differences rounds the warm-up residual to zero."""
    recipe = write_recipe("version: 1\ndefaults:\n  base_quantizer: static\n  first_step: warmup:3\n")
    with pytest.raises(
        mq.RecipeError, match=r"recipe.yaml:4: .*warm-up with the calibrated base quantizer 'static' would be a no-op"
    ):
        mq.prepare(nn.Sequential(nn.Linear(4, 4)), recipe)


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.attn(h, h, h, need_weights=False)[0]


@torch.no_grad()
def test_layer_subclasses_are_left_float_unless_a_rule_names_them(write_recipe):
    """nn.MultiheadAttention's out_proj is a Linear subclass its owner bypasses: it stays float
    (and explain says so); naming it in a rule is an error instead of a silent no-op."""
    model = WithAttention()
    recipe = mq.load_recipe("w8a4-modiff")
    assert "left float (subclasses of Linear/Conv, not wrappable): attn.out_proj" in recipe.explain(model)
    mq.convert(mq.prepare(model, recipe))
    assert type(model.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    with mq.sampling(model):
        assert torch.isfinite(model(torch.randn(2, 5, 8))).all()
    with pytest.raises(
        mq.RecipeError, match=r"matches attn.out_proj, subclasses of Linear/Conv that cannot be wrapped"
    ):
        mq.prepare(WithAttention(), write_recipe("version: 1\nrules:\n  - match: re:.*proj\n    a_bits: 4\n"))


@torch.no_grad()
def test_numpy_timesteps_are_read():
    """Loops that pass NumPy timesteps must get the same trajectory detection as torch ones."""

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, t: object) -> torch.Tensor:
            return self.fc(x)

    model = mq.convert(mq.prepare(Denoiser(), "w8a4-modiff"))
    x = torch.randn(2, 4)
    for t in (np.int64(900), np.float32(800.0), np.array(700)):
        model(x, t)
    assert model._modiff_tracker.position == (0, 2)
    model(x, np.int64(900))
    assert model._modiff_tracker.position == (0, 0)  # the timestep went up: a new trajectory


@torch.no_grad()
def test_pickled_model_with_block_caches_still_runs(write_recipe):
    """torch.save(model) pickles the model; the block cache must not turn into a self-call."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4))
    recipe = write_recipe("version: 1\nrules:\n  - match: '0'\n    a_bits: 0\n    steps: {every: 2}\n")
    mq.convert(mq.prepare(model, recipe))
    copy_ = pickle.loads(pickle.dumps(model))
    with mq.sampling(model), mq.sampling(copy_):
        for x in trajectory(4):
            assert torch.equal(model(x[:, :4]), copy_(x[:, :4]))


def test_state_does_not_chain_autograd_graphs_across_steps():
    """Outside no_grad the cached â/ô are detached, so memory does not grow with the step count."""
    model = mq.convert(mq.prepare(nn.Sequential(nn.Linear(16, 16)), "w8a4-modiff"))
    with mq.sampling(model):
        for x in trajectory(5):
            out = model(x.requires_grad_())
        (state,) = model[0].states().values()
        assert out.grad_fn is not None
        assert state.a_hat.grad_fn is None and state.cached_output("0").grad_fn is None


@torch.no_grad()
def test_input_shape_change_inside_a_layer_names_the_layer():
    """E.g. a different prompt length mid-trajectory: the layer says what happened and what to do."""

    class Context(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_k = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return x + self.to_k(context).mean(1)

    model = mq.convert(mq.prepare(Context(), "w8a4-modiff"))
    x = torch.randn(2, 4)
    # by keyword, as pipelines pass encoder states: a second positional argument would be read as the
    # timestep, and a larger maximum in the new context would start a new trajectory instead
    model(x, context=torch.randn(2, 7, 4))
    with pytest.raises(
        RuntimeError, match=r"to_k: input shape changed from \[2, 7, 4\] to \[2, 9, 4\] within a trajectory"
    ):
        model(x, context=torch.randn(2, 9, 4))


@torch.no_grad()
def test_empty_batches_and_unbatched_conv_inputs(write_recipe):
    """An empty batch passes through; an unbatched (C, H, W) conv input is quantized per channel
    exactly as the same input with a batch dim of one."""
    assert quantize_minmax(torch.empty(0, 3), QuantSpec(4, False, mq.Granularity("tensor"))).shape == (0, 3)
    recipe = write_recipe(
        "version: 1\ndefaults:\n  w_bits: float\n  a_bits: 4\n  a_granularity: channel\n  scheme: plain\n"
    )
    batched = mq.convert(mq.prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), recipe))
    unbatched = copy.deepcopy(batched)
    x = torch.randn(3, 6, 6)
    with mq.sampling(batched), mq.sampling(unbatched):
        assert torch.equal(unbatched(x), batched(x[None])[0])
        with pytest.warns(RuntimeWarning, match="starting a new trajectory"):  # batch 1 -> 0
            assert batched(torch.empty(0, 3, 6, 6)).shape == (0, 4, 4, 4)
