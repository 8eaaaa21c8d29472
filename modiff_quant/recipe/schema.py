"""Recipe files (schema version 1): parsing, validation and `extends`.

A recipe is data: it is validated completely before any model is touched, and every error
names the file, the line and the key, with the nearest valid spelling.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..registry import BASE_QUANTIZERS, SCHEMES, UnknownNameError, did_you_mean
from .settings import SETTING_PARSERS, LayerSettings, StepSchedule
from .source import LocatedDict, LocatedList, Location, RecipeError, read_located

if TYPE_CHECKING:
    from .resolve import Plan

SCHEMA_VERSION = 1
TOP_KEYS = ("version", "name", "description", "extends", "strict", "defaults", "rules")
RULE_KEYS = ("match", "steps", "skip_threshold", *SETTING_PARSERS)


@dataclass(frozen=True)
class Rule:
    """One ordered rule: the modules it matches, the settings it sets, optionally on which steps."""

    patterns: tuple[str, ...]
    settings: Mapping[str, Any]  # LayerSettings field -> value, only what the rule sets
    setting_locations: Mapping[str, Location]  # LayerSettings field -> line of its key
    steps: StepSchedule | None
    location: Location
    skip_threshold: float | None = None  # blocks: skip only while the input changed less than this (relative)

    def matches(self, name: str, module: nn.Module) -> bool:
        """Exact module name, class name, or `re:` + a regex that must match the whole name."""
        for pattern in self.patterns:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], name):
                    return True
            elif pattern in (name, type(module).__name__):
                return True
        return False

    def describe(self) -> str:
        return ", ".join(self.patterns)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: defaults plus ordered rules (later rules override earlier ones per key)."""

    name: str
    description: str
    strict: bool
    defaults: LayerSettings
    default_locations: Mapping[str, Location] = field(repr=False)
    rules: tuple[Rule, ...]
    source: str

    def resolve(self, model: nn.Module) -> Plan:
        """Match the rules against `model`: the per-layer and per-block plan, validated."""
        from .resolve import resolve

        return resolve(self, model)

    def with_base_quantizer(self, name: str) -> Recipe:
        """The same recipe with every layer on base quantizer `name` (its default options): the
        one-line swap of `--base-quantizer`."""
        _check_base_quantizer_options(name, {}, None)
        return self.overriding({"base_quantizer": name, "base_quantizer_options": {}}, f"{self.name}+{name}")

    def overriding(self, settings: Mapping[str, Any], name: str) -> Recipe:
        """The same recipe, named `name`, with `settings` (LayerSettings fields) on every layer:
        set in the defaults and removed from every rule, so that no rule overrides them."""
        rules = tuple(
            replace(rule, settings={k: v for k, v in rule.settings.items() if k not in settings}, setting_locations={k: v for k, v in rule.setting_locations.items() if k not in settings})
            for rule in self.rules
        )
        locations = {k: v for k, v in self.default_locations.items() if k not in settings}
        return replace(self, name=name, defaults=self.defaults.updated(settings), default_locations=locations, rules=rules)

    def explain(self, model: nn.Module) -> str:
        """Per layer: the settings that apply and the recipe lines they came from."""
        return self.resolve(model).explain()


def shipped_recipes() -> list[str]:
    """Names of the recipes installed with the package."""
    return sorted(p.name.removesuffix(".yaml") for p in files("modiff_quant.recipes").iterdir() if p.name.endswith(".yaml"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML file, or a shipped recipe by name (e.g. `w8a4-modiff`)."""
    return _load(_locate(str(path_or_name), Path.cwd()), ())


def _locate(reference: str, base_dir: Path) -> Path:
    for candidate in (base_dir / reference, base_dir / f"{reference}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = files("modiff_quant.recipes") / f"{reference}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = shipped_recipes()
    raise FileNotFoundError(f"recipe {reference!r} is neither a file nor a shipped recipe{did_you_mean(reference, names)} (shipped: {', '.join(names)})")


def _load(path: Path, chain: tuple[Path, ...]) -> Recipe:
    chain = (*chain, path.resolve())
    data = read_located(path)
    if not isinstance(data, LocatedDict):
        raise RecipeError(Location(str(path), 1), "a recipe must be a YAML mapping")
    _check_keys(data, TOP_KEYS, "top-level key")
    version = data.get("version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise RecipeError(data.where("version"), f"'version: {SCHEMA_VERSION}' is required (got {version!r})")
    base = None
    if "extends" in data:
        if not isinstance(data["extends"], str):
            raise RecipeError(data.where("extends"), "extends must name a recipe file or shipped recipe")
        try:
            base_path = _locate(data["extends"], path.parent)
        except FileNotFoundError as exc:
            raise RecipeError(data.where("extends"), str(exc)) from None
        if base_path.resolve() in chain:
            raise RecipeError(data.where("extends"), f"extends cycle: {' -> '.join(p.name for p in (*chain, base_path.resolve()))}")
        base = _load(base_path, chain)
    defaults, default_locations = _parse_defaults(data, base)
    rules = _parse_rules(data)
    strict = data.get("strict", base.strict if base else False)
    if not isinstance(strict, bool):
        raise RecipeError(data.where("strict"), f"strict must be true or false, got {strict!r}")
    return Recipe(
        name=_text(data, "name", path.stem),
        description=_text(data, "description", base.description if base else ""),
        strict=strict,
        defaults=defaults,
        default_locations=default_locations,
        rules=(*(base.rules if base else ()), *rules),
        source=str(path),
    )


def _text(data: LocatedDict, key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise RecipeError(data.where(key), f"{key} must be a string, got {value!r}")
    return value


def _check_keys(mapping: LocatedDict, allowed: tuple[str, ...], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise RecipeError(mapping.where(key), f"unknown {what} {key!r}{did_you_mean(str(key), list(allowed))} (allowed: {', '.join(allowed)})")


def _parse_settings(mapping: LocatedDict) -> tuple[dict[str, Any], dict[str, Location]]:
    values: dict[str, Any] = {}
    locations: dict[str, Location] = {}
    for key, parse in SETTING_PARSERS.items():
        if key not in mapping:
            continue
        try:
            parsed = parse(mapping[key])
        except ValueError as exc:
            raise RecipeError(mapping.where(key), f"{key}: {exc}") from None
        values.update(parsed)
        locations.update(dict.fromkeys(parsed, mapping.where(key)))
    for key, registry in (("scheme", SCHEMES), ("base_quantizer", BASE_QUANTIZERS)):
        if key in values:
            try:
                registry.get(values[key])
            except UnknownNameError as exc:
                raise RecipeError(locations[key], f"{key}: {exc}") from None
    if "base_quantizer" in values:
        _check_base_quantizer_options(values["base_quantizer"], values["base_quantizer_options"], locations["base_quantizer"])
    return values, locations


def _check_base_quantizer_options(name: str, options: Mapping[str, Any], location: Location | None) -> None:
    """Build the base quantizer once so wrong options fail here, with the recipe line."""
    quantizer = BASE_QUANTIZERS.get(name)
    try:
        quantizer(**options)
    except (TypeError, ValueError, UnknownNameError) as exc:
        accepted = ", ".join(inspect.signature(quantizer).parameters) or "no options"
        raise RecipeError(location, f"base quantizer '{name}' rejects its options ({exc}); it accepts: {accepted}") from None


def _parse_defaults(data: LocatedDict, base: Recipe | None) -> tuple[LayerSettings, dict[str, Location]]:
    defaults = base.defaults if base else LayerSettings()
    locations = dict(base.default_locations) if base else {}
    section = data.get("defaults", LocatedDict())
    if not isinstance(section, LocatedDict):
        raise RecipeError(data.where("defaults"), "defaults must be a mapping of settings")
    _check_keys(section, tuple(SETTING_PARSERS), "setting")
    values, value_locations = _parse_settings(section)
    return defaults.updated(values), {**locations, **value_locations}


def _parse_rules(data: LocatedDict) -> list[Rule]:
    section = data.get("rules", LocatedList())
    if not isinstance(section, LocatedList):
        raise RecipeError(data.where("rules"), "rules must be a list of mappings")
    return [_parse_rule(item, location) for item, location in zip(section, section.item_locations)]


def _parse_rule(item: Any, location: Location) -> Rule:
    if not isinstance(item, LocatedDict):
        raise RecipeError(location, f"a rule must be a mapping with 'match', got {item!r}")
    _check_keys(item, RULE_KEYS, "rule key")
    if "match" not in item:
        raise RecipeError(location, "rule has no 'match'")
    patterns = item["match"] if isinstance(item["match"], list) else [item["match"]]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise RecipeError(item.where("match"), f"match must be a name, class name or 're:<regex>', or a list of them; got {item['match']!r}")
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise RecipeError(item.where("match"), f"invalid regex {pattern!r}: {exc}") from None
    settings, setting_locations = _parse_settings(item)
    steps = None
    if "steps" in item:
        try:
            steps = StepSchedule.parse(item["steps"])
        except ValueError as exc:
            raise RecipeError(item.where("steps"), f"steps: {exc}") from None
        if settings != {"a_bits": 0}:
            raise RecipeError(item.where("steps"), "a rule with steps may only set a_bits: 0 (0-bit skipping on a step schedule)")
    threshold = item.get("skip_threshold")
    if "skip_threshold" in item:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise RecipeError(item.where("skip_threshold"), f"skip_threshold: expected a positive number (relative input change), got {threshold!r}")
        if settings != {"a_bits": 0}:
            raise RecipeError(item.where("skip_threshold"), "a rule with skip_threshold may only set a_bits: 0 (adaptive 0-bit skipping of a block)")
    if not settings:
        raise RecipeError(location, "rule sets nothing: add a setting such as a_bits or w_bits")
    return Rule(patterns=tuple(patterns), settings=settings, setting_locations=setting_locations, steps=steps, location=item.location, skip_threshold=threshold)
