"""Canary audit: the one-run lower bound is sound; non-private runs memorise, DP runs don't."""

import json
import math
import sys

import numpy as np
import pytest
from conftest import REPO

from jaxdp import audit


def _brute_force_bound(m: int, r: int, v: int, confidence: float) -> float:
    """Steinke et al.'s bound at delta = 0, by bisection on P[Binomial(r, q(eps)) >= v]."""

    def tail(eps):
        q = math.exp(eps) / (1 + math.exp(eps))
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))

    if tail(0.0) >= 1 - confidence:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) < 1 - confidence:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < 1 - confidence else (lo, mid)
    return lo


def test_library_bound_matches_brute_force_at_a_fixed_threshold():
    """jax_privacy's one-run bound, called with jaxdp's sign convention (loss: lower = in)."""
    from jax_privacy.auditing import CanaryScoreAuditor, Explicit

    rng = np.random.default_rng(0)
    in_losses, out_losses = rng.normal(0.0, 1.0, 40), rng.normal(1.5, 1.0, 40)
    threshold = 0.3  # guess "in" when loss < 0.3
    r = int(np.sum(in_losses < threshold) + np.sum(out_losses < threshold))
    v = int(np.sum(in_losses < threshold))
    auditor = CanaryScoreAuditor(-in_losses, -out_losses)
    got = auditor.epsilon_one_run(0.05, 1e-12, threshold_strategy=Explicit(-threshold))
    assert got == pytest.approx(_brute_force_bound(80, r, v, 0.95), rel=1e-3, abs=1e-4)
    assert got > 0.5  # well-separated scores give a real bound
    bound = audit.one_run_epsilon_lower_bound(in_losses, out_losses, 1e-12)
    assert bound["epsilon_lower_bound"] > 0 and 0.5 < bound["auroc"] <= 1


def test_lower_bound_is_sound_for_randomized_response():
    """Scores from eps-DP randomized response: the 95% lower bound may exceed eps in at most
    ~5% of trials (and is not vacuous)."""
    rng = np.random.default_rng(0)
    eps_true, m, trials = 1.0, 200, 300
    p_correct = math.exp(eps_true) / (1 + math.exp(eps_true))
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        says_in = np.where(rng.random(m) < p_correct, included, ~included)
        loss = np.where(says_in, 0.0, 1.0) + 1e-3 * rng.random(m)  # ties broken at random
        bounds.append(
            audit.one_run_epsilon_lower_bound(loss[included], loss[~included], 1e-6)[
                "epsilon_lower_bound"
            ]
        )
    exceed = np.mean(np.asarray(bounds) > eps_true)
    # Binomial(300, 0.05) exceeds 0.05 + 3 sd = 0.088 with probability ~0.2%.
    assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(bounds) > 0.1


def test_exposure_and_group_privacy():
    rank, exp = audit.exposure(0.5, [1.0, 2.0, 0.1, 3.0])
    assert rank == 2 and exp == pytest.approx(math.log2(5) - 1)
    eps_k, delta_k = audit.group_privacy(1.0, 1e-6, 3)
    assert eps_k == 3.0 and delta_k == pytest.approx(3 * math.e**2 * 1e-6)


@pytest.mark.slow  # two training runs: about 2 minutes on 2 CPU cores
def test_audit_script_dp_vs_nonprivate(tmp_path, shared_data):
    """Non-private training memorises the inserted canaries measurably; DP-SGD does not, and its
    audited lower bound stays below the reported epsilon."""
    import subprocess

    small = tmp_path / "train.txt"
    small.write_text((shared_data / "wikitext-2" / "valid.txt").read_text()[:6000])
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "audit.py"),
            "--config",
            str(REPO / "configs" / "tiny_offline.py"),
            "--workdir",
            str(tmp_path / "a"),
            "--num-canaries",
            "24",
            "--candidates",
            "50",
            "--set",
            f'data.train_files=["{small}"]',
            "--set",
            "data.block_size=16",
            "--set",
            "data.max_eval_examples=8",
            "--set",
            "dp.expected_batch_size=16",
            "--set",
            "dp.microbatch_size=8",
            "--set",
            "dp.noise_multiplier=2.0",
            "--set",
            "dp.target_epsilon=null",
            "--set",
            "train.num_steps=100",
            "--set",
            "train.eval_every=1000",
            "--set",
            "train.checkpoint_every=1000",
            "--set",
            "train.log_every=100",
            "--set",
            "train.export_hf=false",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "a" / "audit.json").read_text())
    dp, nonprivate = report["runs"]["dp"], report["runs"]["nonprivate"]
    # Memorisation: included canaries are ranked far above fresh candidates without DP ...
    assert nonprivate["mean_exposure_included"] - nonprivate["mean_exposure_excluded"] > 2.0
    # ... and not with DP (much smaller gap).
    gap_dp = dp["mean_exposure_included"] - dp["mean_exposure_excluded"]
    assert gap_dp < 0.5 * (
        nonprivate["mean_exposure_included"] - nonprivate["mean_exposure_excluded"]
    )
    assert dp["epsilon_lower_bound"] <= dp["reported_epsilon"]
    assert report["lower_bound_exceeds_reported_epsilon"] is False
    assert (tmp_path / "a" / "audit.png").is_file()
    ranks = [c["rank"] for c in dp["canaries"]]
    assert len(ranks) == 24 and all(1 <= r <= 51 for r in ranks)
