"""Shared fixtures: offline data beside the checkout and tiny, prime-sized models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tests compile many tiny programs; XLA's backend optimisations cost more than they save here.
# (Numerics are unaffected; set XLA_FLAGS yourself to override.)
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXDP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Reuse compiled programs across the many short runs of one test session."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
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
