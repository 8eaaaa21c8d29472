"""The bundled feature extractor: a small digit classifier whose 64-d penultimate activations
define the Fréchet distance (FD) used by `eval` (Inception weights cannot be downloaded here)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

CLASSIFIER_FILE = "digits_classifier.safetensors"
FEATURE_DIM = 64
"""Width of the features FD is computed on: FD from fewer than about twice this many samples is mostly
sample-size bias."""


class DigitClassifier(nn.Module):
    """conv-pool-conv-pool-fc64-fc10 on 16x16 digits in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def asset_path(name: str) -> Path:
    return Path(str(files("modiff_quant") / "assets" / name))


def load_classifier() -> DigitClassifier:
    """The shipped classifier (trained by `python -m modiff_quant.training.classifier`)."""
    from safetensors.torch import load_file

    model = DigitClassifier()
    model.load_state_dict(load_file(asset_path(CLASSIFIER_FILE)))
    return model.eval()


@torch.no_grad()
def digit_features(classifier: DigitClassifier, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """Penultimate features of images in model space [-1, 1], clamped as saved images are (a
    diverged sample's NaN/inf pixels count as the nearest valid pixel value)."""
    images = torch.nan_to_num(images, nan=0.0).clamp(-1, 1)
    return torch.cat([classifier.features(chunk) for chunk in images.split(batch_size)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½) between two feature sets [n, d].

    Tr((ΣaΣb)^½) is computed as Σ√λ of the symmetric Σa^½ Σb Σa^½ (same eigenvalues), which
    needs no complex matrix square root and no regularisation.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    trace_covmean = np.sqrt(linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean
    return max(0.0, float(distance))  # identical sets give -1e-5 from rounding
