"""The quality harness pieces: data split, feature extractor and FD, samplers, BOPs accounting,
reports, and `eval` on the paper's CIFAR-10 architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modiff_quant.cli import main
from modiff_quant.data import HELD_OUT, load_digits16
from modiff_quant.features import digit_features, frechet_distance, load_classifier
from modiff_quant.report import save_grid
from modiff_quant.samplers import make_scheduler


def test_digits_split_is_fixed_disjoint_and_in_model_range():
    train, held_out = load_digits16()
    again, _ = load_digits16()
    assert len(held_out.images) == HELD_OUT and len(train.images) == 1797 - HELD_OUT
    assert torch.equal(train.images, again.images)
    assert train.images.shape[1:] == (1, 16, 16) and train.images.min() >= -1 and train.images.max() <= 1
    flat = {tuple(x.flatten().tolist()) for x in train.images}
    assert sum(tuple(x.flatten().tolist()) in flat for x in held_out.images) < 5  # the 8x8 set has a few duplicates


def test_shipped_classifier_recognises_held_out_digits():
    """The feature extractor is only meaningful if it really knows digits (shipped: 99.4 %)."""
    _, held_out = load_digits16()
    with torch.no_grad():
        accuracy = (load_classifier()(held_out.images).argmax(1) == held_out.labels).float().mean()
    assert accuracy >= 0.98


def test_frechet_distance_properties():
    """0 for identical sets, the squared mean shift for shifted copies, and real digits far from noise."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 8, rel=1e-6)
    classifier = load_classifier()
    train, held_out = load_digits16()
    real = digit_features(classifier, held_out.images)
    assert frechet_distance(digit_features(classifier, train.images[:HELD_OUT]), real) * 5 < frechet_distance(
        digit_features(classifier, torch.randn(HELD_OUT, 1, 16, 16)), real
    )


def test_quad_ddim_follows_the_reference_sequence():
    """The paper's CIFAR sampler: first call at t = 800, 96 distinct values in 100 steps, ends at 0."""
    scheduler = make_scheduler("ddim-quad")
    scheduler.set_timesteps(100)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps[0] == 800 and timesteps[-4:] == [0, 0, 0, 0] and len(set(timesteps)) == 96
    x, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in timesteps[:-1]:
        x = scheduler.step(eps, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_grid_has_one_labelled_row_per_setting(tmp_path):
    save_grid(tmp_path / "grid.png", {"a": torch.zeros(20, 1, 16, 16), "b": torch.ones(20, 1, 16, 16)})
    image = Image.open(tmp_path / "grid.png")
    assert image.size == (110 + 16 * 16 * 3, 2 * (16 * 3 + 4))


@pytest.mark.slow
def test_eval_runs_on_the_cifar_architecture(tmp_path):
    """Acceptance: `eval --model cifar10-ddpm --recipe w8a3-modiff --samples 2 --steps 10` runs and
    writes the JSON contract (FD is null: no feature extractor for CIFAR here)."""
    out = tmp_path / "result.json"
    assert (
        main(
            [
                "eval",
                "--model",
                "cifar10-ddpm",
                "--recipe",
                "w8a3-modiff",
                "--samples",
                "2",
                "--steps",
                "10",
                "--json",
                str(out),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for key in (
        "fd",
        "fd_fp",
        "fd_to_fp",
        "psnr_vs_fp",
        "eps_rel_error",
        "gbops_per_step",
        "gbops_per_step_amortized",
        "cache_bytes_per_image",
        "wall_seconds",
    ):
        assert key in result
    assert result["fd"] is None and result["gbops_per_step"] == pytest.approx(
        6.054 * 8 * 3 + 0.168 * 32 * 32, rel=1e-3
    )  # layers at W8A3, attention products as they run: float
    assert (
        result["cache_bytes_per_image"] > 0
        and (tmp_path / "grid.png").is_file()
        and (tmp_path / "report.md").is_file()
    )


@pytest.mark.slow
def test_digits16_samples_are_as_close_to_real_digits_as_real_digits_are():
    """Acceptance (at test size): FD of full-precision digits16 samples to the held-out digits is
    within 2x of the FD between real training and held-out digits (same sample count)."""
    from modiff_quant.evaluate import Harness

    harness = Harness("digits16", steps=50, samples=128)
    classifier = load_classifier()
    train, held_out = load_digits16()
    real = digit_features(classifier, held_out.images)
    picked = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(1))[:128]
    real_vs_real = frechet_distance(digit_features(classifier, train.images[picked]), real)
    generated = frechet_distance(digit_features(classifier, harness.reference.images), real)
    assert generated < 2 * real_vs_real, (generated, real_vs_real)
    with torch.no_grad():
        classes = classifier(harness.reference.images.clamp(-1, 1)).argmax(1)
    assert len(classes.unique()) == 10  # every digit appears: no mode collapse


@pytest.mark.slow
def test_demo_writes_the_table_grid_and_report(tmp_path, capsys):
    """The main job, shortened: FP vs W8A4 plain vs MoDiff on digits16, same noise."""
    assert main(["demo", "--steps", "20", "--samples", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("full precision", "w8a4-plain", "w8a4-modiff"))
    assert (tmp_path / "grid.png").is_file() and "| w8a4-modiff |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_harness_runs_the_float_parts_in_the_dtype_asked(dtype):
    from modiff_quant.evaluate import Harness

    harness = Harness("digits16", steps=4, samples=4, batch_size=4, dtype=dtype)
    assert next(harness.model.parameters()).dtype == getattr(torch, dtype)
    metrics, run = harness.evaluate("w8a4-modiff")
    assert run.images.dtype == torch.float32 and run.images.device.type == "cpu"
    assert np.isfinite(metrics["psnr_vs_fp"]) and metrics["cache_bytes_per_image"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_harness_samples_on_cuda_from_the_cpu_noise():
    from modiff_quant.evaluate import Harness

    cpu = Harness("digits16", steps=4, samples=4, batch_size=4)
    cuda = Harness("digits16", steps=4, samples=4, batch_size=4, device="cuda")
    metrics, run = cuda.evaluate("w8a4-modiff")
    assert next(cuda.model.parameters()).is_cuda and run.images.device.type == "cpu"
    assert torch.allclose(cuda.reference.images, cpu.reference.images, atol=1e-3)
    assert metrics["psnr_vs_fp"] > 20
