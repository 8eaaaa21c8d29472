"""A torch.distributed job for tests/test_distributed.py: calibrate a recipe through the harness
(each process recording its share of the calibration batches) and save the converted model's
state, from rank 0, to the path given; run alone or under torchrun. With `--stall-rank 1`, that
process sleeps instead of calibrating, as a hung process would."""

from __future__ import annotations

import argparse
import time

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
        quantized = harness.quantize(args.recipe, calibration_samples=6)
        if distributed.is_main():
            torch.save({k: v.clone() for k, v in quantized.state_dict().items()}, args.out)
    finally:
        distributed.leave()


if __name__ == "__main__":
    main()
