"""`jaxdp benchmark`: speed and memory of the DP-SGD engines. See jaxdp/commands/benchmark.py.

python scripts/benchmark.py --model gpt2 --batch 32 --seq 256 --modes nonprivate,vmap,ghost
"""

import sys

from jaxdp.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
