"""Shared fixtures: offline data beside the checkout and tiny, prime-sized models."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

# The tests compile many tiny programs; XLA's backend optimisations cost more than they save here.
# (Numerics are unaffected; set XLA_FLAGS yourself to override.) Set before JAX is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

from jaxdp import sampling  # noqa: E402
from jaxdp.config import load_config_file  # noqa: E402
from jaxdp.workdir import Workdir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXDP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Reuse compiled programs across the many short runs of one test session: one cache for
    every xdist worker and for the subprocesses the tests start (through the environment)."""
    import jax

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "jax_cache"
    cache.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (override with JAXDP_SHARED_DATA); a missing copy is an error, not a skip."""
    if not (SHARED_DATA / "gpt2-tokenizer" / "vocab.json").is_file():
        pytest.fail(f"Offline test data not found at {SHARED_DATA}; set JAXDP_SHARED_DATA.")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data: Path) -> Path:
    return shared_data / "gpt2-tokenizer"


@pytest.fixture(scope="session")
def base_model(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny random GPT-2 saved as a Hugging Face directory with its tokenizer."""
    from jaxdp import data, hf
    from jaxdp.gpt2 import GPT2Config, init_model

    path = tmp_path_factory.mktemp("base")
    model = init_model(GPT2Config.preset("tiny"), seed=4)
    hf.save_pretrained(model, path, tokenizer=data.load_tokenizer(tokenizer_dir))
    return str(path)


@pytest.fixture
def tiny_config():
    from jaxdp.gpt2 import GPT2Config

    # Prime-ish sizes so that a transposed or mis-reshaped axis cannot hide.
    return GPT2Config(
        vocab_size=61,
        n_positions=11,
        n_embd=30,
        n_layer=2,
        n_head=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


# clipping.clip_factor clips to (1 - ROUNDING_MARGIN) of a threshold: brute-force references too
SAFE = 1 - 1e-5


def per_example_norms(grads) -> np.ndarray:
    """Reference: the L2 norm of each example's gradient over the whole tree ([B, ...] leaves),
    in float64 NumPy."""
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    return np.sqrt(sum(np.sum(np.square(g), axis=tuple(range(1, g.ndim))) for g in leaves))


def dp_plan(l2_clip_norm, noise_multiplier, expected_batch_size, *, clipping="flat", n=10_000):
    """A DP-SGD privacy plan with these settings (no calibration), for step-level tests."""
    from jaxdp.plan import PrivacyPlan

    return PrivacyPlan(
        num_examples=n,
        expected_batch_size=float(expected_batch_size),
        num_steps=1,
        l2_clip_norm=l2_clip_norm,
        noise_multiplier=noise_multiplier,
        target_delta=1e-6,
        clipping=clipping,
    )


# Offline configs for end-to-end runs ---------------------------------------------------


def load_config(name, arg=None):
    """A shipped config, loaded and locked as the CLI does (typos in tests fail too)."""
    return load_config_file(REPO / "configs" / f"{name}.py", arg)


def small(cfg, **train_overrides):
    """The offline config shrunk further so that a run takes seconds."""
    cfg.data.block_size = 16
    cfg.data.max_eval_examples = 8
    cfg.dp.expected_batch_size = 6
    cfg.dp.microbatch_size = 3
    # A fixed sigma: calibrating at these tiny q and step counts lands at sigma ~ 0.3, where PLD
    # accounting takes seconds per evaluation (the smoke test below still calibrates once).
    cfg.dp.noise_multiplier = 1.0
    cfg.dp.target_epsilon = None
    cfg.train.num_steps = 2
    cfg.train.log_every = 1
    cfg.train.eval_every = 2
    cfg.train.checkpoint_every = 2
    cfg.train.eval_batch_size = 8
    cfg.train.sample_max_new_tokens = 4
    cfg.train.progress = False
    for k, v in train_overrides.items():
        setattr(cfg.train, k, v)
    return cfg


def kill_at_step(monkeypatch, kill_step: int):
    """Makes the sampler raise as it draws the batch of (0-based) `kill_step`; returns undo()."""
    real_sample = sampling.PoissonSampler.sample

    def dying_sample(self, step):
        if step == kill_step:
            raise KeyboardInterrupt("simulated kill")
        return real_sample(self, step)

    monkeypatch.setattr(sampling.PoissonSampler, "sample", dying_sample)
    return lambda: monkeypatch.setattr(sampling.PoissonSampler, "sample", real_sample)


def same_secrets(src, dst) -> None:
    """Gives workdir `dst` the secret randomness of `src` (as if it were the same run)."""
    Workdir(dst).make_private()
    shutil.copy(Workdir(src).run_record, Workdir(dst).run_record)


# small() as command-line overrides of configs/tiny_offline.py.
SMALL_FLAGS = [
    "--config.data.block_size=16",
    "--config.data.max_eval_examples=8",
    "--config.dp.expected_batch_size=6",
    "--config.dp.microbatch_size=3",
    "--config.dp.noise_multiplier=1.0",
    "--config.dp.target_epsilon=None",
    "--config.train.log_every=1",
    "--config.train.eval_batch_size=8",
    "--config.train.sample_max_new_tokens=4",
    "--config.train.progress=False",
]


def train_command(workdir, *flags, small: bool = True) -> list[str]:
    """`python scripts/train.py` on configs/tiny_offline.py in `workdir` with `flags`."""
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(REPO / "configs" / "tiny_offline.py"),
        "--workdir",
        str(workdir),
        *(SMALL_FLAGS if small else []),
        *flags,
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def service_db_url(request, tmp_path):
    """The service's database: SQLite in tmp_path, or a fresh database on the PostgreSQL server
    at JAXDP_TEST_POSTGRES_URL (.ci/postgres.sh starts one; without it the PostgreSQL case is
    skipped, or fails under JAXDP_REQUIRE_POSTGRES=1, as in CI)."""
    from jaxdp.serve import db

    if request.param == "sqlite":
        yield db.default_url(tmp_path)
        return
    server = os.environ.get("JAXDP_TEST_POSTGRES_URL")
    if not server:
        message = "no PostgreSQL: set JAXDP_TEST_POSTGRES_URL (source .ci/postgres.sh start)"
        if os.environ.get("JAXDP_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    import uuid

    import sqlalchemy

    name = f"jaxdp_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
