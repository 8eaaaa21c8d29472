"""What people look at: image grids of samples and a Markdown report of the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .metrics import to_unit_range

LABEL_WIDTH, SCALE, PER_ROW = 110, 3, 16


def save_grid(path: Path, rows: dict[str, Tensor]) -> None:
    """One labelled row of samples per setting (same noise per column), upscaled for viewing."""
    tiles = [_tile(images[:PER_ROW]) for images in rows.values()]
    height, width = tiles[0].shape[:2]
    canvas = Image.new("RGB", (LABEL_WIDTH + width, len(tiles) * (height + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, tile) in enumerate(zip(rows, tiles)):
        top = i * (height + 4)
        canvas.paste(Image.fromarray(tile), (LABEL_WIDTH, top))
        draw.text((4, top + height // 2 - 6), Path(label).stem[:17], fill="black")  # recipe files by name
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _tile(images: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one RGB strip, each image upscaled by SCALE (nearest)."""
    pixels = (to_unit_range(images.detach().float().cpu()) * 255).round().byte()
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    strip = pixels.permute(2, 0, 3, 1).reshape(pixels.shape[2], -1, 3).numpy()
    return strip.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def write_report(
    path: Path,
    title: str,
    settings: dict[str, Any],
    rows: list[dict[str, Any]],
    grid: str,
    figures: dict[str, str] | None = None,
) -> None:
    """A Markdown page: the settings, one metrics row per setting, the grid, and `figures`
    (caption -> image file next to the report)."""
    columns = [key for key in rows[0] if key != "recipe"]
    lines = [f"# {title}", "", ", ".join(f"{k}: {v}" for k, v in settings.items()), ""]
    lines += ["| recipe | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([row["recipe"], *(_cell(row[c]) for c in columns)]) + " |" for row in rows]
    lines += ["", f"![samples: one row per setting, same noise per column]({grid})", ""]
    if figures:
        lines += ["## Plots", ""]
        for caption, image in figures.items():
            lines += [
                f"**{caption}** (`{image}`; data: `{Path(image).with_suffix('.json')}`)",
                "",
                f"![{caption}]({image})",
                "",
            ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)
