"""Load test of `jaxdp serve`: concurrent clients upload datasets and submit jobs against a real
server on 127.0.0.1, follow their jobs to the end and download a result; then every job is
checked: none lost (each submitted job exists and ended), none run twice (claimed once).

    python benchmarks/load_service.py --clients 50 --workers 1 [--ramp 5]
    python benchmarks/load_service.py --url http://127.0.0.1:8000 --workdir W   # a server running

Without --url it starts `jaxdp serve` itself (a temporary workdir, a tiny random GPT-2 as the
base model, one tenant per client). Prints requests/s and p50/p99 latency per kind of request
and writes them as JSON (--out). Exits 1 if a job was lost, failed or run twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
WORDS = "the order arrived late please refund my account password reset thanks help".split()


def records(client: int, n: int) -> bytes:
    rng = np.random.default_rng(client)
    lines = [
        f"client {client} " + " ".join(rng.choice(WORDS, rng.integers(3, 20))) for _ in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


class Timings:
    def __init__(self):
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []

    async def request(self, client: httpx.AsyncClient, kind: str, method: str, url: str, **kw):
        start = time.perf_counter()
        r = await client.request(method, url, **kw)
        self.latencies[kind].append(time.perf_counter() - start)
        if r.status_code >= 400:
            self.errors.append(f"{kind} {method} {url}: {r.status_code} {r.text[:200]}")
        return r

    def summary(self, seconds: float) -> dict:
        every = [x for xs in self.latencies.values() for x in xs]

        def stats(xs):
            q = np.percentile(xs, [50, 99]) * 1000
            return {"count": len(xs), "p50_ms": round(q[0], 1), "p99_ms": round(q[1], 1)}

        return {
            "seconds": round(seconds, 2),
            "requests": len(every),
            "requests_per_s": round(len(every) / seconds, 1),
            "all": stats(every),
            **{k: stats(v) for k, v in sorted(self.latencies.items())},
            "errors": self.errors,
        }


async def one_client(i, base, key, base_model, args, timings: Timings) -> str | None:
    headers = {"Authorization": f"Bearer {key}"}
    await asyncio.sleep(i * args.ramp / args.clients)  # clients arrive over `ramp` seconds
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as c:
        await timings.request(c, "me", "GET", "/api/me")
        files = {"file": (f"client{i}.txt", records(i, args.records), "text/plain")}
        r = await timings.request(c, "upload", "POST", "/api/datasets", files=files)
        if r.status_code != 201:
            return None
        spec = {
            "dataset_id": r.json()["id"],
            "base_model": base_model,
            "lora_rank": 2,
            "target_epsilon": 8.0,
            "steps": args.steps,
            "expected_batch_size": 4,
            "block_size": 16,
            "microbatch_size": 4,
            "learning_rate": 0.01,
        }
        r = await timings.request(c, "submit", "POST", "/api/jobs", json=spec)
        if r.status_code != 201:
            return None
        job_id = r.json()["id"]
        while True:  # poll as a page without server-sent events would
            await asyncio.sleep(args.poll)
            job = (await timings.request(c, "poll", "GET", f"/api/jobs/{job_id}")).json()
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
        if job["state"] == "succeeded":
            await timings.request(
                c, "download", "GET", f"/api/jobs/{job_id}/artifacts/privacy.json"
            )
        await timings.request(c, "ledger", "GET", "/api/ledger")
        return job_id


class ProcessTree:
    """Every process the started server ever had under it (sampled while it runs), to check
    that all of them ended with it."""

    def __init__(self, proc: subprocess.Popen | None):
        self.root = psutil.Process(proc.pid) if proc is not None else None
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.root is not None:
            self._thread.start()

    def remember(self) -> None:
        if self.root is None:
            return
        try:
            for child in self.root.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            self.remember()

    def still_running(self, timeout: float) -> list[int]:
        self._stop.set()
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=timeout)
        for p in alive:  # reported, then ended: the script leaves nothing behind either
            p.kill()
        return [p.pid for p in alive]


def start_server(workdir: Path, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = f"--workdir {workdir} --port {port} --workers {args.workers} --poll-interval 0.2"
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxdp.cli", "serve", *flags.split()], stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/api/ready").status_code == 200:  # 503 while starting
                return proc, base
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"The server did not start; see {workdir / 'server.log'}")


def tiny_base_model(path: Path, tokenizer: str) -> str:
    from jaxdp import data, hf
    from jaxdp.gpt2 import GPT2Config, init_model

    hf.save_pretrained(
        init_model(GPT2Config.preset("tiny"), seed=0),
        path,
        tokenizer=data.load_tokenizer(tokenizer),
    )
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="worker processes of a started server")
    p.add_argument("--records", type=int, default=40, help="records per uploaded dataset")
    p.add_argument("--steps", type=int, default=2, help="DP-SGD steps per job")
    p.add_argument(
        "--ramp", type=float, default=5.0, help="seconds over which the clients start (0: at once)"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between job polls")
    p.add_argument("--url", help="a running server (then --workdir must be its workdir)")
    p.add_argument("--workdir", type=Path, help="default: a temporary directory")
    p.add_argument("--base-model", help="default: a tiny random GPT-2 written to the workdir")
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "gpt2-tokenizer"))
    p.add_argument("--out", type=Path, help="write the summary here as JSON")
    args = p.parse_args(argv)

    from jaxdp.serve import db

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="jaxdp-load-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sessions = db.connect(db.default_url(workdir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    keys = [db.create_tenant(sessions, f"load-{stamp}-{i}", 20.0) for i in range(args.clients)]
    # Jobs name a base model the admin registered (`jaxdp serve admin add-model`).
    db.add_base_model(
        sessions, "load-base", args.base_model or tiny_base_model(workdir / "base", args.tokenizer)
    )
    base_model = "load-base"
    proc, base = (None, args.url) if args.url else start_server(workdir, args)
    timings = Timings()
    started_processes = ProcessTree(proc)
    try:
        start = time.perf_counter()

        async def everyone():
            return await asyncio.gather(
                *(one_client(i, base, k, base_model, args, timings) for i, k in enumerate(keys)),
                return_exceptions=True,  # a client's failure is reported, not fatal to the rest
            )

        job_ids = asyncio.run(everyone())
        for i, r in enumerate(job_ids):
            if isinstance(r, BaseException):
                timings.errors.append(f"client {i}: {type(r).__name__}: {r}")
        job_ids = [None if isinstance(r, BaseException) else r for r in job_ids]
        seconds = time.perf_counter() - start
    finally:
        started_processes.remember()
        if proc is not None:
            proc.terminate()  # SIGTERM: the server stops its workers and planners itself
            proc.wait(timeout=60)
    left = started_processes.still_running(timeout=20)
    summary = timings.summary(seconds)
    # Every client's job exists, ended, succeeded and was claimed exactly once.
    with sessions() as s:
        tenant_ids = [db.tenant_for_key(sessions, k).id for k in keys]
        rows = s.query(db.Job).filter(db.Job.tenant_id.in_(tenant_ids)).all()
    by_id = {j.id: j for j in rows}
    lost = [i for i, j in enumerate(job_ids) if j is None or j not in by_id]
    claims = [j.claims for j in rows]
    summary |= {
        "clients": args.clients,
        "ramp_seconds": args.ramp,
        "workers": args.workers,
        "steps_per_job": args.steps,
        "jobs": len(rows),
        "jobs_succeeded": sum(j.state == "succeeded" for j in rows),
        "jobs_lost": len(lost),
        "jobs_claimed_more_than_once": sum(c > 1 for c in claims),
        "processes_started": len(started_processes.seen) + (proc is not None),
        "processes_left_running": left,
        "non_submit_p99_ms": round(
            float(
                np.percentile(
                    [x for k, xs in timings.latencies.items() if k != "submit" for x in xs], 99
                )
                * 1000
            ),
            1,
        ),
        "jobs_per_minute": round(60 * sum(j.state == "succeeded" for j in rows) / seconds, 1),
        "median_job_seconds": round(
            statistics.median(j.finished_at - j.started_at for j in rows if j.finished_at) or 0, 2
        )
        if any(j.finished_at for j in rows)
        else None,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    ok = (
        not lost
        and summary["jobs_succeeded"] == args.clients
        and summary["jobs_claimed_more_than_once"] == 0
        and not summary["errors"]
        and not left
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
