"""Epsilon of a DP-SGD run, or the noise multiplier that meets a target epsilon.

Guarantee: Poisson-subsampled Gaussian, add-or-remove-one neighbours, sampling_prob =
expected_batch_size / num_examples (see jaxdp.accounting). Prints one JSON line.

  jaxdp epsilon --num-examples 50000 --expected-batch-size 1000 --steps 2000 \
      --noise-multiplier 1.0
  jaxdp epsilon --num-examples 50000 --expected-batch-size 1000 --steps 2000 \
      --target-epsilon 3 --delta 1e-6 --accountant rdp

(`python scripts/compute_epsilon.py ...` is the same command.) The numbers come from
`jaxdp.PrivacyPlan`, as a training run's privacy.json does.

--delta defaults to 1 / (10 * num_examples). Invalid or unreachable requests exit with status 2
and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxdp import accounting
from jaxdp.plan import PrivacyPlan


def main(argv: list[str] | None = None) -> int:
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
    try:
        plan = PrivacyPlan.create(
            num_examples=n,
            expected_batch_size=b,
            steps=args.steps,
            noise_multiplier=args.noise_multiplier,
            target_epsilon=args.target_epsilon,
            target_delta=args.delta,
            accountant=args.accountant,
        )
    except ValueError as e:
        _fail(str(e))
    record = plan.record(randomness="not applicable: accounting only")
    keys = ("epsilon", "delta", "noise_multiplier", "sampling_prob", "steps", "accountant")
    result = {k: record[k] for k in keys}
    result.update(num_examples=n, expected_batch_size=b, guarantee=record["guarantee"])
    print(json.dumps(result))
    return 0


def _fail(message: str) -> None:
    print(f"jaxdp epsilon: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
