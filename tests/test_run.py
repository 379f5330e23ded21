"""End-to-end runs of the offline configs: smoke, resume equivalence, export, bad input."""

import json
import math
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, kill_at_step, load_config, same_secrets, small, train_command

from jaxdp import accounting, builders, checkpoint
from jaxdp import run as run_lib
from jaxdp.config import to_settings
from jaxdp.tracking import read_metrics
from jaxdp.workdir import RunMismatchError


@pytest.mark.parametrize("arg", [None, "nodp"])
def test_offline_config_two_step_smoke_run(tmp_path, arg):
    cfg = small(load_config("tiny_offline", arg))
    cfg.dp.noise_multiplier, cfg.dp.target_epsilon = None, 3.0  # calibrated, as shipped
    summary = run_lib.run(to_settings(cfg), tmp_path)
    for name in ("metrics.jsonl", "privacy.json", "samples.jsonl", "report.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    for name in ("run.json", "metrics.jsonl", "report.png", "README.txt"):
        assert (tmp_path / "private" / name).is_file(), name
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Every key says what it is: public (covered by epsilon) or private (noise-free).
    assert all(k == "step" or k.startswith("public/") for r in raw for k in r)
    records = read_metrics(tmp_path / "metrics.jsonl", "public")
    assert [r["step"] for r in records] == [1, 2]
    assert math.isfinite(records[-1]["eval_loss"]) and records[-1]["eval_ppl"] > 1
    # Noise-free training statistics stay in the private part of the workdir.
    private_raw = [json.loads(s) for s in (tmp_path / "private" / "metrics.jsonl").open()]
    assert all(k == "step" or k.startswith("private/") for r in private_raw for k in r)
    private = read_metrics(tmp_path / "private" / "metrics.jsonl", "private")
    assert [r["step"] for r in private] == [1, 2]
    for key in ("train_loss", "batch_size", "examples_seen", "clip_fraction", "tokens_per_s"):
        assert key in private[-1] and all(key not in r for r in records), key
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy == summary and privacy["steps"] == 2
    if arg == "nodp":
        assert privacy["epsilon"] is None and "non-private" in privacy["guarantee"]
        assert "delta" not in privacy and "covers the trained" not in json.dumps(privacy)
    else:
        assert "train loss" in privacy["not_covered"]  # undisguised training-set statistics
        assert "public" in privacy["public_parameters"]
        # The reported epsilon is dp-accounting's for exactly this Poisson-sampled run.
        import dp_accounting

        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                privacy["sampling_prob"], dp_accounting.GaussianDpEvent(privacy["noise_multiplier"])
            ),
            2,
        )
        # At the grid jaxdp documents for this noise multiplier (accounting.pld_interval).
        interval = accounting.pld_interval(privacy["noise_multiplier"])
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
        acc = acc.compose(event)
        assert privacy["epsilon"] == pytest.approx(acc.get_epsilon(privacy["delta"]), rel=1e-9)
        assert privacy["epsilon"] <= cfg.dp.target_epsilon
        assert privacy["sampling_prob"] == 6 / privacy["num_examples"]
        assert records[-1]["epsilon"] == privacy["epsilon"]


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Default (secret) randomness: the resumed run reads its secrets back from private/."""
    cfg = small(load_config("tiny_offline"), num_steps=3, checkpoint_every=2, eval_every=3)
    cfg.model.dropout = 0.1  # dropout keys must resume too

    # Kill the run as it draws the batch of step 3: after the checkpoint at step 2.
    undo = kill_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(to_settings(cfg), tmp_path / "resumed")
    undo()
    assert checkpoint.manager(tmp_path / "resumed").latest_step() == 2
    resumed = run_lib.run(to_settings(cfg), tmp_path / "resumed")
    # The uninterrupted twin: the same run (same secrets), never killed.
    same_secrets(tmp_path / "resumed", tmp_path / "full")
    full = run_lib.run(to_settings(cfg), tmp_path / "full")

    assert resumed == full
    a, _ = checkpoint.load_model_from_workdir(tmp_path / "full")
    b, _ = checkpoint.load_model_from_workdir(tmp_path / "resumed")
    from flax import nnx

    for x, y in zip(
        nnx.to_flat_state(nnx.state(a, nnx.Param)),
        nnx.to_flat_state(nnx.state(b, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x[1].get_value()), np.asarray(y[1].get_value()))
    for metrics in ("metrics.jsonl", "private/metrics.jsonl"):
        records = {name: read_metrics(tmp_path / name / metrics) for name in ("full", "resumed")}
        assert [r["step"] for r in records["resumed"]] == [1, 2, 3]
        for a, b in zip(records["resumed"], records["full"], strict=True):
            assert {k: v for k, v in a.items() if k != "private/tokens_per_s"} == {
                k: v for k, v in b.items() if k != "private/tokens_per_s"
            }


def test_exported_hf_dir_loads_in_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = small(load_config("tiny_offline"))
    run_lib.run(to_settings(cfg), tmp_path)
    model, _ = checkpoint.load_model_from_workdir(tmp_path)
    pt = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = np.random.default_rng(0).integers(0, 50257, size=(2, 16))
    with torch.no_grad():
        expected = pt(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    # scripts/export_to_pytorch.py --from <workdir> goes through the same checkpoint.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "export_to_pytorch.py"),
            "--from",
            str(tmp_path),
            "--out",
            str(tmp_path / "exported"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pt2 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        np.testing.assert_array_equal(pt2(torch.from_numpy(ids)).logits.numpy(), expected)
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert tok2("Hello world")["input_ids"] == [15496, 995]


def test_mismatched_or_corrupt_checkpoint_is_an_error(tmp_path):
    cfg = small(load_config("tiny_offline"))
    run_lib.run(to_settings(cfg), tmp_path)
    config_json = (tmp_path / "config.json").read_text()
    cfg.dp.l2_clip_norm = 2.0
    with pytest.raises(RunMismatchError, match=r"l2_clip_norm: 1\.0 -> 2\.0"):
        run_lib.run(to_settings(cfg), tmp_path)
    cfg.dp.l2_clip_norm = 1.0
    cfg.model.dropout = 0.1  # dropout changes every gradient: part of the fingerprint
    with pytest.raises(RunMismatchError, match="model.dropout"):
        run_lib.run(to_settings(cfg), tmp_path)
    cfg.model.dropout = 0.0
    assert (tmp_path / "config.json").read_text() == config_json  # the record of the run stays


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_changing_only_the_number_of_steps_says_so_and_the_documented_extension_works(tmp_path):
    cfg = small(load_config("tiny_offline"))
    cfg.dp.noise_multiplier, cfg.dp.target_epsilon = None, 2.0  # sigma calibrated to 2 steps
    first = run_lib.run(to_settings(cfg), tmp_path)
    cfg.train.num_steps = 3
    with pytest.raises(RunMismatchError, match=r"train.num_steps: 2 -> 3.*train a finished run"):
        run_lib.run(to_settings(cfg), tmp_path)
    # As the message says: keep the run's noise multiplier, drop the target, raise the steps.
    cfg.dp.noise_multiplier, cfg.dp.target_epsilon = first["noise_multiplier"], None
    longer = run_lib.run(to_settings(cfg), tmp_path)
    assert longer["steps"] == 3 and longer["noise_multiplier"] == first["noise_multiplier"]
    assert longer["epsilon"] > first["epsilon"]


@pytest.mark.slow
def test_corrupt_checkpoint_is_a_one_line_error_with_a_way_back(tmp_path):
    """A bit flip (or truncation) in a checkpoint is refused before anything is loaded, with
    the step and how to fall back to the previous checkpoint; following that advice works."""
    cfg = small(load_config("tiny_offline"), num_steps=4, checkpoint_every=2, eval_every=4)
    run_lib.run(to_settings(cfg), tmp_path)
    ckpts = tmp_path / "private" / "checkpoints"
    data_file = _largest_file(ckpts / "4" / "state")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 :][:16])
    data_file.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match=r"Checkpoint 4 .*corrupt.*from step 2"):
        run_lib.run(to_settings(cfg), tmp_path)
    # The command line says it in one line, without a traceback.
    proc = subprocess.run(
        train_command(
            tmp_path,
            "--config.train.num_steps=4",
            "--config.train.checkpoint_every=2",
            "--config.train.eval_every=4",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
    # As the message says: move step 4 away and run again; it resumes from step 2.
    shutil.move(ckpts / "4", tmp_path / "4.bad")
    summary = run_lib.run(to_settings(cfg), tmp_path)
    assert summary["steps"] == 4 and checkpoint.manager(tmp_path).latest_step() == 4
    # A truncated file, and a checkpoint whose save never finished (no checksum record).
    data_file = _largest_file(ckpts / "2" / "state")
    data_file.write_bytes(data_file.read_bytes()[:-100])
    shutil.rmtree(ckpts / "4")
    with pytest.raises(checkpoint.CheckpointError, match=r"Checkpoint 2 .*corrupt"):
        run_lib.run(to_settings(cfg), tmp_path)
    (tmp_path / "private" / "checksums" / "2.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no checksum record"):
        run_lib.run(to_settings(cfg), tmp_path)


def test_bad_inputs_give_clear_errors(tmp_path):
    cfg = small(load_config("tiny_offline"))
    cfg.dp.expected_batch_size = 10**6
    with pytest.raises(run_lib.ConfigError, match="exceeds the number of training examples"):
        run_lib.run(to_settings(cfg), tmp_path / "a")
    cfg = small(load_config("tiny_offline"))
    cfg.dp.expected_batch_size = 999  # q ~ 0.06
    cfg.dp.target_epsilon = 0.01
    with pytest.raises(run_lib.ConfigError, match="Even one step"):
        run_lib.run(to_settings(cfg), tmp_path / "b")
    cfg = small(load_config("tiny_offline"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cfg.data.train_files = (str(short),)
    with pytest.raises(run_lib.ConfigError, match="no complete block"):
        run_lib.run(to_settings(cfg), tmp_path / "c")


def test_zero_noise_and_tiny_noise_are_reported_honestly_and_fast():
    cfg = small(load_config("tiny_offline"))
    cfg.dp.noise_multiplier = 0.0
    plan = builders.privacy_plan(to_settings(cfg), 1000)
    assert "no privacy" in plan.describe() and "Poisson" not in plan.describe()
    assert plan.epsilon(2) == math.inf
    # sigma = 0.01 with a budget: PLD accounting at such noise used to run for minutes; now the
    # grid is bounded and the answer (not even one step fits) comes at once, with its cost.
    cfg.dp.noise_multiplier, cfg.dp.target_epsilon = 0.01, 8.0
    with pytest.raises(run_lib.ConfigError, match=r"one step costs epsilon=\d"):
        builders.privacy_plan(to_settings(cfg), 1000)


def test_budget_stops_training_before_target_epsilon_is_exceeded(tmp_path):
    cfg = small(load_config("tiny_offline"), num_steps=50, eval_every=100)
    N = 1000
    q = cfg.dp.expected_batch_size / N
    cfg.dp.target_epsilon = accounting.compute_epsilon(1.0, q, 7, 1 / (10 * N)) * 1.0001
    plan = builders.privacy_plan(to_settings(cfg), N)
    assert plan.num_steps == 7
    assert plan.epsilon(7) <= cfg.dp.target_epsilon < plan.epsilon(8)


def test_typo_in_config_override_is_rejected(tmp_path):
    proc = subprocess.run(
        train_command(tmp_path, "--config.dp.noise_mutliplier=3", small=False),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert 'Did you mean "noise_multiplier"' in proc.stderr
    assert not (tmp_path / "private").exists()


@pytest.mark.slow
def test_optional_fields_can_be_cleared_from_the_command_line(tmp_path):
    """`--config.dp.target_epsilon=None` drops the shipped budget (a float field otherwise)."""
    flags = [  # small() without its target_epsilon=None: the shipped 8.0 stays until cleared
        "--config.data.block_size=16",
        "--config.data.max_eval_examples=8",
        "--config.dp.expected_batch_size=6",
        "--config.dp.microbatch_size=3",
        "--config.train.num_steps=1",
        "--config.train.eval_every=1",
        "--config.train.sample_max_new_tokens=2",
        "--config.train.progress=False",
        "--config.train.export_hf=False",
    ]
    run = lambda *extra: subprocess.run(
        train_command(tmp_path / "w", *flags, *extra, small=False),
        capture_output=True,
        text=True,
        timeout=300,
    )
    bad = run("--config.dp.l2_clip_norm=None")
    assert bad.returncode == 2 and "l2_clip_norm cannot be None" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = run("--config.dp.target_epsilon=None", "--config.dp.noise_multiplier=2.0")
    assert ok.returncode == 0, ok.stderr[-2000:]
    privacy = json.loads((tmp_path / "w" / "privacy.json").read_text())
    assert privacy["target_epsilon"] is None and privacy["noise_multiplier"] == 2.0
    assert "Done: 1 steps, epsilon = " in ok.stdout


def test_every_shipped_config_loads():
    names = sorted(p.stem for p in (REPO / "configs").glob("*.py"))
    assert {"dpsgd_gpt2", "sgd_gpt2", "dplora_gpt2", "tiny_offline"} <= set(names)
    reward_configs = {n for n in names if n.startswith("dp_reward")}
    assert reward_configs == {"dp_reward_gpt2", "dp_reward_tiny_offline"}
    for name in reward_configs:  # `jaxdp train-reward` configs
        cfg = load_config(name)
        assert set(cfg.keys()) == {"model", "data", "dp", "optim", "train"}
    for name in sorted(set(names) - reward_configs):
        cfg = load_config(name)
        assert cfg.data.block_size >= 2 and cfg.train.num_steps >= 1
        assert set(cfg.keys()) == {"model", "data", "dp", "optim", "mesh", "distributed", "train"}


def test_group_clipping_is_accounted_at_sensitivity_2C():
    import dp_accounting

    cfg = small(load_config("tiny_offline"), num_steps=10)
    cfg.dp.expected_batch_size = 50
    cfg.dp.microbatch_size = 4
    cfg.dp.group_size, cfg.dp.num_cells = 2, 500
    cfg.dp.noise_multiplier = 1.6
    plan = builders.privacy_plan(to_settings(cfg), 1000)
    assert plan.accounting_noise_multiplier == 0.8
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(0.8)), 10
    )
    direct = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(plan.target_delta)
    assert plan.epsilon(10) == pytest.approx(direct, rel=1e-9)
    # Calibrated: twice the noise of per-example clipping for the same target.
    cfg.dp.noise_multiplier, cfg.dp.target_epsilon = None, 4.0
    grouped = builders.privacy_plan(to_settings(cfg), 1000)
    cfg.dp.group_size, cfg.dp.num_cells = 1, None
    single = builders.privacy_plan(to_settings(cfg), 1000)
    assert grouped.noise_multiplier == pytest.approx(2 * single.noise_multiplier, rel=1e-12)
    assert grouped.epsilon(10) <= 4.0
    cfg.dp.group_size, cfg.dp.microbatch_size = 5, 4
    with pytest.raises(run_lib.ConfigError, match="at least dp.group_size"):
        to_settings(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"engine": "gohst"}, "Unknown dp.engine 'gohst'"),
        ({"engine": "ghost", "ghost_strategy": "fast"}, "Unknown dp.ghost_strategy 'fast'"),
        ({"engine": "ghost", "group_size": 2, "num_cells": 5}, "per-example clipping only"),
        ({"group_size": 9, "num_cells": 5}, "at least dp.group_size"),
        ({"group_size": 2}, "needs dp.num_cells"),
        ({"target_delta": 1.0}, r"target_delta must be in \(0, 1\)"),
        ({"target_delta": 0.0}, r"target_delta must be in \(0, 1\)"),
    ],
)
def test_engine_settings_are_checked_before_training(overrides, message):
    cfg = load_config("tiny_offline")
    cfg.dp.update(overrides)
    with pytest.raises(run_lib.ConfigError, match=message):
        to_settings(cfg)


def test_group_clipping_run(tmp_path):
    cfg = small(load_config("tiny_offline"))
    cfg.dp.group_size, cfg.dp.num_cells = 3, 7
    summary = run_lib.run(to_settings(cfg), tmp_path)
    assert summary["group_size"] == 3
    assert summary["num_cells"] == 7  # the setting, never a count of the data
    assert "2C" in summary["neighbouring_relation"]
    assert summary["accounting_noise_multiplier"] == pytest.approx(1.0 / 2)


def test_hf_datasets_source_reads_a_local_dataset(tmp_path, tokenizer_dir, shared_data):
    """data.source='hf' through `datasets.load_dataset` on a local directory (no network)."""
    from jaxdp import data

    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    text = (shared_data / "wikitext-2" / "test.txt").read_text()[:20000]
    lines = text.splitlines()
    (ds_dir / "train.txt").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    (ds_dir / "validation.txt").write_text("\n".join(lines[len(lines) // 2 :]) + "\n")
    tok = data.load_tokenizer(tokenizer_dir)
    source = data.TextSource("hf", dataset=str(ds_dir), split="train", text_field="text")
    blocks = data.load_rows(source, tok, 16).tokens
    # The text builder drops line breaks; join_rows restores one row per line.
    expected = data.to_blocks(data.tokenize(tok, (ds_dir / "train.txt").read_text()), 16)
    np.testing.assert_array_equal(blocks, expected)

    cfg = small(load_config("tiny_offline"))
    cfg.data.source = "hf"
    cfg.data.hf_dataset, cfg.data.hf_config = str(ds_dir), None
    summary = run_lib.run(to_settings(cfg), tmp_path / "run")
    assert summary["num_examples"] == len(blocks)


def test_shuffled_batches_label_every_epsilon_approximate(tmp_path):
    cfg = small(load_config("tiny_offline"))
    cfg.dp.sampling = "shuffle"
    summary = run_lib.run(to_settings(cfg), tmp_path)
    assert summary["epsilon_is_approximate"] is True
    assert summary["guarantee"].startswith("APPROXIMATE")
    records = read_metrics(tmp_path / "metrics.jsonl", "public")
    assert all(r["epsilon_is_approximate"] is True for r in records)
    private = read_metrics(tmp_path / "private" / "metrics.jsonl", "private")
    assert all(r["batch_size"] == cfg.dp.expected_batch_size for r in private)


def test_nonfinite_nonprivate_loss_stops_without_checkpointing_the_bad_state(tmp_path):
    import orbax.checkpoint as ocp

    cfg = small(load_config("tiny_offline", "nodp"), num_steps=4, checkpoint_every=1)
    cfg.optim.name, cfg.optim.learning_rate = "sgd", 1e30  # step 1 overflows the weights
    with pytest.raises(FloatingPointError, match="Non-finite training loss"):
        run_lib.run(to_settings(cfg), tmp_path)
    mngr = checkpoint.manager(tmp_path)
    latest = mngr.latest_step()
    assert latest is not None
    state = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    assert int(state["step"]) == latest
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_observers_see_every_step_and_cancellation_stops_with_an_honest_record(tmp_path):
    """Events reach the callbacks; a cancelled run checkpoints, writes privacy.json for the
    steps it ran (and exports nothing), and the same call later finishes it."""
    import dp_accounting

    cfg = small(load_config("tiny_offline"), num_steps=4, eval_every=2, checkpoint_every=4)
    events = []
    broken = lambda event: 1 / 0  # a failing observer must not stop training
    cancel = lambda: sum(e.kind == "step" for e in events) >= 2
    summary = run_lib.run(
        to_settings(cfg), tmp_path, callbacks=[events.append, broken], cancel=cancel
    )
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert [e.step for e in events if e.kind == "step"] == [1, 2]
    assert [e.step for e in events if e.kind == "eval"] == [2]
    step_event = next(e for e in events if e.kind == "step")
    assert "epsilon" in step_event.public and "train_loss" not in step_event.public
    assert "train_loss" in step_event.private
    assert summary["cancelled"] and summary["steps"] == 2 and summary["planned_steps"] == 4
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    assert privacy == summary
    event = dp_accounting.PoissonSampledDpEvent(
        privacy["sampling_prob"], dp_accounting.GaussianDpEvent(privacy["noise_multiplier"])
    )
    direct = dp_accounting.pld.PLDAccountant().compose(event, 2).get_epsilon(privacy["delta"])
    assert privacy["epsilon"] == pytest.approx(direct, rel=1e-6)  # the steps it ran, no more
    assert checkpoint.manager(tmp_path).latest_step() == 2
    assert not (tmp_path / "hf").exists()
    finished = run_lib.run(to_settings(cfg), tmp_path)
    assert finished["steps"] == 4 and "cancelled" not in finished
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_resumed_run_logs_the_same_steps_as_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = small(load_config("tiny_offline"), num_steps=5, checkpoint_every=2, eval_every=5)
    cfg.train.log_every = 2
    undo = kill_at_step(monkeypatch, 3)  # the last checkpoint is step 2
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(to_settings(cfg), tmp_path / "resumed")
    undo()
    run_lib.run(to_settings(cfg), tmp_path / "resumed")
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 4, 5]  # no extra row for the first step after the resume


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("dp.l2_clip_norm", -1.0, "dp.l2_clip_norm must be a positive number"),
        ("data.block_size", 1, "data.block_size must be an integer >= 2"),
        ("data.block_size", 200, "exceeds the model's n_positions=128"),
        ("optim.name", "sgdd", "Unknown optim.name 'sgdd'; use one of sgd, adam, adamw"),
        ("model.name_or_path", "gpt3", "needs a preset name"),
        ("dp.microbatch_size", 0, "dp.microbatch_size must be an integer >= 1"),
    ],
)
def test_bad_settings_fail_before_any_slow_work(tmp_path, monkeypatch, setting, value, message):
    from jaxdp import data

    monkeypatch.setattr(data, "load_rows", lambda *a, **k: pytest.fail("data was loaded"))
    cfg = small(load_config("tiny_offline"))
    section, field = setting.split(".")
    cfg[section][field] = value
    with pytest.raises(run_lib.ConfigError, match=message):
        run_lib.run(to_settings(cfg), tmp_path)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


def test_wrong_dataset_column_names_the_columns(tmp_path, shared_data):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    (ds_dir / "train.txt").write_text((shared_data / "wikitext-2" / "test.txt").read_text()[:5000])
    cfg = small(load_config("tiny_offline"))
    cfg.data.source, cfg.data.hf_dataset, cfg.data.hf_config = "hf", str(ds_dir), None
    cfg.data.hf_eval_split, cfg.data.text_field = "", "content"
    with pytest.raises(run_lib.ConfigError, match=r"no column 'content'.*\['text'\]"):
        run_lib.run(to_settings(cfg), tmp_path / "w")


def test_unreachable_hub_is_one_error_naming_every_setting_that_needs_it(tmp_path, monkeypatch):
    from jaxdp.hf import HubUnavailableError

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = small(load_config("tiny_offline"))
    cfg.model.init, cfg.model.name_or_path = "pretrained", "gpt2"
    cfg.data.source, cfg.data.hf_dataset = "hf", "wikitext"
    with pytest.raises(
        HubUnavailableError, match="model='gpt2', dataset='wikitext'.*HF_HUB_OFFLINE"
    ):
        run_lib.run(to_settings(cfg), tmp_path)


def test_hopeless_noise_and_lora_on_random_weights_are_warned_about(caplog):
    cfg = small(load_config("tiny_offline"))
    cfg.dp.noise_multiplier = 97.0  # what target_epsilon=0.001 calibrated to in an early user run
    cfg.model.lora_rank = 4
    plan = builders.privacy_plan(to_settings(cfg), 1000)
    with caplog.at_level("WARNING", logger="jaxdp"):
        builders.warn_about_hopeless_settings(plan, to_settings(cfg).model)
    text = caplog.text
    assert "barely move the loss" in text and "LoRA adapters on a randomly initialised" in text
    caplog.clear()
    cfg.dp.noise_multiplier, cfg.model.lora_rank = 1.0, 0
    with caplog.at_level("WARNING", logger="jaxdp"):
        builders.warn_about_hopeless_settings(
            builders.privacy_plan(to_settings(cfg), 1000), to_settings(cfg).model
        )
    assert caplog.text == ""


def _tensorboard_tags(directory) -> set[str]:
    """The scalar tags in tensorboardX event files (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for path in directory.glob("events.out.tfevents.*"):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            pos += 12 + length + 4
    return tags


def test_tensorboard_logs_keep_public_and_private_apart(tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = small(load_config("tiny_offline"))
    run_lib.run(to_settings(cfg), tmp_path)
    public = _tensorboard_tags(tmp_path / "tensorboard")
    private = _tensorboard_tags(tmp_path / "private" / "tensorboard")
    assert "public/epsilon" in public and "public/eval_loss" in public
    assert "private/train_loss" in private
    assert all(t.startswith("public/") for t in public)
    assert all(t.startswith("private/") for t in private)


def test_exported_files_are_readable_like_the_rest(tmp_path):
    import os
    import stat

    cfg = small(load_config("tiny_offline"))
    run_lib.run(to_settings(cfg), tmp_path)
    modes = {
        p.name: stat.S_IMODE(os.stat(p).st_mode)
        for p in (tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json")
    }
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_bf16_run_with_the_clipping_plan(tmp_path):
    """train.dtype="bfloat16": the ghost engine with the per-layer plan trains (finite losses,
    float32 parameters in the checkpoint's export); Gram norms in bf16 are refused up front."""
    cfg = small(load_config("tiny_offline"))
    cfg.train.dtype = "bfloat16"
    cfg.dp.engine, cfg.dp.ghost_strategy = "ghost", "auto"
    with pytest.raises(run_lib.ConfigError, match="needs dp.ghost_strategy 'plan'"):
        to_settings(cfg)
    cfg.dp.ghost_strategy = "plan"
    summary = run_lib.run(to_settings(cfg), tmp_path)
    assert summary["steps"] == 2
    records = read_metrics(tmp_path / "metrics.jsonl", "public")
    assert math.isfinite(records[-1]["eval_loss"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "compute_dtype" not in config  # a compute setting, not part of the exported model
    cfg.train.dtype = "float16"
    with pytest.raises(run_lib.ConfigError, match="Unknown train.dtype"):
        to_settings(cfg)


@pytest.mark.slow
def test_out_of_device_memory_is_one_error_that_loses_nothing(tmp_path, monkeypatch):
    """A step that does not fit in device memory stops the run with one error naming what to
    lower; rerun with it, the run continues from its last checkpoint. Other runtime errors
    are not relabelled."""
    import dataclasses

    from jaxdp import steps as steps_lib

    cfg = small(load_config("tiny_offline"), num_steps=4, checkpoint_every=2)
    failure = {}  # the error the update step raises when it computes step 3
    real = steps_lib.shard_and_jit

    def shard_and_jit(*args, **kwargs):
        state, compiled = real(*args, **kwargs)

        def update_step(state, acc):
            if int(state.step) == 2 and "error" in failure:
                raise failure["error"]
            return compiled.update_step(state, acc)

        return state, dataclasses.replace(compiled, update_step=update_step)

    monkeypatch.setattr(steps_lib, "shard_and_jit", shard_and_jit)
    failure["error"] = jax.errors.JaxRuntimeError("INTERNAL: a driver bug")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL") as raised:
        run_lib.run(to_settings(cfg), tmp_path)
    assert not isinstance(raised.value, run_lib.DeviceMemoryError)
    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.50GiB.\nmore detail"
    failure["error"] = jax.errors.JaxRuntimeError(oom)
    expected = (
        r"^Step 3 ran out of device memory \(RESOURCE_EXHAUSTED: Out of memory while trying to "
        r"allocate 9.50GiB.\)\. Lower what a step holds: --config.dp.microbatch_size=1 \(now 3\) "
        r"or --config.dp.engine=ghost --config.dp.ghost_strategy=plan or dp.physical_batch_size; "
        r".* continues from its last checkpoint \(step 2\): nothing is lost\.$"
    )
    with pytest.raises(run_lib.DeviceMemoryError, match=expected):
        run_lib.run(to_settings(cfg), tmp_path)
    assert checkpoint.manager(tmp_path).latest_step() == 2
    del failure["error"]
    cfg.dp.microbatch_size = 1  # as the error says: a setting that may change on resume
    summary = run_lib.run(to_settings(cfg), tmp_path)
    assert summary["steps"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
