"""Run the controller: `python controller.py --help` (from the repository root)."""

import faulthandler
import resource
import sys

from controller.main import main

if __name__ == "__main__":
    # Every thread's stack on stderr if a watchdog aborts a hung controller (SIGABRT),
    # and no core file (LimitCORE=0 in its unit says the same).
    faulthandler.enable()
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    sys.exit(main())
