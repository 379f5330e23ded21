"""Datasets: upload (streamed, parsed and stored off the event loop, within the tenant's
quotas), list, describe, delete."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import Response
from sqlalchemy import func, insert, select

from jaxdp.serve import db, jobs
from jaxdp.serve.access import (
    Context,
    Tenant,
    dataset_json,
    private_dir,
    write_private,
)
from jaxdp.serve.problems import responses

MAX_NAME = 200  # characters of a dataset's name
MAX_LOCAL_EPSILON = 1e3


def register(app: FastAPI, c: Context) -> None:
    workdir = c.workdir
    sessions = c.sessions
    own_dataset = c.own_dataset
    max_upload_bytes = c.max_upload_bytes
    max_datasets_per_tenant = c.max_datasets_per_tenant
    max_bytes_per_tenant = c.max_bytes_per_tenant

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
        private_dir(path.parent)
        with sessions() as s:  # the slow parts (digests, the file) outside the tenant's lock
            tenant = s.get(db.Tenant, t.id)
        digests = db.record_digests(tenant, records)
        content = db.content_digest(tenant, body)
        write_private(path, body.encode())
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


def unique_records(records: list[str]) -> tuple[list[str], int]:
    """The distinct records (canonical form) in their first order, and how many copies were
    dropped: a record is one privacy unit however often it was uploaded (a repeated one would
    otherwise be trained on, and spend budget, once per copy)."""
    seen: dict[str, None] = dict.fromkeys(db.canonical_record(r) for r in records)
    return list(seen), len(records) - len(seen)
