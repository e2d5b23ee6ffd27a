"""Run the controller from this folder: `python controller.py --help`, as from the
repository's root. The contract names `python controller.py`, and does not say from
which folder: both work."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    # Run from here, this folder comes first on the path, where `controller` would be
    # this file rather than the package.
    sys.path[0] = str(ROOT)
    runpy.run_path(str(ROOT / "controller.py"), run_name="__main__")
