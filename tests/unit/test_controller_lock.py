"""One controller per fleet on a machine: a second one refuses to start."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import Settings
from controller.lock import AnotherController, hold_fleet_lock
from controller.main import EXIT_ANOTHER_CONTROLLER, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(state_dir=str(tmp_path), endpoint_url="http://127.0.0.1:5000")


def test_a_second_lock_on_one_fleet_is_refused_naming_the_first(settings):
    first = hold_fleet_lock(settings)
    try:
        with pytest.raises(AnotherController, match=f"pid {os.getpid()}.*'imgclass'.*127.0.0.1:5000"):
            hold_fleet_lock(settings)
        # Other fleets: another prefix, or the same prefix on another AWS.
        hold_fleet_lock(dataclasses.replace(settings, prefix="other")).release()
        hold_fleet_lock(dataclasses.replace(settings, endpoint_url=None)).release()
    finally:
        first.release()
    assert not first.path.exists()  # a clean exit leaves no file behind
    hold_fleet_lock(settings).release()  # free again once the first lets go


@pytest.mark.parametrize("written", ["http://127.0.0.1:5000/", "http://localhost:5000",
                                     "HTTP://127.0.0.1:5000", " http://[::1]:5000 ",
                                     "http://0.0.0.0:5000", "http://127.1:5000", "http://[::]:5000",
                                     "http://[::ffff:127.0.0.1]:5000", "http://127.0.0.2:5000"])
def test_one_endpoint_is_one_fleet_however_it_is_written(settings, written):
    """Else two controllers run on one fleet, the second given the address with a
    trailing slash, as localhost, or in capitals."""
    first = hold_fleet_lock(settings)
    try:
        with pytest.raises(AnotherController):
            hold_fleet_lock(dataclasses.replace(settings, endpoint_url=written))
    finally:
        first.release()
    other_port = dataclasses.replace(settings, endpoint_url="http://127.0.0.1:5001")
    assert other_port.fleet_name != settings.fleet_name
    for elsewhere in ("http://10.0.0.7:5000", "http://moto.example:5000"):
        assert dataclasses.replace(settings, endpoint_url=elsewhere).fleet_name != settings.fleet_name


def test_a_lock_on_a_file_deleted_meanwhile_is_not_taken_for_the_fleets(settings, monkeypatch):
    """A controller ending deletes its lock file: one that opened it just before, and
    locks it just after, would hold a file nobody else can see (a third would make a
    new one and lock that too). It must try again."""
    from common import file_lock

    ending = hold_fleet_lock(settings)
    real_flock = file_lock.fcntl.flock
    calls = []

    def the_other_ends_first(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            ending.release()  # between this one's open and its lock
        return real_flock(fd, operation)

    monkeypatch.setattr(file_lock.fcntl, "flock", the_other_ends_first)
    starting = hold_fleet_lock(settings)
    monkeypatch.undo()
    try:
        assert len(calls) == 2
        assert os.fstat(starting.fd).st_ino == os.stat(starting.path).st_ino
        with pytest.raises(AnotherController):
            hold_fleet_lock(settings)
    finally:
        starting.release()


def test_a_lock_folder_deleted_meanwhile_is_made_again_not_tried_for_ever(settings, monkeypatch):
    """A folder removed between its mkdir and the open (a temporary-file cleaner) makes
    every try fail alike: the controller must not spin at full speed for ever. (make run's
    lock of its run folder is the same file_lock.hold.)"""
    import shutil
    import threading

    from common import file_lock

    real_lock_file = file_lock.lock_file
    calls = []

    def folder_gone_first(path, flags):
        calls.append(path)
        if len(calls) == 1:
            shutil.rmtree(path.parent)
        return real_lock_file(path, flags)

    monkeypatch.setattr(file_lock, "lock_file", folder_gone_first)
    held = []
    taking = threading.Thread(target=lambda: held.append(hold_fleet_lock(settings)), daemon=True)
    taking.start()
    taking.join(10)
    assert held, f"still trying after {len(calls)} tries"
    held[0].release()
    assert len(calls) == 2


def test_a_killed_controllers_lock_is_free_for_the_next(settings):
    script = ("import os, signal, sys; from common.config import Settings; "
              "from controller.lock import hold_fleet_lock; "
              "hold_fleet_lock(Settings(state_dir=sys.argv[1], endpoint_url='http://127.0.0.1:5000')); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    died = subprocess.run([sys.executable, "-c", script, settings.state_dir], cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert died.returncode == -9
    hold_fleet_lock(settings).release()


def test_controller_py_refuses_to_run_beside_another(settings, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", settings.endpoint_url)
    monkeypatch.setenv("XDG_STATE_HOME", str(Path(settings.state_dir).parent))
    running = hold_fleet_lock(Settings.from_env())
    try:
        assert main(["--once"]) == EXIT_ANOTHER_CONTROLLER
    finally:
        running.release()
    err = capsys.readouterr().err
    assert "another controller" in err and "Run exactly one" in err


def test_held_by_another_names_a_live_other_process_only(settings):
    from controller.lock import held_by_another, lock_path

    assert not held_by_another(settings)  # no lock file
    lock = hold_fleet_lock(settings)
    try:
        assert not held_by_another(settings)  # this process's own
    finally:
        lock.release()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = lock_path(settings)
    path.write_text(f"{other.pid}\n")
    try:
        assert held_by_another(settings)
    finally:
        other.kill()
        other.wait()
    assert not held_by_another(settings)  # its holder gone
    path.write_text("garbage\n")
    assert not held_by_another(settings)
