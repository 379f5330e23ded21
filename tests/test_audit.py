"""Canary audit: the one-run lower bound is sound; non-private runs memorise, DP runs don't."""

import json
import math
import sys

import numpy as np
import pytest
from conftest import REPO

from jaxdp import audit


def test_p_value_without_delta_is_the_binomial_tail():
    for r, v, eps in [(10, 7, 0.5), (40, 30, 1.0), (16, 16, 2.0)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        brute = sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))
        assert audit.one_run_p_value(100, r, v, eps, 0.0) == pytest.approx(brute, rel=1e-9)
    # delta only ever makes the bound weaker (a larger p-value).
    assert audit.one_run_p_value(100, 40, 30, 1.0, 1e-3) > audit.one_run_p_value(
        100, 40, 30, 1.0, 0.0
    )


def test_lower_bound_is_sound_for_randomized_response():
    """Guesses that are right with probability e^eps/(1+e^eps) come from an eps-DP mechanism:
    the 95% lower bound may exceed eps in at most ~5% of trials."""
    rng = np.random.default_rng(0)
    eps_true, r, trials = 1.0, 60, 400
    q = math.exp(eps_true) / (1 + math.exp(eps_true))
    bounds = [
        audit.one_run_epsilon_lower_bound(r, r, int(rng.binomial(r, q)), 0.0, 0.95)
        for _ in range(trials)
    ]
    exceed = np.mean(np.asarray(bounds) > eps_true)
    # Binomial(400, 0.05) exceeds 0.05 + 3 sd = 0.083 with probability ~0.1%.
    assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(bounds) > 0.2  # and it is not vacuous
    assert audit.one_run_epsilon_lower_bound(60, 60, 30, 0.0) == 0.0  # chance level: nothing


def test_exposure_and_guesses():
    rank, exp = audit.exposure(0.5, [1.0, 2.0, 0.1, 3.0])
    assert rank == 2 and exp == pytest.approx(math.log2(5) - 1)
    losses = np.array([0.1, 0.2, 5.0, 6.0, 3.0, 0.3])
    included = np.array([True, True, False, False, False, False])
    assert audit.guesses(losses, included, 2, 2) == (4, 4)
    assert audit.guesses(losses, included, 3, 1) == (4, 3)
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
