"""The service's central guarantee: one delta per tenant, a repeated record is one unit, cap
checks serialised per tenant (SQLite and PostgreSQL), deletion removes every copy of the text,
and base models only from the admin's registry."""

import concurrent.futures as concurrent_futures
import io
import json

import numpy as np
import pytest
from sqlalchemy import select
from test_serve import BASE, Service, fastapi_testclient, spec, tickets

from jaxdp import cli
from jaxdp.serve import db, jobs, planning
from jaxdp.serve.app import create_app


def test_one_delta_per_tenant_for_every_job_cap_check_and_ledger(
    tmp_path, base_model, service_db_url
):
    """A record shared by a 20-record and a 400-record dataset: the job on the small one is
    checked, and the ledger reports both datasets, at the tenant's delta alone."""
    service = Service(tmp_path, epsilon_cap=8.0, base_model=base_model, db_url=service_db_url)
    assert service.get("/api/me").json()["delta"] == db.DEFAULT_TENANT_DELTA
    shared = "the one record both datasets hold"
    small = tickets(19, seed=1).decode().splitlines() + [shared]
    large = tickets(399, seed=2).decode().splitlines() + [shared]
    b = service.upload(("\n".join(small) + "\n").encode()).json()
    a = service.upload(("\n".join(large) + "\n").encode()).json()
    job = service.post("/api/jobs", spec(b["id"], target_epsilon=7.9, expected_batch_size=2))
    assert job.status_code == 201, job.text
    job = job.json()
    assert job["plan"]["delta"] == job["ledger"]["delta"] == db.DEFAULT_TENANT_DELTA
    ledger = {e["dataset_id"]: e for e in service.get("/api/ledger").json()}
    assert {e["delta"] for e in ledger.values()} == {db.DEFAULT_TENANT_DELTA}
    # The shared record is the worst-off one of both: the same epsilon, as checked.
    assert ledger[a["id"]]["epsilon"] == pytest.approx(ledger[b["id"]]["epsilon"], rel=1e-12)
    assert ledger[a["id"]]["epsilon"] == pytest.approx(job["ledger"]["after"], rel=1e-12)
    assert job["ledger"]["after"] <= 8.0
    # A tenant created with another delta is planned and accounted at it.
    other = db.create_tenant(db.connect(service.url), "strict", 8.0, delta=1e-9)
    assert db.tenant_for_key(db.connect(service.url), other).delta == 1e-9
    with pytest.raises(ValueError, match="delta"):
        db.create_tenant(db.connect(service.url), "loose", 8.0, delta=1.0)


def test_an_unchanged_ledger_is_read_without_composing_it_again(tmp_path, base_model, monkeypatch):
    """The epsilon a submission composed for the ledger it leaves is the ledger's next read,
    with no planning call; a server that never saw the submission composes the same number."""
    service = Service(tmp_path, epsilon_cap=20.0, base_model=base_model)
    dataset = service.upload(tickets(40)).json()
    job = service.post("/api/jobs", spec(dataset["id"], target_epsilon=3.0))
    assert job.status_code == 201, job.text
    calls = []
    real_run = planning.Planner.run

    async def counted(self, fn, *args, **kwargs):
        calls.append(fn.__name__)
        return await real_run(self, fn, *args, **kwargs)

    monkeypatch.setattr(planning.Planner, "run", counted)
    (entry,) = service.get("/api/ledger").json()
    assert calls == []
    assert entry["epsilon"] == job.json()["ledger"]["after"]
    restarted = fastapi_testclient.TestClient(create_app(tmp_path, service.url))
    (fresh,) = restarted.get("/api/ledger", headers=service.headers).json()
    assert calls == ["worst_epsilons"]
    assert fresh["epsilon"] == entry["epsilon"]


def test_a_repeated_record_is_one_unit(tmp_path):
    service = Service(tmp_path)
    lines = tickets(10).decode().splitlines()
    body = "\n".join(lines + [lines[3]] * 4 + [lines[0]]) + "\n"
    d = service.upload(body.encode()).json()
    assert d["records"] == len(set(lines)) and d["duplicates_removed"] == 5 + len(lines) - len(
        set(lines)
    )
    (path,) = tmp_path.glob(f"tenants/*/datasets/{d['id']}.jsonl")
    stored = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert stored == list(dict.fromkeys(lines))  # each text once, in first order


def test_a_record_is_one_unit_whatever_its_unicode_form_or_surrounding_spaces(tmp_path):
    import unicodedata

    service = Service(tmp_path)
    name = "José Müller owes 40"
    variants = [
        unicodedata.normalize("NFC", name),
        unicodedata.normalize("NFD", name),
        name + "   ",
        "\t" + name,
        name + "\u00a0",  # a no-break space
    ]
    assert len(set(variants)) == len(variants)
    d = service.upload(("\n".join(variants) + "\nanother record\r\n").encode()).json()
    assert d["records"] == 2 and d["duplicates_removed"] == len(variants) - 1
    # The same person's record in a second upload is matched by the ledger: the same digest.
    other = service.upload((unicodedata.normalize("NFD", name) + " \n").encode()).json()
    sessions = db.connect(service.url)
    with sessions() as s:
        digests = {
            i: set(
                s.scalars(select(db.DatasetRecord.digest).where(db.DatasetRecord.dataset_id == i))
            )
            for i in (d["id"], other["id"])
        }
    assert digests[other["id"]] < digests[d["id"]]
    (path,) = tmp_path.glob(f"tenants/*/datasets/{d['id']}.jsonl")
    stored = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert stored == [unicodedata.normalize("NFC", name), "another record"]


def _shared_datasets(service, n_datasets=4):
    common = tickets(50, seed=9).decode().splitlines()
    ids = []
    for i in range(n_datasets):
        own = [f"dataset {i} line {j}" for j in range(10)]
        ids.append(service.upload(("\n".join(common + own) + "\n").encode()).json()["id"])
    return ids


def test_cap_checks_are_serialised_per_tenant(tmp_path, base_model, service_db_url):
    """Four datasets share 50 records; each job targets epsilon 6.5 against a cap of 8. One
    after the other, the ledger accepts as many as fit; submitted concurrently, exactly as many
    again, and no record exceeds the cap, however the four interleave."""

    def trial(name, concurrent):
        service = Service(
            tmp_path / name, epsilon_cap=8.0, base_model=base_model, db_url=service_db_url
        )
        body = [
            spec(i, target_epsilon=6.5, steps=5, expected_batch_size=4)
            for i in _shared_datasets(service)
        ]
        if not concurrent:
            codes = [service.post("/api/jobs", b).status_code for b in body]
        else:

            def submit(payload):
                with fastapi_testclient.TestClient(service.client.app) as client:  # own loop
                    r = client.post("/api/jobs", json=payload, headers=service.headers)
                    return r.status_code

            with concurrent_futures.ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(submit, body))
        worst = max(e["epsilon"] for e in service.get("/api/ledger").json())
        assert worst <= 8.0, (codes, worst)
        return sorted(codes)

    sequential = trial("sequential", False)
    assert 201 in sequential and 422 in sequential  # the cap binds
    for i in range(2):
        assert trial(f"concurrent{i}", True) == sequential


def test_deleting_a_dataset_deletes_every_copy_of_its_text(tmp_path, base_model):
    from jaxdp import data

    service = Service(tmp_path, base_model=base_model)
    secret = "patient zebra quartz admitted on tuesday with a rare condition"
    records = tickets(30).decode().splitlines() + [secret]
    d = service.upload(("\n".join(records) + "\n").encode()).json()
    job = service.post("/api/jobs", spec(d["id"])).json()
    r = service.client.delete(f"/api/datasets/{d['id']}", headers=service.headers)
    assert r.status_code == 409 and job["id"] in r.json()["detail"]  # queued: cancel first
    service.work()
    assert service.get(f"/api/jobs/{job['id']}").json()["state"] == "succeeded"
    tokens = data.tokenize(data.load_tokenizer(base_model), secret)
    needles = [secret.encode(), tokens.astype("<u2").tobytes(), tokens.astype("<u4").tobytes()]

    def holders():
        found = set()
        for path in tmp_path.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                found |= {path.relative_to(tmp_path).as_posix() for n in needles if n in content}
        return found

    assert holders()  # the search finds the text while the dataset exists
    r = service.client.delete(f"/api/datasets/{d['id']}", headers=service.headers)
    assert r.status_code == 204
    assert holders() == set()
    done = service.get(f"/api/jobs/{job['id']}").json()  # the trained model is kept
    assert "hf.zip" in done["artifacts"]
    assert service.get(f"/api/jobs/{job['id']}/artifacts/hf.zip").status_code == 200


def test_base_models_come_from_the_admin_registry(tmp_path, base_model, capsys):
    flags = ["--workdir", str(tmp_path)]
    assert cli.main(["serve", "admin", "add-model", "small", base_model, *flags]) == 0
    assert cli.main(["serve", "admin", "add-model", "bad name!", base_model, *flags]) == 2
    assert cli.main(["serve", "admin", "create-tenant", "t", *flags]) == 2  # no cap
    assert "needs --epsilon-cap" in capsys.readouterr().err
    service = Service(tmp_path)
    assert service.get("/api/models").json() == ["small"]
    d = service.upload(tickets(20)).json()
    assert service.post("/api/jobs", {**spec(d["id"]), "base_model": "small"}).status_code == 201
    # Another tenant's model directory and a missing one get the same answer.
    theirs = str(tmp_path / "tenants")
    for name in (theirs, theirs + "/nothing", BASE):
        r = service.post("/api/jobs", {**spec(d["id"]), "base_model": name})
        assert r.status_code == 422
        assert r.json()["detail"] == f"No base model named {name!r}; registered: small."


def test_local_epsilon_is_declared_and_must_be_finite(tmp_path):
    service = Service(tmp_path)
    files = {"file": ("x.txt", io.BytesIO(tickets(5)), "text/plain")}
    r = service.client.post(
        "/api/datasets", files=files, data={"local_epsilon": "1e400"}, headers=service.headers
    )
    assert r.status_code == 422
    ok = service.upload(tickets(5), local_epsilon="2.5").json()
    assert ok["local_epsilon_declared_by_uploader"] == 2.5
    assert np.isfinite(ok["local_epsilon_declared_by_uploader"])


def test_zip_entries_carry_no_time_whatever_the_time_zone(tmp_path, monkeypatch):
    import os
    import time
    import zipfile

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for zone in ("America/New_York", "Asia/Tokyo", "UTC"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        out = tmp_path / f"{zone.replace('/', '-')}.zip"
        jobs._zip_dir(tmp_path / "hf", out)  # west of UTC, ZipFile.write raised ValueError
        (info,) = zipfile.ZipFile(out).infolist()
        assert info.date_time == (1980, 1, 1, 0, 0, 0), zone
    monkeypatch.delenv("TZ")
    time.tzset()
    assert os.environ.get("TZ") is None


def test_one_line_is_one_record(tmp_path):
    service = Service(tmp_path)
    d = service.upload("a\fb\u2028c ok\nsecond line\r\n".encode()).json()
    assert d["records"] == 2  # \f and U+2028 do not split a line


def test_postgresql_sessions_read_committed_whatever_the_server_default(service_db_url):
    from sqlalchemy import text

    if not service_db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite serialises with BEGIN IMMEDIATE")
    name = service_db_url.rsplit("/", 1)[1]
    with db.connect(service_db_url)() as s:
        s.execute(
            text(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'")
        )
        s.commit()
    with db.connect(service_db_url)() as s:  # new connections: the server's default changed
        assert s.execute(text("SHOW transaction_isolation")).scalar() == "read committed"


def test_an_old_database_is_migrated(tmp_path):
    """A database of the previous version: columns added, an undeclarable epsilon cleared."""
    import sqlite3

    path = tmp_path / "service.db"
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE tenants (id VARCHAR(32) PRIMARY KEY, name VARCHAR(200) UNIQUE,
            epsilon_cap FLOAT, record_key VARCHAR(64), created_at FLOAT);
        CREATE TABLE datasets (id VARCHAR(32) PRIMARY KEY, tenant_id VARCHAR(32), name VARCHAR(300),
            path TEXT, num_records INTEGER, num_bytes INTEGER, content_sha256 VARCHAR(64),
            local_epsilon FLOAT, created_at FLOAT, deleted_at FLOAT);
        INSERT INTO tenants VALUES ('t', 'old', 8.0, 'ab', 0);
        INSERT INTO datasets VALUES ('d', 't', 'x', 'x', 1, 1, 'c', 9e999, 0, NULL);
        """
    )
    con.commit()
    con.close()
    sessions = db.connect(db.default_url(tmp_path))
    with sessions() as s:
        assert s.get(db.Tenant, "t").delta == db.DEFAULT_TENANT_DELTA
        d = s.get(db.Dataset, "d")
        assert d.local_epsilon is None and d.num_duplicates == 0 and not d.public


def test_datasets_from_before_canonical_records_get_canonical_digests(tmp_path):
    """A dataset stored with digests of its raw text (older versions) is given the digests of
    the canonical forms when the app starts, so the ledger matches it with a new upload."""
    import unicodedata

    service = Service(tmp_path)
    raw = unicodedata.normalize("NFD", "José owes 40") + " "
    d = service.upload(f"{raw}\nanother\n".encode()).json()
    sessions = db.connect(service.url)
    (path,) = tmp_path.glob(f"tenants/*/datasets/{d['id']}.jsonl")
    with sessions.begin() as s:  # as an older version stored it: raw text, raw digests
        row = s.get(db.Dataset, d["id"])
        tenant = s.get(db.Tenant, row.tenant_id)
        s.query(db.DatasetRecord).filter_by(dataset_id=d["id"]).delete()
        for digest in db.record_digests(tenant, [raw, "another"]):
            s.add(db.DatasetRecord(dataset_id=d["id"], digest=digest, tenant_id=tenant.id))
        row.canonical = False
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [raw, "another"]))
    create_app(tmp_path, service.url)  # the start-up brings it up to date
    new = service.upload(b"Jos\xc3\xa9 owes 40\n").json()
    held = select(db.DatasetRecord.digest)
    with sessions() as s:
        old_digests = set(s.scalars(held.where(db.DatasetRecord.dataset_id == d["id"])))
        new_digests = set(s.scalars(held.where(db.DatasetRecord.dataset_id == new["id"])))
        assert s.get(db.Dataset, d["id"]).canonical
    assert new_digests < old_digests  # the same record: the ledger composes both datasets
    assert len(old_digests) == 3  # raw "José ", canonical "José", "another"


def test_a_job_that_keeps_killing_its_workers_fails_and_a_crash_is_not_the_workers_end(
    tmp_path, monkeypatch
):
    service = Service(tmp_path, base_model="/nowhere")
    d = service.upload(tickets(20)).json()
    first = service.post("/api/jobs", spec(d["id"])).json()
    second = service.post("/api/jobs", spec(d["id"], steps=4)).json()
    sessions = db.connect(service.url)
    with sessions.begin() as s:  # as if three workers had died running it
        row = s.get(db.Job, first["id"])
        row.state, row.claims, row.heartbeat_at = "running", jobs.MAX_CLAIMS, 0.0
        row.progress = {"step": 2}

    def crash(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(jobs, "run_job", crash)
    jobs.run_worker(tmp_path, service.url, poll_interval=0.01, max_jobs=2)
    done = {j["id"]: j for j in service.get("/api/jobs").json()}
    assert done[first["id"]]["state"] == "failed"
    assert "stopped its worker 3 times" in done[first["id"]]["error"]
    assert done[second["id"]]["state"] == "failed"
    assert "MemoryError: out of memory" in done[second["id"]]["error"]
    with sessions() as s:
        entries = {e.job_id: e for e in s.query(db.LedgerEntry)}
    assert entries[first["id"]].final and entries[first["id"]].steps == 2  # what it ran
    assert entries[second["id"]].final and entries[second["id"]].steps == 0
