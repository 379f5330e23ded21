"""Train a GPT-2 with DP-SGD (or without DP) from a config file.

    jaxdp train --config configs/dpsgd_gpt2.py --workdir runs/dpsgd_gpt2
    jaxdp train --config configs/tiny_offline.py --workdir runs/tiny \
        --config.train.num_steps=50 --config.dp.target_epsilon=3

(`python scripts/train.py ...` is the same command.) Any field of the config can be overridden
with --config.a.b=value, and an optional one cleared with --config.a.b=None; unknown fields are
errors. Running the same command again on the same --workdir resumes from its last checkpoint.
Ctrl-C or SIGTERM (SLURM preemption) finishes the current step, saves a checkpoint and exits;
a second Ctrl-C stops at once.
"""

from __future__ import annotations

import ast
import logging
import shlex
import signal
import sys
import threading

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxdp import config as config_lib
from jaxdp import run as run_lib
from jaxdp.checkpoint import CheckpointError
from jaxdp.hf import HubUnavailableError
from jaxdp.workdir import RunMismatchError

FLAGS = flags.FlagValues()  # the command's own flags (absl's global ones are left alone)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py).", lock_config=True, flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory holding everything of this run.", flag_values=FLAGS
)
USAGE = (
    "Usage: jaxdp train --config configs/NAME.py --workdir DIR [--config.a.b=value ...] "
    "(--config.a.b=None clears an optional field)"
)
USER_ERRORS = (
    run_lib.ConfigError,
    run_lib.DeviceMemoryError,
    FloatingPointError,  # a non-private run's loss diverged (the message says what to lower)
    HubUnavailableError,
    CheckpointError,
    RunMismatchError,
    FileNotFoundError,
    NotADirectoryError,
)


def _message(e: BaseException) -> str:
    """The text of an exception, unquoted (KeyError wraps its message in repr quotes)."""
    message = str(e)
    for _ in range(3):
        try:
            unquoted = ast.literal_eval(message)
        except (ValueError, SyntaxError):
            break
        if not isinstance(unquoted, str):
            break
        message = unquoted
    return message.replace("\n", " ")


def _fail(message: str, usage: bool = False) -> None:
    print(f"error: {message}", file=sys.stderr)
    if usage:
        print(USAGE, file=sys.stderr)
    sys.exit(2)


def _setup_logging() -> None:
    # jaxdp's own progress at INFO; libraries (orbax, absl) only at WARNING and above.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    jaxdp_log = logging.getLogger("jaxdp")
    if not jaxdp_log.handlers:
        jaxdp_log.addHandler(handler)
    jaxdp_log.setLevel(logging.INFO)
    jaxdp_log.propagate = False


class _StopOnSignal:
    """SIGINT/SIGTERM ask the run to stop after the current step (with a checkpoint); a
    second one stops at once."""

    def __init__(self):
        self.event, self.signum = threading.Event(), None

    def __enter__(self):
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def _handle(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.event.set()
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step (send it again to "
            f"stop at once).",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    """`jaxdp train` with `argv` (without the program name; default: the command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not flags.FLAGS.is_parsed():  # absl's global flags: none of ours, parsed to keep quiet
        flags.FLAGS.mark_as_parsed()
    args, none_overrides = config_lib.split_none_overrides(argv)
    try:
        rest = config_lib.parse_flags(FLAGS, "jaxdp train", args)
    except Exception as e:  # unknown field, bad value type, missing config file, ...
        _fail(_message(e), usage=True)
    if len(rest) > 1:
        _fail(f"unexpected arguments: {rest[1:]}", usage=True)
    if _WORKDIR.value is None or FLAGS["config"].value is None:
        _fail("--config and --workdir are required.", usage=True)
    _setup_logging()
    try:
        config = _CONFIG.value
        config.keys()  # the file is loaded lazily: fail here, not mid-run
        for path in none_overrides:
            config_lib.set_none(config, path)
        settings = config_lib.to_settings(config)  # checks every field, before any slow work
    except run_lib.ConfigError as e:
        _fail(_message(e))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        _fail(_message(e), usage=True)
    try:
        with _StopOnSignal() as stop:
            summary = run_lib.run(settings, _WORKDIR.value, cancel=stop.event)
    except USER_ERRORS as e:
        _fail(_message(e))
    except KeyboardInterrupt:
        print(
            "Stopped at once: training resumes from the last checkpoint when you run the same "
            "command again.",
            file=sys.stderr,
        )
        return 130
    command = " ".join(shlex.quote(a) for a in ["jaxdp", "train", *argv])
    if summary.get("cancelled"):
        print(
            f"Stopped after step {summary['steps']} of {summary['planned_steps']} "
            f"({run_lib.describe_result(summary)}); checkpoint saved. Resume with: {command}",
            file=sys.stderr,
        )
        return 128 + (stop.signum or signal.SIGINT)
    print(f"Done: {run_lib.describe_result(summary)}. Outputs in {_WORKDIR.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
