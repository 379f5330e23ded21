"""Prometheus metrics of the service (`GET /metrics`, for the operator): jobs by state (the
queue's depth is `jaxdp_jobs{state="queued"}`), workers alive and restarted, durations of the
jobs that ended, and planning durations (`jaxdp_plan_seconds`, from `planning`).

They are for the operator, who runs the service and holds its data anyway: durations depend on
the tenants' data (a job's steps follow from its record count), so they are served only with
the operator's token (`JAXDP_METRICS_TOKEN`), never to a tenant.
"""

from __future__ import annotations

import hmac
import os

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from jaxdp.serve import db, planning

JOB_SECONDS_BUCKETS = (10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


class ServiceCollector:
    """Reads the database at each scrape."""

    def __init__(self, sessions, supervisor):
        self.sessions, self.supervisor = sessions, supervisor

    def collect(self):
        with self.sessions() as s:
            by_state = select(db.Job.state, func.count()).group_by(db.Job.state)
            counts = dict(s.execute(by_state).all())
            durations = s.scalars(
                select(db.Job.finished_at - db.Job.started_at).where(
                    db.Job.finished_at.is_not(None) & db.Job.started_at.is_not(None)
                )
            ).all()
        jobs = GaugeMetricFamily("jaxdp_jobs", "Jobs by state.", labels=["state"])
        for state in db.JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        supervisor = self.supervisor()
        yield GaugeMetricFamily(
            "jaxdp_workers_alive",
            "Worker processes of this server that are alive.",
            value=supervisor.alive() if supervisor else 0,
        )
        yield GaugeMetricFamily(
            "jaxdp_worker_restarts",
            "Workers of this server that died and were replaced.",
            value=supervisor.restarts if supervisor else 0,
        )
        buckets, total = [], 0.0
        for bound in JOB_SECONDS_BUCKETS:
            buckets.append((str(float(bound)), sum(d <= bound for d in durations)))
        buckets.append(("+Inf", len(durations)))
        total = float(sum(durations))
        yield HistogramMetricFamily(
            "jaxdp_job_seconds", "Seconds from a job's start to its end.", buckets, total
        )


def registry(sessions, supervisor) -> CollectorRegistry:
    r = CollectorRegistry()
    r.register(ServiceCollector(sessions, supervisor))
    r.register(planning.PLAN_SECONDS)
    return r


def allowed(request) -> bool:
    """Only with the operator's token (`Authorization: Bearer $JAXDP_METRICS_TOKEN`); without a
    token set, never (a peer address says nothing behind a proxy on the same host)."""
    token = os.environ.get("JAXDP_METRICS_TOKEN")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return (
        bool(token)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(given.strip().encode(), token.encode())
    )


def render(r: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(r), CONTENT_TYPE_LATEST
