"""The measured quality/compute frontier: FD / full-precision FD against GBops per step
(amortized) of recipes already evaluated with `modiff-quant eval --json`, one point each.

    python benchmarks/fd_frontier.py --out docs/images/fd-frontier.png LABEL=eval.json [LABEL=eval.json ...]

`search --plot` draws the frontier the search predicts (its error model); this draws what the
samples measured, so that a searched recipe can be read against uniform ones at equal compute.
Writes the PNG and, next to it, the JSON of the points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL = 1.05
"""The project's target for a searched W8A3 allocation (FD ≤ 1.05× full precision)."""
# A point is drawn as searched (red, labelled to its left) when its label says "search".


def points(pairs: list[str]) -> list[dict[str, object]]:
    found = []
    for pair in pairs:
        label, _, path = pair.partition("=")
        if not path:
            raise SystemExit(f"expected LABEL=eval.json, got {pair!r}")
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
        found.append(
            {
                "label": label,
                "gbops_per_step_amortized": metrics["gbops_per_step_amortized"],
                "fd_ratio": metrics["fd"] / metrics["fd_fp"],
                "psnr_vs_fp": metrics["psnr_vs_fp"],
            }
        )
    return found


def draw(found: list[dict[str, object]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for point in found:  # searched recipes apart from uniform ones, labelled on the other side
        searched = "search" in str(point["label"])
        xy = (point["gbops_per_step_amortized"], point["fd_ratio"])
        axes.scatter(*xy, color="tab:red" if searched else "tab:blue", marker="^" if searched else "o")
        axes.annotate(
            str(point["label"]),
            xy,
            fontsize=8,
            xytext=(-5 if searched else 5, 3),
            textcoords="offset points",
            ha="right" if searched else "left",
        )
    axes.axhline(1.0, color="gray", linewidth=0.8, label="full precision")
    axes.axhline(GOAL, color="gray", linestyle=":", linewidth=0.8, label=f"{GOAL}× full precision")
    axes.set_xlabel("GBops per image-step (amortized)")
    axes.set_ylabel("FD / full-precision FD")
    axes.set_title("measured quality vs compute", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    out.with_suffix(".json").write_text(json.dumps(found, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (its JSON goes next to it)")
    parser.add_argument("evals", nargs="+", help="LABEL=eval.json, as `modiff-quant eval --json` writes")
    args = parser.parse_args()
    draw(points(args.evals), args.out)


if __name__ == "__main__":
    main()
