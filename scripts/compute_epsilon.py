"""Epsilon of a DP-SGD run, or the noise multiplier that meets a target epsilon.

Guarantee: Poisson-subsampled Gaussian, add-or-remove-one neighbours, sampling_prob =
expected_batch_size / num_examples (see jaxdp.accounting). Prints one JSON line.

  python scripts/compute_epsilon.py --num-examples 50000 --expected-batch-size 1000 \
      --steps 2000 --noise-multiplier 1.0
  python scripts/compute_epsilon.py --num-examples 50000 --expected-batch-size 1000 \
      --steps 2000 --target-epsilon 3 --delta 1e-6 --accountant rdp

--delta defaults to 1 / (10 * num_examples). Invalid or unreachable requests exit with status 2
and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxdp import accounting


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-examples", type=int, required=True, help="dataset size N")
    parser.add_argument(
        "--expected-batch-size", type=float, required=True, help="B; sampling_prob = B / N"
    )
    parser.add_argument("--steps", type=int, required=True, help="number of DP-SGD steps")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--noise-multiplier", type=float, help="report epsilon for this sigma")
    mode.add_argument("--target-epsilon", type=float, help="calibrate sigma to this epsilon")
    parser.add_argument("--delta", type=float, default=None, help="default: 1 / (10 N)")
    parser.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default="pld")
    args = parser.parse_args(argv)

    n, b = args.num_examples, args.expected_batch_size
    if n < 1:
        _fail(f"--num-examples must be >= 1, got {n}.")
    if not 0 < b <= n:
        _fail(f"--expected-batch-size must be in (0, --num-examples={n}], got {b}.")
    delta = 1.0 / (10 * n) if args.delta is None else args.delta
    sampling_prob = b / n
    try:
        if args.target_epsilon is not None:
            noise_multiplier = accounting.calibrate_noise_multiplier(
                args.target_epsilon,
                delta,
                sampling_prob,
                args.steps,
                accountant=args.accountant,
            )
        else:
            noise_multiplier = args.noise_multiplier
        epsilon = accounting.compute_epsilon(
            noise_multiplier, sampling_prob, args.steps, delta, accountant=args.accountant
        )
    except ValueError as e:
        _fail(str(e))
    result = {
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "sampling_prob": sampling_prob,
        "steps": args.steps,
        "accountant": args.accountant,
        "num_examples": n,
        "expected_batch_size": b,
    }
    print(json.dumps(result))


def _fail(message: str) -> None:
    print(f"compute_epsilon.py: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
