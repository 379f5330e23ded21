"""`jaxdp serve`: the API through FastAPI's TestClient, workers (in-process and killed
processes), the privacy ledger, bad input, and a server restart."""

import functools
import io
import json
import multiprocessing
import os
import signal
import time
import zipfile

import numpy as np
import pytest
from conftest import REPO

from jaxdp.config import to_settings
from jaxdp.serve import db, jobs

fastapi_testclient = pytest.importorskip("fastapi.testclient")
from jaxdp.serve.app import create_app  # noqa: E402

WORDS = "the order arrived late please refund my account password reset thanks help".split()


def tickets(n=60, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 25))) for _ in range(n)]
    return ("\n".join(lines) + "\n").encode()


BASE = "tiny-gpt2"  # the name Service registers the test's base model under


def spec(dataset_id, **overrides):
    return {
        "dataset_id": dataset_id,
        "base_model": BASE,
        "lora_rank": 2,
        "target_epsilon": 8.0,
        "steps": 3,
        "expected_batch_size": 4,
        "block_size": 16,
        "microbatch_size": 4,
        "learning_rate": 0.01,
        **overrides,
    }


class Service:
    """The app under TestClient, with one tenant."""

    def __init__(self, workdir, epsilon_cap=20.0, base_model=None, db_url=None, **app_options):
        self.workdir = workdir
        self.url = db_url or db.default_url(workdir)
        self.client = fastapi_testclient.TestClient(create_app(workdir, self.url, **app_options))
        sessions = db.connect(self.url)
        self.key = db.create_tenant(sessions, f"clinic-{time.time_ns()}", epsilon_cap)
        if base_model is not None:
            db.add_base_model(sessions, BASE, base_model)
        self.headers = {"Authorization": f"Bearer {self.key}"}

    def upload(self, body: bytes, format="text", **form):
        files = {"file": ("notes.txt", io.BytesIO(body), "text/plain")}
        return self.client.post(
            "/api/datasets", files=files, data={"format": format, **form}, headers=self.headers
        )

    def post(self, path, payload):
        return self.client.post(path, json=payload, headers=self.headers)

    def get(self, path):
        return self.client.get(path, headers=self.headers)

    def work(self, max_jobs=1):
        jobs.run_worker(self.workdir, self.url, poll_interval=0.1, max_jobs=max_jobs)


def test_end_to_end_upload_train_stream_download(tmp_path, base_model, service_db_url):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    service = Service(tmp_path, base_model=base_model, db_url=service_db_url)
    assert service.get("/api/me").json()["epsilon_cap"] == 20.0
    dataset = service.upload(tickets(), local_epsilon="10").json()
    assert dataset["records"] == 60 and dataset["local_epsilon_declared_by_uploader"] == 10.0
    job = service.post("/api/jobs", spec(dataset["id"]))
    assert job.status_code == 201, job.text
    job = job.json()
    assert job["state"] == "queued" and job["plan"]["epsilon"] <= 8.0
    assert job["ledger"]["spent_before"] == 0 and job["ledger"]["after"] > 0
    service.work()
    # Server-sent events: every step, then the end.
    with service.client.stream(
        "GET", f"/api/jobs/{job['id']}/events", headers=service.headers
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("event:")]
    assert events == ["event: step"] * 3 + ["event: end"]
    done = service.get(f"/api/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and done["claims"] == 1
    assert done["result"]["epsilon"] == pytest.approx(job["plan"]["epsilon"])
    assert done["result"]["epsilon_per"] == "record" and done["local_epsilon"] == 10.0
    assert set(done["artifacts"]) == {"peft.zip", "hf.zip", "privacy.json", "report.png"}
    # The artifacts: checksums match; the exports load in transformers and peft.
    unpacked = {}
    for name, info in done["artifacts"].items():
        r = service.get(f"/api/jobs/{job['id']}/artifacts/{name}")
        assert r.status_code == 200 and r.headers["x-content-sha256"] == info["sha256"]
        import hashlib

        assert hashlib.sha256(r.content).hexdigest() == info["sha256"]
        if name.endswith(".zip"):
            unpacked[name] = tmp_path / name.removesuffix(".zip")
            zipfile.ZipFile(io.BytesIO(r.content)).extractall(unpacked[name])
    merged = transformers.GPT2LMHeadModel.from_pretrained(unpacked["hf.zip"]).eval()
    base = transformers.GPT2LMHeadModel.from_pretrained(base_model)
    adapted = peft.PeftModel.from_pretrained(base, unpacked["peft.zip"]).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50257, size=(1, 8)))
    with torch.no_grad():
        np.testing.assert_allclose(
            merged(ids).logits.numpy(), adapted(ids).logits.numpy(), atol=1e-4, rtol=0
        )
    assert "per record" in (unpacked["hf.zip"] / "README.md").read_text()
    # Nothing private left the job's workdir through the artifacts, nor any server path: the
    # card and adapter_config.json name the base model by its registered name.
    assert (
        json.loads((unpacked["peft.zip"] / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        == BASE
    )
    for directory in unpacked.values():
        assert not any("private" in p.parts for p in directory.rglob("*"))
        for path in directory.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                for server_path in (str(base_model), str(tmp_path)):
                    assert server_path.encode() not in content, (path, server_path)


def test_keys_tenants_and_bad_input(tmp_path, base_model, service_db_url):
    service = Service(tmp_path, base_model=base_model, db_url=service_db_url, max_upload_bytes=5000)
    other = db.create_tenant(db.connect(service.url), "other", 5.0)
    assert service.client.get("/api/datasets").status_code == 401
    wrong = {"Authorization": "Bearer jdp_wrong"}
    assert service.client.get("/api/datasets", headers=wrong).status_code == 401
    d = service.upload(tickets(20)).json()
    theirs = {"Authorization": f"Bearer {other}"}
    assert service.client.get(f"/api/datasets/{d['id']}", headers=theirs).status_code == 404
    r = service.client.post("/api/jobs", json=spec(d["id"]), headers=theirs)
    assert r.status_code == 404
    assert service.upload(b"x" * 6000).status_code == 413
    r = service.upload(b"caf\xe9 au lait\n")
    assert r.status_code == 422 and "not UTF-8" in r.json()["detail"]
    r = service.upload(b"\n  \n")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = service.upload(b'{"text": "fine"}\n{"txt": "no"}\n', format="jsonl")
    assert r.status_code == 422 and "Line 2" in r.json()["detail"]
    r = service.post("/api/jobs", spec(d["id"], target_epsilon=0))
    assert r.status_code == 422
    hopeless = dict(target_epsilon=1e-3, steps=1000, expected_batch_size=10)
    r = service.post("/api/jobs", spec(d["id"], **hopeless))
    assert r.status_code == 422 and "not attainable" in r.json()["detail"]
    r = service.post("/api/jobs", spec(d["id"], target_delta=1e-10))
    assert r.status_code == 422 and "the tenant's delta 1e-06" in r.json()["detail"]
    for bad in ("inf", "nan", "-1", "0"):
        assert service.upload(tickets(5), local_epsilon=bad).status_code == 422, bad
    r = service.post("/api/jobs", spec(d["id"], target_epsilon=25.0))
    assert r.status_code == 422 and "over the tenant's cap of 20" in r.json()["detail"]
    r = service.post("/api/jobs", spec(d["id"], steps=None))
    assert r.status_code == 422
    for name in ("./no/such/model", str(service.workdir), "gpt2"):  # only registered names
        r = service.post("/api/jobs", spec(d["id"], base_model=name))
        assert r.status_code == 422 and f"No base model named {name!r}" in r.json()["detail"]
        assert "registered: tiny-gpt2." in r.json()["detail"]
    # OpenAPI for the whole API.
    paths = service.client.get("/openapi.json").json()["paths"]
    assert {"/api/datasets", "/api/jobs", "/api/jobs/{job_id}/events", "/api/ledger"} <= set(paths)


def test_ledger_composes_jobs_refuses_over_the_cap_and_never_refunds(
    tmp_path, base_model, service_db_url
):
    import dp_accounting

    service = Service(tmp_path, base_model=base_model, db_url=service_db_url, epsilon_cap=2.0)
    d = service.upload(tickets(40)).json()
    first = service.post("/api/jobs", spec(d["id"], target_epsilon=1.5)).json()
    # Alone 1.9 fits the cap of 2; composed with the first job's 1.5 it does not.
    second = service.post("/api/jobs", spec(d["id"], target_epsilon=1.9))
    assert second.status_code == 422, second.text
    assert "over the tenant's cap of 2" in second.json()["detail"]
    # The ledger is dp-accounting's PLD composition of the jobs' events, called directly.
    plan = first["plan"]
    event = dp_accounting.PoissonSampledDpEvent(
        plan["sampling_prob"], dp_accounting.GaussianDpEvent(plan["noise_multiplier"])
    )
    delta = db.DEFAULT_TENANT_DELTA  # the tenant's, for every dataset
    direct = dp_accounting.pld.PLDAccountant().compose(event, plan["steps"]).get_epsilon(delta)
    ledger = service.get("/api/ledger").json()
    assert ledger[0]["epsilon"] == pytest.approx(direct, rel=1e-3)
    # Cancelling the queued job spends nothing; deleting the dataset refunds nothing.
    service.post(f"/api/jobs/{first['id']}/cancel", {})
    assert service.get("/api/ledger").json()[0]["epsilon"] == 0.0
    third = service.post("/api/jobs", spec(d["id"], target_epsilon=1.5)).json()
    service.work()
    assert service.get(f"/api/jobs/{third['id']}").json()["state"] == "succeeded"
    spent = service.get("/api/ledger").json()[0]["epsilon"]
    assert spent > 0
    assert (
        service.client.delete(f"/api/datasets/{d['id']}", headers=service.headers).status_code
        == 204
    )
    assert service.get(f"/api/datasets/{d['id']}").status_code == 404

    def ledger():
        return {e["dataset_id"]: e for e in service.get("/api/ledger").json()}

    assert ledger()[d["id"]]["deleted"] and ledger()[d["id"]]["epsilon"] == spent
    # The same records again, or some of them in a new dataset, carry what they spent.
    again = service.upload(tickets(40)).json()
    assert ledger()[again["id"]]["epsilon"] == spent
    r = service.post("/api/jobs", spec(again["id"], target_epsilon=1.9))
    assert r.status_code == 422 and "over the tenant's cap" in r.json()["detail"]
    old = tickets(40).decode().splitlines()
    new = [f"new {i} {line}" for i, line in enumerate(tickets(40, seed=1).decode().splitlines())]
    mixed = service.upload(("\n".join(old[:20] + new[:20]) + "\n").encode()).json()
    assert ledger()[mixed["id"]]["epsilon"] == spent
    r = service.post("/api/jobs", spec(mixed["id"], target_epsilon=1.9))
    assert r.status_code == 422
    fresh = service.upload(("\n".join(new) + "\n").encode()).json()
    assert ledger()[fresh["id"]]["epsilon"] == 0.0
    r = service.post("/api/jobs", spec(mixed["id"], target_epsilon=0.3)).json()
    r = service.post("/api/jobs", spec(fresh["id"], target_epsilon=1.9))
    assert r.status_code == 201, r.text  # its records' only other job is the mixed one's 0.3
    # Brute force, record by record: the events of every job on a dataset holding the record,
    # composed by dp-accounting directly; the ledger reports each dataset's worst record.
    texts = {d["id"]: old, again["id"]: old, mixed["id"]: old[:20] + new[:20], fresh["id"]: new}
    events = {k: [] for k in texts}
    for job in service.get("/api/jobs").json():
        plan, ran = job["plan"], {"succeeded": job["plan"]["steps"], "cancelled": 0}
        steps = ran.get(job["state"], plan["steps"])  # queued: its planned steps, reserved
        if steps:
            event = dp_accounting.PoissonSampledDpEvent(
                plan["sampling_prob"], dp_accounting.GaussianDpEvent(plan["noise_multiplier"])
            )
            events[job["dataset_id"]].append(dp_accounting.SelfComposedDpEvent(event, steps))

    @functools.cache
    def epsilon(holders: frozenset, delta: float) -> float:
        mine = [e for k in sorted(holders) for e in events[k]]
        if not mine:
            return 0.0
        accountant = dp_accounting.pld.PLDAccountant()
        return accountant.compose(dp_accounting.ComposedDpEvent(mine)).get_epsilon(delta)

    for dataset_id, records in texts.items():
        holders = [frozenset(k for k, rs in texts.items() if r in rs) for r in records]
        worst = max(epsilon(h, delta) for h in holders)
        assert ledger()[dataset_id]["epsilon"] == pytest.approx(worst, rel=1e-3), dataset_id


def test_server_restart_loses_nothing(tmp_path, base_model, service_db_url):
    service = Service(tmp_path, base_model=base_model, db_url=service_db_url)
    d = service.upload(tickets(20)).json()
    job = service.post("/api/jobs", spec(d["id"])).json()
    service.client.close()
    restarted = fastapi_testclient.TestClient(create_app(tmp_path, service_db_url))
    h = service.headers
    assert [x["id"] for x in restarted.get("/api/datasets", headers=h).json()] == [d["id"]]
    assert restarted.get(f"/api/jobs/{job['id']}", headers=h).json()["state"] == "queued"
    assert restarted.get("/api/ledger", headers=h).json()[0]["jobs"] == 1


def _worker(workdir, url):
    from jaxdp.serve import supervision

    supervision.worker_entry(
        str(workdir),
        url,
        {"poll_interval": 0.2, "heartbeat_interval": 0.5, "heartbeat_timeout": 3.0},  # fmt: skip
    )


@pytest.mark.slow
def test_a_killed_worker_leaves_the_job_to_another_which_resumes_it(tmp_path, base_model):
    """Kill the worker process mid-job (after a checkpoint); a new worker claims the job after
    the heartbeat timeout and resumes it: the final weights and epsilon equal an uninterrupted
    run's with the same secrets."""
    from safetensors.numpy import load_file

    from jaxdp import run as run_lib
    from jaxdp.workdir import Workdir

    service = Service(tmp_path, base_model=base_model)
    d = service.upload(tickets(40)).json()
    job = service.post("/api/jobs", spec(d["id"], steps=8, checkpoint_every=2)).json()
    context = multiprocessing.get_context("spawn")
    first = context.Process(target=_worker, args=(tmp_path, service.url), daemon=True)
    first.start()
    deadline = time.monotonic() + 300
    while service.get(f"/api/jobs/{job['id']}").json()["progress"].get("step", 0) < 3:
        assert first.is_alive() and time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.join()
    second = context.Process(target=_worker, args=(tmp_path, service.url), daemon=True)
    second.start()
    while service.get(f"/api/jobs/{job['id']}").json()["state"] not in db.TERMINAL:
        assert second.is_alive() and time.monotonic() < deadline
        time.sleep(0.5)
    second.terminate()
    second.join()
    done = service.get(f"/api/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and done["claims"] == 2, done["error"]
    # The uninterrupted twin: the same config and secrets, never killed.
    with db.connect(service.url)() as s:
        row = s.get(db.Job, job["id"])
        dataset = s.get(db.Dataset, row.dataset_id)
        cfg = jobs.job_settings(
            jobs.JobSpec.stored(row.spec), row.plan, row.base_source, dataset.path, None
        )
        job_run = jobs.job_dir(tmp_path, row)
    twin = tmp_path / "twin"
    Workdir(twin).make_private()
    (twin / "private" / "run.json").write_bytes((job_run / "private" / "run.json").read_bytes())
    summary = run_lib.run(to_settings(cfg), twin)
    assert summary["epsilon"] == done["result"]["epsilon"]
    a, b = (
        load_file(job_run / "hf" / "model.safetensors"),
        load_file(twin / "hf" / "model.safetensors"),
    )
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # The ledger counts the steps the job ran: 8, once.
    with db.connect(service.url)() as s:
        entry = s.query(db.LedgerEntry).filter_by(job_id=job["id"]).one()
        assert entry.final and entry.steps == 8
    # Progress never goes backwards across the resume: each step once, in order; a client that
    # reconnects with Last-Event-ID gets what it missed, once.
    events = _events(service, job["id"])
    assert [kind for _, kind, _ in events] == ["step"] * 8 + ["end"]
    assert [data["step"] for _, kind, data in events if kind == "step"] == list(range(1, 9))
    ids = [i for i, _, _ in events]
    assert ids == sorted(ids)
    assert _events(service, job["id"], last_event_id=ids[4]) == events[5:]


def _events(service, job_id, last_event_id=None):
    """The job's server-sent events as (id, kind, data)."""
    headers = dict(service.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    out, current = [], {}
    with service.client.stream("GET", f"/api/jobs/{job_id}/events", headers=headers) as r:
        for line in r.iter_lines():
            field, _, value = line.partition(": ")
            if field in ("id", "event", "data"):
                current[field] = value
            if field == "data":
                out.append((int(current["id"]), current["event"], json.loads(value)))
    return out


def test_cancelling_a_running_job_stops_it_and_counts_the_steps_it_ran(
    tmp_path, base_model, service_db_url
):
    service = Service(tmp_path, base_model=base_model, db_url=service_db_url)
    d = service.upload(tickets(40)).json()
    job = service.post("/api/jobs", spec(d["id"], steps=200)).json()
    import threading

    worker = threading.Thread(target=service.work, daemon=True)
    worker.start()
    deadline = time.monotonic() + 300
    while service.get(f"/api/jobs/{job['id']}").json()["progress"].get("step", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert service.post(f"/api/jobs/{job['id']}/cancel", {}).status_code == 200
    worker.join(timeout=300)
    done = service.get(f"/api/jobs/{job['id']}").json()
    assert done["state"] == "cancelled" and 2 <= done["result"]["steps"] < 200
    with db.connect(service.url)() as s:
        entry = s.query(db.LedgerEntry).filter_by(job_id=job["id"]).one()
        assert entry.final and entry.steps == done["result"]["steps"]
    assert service.post(f"/api/jobs/{job['id']}/cancel", {}).status_code == 409


def test_jobs_are_claimed_once(tmp_path):
    """Two workers racing for the same queued jobs: each job is claimed exactly once."""
    sessions = db.connect(db.default_url(tmp_path))
    db.create_tenant(sessions, "t", 1.0)
    with sessions.begin() as s:
        tenant = s.query(db.Tenant).one()
        s.add(db.Dataset(id="d", tenant_id=tenant.id, name="d", path="x", num_records=1,
                         num_bytes=1, content_sha256="c"))  # fmt: skip
        for i in range(20):
            s.add(db.Job(id=f"j{i:02d}", tenant_id=tenant.id, dataset_id="d", spec={}, plan={},
                         created_at=float(i)))  # fmt: skip
    import concurrent.futures

    def claim_all(worker):
        taken = []
        other = db.connect(db.default_url(tmp_path))
        while (job := db.claim_job(other, worker, 60.0)) is not None:
            taken.append(job.id)
        return taken

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(claim_all, ["a", "b", "c", "d"]))
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == [f"j{i:02d}" for i in range(20)]  # all, none twice
    with sessions() as s:
        assert all(j.claims == 1 for j in s.query(db.Job))


def test_the_command_line_creates_tenants_and_embeddings(tmp_path, shared_data, capsys):
    from jaxdp import cli, perturb

    flags = f"--epsilon-cap 4 --workdir {tmp_path}"
    assert cli.main(["serve", "admin", "create-tenant", "acme", *flags.split()]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("jdp_")
    tenant = db.tenant_for_key(db.connect(db.default_url(tmp_path)), key)
    assert tenant.name == "acme" and tenant.epsilon_cap == 4.0
    with db.connect(db.default_url(tmp_path))() as s:  # the key itself is not stored
        assert key not in json.dumps([k.key_sha256 for k in s.query(db.ApiKey)])
    corpus = tmp_path / "public.txt"
    corpus.write_text((shared_data / "wikitext-2" / "test.txt").read_text()[:200_000])
    flags = f"--workdir {tmp_path} --corpus {corpus} --dim 16 --vocab 1000 --epochs 1"
    assert cli.main(["serve", "build-embeddings", *flags.split()]) == 0
    emb = perturb.Embeddings.load(tmp_path / "embeddings")
    assert emb.dim == 16 and len(emb.words) == 1000 and "the" in emb.index
    client = fastapi_testclient.TestClient(create_app(tmp_path))
    assert client.get("/embeddings/vocab.json").json()[:3] == list(emb.words[:3])
    assert REPO.is_dir()
