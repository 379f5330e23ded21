"""The `jaxdp` command: subcommands, one-line errors, stopping on a signal with a checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import train_command

from jaxdp import cli
from jaxdp.commands import train as train_module
from jaxdp.plan import PrivacyPlan


def test_the_console_script_is_installed_and_lists_its_commands(capsys):
    assert shutil.which("jaxdp") is not None  # [project.scripts]
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "epsilon", "export", "audit", "serve"):
        assert f"  {name} " in out
    assert cli.main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_epsilon_command_prints_the_plans_numbers(capsys):
    args = "--num-examples 10000 --expected-batch-size 100 --steps 300 --noise-multiplier 1.1"
    assert cli.main(["epsilon", *args.split(), "--delta", "1e-6"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = PrivacyPlan.create(
        num_examples=10000, expected_batch_size=100, steps=300, noise_multiplier=1.1,
        target_delta=1e-6,
    )  # fmt: skip
    assert out["epsilon"] == plan.epsilon() and out["sampling_prob"] == 0.01


def test_export_of_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", "--from", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a jaxdp run directory" in err[0]


@pytest.mark.parametrize(
    "error",
    [
        train_module.run_lib.DeviceMemoryError("Step 3 ran out of device memory (...). Lower..."),
        FloatingPointError("Non-finite training loss at step 2; lower the learning rate."),
    ],
)
def test_run_errors_a_user_can_act_on_are_one_line(tmp_path, capsys, monkeypatch, error):
    def failing_run(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_module.run_lib, "run", failing_run)
    argv = ["--config", "configs/tiny_offline.py", "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exited:
        train_module.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_first_signal_asks_to_stop_and_the_second_stops_at_once():
    with train_module._StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.event.is_set() and stop.signum == signal.SIGINT  # no KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """What SLURM preemption does: the run stops after its current step with a checkpoint and a
    privacy.json for the steps it ran, prints one line, and the same command resumes it."""
    workdir = tmp_path / "w"
    command = train_command(
        workdir,
        "--config.train.num_steps=400",
        "--config.train.eval_every=400",
        "--config.train.checkpoint_every=400",
    )
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "private" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("Stopped after step")]
    assert len(stopped) == 1 and "Resume with: jaxdp train" in stopped[0]
    privacy = json.loads((workdir / "privacy.json").read_text())
    assert privacy["cancelled"] and 1 <= privacy["steps"] < 400
    from jaxdp import checkpoint

    assert checkpoint.manager(workdir).latest_step() == privacy["steps"]
