"""A run: the requests planned, sent by `concurrency` threads, each outcome judged as
it comes, with a progress line, and Ctrl-C (or SIGTERM) heard; run_load returns the
Report."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import urllib3.response

from loadtest.client import Client, api_key_required, check_reachable
from loadtest.config import Config, LoadTestError
from loadtest.names import image_key, list_images, read_expected, sendable_name
from loadtest.outcomes import Outcome, Report, judge
from loadtest.status import StatusPoller


class Progress:
    """A one-line progress bar on stderr; on a non-terminal, a line per 10 %."""

    WIDTH = 30

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.stream.isatty()
        self._last_tenth = 0
        self._t0 = time.monotonic()

    def update(self, done: int, failed: int, wrong: int, not_sent: int = 0) -> None:
        if not self.enabled:
            return
        filled = self.WIDTH * done // self.total
        rate = done / max(time.monotonic() - self._t0, 1e-9)
        line = (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}"
            f"  failed {failed}  wrong {wrong}" + (f"  not sent {not_sent}" if not_sent else "")
            + f"  {rate:.1f}/s"
        )
        if self.tty:
            self.stream.write("\r" + line)
        else:
            tenth = 10 * done // self.total
            if tenth == self._last_tenth:
                return
            self._last_tenth = tenth
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Senders:
    """`concurrency` threads working through the plan, each outcome put on a queue.

    Not a ThreadPoolExecutor: Python joins its threads when the interpreter exits,
    so after a second Ctrl-C the process would still wait for every request in
    flight (up to --timeout). These threads are daemons; once the report is
    printed nothing waits for them.
    """

    def __init__(self, client: Client, plan: Sequence[Path], concurrency: int, stop: threading.Event) -> None:
        self._client = client
        self._stop = stop
        self._todo = deque(enumerate(plan))
        self._lock = threading.Lock()
        # Each request taken from the plan puts one Outcome here, or the exception
        # that ended its thread.
        self._done: queue.SimpleQueue[Outcome | BaseException] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"load-{n}", daemon=True)
            for n in range(min(concurrency, len(plan)))
        ]
        self._t0 = 0.0
        self.started = 0  # requests taken from the plan (changed under the lock)
        self.received = 0  # outcomes handed out (changed by the caller's thread only)
        self.answered = 0  # requests whose outcome is in (changed under the lock)

    def start(self, t0: float) -> None:
        self._t0 = t0
        for thread in self._threads:
            thread.start()

    def _next(self) -> tuple[int, Path] | None:
        # Checked and counted under the lock: once the stop event is set and the
        # lock taken, `started` is final.
        with self._lock:
            if self._stop.is_set() or not self._todo:
                return None
            self.started += 1
            return self._todo.popleft()

    def _work(self) -> None:
        try:
            while (job := self._next()) is not None:
                outcome = self._client.send(job[0], job[1], self._t0)
                with self._lock:
                    self.answered += 1
                self._done.put(outcome)
        except BaseException as exc:  # send handles failed requests: this is a bug, shown by the caller
            self._done.put(exc)

    def _finished(self) -> bool:
        with self._lock:
            no_more = self._stop.is_set() or not self._todo
            return no_more and self.received == self.started

    def outcomes(self) -> Iterator[Outcome]:
        """Each outcome as it comes, until the plan is sent and answered or, once
        the stop event is set, until the requests in flight are answered."""
        while not self._finished():
            try:
                # Timed: Ctrl-C interrupts a wait only if the kernel hands SIGINT to
                # this thread; handed to a sender, it is acted on at the next timeout.
                item = self._done.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            self.received += 1
            yield item

    def ready(self) -> Iterator[Outcome]:
        """The outcomes already there, without waiting for more."""
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Outcome):
                self.received += 1
                yield item

    def in_flight(self) -> int:
        """Requests taken from the plan whose outcome is not in yet (one in but not yet
        handed out is not in flight: the first Ctrl-C's count had them too)."""
        with self._lock:
            return self.started - self.answered


class Terminated(KeyboardInterrupt):
    """SIGTERM, heard as a Ctrl-C that waits for nothing (see load_test.sigterm_as_ctrl_c)."""


def plan_requests(config: Config, images: list[Path], expected: dict[str, str]) -> list[Path]:
    """The image each request sends, in order: the folder's images over and over, up to
    --num-requests (all of them once without it). Raises LoadTestError when an
    --expected CSV names none of the images sent."""
    total = config.num_requests if config.num_requests is not None else len(images)
    plan = [images[i % len(images)] for i in range(total)]
    sending = {sendable_name(p) for p in plan}  # as judge names them
    if config.expected and not any(image_key(name) in expected for name in sending):
        # Every answer would be "unchecked", and the run a PASS that checked nothing. The
        # images sent, not those in the folder: --num-requests may send only a few of them.
        which = (f"the {len(images)} images in {config.images}" if len(sending) == len(images) else
                 f"the {len(sending)} images --num-requests {total} sends of the {len(images)} "
                 f"in {config.images}")
        named = ", ".join(sorted(expected)[:3]) or "none"
        raise LoadTestError(f"{config.expected} names none of {which} (it names {named}"
                            f"{', ...' if len(expected) > 3 else ''})")
    return plan


def run_load(
    config: Config,
    progress: Progress | None = None,
    on_result: Callable[[Outcome], None] | None = None,
    *,
    images: list[Path] | None = None,
    expected: dict[str, str] | None = None,
) -> Report:
    """Send the planned requests with `config.concurrency` in flight; return the report.

    `images` and `expected`: what list_images and read_expected gave for `config.images`
    and `config.expected`, if the caller has read them already (load_test.main, for its
    progress bar): read again, a folder changed in between would make the plan disagree
    with the progress total. Left out, they are read here.

    `on_result` is called in the calling thread for each finished request.
    A Ctrl-C (KeyboardInterrupt, also from `on_result`) stops sending; requests
    in flight are waited for (each is bounded by the timeout). A second one stops
    waiting: the report holds what was answered, counts the rest as abandoned,
    and the threads still waiting for them are left to end with the process
    (those polling /api/jobs stop at their next poll).
    Either way the report says it was interrupted.
    """
    if images is None:
        images = list_images(config.images)
    if expected is None:
        expected = read_expected(config.expected) if config.expected else {}
    plan = plan_requests(config, images, expected)
    total = len(plan)
    if not hasattr(urllib3.response.HTTPResponse, "read1"):
        # Every request would fail with an AttributeError (a reviewer: distributions ship 1.26).
        raise LoadTestError("this script needs urllib3 2.2 or later: pip install 'urllib3>=2.2'")
    check_reachable(config.url)
    if not config.api_key and api_key_required(config.url):
        # Else every upload is refused with a 401, and a quiet run said only how many failed.
        raise LoadTestError(f"{config.url} requires an API key (its /api/status says so): "
                            "give it with --api-key KEY or as $API_KEY")

    stop, abandon = threading.Event(), threading.Event()
    client = Client(config, stop, abandon)
    senders = Senders(client, plan, config.concurrency, stop)
    poller = StatusPoller(config, on_answer=client.server_answered)
    outcomes: list[Outcome] = []
    # Running counts for the progress line: counting all outcomes again for each
    # result made a 20,000-request run spend seconds of the main thread on it.
    problems = {"failed": 0, "wrong": 0, "not sent": 0}

    def record(outcome: Outcome, notify: bool = True) -> None:
        judge(outcome, expected)
        outcomes.append(outcome)
        if outcome.verdict in problems:
            problems[outcome.verdict] += 1
        if notify and on_result:
            on_result(outcome)
        if notify and progress:
            progress.update(len(outcomes), problems["failed"], problems["wrong"],
                            not_sent=problems["not sent"])

    interrupted = False
    abandoned = 0
    # The clock starts as the first requests go: nothing slow comes in between.
    started_at = time.time()
    t0 = time.monotonic()
    try:
        try:
            poller.start(t0)
            senders.start(t0)
            for outcome in senders.outcomes():
                record(outcome)
        except KeyboardInterrupt as first:
            # All of the handling is inside the next try: a second Ctrl-C may come
            # at any moment, even before the message below is out.
            try:
                interrupted = True
                stop.set()
                if progress:
                    progress.clear()
                if isinstance(first, Terminated):
                    raise KeyboardInterrupt  # waits for nothing: as a second Ctrl-C
                print(
                    f"\ninterrupted: waiting for {senders.in_flight()} requests in flight "
                    "(Ctrl-C again to quit)",
                    file=sys.stderr,
                )
                for outcome in senders.outcomes():
                    record(outcome)
            except KeyboardInterrupt:
                for outcome in senders.ready():
                    record(outcome, notify=False)
                # Every request taken from the plan is either recorded or abandoned: one
                # whose outcome came a moment too late for the report (or was handed out
                # as this Ctrl-C came) is abandoned, not lost from both (explorer).
                abandoned = senders.started - len(outcomes)
                print(f"\nquitting: {abandoned} requests in flight left unanswered", file=sys.stderr)
    finally:
        stop.set()
        # Requests still waiting (a second Ctrl-C) stop polling: each is counted abandoned
        # already, and would otherwise poll the web tier until its timeout.
        abandon.set()
        duration = time.monotonic() - t0
        # An interrupted run waits for nothing more, not even a slow /api/status.
        poller.stop(wait=not interrupted)
        client.close()
        if progress:
            progress.close()

    return Report(
        url=config.url,
        api=config.api,
        concurrency=config.concurrency,
        planned=total,
        started_at=started_at,
        duration_s=duration,
        outcomes=outcomes,
        instance_samples=list(poller.samples),
        interrupted=interrupted,
        abandoned=abandoned,
        idempotency_keys=config.idempotency_keys,
        checked_against_csv=config.expected is not None,
    )
