"""MoDiff inside torchao's own workflow: `quantize_(model, MoDiffConfig(...))`.

`MoDiffConfig` is an `AOBaseConfig` registered with torchao's `register_quantize_module_handler`.
Like torchao's AWQ config, it wraps a base config: the handler applies `base_config` (any torchao
weight config) to the layer's weight, then marks the layer for MoDiff on its activations. The
model is bound on its first call or first modiff_quant function (see `modiff_quant.deferred`), so
an existing script changes one line:

    quantize_(unet, PrototypeInt4WeightOnlyConfig(group_size=32))
    quantize_(unet, MoDiffConfig(PrototypeInt4WeightOnlyConfig(group_size=32), a_bits=8))

torchao's `quantize_` visits Linear layers unless `filter_fn` says otherwise; `quantizable` also
takes the convolutions (most of a UNet's work), whose weights torchao's configs cannot hold:
they get MoDiff's own symmetric per-channel weights of `conv_w_bits` bits.

`recipe_to_fqn_config` turns a recipe into torchao's per-module mapping, `FqnToConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from modiff_quant.deferred import defer
from modiff_quant.layer_parts import CHANNEL_DIMS
from modiff_quant.quant import FLOAT_BITS, Granularity
from modiff_quant.recipe import LayerSettings, Recipe, load_recipe
from modiff_quant.registry import did_you_mean
from modiff_quant.settings import SETTING_PARSERS, FirstStep, TimestepGroups

from .torchao_int4 import torchao

_ao = torchao()
_AOBaseConfig = _ao.core.config.AOBaseConfig
_handlers = _ao.quantization.transform_module


@dataclass
class MoDiffConfig(_AOBaseConfig):
    """MoDiff around a torchao weight config.

    `base_config` quantizes a Linear weight (None: the weight stays float unless `options` set
    `w_bits`); a convolution's weight, which torchao's tensor subclasses cannot convolve, gets
    `conv_w_bits` bits (symmetric per channel) when `base_config` is given. `a_bits` and `scheme`
    are the recipe keys of the same names; `options` takes any other recipe key (`a_granularity`,
    `first_step`, `base_quantizer`, ...). Activations default to torchao's affine quantization
    (`base_quantizer: torchao_int4`).
    """

    base_config: Any = None  # AOBaseConfig | None
    a_bits: int | str = 8
    scheme: str = "modiff"
    options: dict[str, Any] = field(default_factory=dict)
    conv_w_bits: int | str = 8

    def settings(self) -> LayerSettings:
        """The layer settings this config stands for, validated like a recipe's."""
        if isinstance(self.base_config, MoDiffConfig) or (
            self.base_config is not None and not isinstance(self.base_config, _AOBaseConfig)
        ):
            raise TypeError(
                "MoDiffConfig.base_config must be a torchao weight config (an AOBaseConfig other than MoDiffConfig), "
                f"got {self.base_config!r}"
            )
        if self.base_config is not None and "w_bits" in self.options:
            raise ValueError("MoDiffConfig: base_config quantizes the weight, so options cannot set w_bits too")
        values: dict[str, Any] = {"w_bits": FLOAT_BITS, "base_quantizer": "torchao_int4"}
        for key, value in {"a_bits": self.a_bits, "scheme": self.scheme, **self.options}.items():
            parser = SETTING_PARSERS.get(key)
            if parser is None:
                suggestion = did_you_mean(key, list(SETTING_PARSERS))
                raise ValueError(f"MoDiffConfig: unknown option {key!r}{suggestion} (options are recipe keys)")
            try:
                values.update(parser(value))
            except ValueError as exc:
                raise ValueError(f"MoDiffConfig option {key!r}: {exc}") from None
        return LayerSettings().updated(values)


@_handlers.register_quantize_module_handler(MoDiffConfig)
def _apply_modiff(module: nn.Module, config: MoDiffConfig) -> nn.Module:
    if type(module) not in CHANNEL_DIMS:
        kinds = ", ".join(t.__name__ for t in CHANNEL_DIMS)
        raise TypeError(
            f"MoDiffConfig applies to exact {kinds} modules, got {type(module).__name__}; use filter_fn=quantizable"
        )
    settings = config.settings()
    if config.base_config is not None:
        if isinstance(module, nn.Linear):
            module = _handlers._QUANTIZE_CONFIG_HANDLER[type(config.base_config)](module, config.base_config)
        else:
            settings = settings.updated(SETTING_PARSERS["w_bits"](config.conv_w_bits))
    defer(module, settings)
    return module


def quantizable(module: nn.Module, fqn: str = "") -> bool:
    """A `quantize_` filter_fn for every layer MoDiff quantizes (exact Linear, Conv1d, Conv2d),
    not only torchao's default of Linear layers."""
    return type(module) in CHANNEL_DIMS


def recipe_to_fqn_config(recipe: Recipe | str, model: nn.Module) -> Any:
    """torchao's `FqnToConfig` for `recipe` on `model`: a `MoDiffConfig` per layer by exact name,
    None (torchao: leave alone) for layers with float weights and activations. Apply it with
    `quantize_(model, mapping, filter_fn=None)`; the result computes as `prepare(model, recipe)`.
    Block caching and 0-bit step schedules have no per-module torchao equivalent and are refused."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    plan = recipe.resolve(model)
    if plan.blocks:
        raise ValueError(
            f"recipe {plan.recipe.name}: cached blocks ({', '.join(plan.blocks)}) "
            "have no torchao per-module equivalent"
        )
    mapping: dict[str, Any] = {}
    for name, layer in plan.layers.items():
        if layer.zero_bit_steps or layer.bit_steps:
            raise ValueError(
                f"recipe {plan.recipe.name}: layer {name} has a bit schedule over steps ({layer.describe_steps()}), "
                "which torchao configs cannot express"
            )
        s = layer.settings
        if s.w_bits == FLOAT_BITS and s.a_bits == FLOAT_BITS:
            mapping[name] = None
            continue
        options = _recipe_values(s)
        mapping[name] = MoDiffConfig(a_bits=options.pop("a_bits"), scheme=options.pop("scheme"), options=options)
    return _ao.quantization.FqnToConfig(mapping)


def _recipe_values(settings: LayerSettings) -> dict[str, Any]:
    """`settings` as the recipe values that parse back into them."""
    values: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name == "base_quantizer_options":
            continue
        if f.name == "base_quantizer":
            value = {"name": value, **settings.base_quantizer_options}
        elif isinstance(value, (Granularity, FirstStep)):
            value = str(value)
        elif isinstance(value, TimestepGroups):
            value = {"count": value.count, "range": [value.low, value.high]}
        elif isinstance(value, Mapping):
            value = dict(value)
        if value is not None:
            values[f.name] = value
    return values
