"""The service's web app: the page (upload, perturb in the browser, train, download) and the
REST API (JSON; OpenAPI at /openapi.json, Swagger UI at /docs from a package, no CDN). Every
/api call but /api/health and /api/ready needs a tenant's API key (`Authorization: Bearer
jdp_...`); another tenant's dataset or job is a 404, as if it did not exist. The routes are in
`api_pages`, `api_datasets` and `api_jobs`, what they share in `access`.

Errors are RFC 9457 problem details (`problems`): a missing or wrong key is 401; a body over its
limit or a tenant over its storage quota 413; over its dataset quota 429; text that is not
UTF-8, an empty dataset, a malformed JSONL record, an invalid or unattainable or over-the-cap
target 422 with the reason (and the numbers). Nothing slow runs on the event loop: uploads are
parsed and stored in threads, planning in a process pool with a deadline (`planning`), and
training never happens in a request: a job is queued and a worker process runs it (`jobs`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from jaxdp.serve import api_datasets, api_jobs, api_pages, db, metrics, planning, problems
from jaxdp.serve.access import NO_KEY, Context, private_dir

MULTIPART_SLACK = 64 << 10  # the multipart envelope around an upload's bytes


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


def create_app(
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
    private_dir(workdir)
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
    app.state.metrics = metrics.registry(sessions, lambda: getattr(app.state, "supervisor", None))
    app.add_middleware(
        BodyLimit,
        limit=lambda path: (
            max_upload_bytes + MULTIPART_SLACK if path == "/api/datasets" else max_json_bytes
        ),
        sessions=sessions,
    )

    app.mount("/static", StaticFiles(directory=api_pages.STATIC), name="static")
    context = Context(
        workdir=workdir,
        sessions=sessions,
        planner=planner,
        plan_deadline=plan_deadline,
        max_upload_bytes=max_upload_bytes,
        max_json_bytes=max_json_bytes,
        max_datasets_per_tenant=max_datasets_per_tenant,
        max_bytes_per_tenant=max_bytes_per_tenant,
        sse_poll_seconds=sse_poll_seconds,
    )
    for routes in (api_pages, api_datasets, api_jobs):
        routes.register(app, context)

    @app.exception_handler(ValueError)
    def value_error(_: Request, e: ValueError) -> JSONResponse:
        return problems.problem(422, str(e))

    return app
