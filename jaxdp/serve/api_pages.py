"""The page, the API's documentation, health, readiness, metrics and the tenant's own
description."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from jaxdp.serve import db, metrics
from jaxdp.serve.access import (
    Context,
    Tenant,
)
from jaxdp.serve.problems import responses

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def register(app: FastAPI, c: Context) -> None:
    workdir = c.workdir
    sessions = c.sessions
    planner = c.planner
    docs_assets = c.docs_assets

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
