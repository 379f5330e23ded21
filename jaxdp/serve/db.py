"""The service's database: tenants, API keys (hashed), datasets, jobs, events and the ledger.

SQLite in the service's workdir by default (`sqlite:///W/service.db`, WAL mode, every
transaction BEGIN IMMEDIATE so that a read-check-write such as the ledger's cap check cannot
interleave with another), or any SQLAlchemy URL (PostgreSQL for several worker hosts: the row
locks of `with_for_update` then serialize the same checks). Jobs are claimed with a conditional
UPDATE (`claim_job`), which is atomic on either: two workers never run the same job, and a job
whose worker stopped heart-beating is claimed again after a timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
# A tenant's delta, fixed when the tenant is created: every job, the cap check and the ledger of
# all its datasets are stated at it (one delta for a record, whichever datasets hold it).
DEFAULT_TENANT_DELTA = 1e-6
TERMINAL = ("succeeded", "failed", "cancelled")
KEY_PREFIX = "jdp_"


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


def new_record_key() -> str:
    return secrets.token_hex(32)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    epsilon_cap: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float, default=DEFAULT_TENANT_DELTA)
    # The key of the tenant's record digests (HMAC-SHA256): see `record_digests`.
    record_key: Mapped[str] = mapped_column(String(64), default=new_record_key)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class BaseModelEntry(Base):
    """A base model an admin registered (`jaxdp serve admin add-model NAME SOURCE`): jobs name
    one of these, never a path of the server."""

    __tablename__ = "base_models"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    source: Mapped[str] = mapped_column(Text)  # a local HF directory or a Hub id
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # never the key itself
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # stops at once


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(Text)  # a JSONL file of {"text": ...} records
    num_records: Mapped[int] = mapped_column(Integer)  # distinct records
    num_duplicates: Mapped[int] = mapped_column(Integer, default=0)  # copies dropped at upload
    num_bytes: Mapped[int] = mapped_column(Integer)
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    # Declared public by the tenant at upload: usable as a job's evaluation set, whose metrics
    # are released without noise (refused when it shares a record with a private dataset).
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    # Its records' digests include their canonical forms (`canonical_record`).
    canonical: Mapped[bool] = mapped_column(Boolean, default=False)
    # Per word, as DECLARED by the uploader (the server cannot check the browser's perturbation).
    local_epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DatasetRecord(Base):
    """A keyed digest of one record of a dataset: the ledger's way to find the same record in
    several datasets (kept when the dataset is deleted; the text itself is not)."""

    __tablename__ = "dataset_records"
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)


def canonical_record(text: str) -> str:
    """The form a record is stored, trained and matched in (the ledger's digests): Unicode NFC,
    CRLF line ends as LF, no leading or trailing whitespace. So "José" typed precomposed or
    decomposed, or a copy with a trailing space, is the same record, not a second unit."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n")).strip()


def add_canonical_digests(sessions: sessionmaker[Session]) -> int:
    """Gives every stored dataset uploaded before records were canonical (NFC, trimmed) the
    digests of its records' canonical forms too, so that the ledger matches them with later
    uploads (a superset: both forms count). A deleted dataset's text is gone: it keeps its old
    digests only. How many datasets were brought up to date."""
    done = 0
    with sessions() as s:
        old = s.scalars(
            select(Dataset).where(~Dataset.canonical & Dataset.deleted_at.is_(None))
        ).all()
    for d in old:
        path = Path(d.path)
        if not path.is_file():
            continue
        records = [json.loads(line)["text"] for line in path.read_text("utf-8").splitlines()]
        with sessions.begin() as s:
            tenant = s.get(Tenant, d.tenant_id)
            have = set(
                s.scalars(select(DatasetRecord.digest).where(DatasetRecord.dataset_id == d.id))
            )
            new = record_digests(tenant, [canonical_record(r) for r in records]) - have
            for digest in new:
                s.add(DatasetRecord(dataset_id=d.id, digest=digest, tenant_id=d.tenant_id))
            s.get(Dataset, d.id).canonical = True
        done += 1
    return done


def record_digests(tenant: Tenant, records: list[str]) -> set[str]:
    """HMAC-SHA256 of each record under the tenant's own key: equal records, equal digests;
    without the key (which never leaves the database) a digest confirms no guessed text."""
    key = bytes.fromhex(tenant.record_key)
    return {hmac.new(key, r.encode(), hashlib.sha256).hexdigest() for r in records}


def content_digest(tenant: Tenant, body: str) -> str:
    """The stored dataset's digest, keyed like `record_digests` (an unkeyed hash would confirm a
    guess of the whole dataset to anyone who reads the database without the key)."""
    key = bytes.fromhex(tenant.record_key)
    return hmac.new(key, b"dataset\0" + body.encode(), hashlib.sha256).hexdigest()


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    spec: Mapped[dict] = mapped_column(JSON)  # what the tenant asked for
    # The registered base model's source when the job was submitted (never shown to tenants).
    base_source: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A client's Idempotency-Key: a second submission with it returns this job.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    plan: Mapped[dict] = mapped_column(JSON)  # the privacy plan's record at submission
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(100), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    claims: Mapped[int] = mapped_column(Integer, default=0)  # times a worker took it
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # privacy.json
    artifacts: Mapped[dict] = mapped_column(JSON, default=dict)  # name -> {sha256, bytes}
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class LedgerEntry(Base):
    """One job's DP event on one dataset (its noise multiplier as accounted, its sampling
    probability and the steps it ran or may run). Never deleted."""

    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    noise_multiplier: Mapped[float] = mapped_column(Float)  # accounting noise multiplier
    sampling_prob: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    final: Mapped[bool] = mapped_column(Boolean, default=False)  # False: planned (reserved)
    created_at: Mapped[float] = mapped_column(Float, default=now)


def default_url(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).expanduser().resolve() / 'service.db'}"


def connect(url: str) -> sessionmaker[Session]:
    """A session factory for `url`, with the tables created."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        connect_args={"timeout": 60, "check_same_thread": False} if sqlite else {},
        pool_pre_ping=not sqlite,
        # The cap check locks the tenant row, then reads the ledger: at READ COMMITTED those
        # reads see what a submission that held the lock before committed (a REPEATABLE READ
        # snapshot, taken before the lock was granted, would not).
        **({} if sqlite else {"isolation_level": "READ COMMITTED"}),
    )
    if sqlite:
        _sqlite_pragmas(engine)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    if sqlite and engine.url.database not in (None, "", ":memory:"):
        for suffix in ("", "-wal", "-shm"):  # it holds every tenant's record key: 0600
            path = Path(engine.url.database + suffix)
            if path.exists():
                path.chmod(0o600)
    return sessionmaker(engine, expire_on_commit=False)


# Columns added since a database was first created: (table, column, SQL type and default).
_ADDED_COLUMNS = (
    ("tenants", "delta", f"FLOAT DEFAULT {DEFAULT_TENANT_DELTA}"),
    ("jobs", "base_source", "TEXT"),
    ("datasets", "num_duplicates", "INTEGER DEFAULT 0"),
    ("datasets", "public", "BOOLEAN DEFAULT FALSE"),
    ("jobs", "idempotency_key", "VARCHAR(200)"),
    ("api_keys", "revoked_at", "FLOAT"),
    ("datasets", "canonical", "BOOLEAN DEFAULT FALSE"),
)


def _add_missing_columns(engine: Engine) -> None:
    """ALTER TABLE ... ADD COLUMN for each of `_ADDED_COLUMNS` an older database lacks (existing
    rows get the default)."""
    inspector = inspect(engine)
    exists = "" if engine.dialect.name == "sqlite" else "IF NOT EXISTS "  # racing first starts
    for table, column, ddl in _ADDED_COLUMNS:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {exists}{column} {ddl}"))
    with engine.begin() as conn:  # older versions accepted a declared epsilon of inf
        conn.execute(
            text(
                "UPDATE datasets SET local_epsilon = NULL WHERE local_epsilon IS NOT NULL AND "
                "NOT (local_epsilon > 0 AND local_epsilon < 1e300)"
            )
        )


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _):
        dbapi_connection.isolation_level = None  # SQLAlchemy issues BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# ---- Tenants and keys -----------------------------------------------------------------------


def hash_key(key: str) -> str:
    """Keys are 256 random bits: a plain sha256 of them cannot be brute-forced."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(
    sessions: sessionmaker[Session],
    name: str,
    epsilon_cap: float,
    delta: float = DEFAULT_TENANT_DELTA,
) -> str:
    """Creates a tenant and returns its API key (shown once; only its hash is stored). `delta`
    is fixed for good: every job's epsilon, the cap check and the ledger are stated at it."""
    if not (math.isfinite(epsilon_cap) and epsilon_cap > 0):
        raise ValueError(f"The epsilon cap must be a positive number, got {epsilon_cap}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (and well below 1 / records), got {delta}.")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as s:
        if s.scalar(select(Tenant).where(Tenant.name == name)) is not None:
            raise ValueError(f"A tenant named {name!r} exists already.")
        tenant = Tenant(name=name, epsilon_cap=float(epsilon_cap), delta=float(delta))
        s.add(tenant)
        s.flush()
        s.add(ApiKey(tenant_id=tenant.id, key_sha256=hash_key(key)))
    return key


def tenant_for_key(sessions: sessionmaker[Session], key: str | None) -> Tenant | None:
    if not key:
        return None
    with sessions() as s:
        api_key = s.scalar(
            select(ApiKey).where((ApiKey.key_sha256 == hash_key(key)) & ApiKey.revoked_at.is_(None))
        )
        return None if api_key is None else s.get(Tenant, api_key.tenant_id)


def _tenant_named(s: Session, name: str) -> Tenant:
    tenant = s.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise ValueError(f"No tenant named {name!r} (`jaxdp serve admin list-tenants`).")
    return tenant


def list_tenants(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every tenant: name, cap, delta, live keys, datasets and jobs (for the admin)."""
    with sessions() as s:
        out = []
        for t in s.scalars(select(Tenant).order_by(Tenant.created_at)):
            live = select(ApiKey).where((ApiKey.tenant_id == t.id) & ApiKey.revoked_at.is_(None))
            datasets = select(Dataset).where(
                (Dataset.tenant_id == t.id) & Dataset.deleted_at.is_(None)
            )
            out.append(
                {
                    "name": t.name,
                    "id": t.id,
                    "epsilon_cap": t.epsilon_cap,
                    "delta": t.delta,
                    "keys": len(s.scalars(live).all()),
                    "datasets": len(s.scalars(datasets).all()),
                    "jobs": len(s.scalars(select(Job.id).where(Job.tenant_id == t.id)).all()),
                }
            )
        return out


def revoke_keys(sessions: sessionmaker[Session], name: str) -> int:
    """Revokes every key of tenant `name` (refused from the next request on); how many."""
    with sessions.begin() as s:
        tenant = _tenant_named(s, name)
        done = s.execute(
            update(ApiKey)
            .where((ApiKey.tenant_id == tenant.id) & ApiKey.revoked_at.is_(None))
            .values(revoked_at=now())
        )
        return done.rowcount


def rotate_key(sessions: sessionmaker[Session], name: str) -> str:
    """A new key for tenant `name`, its old ones revoked in the same transaction."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as s:
        tenant = _tenant_named(s, name)
        s.execute(
            update(ApiKey)
            .where((ApiKey.tenant_id == tenant.id) & ApiKey.revoked_at.is_(None))
            .values(revoked_at=now())
        )
        s.add(ApiKey(tenant_id=tenant.id, key_sha256=hash_key(key)))
    return key


def set_cap(sessions: sessionmaker[Session], name: str, epsilon_cap: float) -> float:
    """Sets tenant `name`'s epsilon cap (checked for every later job); the old cap. Lowering it
    below what was spent refunds nothing: later jobs on those records are refused."""
    if not (math.isfinite(epsilon_cap) and epsilon_cap > 0):
        raise ValueError(f"The epsilon cap must be a positive number, got {epsilon_cap}.")
    with sessions.begin() as s:
        lock_tenant(s, _tenant_named(s, name).id)
        tenant = _tenant_named(s, name)
        old, tenant.epsilon_cap = tenant.epsilon_cap, float(epsilon_cap)
        return old


def lock_tenant(s: Session, tenant_id: str) -> None:
    """Serialises a tenant's ledger-changing transactions (PostgreSQL: a row lock held to the
    end of the transaction; SQLite: every transaction is BEGIN IMMEDIATE already)."""
    s.execute(select(Tenant).where(Tenant.id == tenant_id).with_for_update())


def add_base_model(sessions: sessionmaker[Session], name: str, source: str) -> None:
    """Registers (or re-points) base model `name` at `source` (a local HF directory or a Hub id)."""
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"A base model's name is 1-100 letters, digits, '-', '_', '.': {name!r}.")
    with sessions.begin() as s:
        entry = s.get(BaseModelEntry, name)
        if entry is None:
            s.add(BaseModelEntry(name=name, source=source))
        else:
            entry.source = source


def base_models(sessions: sessionmaker[Session]) -> dict[str, str]:
    """Registered base models: name -> source."""
    with sessions() as s:
        return {
            e.name: e.source
            for e in s.scalars(select(BaseModelEntry).order_by(BaseModelEntry.name))
        }


# ---- Jobs -----------------------------------------------------------------------------------


def claim_job(sessions: sessionmaker[Session], worker: str, heartbeat_timeout: float) -> Job | None:
    """Atomically takes the oldest queued job, or a running one whose worker went silent for
    `heartbeat_timeout` seconds (it will resume from its checkpoint, and stop there at once if
    it was cancelled meanwhile: that records the steps it ran). None if there is none."""
    claimable = or_(
        Job.state == "queued",
        (Job.state == "running") & (Job.heartbeat_at < now() - heartbeat_timeout),
    )
    with sessions() as s:
        candidates = s.scalars(select(Job.id).where(claimable).order_by(Job.created_at).limit(8))
        candidates = list(candidates)
    for job_id in candidates:
        with sessions.begin() as s:
            taken = s.execute(
                update(Job)
                .where((Job.id == job_id) & claimable)
                .values(
                    state="running",
                    worker=worker,
                    heartbeat_at=now(),
                    claims=Job.claims + 1,
                    started_at=now(),
                )
            )
            if taken.rowcount == 1:
                return s.get(Job, job_id)
    return None


def heartbeat(sessions: sessionmaker[Session], job_id: str, worker: str) -> bool:
    """Refreshes the job's heartbeat; False if another worker has taken it since."""
    with sessions.begin() as s:
        done = s.execute(
            update(Job)
            .where((Job.id == job_id) & (Job.worker == worker) & (Job.state == "running"))
            .values(heartbeat_at=now())
        )
        return done.rowcount == 1


def release_jobs_of(sessions: sessionmaker[Session], worker: str) -> list[str]:
    """Hands back the running jobs of a worker known to be dead: claimable at once (their
    heartbeat set to the epoch), each resumes from its checkpoint. Their ids."""
    with sessions.begin() as s:
        ids = list(
            s.scalars(select(Job.id).where((Job.worker == worker) & (Job.state == "running")))
        )
        if ids:
            s.execute(
                update(Job)
                .where(Job.id.in_(ids) & (Job.worker == worker) & (Job.state == "running"))
                .values(heartbeat_at=0.0)
            )
    return ids


def add_event(sessions: sessionmaker[Session], job_id: str, kind: str, data: dict[str, Any]):
    with sessions.begin() as s:
        s.add(JobEvent(job_id=job_id, kind=kind, data=json.loads(json.dumps(data))))
        if kind in ("step", "eval"):
            job = s.get(Job, job_id)
            job.progress = {**(job.progress or {}), **data}
