"""The requirement files: what an instance installs is enough, and every version is pinned.

ami/provision.sh installs requirements-runtime.txt only, and the web and controller
host requirements-web.txt, so a tier importing a package that only requirements.txt
brings (moto, requests, ...) would pass every test here and die at start on AWS.
"""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
TIERS = ("app_tier", "web_tier", "controller", "common")
OWN = {"app_tier", "web_tier", "controller", "common", "localaws", "bench", "load_test", "tests"}
# Imported only by a diagnostic an instance does not need (controller --plot).
TOOLS_ONLY = {"controller/timeline.py": {"matplotlib"}}


def requirements(path: Path) -> list[Requirement]:
    found = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found += requirements(path.parent / line[3:].strip())
        elif line:
            found.append(Requirement(line))
    return found


def pins() -> dict[str, str]:
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pinned[canonicalize_name(name)] = version
    return pinned


def closure(names: set[str]) -> set[str]:
    """The installed distributions these need, with everything they need in turn."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_every_requirement_is_pinned_within_its_range():
    pinned = pins()
    for req in requirements(ROOT / "requirements.txt"):
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name} (make lock)"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside {req.specifier}"


def test_everything_the_runtime_needs_is_pinned():
    runtime = closure({r.name for r in requirements(ROOT / "requirements-runtime.txt")})
    assert runtime - set(pins()) == set(), "make lock"


@pytest.mark.parametrize(("installed", "tiers"), [
    ("requirements-runtime.txt", TIERS),  # the AMI's
    ("requirements-web.txt", ("web_tier", "controller", "common")),  # make runtime-venv RUNTIME=web
])
def test_the_tiers_import_only_what_an_instance_installs(installed, tiers):
    runtime = closure({r.name for r in requirements(ROOT / installed)})
    providers = metadata.packages_distributions()
    missing = []
    for tier in tiers:
        for path in sorted((ROOT / tier).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for module in imported_top_levels(path) - OWN - set(sys.stdlib_module_names):
                if module in TOOLS_ONLY.get(relative, set()):
                    continue
                dists = {canonicalize_name(d) for d in providers.get(module, [])}
                if not dists & runtime:
                    found_in = ", ".join(sorted(dists)) or "not installed"
                    missing.append(f"{relative} imports {module} ({found_in})")
    assert missing == [], f"not in {installed}: " + "; ".join(missing)


def test_the_runtime_leaves_out_what_only_a_laptop_needs():
    runtime = closure({r.name for r in requirements(ROOT / "requirements-runtime.txt")})
    assert {"moto", "pytest", "selenium", "ruff", "matplotlib"} & runtime == set()


def test_the_web_host_leaves_out_the_model():
    """The web and controller host installed TensorFlow and OpenVINO (~1.6 GB, two venvs
    of them during an update) for the workers' sake."""
    web = closure({r.name for r in requirements(ROOT / "requirements-web.txt")})
    assert {"tensorflow", "tensorflow-cpu", "openvino", "numpy", "keras"} & web == set()
    assert {r.name for r in requirements(ROOT / "requirements-web.txt")} <= {
        r.name for r in requirements(ROOT / "requirements-runtime.txt")}, "the AMI's holds the web host's"


def test_the_load_test_runs_where_an_instance_installs_and_only_plotting_needs_more():
    """README runs load_test.py on the web instance: its imports must not be there only
    because TensorFlow happens to bring requests."""
    named = {canonicalize_name(r.name) for r in requirements(ROOT / "requirements-web.txt")}
    providers = metadata.packages_distributions()
    needed = imported_top_levels(ROOT / "load_test.py") - {"matplotlib"} - set(sys.stdlib_module_names)
    for module in sorted(needed):
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists & named, f"load_test.py imports {module}, not named in requirements-web.txt"
