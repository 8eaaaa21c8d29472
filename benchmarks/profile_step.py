"""Where the time of a sampling mode goes: a per-op table of one trajectory under torch.profiler.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_step.py --model cifar10-ddpm --batch 16 \
        --steps 10 --modes fp32 modiff-fake modiff-fake-compiled --out out/profile

Each mode (those of `speed.py`) samples one untimed trajectory (compilation, caches), then one
profiled trajectory. Ops are grouped by name and sorted by self CPU time; compiled modes list
inductor's generated kernels by name (`cpp_fused_*`). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from speed import MODES, build, trajectory

TOP = 20


def profile_mode(model_name: str, batch: int, steps: int, mode_name: str) -> dict[str, Any]:
    """Self CPU time per op name over one trajectory of `mode_name` (after a warm-up one)."""
    import torch._inductor.config as inductor_config

    from modiff_quant.models import load_model, sample_shape

    inductor_config.cpp.enable_kernel_profile = True  # generated kernels appear in the profile by name
    torch.manual_seed(0)
    model = load_model(model_name)
    noise = torch.randn(batch, *sample_shape(model), generator=torch.Generator().manual_seed(0))
    mode = MODES[mode_name]
    net, prepared = build(model, mode)
    options = {"prepared": prepared, "autocast": mode.execution == "bfloat16"}
    trajectory(net, noise, model_name, steps, **options)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        trajectory(net, noise, model_name, steps, **options)
    events = [event for event in profiler.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events)
    events.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return {
        "total_ms": total / 1e3,
        "ops": [
            {
                "name": event.key,
                "calls": event.count,
                "self_ms": event.self_cpu_time_total / 1e3,
                "share": event.self_cpu_time_total / total,
            }
            for event in events[:TOP]
        ],
    }


def table(results: dict[str, dict[str, Any]], setting: str) -> str:
    lines = []
    for mode, result in results.items():
        lines += [
            f"### {mode} ({setting}): {result['total_ms']:.0f} ms of self CPU time",
            "",
            "| op | calls | self ms | share |",
            "|---|---|---|---|",
        ]
        for op in result["ops"]:
            lines.append(f"| `{op['name'][:90]}` | {op['calls']} | {op['self_ms']:.1f} | {op['share']:.1%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10-ddpm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["fp32", "modiff-fake", "modiff-fake-compiled"], choices=MODES)
    parser.add_argument("--out", type=Path, default=Path("out/profile"))
    args = parser.parse_args()
    results = {mode: profile_mode(args.model, args.batch, args.steps, mode) for mode in args.modes}
    setting = f"{args.model}, batch {args.batch}, {args.steps} steps"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"setting": setting, "modes": results}, indent=1))
    (args.out / "table.md").write_text(table(results, setting), encoding="utf-8")
    print(table(results, setting))


if __name__ == "__main__":
    main()
