"""The quality gate's power: plant one-line bugs and see which gate check catches each.

Each bug is a one-line edit a contributor could make, in the scheme, the quantizers or the state
handling. For each, a copy of the library with that edit runs `modiff-quant gate` on the
project's baselines (as CI does), in a subprocess; the table lists the checks that failed. A bug
is caught when at least one metric or comparison check fails on a value: a setting that raised
fails its checks too (the gate runs the others), but a crash is not a catch. The unmodified
library must pass first.

    OMP_WAIT_POLICY=PASSIVE python scripts/gate_power.py --out out/gate-power [--bugs B1 B2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from modiff_quant.gate import recipe_beside

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "baselines" / "digits16.yaml"


@dataclass(frozen=True)
class Bug:
    key: str
    what: str
    file: str
    old: str
    new: str


BUGS = (
    Bug(
        "B1",
        "MoDiff quantizes the input instead of its temporal difference",
        "modiff_quant/schemes.py",
        "q, codes = layer.quantize_input(DELTA, x - state.a_hat)",
        "q, codes = layer.quantize_input(DELTA, x)",
    ),
    Bug(
        "B2",
        "the bias is added to the accumulated output on every step",
        "modiff_quant/schemes.py",
        "layer.apply_quantized(q, codes, bias=False, accumulate=o_hat)",
        "layer.apply_quantized(q, codes, bias=True, accumulate=o_hat)",
    ),
    Bug(
        "B3",
        "the error-compensation switch is read inverted",
        "modiff_quant/schemes.py",
        "        if layer.plan.settings.error_compensation:\n            q = state.advance(q)",
        "        if not layer.plan.settings.error_compensation:\n            q = state.advance(q)",
    ),
    Bug(
        "B4",
        "rounding truncates (floor) instead of rounding to nearest",
        "modiff_quant/quant.py",
        "return x + (torch.round(x) - x).detach()",
        "return x + (torch.floor(x) - x).detach()",
    ),
    Bug(
        "B5",
        "the asymmetric zero point has the wrong sign",
        "modiff_quant/quant.py",
        "return scale, (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)",
        "return scale, (spec.qmin + torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)",
    ),
    Bug(
        "B6",
        "per-sample scales are shared by the whole batch",
        "modiff_quant/quant.py",
        "        return x, tuple(range(1, ndim))",
        "        return x, tuple(range(0, ndim))",
    ),
    Bug(
        "B7",
        "the accumulated output ô is not stored after a step",
        "modiff_quant/schemes.py",
        "return state.remember(layer.apply_quantized(q, codes, bias=False, accumulate=o_hat))",
        "return layer.apply_quantized(q, codes, bias=False, accumulate=o_hat)",
    ),
    Bug(
        "B8",
        "the first step's reconstruction starts from zero instead of the input",
        "modiff_quant/schemes.py",
        'a_hat = x.clone() if settings.first_step.kind == "fp" else layer.quantizer(RAW)(x)',
        'a_hat = x.new_zeros(x.shape) if settings.first_step.kind == "fp" else layer.quantizer(RAW)(x)',
    ),
    Bug(
        "B9",
        "the L_p clipping search's comparison is inverted (it never clips)",
        "modiff_quant/observers.py",
        "better = err < best_err",
        "better = err > best_err",
    ),
    Bug(
        "B10",
        "a bit schedule's steps rules are ignored",
        "modiff_quant/recipe/resolve.py",
        "(bits for schedule, bits in reversed(self.bit_steps) if schedule.contains(step)), self.settings.a_bits",
        "(bits for schedule, bits in reversed(self.bit_steps) if False), self.settings.a_bits",
    ),
    Bug(
        "B11",
        "attention scores are not scaled by 1/sqrt(d) where the operands are quantized",
        "modiff_quant/attention_products.py",
        "scores = (attn.attn_q(query) @ attn.attn_k(key).transpose(-1, -2)) * attn.scale",
        "scores = attn.attn_q(query) @ attn.attn_k(key).transpose(-1, -2)",
    ),
    Bug(
        "B12",
        "fake quantization returns the activation unquantized",
        "modiff_quant/layers.py",
        "            return quantizer(x), None",
        "            return x, None",
    ),
    Bug(
        "B13",
        "new-trajectory detection inverted: every step starts a trajectory (a float first step)",
        "modiff_quant/trajectory.py",
        "went_up = t is not None and lane.last_t is not None and t > lane.last_t",
        "went_up = t is not None and lane.last_t is not None and t < lane.last_t",
    ),
    Bug(
        "B14",
        "bias correction adds the weight error's mean instead of subtracting it",
        "modiff_quant/conversion/bias_correction.py",
        "layer.bias.sub_(shift.to(layer.bias.dtype))",
        "layer.bias.add_(shift.to(layer.bias.dtype))",
    ),
    Bug(
        "B15",
        "GPTQ spreads each column's rounding error with the wrong sign",
        "backends/gptq.py",
        "w[:, j + 1 : end] -= error[:, None] * factor[j, j + 1 : end][None]",
        "w[:, j + 1 : end] += error[:, None] * factor[j, j + 1 : end][None]",
    ),
)


def library_copy(folder: Path) -> Path:
    """The library as this checkout has it, with `modiff_quant.backends` inside the package (as
    installed), so that an edit anywhere in it is what the subprocess imports."""
    target = folder / "src"
    shutil.copytree(ROOT / "modiff_quant", target / "modiff_quant")
    shutil.copytree(ROOT / "backends", target / "modiff_quant" / "backends")
    return target


def planted_file(source: Path, bug: Bug) -> Path:
    """Where `bug.file` is in the library copy (`backends/` sits inside the package there)."""
    return source / (f"modiff_quant/{bug.file}" if bug.file.startswith("backends/") else bug.file)


def plant(source: Path, bug: Bug) -> None:
    path = planted_file(source, bug)
    text = path.read_text(encoding="utf-8")
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.key}: the line to change is not once in {bug.file}: {bug.old!r}")
    path.write_text(text.replace(bug.old, bug.new), encoding="utf-8")


def run_gate(source: Path, baseline: Path, log: Path) -> dict[str, object]:
    """Gate outcome: exit code and the failed checks, from the gate's table."""
    environment = {**os.environ, "PYTHONPATH": str(source), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-c", "import sys; from modiff_quant.cli import main; sys.exit(main(sys.argv[1:]))"]
    done = subprocess.run(  # run next to the copy: `python -c` puts the working directory first on sys.path
        [*command, "gate", "--baseline", str(baseline.resolve())],
        env=environment,
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )
    log.write_text(done.stdout + done.stderr, encoding="utf-8")
    failed, on_values = failed_checks(done.stdout)
    return {"exit": done.returncode, "failed": failed, "caught": done.returncode == 1 and bool(on_values)}


def failed_checks(table: str) -> tuple[list[str], list[str]]:
    """The gate table's failed rows, and those of them that failed on a value (not because their
    setting raised)."""
    failed = [line.rsplit(None, 1)[0] for line in table.splitlines() if line.rstrip().endswith("FAIL")]
    return failed, [line for line in failed if " error: " not in line and not line.endswith(" raised")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gate-power"))
    parser.add_argument("--bugs", nargs="*", default=[bug.key for bug in BUGS], choices=[bug.key for bug in BUGS])
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument(
        "--skip", nargs="*", default=[], help="settings of the baselines left out (and their comparisons)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    baseline = args.out / "baseline.yaml"  # recipe files made absolute: the copy runs elsewhere
    data = yaml.safe_load(args.baseline.read_text(encoding="utf-8"))
    data["settings"] = {name: setting for name, setting in data["settings"].items() if name not in args.skip}
    data["comparisons"] = [c for c in data.get("comparisons", []) if not {c["worse"], c["better"]} & set(args.skip)]
    for setting in data["settings"].values():
        setting["recipe"] = recipe_beside(setting.get("recipe"), args.baseline.resolve())
    baseline.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        clean = run_gate(library_copy(Path(folder) / "clean"), baseline, args.out / "clean.log")
        if clean["exit"] != 0:
            raise SystemExit(f"the unmodified library fails the gate: see {args.out / 'clean.log'}")
        for bug in (b for b in BUGS if b.key in args.bugs):
            source = library_copy(Path(folder) / bug.key)
            plant(source, bug)
            results[bug.key] = {
                "what": bug.what,
                "file": bug.file,
                **run_gate(source, baseline, args.out / f"{bug.key}.log"),
            }
            caught = "caught" if results[bug.key]["caught"] else f"NOT caught (exit {results[bug.key]['exit']})"
            print(f"{bug.key} {bug.what}: {caught}; {len(results[bug.key]['failed'])} checks failed", flush=True)
    (args.out / "power.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = ["| bug | planted in | caught | checks that failed |", "| --- | --- | --- | --- |"]
    for key, result in results.items():
        shown = "; ".join(result["failed"][:6]) + (
            f"; ... {len(result['failed'])} in all" if len(result["failed"]) > 6 else ""
        )
        lines.append(
            f"| {key}: {result['what']} | `{result['file']}` | {'yes' if result['caught'] else 'NO'} | {shown} |"
        )
    (args.out / "power.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
