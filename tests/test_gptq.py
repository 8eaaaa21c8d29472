"""`gptq`: error-compensated weight rounding and the base quantizer that runs it."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_unet
from modiff_quant.backends.gptq import compensated_rounding, input_columns, output_error
from test_base_quantizers import weights_only_log
from torch import nn

from modiff_quant.quant import Granularity, QuantSpec

SPEC = QuantSpec(8, False, Granularity("channel"))


def grid(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row asymmetric min-max scale and zero point, broadcast to every element."""
    low, high = weight.amin(1, keepdim=True).clamp(max=0), weight.amax(1, keepdim=True).clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    return scale.expand_as(weight), torch.round(-low / scale).expand_as(weight) + SPEC.qmin


def nearest(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec = SPEC
) -> torch.Tensor:
    return ((torch.round(weight / scale) + zero_point).clamp(spec.qmin, spec.qmax) - zero_point) * scale


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(6, 4, bias=False),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False),
        nn.Conv2d(4, 4, (3, 2), padding="same", dilation=(1, 2), padding_mode="reflect", bias=False),
        nn.Conv1d(4, 6, 3, padding=2, padding_mode="circular", groups=2, bias=False),
    ],
    ids=["linear", "conv-padded", "conv-strided-grouped", "conv-same-reflect", "conv1d-circular-grouped"],
)
def test_input_columns_are_what_the_weight_multiplies(layer):
    """Each group's weight, flattened as `weight.flatten(1)`, times the columns is the layer's own
    output: the Hessian is built over the inputs each weight column really sees."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 4, *(9,) * (layer.weight.dim() - 2))
    columns = input_columns(layer, x)
    groups = columns.shape[0]
    weight = layer.weight.detach().flatten(1).reshape(groups, -1, columns.shape[1])
    out = layer(x)
    expected = out.reshape(-1, out.shape[-1]).t() if isinstance(layer, nn.Linear) else out.transpose(0, 1).flatten(1)
    torch.testing.assert_close((weight @ columns).reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)


def test_uncorrelated_inputs_round_to_nearest():
    """With a diagonal Hessian no column's error can be cancelled by another: the result is
    round-to-nearest, exactly."""
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    scale, zero_point = grid(weight)
    hessian = torch.diag(torch.rand(16) + 0.5).double()
    rounded = compensated_rounding(weight, hessian, scale, zero_point, SPEC, damp=0.01)
    torch.testing.assert_close(rounded.float(), nearest(weight, scale, zero_point))


def test_correlated_inputs_lower_the_output_error_on_the_grid():
    """On correlated inputs (a smooth signal seen through 300 columns, more than one lazy block) the
    output error ‖ΔW·X‖² falls well below nearest rounding's, and every weight stays a code of
    the grid within its range."""
    torch.manual_seed(0)
    d = 300
    basis = torch.randn(d, 12)
    x = (basis @ torch.randn(12, 2000) + 0.05 * torch.randn(d, 2000)).double()
    hessian = x @ x.t()
    weight = torch.randn(16, d)
    scale, zero_point = grid(weight, bits=4)
    spec = QuantSpec(4, False, Granularity("channel"))
    rounded = compensated_rounding(weight, hessian, scale, zero_point, spec, damp=0.01)
    plain = nearest(weight, scale, zero_point, spec)
    codes = rounded / scale.double() + zero_point
    torch.testing.assert_close(codes, codes.round(), atol=1e-6, rtol=0)
    assert float(codes.min()) >= spec.qmin and float(codes.max()) <= spec.qmax
    compensated, plain_error = (output_error(w.double() - weight.double(), hessian[None]) for w in (rounded, plain))
    assert compensated < 0.25 * plain_error, (compensated, plain_error)
    torch.testing.assert_close(compensated, float(((rounded - weight.double()) @ x).pow(2).sum()), rtol=1e-6, atol=0)


def test_act_order_rounds_the_largest_inputs_first():
    """`act_order` is plain GPTQ on the columns sorted by decreasing input energy, each weight
    handed back in its own column."""
    torch.manual_seed(0)
    x = (torch.randn(20, 5) @ torch.randn(5, 500) * torch.rand(20, 1) * 4).double()
    hessian = x @ x.t()
    weight = torch.randn(8, 20)
    scale, zero_point = grid(weight, bits=4)
    spec = QuantSpec(4, False, Granularity("channel"))
    order = torch.argsort(hessian.diagonal(), descending=True)
    assert not torch.equal(order, torch.arange(20))
    sorted_first = compensated_rounding(
        weight[:, order], hessian[order][:, order], scale[:, order], zero_point[:, order], spec, damp=0.01
    )
    rounded = compensated_rounding(weight, hessian, scale, zero_point, spec, damp=0.01, act_order=True)
    torch.testing.assert_close(rounded[:, order], sorted_first, rtol=0, atol=0)
    assert not torch.equal(rounded, compensated_rounding(weight, hessian, scale, zero_point, spec, damp=0.01))


def test_a_hessian_that_never_factorises_is_named():
    weight = torch.randn(4, 6)
    scale, zero_point = grid(weight)
    hessian = torch.full((6, 6), float("nan"), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="does not factorise even with damping"):
        compensated_rounding(weight, hessian, scale, zero_point, SPEC, damp=0.01)


def test_gptq_weights_with_dynamic_activations(write_recipe):
    """`gptq` keeps dynamic activation quantizers, lowers every layer's output error on its
    calibration inputs below nearest rounding's, and tracks the float model's ε on held-out
    inputs better than `dynamic` on the same grid; it needs calibration data, and its weights run
    on the integer kernels."""
    log = weights_only_log(write_recipe, "{name: gptq, calibration_steps: 3, samples_per_step: 8}")
    assert {entry["layer"] for entry in log} == {
        name for name, m in tiny_unet().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    assert all(entry["loss"] <= entry["loss_nearest"] for entry in log), log
    assert sum(entry["loss"] for entry in log) < 0.8 * sum(entry["loss_nearest"] for entry in log)
