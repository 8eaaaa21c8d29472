"""Schemes: what a quantized layer computes from its input across the steps of a trajectory.

`modiff` quantizes the temporal difference of the input against its running reconstruction and
accumulates the output (MoDiff, with error compensation); `plain` is the base quantizer alone,
the baseline MoDiff is compared with. Both reuse the cached output on 0-bit steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Container
from typing import ClassVar, Protocol

from torch import Tensor

from .base_quantizer import ActivationQuantizer
from .quant import Codes
from .registry import register_scheme
from .settings import LayerSettings
from .state_storage import LayerState

RAW, DELTA = "raw", "delta"
"""Activation quantizer roles: raw inputs (plain, quantized first step) and temporal differences."""


class LayerPlanView(Protocol):
    """What a scheme reads of its layer's plan."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> LayerSettings: ...

    @property
    def has_skips(self) -> bool: ...


class SchemeLayer(Protocol):
    """What a scheme may ask of the quantized layer it computes for: its plan, which activation
    roles it has, its quantizers, and its operation A on float or integer-coded inputs."""

    @property
    def plan(self) -> LayerPlanView: ...

    @property
    def act_quantizers(self) -> Container[str]: ...

    def quantizer(self, role: str) -> ActivationQuantizer: ...

    def quantize_input(self, role: str, x: Tensor) -> tuple[Tensor, Codes | None]: ...

    def apply_op(self, x: Tensor, *, bias: bool) -> Tensor: ...

    def apply_quantized(
        self, q: Tensor, codes: Codes | None, *, bias: bool, accumulate: Tensor | None = None
    ) -> Tensor: ...


class Scheme(ABC):
    """Strategy object of one quantized layer; plugins register subclasses with `register_scheme`."""

    needs_previous_step: ClassVar[bool] = False
    """Whether calibration must replay the step before each calibration sample (temporal differences)."""

    @abstractmethod
    def activation_roles(self, settings: LayerSettings) -> tuple[str, ...]:
        """Names of the activation quantizers the layer needs (built by its base quantizer)."""

    @abstractmethod
    def forward(self, layer: SchemeLayer, x: Tensor, state: LayerState, skip: bool) -> Tensor:
        """Quantized output; `skip` is true on the layer's 0-bit steps."""

    @abstractmethod
    def calibrate(self, layer: SchemeLayer, x: Tensor, state: LayerState, skip: bool, observe: bool) -> Tensor:
        """Float output; when `observe`, each activation quantizer is first shown what it will quantize."""

    @abstractmethod
    def prime(self, layer: SchemeLayer, x: Tensor, state: LayerState) -> Tensor:
        """Output of a step computed exactly, leaving the state a following quantized step continues
        from (reconstruction trains on one step at a time, after its predecessor)."""


@register_scheme("modiff")
class ModiffScheme(Scheme):
    """o_t = ô + A(Q(a_t − â)) without bias, â ← â + Q(·), ô ← o_t (paper Eq. 13-14).

    Without error compensation (ablation) the raw previous input replaces â (paper Eq. 7).
    """

    needs_previous_step = True

    def activation_roles(self, settings: LayerSettings) -> tuple[str, ...]:
        return (DELTA,) if settings.first_step.kind == "fp" else (RAW, DELTA)

    def forward(self, layer: SchemeLayer, x: Tensor, state: LayerState, skip: bool) -> Tensor:
        if not state.has_output:
            return self._first_call(layer, x, state)
        o_hat = state.cached_output(layer.plan.name)
        if skip:
            return o_hat
        q, codes = layer.quantize_input(DELTA, x - state.a_hat)
        if layer.plan.settings.error_compensation:
            q = state.advance(q)  # the same q (and codes) unless â is kept lossy, which integer execution refuses
        else:
            state.a_hat = x
        return state.remember(layer.apply_quantized(q, codes, bias=False, accumulate=o_hat))

    def _first_call(self, layer: SchemeLayer, x: Tensor, state: LayerState) -> Tensor:
        settings = layer.plan.settings
        compensate = settings.error_compensation
        # a copy of the input: â must not be the tensor another layer keeps as its ô, or the caller's
        # latents (changed in place by some sampling loops); compiled code would also guard on the alias
        a_hat = x.clone() if settings.first_step.kind == "fp" else layer.quantizer(RAW)(x)
        if compensate:
            state.a_hat = a_hat
            a_hat = state.a_hat  # as stored: the output must be A of exactly what later steps subtract from
        output = layer.apply_op(a_hat, bias=True)
        for _ in range(settings.first_step.rounds):
            q = layer.quantizer(DELTA)(x - a_hat)
            if compensate:
                q = state.advance(q)
            a_hat = a_hat + q
            output = output + layer.apply_op(q, bias=False)
        if not compensate:
            state.a_hat = x
        return state.remember(output)

    def calibrate(self, layer: SchemeLayer, x: Tensor, state: LayerState, skip: bool, observe: bool) -> Tensor:
        """The delta observer sees Δ_t = a_t − a_{t+1} (float); the raw one sees first inputs."""
        if not state.started:
            if observe and RAW in layer.act_quantizers:
                layer.quantizer(RAW).observe(x)
            state.a_hat = x
        elif not skip:
            if observe:
                layer.quantizer(DELTA).observe(x - state.a_hat)
            state.a_hat = x
        return layer.apply_op(x, bias=True)

    def prime(self, layer: SchemeLayer, x: Tensor, state: LayerState) -> Tensor:
        state.a_hat = x
        return state.remember(layer.apply_op(x, bias=True))


@register_scheme("plain")
class PlainScheme(Scheme):
    """o = A(Q(a)) + b: post-training quantization without modulation."""

    def activation_roles(self, settings: LayerSettings) -> tuple[str, ...]:
        return (RAW,)

    def forward(self, layer: SchemeLayer, x: Tensor, state: LayerState, skip: bool) -> Tensor:
        if skip and state.has_output:
            return state.cached_output(layer.plan.name)
        output = layer.apply_quantized(*layer.quantize_input(RAW, x), bias=True)
        return state.remember(output) if layer.plan.has_skips else output

    def calibrate(self, layer: SchemeLayer, x: Tensor, state: LayerState, skip: bool, observe: bool) -> Tensor:
        if observe:
            layer.quantizer(RAW).observe(x)
        return layer.apply_op(x, bias=True)

    def prime(self, layer: SchemeLayer, x: Tensor, state: LayerState) -> Tensor:
        output = layer.apply_op(layer.quantizer(RAW)(x), bias=True)
        return state.remember(output) if layer.plan.has_skips else output
