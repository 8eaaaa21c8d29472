"""The quality harness behind `modiff-quant eval`, `demo` and `gate`.

Full precision and quantized models sample from identical noise with the same sampler, so paired
metrics (PSNR vs FP, FD between the two sample sets) isolate what quantization does. FD to
held-out real data uses the bundled digit classifier's features (digits16 only; null otherwise).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed
from .api import (
    block_skips,
    calibrate,
    convert,
    is_prepared,
    plan_of,
    prepare,
    reset,
    sampling,
    state_bytes,
)
from .bops import DEFAULT_CONVENTIONS, BopsConventions, MacEntry, count_bops, count_macs
from .data import load_digits16
from .features import digit_features, frechet_distance, load_classifier
from .layers import QuantizedLayer
from .metrics import psnr_vs
from .models import load_model, sample_shape, training_schedule
from .quoting import shown
from .recipe import Recipe, load_recipe
from .samplers import check_steps, make_scheduler, sample

FD_MODELS = ("digits16",)  # models whose samples the bundled feature extractor understands
CALIBRATION_SAMPLES = 32
CALIBRATION_SEED_OFFSET = 1_000_003  # calibration noise never coincides with any evaluation seed
POSITIVE = range(1, 2**63)
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Float types a harness may run the model's float parts in (`dtype`)."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""`torch.compile` modes a harness may sample with (`compile_mode`)."""
SEEDS = range(2**32)  # torch takes 64-bit seeds; the harness adds offsets and batch indices to this one


def integer_error(value: Any, allowed: range) -> str | None:
    """Why `value` is not an integer in `allowed` (None: it is): the harness, the command line
    and the gate refuse the same values in the same words."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        bounds = f">= {allowed.start}" if allowed.stop >= 2**63 else f"from {allowed.start} to {allowed.stop - 1}"
        return f"expected an integer {bounds}, got {shown(value)}"
    return None


@dataclass(frozen=True)
class Run:
    """Samples of one model setting from the harness's noise, and its ε prediction per step."""

    images: Tensor
    seconds: float
    cache_bytes_per_image: int
    epsilons: list[list[Tensor]]  # per step, this process's batches (every batch in one process)
    block_skip_fraction: float | None  # of the cached blocks' calls (None: no cached block)


class Harness:
    """Runs recipes that share a model, noise and sampler against one full-precision reference."""

    def __init__(
        self,
        model: str,
        *,
        sampler: str = "ddim",
        steps: int = 100,
        samples: int = 256,
        seed: int = 0,
        batch_size: int = 256,
        weights: str | None = None,
        calibration_cache: str | Path | None = None,
        bops_conventions: BopsConventions = DEFAULT_CONVENTIONS,
        device: str = "cpu",
        dtype: str = "float32",
        compile_mode: str | None = None,
    ) -> None:
        for name, value, allowed in (
            ("samples", samples, POSITIVE),
            ("batch_size", batch_size, POSITIVE),
            ("seed", seed, SEEDS),
        ):
            if error := integer_error(value, allowed):
                raise ValueError(f"{name}: {error}")
        self.device = distributed.local_device(checked_device(device))
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {shown(dtype)}")
        self.dtype = FLOAT_DTYPES[dtype]
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {shown(compile_mode)}")
        self.compile_mode = compile_mode
        self.training = training_schedule(model)
        check_steps(sampler, self.training, steps)
        self.bops_conventions = bops_conventions
        self.model_name = model
        self.sampler = sampler
        self.steps = steps
        self.samples = samples
        self.seed = seed
        self.batch_size = batch_size
        self.calibration_cache = calibration_cache
        self.model = load_model(model, seed=seed, weights=weights).to(self.device)
        if self.dtype != torch.float32:  # diffusers warns on any dtype cast, even to the dtype it has
            self.model = self.model.to(self.dtype)
        self.noise = self._noise(samples, seed)  # drawn on the CPU: the same noise on every device

    def _noise(self, count: int, seed: int) -> Tensor:
        return torch.randn(count, *sample_shape(self.model), generator=torch.Generator().manual_seed(seed))

    @cached_property
    def reference(self) -> Run:
        return self._generate(self.model, "full precision")

    @cached_property
    def _macs(self) -> list[MacEntry]:
        return count_macs(self.model, self._on_device(self.noise[:1]), torch.tensor(0))  # MACs do not depend on t

    @cached_property
    def _classifier(self) -> nn.Module:
        return load_classifier()

    @cached_property
    def _real_features(self) -> np.ndarray | None:
        return digit_features(self._classifier, load_digits16()[1].images) if self.model_name in FD_MODELS else None

    @cached_property
    def _reference_features(self) -> np.ndarray:
        return digit_features(self._classifier, self.reference.images)

    def check(
        self,
        recipe: str | Path | Recipe,
        base_quantizer: str | None = None,
        calibration_samples: int = CALIBRATION_SAMPLES,
    ) -> Recipe:
        """The recipe to quantize with (`base_quantizer` swapped in), resolved against the model:
        every error in the recipe or the settings surfaces here, before any sampling."""
        if error := integer_error(calibration_samples, POSITIVE):
            raise ValueError(f"calibration_samples: {error}")
        loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        loaded = loaded.with_base_quantizer(base_quantizer) if base_quantizer else loaded
        loaded.resolve(self.model)
        return loaded

    def quantize(
        self,
        recipe: str | Path | Recipe,
        base_quantizer: str | None = None,
        calibration_samples: int = CALIBRATION_SAMPLES,
    ) -> nn.Module:
        """A quantized copy of the model, calibrated on other noise when its layers need it (with
        `calibration_cache`, a calibration done before is loaded instead)."""
        quantized = prepare(copy.deepcopy(self.model), self.check(recipe, base_quantizer, calibration_samples))
        if any(m.needs_calibration for m in quantized.modules() if isinstance(m, QuantizedLayer)):
            seed = self.seed + CALIBRATION_SEED_OFFSET
            with calibrate(quantized):  # each process records its share of the batches; all get all
                everyone = self._noise(calibration_samples, seed).split(self.batch_size)
                for index in distributed.share(len(everyone)):
                    batch = everyone[index]
                    reset(quantized)
                    sample(
                        quantized,
                        self._on_device(batch),
                        make_scheduler(self.sampler, self.training),
                        self.steps,
                        seed=seed + index,
                        desc="calibrating",
                        progress=distributed.is_main(),
                    )
        return convert(quantized, cache_dir=self.calibration_cache)

    def evaluate(
        self,
        recipe: str | Path | Recipe | None,
        base_quantizer: str | None = None,
        calibration_samples: int = CALIBRATION_SAMPLES,
    ) -> tuple[dict[str, Any], Run]:
        """The metrics of DESIGN §6 for one recipe (None: the full-precision model itself)."""
        # the recipe is checked before the reference is sampled
        checked = None if recipe is None else self.check(recipe, base_quantizer, calibration_samples)
        reference = self.reference  # before the quantized run, so that neither run pays for the other's warm-up
        quantize_seconds = 0.0
        if checked is None:  # the full-precision model itself
            run = reference
            plan = None
        else:
            start = time.perf_counter()
            quantized = self.quantize(checked, calibration_samples=calibration_samples)
            quantize_seconds = time.perf_counter() - start
            run = self._generate(quantized, getattr(recipe, "name", str(recipe)))
            plan = plan_of(quantized)
        bops = count_bops(self._macs, plan, self.steps, self.bops_conventions)
        errors = step_relative_errors(reference.epsilons, run.epsilons)
        metrics = {
            **self._fd_metrics(run.images),
            "psnr_vs_fp": psnr_vs(reference.images, run.images),
            "eps_rel_error": sum(errors) / len(errors),
            "gbops_per_step": bops.gbops_per_step,
            "gbops_per_step_amortized": bops.gbops_per_step_amortized,
            "cache_bytes_per_image": run.cache_bytes_per_image,
            "block_skip_fraction": run.block_skip_fraction,
            "wall_seconds": run.seconds,
            "wall_seconds_fp": reference.seconds,
            "quantize_seconds": quantize_seconds,
        }
        return metrics, run

    def _fd_metrics(self, images: Tensor) -> dict[str, float | None]:
        if self._real_features is None:
            return {"fd": None, "fd_fp": None, "fd_to_fp": None}
        features = digit_features(self._classifier, images)
        return {
            "fd": frechet_distance(features, self._real_features),
            "fd_fp": frechet_distance(self._reference_features, self._real_features),
            "fd_to_fp": frechet_distance(features, self._reference_features),
        }

    def _on_device(self, noise: Tensor) -> Tensor:
        return noise.to(self.device, self.dtype)

    def _generate(self, model: nn.Module, desc: str) -> Run:
        """Samples of the harness's noise, batch by batch; batch i draws sampler noise from seed + i
        in every model. In a torch.distributed job each process samples its share of the batches
        and every process gets them all."""
        prepared = is_prepared(model)
        net = model if self.compile_mode is None else torch.compile(model, mode=self.compile_mode)
        with torch.no_grad():
            # untimed warm-up (first-call allocations); sampling() resets its state; compiled
            # models compile in the first batch, whose shapes the warm-up does not have
            model(self._on_device(self.noise[:1]), torch.tensor(0, device=self.device))
        skips_before, calls_before = block_skips(model) if prepared else (0, 0)  # the warm-up's count
        start, batches, cache = time.perf_counter(), [], 0
        epsilons: list[list[Tensor]] = [[] for _ in range(self.steps)]
        everyone = self.noise.split(self.batch_size)
        progress = distributed.JobProgress(len(everyone), desc)
        for index in distributed.share(len(everyone)):  # every batch, in one process
            batch = everyone[index]
            with sampling(model) if prepared else nullcontext():
                scheduler = make_scheduler(self.sampler, self.training)
                batches.append(
                    sample(
                        net,
                        self._on_device(batch),
                        scheduler,
                        self.steps,
                        seed=self.seed + index,
                        desc=desc,
                        progress=distributed.is_main(),
                        on_step=lambda step, eps: epsilons[step].append(eps.float().cpu()),
                    )
                    .float()
                    .cpu()
                )
                cache = max(cache, state_bytes(model) // len(batch) if prepared else 0)
            progress.advance()
        skips, calls = block_skips(model) if prepared else (0, 0)
        # every process's part in one exchange, in rank order (so the batches in global order)
        # (ε stays in each process: `step_relative_errors` gathers only its sums)
        mine = (time.perf_counter() - start, batches, cache, skips - skips_before, calls - calls_before)
        times, batch_parts, caches, skipped, called = zip(*distributed.gathered([mine]))
        progress.finish()
        images = torch.cat([batch for part in batch_parts for batch in part])
        skip_fraction = sum(skipped) / sum(called) if sum(called) else None
        return Run(images, max(times), max(caches), epsilons, skip_fraction)


def checked_device(device: str) -> torch.device:
    """`device` as a torch.device, refused at once when this machine has no such device."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {shown(device)} is not a torch device ({exc})") from None
    if found.type != "cpu":
        backend = getattr(torch, found.type, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
        if count == 0 or (found.index or 0) >= count:
            raise ValueError(
                f"device: {shown(device)} is not available on this machine ({count} {found.type} devices)"
            )
    return found


def step_relative_errors(reference: list[list[Tensor]], predictions: list[list[Tensor]]) -> list[float]:
    """‖ε − ε_FP‖ / ‖ε_FP‖ at each step over all samples, both models sampling from the same noise
    (its mean over steps is `eps_rel_error`; the curve shows whether errors accumulate). Each list
    holds, per step, this process's batches (`Run.epsilons`): each batch's sums of squares are
    gathered and added in global batch order, the same for any number of processes."""
    per_step = [
        [(_squares(p.double() - r.double()), _squares(r.double())) for r, p in zip(refs, preds, strict=True)]
        for refs, preds in zip(reference, predictions, strict=True)
    ]
    batches = distributed.gathered(list(zip(*per_step)))  # [batch][step] -> (error, reference)
    errors = []
    for step in range(len(per_step)):
        error, norm = (math.fsum(batch[step][part] for batch in batches) for part in (0, 1))
        errors.append(math.sqrt(error) / max(math.sqrt(norm), 1e-12))
    return errors


def _squares(tensor: Tensor) -> float:
    return float(tensor.square().sum())
