"""Jobs: submission (planned off the server's interpreter, reserved in the ledger under
the tenant's lock), list, progress (server-sent events), cancel, artifacts; and the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import select, update
from sse_starlette.sse import EventSourceResponse

from jaxdp.serve import db, jobs, planning
from jaxdp.serve.access import (
    Context,
    Tenant,
    check_public_eval,
    job_json,
)
from jaxdp.serve.problems import responses

RESERVE_TRIES = 5
# The JobSpec fields a privacy plan depends on (jobs.plan_job).
PLANNED = (
    "target_epsilon",
    "target_delta",
    "epochs",
    "steps",
    "expected_batch_size",
    "l2_clip_norm",
    "block_size",
    "max_blocks_per_record",
)


def register(app: FastAPI, c: Context) -> None:
    _submission(app, c)
    _following(app, c)
    _events(app, c)
    _ledger(app, c)


def _submission(app: FastAPI, c: Context) -> None:
    """POST /api/jobs: plan, compose the ledger, reserve."""
    plan = c.plan
    ledger_memo = c.ledger_memo

    @app.post(
        "/api/jobs",
        status_code=201,
        responses={
            **responses(400, 401, 404, 409, 413, 422, 503),
            200: {"description": "the job an earlier request with this Idempotency-Key made"},
        },
    )
    async def create_job(
        t: Tenant,
        spec: jobs.JobSpec,
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(
                min_length=1,
                max_length=200,
                description="the same key again returns the job it made (200), never a second "
                "one; with another body it is refused (422)",
            ),
        ] = None,
    ) -> dict[str, Any]:
        if idempotency_key is not None:
            earlier = await asyncio.to_thread(find_idempotent, c, t, idempotency_key, spec)
            if earlier is not None:
                response.status_code = 200
                return earlier
        dataset, base = await asyncio.to_thread(check_submission, c, t, spec)
        delta = t.delta  # the tenant's: every job, the cap and the ledger are stated at it
        # Only what the plan depends on: the same plan asked by many tenants is one computation.
        inputs = {k: v for k, v in spec.model_dump(exclude_none=True).items() if k in PLANNED}
        planned = await plan(t, planning.plan, inputs, dataset.num_records, delta)
        new = tuple(planned["entry"])
        for _ in range(RESERVE_TRIES):
            # The ledger composed off the server's interpreter, then the job reserved under
            # the tenant's lock only if the ledger is still what was composed (another
            # submission of the tenant may have changed it meanwhile: compose again).
            groups = await asyncio.to_thread(ledger_groups, c, t, dataset.id)
            spent, total = await plan(t, planning.ledger_check, groups, delta, new)
            job = await asyncio.to_thread(
                reserve, c, t, spec, dataset, base, planned, groups, spent, total, idempotency_key
            )
            if isinstance(job, dict):  # the same key's job, made meanwhile
                response.status_code = 200
                return job
            if job is not None:
                # Every group of the dataset now holds the new job's event: the ledger's next
                # read finds its epsilon here (the composition is of the same sorted events).
                ledger_memo.put(t.id, sorted(sorted([*g, new]) for g in groups), delta, total)
                return job_json(job, ledger={"spent_before": spent, "after": total, "delta": delta})
        raise HTTPException(
            409, "The ledger kept changing under concurrent submissions: submit again."
        )


def _following(app: FastAPI, c: Context) -> None:
    """A tenant's jobs: list, one, cancel."""
    sessions = c.sessions
    own_job = c.own_job

    @app.get("/api/jobs", responses=responses(401))
    def list_jobs(t: Tenant) -> list[dict[str, Any]]:
        with sessions() as s:
            rows = s.scalars(
                select(db.Job).where(db.Job.tenant_id == t.id).order_by(db.Job.created_at)
            )
            return [job_json(j) for j in rows]

    @app.get("/api/jobs/{job_id}", responses=responses(401, 404))
    def get_job(t: Tenant, job_id: str) -> dict[str, Any]:
        with sessions() as s:
            job = own_job(s, t, job_id)
            dataset = s.get(db.Dataset, job.dataset_id)
            return job_json(job, local_epsilon=dataset.local_epsilon)

    @app.post("/api/jobs/{job_id}/cancel", responses=responses(401, 404, 409))
    def cancel_job(t: Tenant, job_id: str) -> dict[str, Any]:
        with sessions.begin() as s:
            job = own_job(s, t, job_id)
            if job.state in db.TERMINAL:
                raise HTTPException(409, f"Job {job_id} has ended ({job.state}).")
            job.cancel_requested = True
            # Still queued, atomically (a worker may claim it meanwhile): it never ran and spent
            # nothing. A job a worker took stops at its next step and is charged what it ran.
            never_ran = s.execute(
                update(db.Job)
                .where((db.Job.id == job_id) & (db.Job.state == "queued"))
                .values(state="cancelled", finished_at=db.now(), cancel_requested=True)
            )
            if never_ran.rowcount == 1:
                entry = s.scalar(select(db.LedgerEntry).where(db.LedgerEntry.job_id == job_id))
                entry.steps, entry.final = 0, True
                s.add(db.JobEvent(job_id=job_id, kind="end", data={"state": "cancelled"}))
            s.flush()
            s.refresh(job)
            return job_json(job)


def _events(app: FastAPI, c: Context) -> None:
    """GET /api/jobs/{id}/events (server-sent events) and the artifacts' downloads."""
    workdir = c.workdir
    sessions = c.sessions
    own_job = c.own_job
    sse_poll_seconds = c.sse_poll_seconds

    @app.get(
        "/api/jobs/{job_id}/events",
        responses={
            **responses(401, 404, 422),
            200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
        },
        response_class=EventSourceResponse,
    )
    async def job_events(
        t: Tenant,
        job_id: str,
        request: Request,
        last_event_id: Annotated[int, Header(ge=0, le=2**62)] = 0,
    ) -> EventSourceResponse:
        """Server-sent events: "step" (step, num_steps, epsilon; under "private" the drawn
        batch's train loss, not noised: for the data's owner only), "eval" (metrics on the
        public eval set),
        "end" (the final state); the stream closes after "end"."""
        with sessions() as s:
            own_job(s, t, job_id)

        key = request.headers.get("authorization", "").partition(" ")[2].strip()

        def fetch(after: int):
            found = db.tenant_for_key(sessions, key)  # a key revoked meanwhile ends the stream
            if found is None or found.id != t.id:
                return None
            with sessions() as s:
                rows = s.scalars(
                    select(db.JobEvent)
                    .where((db.JobEvent.job_id == job_id) & (db.JobEvent.id > after))
                    .order_by(db.JobEvent.id)
                )
                return [(e.id, e.kind, e.data) for e in rows]

        async def stream():
            after = last_event_id
            while not await request.is_disconnected():
                events = await asyncio.to_thread(fetch, after)
                if events is None:
                    return
                for event_id, kind, data in events:
                    after = event_id
                    yield {"id": str(event_id), "event": kind, "data": json.dumps(data)}
                    if kind == "end":
                        return
                await asyncio.sleep(sse_poll_seconds)

        return EventSourceResponse(stream())

    @app.get(
        "/api/jobs/{job_id}/artifacts/{name}",
        responses={
            **responses(401, 404),
            200: {"content": {"application/octet-stream": {}}, "description": "the file"},
        },
        response_class=FileResponse,
    )
    def artifact(t: Tenant, job_id: str, name: str) -> FileResponse:
        with sessions() as s:
            job = own_job(s, t, job_id)
        if name not in (job.artifacts or {}):
            raise HTTPException(404, f"Job {job_id} has no artifact {name!r} (yet).")
        path = jobs.job_dir(workdir, job) / "artifacts" / name
        return FileResponse(
            path, filename=name, headers={"X-Content-SHA256": job.artifacts[name]["sha256"]}
        )


def _ledger(app: FastAPI, c: Context) -> None:
    """GET /api/ledger: each dataset's worst-off record's epsilon."""
    sessions = c.sessions
    plan = c.plan
    ledger_memo = c.ledger_memo

    @app.get("/api/ledger", responses=responses(401, 422, 503))
    async def ledger(t: Tenant) -> list[dict[str, Any]]:
        """Per dataset (deleted ones too): the epsilon of its worst-off record, composed over
        every job on any dataset holding that record (PLD), at the tenant's delta."""
        rows = await asyncio.to_thread(ledger_rows, t)
        groups = [r.pop("groups") for r in rows]
        epsilons = [ledger_memo.get(t.id, g, t.delta) for g in groups]
        unknown = [g for g, e in zip(groups, epsilons, strict=True) if e is None]
        if unknown:  # composed off the server's interpreter, remembered for the next read
            computed = iter(await plan(t, planning.worst_epsilons, unknown, t.delta))
            for i, e in enumerate(epsilons):
                if e is None:
                    epsilons[i] = next(computed)
                    ledger_memo.put(t.id, groups[i], t.delta, epsilons[i])
        return [{**r, "epsilon": e} for r, e in zip(rows, epsilons, strict=True)]

    def ledger_rows(t: db.Tenant) -> list[dict[str, Any]]:
        with sessions() as s:
            datasets = s.scalars(
                select(db.Dataset)
                .where(db.Dataset.tenant_id == t.id)
                .order_by(db.Dataset.created_at)
            ).all()
            out = []
            for d in datasets:
                groups = jobs.ledger_groups(s, t.id, d.id)
                jobs_on = s.scalars(
                    select(db.LedgerEntry.job_id).where(db.LedgerEntry.dataset_id == d.id)
                ).all()
                out.append(
                    {
                        "dataset_id": d.id,
                        "deleted": d.deleted_at is not None,
                        "groups": groups,
                        "delta": t.delta,
                        "epsilon_cap": t.epsilon_cap,
                        "jobs": len(jobs_on),
                        "jobs_on_shared_records": max(len(g) for g in groups),
                    }
                )
            return out


def find_idempotent(c: Context, t: db.Tenant, key: str, spec: jobs.JobSpec, s=None) -> dict | None:
    """The job an earlier submission with this Idempotency-Key made, if any."""
    with contextlib.nullcontext(s) if s is not None else c.sessions() as s:
        job = s.scalar(
            select(db.Job).where((db.Job.tenant_id == t.id) & (db.Job.idempotency_key == key))
        )
        if job is None:
            return None
        if job.spec != spec.model_dump(exclude_none=True):
            raise HTTPException(
                422,
                f"Idempotency-Key {key!r} was used for job {job.id} with another body: use a "
                f"new key for a new job.",
            )
        return job_json(job)


def check_submission(c: Context, t: db.Tenant, spec: jobs.JobSpec) -> tuple[db.Dataset, str]:
    with c.sessions() as s:
        dataset = c.own_dataset(s, t, spec.dataset_id)
        if spec.eval_dataset_id:
            check_public_eval(s, t, c.own_dataset(s, t, spec.eval_dataset_id))
    registered = db.base_models(c.sessions)
    if spec.base_model not in registered:
        names = ", ".join(sorted(registered)) or "none yet (the admin adds them)"
        raise HTTPException(422, f"No base model named {spec.base_model!r}; registered: {names}.")
    return dataset, registered[spec.base_model]


def ledger_groups(c: Context, t: db.Tenant, dataset_id: str) -> list[list[jobs.Entry]]:
    with c.sessions() as s:
        return jobs.ledger_groups(s, t.id, dataset_id)


def reserve(c: Context, t, spec, dataset, base, planned, groups, spent, total, idempotency_key):
    """Queues the job and reserves its planned steps in the ledger, under the tenant's
    lock (PostgreSQL: a row lock; SQLite: BEGIN IMMEDIATE), so that no two submissions of
    a tenant, on any of its datasets, can both pass the cap check: jobs on different
    datasets that share records compose in the same ledger. None: the ledger changed
    since `groups` were read."""
    with c.sessions.begin() as s:
        db.lock_tenant(s, t.id)
        if idempotency_key is not None and (
            earlier := find_idempotent(c, t, idempotency_key, spec, s)
        ):
            return earlier
        c.own_dataset(s, t, dataset.id)  # not deleted while the plan was made
        if spec.eval_dataset_id:
            check_public_eval(s, t, c.own_dataset(s, t, spec.eval_dataset_id))
        if jobs.ledger_groups(s, t.id, dataset.id) != groups:
            return None
        cap = s.get(db.Tenant, t.id).epsilon_cap  # as it is now (the admin may change it)
        if total > cap:
            raise HTTPException(422, jobs.cap_message(spent, total, cap, t.delta))
        noise_multiplier, sampling_prob, steps = planned["entry"]
        job = db.Job(
            tenant_id=t.id,
            dataset_id=dataset.id,
            spec=spec.model_dump(exclude_none=True),
            base_source=base,
            plan=planned["record"],
            idempotency_key=idempotency_key,
        )
        s.add(job)
        s.flush()
        s.add(
            db.LedgerEntry(
                tenant_id=t.id,
                dataset_id=dataset.id,
                job_id=job.id,
                noise_multiplier=noise_multiplier,
                sampling_prob=sampling_prob,
                steps=steps,
            )
        )
    return job
