"""FD and PSNR-vs-FP of {dynamic, qdiffusion, ptq4dm, torchao_int4, brevitas} × {plain, modiff} × bit-widths on the
bundled digits16 model, every setting sampled from the same noise as one full-precision run.

    python benchmarks/base_quantizer_table.py --out out/base-quantizers [--steps 100 --samples 256]

Writes results.json and table.md to --out; calibrations are cached in --out/calibration, so a
second run only samples. `--bases` and `--bits` rerun some rows and keep the others.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from modiff_quant.evaluate import Harness

BITS = ((8, 8), (8, 6), (8, 4), (8, 3), (4, 8), (4, 4))
BASES = ("dynamic", "qdiffusion", "ptq4dm", "torchao_int4", "brevitas")
RECIPE_SUFFIX = {"torchao_int4": "torchao"}
"""Base quantizers whose shipped recipes are named differently."""
SCHEMES = ("plain", "modiff")


FIRST_LAST_W8 = "rules:\n  - match: [conv_in, conv_out]\n    w_bits: 8\n"
"""As the shipped w4a4 recipes: first and last layer keep 8-bit weights."""


def recipe_for(base: str, scheme: str, w_bits: int, a_bits: int, folder: Path) -> Path:
    """dynamic: the shipped per-sample recipes; the others: their shipped W8A4 recipe at other bits."""
    parent = f"w8a4-{scheme}" if base == "dynamic" else f"w8a4-{scheme}-{RECIPE_SUFFIX.get(base, base)}"
    path = folder / f"table-w{w_bits}a{a_bits}-{scheme}-{base}.yaml"  # never the name of the recipe it extends
    rules = FIRST_LAST_W8 if w_bits < 8 else ""
    path.write_text(
        f"version: 1\nextends: {parent}\ndefaults:\n  w_bits: {w_bits}\n  a_bits: {a_bits}\n{rules}", encoding="utf-8"
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/base-quantizers"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--bases", nargs="+", default=list(BASES))
    parser.add_argument(
        "--bits",
        nargs="+",
        default=[f"{w}x{a}" for w, a in BITS],
        help="WxA pairs to (re)run; other rows in --out are kept",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bits = [tuple(int(b) for b in pair.split("x")) for pair in args.bits]
    harness = Harness("digits16", steps=args.steps, samples=args.samples, calibration_cache=args.out / "calibration")
    fp, _ = harness.evaluate(None)
    results = args.out / "results.json"
    rows = json.loads(results.read_text(encoding="utf-8"))["rows"] if results.is_file() else []
    with tempfile.TemporaryDirectory() as folder:
        for base in args.bases:
            for w_bits, a_bits in bits:
                for scheme in SCHEMES:
                    rows = [
                        r
                        for r in rows
                        if (r["base"], r["scheme"], r["w_bits"], r["a_bits"]) != (base, scheme, w_bits, a_bits)
                    ]
                    start = time.perf_counter()
                    metrics, _ = harness.evaluate(str(recipe_for(base, scheme, w_bits, a_bits, Path(folder))))
                    rows.append(
                        {
                            "base": base,
                            "scheme": scheme,
                            "w_bits": w_bits,
                            "a_bits": a_bits,
                            "seconds": time.perf_counter() - start,
                            **metrics,
                        }
                    )
                    print(
                        json.dumps(
                            {
                                k: rows[-1][k]
                                for k in ("base", "scheme", "w_bits", "a_bits", "fd", "psnr_vs_fp", "seconds")
                            }
                        ),
                        flush=True,
                    )
                    results.write_text(
                        json.dumps(
                            {"settings": vars(args) | {"out": str(args.out)}, "fp": fp, "rows": rows}, indent=1
                        ),
                        encoding="utf-8",
                    )
    (args.out / "table.md").write_text(_table(fp, rows, args), encoding="utf-8")
    print(_table(fp, rows, args))


def _table(fp: dict, rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"digits16, DDIM {args.steps} steps, {args.samples} samples; "
        f"FD to held-out digits (full precision: {fp['fd']:.1f}); PSNR vs FP in dB",
        "",
        "| base | bits | FD plain | FD MoDiff | PSNR plain | PSNR MoDiff |",
        "|---|---|---|---|---|---|",
    ]
    known = {r["base"] for r in rows}
    for base in [b for b in BASES if b in known] + sorted(known - set(BASES)):
        for w_bits, a_bits in BITS:
            pair = {r["scheme"]: r for r in rows if (r["base"], r["w_bits"], r["a_bits"]) == (base, w_bits, a_bits)}
            if len(pair) == 2:
                plain, modiff = pair["plain"], pair["modiff"]
                lines.append(
                    f"| {base} | W{w_bits}A{a_bits} | {plain['fd']:.1f} | {modiff['fd']:.1f} | "
                    f"{plain['psnr_vs_fp']:.1f} | {modiff['psnr_vs_fp']:.1f} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
