"""`jaxdp epsilon`: a run's epsilon, or the noise for a target. See jaxdp/commands/epsilon.py.

    python scripts/compute_epsilon.py --num-examples 60000 --expected-batch-size 256 \
        --steps 1000 --noise-multiplier 1.1
"""

import sys

from jaxdp.commands.epsilon import main

if __name__ == "__main__":
    sys.exit(main())
