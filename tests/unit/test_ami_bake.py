"""What bake.sh packs into the image (the files git tracks but the tests, never what
else lies in the checkout: bake.sh packs the folder above its own), and what it refuses at start."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

AMI = Path(__file__).resolve().parents[2] / "ami"
# Its scripts are given 120 s each (subprocess.run): the test, more (pyproject's 120 s).
pytestmark = pytest.mark.timeout(300)

UNTRACKED = [
    ".run/logs/web.log", ".run/state.json",  # make run
    ".bench/latest.json",  # make bench
    ".venv/bin/python", ".pytest_cache/README.md", ".ruff_cache/x", "imgclass.egg-info/PKG-INFO",
    "app_tier/__pycache__/worker.cpython-311.pyc", "stray.pyc", "packer-manifest.json",
    ".env", ".aws/credentials", "notes/keys.txt",  # secrets must never be packed
]
TRACKED = ["app_tier/worker.py", "requirements.txt", "web_tier/static/js/main.js"]
TRACKED_LEFT_OUT = ["tests/test_x.py"]


def bake(repo: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """bake.sh --validate-only under a stub packer that keeps the tarball it is given."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "src.tar.gz"
    bin_dir.mkdir(exist_ok=True)
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
    return subprocess.run(["bash", str(repo / "ami" / "bake.sh"), "--validate-only", *args],
                          env=env, capture_output=True, text=True, timeout=120)


def test_bake_packs_the_files_git_tracks_and_nothing_else(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(AMI, repo / "ami")
    for name in UNTRACKED + TRACKED + TRACKED_LEFT_OUT:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "gone.py").write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", "ami", "gone.py", *TRACKED, *TRACKED_LEFT_OUT],
                   check=True)
    (repo / TRACKED[0]).write_text("edited, not committed")
    (repo / "gone.py").unlink()  # deleted, not `git rm`ed: tar must not stop at it
    result = bake(repo, tmp_path)
    assert result.returncode == 0, result.stderr

    with tarfile.open(tmp_path / "src.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames() if tar.getmember(n).isfile()}
        edited = tar.extractfile(next(n for n in tar.getnames() if n.endswith(TRACKED[0]))).read()
    assert names == {*TRACKED, *(f"ami/{p.name}" for p in AMI.iterdir() if p.is_file())}
    assert edited == b"edited, not committed"


def test_bake_tells_macos_tar_to_pack_no_extended_attributes(tmp_path):
    """macOS's tar adds a "._name" file beside each file with extended attributes (on
    macOS 13 and later, often every file): compileall fails on them minutes into the
    bake. Each tar bake.sh runs must see COPYFILE_DISABLE=1."""
    repo = tmp_path / "repo"
    shutil.copytree(AMI, repo / "ami")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "ami"], check=True)
    bin_dir, seen = tmp_path / "bin", tmp_path / "tar-env"
    bin_dir.mkdir()
    tar = bin_dir / "tar"
    tar.write_text(f'#!/bin/bash\necho "${{COPYFILE_DISABLE:-unset}}" >> "{seen}"\n'
                   f'exec {shutil.which("tar")} "$@"\n')
    tar.chmod(tar.stat().st_mode | stat.S_IXUSR)
    result = bake(repo, tmp_path)
    assert result.returncode == 0, result.stderr
    assert seen.read_text().split() == ["1"]


def test_bake_refuses_a_folder_that_is_not_a_git_checkout(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(AMI, repo / "ami")
    result = bake(repo, tmp_path)
    assert result.returncode == 2 and "not a git checkout" in result.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--weights", "{file}"], "is not the Keras ResNet-50 ImageNet weights file (MD5 "),
    (["--weights-source", "s3://models/resnet50.h5"], "needs --build-instance-profile NAME"),
])
def test_bake_refuses_at_once_what_would_fail_minutes_into_the_build(tmp_path, args, says):
    """A wrong weights file, or weights from S3 with no instance profile to read them,
    would fail on the build instance, after TensorFlow's install."""
    wrong = tmp_path / "weights.h5"
    wrong.write_bytes(b"not the weights")
    result = bake(AMI.parent, tmp_path, *(a.format(file=wrong) for a in args))
    assert result.returncode == 1 and says in result.stderr, result.stderr


def test_pack_only_writes_the_tarball_packer_would_get_and_never_runs_packer(tmp_path):
    """ami/smoke.sh provisions from `bake.sh --pack-only`: the same files as a bake packs,
    with no packer installed (a stub that fails stands in for one) and no AWS."""
    baked = bake(AMI.parent, tmp_path)
    assert baked.returncode == 0, baked.stderr
    with tarfile.open(tmp_path / "src.tar.gz") as tar:
        packed_for_packer = sorted(tar.getnames())

    bin_dir = tmp_path / "nopacker"
    bin_dir.mkdir()
    (bin_dir / "packer").write_text("#!/bin/bash\necho 'packer ran' >&2\nexit 99\n")
    (bin_dir / "packer").chmod(0o755)
    out = tmp_path / "packed.tar.gz"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(AMI / "bake.sh"), "--pack-only", str(out)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "packer ran" not in result.stderr
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == packed_for_packer
