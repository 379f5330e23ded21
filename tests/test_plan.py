"""PrivacyPlan: every privacy number against dp-accounting called directly."""

import math

import dp_accounting
import pytest

from jaxdp import accounting, sampling
from jaxdp.plan import PrivacyPlan

DELTA = 1e-6


def direct_epsilon(sigma, q, steps, delta, interval=1e-4):
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    return acc.compose(event, steps).get_epsilon(delta)


def test_plan_with_a_noise_multiplier_reports_dp_accountings_epsilon():
    plan = PrivacyPlan.create(
        num_examples=10_000, expected_batch_size=100, steps=300, noise_multiplier=1.1,
        target_delta=DELTA,
    )  # fmt: skip
    assert plan.sampling_prob == 0.01 and plan.num_steps == 300
    expected = direct_epsilon(1.1, 0.01, 300, DELTA)
    assert plan.epsilon() == pytest.approx(expected, rel=1e-9)
    assert plan.epsilon(100) == pytest.approx(direct_epsilon(1.1, 0.01, 100, DELTA), rel=1e-9)
    record = plan.record(randomness="test")
    assert record["epsilon"] == plan.epsilon() and record["delta"] == DELTA
    assert record["steps"] == 300 and record["noise_multiplier"] == 1.1
    assert record["randomness"] == "test" and "public" in record["public_parameters"]
    assert plan.metrics(300) == {k: record[k] for k in PrivacyPlan.METRIC_KEYS}
    assert plan.dp_event() == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 300
    )


def test_calibrated_plan_meets_the_target_with_the_smallest_noise():
    plan = PrivacyPlan.create(
        num_examples=10_000, expected_batch_size=100, steps=300, target_epsilon=2.0,
        target_delta=DELTA,
    )  # fmt: skip
    sigma = plan.noise_multiplier
    assert plan.epsilon() <= 2.0  # the epsilon the run reports meets the target
    assert direct_epsilon(sigma, 0.01, 300, DELTA) <= 2.0 * (1 + 1e-9)
    assert direct_epsilon(0.99 * sigma, 0.01, 300, DELTA) > 2.0  # and not much more noise


def test_budget_shortens_the_run_to_what_the_target_allows():
    target = direct_epsilon(1.0, 0.01, 40, DELTA) * 1.0001
    plan = PrivacyPlan.create(
        num_examples=10_000, expected_batch_size=100, steps=500, noise_multiplier=1.0,
        target_epsilon=target, target_delta=DELTA,
    )  # fmt: skip
    assert plan.num_steps == 40
    assert plan.epsilon(40) <= target < plan.epsilon(41)


def test_epochs_group_clipping_and_defaults():
    plan = PrivacyPlan.create(
        num_examples=1000,
        expected_batch_size=30,
        epochs=2.5,
        noise_multiplier=1.6,
        group_size=4,
        num_cells=250,
    )
    assert plan.num_steps == math.ceil(2.5 / 0.03)
    assert plan.target_delta == 1 / (10 * 1000)
    assert plan.num_cells == 250 and plan.accounting_noise_multiplier == 0.8  # sensitivity 2C
    assert plan.record()["delta_times_num_examples"] == pytest.approx(0.1)
    assert plan.epsilon(10) == pytest.approx(
        direct_epsilon(0.8, 0.03, 10, 1e-4, accounting.pld_interval(0.8)), rel=1e-9
    )
    assert "2C" in plan.neighbouring_relation()
    assert isinstance(plan.sampler(7), sampling.PoissonSampler)


def test_non_private_and_noiseless_plans_claim_nothing():
    plan = PrivacyPlan.non_private(num_examples=100, batch_size=10, steps=5)
    assert plan.epsilon() == math.inf and not plan.private
    record = plan.record()
    assert record["epsilon"] is None and "delta" not in record
    assert record["covers"].startswith("nothing")
    assert isinstance(plan.sampler(0), sampling.ShuffleSampler)
    with pytest.raises(ValueError, match="no noise"):
        plan.noise_transform(None)
    zero = PrivacyPlan.create(num_examples=100, expected_batch_size=10, steps=5, noise_multiplier=0)
    assert zero.record()["covers"].startswith("nothing") and "no privacy" in zero.describe()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expected_batch_size=2000), "exceeds the number of training examples"),
        (dict(l2_clip_norm=-1.0), "l2_clip_norm"),
        (dict(noise_multiplier=None), "noise multiplier or a target"),
        (dict(steps=None), "steps or of epochs"),
        (dict(clipping="elementwise"), "Unknown clipping"),
        (dict(group_size=2, num_cells=5, sampling="shuffle"), "poisson"),
        (dict(group_size=2), "needs num_cells"),
        (dict(num_cells=5), "needs group_size > 1"),
        (dict(target_delta=1.5), "target_delta"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(target_delta=0.0), "target_delta"),
    ],
)
def test_bad_settings_name_what_to_change(kwargs, match):
    args = dict(num_examples=1000, expected_batch_size=10, steps=5, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=match):
        PrivacyPlan.create(**(args | kwargs))


def test_delta_above_one_over_n_is_warned_about_and_stated_as_delta_times_n(caplog):
    args = dict(num_examples=80, expected_batch_size=8, steps=5, noise_multiplier=1.0)
    with caplog.at_level("WARNING", logger="jaxdp"):
        default = PrivacyPlan.create(**args)
    assert default.target_delta == 1 / 800 and "exceeds 1/N" not in caplog.text
    assert default.record()["delta_times_num_examples"] == pytest.approx(0.1)
    with caplog.at_level("WARNING", logger="jaxdp"):
        loose = PrivacyPlan.create(**args, target_delta=0.05)
    assert "exceeds 1/N" in caplog.text
    assert loose.record()["delta_times_num_examples"] == pytest.approx(4.0)
