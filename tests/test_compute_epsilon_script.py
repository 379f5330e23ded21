"""`jaxdp epsilon` (scripts/compute_epsilon.py) agrees with dp_accounting and fails cleanly."""

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from jaxdp import accounting

SCRIPT = Path(__file__).parents[1] / "scripts" / "compute_epsilon.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def direct_epsilon(sigma, q, steps, delta, kind):
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    acc = pld.PLDAccountant(relation) if kind == "pld" else rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return acc.compose(event, steps).get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_mode_matches_dp_accounting(kind):
    proc = run(
        "--num-examples", 60000, "--expected-batch-size", 256, "--steps", 2000,
        "--noise-multiplier", 1.1, "--delta", 1e-6, "--accountant", kind,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    q = 256 / 60000
    assert out["epsilon"] == pytest.approx(direct_epsilon(1.1, q, 2000, 1e-6, kind), rel=1e-12)
    assert out == {
        "epsilon": out["epsilon"],
        "delta": 1e-6,
        "noise_multiplier": 1.1,
        "sampling_prob": pytest.approx(q, rel=1e-15),
        "steps": 2000,
        "accountant": kind,
        "num_examples": 60000,
        "expected_batch_size": 256,
        "guarantee": "Poisson-subsampled Gaussian (add/remove-one)",
    }


def test_default_delta():
    proc = run("--num-examples", 5000, "--expected-batch-size", 50, "--steps", 100,
               "--noise-multiplier", 2.0, "--accountant", "rdp")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["delta"] == pytest.approx(1 / 50000)
    assert out["epsilon"] == pytest.approx(accounting.compute_epsilon(
        2.0, 0.01, 100, 1 / 50000, accountant="rdp"), rel=1e-12)  # fmt: skip


def test_target_mode_calibrates():
    proc = run("--num-examples", 10000, "--expected-batch-size", 100, "--steps", 1000,
               "--target-epsilon", 1.0, "--delta", 1e-5)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    sigma = out["noise_multiplier"]
    assert out["accountant"] == "pld"
    assert direct_epsilon(sigma, 0.01, 1000, 1e-5, "pld") <= 1.0
    assert direct_epsilon(0.98 * sigma, 0.01, 1000, 1e-5, "pld") > 1.0
    assert out["epsilon"] == pytest.approx(direct_epsilon(sigma, 0.01, 1000, 1e-5, "pld"))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--steps", 100000, "--target-epsilon", 0.001, "--expected-batch-size", 1000),
         "fewer steps"),
        (("--steps", 10, "--noise-multiplier", 1.0, "--expected-batch-size", 2000),
         "expected-batch-size"),
        (("--steps", -5, "--noise-multiplier", 1.0, "--expected-batch-size", 10), "steps"),
        (("--steps", 10, "--noise-multiplier", 1.0, "--expected-batch-size", 10,
          "--delta", 1.5), "target_delta"),
    ],
)  # fmt: skip
def test_errors_exit_2_without_traceback(args, message):
    proc = run("--num-examples", 1000, "--accountant", "rdp", *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1


def test_mode_flags_are_mutually_exclusive():
    base = ("--num-examples", 100, "--expected-batch-size", 10, "--steps", 5)
    both = run(*base, "--noise-multiplier", 1.0, "--target-epsilon", 1.0)
    neither = run(*base)
    for proc in (both, neither):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
