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

Cost: PLD accounting at small noise multipliers needs fine grids over a wide range of privacy
losses (a noise multiplier of 0.05 would need millions of points at the default discretization:
a minute and a gigabyte for two steps). ``pld_interval`` coarsens the grid by powers of two
so that one step's distribution has at most ``PLD_MAX_GRID_POINTS`` values; the result stays a
valid (pessimistic) upper bound, and at such noise multipliers epsilon is large anyway.

Sampling modes (``sampling=``):

* ``"poisson"``: the formal guarantee above.
* ``"truncated_poisson"``: Poisson sampling whose draw is truncated to at most
  ``truncated_batch_size`` examples by keeping a uniformly random subset
  (``TruncatedSubsampledGaussianDpEvent``, arXiv:2508.15089). Formal, PLD accountant only.
* ``"shuffle"`` / ``"fixed"``: batches were *not* Poisson-sampled (shuffled fixed-size batches,
  as in ordinary training). The epsilon returned is computed *as if* the batches had been
  Poisson-sampled with the same ``sampling_prob``; it is NOT a formal guarantee for what was run.
  Callers must label such numbers as approximate, e.g. with ``describe_guarantee(sampling)``.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting (and SciPy's optimizers) are imported where they are used: importing them takes
# about a second, which a process that never accounts (a benchmark's or a compile's) is spared.

log = logging.getLogger("jaxdp")

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
SAMPLINGS: tuple[str, ...] = ("poisson", "truncated_poisson", "shuffle", "fixed")
APPROXIMATE_SAMPLINGS: tuple[str, ...] = ("shuffle", "fixed")

# Bounds of the noise-multiplier search in `calibrate_noise_multiplier`.
MAX_NOISE_MULTIPLIER: float = 1e4
MIN_NOISE_MULTIPLIER: float = 1e-3
# Largest grid of one step's privacy loss distribution (see `pld_interval`).
PLD_MAX_GRID_POINTS: int = 2**19
# dp_accounting keeps the Gaussian's mass within about this many standard deviations
# (log_mass_truncation_bound = -50).
_PLD_TAIL_STDS: float = 10.0


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


def make_accountant(
    accountant: str = "pld", *, pld_discretization: float = 1e-4
) -> dp_accounting.PrivacyAccountant:
    """Returns a fresh (empty) accountant for the add-or-remove-one neighbouring relation.

    Args:
      accountant: ``"pld"`` (privacy loss distributions; tight, ~0.3 s per DP-SGD evaluation at
        the default discretization) or ``"rdp"`` (Renyi DP; looser, ~20 ms).
      pld_discretization: value discretization interval of the PLD accountant (used as given;
        `compute_epsilon` and friends first coarsen it at small noise multipliers, see
        `pld_interval`). Larger is faster and still a valid upper bound. Ignored for
        ``"rdp"``.
    """
    import dp_accounting
    from dp_accounting import pld, rdp

    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "pld":
        if not pld_discretization > 0:
            raise ValueError(f"pld_discretization must be > 0, got {pld_discretization}.")
        return pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=pld_discretization
        )
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def describe_guarantee(sampling: str = "poisson") -> str:
    """A human-readable label for the guarantee an epsilon computed for ``sampling`` carries.

    For ``"shuffle"`` / ``"fixed"`` the label starts with ``"APPROXIMATE"``: the number was
    computed as if batches were Poisson-sampled, which they were not.
    """
    _check_sampling(sampling)
    if sampling == "poisson":
        return "Poisson-subsampled Gaussian (add/remove-one)"
    if sampling == "truncated_poisson":
        return "truncated-Poisson-subsampled Gaussian (add/remove-one)"
    return (
        "APPROXIMATE: computed as if Poisson-sampled; batches were "
        f"{'shuffled' if sampling == 'shuffle' else 'fixed-size'}, not Poisson-sampled - "
        "this is not a formal guarantee"
    )


def dpsgd_event(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    *,
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``steps`` DP-SGD steps (see the module docstring for the guarantee).

    Args:
      noise_multiplier: noise std divided by ``l2_clip_norm``; ``>= 0``. Zero gives a
        ``NonPrivateDpEvent`` (epsilon is infinite) unless ``steps == 0``.
      sampling_prob: per-example inclusion probability ``q`` of each step, ``0 < q <= 1``.
      steps: number of noisy gradient steps, ``>= 0``. Zero gives ``NoOpDpEvent`` (epsilon 0).
      sampling: one of ``SAMPLINGS``. ``"shuffle"``/``"fixed"`` return the Poisson event (an
        approximation; see the module docstring).
      num_examples: dataset size; required for ``"truncated_poisson"``.
      truncated_batch_size: maximum batch size after truncation; required for
        ``"truncated_poisson"``.
    """
    import dp_accounting

    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    sampling_prob = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    _check_sampling(sampling)
    if sampling == "truncated_poisson":
        if num_examples is None or truncated_batch_size is None:
            raise ValueError(
                "sampling='truncated_poisson' needs num_examples and truncated_batch_size."
            )
        num_examples = _check_positive_int("num_examples", num_examples)
        truncated_batch_size = _check_positive_int("truncated_batch_size", truncated_batch_size)
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    if sampling == "truncated_poisson":
        step_event: dp_accounting.DpEvent = dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=num_examples,
            sampling_probability=sampling_prob,
            truncated_batch_size=truncated_batch_size,
            noise_multiplier=noise_multiplier,
        )
    else:
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
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
) -> float:
    """Epsilon such that ``steps`` DP-SGD steps are ``(epsilon, target_delta)``-DP.

    Add-or-remove-one neighbours; see the module docstring. For ``sampling`` in
    ``("shuffle", "fixed")`` this is the Poisson number, which is only an approximation: label it
    with ``describe_guarantee(sampling)``. Returns ``math.inf`` if ``noise_multiplier == 0`` and
    ``steps > 0``; ``0.0`` if ``steps == 0``.
    """
    target_delta = _check_delta(target_delta)
    acc = _composed_accountant(
        noise_multiplier,
        sampling_prob,
        steps,
        accountant,
        sampling,
        num_examples,
        truncated_batch_size,
        pld_discretization,
    )
    return float(acc.get_epsilon(target_delta))


def compute_delta(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    target_epsilon: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
) -> float:
    """Delta such that ``steps`` DP-SGD steps are ``(target_epsilon, delta)``-DP.

    Same setting and caveats as ``compute_epsilon``.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon >= 0):
        raise ValueError(f"target_epsilon must be finite and >= 0, got {target_epsilon}.")
    acc = _composed_accountant(
        noise_multiplier,
        sampling_prob,
        steps,
        accountant,
        sampling,
        num_examples,
        truncated_batch_size,
        pld_discretization,
    )
    return float(acc.get_delta(target_epsilon))


def _composed_accountant(
    noise_multiplier,
    sampling_prob,
    steps,
    accountant,
    sampling,
    num_examples,
    truncated_batch_size,
    pld_discretization,
) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant that has composed `steps` DP-SGD steps."""
    event = dpsgd_event(
        noise_multiplier,
        sampling_prob,
        steps,
        sampling=sampling,
        num_examples=num_examples,
        truncated_batch_size=truncated_batch_size,
    )
    interval = pld_interval(float(noise_multiplier), pld_discretization)
    return _compose(make_accountant(accountant, pld_discretization=interval), event)


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


@single_flight  # a pure function of its (scalar) arguments, taking seconds each
def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sampling_prob: float,
    steps: int,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
    tol: float = 1e-4,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier (within ``tol``) for which ``steps`` steps are
    ``(target_epsilon, target_delta)``-DP.

    The result ``sigma`` satisfies ``compute_epsilon(sigma, ...) <= target_epsilon`` with the same
    accountant and arguments (it is the upper end of a bisection on exactly that function), and
    ``sigma - tol`` does not (up to the accountant's numerics). Search: an RDP calibration (cheap)
    supplies a guess, which is bracketed with the chosen accountant and bisected. Progress is
    logged to the "jaxdp" logger.

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
    kwargs = _accountant_kwargs(
        accountant, sampling, num_examples, truncated_batch_size, pld_discretization
    )
    event = dpsgd_event(1.0, sampling_prob, steps, **_event_kwargs(kwargs))
    _check_supported(make_accountant(accountant), event)  # Fail early, before any search.
    cache: dict[float, float] = {}

    def eps(sigma: float) -> float:  # exactly what compute_epsilon reports
        if sigma not in cache:
            cache[sigma] = compute_epsilon(sigma, sampling_prob, steps, target_delta, **kwargs)
            log.debug("calibration: sigma=%.6g -> epsilon=%.6g", sigma, cache[sigma])
        return cache[sigma]

    started = time.perf_counter()
    log.info(
        "Calibrating the noise multiplier: epsilon=%g at delta=%.3g, q=%.4g, %d steps (%s).",
        target_epsilon,
        target_delta,
        sampling_prob,
        steps,
        accountant,
    )
    guess, factor, unreachable = 1.0, 2.0, False
    if accountant != "rdp":
        # PLD evaluations are slow (up to seconds), so bracket around a cheap RDP guess of the
        # Poisson event (RDP does not support truncated Poisson; a guess is all that is needed).
        rdp_eps = lambda sigma: (
            _make_rdp().compose(dpsgd_event(sigma, sampling_prob, steps)).get_epsilon(target_delta)
        )
        try:
            lo, hi = _bracket(rdp_eps, target_epsilon, 1.0, 2.0, max_noise_multiplier)
            guess = hi if lo is None else _bisect(rdp_eps, target_epsilon, lo, hi, 1e-2 * lo)
            factor = 1.1  # the real answer is near
        except _UnreachableError:
            # RDP cannot reach the target even at the largest noise: ask the real accountant
            # there once, and refuse at once if it cannot either (a search from scratch would
            # take a dozen slow evaluations to find out); else search from scratch.
            if eps(max_noise_multiplier) > target_epsilon:
                unreachable = True
            guess = 1.0
    try:
        if unreachable:
            raise _UnreachableError
        lo, hi = _bracket(eps, target_epsilon, guess, factor, max_noise_multiplier)
    except _UnreachableError:
        raise ValueError(
            f"target_epsilon={target_epsilon} at target_delta={target_delta:.3g} is not "
            f"attainable for {steps} steps at sampling_prob={sampling_prob:.4g}: even a noise "
            f"multiplier of {max_noise_multiplier:g} gives epsilon={eps(max_noise_multiplier):.4g}."
            f" Use fewer steps, a smaller sampling_prob (larger dataset or smaller expected batch "
            f"size), or a larger target_epsilon / target_delta."
        ) from None
    if lo is None:
        raise ValueError(
            f"target_epsilon={target_epsilon} is so large that a noise multiplier below "
            f"{MIN_NOISE_MULTIPLIER} already meets it; choose a smaller target_epsilon."
        )
    sigma = _bisect(eps, target_epsilon, lo, hi, tol)
    log.info(
        "Noise multiplier %.4g gives epsilon=%.4g (%d accountant evaluations, %.1f s).",
        sigma,
        eps(sigma),
        len(cache),
        time.perf_counter() - started,
    )
    return sigma


def _accountant_kwargs(
    accountant, sampling, num_examples, truncated_batch_size, pld_discretization
) -> dict:
    """The keyword arguments every epsilon evaluation of a search passes on."""
    return dict(
        accountant=accountant,
        sampling=sampling,
        num_examples=num_examples,
        truncated_batch_size=truncated_batch_size,
        pld_discretization=pld_discretization,
    )


def _event_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("sampling", "num_examples", "truncated_batch_size")}


def max_steps_within_budget(
    noise_multiplier: float,
    sampling_prob: float,
    target_epsilon: float,
    target_delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
    upper: int = 1_000_000,
) -> int:
    """Largest ``k <= upper`` with ``compute_epsilon(noise_multiplier, ..., k) <= target_epsilon``.

    Returns 0 if even one step exceeds the budget (e.g. ``noise_multiplier == 0``) and ``upper``
    if ``upper`` steps fit. Epsilon is nondecreasing in the number of steps, so this is a
    galloping + binary search, ``O(log k)`` accountant evaluations (PLD: ~0.3 s each), started
    from a cheap RDP estimate.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon >= 0):
        raise ValueError(f"target_epsilon must be finite and >= 0, got {target_epsilon}.")
    target_delta = _check_delta(target_delta)
    upper = _check_positive_int("upper", upper)
    kwargs = _accountant_kwargs(
        accountant, sampling, num_examples, truncated_batch_size, pld_discretization
    )

    def fits(k: int, **overrides) -> bool:
        args = kwargs | overrides
        return compute_epsilon(noise_multiplier, sampling_prob, k, target_delta, **args) <= (
            target_epsilon
        )

    start = 1
    if accountant != "rdp":
        # RDP is looser, so its answer is usually a slight underestimate: a good starting point.
        rdp_only = dict(accountant="rdp", sampling="poisson")
        start = max(1, _max_steps(lambda k: fits(k, **rdp_only), 1, upper))
    return _max_steps(fits, start, upper)


# --------------------------------------------------------------------------------------------
# Internals.


def _max_steps(fits: Callable[[int], bool], start: int, upper: int) -> int:
    """Largest k in [0, upper] with fits(k), assuming fits is monotone (True then False)."""
    start = min(start, upper)
    if fits(start):
        lo, hi = start, None  # fits(lo); hi is the first known failure.
        while hi is None:
            if lo == upper:
                return upper
            nxt = min(2 * lo, upper)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        hi, lo = start, None
        while lo is None:
            if hi == 1:
                return 0
            nxt = hi // 2
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


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
    # Brent's method needs a finite value at the lower end: bisect (geometrically) while inf.
    while not math.isfinite(eps(lo)):
        mid = math.sqrt(lo * hi)
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _bisect(
    eps_fn: Callable[[float], float], target: float, lo: float, hi: float, tol: float
) -> float:
    """The smallest evaluated sigma in [lo, hi] with eps(sigma) <= target, once the bracket
    (eps(lo) > target >= eps(hi)) is narrower than ``tol`` (relative above 1): a value that meets
    the target by construction. Brent's method on log(epsilon) finds the crossing."""
    import scipy.optimize

    feasible = [hi]

    def gap(sigma: float) -> float:
        value = eps_fn(sigma)
        if value <= target:
            feasible.append(sigma)
        return math.log(max(value, 1e-300)) - math.log(target)

    xtol = tol * max(1.0, lo) / 2
    scipy.optimize.brentq(gap, lo, hi, xtol=xtol, rtol=4 * np.finfo(float).eps)
    return min(feasible)


def _make_rdp() -> dp_accounting.PrivacyAccountant:
    """The RDP accountant for PLD calibration's initial guess: integer orders only, whose
    subsampled-Gaussian bounds are closed-form (fractional orders near 1 can fail to converge
    and fill the log with warnings; a guess does not need them)."""
    import dp_accounting
    from dp_accounting import rdp

    return rdp.RdpAccountant(
        orders=[float(a) for a in range(2, 257)],
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _compose(
    acc: dp_accounting.PrivacyAccountant, event: dp_accounting.DpEvent
) -> dp_accounting.PrivacyAccountant:
    _check_supported(acc, event)
    return acc.compose(event)


def _check_supported(acc: dp_accounting.PrivacyAccountant, event: dp_accounting.DpEvent) -> None:
    from dp_accounting import pld

    if not acc.supports(event):
        name = "pld" if isinstance(acc, pld.PLDAccountant) else "rdp"
        raise ValueError(
            f"The {name!r} accountant does not support {event}; use accountant='pld' for "
            "sampling='truncated_poisson'."
        )


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
    """epsilon(steps) of Poisson-sampled DP-SGD at fixed (noise_multiplier, sampling_prob, delta).

    The same numbers as `compute_epsilon`, but the one-step privacy loss distribution (the costly
    part of PLD accounting, seconds at small noise multipliers) is built once and self-composed
    per query, and answers are memoised: cheap enough to report epsilon after every logged step.
    """

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
        self._one_step = None
        self._cache: dict[int, float] = {}
        self._lock = threading.Lock()  # shared between threads (`epsilon_curve`)
        make_accountant(accountant)  # validates the name

    def __call__(self, steps: int) -> float:
        with self._lock:
            if steps not in self._cache:
                self._cache[steps] = self._epsilon(steps)
            return self._cache[steps]

    def _epsilon(self, steps: int) -> float:
        if steps == 0 or self.noise_multiplier == 0 or self.accountant != "pld":
            return compute_epsilon(
                self.noise_multiplier,
                self.sampling_prob,
                steps,
                self.target_delta,
                accountant=self.accountant,
                pld_discretization=self.pld_discretization,
            )
        if self._one_step is None:
            import dp_accounting
            from dp_accounting.pld import privacy_loss_distribution as pld_lib

            # Exactly what PLDAccountant composes for a PoissonSampledDpEvent(GaussianDpEvent).
            self._one_step = pld_lib.from_gaussian_mechanism(
                standard_deviation=self.noise_multiplier,
                value_discretization_interval=pld_interval(
                    self.noise_multiplier, self.pld_discretization
                ),
                sampling_prob=self.sampling_prob,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
        pld = self._one_step.self_compose(steps)
        return float(pld.get_epsilon_for_delta(self.target_delta))


@single_flight
def epsilon_curve(
    noise_multiplier: float, sampling_prob: float, target_delta: float, accountant: str = "pld"
) -> EpsilonCurve:
    """One shared `EpsilonCurve` per setting: plans with equal settings (a service planning many
    similar jobs) build the one-step privacy loss distribution once."""
    return EpsilonCurve(noise_multiplier, sampling_prob, target_delta, accountant=accountant)
