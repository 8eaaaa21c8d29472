"""The outcome of calibration on disk, so that a second run with the same model, recipe and
calibration data skips observing and reconstruction (minutes for AdaRound) and loads it."""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..atomic_files import replace_file
from ..calibration.record import CalibrationRecord
from ..layer_parts import check_calibration_state
from ..layers import QuantizedLayer
from ..quoting import clip
from ..tensors import tensor_bytes

FORMAT = "1"


class CalibrationCache:
    """One file per fingerprint of (library version, float model, per-layer plan, calibration record)."""

    def __init__(
        self,
        directory: str | Path,
        model: nn.Module,
        layers: Sequence[QuantizedLayer],
        blocks: Sequence[object],
        record: CalibrationRecord,
    ) -> None:
        self.layers = tuple(layers)
        self.path = Path(directory) / f"{_fingerprint(model, self.layers, blocks, record)}.safetensors"

    def load(self) -> bool:
        """Restore every layer from the file; False when there is none yet, or when it is damaged
        (checked in full before any layer takes its state: a miss, with a warning, recomputes it)."""
        if not self.path.is_file():
            return False
        try:
            states = self._checked_states(load_file(self.path))
        except (SafetensorError, OSError, ValueError) as exc:
            warnings.warn(
                f"modiff_quant: calibration cache {self.path} is damaged ({clip(str(exc), 300)}); calibrating again",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        for layer in self.layers:
            layer.load_calibration_state(states[layer.plan.name])
        return True

    def _checked_states(self, tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Each layer's state from the file, tried on standalone quantizers (see `check_calibration_state`)."""
        states: dict[str, dict[str, Tensor]] = {layer.plan.name: {} for layer in self.layers}
        for key, value in tensors.items():
            name, _, part = key.partition("/")
            if name not in states:
                raise ValueError(f"tensor {clip(key)!r} belongs to no calibrated layer")
            states[name][part] = value
        for layer in self.layers:
            state = states[layer.plan.name]
            expected = {"weight": layer.plan.has_weight and not layer.packed, "bias": layer.corrects_bias}
            for key, kept in expected.items():
                if kept:
                    _check_parameter(layer.plan.name, key, state.get(key), getattr(layer, key))
                elif key in state:
                    raise ValueError(f"layer '{layer.plan.name}': a {key} is saved, but this layer keeps none")
            try:
                check_calibration_state(
                    layer.plan.settings,
                    layer.plan.module_type,
                    layer,
                    state,
                    f"{layer.plan.name}/",
                    layer.plan.activation_widths,
                )
            except ValueError as exc:
                raise ValueError(f"layer '{layer.plan.name}': {exc}") from None
        return states

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{layer.plan.name}/{key}": value.detach().cpu().contiguous()
            for layer in self.layers
            for key, value in layer.calibration_state().items()
        }
        contents = save(tensors, metadata={"format": FORMAT})
        replace_file(self.path, contents)  # a concurrent reader never sees half a file


def _check_parameter(layer: str, key: str, saved: Tensor | None, parameter: Tensor) -> None:
    if (
        saved is None
        or saved.shape != parameter.shape
        or saved.dtype != parameter.dtype
        or not bool(saved.isfinite().all())
    ):
        raise ValueError(
            f"layer '{layer}': its {key} is missing or not a finite {parameter.dtype} {list(parameter.shape)}"
        )


def _fingerprint(
    model: nn.Module, layers: Sequence[QuantizedLayer], blocks: Sequence[object], record: CalibrationRecord
) -> str:
    """Everything calibration depends on; `blocks` describes the cached blocks (their 0-bit steps)."""
    digest = hashlib.sha256(f"modiff-quant cache {FORMAT}".encode())
    digest.update(_code_digest(tuple(sorted({inspect.getfile(type(layer.base_quantizer)) for layer in layers}))))
    for layer in layers:
        digest.update(
            repr((layer.plan.name, layer.plan.settings, layer.plan.zero_bit_steps, layer.plan.bit_steps)).encode()
        )
    digest.update(repr(list(blocks)).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor_bytes(tensor))
    digest.update(record.fingerprint().encode())
    return digest.hexdigest()[:32]


@cache
def _code_digest(backend_files: tuple[str, ...]) -> bytes:
    """The source of the library and of the base quantizers in use: a changed calibration
    algorithm must not load results an older version computed (the version number alone would
    miss changes made between releases)."""
    core = sorted(Path(__file__).resolve().parents[1].rglob("*.py"))
    digest = hashlib.sha256()
    for path in [*core, *map(Path, backend_files)]:
        digest.update(path.read_bytes())
    return digest.digest()
