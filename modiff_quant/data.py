"""The bundled data set: scikit-learn's handwritten digits (in the wheel, no download), upsampled
to 16x16, in model space [-1, 1], with a fixed seeded train / held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_SIZE = 16
SPLIT_SEED = 0
HELD_OUT = 360  # of 1797 images (20 %), never used for training the diffusion model or the classifier


@dataclass(frozen=True)
class DigitsSplit:
    images: Tensor  # [N, 1, 16, 16] in [-1, 1]
    labels: Tensor  # [N]


def load_digits16() -> tuple[DigitsSplit, DigitsSplit]:
    """(train, held_out): the 8x8 digits bilinearly upsampled to 16x16, seeded split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (
        F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False).clamp(0, 1) * 2
        - 1
    )
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, held_out = order[HELD_OUT:], order[:HELD_OUT]
    return DigitsSplit(images[train], labels[train]), DigitsSplit(images[held_out], labels[held_out])
