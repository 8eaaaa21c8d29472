"""Recipe files (schema version 1): parsing, validation and `extends`.

A recipe is data: it is validated completely before any model is touched, and every error
names the file, the line and the key, with the nearest valid spelling.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import re2
from torch import nn

from ..quoting import clip, shown
from ..registry import BASE_QUANTIZERS, SCHEMES, UnknownNameError, did_you_mean
from ..settings import SETTING_PARSERS, LayerSettings, StepSchedule
from .option_types import option_problem
from .source import (
    Budget,
    LocatedDict,
    LocatedList,
    Location,
    RecipeError,
    load_located,
    read_located,
)

if TYPE_CHECKING:
    from ..base_quantizer import BaseQuantizer
    from .resolve import Plan

SCHEMA_VERSION = 1
TOP_KEYS = ("version", "name", "description", "extends", "strict", "defaults", "rules")
RULE_KEYS = ("match", "steps", "skip_threshold", *SETTING_PARSERS)

MAX_EXTENDS = 16
"""Recipes in one `extends` chain, the first included."""

MAX_PATTERN_CHARS = 1_000
"""Characters of one `re:` pattern."""

MAX_REGEXES = 256
"""`re:` patterns in a recipe and the files it extends: each compiled regex may hold up to
`_RE2_MEMORY` bytes, and compiling a large one takes about a millisecond."""

_RE2_MEMORY = 64 << 10
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error comes back as an exception; RE2 would also print it to stderr
# a larger program is refused ("pattern too large"); matching stays linear in any case
_RE2_OPTIONS.max_mem = _RE2_MEMORY


def _compile_pattern(pattern: str) -> Any:
    """The RE2 regex of a `re:` pattern (RE2 matches in time linear in the name, whatever the
    pattern); ValueError, naming the problem, for a pattern RE2 refuses or one over the limits."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"pattern {shown(pattern, 40)} has {len(pattern):,} characters; the limit is {MAX_PATTERN_CHARS:,}"
        )
    try:
        return re2.compile(pattern.removeprefix("re:"), _RE2_OPTIONS)
    except re2.error as exc:
        problem = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(
            f"invalid regex {shown(pattern)}: {clip(problem, 200)} (regexes are RE2 syntax: no backreferences or "
            f"lookarounds, at most {_RE2_MEMORY >> 10} KiB compiled)"
        ) from None


@dataclass(frozen=True)
class Rule:
    """One ordered rule: the modules it matches, the settings it sets, optionally on which steps."""

    patterns: tuple[str, ...]
    settings: Mapping[str, Any]  # LayerSettings field -> value, only what the rule sets
    setting_locations: Mapping[str, Location]  # LayerSettings field -> line of its key
    steps: StepSchedule | None
    location: Location
    skip_threshold: float | None = None  # blocks: skip only while the input changed less than this (relative)
    regexes: tuple[Any, ...] = field(init=False, repr=False, compare=False)  # per pattern: its compiled regex, or None

    def __post_init__(self) -> None:
        """Compile the `re:` patterns once (ValueError for one RE2 refuses), not once per module matched."""
        object.__setattr__(
            self, "regexes", tuple(_compile_pattern(p) if p.startswith("re:") else None for p in self.patterns)
        )

    def matches(self, name: str, module: nn.Module) -> bool:
        """Exact module name, class name, or `re:` + a regex that must match the whole name."""
        for pattern, regex in zip(self.patterns, self.regexes):
            if regex is not None:
                if regex.fullmatch(name):
                    return True
            elif pattern in (name, type(module).__name__):
                return True
        return False

    def describe(self, limit: int = 3) -> str:
        """The patterns, the first `limit` of them for a long list (each shortened)."""
        shown_patterns = ", ".join(clip(p) for p in self.patterns[:limit])
        return f"{shown_patterns}, ... {len(self.patterns)} in all" if len(self.patterns) > limit else shown_patterns


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
    adapted: tuple[str, ...] = ()  # what a base-quantizer swap changed, and why (see with_base_quantizer)

    def resolve(self, model: nn.Module) -> Plan:
        """Match the rules against `model`: the per-layer and per-block plan, validated."""
        from .resolve import resolve

        return resolve(self, model)

    def with_base_quantizer(self, name: str) -> Recipe:
        """The same recipe with every layer on base quantizer `name` (its default options): the
        one-line swap of `--base-quantizer`.

        Settings the new method cannot serve (its `adaptations`, e.g. per-sample scales for a
        calibrated method) are changed to what it serves where the recipe inherited them from a
        shipped recipe or the defaults, and listed in `adapted` (and by `explain`); one set in the
        user's own recipe file stays as written, and RecipeError names its line.
        """
        _check_base_quantizer_options(name, {}, None)
        swapped = self.overriding({"base_quantizer": name, "base_quantizer_options": {}}, f"{self.name}+{name}")
        return _adapted(swapped, BASE_QUANTIZERS.get(name)())

    def overriding(self, settings: Mapping[str, Any], name: str) -> Recipe:
        """The same recipe, named `name`, with `settings` (LayerSettings fields) on every layer:
        set in the defaults and removed from every rule, so that no rule overrides them."""
        rules = tuple(
            replace(
                rule,
                settings={k: v for k, v in rule.settings.items() if k not in settings},
                setting_locations={k: v for k, v in rule.setting_locations.items() if k not in settings},
            )
            for rule in self.rules
        )
        locations = {k: v for k, v in self.default_locations.items() if k not in settings}
        return replace(
            self, name=name, defaults=self.defaults.updated(settings), default_locations=locations, rules=rules
        )

    def explain(self, model: nn.Module) -> str:
        """Per layer: the settings that apply and the recipe lines they came from."""
        return self.resolve(model).explain()


def _adapted(recipe: Recipe, quantizer: BaseQuantizer) -> Recipe:
    """`recipe` with the settings `quantizer` cannot serve changed, in the defaults and in each
    layer rule (merged with the defaults), where they came from no file of the user's."""
    notes: list[str] = []

    def changes(settings: LayerSettings, locations: Mapping[str, Location], where: str) -> dict[str, Any]:
        found = {}
        for key, (value, reason) in quantizer.adaptations(settings.weight_spec(), settings.activation_spec()).items():
            asked, location = getattr(settings, key), locations.get(key)
            if location is not None and not _shipped(location):
                raise RecipeError(
                    location,
                    f"{key} {asked} is set here, and base quantizer '{settings.base_quantizer}' cannot serve it "
                    f"({reason}); remove the line to let the swap use {key} {value}",
                )
            found[key] = value
            origin = "the library default" if location is None else f"{Path(location.file).name}:{location.line}"
            notes.append(f"{where}: {key} {asked} (from {origin}) -> {value}: {reason}")
        return found

    defaults = recipe.defaults.updated(changes(recipe.defaults, recipe.default_locations, "defaults"))
    rules = []
    for rule in recipe.rules:
        if rule.steps is None and rule.skip_threshold is None:  # rules with a schedule set a_bits only
            locations = {**recipe.default_locations, **rule.setting_locations}
            found = changes(defaults.updated(rule.settings), locations, f"rule '{rule.describe()}' ({rule.location})")
            rule = replace(rule, settings={**rule.settings, **found}) if found else rule
        rules.append(rule)
    return replace(recipe, defaults=defaults, rules=tuple(rules), adapted=tuple(notes))


def _shipped(location: Location) -> bool:
    """Whether a recipe line is in a recipe installed with the package (not the user's own)."""
    return Path(location.file).resolve().parent == Path(str(files("modiff_quant.recipes"))).resolve()


def shipped_recipes() -> list[str]:
    """Names of the recipes installed with the package."""
    return sorted(
        p.name.removesuffix(".yaml") for p in files("modiff_quant.recipes").iterdir() if p.name.endswith(".yaml")
    )


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a recipe from a YAML file, or a shipped recipe by name (e.g. `w8a4-modiff`).

    Raises RecipeError (file:line) for any content that is not a valid recipe, and
    FileNotFoundError when `path_or_name` is neither a file nor a shipped name."""
    return _load(_locate(str(path_or_name), Path.cwd()), (), Budget())


def _locate(reference: str, base_dir: Path) -> Path:
    try:
        for candidate in (base_dir / reference, base_dir / f"{reference}.yaml"):
            if candidate.is_file():
                return candidate
        shipped = files("modiff_quant.recipes") / f"{reference}.yaml"
        if shipped.is_file():
            return Path(str(shipped))
    except OSError as exc:  # e.g. a name too long for the file system
        raise FileNotFoundError(f"recipe {shown(reference)} is not a usable path: {exc.strerror or exc}") from None
    names = shipped_recipes()
    raise FileNotFoundError(
        f"recipe {shown(reference)} is neither a file nor a shipped recipe{did_you_mean(reference, names)} (shipped: "
        f"{', '.join(names)})"
    )


def flat_recipe(text: str, path: Path) -> Recipe:
    """A recipe from text already read and checked (a checkpoint's `recipe.yaml`), which must not
    extend another: it stands alone and reaches no other file."""
    data = load_located(text, str(path))
    if isinstance(data, LocatedDict) and "extends" in data:
        raise RecipeError(
            data.where("extends"),
            "a saved recipe is flat (save_quantized() merges the extends chain), but this one extends another",
        )
    return _recipe(data, path, (), Budget())


def _load(path: Path, chain: tuple[Path, ...], budget: Budget) -> Recipe:
    return _recipe(read_located(path, budget), path, chain, budget)


def _recipe(data: Any, path: Path, chain: tuple[Path, ...], budget: Budget) -> Recipe:
    chain = (*chain, path.resolve())
    if not isinstance(data, LocatedDict):
        raise RecipeError(Location(str(path), 1), "a recipe must be a YAML mapping")
    _check_keys(data, TOP_KEYS, "top-level key")
    version = data.get("version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise RecipeError(data.where("version"), f"'version: {SCHEMA_VERSION}' is required (got {shown(version)})")
    base = None
    if "extends" in data:
        base = _load_base(data, path, chain, budget)
    defaults, default_locations = _parse_defaults(data, base)
    rules = _parse_rules(data, MAX_REGEXES - _regex_count(base.rules if base else ()))
    strict = data.get("strict", base.strict if base else False)
    if not isinstance(strict, bool):
        raise RecipeError(data.where("strict"), f"strict must be true or false, got {shown(strict)}")
    return Recipe(
        name=_text(data, "name", path.stem),
        description=_text(data, "description", base.description if base else ""),
        strict=strict,
        defaults=defaults,
        default_locations=default_locations,
        rules=(*(base.rules if base else ()), *rules),
        source=str(path),
    )


def _load_base(data: LocatedDict, path: Path, chain: tuple[Path, ...], budget: Budget) -> Recipe:
    """The recipe that `data` extends, loaded with the budget left."""
    where = data.where("extends")
    if not isinstance(data["extends"], str):
        raise RecipeError(where, "extends must name a recipe file or shipped recipe")
    try:
        base_path = _locate(data["extends"], path.parent)
    except FileNotFoundError as exc:
        raise RecipeError(where, str(exc)) from None
    if base_path.resolve() in chain:
        raise RecipeError(where, f"extends cycle: {_chain(*chain, base_path.resolve())}")
    if len(chain) >= MAX_EXTENDS:
        raise RecipeError(where, f"extends chain longer than {MAX_EXTENDS} recipes: {_chain(*chain, base_path)}")
    return _load(base_path, chain, budget)


def _chain(*paths: Path) -> str:
    names = [clip(p.name, 40) for p in paths]
    return " -> ".join(names if len(names) <= 6 else [*names[:3], "...", *names[-2:]])


def _text(data: LocatedDict, key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise RecipeError(data.where(key), f"{key} must be a string, got {shown(value)}")
    return value


def _check_keys(mapping: LocatedDict, allowed: tuple[str, ...], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise RecipeError(
                mapping.where(key),
                f"unknown {what} {shown(key)}{did_you_mean(str(key), list(allowed))} (allowed: {', '.join(allowed)})",
            )


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
        _check_base_quantizer_options(
            values["base_quantizer"], values["base_quantizer_options"], locations["base_quantizer"]
        )
    return values, locations


def _check_base_quantizer_options(name: str, options: Mapping[str, Any], location: Location | None) -> None:
    """Check each option against the type annotation of its constructor parameter, then build the
    base quantizer once, so that wrong options fail here, with the recipe line, not at calibration."""
    quantizer = BASE_QUANTIZERS.get(name)
    for option, value in options.items():
        problem = option_problem(quantizer, option, value)
        if problem:
            raise RecipeError(location, f"base quantizer '{name}' option {shown(option)}: {problem}")
    try:
        quantizer(**options)
    except (TypeError, ValueError, UnknownNameError) as exc:
        accepted = ", ".join(inspect.signature(quantizer).parameters) or "no options"
        raise RecipeError(
            location, f"base quantizer '{name}' rejects its options ({clip(str(exc), 300)}); it accepts: {accepted}"
        ) from None


def _parse_defaults(data: LocatedDict, base: Recipe | None) -> tuple[LayerSettings, dict[str, Location]]:
    defaults = base.defaults if base else LayerSettings()
    locations = dict(base.default_locations) if base else {}
    section = data.get("defaults", LocatedDict())
    if not isinstance(section, LocatedDict):
        raise RecipeError(data.where("defaults"), "defaults must be a mapping of settings")
    _check_keys(section, tuple(SETTING_PARSERS), "setting")
    values, value_locations = _parse_settings(section)
    return defaults.updated(values), {**locations, **value_locations}


def _parse_rules(data: LocatedDict, regexes_left: int) -> list[Rule]:
    section = data.get("rules", LocatedList())
    if not isinstance(section, LocatedList):
        raise RecipeError(data.where("rules"), "rules must be a list of mappings")
    rules = []
    for item, location in zip(section, section.item_locations):
        rule = _parse_rule(item, location, regexes_left)
        regexes_left -= _regex_count([rule])
        rules.append(rule)
    return rules


def _regex_count(rules: Sequence[Rule]) -> int:
    return sum(regex is not None for rule in rules for regex in rule.regexes)


def _parse_rule(item: Any, location: Location, regexes_left: int) -> Rule:
    if not isinstance(item, LocatedDict):
        raise RecipeError(location, f"a rule must be a mapping with 'match', got {shown(item)}")
    _check_keys(item, RULE_KEYS, "rule key")
    if "match" not in item:
        raise RecipeError(location, "rule has no 'match'")
    patterns = item["match"] if isinstance(item["match"], list) else [item["match"]]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise RecipeError(
            item.where("match"),
            f"match must be a name, class name or 're:<regex>', or a list of them; got {shown(item['match'])}",
        )
    if sum(p.startswith("re:") for p in patterns) > regexes_left:
        raise RecipeError(
            item.where("match"), f"more than {MAX_REGEXES} 're:' patterns in the recipe and the files it extends"
        )
    settings, setting_locations = _parse_settings(item)
    steps = None
    if "steps" in item:
        try:
            steps = StepSchedule.parse(item["steps"])
        except ValueError as exc:
            raise RecipeError(item.where("steps"), f"steps: {exc}") from None
        if set(settings) != {"a_bits"}:
            raise RecipeError(
                item.where("steps"),
                "a rule with steps may only set a_bits (a bit schedule over steps; 0 skips the layer on them)",
            )
    threshold = item.get("skip_threshold")
    if "skip_threshold" in item:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise RecipeError(
                item.where("skip_threshold"),
                f"skip_threshold: expected a positive number (relative input change), got {shown(threshold)}",
            )
        if settings != {"a_bits": 0}:
            raise RecipeError(
                item.where("skip_threshold"),
                "a rule with skip_threshold may only set a_bits: 0 (adaptive 0-bit skipping of a block)",
            )
    if not settings:
        raise RecipeError(location, "rule sets nothing: add a setting such as a_bits or w_bits")
    try:
        return Rule(
            patterns=tuple(patterns),
            settings=settings,
            setting_locations=setting_locations,
            steps=steps,
            location=item.location,
            skip_threshold=threshold,
        )
    except ValueError as exc:  # a pattern RE2 refuses
        raise RecipeError(item.where("match"), f"match: {exc}") from None
