"""ami/smoke.sh's arguments: refused before it asks for root or touches anything.
(The smoke test itself runs for minutes, as root: `make ami-smoke`, never here.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "ami" / "smoke.sh"


def smoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SMOKE), *args], capture_output=True, text=True, timeout=30)


def test_help_lists_every_option_the_script_takes():
    result = smoke("--help")
    assert result.returncode == 0, result.stderr
    taken = set(re.findall(r"^\s+(--[a-z-]+)\)", SMOKE.read_text(), re.M))
    assert taken == {"--clean", "--reuse-image", "--deadline"}
    for option in taken:
        assert option in result.stdout


@pytest.mark.parametrize(("args", "says"), [
    (["--bogus"], "unknown option: --bogus"),
    (["--deadline", "soon"], "--deadline takes whole seconds"),
    (["--deadline", "0"], "--deadline takes whole seconds"),
])
def test_a_wrong_argument_is_refused_at_once(args, says):
    result = smoke(*args)
    assert result.returncode == 2 and says in result.stderr, result.stderr
