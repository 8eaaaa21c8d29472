"""Recipes and plans written back as plain data: the inverse of the parsers.

`save_quantized` keeps the recipe a model was built from as one flat YAML file (the `extends`
chain merged), so the saved model loads without the files the recipe came from, and the
resolved plan as JSON, so a load can say exactly which layer of the model differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from ..settings import LayerSettings, StepSchedule, TimestepGroups
from .resolve import LayerPlan, Plan
from .schema import SCHEMA_VERSION, Recipe, Rule

_STRINGIFIED = ("w_granularity", "a_granularity", "first_step")
"""Settings whose recipe value is the string form of their parsed value."""


def recipe_document(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a YAML-ready mapping that `load_recipe` parses back to the same recipe."""
    return {
        "version": SCHEMA_VERSION,
        "name": recipe.name,
        "description": recipe.description,
        "strict": recipe.strict,
        "defaults": settings_document(_all_settings(recipe.defaults)),
        "rules": [_rule_document(rule) for rule in recipe.rules],
    }


def plan_document(plan: Plan) -> dict[str, Any]:
    """Per layer and block, everything the recipe decided: two plans of the same recipe on two
    models are equal exactly when the models are quantized alike."""
    return {
        "layers": {name: _layer_document(layer) for name, layer in plan.layers.items()},
        "blocks": {
            name: {
                "type": block.module_type,
                "steps": schedule_document(block.schedule),
                "skip_threshold": block.skip_threshold,
            }
            for name, block in plan.blocks.items()
        },
    }


def _layer_document(layer: LayerPlan) -> dict[str, Any]:
    settings = _all_settings(layer.settings)
    if not settings["w_bias_correction"]:  # absent when off, as in plans saved before it existed
        del settings["w_bias_correction"]
    document = {
        "type": layer.module_type,
        "settings": settings_document(settings),
        "zero_bit_steps": [schedule_document(steps) for steps in layer.zero_bit_steps],
        "adopted_from": layer.adopted_from,
    }
    if layer.bit_steps:  # absent without a bit schedule, as in plans saved before schedules existed
        document["a_bits_steps"] = [
            {"steps": schedule_document(steps), "a_bits": bits} for steps, bits in layer.bit_steps
        ]
    return document


def settings_document(values: Mapping[str, Any]) -> dict[str, Any]:
    """LayerSettings fields -> recipe keys and YAML values (`split: None` means "not set")."""
    document: dict[str, Any] = {}
    for key, value in values.items():
        if key == "base_quantizer_options":
            continue
        if key == "base_quantizer":
            options = {
                option: _plain(setting, f"base_quantizer option {option!r}")
                for option, setting in values.get("base_quantizer_options", {}).items()
            }
            document[key] = {"name": value, **options} if options else value
        elif key in _STRINGIFIED:
            document[key] = str(value)
        elif isinstance(value, TimestepGroups):
            document[key] = {"count": value.count, "range": [value.low, value.high]}
        elif value is not None:
            document[key] = value
    return document


def _plain(value: Any, what: str) -> Any:
    """An option value as YAML/JSON data that reads back to an option of the same meaning: the
    recipe parser's line-remembering mappings and lists as plain ones (YAML's safe dumper refuses
    subclasses), tuples as lists, classes (e.g. the Brevitas injectors of adopted layers) as
    "module:Class", which the plugin resolves by name."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, type):
        return f"{value.__module__}:{value.__qualname__}"
    if isinstance(value, Mapping) and all(key is None or type(key) in (bool, int, float, str) for key in value):
        return {key: _plain(item, f"{what}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{what}[{index}]") for index, item in enumerate(value)]
    raise ValueError(
        f"{what}: {type(value).__name__} {value!r:.80} is not recipe data "
        "(mappings, lists, numbers, strings, booleans, None or classes)"
    )


def schedule_document(schedule: StepSchedule) -> Any:
    """A step schedule as the `steps` value that parses back to it."""
    if schedule.explicit is not None:
        return sorted(schedule.explicit)
    if schedule == StepSchedule():
        return "all"
    document: dict[str, int] = {"start": schedule.start}
    if schedule.stop is not None:
        document["stop"] = schedule.stop
    if schedule.refresh_every:
        document["refresh_every"] = schedule.refresh_every
    else:
        document["every"] = schedule.every
    return document


def _all_settings(settings: LayerSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(LayerSettings)}


def _rule_document(rule: Rule) -> dict[str, Any]:
    document: dict[str, Any] = {"match": list(rule.patterns), **settings_document(rule.settings)}
    if rule.steps is not None:
        document["steps"] = schedule_document(rule.steps)
    if rule.skip_threshold is not None:
        document["skip_threshold"] = rule.skip_threshold
    return document
