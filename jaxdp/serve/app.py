"""The service's web app: the page (upload, perturb in the browser, train, download) and the
REST API (JSON; OpenAPI at /openapi.json, Swagger UI at /docs from a package, no CDN). Every
/api call but /api/health needs a tenant's API key (`Authorization: Bearer jdp_...`); another
tenant's dataset or job is a 404, as if it did not exist.

Errors are RFC 9457 problem details (`problems`): a missing or wrong key is 401; a body over its
limit or a tenant over its storage quota 413; over its dataset quota 429; text that is not
UTF-8, an empty dataset, a malformed JSONL record, an invalid or unattainable or over-the-cap
target 422 with the reason (and the numbers). Nothing slow runs on the event loop: uploads are
parsed and stored in threads, planning in a process pool with a deadline (`planning`), and
training never happens in a request: a job is queued and a worker process runs it (`jobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import swagger_ui_bundle
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import aliased
from sse_starlette.sse import EventSourceResponse

from jaxdp.serve import db, jobs, metrics, planning, problems
from jaxdp.serve.problems import responses

STATIC = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 << 10  # the multipart envelope around an upload's bytes
RESERVE_TRIES = 5
NO_KEY = "A valid API key is needed (Authorization: Bearer jdp_...)."
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
MAX_NAME = 200  # characters of a dataset's name
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
MAX_LOCAL_EPSILON = 1e3


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is over this route's limit of {limit} bytes.")


class BodyLimit:
    """ASGI middleware: a body sent to /api/ without a valid API key is refused with 401, and a
    body over `limit(path)` bytes with 413, by its Content-Length, both before anything is
    read, and while it streams (a chunked or lying client)."""

    def __init__(self, app, limit, sessions):
        self.app, self.limit, self.sessions = app, limit, sessions

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["method"] in ("POST", "PUT", "PATCH") and scope["path"].startswith("/api/"):
            # The key first: a client without one gets 401 before any of its body is read.
            key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")[2].strip()
            if await asyncio.to_thread(db.tenant_for_key, self.sessions, key) is None:
                return await problems.problem(
                    401,
                    NO_KEY,
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
        limit = self.limit(scope["path"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await problems.problem(413, BodyTooLarge(limit).detail)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return await self.app(scope, limited, send)


BEARER = HTTPBearer(
    auto_error=False, scheme_name="apiKey", description="A tenant's API key: jdp_..."
)


def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> db.Tenant:
    """The tenant whose API key the request carries (the scheme's case does not matter); 401
    without a valid one."""
    key = credentials.credentials.strip() if credentials else None
    found = db.tenant_for_key(request.app.state.sessions, key)
    if found is None:
        raise HTTPException(
            401,
            NO_KEY,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


Tenant = Annotated[db.Tenant, Depends(current_tenant)]


def create_app(  # noqa: C901 (routes to be split into modules)
    workdir: str | Path,
    db_url: str | None = None,
    *,
    max_upload_bytes: int = 100 * 2**20,
    max_json_bytes: int = 64 * 2**10,
    max_datasets_per_tenant: int = 100,
    max_bytes_per_tenant: int = 2**30,
    sse_poll_seconds: float = 0.5,
    plan_deadline: float = 30.0,
    planner: planning.Planner | None = None,
    lifespan=None,
) -> FastAPI:
    """The app for the service in `workdir` (database: `db_url`, default SQLite in workdir).
    Planning runs in `planner`'s processes (default: this process's shared one), each call
    killed after `plan_deadline` seconds."""
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sessions = db.connect(db_url or db.default_url(workdir))
    planner = planner or planning.Planner.shared()
    db.add_canonical_digests(sessions)
    _private_dir(workdir)
    app = FastAPI(
        title="jaxdp serve",
        description="Private fine-tuning: upload text, train a DP-LoRA model, download it. "
        "Errors are RFC 9457 problem details (application/problem+json).",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.sessions = sessions
    problems.install(app)
    docs_assets = Path(swagger_ui_bundle.swagger_ui_path)
    app.state.metrics = metrics.registry(sessions, lambda: getattr(app.state, "supervisor", None))
    app.add_middleware(
        BodyLimit,
        limit=lambda path: (
            max_upload_bytes + MULTIPART_SLACK if path == "/api/datasets" else max_json_bytes
        ),
        sessions=sessions,
    )

    ledger_memo = planning.LedgerMemo()

    async def plan(t: db.Tenant, fn, *args):
        try:
            return await planner.run(fn, *args, tenant=t.id, deadline=plan_deadline)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        except planning.PlanningBusy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "60"}) from None

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def own_dataset(s, t: db.Tenant, dataset_id: str) -> db.Dataset:
        d = s.get(db.Dataset, dataset_id)
        if d is None or d.tenant_id != t.id or d.deleted_at is not None:
            raise HTTPException(404, f"No dataset {dataset_id!r}.")
        return d

    def own_job(s, t: db.Tenant, job_id: str) -> db.Job:
        j = s.get(db.Job, job_id)
        if j is None or j.tenant_id != t.id:
            raise HTTPException(404, f"No job {job_id!r}.")
        return j

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI from the swagger-ui-bundle package (no CDN: a third-party script would
        run on the origin where the page keeps the API key)."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="jaxdp serve API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    @app.get("/docs-assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        """The three files /docs loads, nothing else of the bundle (its index.html and
        initializer would fetch a third-party example document)."""
        if name not in DOCS_ASSETS:
            raise HTTPException(404, f"No {name!r}.")
        return FileResponse(docs_assets / name)

    @app.get("/embeddings/{name}", include_in_schema=False)
    def embeddings(name: str) -> Response:
        path = workdir / "embeddings" / name
        if name not in ("vocab.json", "vectors.f16", "meta.json") or not path.is_file():
            raise HTTPException(404, "No embeddings: run `jaxdp serve build-embeddings`.")
        if name == "meta.json":  # what the page needs, never where the corpus lies
            meta = json.loads(path.read_text())
            return JSONResponse({k: meta[k] for k in ("dim", "vocab_size", "dtype") if k in meta})
        return FileResponse(path)

    @app.get("/api/health")
    def health() -> dict[str, str]:
        """Liveness: the server answers."""
        return {"status": "ok"}

    @app.get("/api/ready", responses=responses(503))
    def ready() -> dict[str, str]:
        """Readiness: the planning processes and the workers have started and imported what
        they need (seconds of CPU each after a start). Send traffic once this answers 200."""
        supervisor = getattr(app.state, "supervisor", None)
        if not planner.ready() or (supervisor is not None and not supervisor.ready()):
            raise HTTPException(
                503,
                "Starting: the planners and workers are not ready yet.",
                headers={"Retry-After": "1"},
            )
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request) -> Response:
        """Prometheus metrics, for the operator: served to clients on this host only, or to
        any with `Authorization: Bearer <JAXDP_METRICS_TOKEN>`."""
        if not metrics.allowed(request):
            raise HTTPException(404, "Not found.")
        body, content_type = metrics.render(app.state.metrics)
        return Response(body, media_type=content_type)

    @app.get("/api/me", responses=responses(401))
    def me(t: Tenant) -> dict[str, Any]:
        return {"tenant": t.name, "epsilon_cap": t.epsilon_cap, "delta": t.delta}

    @app.get("/api/models", responses=responses(401))
    def models(t: Tenant) -> list[str]:
        """The base models a job may name (registered by the admin)."""
        return sorted(db.base_models(sessions))

    # ---- Datasets ---------------------------------------------------------------------------

    @app.post("/api/datasets", status_code=201, responses=responses(400, 401, 413, 422, 429))
    async def upload(
        t: Tenant,
        file: Annotated[UploadFile, File(description="plain text or JSONL")],
        format: Annotated[
            Literal["text", "jsonl"], Form(description='"text" (a record per line) or "jsonl"')
        ] = "text",
        name: Annotated[str | None, Form(max_length=MAX_NAME)] = None,
        public: Annotated[
            bool,
            Form(
                description="declare the text public: only then may a job evaluate on it, "
                "since evaluation metrics are released without noise"
            ),
        ] = False,
        local_epsilon: Annotated[
            float | None,
            Form(
                gt=0,
                le=MAX_LOCAL_EPSILON,
                description="declared by the uploader: the per-word epsilon it perturbed with",
            ),
        ] = None,
    ) -> dict[str, Any]:
        if local_epsilon is not None and not math.isfinite(local_epsilon):
            raise HTTPException(422, "local_epsilon must be a finite positive number.")
        # The body was streamed (BodyLimit) into a spooled file; everything else is off the
        # event loop.
        name = name or (file.filename or "")[:MAX_NAME] or None
        return await asyncio.to_thread(
            store_upload, t, file.file, format, name, public, local_epsilon
        )

    def store_upload(t, stream, format, name, public, local_epsilon) -> dict[str, Any]:
        stream.seek(0)
        raw = stream.read(max_upload_bytes + 1)
        if len(raw) > max_upload_bytes:
            raise HTTPException(413, f"The upload is over {max_upload_bytes} bytes.")
        records, duplicates = unique_records(parse_records(raw, format))
        body = "".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in records)
        dataset_id = db.new_id()
        path = workdir / "tenants" / t.id / "datasets" / f"{dataset_id}.jsonl"
        _private_dir(path.parent)
        with sessions() as s:  # the slow parts (digests, the file) outside the tenant's lock
            tenant = s.get(db.Tenant, t.id)
        digests = db.record_digests(tenant, records)
        content = db.content_digest(tenant, body)
        _write_private(path, body.encode())
        try:
            with sessions.begin() as s:
                db.lock_tenant(s, t.id)  # the quotas, checked against concurrent uploads
                held = s.execute(
                    select(func.count(), func.coalesce(func.sum(db.Dataset.num_bytes), 0)).where(
                        (db.Dataset.tenant_id == t.id) & db.Dataset.deleted_at.is_(None)
                    )
                ).one()
                if held[0] >= max_datasets_per_tenant:
                    raise HTTPException(
                        429,
                        f"The tenant holds {held[0]} datasets, its quota: delete one to upload "
                        f"another.",
                    )
                if held[1] + len(raw) > max_bytes_per_tenant:
                    raise HTTPException(
                        413,
                        f"This upload ({len(raw)} bytes) would take the tenant's datasets to "
                        f"{held[1] + len(raw)} bytes, over its quota of {max_bytes_per_tenant}: "
                        f"delete datasets first.",
                    )
                d = db.Dataset(
                    id=dataset_id,
                    tenant_id=t.id,
                    name=name or dataset_id,
                    path=str(path),
                    num_records=len(records),
                    num_duplicates=duplicates,
                    num_bytes=len(raw),
                    content_sha256=content,
                    local_epsilon=local_epsilon,
                    public=public,
                    canonical=True,
                )
                s.add(d)
                s.flush()
                s.execute(
                    insert(db.DatasetRecord),
                    [{"dataset_id": d.id, "digest": x, "tenant_id": t.id} for x in digests],
                )
        except BaseException:
            path.unlink(missing_ok=True)  # refused or failed: nothing of it stays
            raise
        return dataset_json(d)

    @app.get("/api/datasets", responses=responses(401))
    def list_datasets(t: Tenant) -> list[dict[str, Any]]:
        with sessions() as s:
            rows = s.scalars(
                select(db.Dataset)
                .where((db.Dataset.tenant_id == t.id) & db.Dataset.deleted_at.is_(None))
                .order_by(db.Dataset.created_at)
            )
            return [dataset_json(d) for d in rows]

    @app.get("/api/datasets/{dataset_id}", responses=responses(401, 404))
    def get_dataset(t: Tenant, dataset_id: str) -> dict[str, Any]:
        with sessions() as s:
            return dataset_json(own_dataset(s, t, dataset_id))

    @app.delete("/api/datasets/{dataset_id}", status_code=204, responses=responses(401, 404, 409))
    def delete_dataset(t: Tenant, dataset_id: str) -> Response:
        """Deletes the upload and every copy of its text the service derived from it (the jobs'
        token caches); the trained models and the ledger are kept."""
        with sessions.begin() as s:
            db.lock_tenant(s, t.id)
            d = own_dataset(s, t, dataset_id)
            using = s.scalars(select(db.Job).where(db.Job.tenant_id == t.id)).all()
            using = [
                j for j in using if dataset_id in (j.dataset_id, j.spec.get("eval_dataset_id"))
            ]
            active = [j.id for j in using if j.state not in db.TERMINAL]
            if active:
                raise HTTPException(
                    409, f"Job(s) {', '.join(active)} use this dataset: cancel them first."
                )
            Path(d.path).unlink(missing_ok=True)
            for job in using:
                shutil.rmtree(jobs.job_dir(workdir, job) / "private" / "cache", ignore_errors=True)
            d.deleted_at = db.now()
        return Response(status_code=204)

    # ---- Jobs -------------------------------------------------------------------------------

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
            earlier = await asyncio.to_thread(find_idempotent, t, idempotency_key, spec)
            if earlier is not None:
                response.status_code = 200
                return earlier
        dataset, base = await asyncio.to_thread(check_submission, t, spec)
        delta = t.delta  # the tenant's: every job, the cap and the ledger are stated at it
        # Only what the plan depends on: the same plan asked by many tenants is one computation.
        inputs = {k: v for k, v in spec.model_dump(exclude_none=True).items() if k in PLANNED}
        planned = await plan(t, planning.plan, inputs, dataset.num_records, delta)
        new = tuple(planned["entry"])
        for _ in range(RESERVE_TRIES):
            # The ledger composed off the server's interpreter, then the job reserved under
            # the tenant's lock only if the ledger is still what was composed (another
            # submission of the tenant may have changed it meanwhile: compose again).
            groups = await asyncio.to_thread(ledger_groups, t, dataset.id)
            spent, total = await plan(t, planning.ledger_check, groups, delta, new)
            job = await asyncio.to_thread(
                reserve, t, spec, dataset, base, planned, groups, spent, total, idempotency_key
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

    def find_idempotent(t: db.Tenant, key: str, spec: jobs.JobSpec, s=None) -> dict | None:
        """The job an earlier submission with this Idempotency-Key made, if any."""
        with contextlib.nullcontext(s) if s is not None else sessions() as s:
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

    def check_submission(t: db.Tenant, spec: jobs.JobSpec) -> tuple[db.Dataset, str]:
        with sessions() as s:
            dataset = own_dataset(s, t, spec.dataset_id)
            if spec.eval_dataset_id:
                check_public_eval(s, t, own_dataset(s, t, spec.eval_dataset_id))
        registered = db.base_models(sessions)
        if spec.base_model not in registered:
            names = ", ".join(sorted(registered)) or "none yet (the admin adds them)"
            raise HTTPException(
                422, f"No base model named {spec.base_model!r}; registered: {names}."
            )
        return dataset, registered[spec.base_model]

    def ledger_groups(t: db.Tenant, dataset_id: str) -> list[list[jobs.Entry]]:
        with sessions() as s:
            return jobs.ledger_groups(s, t.id, dataset_id)

    def reserve(t, spec, dataset, base, planned, groups, spent, total, idempotency_key):
        """Queues the job and reserves its planned steps in the ledger, under the tenant's
        lock (PostgreSQL: a row lock; SQLite: BEGIN IMMEDIATE), so that no two submissions of
        a tenant, on any of its datasets, can both pass the cap check: jobs on different
        datasets that share records compose in the same ledger. None: the ledger changed
        since `groups` were read."""
        with sessions.begin() as s:
            db.lock_tenant(s, t.id)
            if idempotency_key is not None and (
                earlier := find_idempotent(t, idempotency_key, spec, s)
            ):
                return earlier
            own_dataset(s, t, dataset.id)  # not deleted while the plan was made
            if spec.eval_dataset_id:
                check_public_eval(s, t, own_dataset(s, t, spec.eval_dataset_id))
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

    @app.exception_handler(ValueError)
    def value_error(_: Request, e: ValueError) -> JSONResponse:
        return problems.problem(422, str(e))

    return app


def _private_dir(path: Path) -> None:
    """A directory only the service's user can read (0700), made if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _write_private(path: Path, data: bytes) -> None:
    """Writes a file only the service's user can read (0600), never readable in between."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def parse_records(raw: bytes, format: str) -> list[str]:
    """The upload's records: non-blank lines ("text") or the "text" of each JSONL object."""
    if format not in ("text", "jsonl"):
        raise HTTPException(422, f'Unknown format {format!r}: use "text" or "jsonl".')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPException(422, f"The file is not UTF-8 text (byte {e.start}).") from None
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # (str.splitlines splits on \f, U+2028, ...)
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if format == "text":
            records.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise HTTPException(422, f"Line {n} is not JSON ({e.msg}).") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise HTTPException(422, f'Line {n} has no non-empty "text" field.')
        records.append(value)
    if not records:
        raise HTTPException(422, "The dataset is empty: no record with text.")
    return records


def check_public_eval(s, t: db.Tenant, eval_set: db.Dataset) -> None:
    """A job's evaluation set must be declared public (its metrics are released without noise:
    the progress stream, report.png) and share no record with any of the tenant's private
    datasets (by record digest), or the 'held-out' metrics would measure training data."""
    if not eval_set.public:
        raise HTTPException(
            422,
            f"Dataset {eval_set.id} is not declared public: evaluation metrics are released "
            f"without noise, so a job may only evaluate on text uploaded with public=true.",
        )
    mine, other = aliased(db.DatasetRecord), aliased(db.DatasetRecord)
    shared = s.scalar(
        select(func.count())
        .select_from(mine)
        .join(other, (other.digest == mine.digest) & (other.tenant_id == t.id))
        .join(db.Dataset, db.Dataset.id == other.dataset_id)
        .where((mine.dataset_id == eval_set.id) & ~db.Dataset.public)
    )
    if shared:
        raise HTTPException(
            422,
            f"The public dataset {eval_set.id} shares {shared} record(s) with your private "
            f"datasets: it is not held out. Evaluate on text that is not in any training set.",
        )


def unique_records(records: list[str]) -> tuple[list[str], int]:
    """The distinct records (canonical form) in their first order, and how many copies were
    dropped: a record is one privacy unit however often it was uploaded (a repeated one would
    otherwise be trained on, and spend budget, once per copy)."""
    seen: dict[str, None] = dict.fromkeys(db.canonical_record(r) for r in records)
    return list(seen), len(records) - len(seen)


def dataset_json(d: db.Dataset) -> dict[str, Any]:
    return {
        "id": d.id,
        "name": d.name,
        "records": d.num_records,
        "duplicates_removed": d.num_duplicates,
        "public": bool(d.public),
        "bytes": d.num_bytes,
        "local_epsilon_declared_by_uploader": d.local_epsilon,
        "created_at": d.created_at,
    }


def job_json(job: db.Job, **extra: Any) -> dict[str, Any]:
    plan = job.plan or {}
    return {
        "id": job.id,
        "dataset_id": job.dataset_id,
        "state": job.state,
        "cancel_requested": job.cancel_requested,
        "progress": job.progress or {},
        "plan": {
            k: plan.get(k)
            for k in (
                "epsilon",
                "delta",
                "noise_multiplier",
                "steps",
                "sampling_prob",
                "privacy_unit",
            )
        },  # fmt: skip
        "result": job.result,
        "artifacts": job.artifacts or {},
        "error": job.error,
        "claims": job.claims,
        "spec": job.spec,
        **extra,
    }
