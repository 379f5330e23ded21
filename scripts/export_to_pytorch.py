"""`jaxdp export`: a run or HF model to a PyTorch directory. See jaxdp/commands/export.py.

python scripts/export_to_pytorch.py --from runs/tiny --out exported/
"""

import sys

from jaxdp.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
