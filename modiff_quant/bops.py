"""Bit-operation accounting as in the paper: per image and step, Σ MACs × w_bits × a_bits.

MACs come from one float call of the model: Linear/Conv layers through forward hooks, and the
products of two activations (attention QKᵀ and softmax·V, which have no layer to hook) through a
torch function mode. How each is charged is a `BopsConventions` choice. The defaults charge what
runs: a product at the widths of its two operands (float unless a recipe quantizes them);
`PAPER_CONVENTIONS` reproduce the paper's Table 1 (every MAC at the network's W×A, float
counted as 32-bit).

`nominal` charges every entry at its recipe bits; `amortized` follows a whole trajectory: the
first step at its real precision (a full-precision first step is A32), 0-bit steps and
everything inside skipped blocks at 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .attention_products import PRODUCTS
from .layer_parts import CHANNEL_DIMS
from .models import sample_shape
from .quant import FLOAT_BITS
from .recipe import LayerPlan, Plan

AttentionCharge = Literal["operands", "layer", "float", "exclude"]


@dataclass(frozen=True)
class BopsConventions:
    """How operations are charged.

    `attention`: the attention products (QKᵀ, softmax·V) are charged `operands`: at the widths
    of their two operands as the recipe quantizes them (float where it does not; a product of
    two modulated operands at its incremental form, see `_product_bits`); `layer`: at the bits
    of the attention's own first projection (e.g. `to_q`), as the paper charges every MAC at
    the network's W×A whether it runs so or not; `float`: at float × float; `exclude`: not
    counted (the 113-layer count of the CIFAR-10 UNet).
    `float_bits`: the bit-width a float operand is charged at (the paper: 32).
    """

    attention: AttentionCharge = "operands"
    float_bits: int = 32


DEFAULT_CONVENTIONS = BopsConventions()
PAPER_CONVENTIONS = BopsConventions(attention="layer")


@dataclass(frozen=True)
class MacEntry:
    """MACs of one operation per image and model call. `charged_as` is the layer whose bits
    apply (the layer itself, an attention's first projection, or None: float)."""

    name: str
    kind: Literal["layer", "attention"]
    macs: int
    charged_as: str | None


@torch.no_grad()
def count_model_macs(model: nn.Module) -> list[MacEntry]:
    """`count_macs` of one call on a zero image at t = 0 (MACs depend on neither)."""
    return count_macs(model, torch.zeros(1, *sample_shape(model)), torch.tensor(0))


def count_macs(model: nn.Module, *inputs: Any) -> list[MacEntry]:
    """MACs of each Linear/Conv layer and each attention module's activation products, for one
    call of the float `model` on one image's `inputs`."""
    layer_macs: dict[str, int] = {}
    products: dict[str, list[int]] = {}  # module -> MACs of the products of one call, in order
    calls: dict[str, int] = {}
    stack: list[str] = []
    layer_types = tuple(CHANNEL_DIMS)

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(name)
            calls[name] = calls.get(name, 0) + 1

        return hook

    def leave(name: str, layer: bool) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            stack.pop()
            if layer:
                layer_macs[name] = layer_macs.get(name, 0) + output.numel() * _macs_per_output(module)

        return hook

    def product(macs: int) -> None:
        """Charge an activation product to the innermost module running (never inside a layer)."""
        if stack and not isinstance(modules[stack[-1]], layer_types):
            products.setdefault(stack[-1], []).append(macs)

    modules = dict(model.named_modules())
    hooks = [
        h
        for name, m in modules.items()
        for h in (
            m.register_forward_pre_hook(enter(name)),
            m.register_forward_hook(leave(name, isinstance(m, layer_types))),
        )
    ]
    try:
        with _ActivationProducts(product):
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    entries = [MacEntry(name, "layer", macs, name) for name, macs in layer_macs.items()]
    for name, found in products.items():
        first = _first_layer(modules[name], name, layer_types)
        if len(found) != 2 * calls[name]:  # not attention's QKᵀ then softmax·V: one entry, charged as its layer
            entries.append(MacEntry(name, "attention", sum(found), first))
            continue
        for index, product in enumerate(PRODUCTS):
            entries.append(MacEntry(f"{name}.{product}", "attention", sum(found[index::2]), first))
    return entries


def _macs_per_output(module: nn.Module) -> int:
    return (
        module.in_features
        if isinstance(module, nn.Linear)
        else module.in_channels // module.groups * math.prod(module.kernel_size)
    )


def _first_layer(module: nn.Module, name: str, layer_types: tuple[type, ...]) -> str | None:
    return next(
        (
            f"{name}.{child}" if name else child
            for child, m in module.named_modules()
            if child and isinstance(m, layer_types)
        ),
        None,
    )


class _ActivationProducts(TorchFunctionMode):
    """Reports the MACs of every product of two activations: scaled-dot-product attention and
    (b)mm/matmul outside Linear layers (older attention processors)."""

    def __init__(self, report: Callable[[int], None]) -> None:
        super().__init__()
        self._report = report

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        for macs in _product_macs(func, args, kwargs):
            self._report(macs)
        return func(*args, **kwargs)


def _product_macs(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    """MACs of each activation product `func` computes (none: not such a product)."""
    if func is F.scaled_dot_product_attention:
        query, key, value = (args + tuple(kwargs[k] for k in ("query", "key", "value")[len(args) :]))[:3]
        rows = math.prod(query.shape[:-1]) * key.shape[-2]
        return [rows * query.shape[-1], rows * value.shape[-1]]  # QKᵀ, softmax·V
    if func is torch.baddbmm:
        args = args[1:]
    if func in (torch.bmm, torch.baddbmm, torch.matmul, Tensor.matmul, Tensor.__matmul__) and len(args) >= 2:
        a, b = args[0], args[1]
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 2 and b.dim() >= 2:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            return [math.prod(batch) * a.shape[-2] * a.shape[-1] * b.shape[-1]]
    return []


@dataclass(frozen=True)
class Bops:
    """GBops per image and step: totals, the amortized total at each step, and per entry."""

    gbops_per_step: float
    gbops_per_step_amortized: float
    per_step: list[float]
    per_entry: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return {"gbops_per_step": self.gbops_per_step, "gbops_per_step_amortized": self.gbops_per_step_amortized}


def count_bops(
    entries: list[MacEntry], plan: Plan | None, steps: int, conventions: BopsConventions = DEFAULT_CONVENTIONS
) -> Bops:
    """GBops of a trajectory of `steps` model calls (plan None: the float model)."""
    charged = [e for e in entries if e.kind == "layer" or conventions.attention != "exclude"]
    rows = []
    for entry in charged:
        nominal = entry.macs * _bits(entry, plan, None, conventions)
        per_step = [entry.macs * _bits(entry, plan, step, conventions) for step in range(steps)]
        rows.append((entry, nominal, per_step))
    per_entry = [
        {
            "name": e.name,
            "kind": e.kind,
            "gmacs": e.macs / 1e9,
            "gbops": nominal / 1e9,
            "gbops_amortized": sum(per_step) / steps / 1e9,
            "zero_steps": per_step.count(0),
        }
        for e, nominal, per_step in rows
    ]
    step_totals = [sum(per_step[step] for _, _, per_step in rows) / 1e9 for step in range(steps)]
    return Bops(sum(nominal for _, nominal, _ in rows) / 1e9, sum(step_totals) / steps, step_totals, per_entry)


def _bits(entry: MacEntry, plan: Plan | None, step: int | None, conventions: BopsConventions) -> int:
    """w_bits × a_bits an entry is charged at `step` (None: nominal)."""
    # a block always runs on the first call: there is no cached output to reuse yet; an adaptive
    # block (skip_threshold) is charged as computed, since its skips depend on the inputs
    if (
        plan
        and step
        and any(_inside(entry.name, name) and block.always_skips(step) for name, block in plan.blocks.items())
    ):
        return 0
    if entry.kind == "attention" and conventions.attention == "operands":
        return _product_bits(entry, plan, step, conventions)
    layer = plan.layers.get(entry.charged_as) if plan and entry.charged_as else None
    if layer is None or (entry.kind == "attention" and conventions.attention == "float"):
        return conventions.float_bits**2
    if entry.kind == "attention" and layer.skips(step or 0) and step:
        step = None  # the products still run on the projections' cached outputs: charge nominal bits
    return charged_width(layer.settings.w_bits, conventions) * _activation_bits(layer, step, conventions)


def _product_bits(entry: MacEntry, plan: Plan | None, step: int | None, conventions: BopsConventions) -> int:
    """Width × width of the operands an attention product runs on.

    A plain operand enters at its activation bits; a modulated one as its reconstruction â,
    which is float. When both are modulated, the product has the incremental form
    P_t = P_{t+1} + q_A·B̂ᵀ + Â·q_Bᵀ (each low-bit increment against the other operand's float
    reconstruction), charged when cheaper: an integer kernel would run that form."""
    attention, _, product = entry.name.rpartition(".")
    # an entry that is not one of attention's two products has no operands: float
    names = PRODUCTS.get(product, ("", ""))
    operands = [plan.layers.get(f"{attention}.{name}") if plan else None for name in names]
    widths = [_operand_width(operand, step, conventions) for operand in operands]
    direct = widths[0] * widths[1]
    if step != 0 and all(operand is not None and operand.settings.scheme == "modiff" for operand in operands):
        increments = [
            charged_width(operand.settings.a_bits if step is None else operand.a_bits_at(step), conventions)
            for operand in operands
            if operand is not None
        ]
        return min(direct, sum(increments) * conventions.float_bits)
    return direct


def _operand_width(operand: LayerPlan | None, step: int | None, conventions: BopsConventions) -> int:
    if operand is None:
        return conventions.float_bits
    s = operand.settings
    if s.scheme == "modiff" and not (step == 0 and s.first_step.kind == "quantized"):
        return conventions.float_bits  # the reconstruction â enters the product
    return charged_width(s.a_bits if step is None else operand.a_bits_at(step), conventions)


def charged_width(bits: int, conventions: BopsConventions) -> int:
    """The bit-width `bits` is charged at: float operands at `conventions.float_bits`."""
    return conventions.float_bits if bits == FLOAT_BITS else bits


def _activation_bits(layer: LayerPlan, step: int | None, conventions: BopsConventions) -> int:
    s = layer.settings
    if step == 0:
        bits = layer.a_bits_at(0)
        if (s.scheme == "modiff" and s.first_step.kind == "fp") or bits == 0:
            return conventions.float_bits  # the first call runs on the float input
        refinements = s.first_step.rounds if s.scheme == "modiff" else 0
        return charged_width(bits, conventions) * (1 + refinements)  # warm-up repeats the layer on the same input
    return charged_width(s.a_bits if step is None else layer.a_bits_at(step), conventions)


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".")
