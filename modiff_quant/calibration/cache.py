"""The outcome of calibration on disk, so that a second run with the same model, recipe and
calibration data skips observing and reconstruction (minutes for AdaRound) and loads it."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file
from torch import nn

from .record import CalibrationRecord, tensor_bytes

if TYPE_CHECKING:
    from ..layers import QuantizedLayer

FORMAT = "1"


class CalibrationCache:
    """One file per fingerprint of (library version, float model, per-layer plan, calibration record)."""

    def __init__(self, directory: str | Path, model: nn.Module, layers: Sequence[QuantizedLayer], blocks: Sequence[object], record: CalibrationRecord) -> None:
        self.layers = tuple(layers)
        self.path = Path(directory) / f"{_fingerprint(model, self.layers, blocks, record)}.safetensors"

    def load(self) -> bool:
        """Restore every layer from the file; False when there is none yet."""
        if not self.path.is_file():
            return False
        tensors = load_file(self.path)
        for layer in self.layers:
            prefix = f"{layer.plan.name}/"
            layer.load_calibration_state({key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)})
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{layer.plan.name}/{key}": value.detach().cpu().contiguous() for layer in self.layers for key, value in layer.calibration_state().items()}
        temporary = self.path.with_suffix(".tmp")
        save_file(tensors, temporary, metadata={"format": FORMAT})
        temporary.replace(self.path)  # atomic: a concurrent reader never sees half a file


def _fingerprint(model: nn.Module, layers: Sequence[QuantizedLayer], blocks: Sequence[object], record: CalibrationRecord) -> str:
    """Everything calibration depends on; `blocks` describes the cached blocks (their 0-bit steps)."""
    digest = hashlib.sha256(f"modiff-quant cache {FORMAT}".encode())
    digest.update(_code_digest(tuple(sorted({inspect.getfile(type(layer.base_quantizer)) for layer in layers}))))
    for layer in layers:
        digest.update(repr((layer.plan.name, layer.plan.settings, layer.plan.zero_bit_steps)).encode())
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
