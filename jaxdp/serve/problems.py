"""The API's one error format, RFC 9457 problem details (`application/problem+json`), and an
OpenAPI document that says so: every route lists each status it can answer with, and every
error response has the `Problem` schema.

    {"type": "about:blank", "title": "Unprocessable Content", "status": 422,
     "detail": "target_epsilon=0.01 ... is not attainable ...", "errors": [...]}

`detail` is always one human-readable string; a request that fails validation also lists each
failure under `errors` (the field's location and what is wrong with it).
"""

from __future__ import annotations

import http
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger("jaxdp.serve")

WHY = {
    400: "The body cannot be parsed (not JSON, not multipart).",
    401: "No valid API key (`Authorization: Bearer jdp_...`).",
    404: "No such resource for this tenant (another tenant's is a 404 too).",
    409: "The resource's state does not allow it (the detail says why).",
    413: "The request body, or the tenant's storage, is over its limit.",
    422: "The request is invalid or cannot be honoured (the detail says why, with numbers).",
    429: "A quota of the tenant is reached.",
    503: "The server is busy (planning): try again after Retry-After seconds.",
}


class ValidationFailure(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, header or path, then the field")
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field("about:blank", description="always about:blank: the status says it")
    title: str = Field(description="the status's phrase")
    status: int
    detail: str = Field(description="what went wrong and what to do, in words")
    errors: list[ValidationFailure] | None = Field(
        None, description="a request that failed validation: each failure"
    )


def problem(status: int, detail: str, headers: dict | None = None, **extra: Any) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": http.HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer with these error statuses."""
    return {s: {"model": Problem, "description": WHY[s]} for s in statuses}


def allowed_methods(app: FastAPI, scope) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        if route.matches(scope)[0] == Match.NONE:
            continue
        methods |= getattr(route, "methods", None) or {"GET", "HEAD"}  # a mount: files
    # Inside a mount (static files) the scope's path is the mount's: its files take GET, HEAD.
    return sorted(methods or {"GET", "HEAD"})


def install(app: FastAPI) -> None:
    """Problem details for every error, and an OpenAPI document that matches them."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:  # every method of the path (Starlette names the first route's)
            headers["Allow"] = ", ".join(allowed_methods(app, request.scope))
        return problem(e.status_code, str(e.detail), headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        failures = [
            {"loc": list(f.get("loc", ())), "msg": str(f.get("msg")), "type": str(f.get("type"))}
            for f in e.errors()
        ]
        detail = (
            "; ".join(f"{'.'.join(str(x) for x in f['loc'])}: {f['msg']}" for f in failures)
            or "The request is invalid."
        )
        return problem(422, detail, errors=jsonable_encoder(failures))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.error("Unhandled %s: %s", type(e).__name__, e, exc_info=e)
        return problem(500, "The server failed to answer; the error is in its log.")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            for path in schema["paths"].values():
                for operation in path.values():
                    for status, response in operation.get("responses", {}).items():
                        if status.startswith(("4", "5")):  # errors are problem+json
                            response["content"] = {
                                MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}
                            }
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
