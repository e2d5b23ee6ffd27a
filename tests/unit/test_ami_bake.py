"""What bake.sh leaves out of the image: local state, caches and tests, in a checkout
that has all of them (bake.sh packs the folder above its own)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

AMI = Path(__file__).resolve().parents[2] / "ami"

LOCAL_ONLY = [
    ".run/logs/web.log", ".run/state.json",  # make run
    ".bench/latest.json",  # make bench
    ".venv/bin/python", ".git/HEAD", "tests/test_x.py",
    ".pytest_cache/README.md", ".ruff_cache/x", ".mypy_cache/x", "imgclass.egg-info/PKG-INFO",
    "app_tier/__pycache__/worker.cpython-311.pyc", "stray.pyc", "packer-manifest.json",
]
KEPT = ["app_tier/worker.py", "requirements.txt", "web_tier/static/app.js"]


def test_bake_leaves_local_state_caches_and_tests_out_of_the_image(tmp_path):
    repo, bin_dir, kept = tmp_path / "repo", tmp_path / "bin", tmp_path / "src.tar.gz"
    shutil.copytree(AMI, repo / "ami")
    for name in LOCAL_ONLY + KEPT:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    bin_dir.mkdir()
    packer = bin_dir / "packer"
    packer.write_text(f"""#!/bin/bash
for arg in "$@"; do
  case "$arg" in
    source_tarball=*) cp "${{arg#source_tarball=}}" "{kept}" ;;
  esac
done
""")
    packer.chmod(packer.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(repo / "ami" / "bake.sh"), "--validate-only"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    with tarfile.open(kept) as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {*KEPT, "ami/bake.sh"} <= names
    local_dirs = {name.split("/")[0] for name in LOCAL_ONLY if "/" in name} - {"app_tier"}
    leaked = {n for n in names if n.split("/")[0] in local_dirs or n in LOCAL_ONLY
              or "__pycache__" in n or n.endswith(".pyc")}
    assert not leaked, sorted(leaked)
