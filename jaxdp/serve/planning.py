"""Planning off the server's interpreter: noise calibration and ledger composition (each a PLD
computation of seconds, holding the interpreter lock) run in a pool of spawned processes, each
call with a deadline after which its process is killed and replaced, so that no request can
stall the others, and a client that gave up leaves nothing running past the deadline.

Results are cached in the server (a pure function of the arguments), so that a plan or a ledger
already computed is never computed again, whatever happened to the process that computed it.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pebble
from prometheus_client import Histogram

from jaxdp.serve import supervision

log = logging.getLogger("jaxdp.serve")


PLANNER_NICENESS = 5
# How long a call may wait for a planning process (one killed at its deadline is replaced, and
# the new one imports JAX: seconds) before it is refused as busy (503).
QUEUE_SECONDS = 60.0
PLAN_SECONDS = Histogram(
    "jaxdp_plan_seconds", "Seconds a planning call took (calibration, ledger).", ["function"]
)


class PlanningTimeout(ValueError):
    """A plan or a ledger took longer than the server's deadline."""


class PlanningBusy(RuntimeError):
    """Every planning process stayed busy for the deadline: try again later (503)."""

    def __init__(self, deadline: float):
        super().__init__(
            f"The server's planning processes stayed busy for {deadline:g} s: try again in a "
            f"minute."
        )


class _Refused(NamedTuple):
    """A cached ValueError: raised anew each time (a cached exception object would grow its
    traceback, and keep its frames, at every raise)."""

    kind: type
    args: tuple


def _outcome(outcome: Any) -> Any:
    if isinstance(outcome, _Refused):
        raise outcome.kind(*outcome.args)
    return outcome


def _forget() -> None:
    """Clears this pool process's caches of plans and compositions (see `Planner.run`)."""
    from jaxdp import accounting
    from jaxdp.serve import jobs

    accounting.calibrate_noise_multiplier.cache_clear()
    accounting.gaussian_step_pld.cache_clear()
    accounting.epsilon_curve.cache_clear()
    jobs.clear_caches()


def plan(spec: dict[str, Any], num_records: int, delta: float) -> dict[str, Any]:
    """(In a pool process.) The job's privacy plan: its publishable record and ledger entry."""
    from jaxdp.release import mechanism_record
    from jaxdp.serve import jobs

    _forget()
    p = jobs.plan_job(jobs.JobSpec.stored(spec), num_records, delta)
    return {
        "record": mechanism_record(p, randomness="secret: drawn when the job starts"),
        "entry": (p.accounting_noise_multiplier, p.sampling_prob, p.num_steps),
    }


def ledger_check(groups: list, delta: float, new: tuple) -> tuple[float, float]:
    """(In a pool process.) A dataset's worst-off record's epsilon before and after adding the
    job event `new`."""
    from jaxdp.serve import jobs

    _forget()
    return jobs.worst_record_epsilon(groups, delta), jobs.worst_record_epsilon(groups, delta, new)


def worst_epsilons(groups_per_dataset: list, delta: float) -> list[float]:
    """(In a pool process.) For each dataset's ledger groups: its worst-off record's epsilon."""
    from jaxdp.serve import jobs

    _forget()
    return [jobs.worst_record_epsilon(groups, delta) for groups in groups_per_dataset]


def _start_process(started: str) -> None:
    """A planning process: dies with the server; imports what plans need before its first task
    (seconds: never counted against a plan's deadline, also in a replacement process), then
    says so with a file named by its pid in the directory `started`."""
    supervision.die_with_parent()
    os.nice(PLANNER_NICENESS)  # a plan yields the CPU to the server's other requests
    from jaxdp.serve import jobs  # noqa: F401

    (Path(started) / str(os.getpid())).touch()


class LedgerMemo:
    """Each tenant's ledger epsilons by ledger state (a dataset's groups of DP events, delta),
    so that reading a ledger that has not changed composes nothing. A submission stores the
    epsilon it composed for the ledger it leaves behind; a read stores what it composed. Per
    tenant: what one tenant's requests computed never answers another's (see `Planner.run`)."""

    def __init__(self, size: int = 4096):
        self._known: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    @staticmethod
    def _key(tenant: str, groups: list, delta: float) -> tuple[str, str]:
        return tenant, hashlib.sha256(json.dumps([groups, delta]).encode()).hexdigest()

    def get(self, tenant: str, groups: list, delta: float) -> float | None:
        with self._lock:
            key = self._key(tenant, groups, delta)
            if key in self._known:
                self._known.move_to_end(key)
            return self._known.get(key)

    def put(self, tenant: str, groups: list, delta: float, epsilon: float) -> None:
        with self._lock:
            self._known[self._key(tenant, groups, delta)] = epsilon
            while len(self._known) > self._size:
                self._known.popitem(last=False)


def _warm() -> None:
    """Nothing: scheduled once per process at start-up, so that the processes start now."""


class Planner:
    """A pool of `processes` spawned processes; `await planner.run(fn, *args, deadline=...)` runs
    one planning function in it (from the event loop). Thread-safe."""

    def __init__(self, processes: int = 1, cache_size: int = 1024):
        self._processes = processes
        self._started = tempfile.TemporaryDirectory(prefix="jaxdp-planners-")
        self._ready = False
        self._pool = pebble.ProcessPool(
            max_workers=processes,
            context=multiprocessing.get_context("spawn"),
            initializer=_start_process,
            initargs=(self._started.name,),
        )
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._running: dict[str, Any] = {}  # key -> the pool's future computing it
        for _ in range(processes):
            self._pool.schedule(_warm)

    @staticmethod
    def _key(fn, args) -> str:
        return json.dumps([fn.__name__, args], sort_keys=True, default=repr)

    async def run(self, fn, *args, tenant: str, deadline: float) -> Any:
        """`fn(*args)` for `tenant` in a pool process, killed after `deadline` seconds of
        running (PlanningTimeout); refused with PlanningBusy if it waited longer than
        max(`deadline`, QUEUE_SECONDS) for a process. A ValueError it raises (an unattainable
        target) is re-raised.

        Results are computed once for everyone (the same call from 50 tenants is one PLD
        computation), but a tenant never learns from its latency that someone else computed
        it: a result another tenant's call computed is answered no sooner than that computation
        took, counted from this request's arrival (a bare cache hit answers in milliseconds
        where a plan takes seconds: it would tell one tenant another's record count). A
        tenant's own earlier result is answered at once. The pool processes forget their own
        caches after each call, so no shortcut hides inside them. A tenant has at most one
        call in the pool at a time, so that it cannot hold every planning process."""
        arrived = time.monotonic()
        key = json.dumps([fn.__name__, args], sort_keys=True, default=repr)
        while True:
            with self._lock:
                entry = self._cache.get(key)
                running = self._running.get(key)
                if entry is not None:
                    self._cache.move_to_end(key)
            if entry is not None:
                outcome, seconds, owners = entry
                if tenant not in owners:  # as long as computing it would have taken
                    await asyncio.sleep(max(0.0, arrived + seconds - time.monotonic()))
                    with self._lock:
                        owners.add(tenant)
                return _outcome(outcome)
            if running is None:
                break
            await asyncio.wait([asyncio.wrap_future(running)])  # its outcome, then as above
        waited = time.monotonic()
        while True:  # one call per tenant at a time (polling: any event loop, any thread)
            with self._lock:
                if tenant not in self._busy:
                    self._busy.add(tenant)
                    break
            if time.monotonic() - waited > max(deadline, QUEUE_SECONDS):
                raise PlanningBusy(max(deadline, QUEUE_SECONDS))
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        waiting = max(deadline, QUEUE_SECONDS)  # for a process, then `deadline` to run
        future = self._pool.schedule(fn, args=args, timeout=deadline)
        with self._lock:
            self._running[key] = future
        try:
            try:
                outcome = await asyncio.wait_for(asyncio.wrap_future(future), waiting + deadline)
            except TimeoutError:  # (concurrent.futures' and asyncio's are this one since 3.11)
                if future.cancelled():  # it waited too long in all: wait_for cancelled it
                    raise PlanningBusy(waiting) from None
                # pebble: it ran for `deadline` seconds and its process was killed
                outcome = _Refused(
                    PlanningTimeout,
                    (
                        f"Planning took longer than the server's deadline of {deadline:g} s (a "
                        f"PLD computation grows with the steps and with how small the noise "
                        f"is): ask for fewer steps or epochs, or a larger target epsilon.",
                    ),
                )
            except ValueError as e:
                outcome = _Refused(type(e), e.args)
            seconds = time.monotonic() - arrived
            with self._lock:
                self._cache[key] = (outcome, seconds, {tenant})
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        finally:
            with self._lock:
                self._busy.discard(tenant)
                self._running.pop(key, None)
            elapsed = time.perf_counter() - started
            PLAN_SECONDS.labels(fn.__name__).observe(elapsed)
            log.info("Planning %s for tenant %s took %.2f s.", fn.__name__, tenant, elapsed)
        return _outcome(outcome)

    def ready(self) -> bool:
        """Whether every one of the pool's processes has started and imported what plans need:
        a start-up gate (once true, it stays true; a replaced process is not waited for)."""
        if not self._ready:
            self._ready = len(os.listdir(self._started.name)) >= self._processes
        return self._ready

    @staticmethod
    def shared(processes: int = 1) -> Planner:
        """One planner per process, made on first use (a test's many apps share it)."""
        global _SHARED
        with _SHARED_LOCK:
            if _SHARED is None:
                _SHARED = Planner(processes)
                atexit.register(_SHARED.close)
            return _SHARED

    def close(self) -> None:
        """Stops the pool's processes now (a calculation under way is killed)."""
        self._pool.stop()
        self._pool.join(timeout=10)
        self._started.cleanup()


_SHARED: Planner | None = None
_SHARED_LOCK = threading.Lock()
