"""Train the digit classifier whose features define the FD (`python -m modiff_quant.training.classifier`).

Trained on the training split only, with ±1 pixel shifts so that slightly off-centre generated
digits map to the same features; the held-out accuracy is written next to the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_digits16
from ..features import CLASSIFIER_FILE, DigitClassifier


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random ±1 pixel translations (background value -1 fills the border)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


def train(epochs: int, seed: int) -> tuple[DigitClassifier, float]:
    torch.manual_seed(seed)
    train_set, held_out = load_digits16()
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_set.images), generator=generator).split(64):
            loss = F.cross_entropy(model(shifted(train_set.images[batch], generator)), train_set.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(held_out.images).argmax(1) == held_out.labels).float().mean().item()
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and their record")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from safetensors.torch import save_file

    model, accuracy = train(args.epochs, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), args.out / CLASSIFIER_FILE)
    record = {"epochs": args.epochs, "seed": args.seed, "held_out_accuracy": round(accuracy, 4)}
    (args.out / "digits_classifier.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
