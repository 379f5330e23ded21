"""What every route of the service shares: the tenant of a request (its API key), the
service's context (directory, database, planner, limits), the JSON of datasets and jobs, and
files only the service's user can read."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any

import swagger_ui_bundle
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from jaxdp.serve import db, planning

NO_KEY = "A valid API key is needed (Authorization: Bearer jdp_...)."


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


@dataclasses.dataclass
class Context:
    """The service's state, as the routes see it."""

    workdir: Path
    sessions: Any
    planner: planning.Planner
    plan_deadline: float
    max_upload_bytes: int
    max_json_bytes: int
    max_datasets_per_tenant: int
    max_bytes_per_tenant: int
    sse_poll_seconds: float
    ledger_memo: planning.LedgerMemo = dataclasses.field(default_factory=planning.LedgerMemo)
    docs_assets: Path = Path(swagger_ui_bundle.swagger_ui_path)

    async def plan(self, t: db.Tenant, fn, *args):
        """`fn(*args)` in the planning pool for tenant `t`: 422 if it refuses (an unattainable
        target, a deadline), 503 if the pool is busy."""
        try:
            return await self.planner.run(fn, *args, tenant=t.id, deadline=self.plan_deadline)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        except planning.PlanningBusy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "60"}) from None

    @staticmethod
    def own_dataset(s, t: db.Tenant, dataset_id: str) -> db.Dataset:
        d = s.get(db.Dataset, dataset_id)
        if d is None or d.tenant_id != t.id or d.deleted_at is not None:
            raise HTTPException(404, f"No dataset {dataset_id!r}.")
        return d

    @staticmethod
    def own_job(s, t: db.Tenant, job_id: str) -> db.Job:
        j = s.get(db.Job, job_id)
        if j is None or j.tenant_id != t.id:
            raise HTTPException(404, f"No job {job_id!r}.")
        return j


def private_dir(path: Path) -> None:
    """A directory only the service's user can read (0700), made if missing."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def write_private(path: Path, data: bytes) -> None:
    """Writes a file only the service's user can read (0600), never readable in between."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
