"""The release boundary and the neighbouring-dataset harness (tests/neighbours.py): a run on D,
D + x and D - x with the same secrets releases nothing that is not a setting, documented public
(N and what follows from it), or a function of the noised release."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config, small
from neighbours import NAMES, check_run_release, compare_fields, run_trainer_on_neighbours

import jaxdp
from jaxdp import release
from jaxdp.plan import PrivacyPlan
from jaxdp.randomness import Secrets


def _config(**dp):
    def make():
        cfg = small(load_config("tiny_offline"))
        settings = dict(dp)
        adaptive = settings.pop("adaptive", False)
        cfg.dp.update(settings)
        cfg.dp.adaptive.enabled = adaptive
        cfg.dp.adaptive.count_noise_multiplier = 2.0  # (sigma 1 < 2 sigma_b)
        if cfg.dp.engine == "fused":
            cfg.dp.clipping = "per_layer"
        return cfg

    return make


# One configuration per unit, engine and clipping feature in the default suite; every
# combination in the slow one.
FAST = {
    "block-vmap": ("block", {}),
    "record-vmap-adaptive": ("record", {"adaptive": True}),
    "user-fused-adaptive": ("user", {"engine": "fused", "adaptive": True}),
}
SLOW = {
    f"{unit}-{name}{'-adaptive' if adaptive else ''}": (unit, {**dp, "adaptive": adaptive})
    for unit in ("block", "record", "user")
    for name, dp in (
        ("vmap", {}),
        ("ghost", {"engine": "ghost"}),
        ("plan", {"engine": "ghost", "ghost_strategy": "plan"}),
        ("fused", {"engine": "fused"}),
    )
    for adaptive in (False, True)
}
SLOW["block-vmap-group"] = ("block", {"group_size": 2, "num_cells": 9})


def _check(tmp_path, unit, dp):
    make = _config(**dict(dp))
    workdirs, counts, cfg = run_trainer_on_neighbours(make, tmp_path, unit)
    check_run_release(cfg, workdirs, counts)


@pytest.mark.parametrize("case", sorted(FAST))
def test_trainer_releases_nothing_of_the_data_beyond_its_noised_model(tmp_path, case):
    _check(tmp_path, *FAST[case])


@pytest.mark.slow
def test_the_harness_fails_on_a_planted_leak(tmp_path, monkeypatch):
    """Finding 1 planted back (the unit's description computed from the data): the harness
    must fail."""
    from jaxdp import builders

    real = builders.privacy_plan

    def leaky(cfg, num_examples, unit=None, unit_kind="block"):
        return real(
            cfg, num_examples, unit=f"{unit}, of {num_examples} present", unit_kind=unit_kind
        )

    monkeypatch.setattr(builders, "privacy_plan", leaky)
    make = _config()
    workdirs, counts, cfg = run_trainer_on_neighbours(make, tmp_path, "block")
    monkeypatch.setattr(builders, "privacy_plan", real)  # the harness's plans are the real ones
    with pytest.raises(AssertionError, match="privacy_unit"):
        check_run_release(cfg, workdirs, counts)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(SLOW) - set(FAST)))
def test_every_unit_engine_and_clipping_feature_on_neighbouring_datasets(tmp_path, case):
    _check(tmp_path, *SLOW[case])


def _loss(params, example, key):
    del key
    return jnp.sum((example["x"] @ params["w"] - example["y"]) ** 2)


def test_make_private_record_on_neighbouring_datasets():
    """make_private's record() on D, D + x and D - x (same secrets): settings identical, the
    rest exactly the plan's for each N (computed here with PrivacyPlan alone)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(41, 3)).astype(np.float32)
    y = rng.normal(size=41).astype(np.float32)
    datasets = {"D": slice(0, 40), "D+x": slice(0, 41), "D-x": slice(0, 39)}
    settings = dict(
        expected_batch_size=8, steps=3, l2_clip_norm=0.5, target_epsilon=4.0,
        clipping="per_layer",
    )  # fmt: skip
    records, expected, public = {}, {}, {name: [] for name in NAMES}
    for name in NAMES:
        rows = datasets[name]
        data = {"x": x[rows], "y": y[rows]}
        n = len(data["y"])
        private = jaxdp.make_private(
            _loss, {"w": jnp.zeros(3)}, optax.sgd(0.1), num_examples=n,
            secrets=Secrets.from_seed(7), **settings,
        )  # fmt: skip
        state = private.initial_state
        for t in range(private.plan.num_steps):
            state, metrics = private.step(state, t, data)
            public[name].append(jax.device_get(metrics["public"]))
        records[name] = private.record()
        plan = PrivacyPlan.create(num_examples=n, **settings)
        expected[name] = plan.record(randomness=Secrets.from_seed(7).label)
        assert records[name] == expected[name]
    compare_fields(records, release.PRIVACY_FIELDS, expected, "make_private.record()")
    assert records["D"]["privacy_unit"] == records["D+x"]["privacy_unit"]
    # The update's public metrics: declared fields only, at every step of every run; sigma / B
    # is the plan's (documented public), the SNR estimate a noised release.
    for name in NAMES:
        sigma_over_b = np.float32(expected[name]["noise_multiplier"] / 8)
        for step_metrics in public[name]:
            assert set(step_metrics) == {"noise_to_batch", "snr_estimate"}
            release.checked(dict(step_metrics), release.METRIC_FIELDS, "make_private metrics")
            assert step_metrics["noise_to_batch"] == sigma_over_b


def test_a_field_without_a_declared_source_is_not_released(tmp_path):
    from jaxdp.workdir import Workdir

    out = release.RunRelease(Workdir(tmp_path))
    with pytest.raises(release.ReleaseError, match="train_loss"):
        out.metrics(3, {"epsilon": 1.0, "train_loss": 2.5})
    with pytest.raises(release.ReleaseError, match="longest_unit"):
        out.privacy({"epsilon": 1.0, "longest_unit": 3})
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "privacy.json").exists()
    out.metrics(3, {"epsilon": 1.0, "eval_loss": 2.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["public/eval_loss"] == 2.0
