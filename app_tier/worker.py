"""The worker: poll, process, acknowledge; warm shutdown on SIGTERM.

One loop, in the spirit of rq's worker:

    receive up to RECEIVE_BATCH (10) requests  ->  download + decode them (in parallel)
    ->  classify them as one batch  ->  write each result to S3, then reply
    ->  delete each request, only after both of its writes succeeded.

Each step has a module of its own: app_tier/fetch.py receives, downloads and decodes
(`Fetcher`), app_tier/classify.py runs the model (`BatchClassifier`), and
app_tier/finish.py stores, replies and deletes (`Finisher`). This module is the loop
around them: its threads, the heartbeat, and stopping.

Threads: `fetch` prepares the next batch (receive, download, decode) while `serve`
classifies the current one and `finish` writes the previous one, so S3 and SQS overlap
with inference. The heartbeat extends the visibility timeout of every message held
(app_tier/held.py), so a slow batch is never redelivered by mistake.

A stuck worker gives its messages back and exits, to be restarted: a model call or a
decode not ended within STALL_TIMEOUT, or a loop iteration not ended within 30 minutes
more (a deadlock), as app_tier/stall_watch.py tells; it also pings systemd's watchdog
while the heartbeat beats.

On SIGTERM the worker stops receiving, finishes the batch in hand if it can within the
grace period, and hands the rest back at once: no request waits out a visibility
timeout for it. (The main thread only waits, so that it hears the signal even while the
model runs: see `serve`.)

A request received before (a suspect: it may have killed a worker) is loaded (its
image downloaded and decoded) alone and classified alone, with nothing else loaded or
classified meanwhile (`app_tier/risk_gate.py`), and the journal of what the worker
holds says which requests are being loaded or in a model call: a worker killed
outright then costs an attempt to those only, and an image that kills workers reaches
the dead-letter queue without its batch-mates.

A worker holds at most two unclassified batches (one being classified, one
prepared), so that a worker that starts early does not hoard messages that
instances started a moment later could be working on; a third, already
classified, may be being written.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from app_tier import EXIT_STALLED, images
from app_tier.classify import BatchClassifier, ModelFault, ModelOutOfMemory
from app_tier.fetch import Batch, Fetcher, receive_lease_s
from app_tier.finish import Finisher, Stores
from app_tier.held import HeldMessages
from app_tier.held_journal import HeldJournal, held_journal_path
from app_tier.job import Job
from app_tier.model import Classifier
from app_tier.replies import Replies
from app_tier.risk_gate import RiskGate
from app_tier.stall_watch import FETCH_LOOP, MAIN_LOOP, Call, StallWatch
from common import systemd
from common.aws import Aws
from common.aws_errors import AWS_ERRORS, is_callers_fault
from common.backoff import next_wait
from common.config import SHORT_POLL_PAUSE_S, Settings
from common.fleet import report_worker_failed
from common.messages import ClassifyResponse
from common.signals import on_signals

log = logging.getLogger(__name__)

# Waits between receives that fail: the shortest, doubled each time, up to the longest.
RECEIVE_BACKOFF_MIN_S = 1.0
RECEIVE_BACKOFF_MAX_S = 30.0
# How long the grace period's end waits for a receive under way (see _grace_period_over).
GRACE_RECEIVE_WAIT_S = 2.0
# Batches in a row the model failed on, a plain input too, before the worker reports
# its instance failed and stops: one may be a passing fault (a thread the runtime
# could not start under memory pressure), each costs its requests an attempt.
MODEL_FAULTS_BEFORE_GIVING_UP = 2
# The same, one more allowed, when the last was a call short of memory: two in a row
# may be another process's peak (the batch's call, then its first image's alone, which
# takes less).
MEMORY_FAULTS_BEFORE_GIVING_UP = 3


class Worker:
    """One worker: its serving loop, fetch thread and heartbeat, and the three steps
    they run (fetch, process: classify then finish)."""

    def __init__(self, settings: Settings, aws: Aws, classifier: Classifier, instance_id: str) -> None:
        self.settings = settings
        self.aws = aws
        self.classifier = classifier
        self.instance_id = instance_id
        self.stopping = threading.Event()
        # Set once a receive from the request queue has succeeded: the worker has what
        # it needs to serve (credentials, rights, a route to SQS), so its instance may
        # be tagged ready (common/fleet.py).
        self.received = threading.Event()
        self._finished = threading.Event()
        # What the heartbeat keeps hidden, and what a stop hands back.
        journal_path = held_journal_path(settings, instance_id)
        self.held = HeldMessages(aws, settings, instance_id,
                                 HeldJournal(journal_path) if journal_path else None)
        self.replies = Replies(aws)
        self._prefetched: queue.Queue[Batch] = queue.Queue()
        # Taken by the fetch thread before it receives, given back when the main
        # thread picks the batch up: at most one batch waits while one is classified.
        self._prefetch_slot = threading.Semaphore(1)
        # Downloads and decodes, the extension of what was just received, and stores.
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="io")
        # Which loads and model calls may run at once (a suspect's, nothing beside it).
        self._risk = RiskGate()
        # One batch at a time is written while the next is classified.
        self._finish_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self._finishing: Future | None = None
        self._exit = os._exit  # tests put a recorder here
        self._grace_timer: threading.Timer | None = None
        # A third of the receive's lease: a beat late by two thirds of it still keeps what is held.
        heartbeat_period_s = max(1.0, min(receive_lease_s(settings), settings.stall_timeout_s) / 3)
        self.stall_watch = StallWatch(settings.stall_timeout_s, heartbeat_period_s)
        self.fetcher = Fetcher(settings, aws, self.held, untrained=classifier.untrained,
                               stopping=self.stopping, received=self.received,
                               stall_watch=self.stall_watch, at_risk=self._at_risk, io=self._io)
        self.batch_classifier = BatchClassifier(classifier, instance_id, stall_watch=self.stall_watch,
                                                at_risk=self._at_risk)
        self.finisher = Finisher(settings, aws, self.held, self.replies, instance_id=instance_id,
                                 untrained=classifier.untrained, io=self._io)
        self._watchdog: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None
        self._fetch_thread: threading.Thread | None = None
        self._model_faults = 0  # batches in a row released for a ModelFault
        # Since when every result write has been refused (_stores_refused), and the latest.
        self._refused_since: float | None = None
        self._refused_last = 0.0
        self.gave_up: str | None = None  # why it stopped for good (_stop_for_good), if it did

    @property
    def processed(self) -> int:
        """Images classified here and answered."""
        return self.finisher.processed

    # --- lifecycle ---------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        on_signals(self._on_signal)

    def _on_signal(self, signum: int) -> None:
        log.info("worker %s: signal %d, stopping after the batch in hand", self.instance_id, signum)
        self.stopping.set()
        # If the batch in hand cannot finish in time, give its messages back now.
        if self._grace_timer is None:
            self._grace_timer = threading.Timer(self.settings.shutdown_grace_s, self._grace_period_over)
            self._grace_timer.daemon = True
            self._grace_timer.start()

    def _grace_period_over(self) -> None:
        log.warning("worker %s: grace period over, handing back held messages", self.instance_id)
        try:
            # A model call or decode under way was tried and did not finish: that costs an
            # attempt, or an image that hangs either would start afresh at every scale-in.
            # A long poll begun before the signal ends within RECEIVE_WAIT of it, so by
            # now at the default grace, but only just: what it brings at the last moment
            # is handed back too, not left hidden for its lease. Systemd's
            # kill (TimeoutStopSec=30) leaves room over SHUTDOWN_GRACE's 25 s at most.
            self._give_back([job for call in self.stall_watch.calls_under_way() for job in call.jobs],
                            wait_for_receive_s=GRACE_RECEIVE_WAIT_S)
        finally:
            self._exit(0)

    def serve(self) -> None:
        """run(), with the process's main thread left free to hear signals.

        Python runs signal handlers on the main thread only, between two bytecodes. A
        main thread inside a model call (seconds of C++ on a throttled t2) would hear
        SIGTERM only once the call returned: the fetch thread would go on receiving,
        and the grace period would start late enough for systemd's kill to come before
        the hand-back. So the loop runs on a thread of its own while this one waits.
        Call it from the main thread, after install_signal_handlers()."""
        raised: list[BaseException] = []

        def run_keeping_what_it_raised() -> None:
            try:
                self.run()
            except BaseException as exc:
                raised.append(exc)

        serving = threading.Thread(target=run_keeping_what_it_raised, name="serve")
        serving.start()
        while serving.is_alive():
            serving.join(0.5)  # a timed wait: signal handlers run during it
        if self._grace_timer is not None:
            self._grace_timer.cancel()  # the shutdown finished within the grace period
        if raised:
            raise raised[0]

    def run(self) -> None:
        """Serve until told to stop; returns after a clean, warm shutdown."""
        log.info("worker %s: serving %s", self.instance_id, self.settings.request_queue)
        fetching = self._fetch_thread = threading.Thread(target=self._fetch_loop, name="fetch", daemon=True)
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat.start()
        systemd.notify("READY=1")  # a no-op when not run by systemd
        if self.stall_watch.watchdog_s:
            self._watchdog = threading.Thread(target=self.stall_watch.ping_watchdog, name="watchdog",
                                              args=(self._heartbeat, self._finished), daemon=True)
            self._watchdog.start()
        # Ready and watched first: SQS slow to answer (botocore retrying) must not look
        # like a worker that never started. Before the first receive: see the method.
        self.held.show_what_the_last_worker_held()
        fetching.start()
        while not (self.stopping.is_set() and self._prefetched.empty() and not fetching.is_alive()):
            self.stall_watch.tick(MAIN_LOOP)
            try:
                batch = self._prefetched.get(timeout=0.5)
            except queue.Empty:
                continue
            self._prefetch_slot.release()
            if self.stopping.is_set():
                # Prepared, but the stop signal came first: not ours to finish.
                self.held.hand_back(batch.jobs)
                continue
            responses = self._responses_or_release(batch)
            if responses is None:
                continue
            self._wait_for_finishing()
            self._finishing = self._finish_thread.submit(self._finish_or_release, batch, responses)
        self.stall_watch.loop_ended(MAIN_LOOP)
        self._wait_for_finishing()
        # Beating, and pinging systemd's watchdog, until all is handed back: a hand-back
        # slowed by SQS past WatchdogSec had systemd abort, and restart, a worker that had
        # given up (exit 79: not to be restarted) or was stopping.
        self.held.hand_back_all()
        self._finished.set()
        self._io.shutdown(wait=False)
        self._finish_thread.shutdown(wait=False)
        log.info("worker %s: stopped after %d images", self.instance_id, self.processed)

    # --- the fetch thread: fetch a batch ahead of the model, retrying receives -----
    def _fetch_loop(self) -> None:
        try:
            self._fetch_until_stopped()
        finally:
            self.stall_watch.loop_ended(FETCH_LOOP)

    def _fetch_until_stopped(self) -> None:
        backoff = 0.0
        failing_since: float | None = None
        while not self.stopping.is_set():
            self.stall_watch.tick(FETCH_LOOP)
            if not self._prefetch_slot.acquire(timeout=0.5):
                continue
            try:
                batch = self.fetch()
                backoff = 0.0
                failing_since = None
            except Exception as exc:  # this thread must outlive anything, or the worker stalls
                self._prefetch_slot.release()
                backoff = next_wait(backoff, RECEIVE_BACKOFF_MIN_S, RECEIVE_BACKOFF_MAX_S)
                if isinstance(exc, AWS_ERRORS):
                    log.warning("receive failed (%s); retrying in %.0f s", exc, backoff)
                else:
                    log.exception("fetch failed; retrying in %.0f s", backoff)
                # Not this worker's own fault: a fleet that gave up on AWS's or the network's
                # would be replaced whole after every outage.
                if not is_callers_fault(exc):
                    failing_since = None  # AWS's or the network's: it passes, and is waited out
                elif failing_since is None:
                    failing_since = time.monotonic()
                failing_s = 0.0 if failing_since is None else time.monotonic() - failing_since
                if failing_s >= self.settings.stall_timeout_s:
                    self._cannot_receive(failing_s, exc)
                    return
                self.stopping.wait(backoff)
                continue
            if batch.jobs:
                self._prefetched.put(batch)
            else:
                self._prefetch_slot.release()
                if not self.settings.receive_wait_s:
                    self.stopping.wait(SHORT_POLL_PAUSE_S)

    def _cannot_receive(self, failing_s: float, last: Exception) -> None:
        """Receiving has failed for STALL_TIMEOUT, each time for a fault of this worker's
        (is_callers_fault: a right, credentials or a queue it lacks). Its instance, once
        tagged ready, would otherwise count as serving until the controller's
        PROGRESS_DEADLINE found requests waiting untaken, and for good beside workers that
        receive: the controller replaces an instance reported failed, and holds launches
        if the replacements fail too."""
        log.error("worker %s: every receive has failed for %.0f s (the last: %s); reporting its "
                  "instance failed and stopping", self.instance_id, failing_s, last)
        self._stop_for_good("cannot-receive")

    def _stop_for_good(self, why: str) -> None:
        """Report the instance failed (`why`) and stop. Once EC2 has the report, the
        process exits with EXIT_GAVE_UP, which its supervisor does not restart: the
        controller replaces the instance. Without it, it exits 0, to be restarted: the
        credentials or role that failed its receives may fail the tag too, and a new
        process may get new ones; only the controller's PROGRESS_DEADLINE would replace an
        instance tagged ready, and only while no other worker receives."""
        if report_worker_failed(self.aws, self.instance_id, why):
            self.gave_up = why
        self.stopping.set()

    # --- the steps: fetch, then process (classify, then finish) -------------------
    def fetch(self) -> Batch:
        """Receive up to `receive_batch` requests and prepare their pixels (app_tier/fetch.py)."""
        return self.fetcher.fetch()

    def process(self, batch: Batch) -> None:
        """Classify a batch and finish it (write, reply, acknowledge), or release it for
        another attempt if anything fails. The serving loop (run) takes these two steps
        apart, to write one batch while it classifies the next; this is them in one call,
        for tests and tools that drive a worker batch by batch."""
        responses = self._responses_or_release(batch)
        if responses is not None:
            self._finish_or_release(batch, responses)

    def _responses_or_release(self, batch: Batch) -> list[tuple[Job, ClassifyResponse]] | None:
        try:
            responses = self.batch_classifier.responses_for(batch)
        except ModelFault as exc:
            gave_up = self._count_model_fault(exc)  # True once the worker stops
            if gave_up and isinstance(exc, ModelOutOfMemory):
                # Not the images' fault: handed back untried, the attempts they have used
                # here do not use up the one a replacement with the memory needs.
                log.warning("batch of %d: handed back untried, the worker short of memory",
                            len(batch.jobs))
                self.held.hand_back(batch.jobs)
            else:
                self._release_failed(batch)
            return None
        except Exception:  # whatever it was, the loop must go on
            self._release_failed(batch)
            return None
        if self.batch_classifier.model_answered:  # faults in a row end only with an answer
            self._model_faults = 0
        return responses

    def _count_model_fault(self, fault: ModelFault) -> bool:
        """A batch failed for a model that fails whatever its input, or short of memory:
        after MODEL_FAULTS_BEFORE_GIVING_UP in a row (MEMORY_FAULTS_BEFORE_GIVING_UP if
        the last was short of memory), the worker reports its instance failed and stops,
        for the controller to replace it; True if it does. Serving on, it would answer
        nothing while counting as serving, and send each request it received towards
        the dead-letter queue."""
        self._model_faults += 1
        short = isinstance(fault, ModelOutOfMemory)
        if self._model_faults < (MEMORY_FAULTS_BEFORE_GIVING_UP if short else MODEL_FAULTS_BEFORE_GIVING_UP):
            return False
        log.error("worker %s: the model failed on %d batches in a row (the last: %s); reporting its "
                  "instance failed and stopping", self.instance_id, self._model_faults,
                  fault if short else f"on a plain input too: {fault.__cause__ or fault}")
        self._stop_for_good("model-fault")
        return True

    def finish(self, responses: list[tuple[Job, ClassifyResponse]]) -> Stores:
        """Write each result, then reply, then delete the requests (app_tier/finish.py)."""
        return self.finisher.finish(responses)

    def _finish_or_release(self, batch: Batch, responses: list[tuple[Job, ClassifyResponse]]) -> None:
        try:
            stores = self.finish(responses)
        except Exception:
            self._release_failed(batch)
            return
        self._stores_refused(stores)

    def _stores_refused(self, stores: Stores) -> None:
        """After STALL_TIMEOUT of result writes refused for a fault of this worker's
        (a right it lacks, a bucket not there), with none taken meanwhile, it reports its
        instance failed and stops, as _cannot_receive does for receives: serving on, it
        would hand back every request it takes, answering none while counting as serving.
        Not at once: a role just given the right may not have it everywhere yet. A
        refusal over STALL_TIMEOUT after the one before (requests went to other workers
        meanwhile) starts the count again."""
        now = time.monotonic()
        if stores.wrote:
            self._refused_since = None
        if stores.refused is None:
            return
        if self._refused_since is None or now - self._refused_last > self.settings.stall_timeout_s:
            self._refused_since = now
        self._refused_last = now
        refused_s = now - self._refused_since
        if refused_s >= self.settings.stall_timeout_s:
            log.error("worker %s: every result write has been refused for %.0f s (the last: %s); "
                      "reporting its instance failed and stopping", self.instance_id, refused_s,
                      stores.refused)
            self._stop_for_good("cannot-store")

    def _wait_for_finishing(self) -> None:
        if self._finishing is not None:
            self._finishing.result()  # never raises: _finish_or_release catches everything
            self._finishing = None

    def _release_failed(self, batch: Batch) -> None:
        # Another attempt (here or elsewhere) may succeed; after max_receive_count
        # attempts SQS moves it to the dead-letter queue.
        log.exception("batch of %d failed; releasing it", len(batch.jobs))
        self.held.release(batch.jobs)

    @contextmanager
    def _at_risk(self, jobs: list[Job]) -> Iterator[None]:
        """Around the loading or the model call of `jobs`: the journal marks them at risk,
        for a successor should this worker be killed meanwhile (HeldMessages.at_risk).
        A suspect's waits for every other load and model call under way to end, and
        holds back the others until it ends (app_tier/risk_gate.py)."""
        with self._risk.enter(jobs), self.held.at_risk(jobs):
            yield

    # --- heartbeat, and giving everything back before an exit ----------------------
    def _heartbeat_loop(self) -> None:
        watch = self.stall_watch
        watch.beat()
        while not self._finished.wait(watch.heartbeat_period_s):
            stuck = watch.stuck(time.monotonic())
            if stuck is not None:
                self._give_up_stuck(stuck)
                return
            try:
                self.held.extend()
            except Exception:
                # SQS's and the journal's errors are handled within: this is a bug. Dead, this
                # thread would leave every held message to lapse, and stalls unseen, without a
                # word until the watchdog (systemd's or the runner's; none by hand) restarts it.
                # No beat for a failed round: one failing every time stops the watchdog's
                # pings after HEARTBEAT_SLACK_S, as a blocked round does.
                log.exception("worker %s: a heartbeat round failed; trying again at the next",
                              self.instance_id)
                continue
            watch.beat()

    def _give_up_stuck(self, stuck: Call) -> None:
        """A call that never returns would keep its messages hidden for good (this
        thread extends them): let another worker have them, and exit to be restarted
        (whatever happens here: a worker that neither serves nor exits is counted as
        serving)."""
        log.error("worker %s: a %s has not ended in %.0f s; giving back %d messages and "
                  "exiting (%d) to be restarted", self.instance_id, stuck.kind,
                  time.monotonic() - stuck.started, len(self.held), EXIT_STALLED)
        self.stopping.set()  # no more receives
        try:
            # A long poll under way may still bring messages: wait for it, to hand them
            # back too, unless the fetch thread is the one stuck (a decode runs in it).
            wait_s = 0.0 if stuck.loop == FETCH_LOOP else self.settings.receive_wait_s + 5.0
            self._give_back(stuck.jobs, wait_for_receive_s=wait_s)
        finally:
            self._exit(EXIT_STALLED)

    def _give_back(self, tried: list[Job], wait_for_receive_s: float = 0.0) -> None:
        """Before an exit, everything held back to the queue: `tried`, the jobs of calls
        that did not end, visible again as a used attempt (so an image that hangs the
        model is classified alone next time, see BatchClassifier._classify, and one that hangs either
        goes to the dead-letter queue after max_receive_count attempts); the rest
        handed back untried."""
        self.held.make_visible_as_tried(tried)
        if self._fetch_thread is not None and wait_for_receive_s > 0:
            self._fetch_thread.join(wait_for_receive_s)
        self.held.hand_back_all()


def warm_up(aws: Aws) -> None:
    """Before serving, what a new instance's first request would otherwise wait for:
    a first image decode, and the queue URLs (the first SQS call took 20-70 ms of
    wall time here). A queue that cannot be resolved yet is left to the fetch
    loop, which retries."""
    images.warm_up()
    try:
        for name in (aws.settings.request_queue, aws.settings.response_queue):
            aws.queue_url(name)  # kept by Aws for every later call
    except AWS_ERRORS as exc:
        log.warning("queue URLs not resolved before serving (%s); the worker will retry", exc)
