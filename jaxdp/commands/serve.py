"""`jaxdp serve`: the private fine-tuning service (see jaxdp/serve/).

    jaxdp serve --workdir W [--db URL] [--host 127.0.0.1 --port 8000] [--workers 1]
                [--planners 1 --plan-deadline 30] [--max-upload-mb 100]
                [--max-datasets-per-tenant 100 --max-tenant-mb 1024]
        the web page and REST API (uvicorn), supervised worker processes on this host, and the
        planning processes; all of them end with the server
    jaxdp serve worker --workdir W --db URL
        a worker alone: one per accelerator host, all on one database (PostgreSQL)
    jaxdp serve admin create-tenant NAME --epsilon-cap E [--delta D] --workdir W [--db URL]
        a tenant and its API key (printed once; only its hash is stored)
    jaxdp serve admin list-tenants | rotate-key NAME | revoke-key NAME
                      | set-cap NAME --epsilon-cap E | add-model NAME SOURCE   --workdir W
        the tenants; a new key (the old ones stop at once); no key; a new cap; a base model
    jaxdp serve build-embeddings --workdir W --corpus FILE [FILE ...] [--dim 50 --vocab 20000]
        word2vec embeddings of a PUBLIC corpus for the page's perturbation

The database defaults to SQLite in the workdir (W/service.db). Workers are started with the
`spawn` method: JAX is multithreaded and must never run in a forked process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

ADMIN_ACTIONS = (
    "create-tenant",
    "list-tenants",
    "rotate-key",
    "revoke-key",
    "set-cap",
    "add-model",
)
WORKER_OPTIONS = ("poll_interval", "heartbeat_interval", "heartbeat_timeout")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, type=Path, help="the service's directory")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in the workdir)")


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between claims")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument(
        "--heartbeat-timeout", type=float, default=60.0, help="a silent job is claimed again"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from jaxdp.serve import logs

    logs.configure()
    # The service's files (the database with each tenant's keys, uploads, jobs) are its user's
    # alone: 0600 files, 0700 directories, also in the workers (they inherit the mask).
    os.umask(0o077)
    command = argv[0] if argv and argv[0] in ("worker", "admin", "build-embeddings") else "serve"
    if command != "serve":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog=f"jaxdp serve{'' if command == 'serve' else ' ' + command}"
    )
    if command == "admin":
        parser.add_argument("action", choices=ADMIN_ACTIONS)
        parser.add_argument("name", nargs="?", help="the tenant's or the base model's name")
        parser.add_argument(
            "source", nargs="?", help="add-model: a local Hugging Face directory or a Hub id"
        )
        parser.add_argument("--epsilon-cap", type=float, help="create-tenant: the cap on epsilon")
        parser.add_argument(
            "--delta",
            type=float,
            default=None,
            help="create-tenant: the tenant's delta, fixed for good (default 1e-6)",
        )
    elif command == "build-embeddings":
        parser.add_argument("--corpus", nargs="+", required=True, help="PUBLIC text files")
        parser.add_argument("--dim", type=int, default=50)
        parser.add_argument("--vocab", type=int, default=20_000)
        parser.add_argument("--epochs", type=int, default=5)
    else:
        _worker_args(parser)
    _common(parser)
    if command == "serve":
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--workers", type=int, default=1, help="worker processes here")
        parser.add_argument("--max-upload-mb", type=float, default=100.0)
        parser.add_argument(
            "--plan-deadline",
            type=float,
            default=30.0,
            help="seconds a job's plan (calibration, ledger) may take before it is refused",
        )
        parser.add_argument(
            "--planners", type=int, default=1, help="processes that plan jobs off the server"
        )
        parser.add_argument("--max-datasets-per-tenant", type=int, default=100)
        parser.add_argument("--max-tenant-mb", type=float, default=1024.0, help="all its uploads")
    args = parser.parse_args(argv)

    from jaxdp.serve import db

    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    url = args.db or db.default_url(workdir)
    if command == "admin":
        return _admin(args, url)
    if command == "build-embeddings":
        from jaxdp import perturb

        emb = perturb.build_embeddings(
            args.corpus, dim=args.dim, vocab_size=args.vocab, epochs=args.epochs
        )
        out = emb.save(workdir / "embeddings", corpus=[str(c) for c in args.corpus])
        print(f"{len(emb.words)} words x {emb.dim} dimensions in {out}")
        return 0
    options = {k: getattr(args, k) for k in WORKER_OPTIONS}
    if command == "worker":
        from jaxdp.serve import jobs

        jobs.run_worker(workdir, url, **options)
        return 0
    return _serve(args, workdir, url, options)


def _serve(args: argparse.Namespace, workdir: Path, url: str, options: dict) -> int:
    """The server and its children: the workers (supervised: restarted when they die) and the
    planning processes, all stopped in the app's shutdown, which uvicorn runs on SIGTERM and
    SIGINT before it re-raises the signal; on SIGKILL the children die with the server
    (`supervision.die_with_parent`)."""

    import uvicorn

    from jaxdp.serve import db, planning, supervision
    from jaxdp.serve.app import create_app

    db.connect(url)  # creates or migrates the database before any worker opens it
    planner = planning.Planner(args.planners)
    supervisor = supervision.WorkerSupervisor(workdir, url, args.workers, options)

    async def announce_ready() -> None:
        started = time.monotonic()
        while not (planner.ready() and supervisor.ready()):
            await asyncio.sleep(0.2)
        logging.getLogger("jaxdp.serve").info(
            "Ready (%d worker(s), %d planner(s), %.1f s): GET /api/ready answers 200.",
            args.workers,
            args.planners,
            time.monotonic() - started,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        supervisor.start()
        app.state.supervisor = supervisor
        announcing = asyncio.create_task(announce_ready())
        try:
            yield
        finally:
            announcing.cancel()
            logging.getLogger("jaxdp.serve").info("Stopping the workers and planners.")
            supervisor.stop()
            planner.close()

    try:
        app = create_app(
            workdir,
            url,
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_datasets_per_tenant=args.max_datasets_per_tenant,
            max_bytes_per_tenant=int(args.max_tenant_mb * 2**20),
            plan_deadline=args.plan_deadline,
            planner=planner,
            lifespan=lifespan,
        )
        # On SIGTERM: at most 10 s for the requests under way, then the lifespan's shutdown.
        uvicorn.run(
            app, host=args.host, port=args.port, log_config=None, timeout_graceful_shutdown=10
        )
    finally:  # a start-up failure: nothing is left behind either
        supervisor.stop()
        planner.close()
    return 0


def _admin(args: argparse.Namespace, url: str) -> int:
    from jaxdp.serve import db

    sessions = db.connect(url)
    try:
        if args.action == "list-tenants":
            print(json.dumps(db.list_tenants(sessions), indent=2))
            return 0
        if not args.name:
            raise ValueError(f"{args.action} needs a NAME.")
        if args.action == "rotate-key":
            key = db.rotate_key(sessions, args.name)
            print(f"Tenant {args.name!r}: its old keys are revoked. New key, shown once:\n{key}")
            return 0
        if args.action == "revoke-key":
            n = db.revoke_keys(sessions, args.name)
            print(f"Tenant {args.name!r}: {n} key(s) revoked; `rotate-key` gives it a new one.")
            return 0
        if args.action == "set-cap":
            if args.epsilon_cap is None:
                raise ValueError("set-cap needs --epsilon-cap.")
            old = db.set_cap(sessions, args.name, args.epsilon_cap)
            print(f"Tenant {args.name!r}: epsilon cap {old:g} -> {args.epsilon_cap:g}.")
            return 0
        if args.action == "add-model":
            if not args.source:
                raise ValueError("add-model needs NAME and SOURCE (a local directory or Hub id).")
            db.add_base_model(sessions, args.name, args.source)
            print(f"Base model {args.name!r} -> {args.source}")
            return 0
        if args.epsilon_cap is None:
            raise ValueError("create-tenant needs --epsilon-cap.")
        delta = db.DEFAULT_TENANT_DELTA if args.delta is None else args.delta
        key = db.create_tenant(sessions, args.name, args.epsilon_cap, delta)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Tenant {args.name!r} created (epsilon cap {args.epsilon_cap:g} at delta {delta:g}). "
          f"Its API key, shown once:\n{key}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
