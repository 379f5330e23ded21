"""Privacy accounting for DP-SGD: DP events, epsilon, noise calibration (host side).

Thin wrappers over Google's ``dp_accounting`` library. Everything here is plain Python/NumPy and
runs on the host, once per run or per logging step, never inside ``jax.jit``.

The guarantee accounted for is the one DP-SGD gives when it is run as specified:

* Neighbouring relation: add-or-remove-one example (``NeighboringRelation.ADD_OR_REMOVE_ONE``).
  Two datasets are neighbours if one is the other with a single example added or removed.
* Sampling: at every step each of the ``num_examples`` examples is included in the batch
  independently with probability ``sampling_prob`` (Poisson sampling; see
  ``jaxdp.sampling.PoissonSampler``), so the batch size is random with mean
  ``expected_batch_size = sampling_prob * num_examples``.
* Mechanism: each per-example gradient is clipped to l2 norm ``l2_clip_norm``, the clipped
  gradients are summed (l2 sensitivity ``l2_clip_norm`` under add/remove-one) and Gaussian noise
  with standard deviation ``noise_multiplier * l2_clip_norm`` is added to the sum. One step is the
  Poisson-subsampled Gaussian mechanism with noise multiplier ``noise_multiplier``; ``steps``
  steps are its ``steps``-fold adaptive composition.
* Output: the training run is ``(epsilon, target_delta)``-DP, with ``epsilon`` as reported here
  for the given ``target_delta``. The PLD accountant's epsilon is a numerically pessimistic
  upper bound (its discretization rounds privacy loss up); the RDP accountant's is a looser,
  also valid, upper bound.
* Public parameters: ``sampling_prob = expected_batch_size / num_examples`` and the default
  ``target_delta = 1 / (10 num_examples)`` are computed from the dataset size, which is treated
  as public, as in the DP-SGD literature: the guarantee is for neighbouring datasets under these
  fixed parameters.

Sampling modes (``sampling=``): ``"poisson"`` is the formal guarantee above. ``"shuffle"``
(shuffled fixed-size batches, as in ordinary training) is accounted *as if* the batches had been
Poisson-sampled with the same ``sampling_prob``: that is NOT a formal guarantee for what was run,
and callers label it with ``describe_guarantee(sampling)``.

Cost. dp_accounting builds one step's privacy loss distribution (PLD) point by point in Python,
0.5 s for a quarter of a million points; ``PLDAccountant`` here is dp_accounting's with that one
function evaluated on the whole grid at once (the same arithmetic, so the same numbers: tested
against dp_accounting itself) and the one-step PLD cached. At small noise multipliers the grid
would need millions of points (a noise multiplier of 0.05: a minute and a gigabyte for two
steps), so ``pld_interval`` coarsens it by powers of two to at most ``PLD_MAX_GRID_POINTS``
values; the result stays a valid (pessimistic) upper bound, and epsilon is large there anyway.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import operator
import threading
import time
from collections.abc import Callable

import dp_accounting
import numpy as np
import scipy.optimize
import scipy.stats
from dp_accounting import mechanism_calibration, rdp
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_mechanism
from dp_accounting.pld import privacy_loss_distribution as pld_lib

log = logging.getLogger("jaxdp")

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
SAMPLINGS: tuple[str, ...] = ("poisson", "shuffle")
APPROXIMATE_SAMPLINGS: tuple[str, ...] = ("shuffle",)
ADD_OR_REMOVE_ONE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# Bounds of the noise-multiplier search in `calibrate_noise_multiplier`.
MAX_NOISE_MULTIPLIER: float = 1e4
MIN_NOISE_MULTIPLIER: float = 1e-3
# Largest grid of one step's privacy loss distribution (see `pld_interval`).
PLD_MAX_GRID_POINTS: int = 2**19
# dp_accounting keeps the Gaussian's mass within about this many standard deviations
# (log_mass_truncation_bound = -50).
_PLD_TAIL_STDS: float = 10.0
# Calibration searches on a grid this much coarser (each evaluation about 10x cheaper), then
# corrects for the coarse grid's pessimism with evaluations on the requested grid until the
# requested grid's epsilon is within `_CALIBRATION_RTOL` below the target.
_SEARCH_COARSENING: float = 10.0
_CALIBRATION_RTOL: float = 1e-3
_MAX_CORRECTIONS: int = 4


def pld_interval(noise_multiplier: float, requested: float = 1e-4) -> float:
    """The PLD value discretization interval used for a Gaussian of this noise multiplier.

    The privacy loss of the Gaussian mechanism (sensitivity 1, std sigma) spans about
    (1 + 2 t sigma) / sigma^2 over the t = 10 standard deviations that dp_accounting keeps; the
    `requested` interval is multiplied by the smallest power of two that keeps that span within
    `PLD_MAX_GRID_POINTS` points. Unchanged for noise multipliers >= 0.5; 2x at 0.3, 16x at 0.05.
    """
    if not requested > 0:
        raise ValueError(f"pld_discretization must be > 0, got {requested}.")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        return requested
    span = (1.0 + 2.0 * _PLD_TAIL_STDS * noise_multiplier) / noise_multiplier**2
    doublings = max(0, math.ceil(math.log2(span / (requested * PLD_MAX_GRID_POINTS))))
    return requested * 2.0**doublings


class _GaussianPrivacyLoss(privacy_loss_mechanism.GaussianPrivacyLoss):
    """dp_accounting's subsampled Gaussian privacy loss, whose hockey-stick divergence at an
    array of epsilons inverts the privacy loss for the whole array at once.

    dp_accounting inverts it one epsilon at a time in Python (`inverse_privacy_loss`), which is
    nine tenths of building a one-step PLD. The arithmetic below is the same, operation for
    operation (`_inverse_privacy_loss_add/_remove` and `common.log_a_times_exp_b_plus_c`), for
    the add and remove relations, so the PLD is the same: `tests/test_accounting.py` compares
    the two bit for bit.
    """

    def get_delta_for_epsilon(self, epsilon):
        if isinstance(epsilon, numbers.Number):
            return super().get_delta_for_epsilon(epsilon)
        epsilons = np.asarray(epsilon, dtype=float)
        deltas = np.zeros_like(epsilons, dtype=float)
        q = self.sampling_prob
        if q == 1.0:
            inverse = np.full_like(epsilons, True, dtype=bool)
        elif self.adjacency_type == privacy_loss_mechanism.AdjacencyType.ADD:
            inverse = epsilons < -math.log1p(-q)
        else:
            inverse = epsilons > math.log1p(-q)
            deltas[~inverse] = -np.expm1(epsilons[~inverse])
        x = self._inverse(epsilons[inverse])
        deltas[inverse] = self.mu_upper_cdf(x) - np.exp(
            epsilons[inverse] + self.mu_lower_log_cdf(x)
        )
        return np.clip(deltas, 0, 1)

    def _inverse(self, loss: np.ndarray) -> np.ndarray:
        s, var, q = self.sensitivity, self._standard_deviation**2, self.sampling_prob
        add = self.adjacency_type == privacy_loss_mechanism.AdjacencyType.ADD
        if q == 1.0:
            without = loss
        else:
            # log(a exp(b) + c) with a = 1/q > 0 and c = 1 - 1/q < 0, as common.py computes it.
            a, c = 1 / q, 1 - 1 / q
            b = -loss if add else loss
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                d = b + np.log(a)
                log_sum = np.where(b == 0, np.log(a + c), d + np.log1p(-np.exp(np.log(-c) - d)))
            without = -log_sum if add else log_sum
            edge = -math.log(1 - q) if add else math.log(1 - q)
            # math.isclose(loss, edge): the loss without subsampling is infinite there.
            close = np.isfinite(loss) & (
                np.abs(loss - edge) <= 1e-9 * np.maximum(np.abs(loss), abs(edge))
            )
            without = np.where(close, math.inf if add else -math.inf, without)
        x_remove = -0.5 * s - without * var / s
        return s + x_remove if add else x_remove


@functools.lru_cache(maxsize=16)
def gaussian_step_pld(
    noise_multiplier: float, sampling_prob: float, interval: float
) -> pld_lib.PrivacyLossDistribution:
    """One Poisson-sampled Gaussian step's PLD (add/remove-one, pessimistic, connect-the-dots):
    `pld_lib.from_gaussian_mechanism(noise_multiplier, sampling_prob=..., ...)`, built with the
    whole grid at once and cached (PLDs are immutable: composing makes new ones)."""

    def single(adjacency):
        loss = _GaussianPrivacyLoss(
            noise_multiplier, sampling_prob=sampling_prob, adjacency_type=adjacency
        )
        return pld_lib._create_pld_pmf_from_monotone_privacy_loss(  # noqa: SLF001
            loss, value_discretization_interval=interval, use_connect_dots=True
        )

    return pld_lib._pld_for_subsampled_mechanism(single, sampling_prob)  # noqa: SLF001


class PLDAccountant(pld_privacy_accountant.PLDAccountant):
    """dp_accounting's PLD accountant (add/remove-one) with `gaussian_step_pld` for
    Poisson-sampled Gaussian steps; every other event goes to dp_accounting's own code.

    With ``fit_grid=True`` the grid is `pld_interval(sigma, value_discretization_interval)` for
    the noise multiplier of the first Gaussian step composed, if nothing was composed before it
    (the grid `compute_epsilon` uses); else the grid stays as given.
    """

    def __init__(self, value_discretization_interval: float = 1e-4, *, fit_grid: bool = False):
        super().__init__(ADD_OR_REMOVE_ONE, value_discretization_interval)
        self._fit_grid = fit_grid

    def _maybe_compose(self, event, count, do_compose):
        if isinstance(event, dp_accounting.SelfComposedDpEvent | dp_accounting.ComposedDpEvent):
            return super()._maybe_compose(event, count, do_compose)  # (back here per event)
        if not (
            isinstance(event, dp_accounting.PoissonSampledDpEvent)
            and isinstance(event.event, dp_accounting.GaussianDpEvent)
            and event.sampling_probability > 0
            and event.event.noise_multiplier > 0
        ):
            if do_compose and not isinstance(event, dp_accounting.NoOpDpEvent):
                self._fit_grid = False  # something is composed on the given grid: keep it
            return super()._maybe_compose(event, count, do_compose)
        if do_compose:
            sigma = float(event.event.noise_multiplier)
            if self._fit_grid:
                self._fit_grid = False
                self._value_discretization_interval = pld_interval(
                    sigma, self._value_discretization_interval
                )
                self._pld = pld_lib.identity(self._value_discretization_interval)
            step = gaussian_step_pld(
                sigma, float(event.sampling_probability), self._value_discretization_interval
            )
            self._pld = self._pld.compose(step.self_compose(count))
        return None


def make_accountant(
    accountant: str = "pld", *, pld_discretization: float = 1e-4, fit_grid: bool = False
) -> dp_accounting.PrivacyAccountant:
    """Returns a fresh (empty) accountant for the add-or-remove-one neighbouring relation.

    Args:
      accountant: ``"pld"`` (privacy loss distributions; tight) or ``"rdp"`` (Renyi DP; looser).
      pld_discretization: value discretization interval of the PLD accountant. Larger is faster
        and still a valid upper bound. Ignored for ``"rdp"``.
      fit_grid: coarsen the PLD grid for the first Gaussian's noise multiplier (`pld_interval`),
        as `compute_epsilon` does.
    """
    if accountant == "pld":
        if not pld_discretization > 0:
            raise ValueError(f"pld_discretization must be > 0, got {pld_discretization}.")
        return PLDAccountant(pld_discretization, fit_grid=fit_grid)
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=ADD_OR_REMOVE_ONE)
    raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def describe_guarantee(sampling: str = "poisson") -> str:
    """A human-readable label for the guarantee an epsilon computed for ``sampling`` carries.

    For ``"shuffle"`` the label starts with ``"APPROXIMATE"``: the number was computed as if
    batches were Poisson-sampled, which they were not.
    """
    _check_sampling(sampling)
    if sampling == "poisson":
        return "Poisson-subsampled Gaussian (add/remove-one)"
    return (
        "APPROXIMATE: computed as if Poisson-sampled; batches were shuffled, not "
        "Poisson-sampled - this is not a formal guarantee"
    )


def dpsgd_event(
    noise_multiplier: float, sampling_prob: float, steps: int, *, sampling: str = "poisson"
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``steps`` DP-SGD steps (see the module docstring for the guarantee).

    Args:
      noise_multiplier: noise std divided by ``l2_clip_norm``; ``>= 0``. Zero gives a
        ``NonPrivateDpEvent`` (epsilon is infinite) unless ``steps == 0``.
      sampling_prob: per-example inclusion probability ``q`` of each step, ``0 < q <= 1``.
      steps: number of noisy gradient steps, ``>= 0``. Zero gives ``NoOpDpEvent`` (epsilon 0).
      sampling: one of ``SAMPLINGS``. ``"shuffle"`` returns the Poisson event (an
        approximation; see the module docstring).
    """
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    sampling_prob = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    _check_sampling(sampling)
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    step_event = dp_accounting.PoissonSampledDpEvent(
        sampling_probability=sampling_prob,
        event=dp_accounting.GaussianDpEvent(noise_multiplier=noise_multiplier),
    )
    return dp_accounting.SelfComposedDpEvent(event=step_event, count=steps)


def compute_epsilon(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    target_delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    pld_discretization: float = 1e-4,
) -> float:
    """Epsilon such that ``steps`` DP-SGD steps are ``(epsilon, target_delta)``-DP.

    Add-or-remove-one neighbours; see the module docstring. For ``sampling="shuffle"`` this is
    the Poisson number, which is only an approximation: label it with
    ``describe_guarantee(sampling)``. Returns ``math.inf`` if ``noise_multiplier == 0`` and
    ``steps > 0``; ``0.0`` if ``steps == 0``.
    """
    target_delta = _check_delta(target_delta)
    event = dpsgd_event(noise_multiplier, sampling_prob, steps, sampling=sampling)
    acc = make_accountant(accountant, pld_discretization=pld_discretization, fit_grid=True)
    return float(acc.compose(event).get_epsilon(target_delta))


def single_flight(fn):
    """Caches a pure function of hashable arguments, computing each at most once even when
    many threads ask at the same time (a service planning many jobs): one lock for all calls,
    since the work holds the GIL anyway, so the callers of a result being computed wait for it
    instead of repeating it."""
    cached = functools.lru_cache(maxsize=256)(fn)
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with lock:
            return cached(*args, **kwargs)

    wrapper.cache_info, wrapper.cache_clear = cached.cache_info, cached.cache_clear
    return wrapper


@single_flight  # a pure function of its (scalar) arguments
def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sampling_prob: float,
    steps: int,
    *,
    accountant: str = "pld",
    pld_discretization: float = 1e-4,
    tol: float = 1e-4,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """A noise multiplier for which ``steps`` steps are ``(target_epsilon, target_delta)``-DP.

    The result ``sigma`` satisfies ``compute_epsilon(sigma, ...) <= target_epsilon`` with the
    same accountant and arguments, and is within ``tol`` (RDP) of the smallest such noise, or
    gives an epsilon within ``_CALIBRATION_RTOL`` (relative) below the target (PLD).
    `dp_accounting.calibrate_dp_mechanism` finds the root. For PLD it searches on a 10x coarser
    grid, whose epsilon is pessimistic by a smooth amount, and removes that bias with one or two
    evaluations on the requested grid. Progress is logged to the "jaxdp" logger.

    Raises:
      ValueError: if the target is invalid (``target_epsilon <= 0``, ``target_delta`` outside
        ``(0, 1)``, ``steps == 0``) or unreachable with ``noise_multiplier <=
        max_noise_multiplier`` (the message names the smallest attainable epsilon), with a
        message saying what to change.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(
            f"target_epsilon must be finite and > 0, got {target_epsilon}; "
            "no finite noise multiplier gives epsilon <= 0."
        )
    target_delta = _check_delta(target_delta)
    sampling_prob = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate: zero steps is private at any noise.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}.")
    make_accountant(accountant, pld_discretization=pld_discretization)  # validates both

    return _Calibration(
        target_epsilon,
        target_delta,
        sampling_prob,
        steps,
        accountant,
        pld_discretization,
        tol,
        max_noise_multiplier,
    ).run()


class _Calibration:
    """One `calibrate_noise_multiplier` search (validated arguments)."""

    def __init__(self, target, delta, q, steps, accountant, grid, tol, max_sigma):
        self.target, self.delta, self.q, self.steps = target, delta, q, steps
        self.accountant, self.fine_grid, self.tol, self.max_sigma = accountant, grid, tol, max_sigma
        # PLD searches on a coarser grid (each evaluation ~10x cheaper) and corrects at the end.
        self.grid = grid if accountant == "rdp" else grid * _SEARCH_COARSENING
        self.evaluations = 0
        self._cache: dict[tuple[float, float], float] = {}

    def epsilon(self, sigma: float, grid: float) -> float:
        if (sigma, grid) not in self._cache:
            self.evaluations += 1
            self._cache[sigma, grid] = compute_epsilon(
                sigma,
                self.q,
                self.steps,
                self.delta,
                accountant=self.accountant,
                pld_discretization=grid,
            )
        return self._cache[sigma, grid]

    def fine(self, sigma: float) -> float:
        return self.epsilon(sigma, self.fine_grid)

    def search(self, sigma: float) -> float:
        return self.epsilon(sigma, self.grid)

    def solve(self, goal: float, lo: float, hi: float) -> float:
        """dp_accounting's calibration: a root of epsilon(sigma) = goal on the search grid in
        [lo, hi] with epsilon <= goal there (hi itself if epsilon is infinite at lo: then the
        two are adjacent floats)."""
        if not math.isfinite(self.search(lo)):
            return hi

        def fresh() -> dp_accounting.PrivacyAccountant:
            self.evaluations += 1
            return make_accountant(self.accountant, pld_discretization=self.grid, fit_grid=True)

        return float(
            mechanism_calibration.calibrate_dp_mechanism(
                fresh,
                lambda sigma: dpsgd_event(sigma, self.q, self.steps),
                goal,
                self.delta,
                mechanism_calibration.ExplicitBracketInterval(lo, hi),
                tol=self.tol,
            )
        )

    def unattainable(self) -> ValueError:
        return ValueError(
            f"target_epsilon={self.target} at target_delta={self.delta:.3g} is not attainable "
            f"for {self.steps} steps at sampling_prob={self.q:.4g}: even a noise multiplier of "
            f"{self.max_sigma:g} gives epsilon={self.fine(self.max_sigma):.4g}. Use fewer steps, "
            "a smaller sampling_prob (larger dataset or smaller expected batch size), or a larger "
            "target_epsilon / target_delta."
        )

    def bracket(self) -> tuple[float, float]:
        guess = _gaussian_dp_guess(self.target, self.delta, self.q, self.steps)
        try:
            lo, hi = _bracket(self.search, self.target, guess, 1.25, self.max_sigma)
        except _UnreachableError:
            # The coarse grid is pessimistic: ask the requested one before refusing.
            if self.grid == self.fine_grid or self.fine(self.max_sigma) > self.target:
                raise self.unattainable() from None
            self.grid = self.fine_grid
            lo, hi = _bracket(self.fine, self.target, self.max_sigma, 1.25, self.max_sigma)
        if lo is None:
            raise ValueError(
                f"target_epsilon={self.target} is so large that a noise multiplier below "
                f"{MIN_NOISE_MULTIPLIER} already meets it; choose a smaller target_epsilon."
            )
        return lo, hi

    def run(self) -> float:
        started = time.perf_counter()
        log.info(
            "Calibrating the noise multiplier: epsilon=%g at delta=%.3g, q=%.4g, %d steps (%s).",
            self.target,
            self.delta,
            self.q,
            self.steps,
            self.accountant,
        )
        sigma = self.solve(self.target, *self.bracket())
        if self.grid != self.fine_grid:
            sigma = self.correct(sigma)
        log.info(
            "Noise multiplier %.4g gives epsilon=%.4g (%d accountant evaluations, %.1f s).",
            sigma,
            self.fine(sigma),
            self.evaluations,
            time.perf_counter() - started,
        )
        return sigma

    def correct(self, sigma: float) -> float:
        """From the search grid's root to the requested grid's: the coarse grid overstates
        epsilon by a smooth amount, measured at each candidate and aimed past, until epsilon on
        the requested grid is within `_CALIBRATION_RTOL` below the target."""
        best, goal = None, self.target
        for _ in range(_MAX_CORRECTIONS):
            eps = self.fine(sigma)
            if eps <= self.target and (best is None or sigma < best):
                best = sigma
            if self.target * (1 - _CALIBRATION_RTOL) <= eps <= self.target:
                break
            goal += self.target - eps
            try:
                lo, hi = _bracket(self.search, goal, sigma, 1.01, self.max_sigma)
            except _UnreachableError:
                break
            if lo is None:
                break
            sigma = self.solve(goal, lo, hi)
        while best is None:  # never pessimistic enough: add noise until it meets the target
            sigma *= 1 + _CALIBRATION_RTOL
            if sigma > self.max_sigma:
                raise self.unattainable()
            if self.fine(sigma) <= self.target:
                best = sigma
        return best


def _gaussian_dp_guess(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The noise multiplier whose DP-SGD run is mu-GDP with the mu that is (epsilon, delta)-DP,
    mu = q sqrt(steps (exp(1 / sigma^2) - 1)) (the central limit theorem of Bu et al. 2020):
    a starting point for the search, within 10% of the answer for typical settings."""

    def delta_of(mu: float) -> float:
        return (
            scipy.stats.norm.cdf(-epsilon / mu + mu / 2)
            - math.exp(epsilon) * scipy.stats.norm.cdf(-epsilon / mu - mu / 2)
            - delta
        )

    try:
        mu = scipy.optimize.brentq(delta_of, 1e-6, 50.0)
    except ValueError:
        return 1.0
    return 1.0 / math.sqrt(math.log1p(mu * mu / (q * q * steps)))


def max_steps_within_budget(
    noise_multiplier: float,
    sampling_prob: float,
    target_epsilon: float,
    target_delta: float,
    *,
    accountant: str = "pld",
    pld_discretization: float = 1e-4,
    upper: int = 1_000_000,
) -> int:
    """Largest ``k <= upper`` with ``compute_epsilon(noise_multiplier, ..., k) <= target_epsilon``.

    Returns 0 if even one step exceeds the budget (e.g. ``noise_multiplier == 0``) and ``upper``
    if ``upper`` steps fit. `dp_accounting.calibrate_dp_mechanism` with ``discrete=True`` finds
    a count within one of the largest; the neighbours settle it. PLD evaluations share one
    step's privacy loss distribution (`gaussian_step_pld`), so each is one self-composition.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon >= 0):
        raise ValueError(f"target_epsilon must be finite and >= 0, got {target_epsilon}.")
    target_delta = _check_delta(target_delta)
    upper = _check_positive_int("upper", upper)

    def fits(k: int) -> bool:
        eps = compute_epsilon(
            noise_multiplier,
            sampling_prob,
            k,
            target_delta,
            accountant=accountant,
            pld_discretization=pld_discretization,
        )
        return eps <= target_epsilon

    if fits(upper):
        return upper
    if not fits(1):
        return 0
    k = int(
        mechanism_calibration.calibrate_dp_mechanism(
            lambda: make_accountant(
                accountant, pld_discretization=pld_discretization, fit_grid=True
            ),
            lambda count: dpsgd_event(noise_multiplier, sampling_prob, int(count)),
            target_epsilon,
            target_delta,
            mechanism_calibration.ExplicitBracketInterval(1, upper),
            discrete=True,
        )
    )
    while k > 1 and not fits(k):
        k -= 1
    while k < upper and fits(k + 1):
        k += 1
    return k


# --------------------------------------------------------------------------------------------
# Internals.


class _UnreachableError(ValueError):
    """The target epsilon needs more noise than the search allows."""


def _bracket(
    eps_fn: Callable[[float], float],
    target: float,
    guess: float,
    factor: float,
    max_sigma: float,
) -> tuple[float | None, float]:
    """Finds lo < hi with finite eps(lo) > target >= eps(hi), stepping from ``guess`` by
    ``factor``, squared after every step that does not reach the target (up to 16x): a near guess
    gives a narrow bracket, a far one costs only a few more evaluations.

    Returns ``(None, hi)`` if even ``MIN_NOISE_MULTIPLIER`` meets the target; raises
    ``_UnreachableError`` if ``max_sigma`` does not.
    """
    cache: dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = eps_fn(sigma)
        return cache[sigma]

    guess = min(max(guess, MIN_NOISE_MULTIPLIER), max_sigma)
    if eps(guess) <= target:
        hi = guess
        while True:
            if hi <= MIN_NOISE_MULTIPLIER:
                return None, hi
            lo = max(hi / factor, MIN_NOISE_MULTIPLIER)
            if eps(lo) > target:
                break
            hi, factor = lo, min(factor**2, 16.0)
    else:
        lo = guess
        while True:
            if lo >= max_sigma:
                raise _UnreachableError()
            hi = min(lo * factor, max_sigma)
            if eps(hi) <= target:
                break
            lo, factor = hi, min(factor**2, 16.0)
    # brentq needs a finite value at the lower end: bisect (geometrically) while infinite. Where
    # epsilon jumps from infinite to <= target between two adjacent floats, lo stays infinite
    # and hi is the answer (`_Calibration.solve`).
    while not math.isfinite(eps(lo)):
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:
            break
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ValueError(f"Unknown sampling {sampling!r}; choose one of {SAMPLINGS}.")


def _check_noise_multiplier(noise_multiplier: float) -> float:
    noise_multiplier = float(noise_multiplier)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}.")
    return noise_multiplier


def _check_sampling_prob(sampling_prob: float) -> float:
    sampling_prob = float(sampling_prob)
    if not 0 < sampling_prob <= 1:
        raise ValueError(
            f"sampling_prob must be in (0, 1], got {sampling_prob} "
            "(sampling_prob = expected_batch_size / num_examples)."
        )
    return sampling_prob


def _check_steps(steps: int) -> int:
    try:
        steps = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.") from None
    if steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}.")
    return steps


def _check_positive_int(name: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return value


def _check_delta(target_delta: float) -> float:
    target_delta = float(target_delta)
    if not 0 < target_delta < 1:
        raise ValueError(
            f"target_delta must be in (0, 1), got {target_delta}; "
            "a common choice is below 1 / num_examples."
        )
    return target_delta


class EpsilonCurve:
    """epsilon(steps) of Poisson-sampled DP-SGD at fixed (noise_multiplier, sampling_prob, delta):
    `compute_epsilon`, memoised per number of steps (every query composes the one cached step
    PLD): cheap enough to report epsilon after every logged step."""

    def __init__(
        self,
        noise_multiplier: float,
        sampling_prob: float,
        target_delta: float,
        *,
        accountant: str = "pld",
        pld_discretization: float = 1e-4,
    ):
        self.noise_multiplier = noise_multiplier
        self.sampling_prob = sampling_prob
        self.target_delta = _check_delta(target_delta)
        self.accountant = accountant
        self.pld_discretization = pld_discretization
        self._cache: dict[int, float] = {}
        self._lock = threading.Lock()  # shared between threads (`epsilon_curve`)
        make_accountant(accountant)  # validates the name

    def __call__(self, steps: int) -> float:
        with self._lock:
            if steps not in self._cache:
                self._cache[steps] = compute_epsilon(
                    self.noise_multiplier,
                    self.sampling_prob,
                    steps,
                    self.target_delta,
                    accountant=self.accountant,
                    pld_discretization=self.pld_discretization,
                )
            return self._cache[steps]


@single_flight
def epsilon_curve(
    noise_multiplier: float, sampling_prob: float, target_delta: float, accountant: str = "pld"
) -> EpsilonCurve:
    """One shared `EpsilonCurve` per setting: plans with equal settings (a service planning many
    similar jobs) share their answers."""
    return EpsilonCurve(noise_multiplier, sampling_prob, target_delta, accountant=accountant)
