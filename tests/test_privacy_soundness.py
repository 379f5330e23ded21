"""End-to-end checks of the privacy guarantee as an adversary would attack it: someone who reads
every released file of a run, knows every training example but one, and reruns our code."""

import json
import math
import os
import stat

import jax
import numpy as np
import pytest
from flax import nnx
from test_trainer import _kill_at_step, _load_config, _small

from jaxdp import checkpoint, randomness, trainer
from jaxdp.workdir import RunMismatchError, RunRecord, Workdir


def _params(workdir) -> np.ndarray:
    model, _ = checkpoint.load_model_from_workdir(workdir)
    leaves = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return np.concatenate([np.ravel(np.asarray(v.get_value(), np.float64)) for _, v in leaves])


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_default_runs_on_neighbouring_datasets_add_independent_noise(tmp_path):
    """Two runs with default settings on D and D + x: their updates differ by the noise.

    One SGD step with lr = 1 moves the parameters by -(clipped sum + noise) / B. If both runs drew
    the same noise (a public, fixed seed), the difference of their parameters would be the
    difference of the clipped sums alone: one example's clipped gradient, exposed. With secret,
    independent noise it has the variance of the difference of two noise draws, 2 (sigma C / B)^2.
    """
    sigma, C = 4.0, 1.0
    cfg = _small(_load_config("tiny_offline"), num_steps=1, eval_every=1, checkpoint_every=1)
    cfg.dp.noise_multiplier, cfg.dp.l2_clip_norm = sigma, C
    cfg.optim.name, cfg.optim.learning_rate = "sgd", 1.0
    cfg.train.export_hf = False
    trainer.run(cfg, tmp_path / "d")
    x = np.arange(cfg.data.block_size, dtype=np.int32)[None] + 1000  # one more example
    trainer.run(cfg, tmp_path / "d_plus_x", extra_train_blocks=x)
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
    cfg = _small(_load_config("tiny_offline"))
    summary = trainer.run(cfg, tmp_path)
    wd = Workdir(tmp_path)
    secrets = RunRecord.load(wd.run_record).secrets
    assert not secrets.fixed_by_user and summary["randomness"] == secrets.label
    needles = []
    for value in (secrets.noise, secrets.sampling, secrets.dropout):
        needles += [str(value).encode(), f"{value:x}".encode()]
    for key in (secrets.noise_key(), secrets.dropout_key()):
        needles.append(np.asarray(jax.random.key_data(key)).astype("<u4").tobytes())
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


def test_crash_after_releasing_uncheckpointed_steps_replays_them_exactly(tmp_path, monkeypatch):
    """Killed after steps 3 (checkpoint at 2) and 1 (no checkpoint yet) were logged and sampled:
    the resumed run re-releases exactly the same records, so no released number was computed
    twice with different noise, and the final epsilon counts every step once."""
    cfg = _small(_load_config("tiny_offline"), num_steps=4, checkpoint_every=2, eval_every=1)
    cfg.model.dropout = 0.1
    wd = Workdir(tmp_path)
    for kill_step, checkpointed in ((3, 2), (1, None)):
        run_dir = tmp_path / f"kill{kill_step}"
        undo = _kill_at_step(monkeypatch, kill_step)
        with pytest.raises(KeyboardInterrupt):
            trainer.run(cfg, run_dir)
        undo()
        wd = Workdir(run_dir)
        assert checkpoint.manager(run_dir).latest_step() == checkpointed
        released = {
            name: _jsonl(path) for name, path in (("metrics", wd.metrics), ("samples", wd.samples))
        }
        assert [r["step"] for r in released["metrics"]] == list(range(1, kill_step + 1))
        summary = trainer.run(cfg, run_dir)
        for name, path in (("metrics", wd.metrics), ("samples", wd.samples)):
            again = _jsonl(path)
            assert again[: len(released[name])] == released[name], name
        assert [r["step"] for r in _jsonl(wd.metrics)] == [1, 2, 3, 4]
        assert summary["steps"] == 4
        plan = trainer.plan_privacy(cfg, summary["num_examples"])
        assert summary["epsilon"] == plan.epsilon(4)


def test_resuming_on_other_data_is_refused(tmp_path, monkeypatch):
    """The same noise on different data would release the difference of two clipped sums."""
    text = tmp_path / "train.txt"
    source = open(_load_config("tiny_offline").data.train_files[0]).read()
    text.write_text(source[:20000])
    cfg = _small(_load_config("tiny_offline"), num_steps=3)
    cfg.data.train_files = (str(text),)
    undo = _kill_at_step(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg, tmp_path / "w")  # step 1 logged, no checkpoint yet
    undo()
    text.write_text(source[:19000] + source[20000:21000])  # one example changed
    with pytest.raises(RunMismatchError, match="data_sha256"):
        trainer.run(cfg, tmp_path / "w")


def test_fixed_noise_seed_is_labelled_everywhere(tmp_path):
    cfg = _small(_load_config("tiny_offline"))
    cfg.dp.noise_seed = 5
    summary = trainer.run(cfg, tmp_path / "a")
    assert summary["randomness"] == randomness.FIXED_SEED_LABEL
    assert all(r["noise_seed_fixed_by_user"] for r in _jsonl(tmp_path / "a" / "metrics.jsonl"))
    assert randomness.FIXED_SEED_LABEL in trainer.describe_result(summary)
    # Reproducible: the same seed gives the same run.
    again = trainer.run(cfg, tmp_path / "b")
    assert again == summary
    np.testing.assert_array_equal(_params(tmp_path / "a"), _params(tmp_path / "b"))
    default = trainer.run(_small(_load_config("tiny_offline")), tmp_path / "c")
    assert randomness.FIXED_SEED_LABEL not in trainer.describe_result(default)


def test_workdirs_without_their_secrets_are_refused(tmp_path):
    cfg = _small(_load_config("tiny_offline"))
    old = tmp_path / "old_layout"
    (old / "checkpoints" / "2").mkdir(parents=True)  # written by jaxdp with a public seed
    with pytest.raises(RunMismatchError, match="public"):
        trainer.run(cfg, old)
    trainer.run(cfg, tmp_path / "lost")
    (tmp_path / "lost" / "private" / "run.json").unlink()
    with pytest.raises(RunMismatchError, match="secret randomness"):
        trainer.run(cfg, tmp_path / "lost")
