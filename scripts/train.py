"""Train a GPT-2 with DP-SGD (or without DP) from a config file.

    python scripts/train.py --config configs/dpsgd_gpt2.py --workdir runs/dpsgd_gpt2
    python scripts/train.py --config configs/tiny_offline.py --workdir runs/tiny \
        --config.train.num_steps=50 --config.dp.target_epsilon=3

Any field of the config can be overridden with --config.a.b=value; unknown fields are errors.
Running the same command again on the same --workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import ast
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxdp import config as config_lib
from jaxdp import trainer
from jaxdp.checkpoint import CheckpointError
from jaxdp.hf import HubUnavailableError
from jaxdp.workdir import RunMismatchError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding everything of this run.")
flags.mark_flags_as_required(["config", "workdir"])


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


_NONE_OVERRIDES: list[str] = []  # --config.a.b=None: set after the config is loaded


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print(
        "Usage: python scripts/train.py --config configs/NAME.py --workdir DIR "
        "[--config.a.b=value ...]  (--config.a.b=None clears an optional field)",
        file=sys.stderr,
    )
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config typos reported in one line instead of a traceback."""
    argv, _NONE_OVERRIDES[:] = config_lib.split_none_overrides(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # unknown field, bad value type, missing config file, ...
        _usage_error(_message(e))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # jaxdp's own progress at INFO; libraries (orbax, absl) only at WARNING and above.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    jaxdp_log = logging.getLogger("jaxdp")
    jaxdp_log.addHandler(handler)
    jaxdp_log.setLevel(logging.INFO)
    jaxdp_log.propagate = False
    try:
        config = _CONFIG.value
        config.keys()  # the file is loaded lazily: fail here, not mid-run
        for path in _NONE_OVERRIDES:
            config_lib.set_none(config, path)
    except (OSError, ValueError, KeyError) as e:  # unloadable file, a field that needs a value
        _usage_error(_message(e))
    try:
        summary = trainer.run(config, _WORKDIR.value)
    except (
        trainer.ConfigError,
        HubUnavailableError,
        CheckpointError,
        RunMismatchError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Done: {trainer.describe_result(summary)}. Outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
