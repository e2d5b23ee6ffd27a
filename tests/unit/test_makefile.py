"""The Makefile's set-up, where it can be checked without installing everything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# make runs python -m venv and pip, given 300 s each (subprocess.run; 15 s here with no
# index): more than pyproject's 120 s.
pytestmark = pytest.mark.timeout(900)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_venv_left_half_made_is_made_again(tmp_path):
    """`python -m venv` makes bin/python before pip, and leaves both behind when pip's
    install fails (Debian without python3-venv, a Ctrl-C): every make after it would
    fail with "No module named pip" until `make clean`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # No index, and none of this machine's pip configuration: the requirements cannot
    # be installed, which ends make, but only after the venv step this test is about.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run(["make", "-s", "venv", f"VENV={venv}", f"PYTHON={sys.executable}"], cwd=ROOT, env=env,
                   capture_output=True, timeout=300)
    assert subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_requirements_touched_but_unchanged_install_nothing(tmp_path):
    """The stamp is named after the requirements' checksum: a checkout that only gave
    them newer times (git stash, a branch switch) must not call pip, which needs PyPI."""
    for name in ("Makefile", "requirements.txt", "requirements-runtime.txt", "requirements-web.txt",
                 "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / "venv"
    checksum = subprocess.run("cat requirements.txt requirements-runtime.txt requirements-web.txt "
                              "constraints.txt | cksum",
                              shell=True, cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.split()[0]
    (venv / "bin").mkdir(parents=True)
    stamp = venv / f".installed-{checksum}"
    stamp.touch()
    os.utime(stamp, (1_000_000, 1_000_000))  # older than the requirements' copies
    dry = subprocess.run(["make", "-n", "venv", f"VENV={venv}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert "pip install" not in dry.stdout, dry.stdout
    (tmp_path / "constraints.txt").write_text((ROOT / "constraints.txt").read_text() + "\n# changed\n")
    dry = subprocess.run(["make", "-n", "venv", f"VENV={venv}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert "pip install" in dry.stdout, dry.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_runtime_venv_replaces_the_one_in_use_only_once_installed(tmp_path):
    """Removing .venv first would stop the services for pip's minutes, and a failed
    install leave neither tier able to start."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "constraints.txt").write_text("")
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "in-use").touch()
    (tmp_path / ".venv.old").mkdir()  # the update before's
    # No index: a requirement fails to install, as PyPI out of reach would.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    make = ["make", "-s", "runtime-venv", f"PYTHON={sys.executable}"]
    (tmp_path / "requirements-runtime.txt").write_text("surely-not-a-package-imgclass==1.0\n")
    failed = subprocess.run(make, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and (venv / "in-use").exists()
    # Gone before the new one is built: three venvs of ~1.75 GB fill an 8 GiB disk.
    assert not (tmp_path / ".venv.old").exists()
    (tmp_path / "requirements-runtime.txt").write_text("")
    made = subprocess.run(make, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    # The one in use kept until the next time: the services run from it until restarted.
    assert not (venv / "in-use").exists() and (tmp_path / ".venv.old" / "in-use").exists()
    assert not (tmp_path / ".venv.new").exists()
    # Its scripts name .venv, not the folder it was made in: else `. .venv/bin/activate`
    # runs the system's Python, and .venv/bin/pip nothing.
    assert subprocess.run([str(venv / "bin" / "pip"), "--version"], capture_output=True).returncode == 0
    assert f'VIRTUAL_ENV="{venv}"' in (venv / "bin" / "activate").read_text() or \
        f"VIRTUAL_ENV='{venv}'" in (venv / "bin" / "activate").read_text()
    assert ".venv.new" not in "".join(p.read_text(errors="replace") for p in (venv / "bin").iterdir()
                                      if not p.is_symlink())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("runtime", "installed"), [(None, "requirements-runtime.txt"),
                                                     ("web", "requirements-web.txt")])
def test_runtime_venv_installs_the_model_only_where_asked(runtime, installed):
    """The web and controller host installed TensorFlow and OpenVINO for nothing: README's
    steps 5 and 6 ask for RUNTIME=web; the AMI (provision.sh) installs the whole runtime."""
    make = ["make", "-n", "runtime-venv", "PYTHON=python3", *([f"RUNTIME={runtime}"] if runtime else [])]
    dry = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"-r {installed} -c constraints.txt" in dry.stdout, dry.stdout
    readme = (ROOT / "README.md").read_text()
    assert readme.count("make runtime-venv RUNTIME=web") >= 3  # made, made again on update, the controller's
