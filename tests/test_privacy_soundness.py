"""End-to-end checks of the privacy guarantee as an adversary would attack it: someone who reads
every released file of a run, knows every training example but one, and reruns our code."""

import json
import math
import os
import stat

import jax
import numpy as np
import pytest
from conftest import kill_at_step, load_config, small
from flax import nnx

from jaxdp import checkpoint, randomness
from jaxdp import run as run_lib
from jaxdp.config import to_settings
from jaxdp.tracking import read_metrics
from jaxdp.workdir import RunMismatchError, RunRecord, Workdir


def _params(workdir) -> np.ndarray:
    model, _ = checkpoint.load_model_from_workdir(workdir)
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return np.concatenate([np.ravel(np.asarray(v.get_value(), np.float64)) for _, v in leaves])


def _jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_default_runs_on_neighbouring_datasets_add_independent_noise(tmp_path):
    """Two runs with default settings on D and D + x: their updates differ by the noise.

    One SGD step with lr = 1 moves the parameters by -(clipped sum + noise) / B. If both runs drew
    the same noise (a public, fixed seed), the difference of their parameters would be the
    difference of the clipped sums alone: one example's clipped gradient, exposed. With secret,
    independent noise it has the variance of the difference of two noise draws, 2 (sigma C / B)^2.
    """
    sigma, C = 4.0, 1.0
    cfg = small(load_config("tiny_offline"), num_steps=1, eval_every=1, checkpoint_every=1)
    cfg.dp.noise_multiplier, cfg.dp.l2_clip_norm = sigma, C
    cfg.optim.name, cfg.optim.learning_rate = "sgd", 1.0
    cfg.train.export_hf = False
    run_lib.run(to_settings(cfg), tmp_path / "d")
    x = np.arange(cfg.data.block_size, dtype=np.int32)[None] + 1000  # one more example
    run_lib.run(to_settings(cfg), tmp_path / "d_plus_x", extra_train_blocks=x)
    diff = _params(tmp_path / "d") - _params(tmp_path / "d_plus_x")
    B = cfg.dp.expected_batch_size
    expected = math.sqrt(2) * sigma * C / B
    # ~3.3M coordinates: the sample std is within 0.1% of its expectation; 2% is generous.
    assert np.std(diff) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(diff)) < 5 * expected / math.sqrt(diff.size)


def _public_files(root):
    wd = Workdir(root)
    return [p for p in wd.root.rglob("*") if p.is_file() and wd.private not in p.parents]


def test_released_files_hold_no_secret_and_no_noise_free_statistic(tmp_path):
    cfg = small(load_config("tiny_offline"))
    summary = run_lib.run(to_settings(cfg), tmp_path)
    wd = Workdir(tmp_path)
    secrets = RunRecord.load(wd.run_record).secrets
    assert not secrets.fixed_by_user and summary["randomness"] == secrets.label
    needles = []
    for value in (secrets.noise, secrets.sampling, secrets.dropout):
        needles += [str(value).encode(), f"{value:x}".encode()]
    for key in (secrets.noise_key(), secrets.dropout_key()):
        words = np.asarray(jax.random.key_data(key)).astype("<u4").ravel()
        needles += [words.tobytes()] + [str(int(w)).encode() for w in words]
    public = _public_files(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in public}
    assert {"config.json", "privacy.json", "metrics.jsonl", "hf/model.safetensors"} <= names
    for path in public:
        content = path.read_bytes()
        for needle in needles:
            assert needle not in content, path
    # Noise-free functions of the training data are only in private/.
    released_text = "".join(
        p.read_text() for p in public if p.suffix in (".json", ".jsonl", ".txt")
    )
    for word in ("train_loss", "examples_seen", "batch_size", "data_sha256", "clip_fraction"):
        assert f'"{word}"' not in released_text, word
    # The private part says what it is and is readable by its owner only.
    assert stat.S_IMODE(os.stat(wd.run_record).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(wd.private).st_mode) == 0o700
    assert "do not publish" in (wd.private / "README.txt").read_text()
    # The noise key the checkpoint resumes with is the secret one.
    meta = checkpoint.read_meta(checkpoint.manager(tmp_path), 2)
    assert "fingerprint" not in meta and meta["examples_seen"] >= 0


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "private/tokens_per_s"} for r in records]


@pytest.mark.slow
def test_crash_after_logging_uncheckpointed_steps_replays_them_exactly(tmp_path, monkeypatch):
    """Killed after steps 3 (checkpoint at 2) and 1 (no checkpoint yet) were logged: the
    resumed run, with the stored secrets, replays them exactly (the same draws, dropout masks
    and noise), and the final epsilon counts every step once (dp-accounting called directly)."""
    import dp_accounting

    cfg = small(load_config("tiny_offline"), num_steps=4, checkpoint_every=2, eval_every=4)
    cfg.model.dropout = 0.1
    for kill_step, checkpointed in ((3, 2), (1, None)):
        run_dir = tmp_path / f"kill{kill_step}"
        undo = kill_at_step(monkeypatch, kill_step)
        with pytest.raises(KeyboardInterrupt):
            run_lib.run(to_settings(cfg), run_dir)
        undo()
        wd = Workdir(run_dir)
        assert checkpoint.manager(run_dir).latest_step() == checkpointed
        logs = (wd.metrics, wd.private_metrics)
        logged = [_without_timing(_jsonl(path)) for path in logs]
        assert [r["step"] for r in logged[1]] == list(range(1, kill_step + 1))
        summary = run_lib.run(to_settings(cfg), run_dir)
        for before, path in zip(logged, logs, strict=True):
            again = _without_timing(_jsonl(path))
            assert again[: len(before)] == before, path
            assert [r["step"] for r in again] == [1, 2, 3, 4]
        assert summary["steps"] == 4
        event = dp_accounting.PoissonSampledDpEvent(
            summary["sampling_prob"], dp_accounting.GaussianDpEvent(summary["noise_multiplier"])
        )
        accountant = dp_accounting.pld.PLDAccountant().compose(event, 4)
        assert summary["epsilon"] == pytest.approx(
            accountant.get_epsilon(summary["delta"]), rel=1e-6
        )


def test_eval_outputs_come_from_checkpoints_so_resuming_cannot_release_them_twice(
    tmp_path, monkeypatch
):
    """Eval metrics and samples are functions of the private data: each is computed from a
    checkpointed state. A crash and a resume with other performance settings (microbatch:
    other dropout masks, other float rounding) then re-computes nothing that was released, so
    the same noise never yields two different released values."""
    cfg = small(load_config("tiny_offline"), num_steps=4, checkpoint_every=4, eval_every=1)
    cfg.model.dropout = 0.1
    cfg.train.keep_checkpoints = 10
    undo = kill_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(to_settings(cfg), tmp_path)  # steps 1 and 2 evaluated and released
    undo()
    wd = Workdir(tmp_path)
    assert checkpoint.manager(tmp_path).all_steps() == [1, 2]  # every eval checkpointed first
    released = [_jsonl(wd.metrics), _jsonl(wd.samples)]
    assert [r["step"] for r in released[0]] == [1, 2] and "public/eval_loss" in released[0][1]
    cfg.dp.microbatch_size = 1  # a resumable setting changed
    run_lib.run(to_settings(cfg), tmp_path)
    for before, path in zip(released, (wd.metrics, wd.samples), strict=True):
        assert _jsonl(path)[: len(before)] == before


def test_resuming_on_other_data_is_refused(tmp_path, monkeypatch):
    """The same noise on different data would release the difference of two clipped sums."""
    text = tmp_path / "train.txt"
    source = open(load_config("tiny_offline").data.train_files[0]).read()
    text.write_text(source[:20000])
    cfg = small(load_config("tiny_offline"), num_steps=3)
    cfg.data.train_files = (str(text),)
    undo = kill_at_step(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(to_settings(cfg), tmp_path / "w")  # step 1 logged, no checkpoint yet
    undo()
    text.write_text(source[:19000] + source[20000:21000])  # one example changed
    with pytest.raises(RunMismatchError, match="data_sha256"):
        run_lib.run(to_settings(cfg), tmp_path / "w")


def test_fixed_noise_seed_is_labelled_everywhere(tmp_path):
    cfg = small(load_config("tiny_offline"))
    cfg.dp.noise_seed = 5
    summary = run_lib.run(to_settings(cfg), tmp_path / "a")
    assert summary["randomness"] == randomness.FIXED_SEED_LABEL
    records = read_metrics(tmp_path / "a" / "metrics.jsonl", "public")
    assert records and all(r["noise_seed_fixed_by_user"] for r in records)
    # The seed itself is not published: config.json keeps only that it was fixed.
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["dp"]["noise_seed"] != 5 and "private" in config["dp"]["noise_seed"]
    assert randomness.FIXED_SEED_LABEL in run_lib.describe_result(summary)
    # Reproducible: the same seed gives the same run.
    again = run_lib.run(to_settings(cfg), tmp_path / "b")
    assert again == summary
    np.testing.assert_array_equal(_params(tmp_path / "a"), _params(tmp_path / "b"))
    default = run_lib.run(to_settings(small(load_config("tiny_offline"))), tmp_path / "c")
    assert randomness.FIXED_SEED_LABEL not in run_lib.describe_result(default)


def test_workdirs_without_their_secrets_are_refused(tmp_path):
    cfg = small(load_config("tiny_offline"))
    old = tmp_path / "old_layout"
    (old / "checkpoints" / "2").mkdir(parents=True)  # written by jaxdp with a public seed
    with pytest.raises(RunMismatchError, match="public"):
        run_lib.run(to_settings(cfg), old)
    run_lib.run(to_settings(cfg), tmp_path / "lost")
    (tmp_path / "lost" / "private" / "run.json").unlink()
    with pytest.raises(RunMismatchError, match="secret randomness"):
        run_lib.run(to_settings(cfg), tmp_path / "lost")
