"""A torch.distributed job for tests/test_distributed.py: calibrate a recipe through the harness
(each process recording its share of the calibration batches) and save, from every process, the
converted model's state and how many times the model ran, to OUT-rankN.pt; run alone or under
torchrun. With `--stall-rank 1`, that process sleeps instead of calibrating, as a hung process
would."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from modiff_quant import distributed
from modiff_quant.evaluate import Harness


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--stall-rank", type=int)
    args = parser.parse_args()
    distributed.join(torch.device("cpu"))  # the process group from torchrun's environment
    try:
        if distributed.rank() == args.stall_rank:
            time.sleep(120)
        harness = Harness("digits16", steps=5, samples=2, batch_size=2)
        calls = []
        harness.model.register_forward_pre_hook(lambda *_: calls.append(1))  # the quantized copy keeps it
        quantized = harness.quantize(args.recipe, calibration_samples=6)
        state = {k: v.clone() for k, v in quantized.state_dict().items()}
        out = Path(args.out)
        torch.save({"state": state, "calls": len(calls)}, out.with_name(f"{out.stem}-rank{distributed.rank()}.pt"))
    finally:
        distributed.leave()


if __name__ == "__main__":
    main()
