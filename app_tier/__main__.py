"""`python -m app_tier`: run one worker, as the instance's service does."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import ExitStack
from types import FrameType
from typing import TYPE_CHECKING, Any

from app_tier import EXIT_CANNOT_START, EXIT_GAVE_UP, SPARE_LOADED
from app_tier.held_journal import JournalInUse, held_journal_path, hold_journal_lock
from common import cli, systemd
from common.aws import Aws
from common.config import Settings
from common.fleet import report_worker_failed, report_worker_ready
from common.heap import freeze_startup_heap
from common.logs import configure as configure_logging
from common.signals import STOP_SIGNALS

if TYPE_CHECKING:  # imported in main(): the model runtime takes a while to import
    from app_tier.worker import Worker

log = logging.getLogger(__name__)


class StopBeforeServing:
    """SIGTERM or SIGINT before the worker serves (while it loads its model, or waits as
    a warm spare): one line saying so, then the end the signal itself gives.

    So that a stop during the model load is logged. It ends by the signal, not by an
    exit status: to systemd that is a clean stop (SIGTERM and SIGINT are among its clean
    ends, an exit 143 is not), and to the local runner one stopped from outside
    (KILLED_FROM_OUTSIDE), so neither counts it as a failed start. It holds no message
    yet: nothing to hand back. Worker.install_signal_handlers replaces it once the
    worker serves."""

    def __init__(self) -> None:
        self.doing = "loading the model"
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._stop)

    def remove(self) -> None:
        """The handlers from before install(), where they are still this one's: for a
        caller of main() that goes on (a test) once it returns without serving."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._stop:
                signal.signal(signum, previous)

    def _stop(self, signum: int, _frame: FrameType | None = None) -> None:
        try:
            log.warning("stopped before serving: signal %d while %s", signum, self.doing)
        finally:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            os._exit(128 + signum)  # not reached: the default action ends the process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m app_tier", description=__doc__)
    parser.add_argument(
        "--instance-id",
        default=os.environ.get("INSTANCE_ID") or socket.gethostname(),
        help="EC2 instance id this worker serves as (shown in every response). '-' loads the "
        "model first and then reads the id from standard input: the local runner keeps such "
        "warm spares so that a launched instance starts serving at once.",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="load (and for OpenVINO, convert and cache) the model, then exit: for AMI baking "
        "and for the local stack, so that workers start in about a second",
    )
    parser.add_argument(
        "--show-held-only",
        action="store_true",
        help="make visible again the requests the last worker for --instance-id held when it "
        "ended (its journal), then exit, loading no model: the worker's unit runs it after "
        "each stop (ExecStopPost), so that a worker killed as its instance ends leaves none "
        "waiting for their visibility timeout. A journal a worker running here holds is left alone",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # First: loading the model takes from seconds to minutes, all of it stoppable.
    before_serving = StopBeforeServing()
    before_serving.install()
    try:
        return run(argv, before_serving)
    finally:
        before_serving.remove()


def run(argv: list[str] | None, before_serving: StopBeforeServing) -> int:
    """main(), with `before_serving` told what the worker does until it serves."""
    args = parse_args(argv)
    systemd.report_stacks_on_abort()
    configure_logging("%(asctime)s %(levelname)s worker[%(process)d] %(message)s")
    try:
        settings = Settings.from_env()
    except ValueError as exc:  # names the variable
        # One line, and not restarted (RestartPreventExitStatus): it would only fail
        # again, a traceback each time.
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START

    if args.show_held_only:
        return show_what_a_stopped_worker_held(settings, args.instance_id)
    with ExitStack() as journal_lock:
        try:
            return serve(args, settings, before_serving, journal_lock)
        except JournalInUse as exc:
            # One line, and not restarted: a restart would find the same worker there.
            print(f"worker: {exc}", file=sys.stderr)
            return EXIT_CANNOT_START


def lock_journal(settings: Settings, instance_id: str, held: ExitStack) -> None:
    """The journal of `instance_id` locked until `held` closes (or the process ends);
    raises JournalInUse if a worker running here has it."""
    path = held_journal_path(settings, instance_id)
    if path is not None:
        held.callback(hold_journal_lock(path, instance_id).release)


def serve(args: argparse.Namespace, settings: Settings, before_serving: StopBeforeServing,
          journal_lock: ExitStack) -> int:
    """run() once the settings are read: load the model, then serve; the journal of the
    instance served locked in `journal_lock` before anything reads it."""
    if args.instance_id != "-" and not args.prepare_only:
        lock_journal(settings, args.instance_id, journal_lock)
        # What a worker killed here held, visible before the model loads, not after: the
        # load (ImageNet weights on a small instance) would add to their wait.
        show_what_a_stopped_worker_held(settings, args.instance_id, locked=True)

    # Imported here: the model runtime takes a while to import, and --help should not.
    from app_tier.model import load_classifier
    from app_tier.weights import WeightsUnavailable
    from app_tier.worker import Worker, warm_up

    try:
        one_image = settings.worker_one_image_threads
        classifier = load_classifier(settings.model_weights, settings.model_runtime, settings.worker_threads,
                                     settings.worker_threads if one_image is None else one_image)
    except WeightsUnavailable as exc:
        print(exc, file=sys.stderr)
        if not args.prepare_only and args.instance_id != "-":
            # Not restarted, this worker leaves its instance idle: say so, or the
            # controller would count it as serving.
            report_worker_failed(Aws(settings), args.instance_id, "model-unavailable")
        return EXIT_CANNOT_START
    before_serving.doing = "getting ready to serve (the model loaded)"
    if args.prepare_only:
        print(f"model ready: {settings.model_runtime}, weights {settings.model_weights}, "
              f"loaded in {classifier.load_seconds:.1f}s")
        return 0
    aws = Aws(settings).open("s3", "sqs", "sqs_receive")
    # Before waiting for an instance id: a warm spare pays these while idle.
    warm_up(aws)
    freeze_startup_heap()
    instance_id = args.instance_id
    if instance_id == "-":
        before_serving.doing = "waiting for an instance (a warm spare)"
        # To the local runner: given an instance now, this spare serves within seconds.
        systemd.notify(f"STATUS={SPARE_LOADED}")
        instance_id = sys.stdin.readline().strip()
        if not instance_id:
            return 0  # the runner closed our stdin: never needed
        lock_journal(settings, instance_id, journal_lock)
    before_serving.doing = "starting to serve"
    worker = Worker(settings, aws, classifier, instance_id)
    worker.install_signal_handlers()
    threading.Thread(target=report_ready_once_received, args=(settings, worker), name="report-ready",
                     daemon=True).start()
    worker.serve()
    return EXIT_GAVE_UP if worker.gave_up else 0


def show_what_a_stopped_worker_held(settings: Settings, instance_id: str, locked: bool = False) -> int:
    """What the worker last run as `instance_id` held, made visible again: run at every
    start (`locked`: its journal's lock held already), and alone by --show-held-only,
    which leaves alone a journal a running worker holds. 0, whatever AWS said (each
    failure is logged)."""
    from app_tier.held import show_held
    from app_tier.held_journal import HeldJournal

    path = held_journal_path(settings, instance_id)
    if path is None or not path.exists():
        return 0  # a worker that ended cleanly held nothing
    with ExitStack() as journal_lock:
        if not locked:
            try:
                lock_journal(settings, instance_id, journal_lock)
            except JournalInUse as exc:
                log.warning("left %s alone: %s", path.name, exc)
                return 0
        try:
            show_held(HeldJournal(path), Aws(settings), f"stopped worker {instance_id}", "the worker")
        except Exception:  # resolving the queue's URL: left to the visibility timeout
            log.exception("could not make visible again what the worker held")
    return 0


def report_ready_once_received(settings: Settings, worker: Worker) -> None:
    """Tag the instance ready once the worker has received from the request queue:
    beside serving, so that EC2 being slow to take a tag delays no request."""
    while not worker.received.wait(1.0):
        if worker.stopping.is_set():
            return
    # Its own client (~200 ms of CPU and ~20 MB to build), made after the start-up
    # heap is frozen, so that it is freed once the tag is taken.
    report_worker_ready(Aws(settings), worker.instance_id, worker.stopping)


if __name__ == "__main__":
    sys.exit(main())
