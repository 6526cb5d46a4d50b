"""Adapt a finished sine job's meta-initialization to a new sine curve, on this machine.

    python examples/adapt_sine.py sine-maml [--shots 10] [--seed 0]   # a fetched directory
    python examples/adapt_sine.py JOB                                  # a job id

Loads meta_init.safetensors + meta_init.json from a directory `metaserve fetch` wrote
(offline: no server, no API key), or downloads them for a job id through the SDK (reading
METASERVE_URL / METASERVE_API_KEY or the config file of `metaserve login`), draws one new
curve y = A·sin(x − φ) with 10 support points and 100 query points, and prints the query MSE
of the meta-initialization before and after adapting with the job's recipe (Finn et al. 2017).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from metaserve.client import Client, MetaserveClientError


def new_sine_task(seed: int, shots: int, queries: int = 100):  # noqa: ANN201
    generator = torch.Generator().manual_seed(seed)
    amplitude = 0.1 + 4.9 * torch.rand((), generator=generator)
    phase = math.pi * torch.rand((), generator=generator)
    x = 10 * torch.rand(shots + queries, 1, generator=generator) - 5
    y = amplitude * torch.sin(x - phase)
    return x[:shots], y[:shots], x[shots:], y[shots:], float(amplitude), float(phase)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="a directory `metaserve fetch` wrote, or the id of a "
                                    "succeeded sine job")
    parser.add_argument("--shots", type=int, default=10, help="support points of the new curve")
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the job's)")
    parser.add_argument("--seed", type=int, default=0, help="which new curve")
    args = parser.parse_args()
    support_x, support_y, query_x, query_y, amplitude, phase = new_sine_task(args.seed, args.shots)
    try:
        with Client() as client:
            model, recipe = client.load_meta_init(args.job)  # a directory, or downloads first
            before = torch.nn.functional.mse_loss(model(query_x), query_y).item()
            predict = client.adapt(model, support_x, support_y, steps=args.steps)
            after = torch.nn.functional.mse_loss(predict(query_x), query_y).item()
    except MetaserveClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    steps = recipe["inner_steps"] if args.steps is None else args.steps
    print(f"new curve: amplitude {amplitude:.2f}, phase {phase:.2f}; {args.shots} support points")
    print(f"{recipe['algorithm']}: {steps} step(s) at inner lr {recipe.get('inner_lr')}")
    print(f"query MSE before adaptation: {before:.4f}")
    print(f"query MSE after adaptation:  {after:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
