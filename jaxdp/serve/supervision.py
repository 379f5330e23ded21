"""Processes that live and die with the server: worker processes restarted when they die (their
job handed back at once), and every child (workers, planning processes) ended with the server
whatever signal ends it (SIGTERM, SIGINT, SIGKILL).

Two mechanisms end a child with its parent: Linux's PR_SET_PDEATHSIG (the kernel sends SIGKILL
when the parent thread dies) and, on every platform, a thread that ends the process once its
parent is gone (its parent pid changes).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("jaxdp.serve")
PR_SET_PDEATHSIG = 1
WORKER_NICENESS = 10  # the CPU goes to the server's requests (and planning) before training


def die_with_parent(poll_seconds: float = 1.0) -> None:
    """Ends this process when its parent dies (call it first thing in a child)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def worker_entry(
    workdir: str, db_url: str, options: dict[str, Any], ready: Any | None = None
) -> None:
    """A spawned worker process: dies with the server, imports the training stack (seconds of
    CPU), says so through `ready` (a multiprocessing Event), then claims and runs jobs."""
    die_with_parent()
    os.nice(WORKER_NICENESS)  # training is batch work: the server's requests come first
    from jaxdp.serve import jobs, logs

    logs.configure()
    if ready is not None:
        ready.set()
    jobs.run_worker(workdir, db_url, **options)


class WorkerSupervisor:
    """Keeps `count` worker processes running: a dead one is logged, its running job handed back
    at once (claimable by any worker, it resumes from its checkpoint) and it is replaced."""

    def __init__(
        self,
        workdir: Path,
        db_url: str,
        count: int,
        options: dict[str, Any],
        *,
        check_seconds: float = 1.0,
    ):
        self.workdir, self.db_url, self.count, self.options = workdir, db_url, count, options
        self.check_seconds = check_seconds
        self.context = multiprocessing.get_context("spawn")
        self.procs: dict[int, tuple[multiprocessing.Process, str]] = {}
        self._ready: dict[int, Any] = {}  # slot -> the Event its worker sets once imported
        self._all_ready = False  # set by the watch thread (never on the caller's thread)
        self.restarts = 0
        self.deaths: dict[int, int] = {}
        self._dead_since: dict[int, float] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _start(self, slot: int) -> None:
        self._generation += 1
        worker_id = f"{os.uname().nodename}:{os.getpid()}:w{slot}.{self._generation}"
        ready = self.context.Event()
        proc = self.context.Process(
            target=worker_entry,
            args=(str(self.workdir), self.db_url, {**self.options, "worker_id": worker_id}, ready),
            name=f"jaxdp-worker-{slot}",
            daemon=True,
        )
        proc.start()
        self.procs[slot] = (proc, worker_id)
        self._ready[slot] = ready
        log.info("Worker %s started (pid %d).", worker_id, proc.pid)

    def start(self) -> WorkerSupervisor:
        for slot in range(self.count):
            self._start(slot)
        self._thread.start()
        return self

    def alive(self) -> int:
        return sum(proc.is_alive() for proc, _ in self.procs.values())

    def ready(self) -> bool:
        """Whether the workers started at start-up have imported what they need: a start-up
        gate (once true, it stays true; a restarted worker is logged and counted in /metrics,
        and does not take the server out of service). A plain flag that the watch thread sets,
        so that asking never touches a lock the workers share."""
        return self._all_ready or self.count == 0

    def _watch(self) -> None:
        """Checks the workers every `check_seconds`. It never ends before `stop`: an error (the
        database unreachable) is logged and the next pass tries again, since the workers this
        thread started would die with it (PR_SET_PDEATHSIG follows the parent thread)."""
        from jaxdp.serve import db

        sessions = db.connect(self.db_url)
        while not self._stop.wait(self.check_seconds if self._all_ready else 0.1):
            if not self._all_ready:
                self._all_ready = all(event.is_set() for event in self._ready.values())
            try:
                with self._lock:
                    self._check(sessions)
            except Exception:
                log.exception("Checking the workers failed; the next pass tries again.")

    def _check(self, sessions) -> None:
        from jaxdp.serve import db

        for slot, (proc, worker_id) in list(self.procs.items()):
            if proc.is_alive() or self._stop.is_set():
                continue
            if slot not in self._dead_since:
                handed_back = db.release_jobs_of(sessions, worker_id)
                self.deaths[slot] = self.deaths.get(slot, 0) + 1
                self._dead_since[slot] = time.monotonic()
                log.error(
                    "Worker %s (pid %d) died (exit code %s); its job(s) %s handed back; "
                    "restarting it.",
                    worker_id,
                    proc.pid,
                    proc.exitcode,
                    ", ".join(handed_back) or "none",
                )
            # Back off when a slot's workers keep dying: 0 s, then 2, 4, ... up to a minute.
            delay = min(60.0, 2.0 ** (self.deaths[slot] - 1)) if self.deaths[slot] > 1 else 0.0
            if time.monotonic() - self._dead_since[slot] >= delay:
                del self._dead_since[slot]
                self.restarts += 1
                self._start(slot)

    def stop(self, timeout: float = 30.0) -> None:
        """Terminates every worker (SIGTERM, then SIGKILL after `timeout`), then the watch."""
        with self._lock:
            self._stop.set()
        for proc, _ in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc, worker_id in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("Worker %s did not stop in %g s: killed.", worker_id, timeout)
                proc.kill()
                proc.join()
        if self._thread.is_alive():
            self._thread.join()
        from jaxdp.serve import db

        sessions = db.connect(self.db_url)
        for _, worker_id in self.procs.values():  # the next server's workers resume them now
            if handed_back := db.release_jobs_of(sessions, worker_id):
                log.info("Job(s) %s of worker %s handed back.", ", ".join(handed_back), worker_id)
