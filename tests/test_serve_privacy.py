"""The service's job outputs on neighbouring datasets (tests/neighbours.py): a whole job on D,
D + x and D - x with the same secrets, its API responses, server-sent events and artifacts; and
evaluation only on a dataset declared public that shares no record with a private one."""

import dataclasses
import io
import json
import zipfile

import pytest
from neighbours import NAMES, compare_fields, neighbour_texts
from test_serve import Service, spec, tickets

from jaxdp import release
from jaxdp.randomness import Secrets
from jaxdp.serve import db, jobs

SPEC = dict(steps=3, block_size=16, max_blocks_per_record=3, microbatch_size=4)


def _job_outputs(service, dataset_id, eval_id):
    job = service.post("/api/jobs", spec(dataset_id, eval_dataset_id=eval_id, **SPEC))
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    service.work()
    with service.client.stream("GET", f"/api/jobs/{job_id}/events", headers=service.headers) as r:
        lines = [line for line in r.iter_lines() if line.startswith(("event:", "data:"))]
    events = [
        (kind.removeprefix("event: "), json.loads(data.removeprefix("data: ")))
        for kind, data in zip(lines[::2], lines[1::2], strict=True)
    ]
    done = service.get(f"/api/jobs/{job_id}").json()
    responses = {
        name: service.get(f"/api/jobs/{job_id}/artifacts/{name}") for name in done["artifacts"]
    }
    for r in responses.values():  # no timing: the downloads' Last-Modified is the fixed time
        assert r.headers["last-modified"] == "Tue, 01 Jan 1980 00:00:00 GMT"
    artifacts = {name: r.content for name, r in responses.items()}
    return job.json(), done, events, artifacts


def test_a_service_job_releases_nothing_of_the_data_beyond_its_noised_model(
    tmp_path, base_model, monkeypatch
):
    monkeypatch.setattr(Secrets, "generate", classmethod(lambda cls: cls.from_seed(77)))
    texts = neighbour_texts("record")
    outputs, counts = {}, {}
    for name in NAMES:
        service = Service(tmp_path / name, base_model=base_model)
        public = service.upload(tickets(16, seed=42), public="true").json()
        assert public["public"]
        d = service.upload(("\n".join(texts[name]) + "\n").encode()).json()
        counts[name] = len(set(texts[name]))  # distinct records, counted here
        assert d["records"] == counts[name]
        outputs[name] = _job_outputs(service, d["id"], public["id"])
    delta = db.DEFAULT_TENANT_DELTA
    plans = {
        n: jobs.plan_job(jobs.JobSpec.model_validate(spec("x", **SPEC)), counts[n], delta)
        for n in NAMES
    }
    label = Secrets.from_seed(0).label

    # privacy.json (an artifact, and the job's result): the plan's for each N.
    privacy = {n: json.loads(outputs[n][3]["privacy.json"]) for n in NAMES}
    expected = {}
    for n, plan in plans.items():
        # The worker trains at the submitted plan's noise multiplier, with no target.
        ran = dataclasses.replace(plan, target_epsilon=None)
        expected[n] = release.mechanism_record(ran, randomness=label)
        expected[n]["planned_steps"] = plan.num_steps
        assert privacy[n] == json.loads(json.dumps(expected[n])), n
        assert outputs[n][1]["result"] == privacy[n]
    compare_fields(privacy, release.PRIVACY_FIELDS, expected, "the job's privacy.json")

    # The submission's and the finished job's plan: the plan's for each N.
    for n in NAMES:
        submitted, done = outputs[n][0], outputs[n][1]
        for key, value in done["plan"].items():
            assert value == json.loads(json.dumps(expected[n]))[key], (n, key)
        assert submitted["plan"] == done["plan"]
        assert done["state"] == "succeeded" and set(done["artifacts"]) == set(
            outputs["D"][1]["artifacts"]
        )

    # Server-sent events: the same kinds at the same steps; epsilon the plan's; the train loss
    # only under "private" (the tenant's own view, never in an artifact).
    kinds = {n: [(k, e.get("step")) for k, e in outputs[n][2]] for n in NAMES}
    assert kinds["D"] == kinds["D+x"] == kinds["D-x"]
    for n in NAMES:
        for kind, event in outputs[n][2]:
            if kind == "step":
                assert set(event) == {"step", "num_steps", "epsilon", "private"}
                assert event["epsilon"] == plans[n].epsilon(event["step"])
            elif kind == "eval":
                public = {k: v for k, v in event.items() if k != "step"}
                release.checked(public, release.METRIC_FIELDS, "an eval event")

    # report.png: a rendering of the job's public metrics (eval on the public set, epsilon).
    from jaxdp.randomness import FIXED_SEED_LABEL

    for n in NAMES:
        (run_dir,) = (tmp_path / n).glob("tenants/*/jobs/*")
        title = f"{plans[n].describe()} ({FIXED_SEED_LABEL})"
        again = release.render_report(run_dir / "metrics.jsonl", tmp_path / f"{n}.png", title, None)
        assert again.read_bytes() == outputs[n][3]["report.png"]

    # The zipped exports: the same entries, times and bytes but the weights (the noised
    # release) and the model card (a rendering of privacy.json).
    zips = {n: {k: zipfile.ZipFile(io.BytesIO(outputs[n][3][k])) for k in ("hf.zip", "peft.zip")}
            for n in NAMES}  # fmt: skip
    for archive in ("hf.zip", "peft.zip"):
        infos = {n: [(i.filename, i.date_time) for i in zips[n][archive].infolist()] for n in NAMES}
        assert infos["D"] == infos["D+x"] == infos["D-x"], archive
        for filename, _ in infos["D"]:
            contents = {zips[n][archive].read(filename) for n in NAMES}
            if filename == "README.md":
                for n in NAMES:
                    card = zips[n][archive].read(filename).decode()
                    assert f"{privacy[n]['epsilon']:.4g}" in card
            elif not filename.endswith(".safetensors"):
                assert len(contents) == 1, (archive, filename)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zips["D"][archive].infolist())


def test_evaluation_only_on_a_public_dataset_held_out_from_every_private_one(tmp_path, base_model):
    service = Service(tmp_path, base_model=base_model)
    train = service.upload(tickets(30, seed=1)).json()
    private_eval = service.upload(tickets(10, seed=2)).json()
    r = service.post("/api/jobs", spec(train["id"], eval_dataset_id=private_eval["id"]))
    assert r.status_code == 422 and "not declared public" in r.json()["detail"]
    # A "public" set that holds training records is not held out.
    overlap = tickets(30, seed=1).decode().splitlines()[:5] + ["something else entirely"]
    leaky = service.upload(("\n".join(overlap) + "\n").encode(), public="true").json()
    r = service.post("/api/jobs", spec(train["id"], eval_dataset_id=leaky["id"]))
    assert r.status_code == 422 and "shares 5 record(s)" in r.json()["detail"]
    held_out = service.upload(tickets(10, seed=3), public="true").json()
    r = service.post("/api/jobs", spec(train["id"], eval_dataset_id=held_out["id"]))
    assert r.status_code == 201, r.text
    service.work()
    done = service.get(f"/api/jobs/{r.json()['id']}").json()
    assert done["state"] == "succeeded" and "eval_loss" in done["progress"]
    with pytest.raises(KeyError):
        done["progress"]["loss"]  # the unnoised train loss only under "private"
    assert set(done["progress"]["private"]) == {"train_loss"}
