"""`jaxdp audit`: canaries, exposure and a one-run epsilon bound. See jaxdp/commands/audit.py.

python scripts/audit.py --config configs/tiny_offline.py --workdir runs/audit
"""

import sys

from jaxdp.commands.audit import main

if __name__ == "__main__":
    sys.exit(main())
