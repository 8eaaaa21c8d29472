"""Error-compensated rounding (GPTQ, Frantar et al., 2023): round a weight one input column at a
time and spread each column's rounding error over the columns not yet rounded, weighted by the
inverse of the layer's input Hessian H = Σ x·xᵀ.

Round-to-nearest minimises ‖ΔW‖; what a sample sees is ‖ΔW·x‖, and inputs are correlated
(neighbouring pixels of a convolution patch, channels that move together), so the error of one
column can be cancelled by nudging the columns correlated with it. On digits16 at W8 this takes
the weights-only error from 43 dB (49 dB with bias correction) to 53 dB PSNR vs full precision
after DDIM 100 steps, in one closed-form pass per layer (no optimisation loop, unlike AdaRound).
The grid (scale, zero point) stays the observer's, so the integer kernels run the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from modiff_quant import distributed
from modiff_quant.calibration.reconstruction import Reconstruction, Unit, UnitSample
from modiff_quant.layers import QuantizedLayer, join_weight_parts
from modiff_quant.quant import QuantSpec, fake_quantize, stats_view
from modiff_quant.trajectory import Mode

from .adaround import WeightGrid

LAZY_BLOCK = 128
"""Columns rounded before their accumulated error reaches the remaining columns in one matmul."""
DAMPING_RETRIES = 4
"""Times the damping grows tenfold when H is too ill-conditioned to factorise."""


def input_columns(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as the columns its weight multiplies: [groups, in·taps / groups, n]
    (im2col patches for a convolution, each in the order of `weight.flatten(1)`)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).t()[None]
    if isinstance(layer, nn.Conv1d):
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
        padding = (*layer._reversed_padding_repeated_twice, 0, 0)
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
        padding = tuple(layer._reversed_padding_repeated_twice)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    patches = F.unfold(F.pad(x, padding, mode=mode), kernel, dilation=dilation, stride=stride)  # [B, in·taps, L]
    columns = patches.transpose(0, 1).reshape(patches.shape[1], -1)
    return columns.reshape(layer.groups, -1, columns.shape[1])


def element_grid(layer: QuantizedLayer, grid: WeightGrid, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of every weight element (each part of a split layer on its own grid)."""
    scales, zero_points = [], []
    for part in layer.weight_parts():
        view, _ = stats_view(part, spec.granularity, weight=True)
        scale, zero_point = grid(part, spec)
        scales.append(scale.expand_as(view).reshape(part.shape))
        zero_points.append(zero_point.expand_as(view).reshape(part.shape))
    return join_weight_parts(scales), join_weight_parts(zero_points)


def compensated_rounding(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    spec: QuantSpec,
    damp: float,
    act_order: bool = False,
) -> Tensor:
    """Round `weight` [rows, d] on the grid (`scale`, `zero_point`, same shape) column by column,
    each column's error propagated through the Cholesky factor of (H + damp·mean(diag H)·I)⁻¹.
    `act_order` rounds the columns of the largest inputs (diag H) first, while the most columns
    remain to absorb their error."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # an input that is always zero: its weights only need rounding
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(h.shape[0])
    h = h[order][:, order]
    w = weight.double()[:, order].clone()
    s, z = scale.double()[:, order], zero_point.double()[:, order]
    factor = _inverse_factor(h, damp)
    rounded = torch.empty_like(w)
    d = w.shape[1]
    for start in range(0, d, LAZY_BLOCK):
        end = min(start + LAZY_BLOCK, d)
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype)
        for j in range(start, end):
            column = w[:, j]
            rounded[:, j] = fake_quantize(column, s[:, j], z[:, j], spec)
            error = (column - rounded[:, j]) / factor[j, j]
            w[:, j + 1 : end] -= error[:, None] * factor[j, j + 1 : end][None]
            errors[:, j - start] = error
        w[:, end:] -= errors @ factor[start:end, end:]
    return rounded[:, torch.argsort(order)]


def _inverse_factor(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of the damped H⁻¹, the damping raised until H factorises."""
    mean_diagonal = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for attempt in range(DAMPING_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * 10**attempt * mean_diagonal * eye)
        if not info:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info:
                return upper
    raise RuntimeError(
        f"the input Hessian does not factorise even with damping {damp * 10**DAMPING_RETRIES:g} × its mean "
        "diagonal (raise `damp`, or give more calibration samples)"
    )


@torch.no_grad()
def compensate_layer(
    reconstruction: Reconstruction,
    unit: Unit,
    layer: QuantizedLayer,
    samples: Sequence[UnitSample],
    grid: WeightGrid,
    damp: float,
    act_order: bool,
) -> dict[str, Any]:
    """Collect the layer's input Hessian over the unit's samples (weights quantized so far, float
    activations), round its weight with compensation and stage it; returns the mean squared
    output error ΔW·H·ΔWᵀ / n of nearest and of compensated rounding."""
    spec = layer.plan.settings.weight_spec()
    hessian: Tensor | float = 0.0
    count = 0

    def collect(module: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal hessian, count
        columns = input_columns(module, args[0].detach().float())  # each call's product on the device
        hessian = hessian + (columns @ columns.transpose(1, 2)).double().cpu()  # the sum in float64
        count += columns.shape[2]

    handle = layer.register_forward_pre_hook(collect)
    try:
        for index in distributed.share(len(samples)):  # in a job, each process its share of the samples
            sample = samples[index]
            reconstruction.forward(unit, sample, torch.arange(sample.inputs.rows), quantized_activations=False)
    finally:
        handle.remove()
    if distributed.world_size() > 1:  # the float64 sums added in rank order
        parts = distributed.gathered([(hessian, count)])
        hessian, count = distributed.added([part if n else None for part, n in parts]), sum(n for _, n in parts)
    if count == 0:
        raise RuntimeError(f"{layer.plan.name}: not reached by its unit's forward pass, so its inputs are unknown")
    assert isinstance(hessian, Tensor)
    weight = layer.weight.detach()
    flat = weight.flatten(1).double().cpu()
    scale, zero_point = (t.flatten(1).double().cpu() for t in element_grid(layer, grid, spec))
    groups = hessian.shape[0]
    rows = flat.shape[0] // groups
    nearest = fake_quantize(flat, scale, zero_point, spec)
    rounded = torch.empty_like(flat)
    for g in range(groups):
        mine = slice(g * rows, (g + 1) * rows)
        try:
            rounded[mine] = compensated_rounding(
                flat[mine], hessian[g], scale[mine], zero_point[mine], spec, damp, act_order
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{layer.plan.name}: {exc}") from exc
    layer.staged_weight = rounded.reshape(weight.shape).to(weight.device, weight.dtype)
    return {
        "unit": unit.name,
        "layer": layer.plan.name,
        "phase": "weights",
        "loss_nearest": output_error(nearest - flat, hessian) / count,
        "loss": output_error(rounded - flat, hessian) / count,
    }


def output_error(delta: Tensor, hessian: Tensor) -> float:
    """Σ over the inputs of ‖ΔW·x‖², from H alone: Σ_g trace(ΔW_g·H_g·ΔW_gᵀ) over the groups."""
    per_group = delta.reshape(hessian.shape[0], -1, delta.shape[1])  # [groups, rows, d]
    return float(((per_group @ hessian) * per_group).sum())


def compensate_units(
    reconstruction: Reconstruction,
    units: Sequence[Unit],
    grid: WeightGrid,
    damp: float,
    act_order: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """`compensate_layer` on each quantized-weight layer, unit by unit in execution order (each
    sees the layers before it quantized), with a progress bar; one log entry per layer."""
    logs = []
    for unit in tqdm(units, desc=desc, leave=False):
        layers = [
            layer
            for layer in unit.layers
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not layer.plan.settings.weight_spec().is_float
        ]
        if not layers:
            continue
        samples = reconstruction.capture(unit, inputs_from=Mode.WEIGHTS_ONLY)
        logs += [compensate_layer(reconstruction, unit, layer, samples, grid, damp, act_order) for layer in layers]
    return logs
