"""Recipe value types: per-layer settings, first-step policies and step schedules.

Each recipe key has one parser that turns a YAML value into a typed value or raises
ValueError with a message the loader prefixes with file:line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .quant import (
    FLOAT_BITS,
    MAX_BITS,
    MIN_BITS,
    SKIP_BITS,
    Granularity,
    QuantSpec,
    count_suffix,
)
from .quoting import shown
from .state_storage import STATE_FORMATS, StateFormat

MAX_WARMUP_ROUNDS = 64
"""`warmup:N` runs N extra modulated updates on the first call of every trajectory."""

MAX_TIMESTEP_GROUPS = 100
"""Each group is a set of calibrated scales per layer: more groups cost memory, calibration and
prepare time linearly (1,000 took 12 s to prepare), and each needs calibration data."""


@dataclass(frozen=True)
class FirstStep:
    """What the first call of a trajectory does before there is a previous step to subtract.

    `fp`: full-precision input (the reference code); `quantized`: the raw input through a raw
    activation quantizer; `warmup:N`: `quantized`, then N modulated updates on the same input
    (paper App. D.5), which shrink the first step's quantization error.
    """

    kind: Literal["fp", "quantized", "warmup"]
    rounds: int = 0

    @classmethod
    def parse(cls, value: Any) -> FirstStep:
        if value in ("fp", "quantized"):
            return cls(value)
        rounds = count_suffix(value, "warmup:")
        if rounds is not None and rounds <= MAX_WARMUP_ROUNDS:
            return cls("warmup", rounds)
        raise ValueError(f"expected fp, quantized or warmup:N (N in 1-{MAX_WARMUP_ROUNDS}), got {shown(value)}")

    def __str__(self) -> str:
        return f"warmup:{self.rounds}" if self.kind == "warmup" else self.kind


@dataclass(frozen=True)
class StepSchedule:
    """Steps a rule applies to: 0-based model calls of a trajectory (per CFG branch).

    Either an explicit set of steps, or the range [start, stop) taking every `every`-th step, or
    with `refresh_every: N` every step of the range except each N-th (DeepCache's cache interval:
    a skipped block is refreshed on step start, start + N, ...).
    """

    explicit: frozenset[int] | None = None
    start: int = 0
    stop: int | None = None
    every: int = 1
    refresh_every: int = 0

    @classmethod
    def parse(cls, value: Any) -> StepSchedule:
        if value == "all":
            return cls()
        if isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value):
            return cls(explicit=frozenset(value))
        if (
            isinstance(value, Mapping)
            and value
            and set(value) <= {"start", "stop", "every", "refresh_every"}
            and not {"every", "refresh_every"} <= set(value)
        ):
            start, stop, every, refresh = (
                value.get("start", 0),
                value.get("stop"),
                value.get("every", 1),
                value.get("refresh_every", 0),
            )
            valid_step = (
                _is_int(every)
                and every >= 1
                and _is_int(refresh)
                and (refresh == 0 and "refresh_every" not in value or refresh >= 2)
            )
            if _is_int(start) and start >= 0 and valid_step and (stop is None or _is_int(stop) and stop > start):
                return cls(start=start, stop=stop, every=every, refresh_every=refresh)
        raise ValueError(
            "expected all, a list of step indices, or a mapping with start/stop and every or refresh_every (N >= 2), "
            f"got {shown(value)}"
        )

    def contains(self, step: int) -> bool:
        if self.explicit is not None:
            return step in self.explicit
        in_range = step >= self.start and (self.stop is None or step < self.stop)
        if self.refresh_every:
            return in_range and (step - self.start) % self.refresh_every != 0
        return in_range and (step - self.start) % self.every == 0

    def __str__(self) -> str:
        if self.explicit is not None:
            return str(sorted(self.explicit))
        if (self.start, self.stop, self.every, self.refresh_every) == (0, None, 1, 0):
            return "all"
        every = (
            f" refreshed every {self.refresh_every}"
            if self.refresh_every
            else f" every {self.every}"
            if self.every > 1
            else ""
        )
        return f"{self.start}..{'' if self.stop is None else self.stop - 1}{every}"


@dataclass(frozen=True)
class TimestepGroups:
    """Separate static activation scales per range of timestep values.

    Activation ranges shift with the noise level; calibrated scales can follow them (as in
    TDQ / Q-Diffusion's time-dependent analyses). Groups split [low, high) evenly; they are keyed
    by the timestep value, not the step index, so a 20-step calibration serves 100-step sampling.
    """

    count: int = 1
    low: float = 0.0
    high: float = 1000.0

    @classmethod
    def parse(cls, value: Any) -> TimestepGroups:
        if _is_count(value):
            return cls(value)
        if isinstance(value, Mapping) and set(value) == {"count", "range"}:
            count, span = value["count"], value["range"]
            if (
                _is_count(count)
                and isinstance(span, list)
                and len(span) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in span)
            ):
                low, high = float(span[0]), float(span[1])
                if low < high and math.isfinite(high - low):
                    return cls(count, low, high)
        raise ValueError(
            f"expected a group count N in 1-{MAX_TIMESTEP_GROUPS} (timesteps 0-1000) or {{count: N, range: [low, "
            f"high]}} with finite low < high, got {shown(value)}"
        )

    def index(self, timestep: float | None) -> int:
        """The group of a timestep (group 0 when the model call carried none)."""
        if timestep is None:
            return 0
        return min(max(int((timestep - self.low) / (self.high - self.low) * self.count), 0), self.count - 1)

    def describe(self, group: int) -> str:
        width = (self.high - self.low) / self.count
        return f"timestep group {group} (t in [{self.low + group * width:g}, {self.low + (group + 1) * width:g}))"


@dataclass(frozen=True)
class LayerSettings:
    """Everything a recipe decides for one Linear/Conv layer (defaults: W8A8 dynamic MoDiff)."""

    w_bits: int = 8
    a_bits: int = 8
    scheme: str = "modiff"
    base_quantizer: str = "dynamic"
    base_quantizer_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    w_granularity: Granularity = Granularity("channel")
    a_granularity: Granularity = Granularity("tensor")
    w_symmetric: bool = True
    w_bias_correction: bool = False  # shift the bias by the weight error's mean effect (needs calibration data)
    a_symmetric: bool = False
    first_step: FirstStep = FirstStep("fp")
    error_compensation: bool = True
    timestep_groups: TimestepGroups = TimestepGroups()
    split: bool | None = None  # None: as the base quantizer prefers (`split_shortcuts`)
    input_cache: StateFormat = "full"  # how â (or the previous input) is kept between steps
    output_cache: StateFormat = "full"  # how ô is kept between steps

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(self.w_bits, self.w_symmetric, self.w_granularity)

    @property
    def corrects_bias(self) -> bool:
        """`w_bias_correction` where there is a weight error to correct (quantized weights)."""
        return self.w_bias_correction and self.w_bits != FLOAT_BITS

    def activation_spec(self, bits: int | None = None) -> QuantSpec:
        """The activation spec at `bits` (default `a_bits`, or a width a step schedule sets); 0 bits
        never quantize, so they get a float spec."""
        bits = self.a_bits if bits is None else bits
        return QuantSpec(FLOAT_BITS if bits == SKIP_BITS else bits, self.a_symmetric, self.a_granularity)

    def updated(self, values: Mapping[str, Any]) -> LayerSettings:
        return replace(self, **values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_TIMESTEP_GROUPS


def _bits(allow_skip: bool) -> Callable[[Any], int]:
    lowest = SKIP_BITS if allow_skip else MIN_BITS

    def parse(value: Any) -> int:
        if value == "float":
            return FLOAT_BITS
        if _is_int(value) and (MIN_BITS <= value <= MAX_BITS or value == FLOAT_BITS or value == lowest):
            return value
        skip = f"{SKIP_BITS} (skip), " if allow_skip else ""
        raise ValueError(f"expected {skip}{MIN_BITS}-{MAX_BITS}, {FLOAT_BITS} or float, got {shown(value)}")

    return parse


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {shown(value)}")


def _name(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"expected a name, got {shown(value)}")


def _granularity(allowed: tuple[str, ...]) -> Callable[[Any], Granularity]:
    def parse(value: Any) -> Granularity:
        granularity = Granularity.parse(value) if isinstance(value, str) else None
        if granularity is None or granularity.kind not in allowed:
            raise ValueError(f"expected {', '.join(allowed)} or group:N, got {shown(value)}")
        return granularity

    return parse


def _state_format(value: Any) -> StateFormat:
    if value in STATE_FORMATS:
        return value
    raise ValueError(f"expected one of {', '.join(STATE_FORMATS)}, got {shown(value)}")


def _base_quantizer(value: Any) -> dict[str, Any]:
    """`name` or `{name: ..., <option>: ...}` -> the two settings it stands for."""
    if isinstance(value, str) and value:
        return {"base_quantizer": value, "base_quantizer_options": {}}
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return {
            "base_quantizer": value["name"],
            "base_quantizer_options": {k: v for k, v in value.items() if k != "name"},
        }
    raise ValueError(f"expected a base quantizer name or a mapping with 'name' and its options, got {shown(value)}")


# recipe key -> parser returning {LayerSettings field: value}
SETTING_PARSERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "w_bits": lambda v: {"w_bits": _bits(allow_skip=False)(v)},
    "a_bits": lambda v: {"a_bits": _bits(allow_skip=True)(v)},
    "scheme": lambda v: {"scheme": _name(v)},
    "base_quantizer": _base_quantizer,
    "w_granularity": lambda v: {"w_granularity": _granularity(("tensor", "channel", "group"))(v)},
    "a_granularity": lambda v: {"a_granularity": _granularity(("tensor", "sample", "channel", "group"))(v)},
    "w_symmetric": lambda v: {"w_symmetric": _bool(v)},
    "w_bias_correction": lambda v: {"w_bias_correction": _bool(v)},
    "a_symmetric": lambda v: {"a_symmetric": _bool(v)},
    "first_step": lambda v: {"first_step": FirstStep.parse(v)},
    "error_compensation": lambda v: {"error_compensation": _bool(v)},
    "timestep_groups": lambda v: {"timestep_groups": TimestepGroups.parse(v)},
    "split": lambda v: {"split": _bool(v)},
    "input_cache": lambda v: {"input_cache": _state_format(v)},
    "output_cache": lambda v: {"output_cache": _state_format(v)},
}
