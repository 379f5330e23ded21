"""Train a differentially private reward model from a config file (see jaxdp/reward.py).

    jaxdp train-reward --config configs/dp_reward_gpt2.py --workdir runs/reward
    jaxdp train-reward --config configs/dp_reward_tiny_offline.py --workdir runs/reward_tiny

(`python scripts/train_reward.py ...` is the same command.) Override any field with
--config.a.b=value (--config.a.b=None clears an optional one). Prints the held-out preference
accuracy and epsilon; the reward model, privacy.json and the report are in the workdir.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from jaxdp import config as config_lib
from jaxdp import reward_run
from jaxdp.hf import HubUnavailableError

USAGE = "Usage: jaxdp train-reward --config configs/NAME.py --workdir DIR [--config.a.b=value]"


def _fail(message: str) -> int:
    print(f"error: {message}\n{USAGE}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    args, none_paths = config_lib.split_none_overrides(argv)
    # Fresh flags per call: the --config.a.b overrides are defined as they are parsed.
    FLAGS = flags.FlagValues()
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/dp_reward_*.py).", lock_config=True, flag_values=FLAGS
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (new).", flag_values=FLAGS)
    try:
        rest = config_lib.parse_flags(FLAGS, "jaxdp train-reward", args)
        if len(rest) > 1:
            return _fail(f"unexpected arguments: {rest[1:]}")
        if _WORKDIR.value is None or FLAGS["config"].value is None:
            return _fail("--config and --workdir are required.")
        config = _CONFIG.value
        config.keys()
        optional = config_lib.optional_fields(reward_run.default_config())
        for path in none_paths:
            config_lib.set_none(config, path, optional)
    except Exception as e:  # unknown field, bad value, missing file
        return _fail(str(e).replace("\n", " "))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = reward_run.run(config, _WORKDIR.value)
    except (reward_run.ConfigError, HubUnavailableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = report["heldout_accuracy"]
    print(
        f"Done: held-out preference accuracy {'n/a' if acc is None else f'{acc:.3f}'} "
        f"({report['num_heldout']} pairs), epsilon = {report['epsilon']:.3f} at delta = "
        f"{report['delta']:.3g} per preference tuple. Outputs in {_WORKDIR.value}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
