"""Importing optional packages without their import-time noise."""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Mute warnings that say nothing about this run while importing diffusers models or torchao:
    torchao logs one per CUDA-only kernel library it cannot load on a CPU machine (and torch one
    per enum torchao registers), diffusers 0.42 one for torchao 0.18's moved tensor classes.
    Only for the duration of the import; the loggers keep their levels afterwards."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def optional_import(package: str, *submodules: str, extra: str) -> ModuleType:
    """`package` and its `submodules`, imported quietly when a backend first needs them (so that
    `import modiff_quant` does not); a missing package names the extra that installs it."""
    try:
        with quiet_imports():
            module = importlib.import_module(package)
            for submodule in submodules:
                importlib.import_module(f"{package}.{submodule}")
    except ImportError as exc:
        raise ImportError(f"this backend needs {package}: pip install 'modiff-quant[{extra}]' ({exc})") from exc
    return module
