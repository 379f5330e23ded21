"""`jaxdp train`: train (or resume) a run from a config file. See jaxdp/commands/train.py.

python scripts/train.py --config configs/dpsgd_gpt2.py --workdir runs/dpsgd_gpt2
"""

import sys

from jaxdp.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
