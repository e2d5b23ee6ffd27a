"""Run the controller: `python controller.py --help` (from the repository root)."""

import sys

from common import systemd
from controller.main import main

if __name__ == "__main__":
    # Here, not in main(), which tests call with a captured stderr.
    systemd.report_stacks_on_abort()
    sys.exit(main())
