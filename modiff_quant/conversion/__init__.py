"""The convert process: what `convert()` does with the quantized layers and the calibration
record (replay to the observers, freeze, reconstruct, quantize the weights), and the calibration
cache that lets a second convert skip it."""

from .engine import convert_layers

__all__ = ["convert_layers"]
