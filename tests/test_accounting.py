"""Tests for jaxdp.accounting against dp_accounting used directly and a closed-form oracle."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import optimize, stats

from jaxdp import accounting

DELTA = 1e-5
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
# A coarser PLD grid keeps searches fast; it is still a valid (pessimistic) bound.
COARSE = 1e-3


def direct_epsilon(sigma, q, steps, delta, kind, discretization=1e-4):
    """dp_accounting by hand: compose(event, count) rather than a SelfComposedDpEvent."""
    if kind == "pld":
        acc = pld.PLDAccountant(ADD_REMOVE, value_discretization_interval=discretization)
    else:
        acc = rdp.RdpAccountant(neighboring_relation=ADD_REMOVE)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return acc.compose(event, steps).get_epsilon(delta)


def gaussian_epsilon(sigma, delta):
    """Exact epsilon of the Gaussian mechanism, sensitivity 1 (Balle & Wang 2018, Thm. 8)."""

    def delta_of(eps):
        return stats.norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * stats.norm.cdf(
            -1 / (2 * sigma) - eps * sigma
        )

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize(
    "sigma, q, steps, delta",
    [(1.0, 0.01, 1000, 1e-5), (2.0, 0.1, 50, 1e-6), (1.3, 0.004, 5000, 1e-7)],
)
@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_compute_epsilon_matches_dp_accounting(sigma, q, steps, delta, kind):
    got = accounting.compute_epsilon(sigma, q, steps, delta, accountant=kind)
    assert got == pytest.approx(direct_epsilon(sigma, q, steps, delta, kind), rel=1e-12)
    assert 0 < got < math.inf


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (4.0, 16), (30.0, 100)])
def test_full_batch_matches_closed_form_gaussian(sigma, steps):
    # q = 1: `steps` Gaussian steps compose to one Gaussian with std sigma / sqrt(steps).
    exact = gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
    got_pld = accounting.compute_epsilon(sigma, 1.0, steps, DELTA, accountant="pld")
    got_rdp = accounting.compute_epsilon(sigma, 1.0, steps, DELTA, accountant="rdp")
    assert exact <= got_pld <= exact + 1e-3  # PLD: pessimistic, but tight.
    assert got_rdp >= exact  # RDP: a valid, looser bound.


def test_steps_zero_is_free_and_sigma_zero_is_not_private():
    for kind in accounting.ACCOUNTANTS:
        assert accounting.compute_epsilon(1.0, 0.01, 0, DELTA, accountant=kind) == 0.0
        assert accounting.compute_epsilon(0.0, 0.01, 10, DELTA, accountant=kind) == math.inf
    assert isinstance(accounting.dpsgd_event(1.0, 0.01, 0), dp_accounting.NoOpDpEvent)
    assert isinstance(accounting.dpsgd_event(0.0, 0.01, 5), dp_accounting.NonPrivateDpEvent)


def test_dpsgd_event_structure():
    expected = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.5)), 7
    )
    assert accounting.dpsgd_event(1.5, 0.02, 7) == expected
    # Shuffled batches are accounted as if Poisson-sampled (approximation).
    assert accounting.dpsgd_event(1.5, 0.02, 7, sampling="shuffle") == expected
    with pytest.raises(ValueError, match="sampling"):
        accounting.dpsgd_event(1.5, 0.02, 7, sampling="fixed")


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_monotone(kind):
    def eps(sigma, q, steps):
        return accounting.compute_epsilon(
            sigma, q, steps, DELTA, accountant=kind, pld_discretization=COARSE
        )

    in_steps = np.array([eps(1.0, 0.01, t) for t in (1, 10, 100, 1000, 3000)])
    assert np.all(np.diff(in_steps) > 0), in_steps
    in_sigma = np.array([eps(s, 0.01, 300) for s in (0.8, 1.0, 1.5, 3.0)])
    assert np.all(np.diff(in_sigma) < 0), in_sigma
    in_q = np.array([eps(1.0, q, 300) for q in (0.001, 0.01, 0.1)])
    assert np.all(np.diff(in_q) > 0), in_q


@pytest.mark.parametrize(
    "sigma, q", [(0.4145, 0.008), (1.0, 0.01), (0.05, 0.3), (2.0, 1.0), (0.7, 0.5), (30.0, 1e-3)]
)
def test_one_step_pld_is_dp_accountings_bit_for_bit(sigma, q):
    """The vectorized one-step PLD against dp_accounting's own, point by point."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    interval = accounting.pld_interval(sigma)
    accounting.gaussian_step_pld.cache_clear()
    got = accounting.gaussian_step_pld(sigma, q, interval)
    want = pld_lib.from_gaussian_mechanism(
        sigma, value_discretization_interval=interval, sampling_prob=q
    )
    for side in ("_pmf_remove", "_pmf_add"):
        a, b = getattr(got, side), getattr(want, side)
        assert type(a) is type(b)
        assert a._infinity_mass == b._infinity_mass
        if hasattr(b, "_probs"):  # dense
            assert a._lower_loss == b._lower_loss
            np.testing.assert_array_equal(a._probs, b._probs)
        else:
            assert a._loss_probs == b._loss_probs
    for eps in (0.0, 0.5, 3.0):
        assert got.get_delta_for_epsilon(eps) == want.get_delta_for_epsilon(eps)
    assert got.self_compose(50).get_epsilon_for_delta(DELTA) == want.self_compose(
        50
    ).get_epsilon_for_delta(DELTA)


def test_describe_guarantee():
    assert "APPROXIMATE" not in accounting.describe_guarantee("poisson")
    assert "add/remove" in accounting.describe_guarantee("poisson")
    for sampling in accounting.APPROXIMATE_SAMPLINGS:
        label = accounting.describe_guarantee(sampling)
        assert label.startswith("APPROXIMATE") and "not a formal guarantee" in label
    with pytest.raises(ValueError, match="poisson"):
        accounting.describe_guarantee("uniform")


def test_make_accountant():
    a, b = accounting.make_accountant("pld"), accounting.make_accountant("pld")
    assert a is not b and isinstance(a, pld.PLDAccountant)
    assert isinstance(accounting.make_accountant("rdp"), rdp.RdpAccountant)
    for acc in (a, accounting.make_accountant("rdp")):
        assert acc.neighboring_relation == ADD_REMOVE
        assert isinstance(acc.ledger, dp_accounting.NoOpDpEvent)
    with pytest.raises(ValueError, match="pld.*rdp"):
        accounting.make_accountant("moments")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampling_prob=0.0), "sampling_prob"),
        (dict(sampling_prob=1.5), "sampling_prob"),
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(noise_multiplier=math.nan), "noise_multiplier"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(target_delta=0.0), "target_delta"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(sampling="uniform"), "sampling"),
    ],
)
def test_compute_epsilon_validates(kwargs, match):
    args = dict(noise_multiplier=1.0, sampling_prob=0.01, steps=10, target_delta=DELTA) | kwargs
    with pytest.raises(ValueError, match=match):
        accounting.compute_epsilon(**args, accountant="rdp")


@pytest.mark.parametrize(
    "kind, discretization, target_epsilon, q, steps",
    [
        ("rdp", 1e-4, 1.0, 0.01, 1000),
        ("rdp", 1e-4, 8.0, 0.004, 10_000),
        ("rdp", 1e-4, 0.5, 1.0, 10),
        ("pld", 1e-4, 1.0, 0.01, 1000),
        ("pld", COARSE, 8.0, 0.004, 10_000),
    ],
)
def test_calibrate_round_trip_is_tight(kind, discretization, target_epsilon, q, steps):
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon, DELTA, q, steps, accountant=kind, pld_discretization=discretization
    )
    eps = lambda s: direct_epsilon(s, q, steps, DELTA, kind, discretization)
    assert eps(sigma) <= target_epsilon
    assert eps(0.98 * sigma) > target_epsilon
    assert eps(sigma - 1e-3) > target_epsilon


def test_calibrate_unreachable_and_invalid_targets():
    with pytest.raises(ValueError, match="fewer steps.*smaller sampling_prob.*larger"):
        accounting.calibrate_noise_multiplier(1e-3, DELTA, 1.0, 10_000, accountant="rdp")
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate_noise_multiplier(0.0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.calibrate_noise_multiplier(-1.0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="target_delta"):
        accounting.calibrate_noise_multiplier(1.0, 0.0, 0.01, 100)
    with pytest.raises(ValueError, match="steps"):
        accounting.calibrate_noise_multiplier(1.0, DELTA, 0.01, 0)
    with pytest.raises(ValueError, match="pld.*rdp"):
        accounting.calibrate_noise_multiplier(1.0, DELTA, 0.01, 100, accountant="moments")


@pytest.mark.parametrize(
    "kind, discretization, sigma, q, target_epsilon",
    [
        ("rdp", 1e-4, 1.0, 0.01, 2.0),
        ("rdp", 1e-4, 0.7, 0.05, 5.0),
        ("pld", COARSE, 1.0, 0.01, 2.0),
    ],
)
def test_max_steps_within_budget(kind, discretization, sigma, q, target_epsilon):
    k = accounting.max_steps_within_budget(
        sigma, q, target_epsilon, DELTA, accountant=kind, pld_discretization=discretization
    )
    eps = lambda t: direct_epsilon(sigma, q, t, DELTA, kind, discretization)
    assert k >= 1
    assert eps(k) <= target_epsilon < eps(k + 1)


def test_max_steps_edge_cases():
    kw = dict(accountant="rdp")
    assert accounting.max_steps_within_budget(0.0, 0.01, 10.0, DELTA, **kw) == 0
    assert accounting.max_steps_within_budget(0.5, 1.0, 0.1, DELTA, **kw) == 0  # One step > eps.
    assert accounting.max_steps_within_budget(50.0, 0.001, 10.0, DELTA, upper=1000, **kw) == 1000


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.3, 0.5, 1.0])
def test_pld_grid_stays_bounded_at_small_noise(sigma):
    """Small noise multipliers get a coarser grid (PLD accounting used to take minutes and
    gigabytes at sigma = 0.05), never a finer one than asked for, and the same at sigma >= 0.5."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    interval = accounting.pld_interval(sigma)
    assert interval >= 1e-4 and (interval == 1e-4) == (sigma >= 0.5)
    one_step = pld_lib.from_gaussian_mechanism(
        sigma, value_discretization_interval=interval, sampling_prob=0.01
    )
    # The one-step PLD's support (its "remove" pmf; dp_accounting has no public accessor).
    assert one_step._pmf_remove.size <= accounting.PLD_MAX_GRID_POINTS
    got = accounting.compute_epsilon(sigma, 0.01, 2, DELTA)
    expected = direct_epsilon(sigma, 0.01, 2, DELTA, "pld", discretization=interval)
    assert got == pytest.approx(expected, rel=1e-12)
    if sigma >= 0.3:  # the fine grid is affordable here: the coarse one is as tight
        assert got == pytest.approx(direct_epsilon(sigma, 0.01, 2, DELTA, "pld"), rel=1e-3)


def test_unreachable_target_fails_fast_naming_the_attainable_epsilon():
    with pytest.raises(ValueError, match=r"not attainable.*gives epsilon=0\.0\d+"):
        accounting.calibrate_noise_multiplier(1e-4, 1e-6, 1.0, 1000)


def test_calibration_ends_where_epsilon_jumps_from_infinite_to_finite():
    """At delta 1e-16 a dense PLD's composition carries more infinite mass than delta (epsilon
    is infinite) and a sparse one, at a larger sigma, does not: between two adjacent floats
    epsilon jumps from infinite to below the target. The search must end there."""
    import signal

    def too_long(*_):
        raise TimeoutError("calibration did not end")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        sigma = accounting.calibrate_noise_multiplier(5.0, 1e-16, 0.01, 100)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert accounting.compute_epsilon(sigma, 0.01, 100, 1e-16) <= 5.0


def test_a_fitted_grid_never_drops_what_was_composed_before():
    """fit_grid refits the grid only while nothing is composed: an event composed before the
    first Gaussian stays in the composition (dp_accounting's own accountant as the reference)."""
    laplace = dp_accounting.LaplaceDpEvent(0.5)
    steps = accounting.dpsgd_event(1.0, 0.01, 10)
    want = pld.PLDAccountant(ADD_REMOVE).compose(laplace).compose(steps).get_epsilon(DELTA)
    for events in ([laplace, steps], [dp_accounting.ComposedDpEvent([laplace, steps])]):
        acc = accounting.make_accountant("pld", fit_grid=True)
        for event in events:
            acc.compose(event)
        assert acc.get_epsilon(DELTA) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("q", [0.01, 0.5, 1.0])
def test_the_vectorized_divergence_matches_dp_accountings_at_every_epsilon(q):
    """Including the infinite ends and the edges +-log(1 - q) (no PLD grid reaches those, but
    the divergence is a public method)."""
    from dp_accounting.pld import privacy_loss_mechanism as plm

    edge = -math.log(1 - q) if q < 1 else 1.0
    epsilons = np.array([-np.inf, -edge, -0.3, 0.0, 0.3, edge, 5.0, np.inf])
    for kind in (plm.AdjacencyType.ADD, plm.AdjacencyType.REMOVE):
        ours = accounting._GaussianPrivacyLoss(0.8, sampling_prob=q, adjacency_type=kind)
        theirs = plm.GaussianPrivacyLoss(0.8, sampling_prob=q, adjacency_type=kind)
        want = np.array([theirs.get_delta_for_epsilon(float(e)) for e in epsilons])
        np.testing.assert_array_equal(ours.get_delta_for_epsilon(epsilons), want)
