"""`modiff-quant gate`: quality regression as data, for users' CI and ours.

A baselines YAML lists settings (model, recipe, base quantizer, sampler, steps, samples, seed),
the metrics recorded for each with a tolerance, and comparisons between settings: plain W8A4
must stay far worse than MoDiff W8A4, which proves the gate can fail. `--update` records the
current values (tolerances kept) and refuses to when a comparison fails.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import distributed
from .atomic_files import replace_file
from .evaluate import CALIBRATION_SAMPLES, POSITIVE, SEEDS, Harness, integer_error
from .quoting import shown
from .recipe.source import LocatedDict, LocatedList, Location, RecipeError, read_located
from .registry import UnknownNameError
from .samplers import SAMPLERS
from .serialization import LoadError

LOWER_IS_BETTER = ("fd", "fd_fp", "fd_to_fp", "eps_rel_error")
HIGHER_IS_BETTER = ("psnr_vs_fp",)
DEFAULT_TOLERANCES: dict[str, float | str] = {
    "psnr_vs_fp": 1.0,
    "fd": "15%",
    "fd_fp": "15%",
    "fd_to_fp": "15%",
    "eps_rel_error": "15%",
}
HARNESS_KEYS = ("model", "sampler", "steps", "samples", "seed", "batch_size")
RUN_KEYS = (*HARNESS_KEYS, "recipe", "base_quantizer", "calibration_samples")
INTEGER_KEYS = {
    "steps": POSITIVE,
    "samples": POSITIVE,
    "batch_size": POSITIVE,
    "calibration_samples": POSITIVE,
    "seed": SEEDS,
}


@dataclass(frozen=True)
class Check:
    """One line of the gate's table: a metric against its baseline, or a comparison."""

    setting: str
    metric: str
    baseline: float | None  # None for comparisons
    value: float | None
    limit: str
    passed: bool


@dataclass(frozen=True)
class _Comparison:
    metric: str
    worse: str
    better: str
    amount: float  # a ratio for lower-is-better metrics, a margin for higher-is-better ones


def run_gate(path: Path, *, update: bool = False, execution: dict[str, Any] | None = None) -> tuple[list[Check], bool]:
    """Evaluate a baselines file; returns the checks and whether new values were recorded.
    `execution` holds Harness options (device, dtype, compile_mode) every setting runs with: the
    same tolerances hold there."""
    settings, lines, comparisons = _parse(path)
    results = _evaluate(settings, lines, execution or {})  # a setting that raised: its error text
    checks = [
        check
        for name, setting in settings.items()
        for check in _metric_checks(name, setting["metrics"], results[name], update)
    ]
    compared = [_compare(c, results) for c in comparisons]
    ran = {name: result for name, result in results.items() if isinstance(result, dict)}
    recorded = update and len(ran) == len(results) and all(check.passed for check in compared)
    if recorded and distributed.is_main():  # every process measured the same: one writes
        _record(path, ran)
    return checks + compared, recorded


def _parse(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Location], list[_Comparison]]:
    """The settings (defaults applied), the line of each, and the comparisons; every value checked."""
    data = read_located(path)
    where = Location(str(path), 1)
    if (
        not isinstance(data, LocatedDict)
        or data.get("version") != 1
        or not isinstance(data.get("settings"), LocatedDict)
    ):
        raise RecipeError(where, "a baselines file needs 'version: 1' and a 'settings' mapping")
    _check_keys(data, ("version", "defaults", "settings", "comparisons"), "key")
    defaults = data.get("defaults") or LocatedDict()
    if not isinstance(defaults, LocatedDict):
        raise RecipeError(data.where("defaults"), f"defaults must be a mapping of {', '.join(RUN_KEYS)}")
    _check_run_keys(defaults, "default")
    settings, lines = {}, {}
    for name, setting in data["settings"].items():
        if not isinstance(setting, LocatedDict) or not isinstance(setting.get("metrics"), LocatedDict):
            raise RecipeError(data["settings"].where(name), f"setting '{name}' needs a mapping with 'metrics'")
        _check_run_keys(setting, f"key of setting '{name}'", "metrics")
        for metric, recorded in setting["metrics"].items():
            _check_metric(metric, recorded, setting["metrics"].where(metric))
        settings[name] = {**defaults, **setting}
        settings[name]["recipe"] = recipe_beside(settings[name].get("recipe"), path)
        lines[name] = data["settings"].where(name)
        if "model" not in settings[name]:
            raise RecipeError(
                data["settings"].where(name), f"setting '{name}' names no model (set 'model' in it or in defaults)"
            )
    comparisons = data.get("comparisons") or LocatedList()
    if not isinstance(comparisons, LocatedList):
        raise RecipeError(data.where("comparisons"), "comparisons must be a list")
    parsed = [_parse_comparison(c, where, settings) for c, where in zip(comparisons, comparisons.item_locations)]
    return settings, lines, parsed


def recipe_beside(recipe: Any, baselines: Path) -> Any:
    """A setting's recipe as the gate runs it: a `.yaml` file is found relative to the baselines
    file; shipped names and null stay as they are."""
    if isinstance(recipe, str) and recipe.endswith((".yaml", ".yml")):
        return str(baselines.parent / recipe)
    return recipe


def _check_keys(mapping: LocatedDict, allowed: tuple[str, ...], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise RecipeError(mapping.where(key), f"unknown {what} '{key}' (allowed: {', '.join(allowed)})")


def _check_run_keys(mapping: LocatedDict, what: str, *extra: str) -> None:
    """Known keys only, each with a value the harness takes: the whole file is checked before
    the first setting is sampled."""
    _check_keys(mapping, (*RUN_KEYS, *extra), what)
    for key, value in mapping.items():
        if key in INTEGER_KEYS:
            error = integer_error(value, INTEGER_KEYS[key])
        elif key == "sampler":
            error = None if value in SAMPLERS else f"expected one of {', '.join(SAMPLERS)}, got {shown(value)}"
        elif key in ("model", "recipe", "base_quantizer"):
            unset = value is None and key != "model"  # a recipe or base quantizer may be left out with null
            error = None if isinstance(value, str) or unset else f"expected a name or a path, got {shown(value)}"
        else:
            continue
        if error:
            raise RecipeError(mapping.where(key), f"{key}: {error}")


def _check_metric(metric: Any, recorded: Any, where: Location) -> None:
    """`{value: number or null, tolerance: number or 'N%'}` for a known metric."""
    if (
        metric not in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER)
        or not isinstance(recorded, dict)
        or "value" not in recorded
    ):
        known = ", ".join((*LOWER_IS_BETTER, *HIGHER_IS_BETTER))
        raise RecipeError(where, f"metric {shown(metric)} needs {{value: ..., tolerance: ...}}; metrics: {known}")
    for key in recorded:
        if key not in ("value", "tolerance"):
            raise RecipeError(where, f"metric '{metric}': unknown key {shown(key)} (allowed: value, tolerance)")
    value = recorded["value"]
    if value is not None and _number(value) is None:
        raise RecipeError(
            where,
            f"metric '{metric}': value must be a finite number, or null until --update records one; "
            f"got {shown(value)}",
        )
    _slack(recorded.get("tolerance", DEFAULT_TOLERANCES[metric]), 1.0, where)


def _parse_comparison(spec: Any, where: Location, settings: dict[str, Any]) -> _Comparison:
    """`{metric, worse, better, ratio}` for lower-is-better metrics (worse >= ratio x better), or
    `{metric, worse, better, margin}` for PSNR (better leads by >= margin dB)."""
    kind = "ratio" if isinstance(spec, dict) and spec.get("metric") in LOWER_IS_BETTER else "margin"
    if (
        not isinstance(spec, dict)
        or set(spec) != {"metric", "worse", "better", kind}
        or spec["metric"] not in (*LOWER_IS_BETTER, *HIGHER_IS_BETTER)
    ):
        raise RecipeError(
            where,
            f"a comparison is {{metric, worse, better, ratio}} for {', '.join(LOWER_IS_BETTER)} "
            f"or {{metric, worse, better, margin}} for psnr_vs_fp; got {shown(spec)}",
        )
    for name in (spec["worse"], spec["better"]):
        if not isinstance(name, str) or name not in settings:
            raise RecipeError(
                where, f"comparison names unknown setting {shown(name)} (settings: {', '.join(settings)})"
            )
    amount = _number(spec[kind])
    if amount is None or (kind == "ratio" and amount <= 0):
        positive = "positive " if kind == "ratio" else ""
        raise RecipeError(where, f"{kind} must be a {positive}finite number, got {shown(spec[kind])}")
    return _Comparison(spec["metric"], spec["worse"], spec["better"], amount)


def _number(value: Any) -> float | None:
    """`value` as a float when it is a finite YAML number (not a bool, a string or .nan)."""
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def _evaluate(
    settings: dict[str, dict[str, Any]], lines: dict[str, Location], execution: dict[str, Any]
) -> dict[str, dict[str, Any] | str]:
    """Metrics per setting; settings sharing model, noise and sampler share one FP reference.
    Every model is loaded and every recipe checked before the first one is sampled; a setting
    whose run then raises gets its error text instead, so that its checks fail and the rest run."""
    harnesses: dict[tuple[Any, ...], Harness] = {}
    recipes = {}
    for name, setting in settings.items():
        key = tuple(setting.get(k) for k in HARNESS_KEYS)
        with _in_setting(name, lines[name]):
            if key not in harnesses:
                given = {k: v for k, v in zip(HARNESS_KEYS, key) if v is not None}  # the rest: Harness defaults
                harnesses[key] = Harness(**given, **execution)
            recipe = setting.get("recipe")
            if recipe is None:  # full precision
                recipes[name] = None
            else:
                calibration_samples = setting.get("calibration_samples", CALIBRATION_SAMPLES)
                recipes[name] = harnesses[key].check(recipe, setting.get("base_quantizer"), calibration_samples)
    results: dict[str, dict[str, Any] | str] = {}
    for name, setting in settings.items():
        harness = harnesses[tuple(setting.get(k) for k in HARNESS_KEYS)]
        try:
            results[name], _ = harness.evaluate(
                recipes[name], calibration_samples=setting.get("calibration_samples", CALIBRATION_SAMPLES)
            )
        except distributed.ProcessGroupError:
            raise  # the job is broken, not the setting: every later setting would wait on it too
        except Exception as exc:  # a regression that crashes one setting must not hide the others'
            results[name] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    return results


@contextmanager
def _in_setting(name: str, where: Location) -> Iterator[None]:
    """Errors of a setting's model or values with the baselines file's line (a recipe's own errors
    already name the recipe file and line)."""
    try:
        yield
    except RecipeError:
        raise
    except (ValueError, FileNotFoundError, LoadError, UnknownNameError) as exc:
        raise RecipeError(where, f"setting '{name}': {exc}") from exc


def _slack(spec: Any, baseline: float, where: Location | None = None) -> float:
    """Absolute slack of a tolerance: a number >= 0 (metric units) or 'N%' of the baseline."""
    percent = isinstance(spec, str) and spec.endswith("%")
    number = _number(_float(spec[:-1]) if percent else spec)
    if number is None or number < 0:
        raise RecipeError(where, f"tolerance must be a number >= 0 or 'N%', got {shown(spec)}")
    return abs(baseline) * number / 100 if percent else number


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _metric_checks(name: str, metrics: dict[str, Any], result: dict[str, Any] | str, update: bool) -> list[Check]:
    checks = []
    for metric, recorded in metrics.items():
        baseline = recorded["value"]
        if isinstance(result, str):
            checks.append(Check(name, metric, baseline, None, result, False))
            continue
        value = result[metric]
        spec = recorded.get("tolerance", DEFAULT_TOLERANCES[metric])
        if update:
            checks.append(Check(name, metric, baseline, value, "recorded", value is not None))
        elif baseline is None or value is None:
            missing = "unrecorded: run with --update" if baseline is None else "no value"
            checks.append(Check(name, metric, baseline, value, missing, False))
        else:
            slack = _slack(spec, baseline)
            if metric in HIGHER_IS_BETTER:
                bound = baseline - slack
                passed = value >= bound
                limit = f">= {bound:.4g} ({spec})"
            else:
                bound = baseline + slack
                passed = value <= bound
                limit = f"<= {bound:.4g} ({spec})"
            checks.append(Check(name, metric, baseline, value, limit, passed))
    return checks


def _compare(c: _Comparison, results: dict[str, dict[str, Any] | str]) -> Check:
    setting = f"{c.worse} vs {c.better}"
    failed = [name for name in dict.fromkeys((c.worse, c.better)) if isinstance(results[name], str)]
    if failed:
        return Check(setting, c.metric, None, None, f"{' and '.join(failed)} raised", False)
    w, b = results[c.worse][c.metric], results[c.better][c.metric]
    if w is None or b is None:
        return Check(setting, c.metric, None, None, "no value", False)
    if c.metric in HIGHER_IS_BETTER:
        return Check(
            setting,
            c.metric,
            None,
            b - w,
            f"{c.better} leads by >= {c.amount:g} ({b:.4g} vs {w:.4g})",
            b - w >= c.amount,
        )
    ratio = w / b if b > 0 else math.inf
    return Check(
        setting,
        c.metric,
        None,
        ratio,
        f"{c.worse} >= {c.amount:g} x {c.better} ({w:.4g} vs {b:.4g})",
        ratio >= c.amount,
    )


def _record(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Rewrite the file with the current values (6 significant digits; tolerances kept; comments
    are not preserved), atomically."""
    plain = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, setting in plain["settings"].items():
        setting["metrics"] = copy.deepcopy(setting["metrics"])  # YAML aliases would share one dict
        for metric, recorded in setting["metrics"].items():
            value = results[name][metric]
            recorded["value"] = None if value is None else float(f"{value:.6g}")
            recorded.setdefault("tolerance", DEFAULT_TOLERANCES[metric])
    replace_file(
        path, yaml.safe_dump(plain, sort_keys=False).encode()
    )  # an interrupted update leaves the old baselines


def format_checks(checks: list[Check]) -> str:
    rows = [("setting", "metric", "baseline", "now", "change", "limit", "status")]
    for c in checks:
        change = "-" if c.baseline is None or c.value is None else f"{c.value - c.baseline:+.4g}"
        rows.append(
            (c.setting, c.metric, _num(c.baseline), _num(c.value), change, c.limit, "ok" if c.passed else "FAIL")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
