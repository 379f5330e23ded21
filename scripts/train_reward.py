"""`jaxdp train-reward`: a DP reward model from a config file. See jaxdp/commands/train_reward.py.

python scripts/train_reward.py --config configs/dp_reward_gpt2.py --workdir runs/reward
"""

import sys

from jaxdp.commands.train_reward import main

if __name__ == "__main__":
    sys.exit(main())
