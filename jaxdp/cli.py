"""The `jaxdp` command: `jaxdp train | epsilon | export | audit | serve |
train-reward | best-of-n [ARGS]`.

Each subcommand is a module of `jaxdp.commands` with `main(argv) -> exit status`; `jaxdp
COMMAND --help` describes its arguments. `scripts/*.py` run the same functions.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("jaxdp.commands.train", "train or resume a run from a config file"),
    "epsilon": ("jaxdp.commands.epsilon", "epsilon of a DP-SGD run, or the noise for a target"),
    "export": ("jaxdp.commands.export", "export a run or HF model to a PyTorch directory"),
    "audit": ("jaxdp.commands.audit", "audit a config with canaries (exposure, epsilon bound)"),
    "serve": ("jaxdp.commands.serve", "the private fine-tuning service (web page, API, workers)"),
    "train-reward": ("jaxdp.commands.train_reward", "train a DP reward model (preference pairs)"),
    "best-of-n": ("jaxdp.commands.best_of_n", "best-of-N responses scored by a DP reward model"),
}


def usage() -> str:
    lines = ["usage: jaxdp COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "jaxdp COMMAND --help shows a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"jaxdp: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # Imported on demand: each command loads JAX and its own dependencies only when it runs.
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
