"""The service's API contract: problem details, the bearer scheme, strict and bounded request
models, body limits and quotas, Idempotency-Key, file modes, offline docs, metrics, and the
admin's key and cap commands. (schemathesis fuzzes the whole document: test_serve_schema.py.)"""

import io
import json
import stat
import time

import pytest
from test_serve import Service, fastapi_testclient, spec, tickets

from jaxdp import cli, perturb
from jaxdp.serve import db
from jaxdp.serve.app import create_app

PROBLEM = "application/problem+json"


def is_problem(r, status):
    body = r.json()
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM)
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def test_errors_are_problem_details_and_the_scheme_is_bearer(tmp_path):
    service = Service(tmp_path)
    body = is_problem(service.client.get("/api/me"), 401)
    assert "API key" in body["detail"]
    assert service.client.get("/api/me").headers["www-authenticate"] == "Bearer"
    lower = {"Authorization": f"bearer {service.key}"}
    assert service.client.get("/api/me", headers=lower).status_code == 200
    is_problem(service.get("/api/jobs/nope"), 404)
    # Validation: one string detail, each failure under "errors".
    d = service.upload(tickets(20)).json()
    for bad, where in [
        ({**spec(d["id"]), "stpes": 3}, "stpes"),  # unknown fields are refused, not ignored
        ({**spec(d["id"]), "epochs": 1}, "one of them"),  # steps and epochs
        ({**spec(d["id"]), "steps": None, "epochs": 1}, "null"),
        (spec(d["id"], steps=1_000_000_000), "steps"),  # every number is bounded
        (spec(d["id"], target_epsilon=float("1e308")), "target_epsilon"),
        (spec(d["id"], lora_rank=0, trainable=["(unclosed"]), "regex"),
    ]:
        body = is_problem(service.post("/api/jobs", bad), 422)
        assert where in body["detail"], body
        assert body["errors"] and all({"loc", "msg", "type"} <= set(e) for e in body["errors"])
    r = service.upload(tickets(5), local_epsilon="1.8e308")
    assert "local_epsilon" in is_problem(r, 422)["detail"]
    is_problem(service.upload(tickets(5), format="csv"), 422)
    is_problem(service.upload(tickets(5), name="n" * 201), 422)


def test_the_openapi_document_declares_every_status_and_the_scheme(tmp_path):
    service = Service(tmp_path)
    doc = service.client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant's API key: jdp_...",
    }
    spec_schema = doc["components"]["schemas"]["JobSpec"]
    assert spec_schema["additionalProperties"] is False
    assert spec_schema["oneOf"] == [{"required": ["steps"]}, {"required": ["epochs"]}]
    for name, prop in spec_schema["properties"].items():
        if prop.get("type") in ("integer", "number"):
            assert "maximum" in prop or "exclusiveMaximum" in prop, name
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            codes = set(op["responses"])
            if path not in ("/api/health", "/api/ready"):
                assert "401" in codes and op["security"] == [{"apiKey": []}], (path, method)
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert list(response["content"]) == [PROBLEM], (path, method, code)
    assert {"200", "201", "409", "413", "422"} <= set(
        doc["paths"]["/api/jobs"]["post"]["responses"]
    )
    assert {"413", "429"} <= set(doc["paths"]["/api/datasets"]["post"]["responses"])


def test_docs_work_offline(tmp_path):
    client = Service(tmp_path).client
    page = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert "https://" not in page.split("<body>")[-1].split("SwaggerUIBundle")[0]
    asset = client.get("/docs-assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000


def test_request_bodies_are_limited_before_and_while_they_stream(tmp_path):
    service = Service(tmp_path, max_upload_bytes=5000, max_json_bytes=4096)
    is_problem(service.post("/api/jobs", {"x": "y" * 5000}), 413)  # by Content-Length

    def chunks(n):  # no Content-Length: counted as it arrives
        for _ in range(n):
            yield b"a" * 1024

    r = service.client.post(
        "/api/jobs",
        content=chunks(8),
        headers={**service.headers, "Content-Type": "application/json"},
    )
    is_problem(r, 413)
    is_problem(service.upload(b"x" * 80_000), 413)
    assert service.upload(tickets(20)).status_code == 201  # under the limits: fine
    lying = service.client.post(
        "/api/datasets",
        content=chunks(200),
        headers={
            **service.headers,
            "Content-Type": "multipart/form-data; boundary=b",
            "Content-Length": "10",
        },
    )
    assert lying.status_code in (400, 413)  # never read past the limit, never stored
    assert len(service.get("/api/datasets").json()) == 1


def test_quotas_per_tenant(tmp_path):
    service = Service(tmp_path, max_datasets_per_tenant=2, max_bytes_per_tenant=3000)
    assert service.upload(tickets(5, seed=1)).status_code == 201
    assert service.upload(tickets(5, seed=2)).status_code == 201
    body = is_problem(service.upload(tickets(5, seed=3)), 429)
    assert "2 datasets" in body["detail"]
    first = service.get("/api/datasets").json()[0]["id"]
    assert (
        service.client.delete(f"/api/datasets/{first}", headers=service.headers).status_code == 204
    )
    body = is_problem(service.upload(tickets(60, seed=4)), 413)
    assert "quota of 3000" in body["detail"]
    assert len(service.get("/api/datasets").json()) == 1


def test_an_idempotency_key_makes_one_job(tmp_path, base_model):
    service = Service(tmp_path, base_model=base_model)
    d = service.upload(tickets(30)).json()
    h = {**service.headers, "Idempotency-Key": "click-1"}
    first = service.client.post("/api/jobs", json=spec(d["id"]), headers=h)
    again = service.client.post("/api/jobs", json=spec(d["id"]), headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = service.client.post("/api/jobs", json=spec(d["id"], steps=4), headers=h)
    assert "another body" in is_problem(other, 422)["detail"]
    assert len(service.get("/api/jobs").json()) == 1
    ledger = service.get("/api/ledger").json()
    assert ledger[0]["jobs"] == 1  # charged once
    # Another tenant's same key is its own.
    sessions = db.connect(service.url)
    key = db.create_tenant(sessions, "other", 20.0)
    mine = {"Authorization": f"Bearer {key}", "Idempotency-Key": "click-1"}
    files = {"file": ("a.txt", io.BytesIO(tickets(30)), "text/plain")}
    d2 = service.client.post("/api/datasets", files=files, headers=mine).json()
    r = service.client.post("/api/jobs", json=spec(d2["id"]), headers=mine)
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]


def test_files_are_the_service_users_alone_and_meta_names_no_path(tmp_path):
    service = Service(tmp_path / "svc")
    d = service.upload(tickets(10)).json()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "svc") == 0o700
    assert mode(tmp_path / "svc" / "service.db") == 0o600
    (upload,) = (tmp_path / "svc").glob(f"tenants/*/datasets/{d['id']}.jsonl")
    assert mode(upload) == 0o600 and mode(upload.parent) == 0o700
    emb = perturb.Embeddings(("a", "b"), __import__("numpy").ones((2, 4), "float32"))
    emb.save(tmp_path / "svc" / "embeddings", corpus=[str(tmp_path / "secret-corpus.txt")])
    meta = service.client.get("/embeddings/meta.json").json()
    assert meta == {"dim": 4, "vocab_size": 2, "dtype": "float16"}


def test_metrics_for_the_operator_only(tmp_path, monkeypatch):
    service = Service(tmp_path)
    monkeypatch.delenv("JAXDP_METRICS_TOKEN", raising=False)
    assert service.client.get("/metrics").status_code == 404  # no token set: never
    monkeypatch.setenv("JAXDP_METRICS_TOKEN", "s3cret")
    assert service.client.get("/metrics", headers=service.headers).status_code == 404  # tenant
    r = service.client.get("/metrics", headers={"Authorization": "bearer s3cret"})
    assert r.status_code == 200
    for name in ("jaxdp_jobs", "jaxdp_workers_alive", "jaxdp_job_seconds", "jaxdp_plan_seconds"):
        assert name in r.text
    assert service.client.get("/metrics", headers={"Authorization": "Bearer no"}).status_code == 404


def test_admin_lists_tenants_rotates_revokes_keys_and_sets_caps(tmp_path, capsys):
    flags = ["--workdir", str(tmp_path)]
    assert cli.main(["serve", "admin", "create-tenant", "acme", "--epsilon-cap", "4", *flags]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    client = fastapi_testclient.TestClient(create_app(tmp_path))
    me = lambda k: client.get("/api/me", headers={"Authorization": f"Bearer {k}"})  # noqa: E731
    assert me(key).json()["epsilon_cap"] == 4.0
    assert cli.main(["serve", "admin", "rotate-key", "acme", *flags]) == 0
    new = capsys.readouterr().out.strip().splitlines()[-1]
    assert new.startswith("jdp_") and new != key
    assert me(key).status_code == 401 and me(new).status_code == 200  # the old one stops at once
    assert cli.main(["serve", "admin", "set-cap", "acme", "--epsilon-cap", "2.5", *flags]) == 0
    assert me(new).json()["epsilon_cap"] == 2.5
    assert "epsilon cap 4 -> 2.5" in capsys.readouterr().out
    assert cli.main(["serve", "admin", "list-tenants", *flags]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "acme" and row["keys"] == 1 and row["epsilon_cap"] == 2.5
    assert cli.main(["serve", "admin", "revoke-key", "acme", *flags]) == 0
    assert me(new).status_code == 401
    assert cli.main(["serve", "admin", "set-cap", "nobody", "--epsilon-cap", "1", *flags]) == 2
    assert "No tenant named 'nobody'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_caps_must_be_positive_numbers(tmp_path, value, capsys):
    flags = ["--workdir", str(tmp_path)]
    assert cli.main(["serve", "admin", "create-tenant", "acme", "--epsilon-cap", "4", *flags]) == 0
    capsys.readouterr()
    assert cli.main(["serve", "admin", "set-cap", "acme", "--epsilon-cap", value, *flags]) == 2
    assert "positive number" in capsys.readouterr().err


def test_a_body_without_a_valid_key_is_refused_before_it_is_read(tmp_path):
    service = Service(tmp_path, max_upload_bytes=5000)
    files = {"file": ("a.txt", io.BytesIO(b"x" * 80_000), "text/plain")}
    r = service.client.post("/api/datasets", files=files)  # no key, and over the limit
    assert is_problem(r, 401)["detail"].startswith("A valid API key")
    r = service.client.post("/api/jobs", json={}, headers={"Authorization": "Bearer jdp_nope"})
    is_problem(r, 401)


def test_epochs_are_bounded_like_steps(tmp_path, base_model):
    service = Service(tmp_path, base_model=base_model)
    d = service.upload(tickets(200)).json()
    body = {k: v for k, v in spec(d["id"], expected_batch_size=1).items() if k != "steps"}
    r = service.post("/api/jobs", {**body, "epochs": 10_000})
    assert "over the limit of 1000000" in is_problem(r, 422)["detail"]


def test_docs_serve_only_what_the_page_loads(tmp_path):
    client = Service(tmp_path).client
    for name in ("index.html", "swagger-initializer.js", "oauth2-redirect.html"):
        assert client.get(f"/docs-assets/{name}").status_code == 404
    r = client.post("/static/app.js")
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}


def test_a_plan_computed_for_another_tenant_answers_no_sooner_than_computing_it(tmp_path):
    """One computation serves every tenant that asks the same, but a tenant never learns from
    its latency that someone else computed it (a bare cache hit answers in milliseconds where a
    plan takes seconds: it would tell one tenant another's record count)."""
    import asyncio

    from jaxdp.serve import planning

    planner = planning.Planner.shared()
    args = ([[[(0.9, 0.05, 200 + time.time_ns() % 1000)]]], 1e-6)  # PLD: a second or so

    def run(tenant):
        count = planning.PLAN_SECONDS.labels("worst_epsilons")._sum.get()
        started = time.perf_counter()
        result = asyncio.run(
            planner.run(planning.worst_epsilons, *args, tenant=tenant, deadline=120)
        )
        computed = planning.PLAN_SECONDS.labels("worst_epsilons")._sum.get() != count
        return result, computed, time.perf_counter() - started

    a, a_computed, _ = run("tenant-a")
    ((_, took, _),) = [v for k, v in planner._cache.items() if json.dumps(args)[1:-1] in k]
    assert a_computed and took > 0.05
    b, b_computed, b_seconds = run("tenant-b")
    assert b == a and not b_computed  # computed once
    assert b_seconds >= took - 0.01  # but answered no sooner than computing it took
    again, again_computed, again_seconds = run("tenant-a")  # a tenant's own: at once
    assert again == a and not again_computed and again_seconds < took / 2


def test_the_planners_are_ready_once_every_process_has_imported():
    """Readiness waits for each planning process (a file per pid), not for the warm-up tasks,
    which one fast process could run all of."""
    import os
    import time

    from jaxdp.serve import planning

    planner = planning.Planner(2)
    try:
        deadline = time.monotonic() + 180
        while not planner.ready():
            assert time.monotonic() < deadline, "the planners never became ready"
            time.sleep(0.1)
        assert len(os.listdir(planner._started.name)) == 2  # two processes, by pid
        assert planner.ready()  # a start-up gate: it stays ready
    finally:
        planner.close()
    assert not os.path.exists(planner._started.name)
