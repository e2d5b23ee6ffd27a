"""ami/smoke.sh's arguments and its cache: refused before it asks for root or touches anything.
(The smoke test itself runs for minutes, as root: `make ami-smoke`, never here.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


def smoke_on(cache: Path, *args: str) -> subprocess.CompletedProcess:
    # No Python for it: should the cache be taken, the script stops at once all the same
    # (as root it would go on to debootstrap), and says so instead of refusing the cache.
    env = {**os.environ, "IMGCLASS_SMOKE_CACHE": str(cache), "SMOKE_PYTHON": "/nonexistent/python"}
    return subprocess.run(["bash", str(SMOKE), *args], capture_output=True, text=True, timeout=30, env=env)


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the script runs on Linux only")


@linux_only
def test_a_cache_others_may_write_is_refused_before_anything(tmp_path):
    """Root writes the lock and the logs there and boots the roots it holds."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    result = smoke_on(cache)
    assert result.returncode == 2, result.stderr
    assert f"the cache {cache} is writable by group or others (mode 777): refusing it" in result.stderr
    assert sorted(p.name for p in cache.iterdir()) == []  # not even the lock


@linux_only
def test_a_cache_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(tmp_path / "elsewhere")
    result = smoke_on(tmp_path / "cache")
    assert result.returncode == 2 and "is a symlink: refusing it" in result.stderr, result.stderr


@linux_only
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_a_cache_owned_by_another_user_is_refused(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)
    result = smoke_on(cache)
    assert result.returncode == 2 and "not root: refusing it" in result.stderr, result.stderr


@linux_only
def test_a_cache_whose_path_has_a_space_is_refused(tmp_path):
    """findmnt writes a space as \\x20: the check that nothing is mounted there could not see it."""
    cache = tmp_path / "a cache"
    result = smoke_on(cache)
    assert result.returncode == 2 and "has a space or a backslash in it" in result.stderr, result.stderr
    assert not cache.exists()
