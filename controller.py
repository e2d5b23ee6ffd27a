"""Run the controller: `python controller.py --help` (from the repository root)."""

import sys

from controller.main import main

if __name__ == "__main__":
    sys.exit(main())
