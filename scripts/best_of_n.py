"""`jaxdp best-of-n`: responses chosen by a DP reward model. See jaxdp/commands/best_of_n.py.

python scripts/best_of_n.py --reward runs/reward/reward_model --synthetic 16 --n 8
"""

import sys

from jaxdp.commands.best_of_n import main

if __name__ == "__main__":
    sys.exit(main())
