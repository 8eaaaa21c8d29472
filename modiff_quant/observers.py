"""Observers: statistics gathered during `calibrate()` that become static quantization parameters.

Under the `modiff` scheme a layer's delta observer sees temporal differences (a_t − a_{t+1}),
not raw activations; the observers themselves are generic and only see tensors.

In a torch.distributed job each process observes its share of the calibration samples; the
processes' `statistics()` are then combined (`combine`) into what one process observing every
sample in global order would hold: min/max exactly, the moving average up to rounding, the L_p
search's sample exactly (its random keys depend on the observation stream, not on the process).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

from .quant import Granularity, QuantSpec, fake_quantize, qparams, stats_view
from .registry import OBSERVERS, register_observer

_STREAM: ContextVar[int] = ContextVar("observation_stream", default=0)


@contextmanager
def observation_stream(index: int) -> Iterator[None]:
    """Observations inside belong to stream `index` (a calibration sample): random choices an
    observer makes depend on the stream and the position in it, so they do not change with which
    process observes the stream."""
    token = _STREAM.set(index)
    try:
        yield
    finally:
        _STREAM.reset(token)


class Observer(nn.Module):
    """Collects statistics of a tensor stream; `qparams()` turns them into scale and zero point.

    A subclass that keeps more than the running min and max overrides `statistics` and `combine`
    too, or it cannot calibrate on several processes (`combines` is False)."""

    def __init__(self, spec: QuantSpec, *, channel_dim: int = 1, weight: bool = False) -> None:
        super().__init__()
        if spec.granularity.kind == "sample":
            raise ValueError(
                "granularity 'sample' has no static scale (batch items change); "
                "use the 'dynamic' base quantizer for it"
            )
        self.spec = spec
        self.channel_dim = channel_dim
        self.for_weight = weight
        self.register_buffer("lo", None)
        self.register_buffer("hi", None)

    @property
    def observed(self) -> bool:
        return self.lo is not None

    def observe(self, x: Tensor) -> None:
        view, dims = self._view(x)
        self._update(view.amin(dims, keepdim=True).float(), view.amax(dims, keepdim=True).float())

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def qparams(self) -> tuple[Tensor, Tensor]:
        if not self.observed:
            raise RuntimeError("no data observed: run the sampling loop inside modiff_quant.calibrate(model)")
        return qparams(self.lo, self.hi, self.spec)

    @property
    def combines(self) -> bool:
        """Whether `combine` knows all this observer's statistics (a subclass that changes how it
        observes must say how its statistics combine)."""
        for cls in type(self).__mro__:
            if cls is Observer or "combine" in vars(cls):
                return True
            if "observe" in vars(cls) or "_update" in vars(cls):
                return False
        return False

    def statistics(self) -> dict[str, Any]:
        """What this process observed, picklable (tensors on the CPU)."""
        return {"lo": _cpu(self.lo), "hi": _cpu(self.hi)}

    def combine(self, parts: Sequence[dict[str, Any]], device: torch.device) -> None:
        """Become the observer that saw every process's observations, `parts` in rank order (each
        process observed a contiguous block of the streams), its statistics on `device`."""
        seen = [part for part in parts if part["lo"] is not None]
        self.lo = self.hi = None
        if seen:
            self.lo = torch.stack([part["lo"] for part in seen]).amin(0).to(device)
            self.hi = torch.stack([part["hi"] for part in seen]).amax(0).to(device)

    def _view(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        return stats_view(x.detach(), self.spec.granularity, channel_dim=self.channel_dim, weight=self.for_weight)


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum: no clipping at all, so outliers set the scale."""


@register_observer("ema_minmax")
class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-call min/max: single outlier calls matter less."""

    def __init__(self, spec: QuantSpec, *, channel_dim: int = 1, weight: bool = False, momentum: float = 0.9) -> None:
        super().__init__(spec, channel_dim=channel_dim, weight=weight)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self._updates = 0
        self._first: tuple[Tensor, Tensor] | None = None

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        self._updates += 1
        if self.lo is None:
            self.lo, self.hi = lo, hi
            self._first = (lo, hi)
        else:
            self.lo = self.momentum * self.lo + (1 - self.momentum) * lo
            self.hi = self.momentum * self.hi + (1 - self.momentum) * hi

    def statistics(self) -> dict[str, Any]:
        first = self._first or (None, None)
        return {**super().statistics(), "updates": self._updates, "first": (_cpu(first[0]), _cpu(first[1]))}

    def combine(self, parts: Sequence[dict[str, Any]], device: torch.device) -> None:
        """The average is linear in the per-call values: a block of n calls started from its own
        first value f instead of the running value r carries over as avg + m^n (r − f). Equal to
        one process's average up to float rounding, not bit for bit."""
        self.lo = self.hi = self._first = None
        self._updates = 0
        for part in parts:
            if not part["updates"]:
                continue
            lo, hi = part["lo"], part["hi"]
            if self.lo is not None:
                carry = self.momentum ** part["updates"]
                lo = lo + carry * (self.lo - part["first"][0])
                hi = hi + carry * (self.hi - part["first"][1])
            else:
                self._first = part["first"]
            self.lo, self.hi = lo, hi
            self._updates += part["updates"]
        if self.lo is not None:
            self.lo, self.hi = self.lo.to(device), self.hi.to(device)


@register_observer("mse")
class LpSearchObserver(Observer):
    """Clipping range chosen by a grid search minimising the L_p quantization error.

    Keeps a uniform random sample (seeded reservoir) of at most `max_values` observed values per
    scale group (plus each group's exact min and max when the sample dropped values, weighted as
    single values), then tries `grid` shrink factors of the min-max range in [min_ratio, 1]
    (p = 2 is MSE; PTQ4DM uses 2.4). Memory stays bounded however long calibration runs.
    """

    def __init__(
        self,
        spec: QuantSpec,
        *,
        channel_dim: int = 1,
        weight: bool = False,
        p: float = 2.0,
        grid: int = 100,
        min_ratio: float = 0.1,
        max_values: int = 8192,
    ) -> None:
        super().__init__(spec, channel_dim=channel_dim, weight=weight)
        if p <= 0 or grid < 1 or not 0.0 < min_ratio <= 1.0 or max_values < 1:
            raise ValueError(
                f"invalid L_p search options: p={p}, grid={grid}, min_ratio={min_ratio}, max_values={max_values}"
            )
        self.p, self.grid, self.min_ratio, self.max_values = p, grid, min_ratio, max_values
        self._values: Tensor | None = None  # [groups, kept values]
        self._seen = 0  # values observed per group, kept or not
        self._keys: Tensor | None = None  # one uniform key per kept column; the smallest keys are kept
        self._stream: int | None = None
        self._generator = torch.Generator()

    def observe(self, x: Tensor) -> None:
        super().observe(x)
        rows = self._rows(x).float().cpu()
        self._seen += rows.shape[1]
        stream = _STREAM.get()
        if stream != self._stream:  # a stream's keys are the same whichever process observes it
            self._stream = stream
            self._generator.manual_seed(stream)
        keys = torch.rand(rows.shape[1], generator=self._generator, dtype=torch.float64)  # 53 bits: no ties
        if self._values is not None:
            rows, keys = torch.cat([self._values, rows], dim=1), torch.cat([self._keys, keys])
        self._keep(rows, keys)

    def _keep(self, values: Tensor, keys: Tensor) -> None:
        """The columns with the `max_values` smallest keys (all, in order, when there are fewer)."""
        if keys.numel() > self.max_values:
            keep = keys.topk(self.max_values, largest=False).indices
            values, keys = values[:, keep], keys[keep]
        self._values, self._keys = values, keys

    def statistics(self) -> dict[str, Any]:
        return {**super().statistics(), "values": self._values, "keys": self._keys, "seen": self._seen}

    def combine(self, parts: Sequence[dict[str, Any]], device: torch.device) -> None:
        """Min and max as the base; the sample is the smallest keys of every process's sample,
        which is the sample one process would keep: bit for bit the same."""
        super().combine(parts, device)
        sampled = [part for part in parts if part["values"] is not None]
        self._seen = sum(part["seen"] for part in parts)
        self._values = self._keys = None
        if sampled:
            values = torch.cat([part["values"] for part in sampled], dim=1)
            self._keep(values, torch.cat([part["keys"] for part in sampled]))

    def _rows(self, x: Tensor) -> Tensor:
        """[groups, values]: one row per scale group, in the element order of a keepdim statistic."""
        view, dims = self._view(x)
        kept = [d for d in range(view.dim()) if d not in dims]
        return view.permute(*kept, *dims).reshape(math.prod(view.shape[d] for d in kept), -1)

    def qparams(self) -> tuple[Tensor, Tensor]:
        if not self.observed:
            return super().qparams()
        shape = self.lo.shape
        lo, hi = self.lo.reshape(-1, 1), self.hi.reshape(-1, 1)
        values = self._values.to(lo.device)
        weights = torch.ones(values.shape[1], device=lo.device)
        kept = values.shape[1]
        if self._seen > kept:  # the sample may miss the extremes: add them, each weighted as one
            # of the values seen (a kept value stands for seen / kept), so clipping them is costed fairly
            values = torch.cat([values, lo, hi], dim=1)
            weights = torch.cat([weights, torch.full((2,), kept / self._seen, device=lo.device)])
        best_err = torch.full_like(lo, float("inf"))
        best_scale, best_zero = qparams(lo, hi, self.spec)
        for ratio in torch.linspace(1.0, self.min_ratio, self.grid).tolist():
            scale, zero = qparams(lo * ratio, hi * ratio, self.spec)
            err = ((fake_quantize(values, scale, zero, self.spec) - values).abs().pow(self.p) * weights).sum(
                dim=1, keepdim=True
            )
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        return best_scale.reshape(shape), best_zero.reshape(shape)


def _cpu(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.cpu()


def check_observer(name: str, options: Mapping[str, Any]) -> None:
    """Build observer `name` with `options` once, so that a bad name or option fails when a
    recipe loads rather than at convert."""
    OBSERVERS.get(name)(QuantSpec(8, True, Granularity("tensor")), weight=True, **options)


def weight_qparams(
    weight: Tensor, spec: QuantSpec, observer: str = "minmax", **options: object
) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a weight from one pass of a registered observer: `minmax` keeps
    every outlier, `mse` searches the clipping range of each scale group (output channel)."""
    found = OBSERVERS.get(observer)(spec, channel_dim=0, weight=True, **options)
    found.observe(weight)
    return found.qparams()
