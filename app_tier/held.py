"""The messages a worker holds: hidden from other workers while it works on them,
deleted once answered, and given back when it cannot finish them.

A receive hides a message for the worker's receive lease (`fetch.RECEIVE_LEASE_S`,
shorter than the queue's visibility timeout); the worker extends that to
VISIBILITY_TIMEOUT at once, and its heartbeat keeps every message held hidden
(`extend`), so a slow batch is never redelivered by mistake. A failed attempt is made visible again
after a delay that grows with each attempt (`release`); a stopping worker hands
the messages it never tried back without using up an attempt (`hand_back`). Which
are at risk, being loaded or in a model call (`at_risk`), is written down with them,
so that the next worker on the instance, should this one be killed outright, makes
visible as a used attempt only those, and hands the others back untried (`show_held`).

What each of HeldMessages' verbs does to a message, and whether it uses up one of the
MAX_RECEIVE_COUNT attempts (a receive is one; SQS then dead-letters the message):
- `hold`: start holding just-received messages; `extend`: keep them hidden longer.
- `delete`: answered, gone from the queue. `forget`: stop holding, nothing sent to SQS.
- `release`: failed here, visible again after a growing delay: the attempt is used.
- `make_visible_as_tried`: visible at once, the attempt used (a stop mid-call).
- `hand_back` / `hand_back_all`: never tried, sent again as new messages with their
  earlier receives noted, the originals deleted: no attempt used.
- `hide`: the SQS call under `release` and `make_visible_as_tried`.
- `mark_answering`: being answered, so that a stop does not hand them back too.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from app_tier.held_journal import HeldEntry, HeldJournal, still_hidden
from app_tier.job import Job
from common.aws import Aws
from common.aws_errors import AWS_ERRORS
from common.config import Settings
from common.messages import PRIOR_RECEIVES_ATTRIBUTE, ClassifyRequest, prior_receives_attribute
from common.sqs import VisibilityFailure, change_visibility, sqs_batches

log = logging.getLogger(__name__)

# Seconds since the epoch, as the journal keeps them (tests put a clock of their own here).
wall_clock = time.time
# SQS allows a message 12 h of invisibility from its receive, all extensions
# included; an hour leaves room for everything before and after a retry delay.
MAX_RETRY_DELAY_S = 3600


def retry_delay_s(receive_count: int, first_delay_s: int) -> int:
    """How long a request whose attempt number `receive_count` failed stays hidden.

    Doubling from `first_delay_s`: an attempt fails after botocore has already
    retried for a while, so trying again at once would mostly fail again, and
    after max_receive_count quick failures SQS sends the request to the
    dead-letter queue; spread out, the attempts outlast a short outage of S3 or
    SQS (or an IAM change still propagating) instead."""
    doublings = min(max(receive_count - 1, 0), 32)  # 2 ** a sender's huge count would never end
    return min(first_delay_s * 2 ** doublings, MAX_RETRY_DELAY_S)


# More than any request can have used (each copy is dead-lettered after a few).
MAX_PRIOR_RECEIVES = 1000


def prior_receives(message: Mapping[str, Any]) -> int:
    """The receives a received request's earlier copies used (0 when it has none, or
    when the attribute is not a count: anyone can send a request), at most
    MAX_PRIOR_RECEIVES."""
    value = message.get("MessageAttributes", {}).get(PRIOR_RECEIVES_ATTRIBUTE, {}).get("StringValue")
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 9:
        return 0
    return min(int(value), MAX_PRIOR_RECEIVES)


@dataclass(eq=False)
class _Held:
    """One message held, and what is under way with it."""

    job: Job
    # Its result stored, being answered and deleted: never handed back, but held
    # (journal, heartbeat) until deleted or made visible.
    answering: bool = False
    # Being let go (hide): visible again before it is forgotten.
    letting_go: bool = False
    # The loads and model calls under way with it (at_risk), each by its own token: a
    # call's end takes off its own mark only, not one a later call set.
    risky_calls: set[int] = field(default_factory=set)
    # Being deleted (answered): not extended, nor warned of.
    deleting: bool = False

    @property
    def at_risk(self) -> bool:
        return bool(self.risky_calls)


class HeldMessages:
    """The request-queue messages one worker holds, by message id; thread-safe."""

    def __init__(self, aws: Aws, settings: Settings, worker_name: str,
                 journal: HeldJournal | None = None, who: str | None = None) -> None:
        self.aws = aws
        self.settings = settings
        self.worker_name = worker_name
        self.who = who or f"worker {worker_name}"  # in the logs
        # Written at each change, under _lock, so that the file follows the changes in order.
        self._journal = journal
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        # Orders the heartbeat's extensions against releases (see hide).
        self._visibility_lock = threading.Lock()
        # One hand-back at a time: the grace timer's waits for the main loop's to finish.
        self._handing_back = threading.Lock()
        # Tokens of the loads and model calls that mark what they hold at risk (at_risk).
        self._calls = itertools.count()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def jobs(self) -> list[Job]:
        """The jobs held now."""
        with self._lock:
            return [h.job for h in self._held.values()]

    def _holding(self, job: Job) -> _Held | None:
        """`job`'s record, if `job` itself is held (hold _lock). Not another job of its
        message id: a copy received again after a release let this one go is the next
        attempt's, and what is done with this job must not touch it."""
        held = self._held.get(job.message_id)
        return held if held is not None and held.job is job else None

    def _records_of(self, jobs: Iterable[Job]) -> list[_Held]:
        """The records of those of `jobs` held themselves (see _holding), in their order
        (hold _lock)."""
        return [h for h in map(self._holding, jobs) if h is not None]

    def hold(self, jobs: list[Job], hidden_s: int) -> list[Job]:
        """Start holding just-received messages, which their receive hid for `hidden_s`:
        the heartbeat keeps them hidden from now.

        The jobs newly held. One already held was received again while in hand (its
        visibility lapsed: extensions failed): the job in hand takes the new receipt,
        the old one being void, and this copy is not worked on twice. Held over it,
        the copy would be forgotten when the first finished."""
        fresh = []
        # Taken after the receive returned, so a few ms late: the journal's MARGIN_S covers it.
        hidden_until = wall_clock() + hidden_s
        with self._lock:
            for job in jobs:
                held = self._held.get(job.message_id)
                if held is None:
                    held = self._held[job.message_id] = _Held(job)
                    fresh.append(job)
                elif held.letting_go:
                    # Made visible by hide, which has yet to forget it: this receive is
                    # the next attempt. Taken for the copy in hand, nobody worked on it or
                    # kept it hidden, and it waited out its lease (a loaded CI machine).
                    # Its answering and deleting marks were the old attempt's: kept, the
                    # heartbeat would never extend this one, whose old delete, ending, forgets
                    # only the old job. Its at-risk marks stay until the calls that set them
                    # end (a kill meanwhile may be this image's doing).
                    held = self._held[job.message_id] = _Held(job, risky_calls=set(held.risky_calls))
                    fresh.append(job)
                else:
                    held.job.receipt = job.receipt
                    # SQS counted this receive: a release or hand-back must count it too.
                    held.job.receive_count = max(held.job.receive_count, job.receive_count)
                held.job.hidden_until = hidden_until
            self._record()
        return fresh

    def mark_answering(self, jobs: list[Job]) -> None:
        """These are being answered (their results stored): a stop must not hand them
        back too. Still held, so that a worker killed before their deletes leaves them in
        its journal, made visible within seconds, not after the visibility timeout."""
        with self._lock:
            for held in self._records_of(jobs):
                held.answering = True

    def forget(self, jobs: list[Job]) -> None:
        """Stop holding these: answered, or visible again."""
        with self._lock:
            removed = [h.job for h in self._records_of(jobs)]
            for job in removed:
                del self._held[job.message_id]
            # Written only on a change: a stop that comes while this worker shows what the
            # last one held (holding nothing yet) must leave that to the next.
            if removed:
                self._record()

    @contextmanager
    def at_risk(self, jobs: list[Job]) -> Iterator[None]:
        """Mark `jobs` as being loaded or in a model call: a worker killed now may have
        been killed by one of them, and its successor counts the attempt against each
        (show_held); the others it holds it hands back untried. One journal write as
        the call begins, one as it ends, for all of `jobs`: mark a batch together."""
        call = next(self._calls)
        with self._lock:
            records = self._records_of(jobs)
            newly = [h for h in records if not h.at_risk]
            for held in records:
                held.risky_calls.add(call)
            if newly:
                self._record()
        try:
            yield
        finally:
            with self._lock:
                # This call's marks, where they still are: on the record held now (one
                # received again meanwhile carries them), not on one forgotten since.
                ended = []
                for held in filter(None, (self._held.get(j.message_id) for j in jobs)):
                    if call in held.risky_calls:
                        held.risky_calls.discard(call)
                        if not held.risky_calls:
                            ended.append(held)
                if ended:
                    self._record()

    def _record(self) -> None:
        """Write what is held to the journal (hold _lock)."""
        if self._journal is not None:
            self._journal.record(HeldEntry(h.job.receipt, h.job.hidden_until, at_risk=h.at_risk,
                                           request=h.job.request_body, receive_count=h.job.receive_count)
                                 for h in self._held.values())

    def show_what_the_last_worker_held(self) -> None:
        """Make visible at once the messages the worker before this one here held when it
        died: as used attempts those it was loading or classifying, the others handed
        back untried (show_held). Call before receiving: the journal is this worker's own
        from its first receive."""
        if self._journal is None:
            return
        try:
            show_held(self._journal, self.aws, self.who, "the worker before it here")
        except AWS_ERRORS as exc:
            # AWS out of reach: the worker waits for it in its receive loop, as without a
            # journal; raised here, it would exit 1, to be restarted and fail alike.
            # What the journal names then waits for its visibility timeout.
            log.warning("worker %s: could not make visible again what the worker before it held (%s): "
                        "left to their visibility timeout", self.worker_name, exc)

    def delete(self, jobs: list[Job], why: str = "answered request(s), which will be answered again") -> None:
        """Delete answered requests from the queue, and stop holding them; `why` says
        what a request SQS would not delete is, in the warning.

        Marked as being deleted first: a heartbeat round then leaves them be, and one
        already under way does not warn that their receipts, gone stale, make them
        "another worker's now" when they were only answered here. Not ordered by the heartbeat's lock, as
        hide() is: a delete's slow SQS call (minutes at botocore's worst) would hold up
        the heartbeat's rounds past what HEARTBEAT_SLACK_S allows them."""
        with self._lock:
            for held in self._records_of(jobs):
                held.deleting = True
        for chunk in sqs_batches(jobs):
            reply = self.aws.sqs.delete_message_batch(
                QueueUrl=self.aws.request_queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": j.receipt} for i, j in enumerate(chunk)],
            )
            if reply.get("Failed"):
                # Answered already: nothing to undo. Such a request comes back after its
                # visibility timeout, is classified again, and its second answer ignored.
                codes = ", ".join(sorted({f.get("Code", "?") for f in reply["Failed"]}))
                log.warning("could not delete %d %s: %s", len(reply["Failed"]), why, codes)
        self.forget(jobs)

    def release(self, jobs: list[Job], at_least_s: int = 0) -> None:
        """This attempt failed: let the next one (here or elsewhere) have the messages,
        after a delay that grows with each attempt (see `retry_delay_s`), and is
        `at_least_s` long.

        Counts as a receive: after max_receive_count of them SQS moves a message
        to the dead-letter queue."""
        first = self.settings.retry_delay_s
        self.hide([(j, max(retry_delay_s(j.receive_count, first), at_least_s)) for j in jobs])

    def hide(self, hidden_for: list[tuple[Job, int]]) -> None:
        """Stop holding these jobs and hide each message for its seconds (0: visible now).

        Ordered against the heartbeat: an extension it had read before the jobs
        were forgotten must not land after this change and hide them for a whole
        visibility timeout. Forgotten after the change, so that a worker killed in between
        (systemd's kill, at the end of a stop's grace) still has them in its journal, for
        its successor to show, not hidden for the rest of their timeout.
        A receive in between (the fetch thread's) gets them as the next attempt (hold)."""
        with self._visibility_lock:
            with self._lock:
                for held in self._records_of(j for j, _ in hidden_for):
                    held.letting_go = True
            self._change_visibility(hidden_for)
            self.forget([j for j, _ in hidden_for])

    def extend(self, jobs: list[Job] | None = None) -> None:
        """Keep every held message (or only `jobs`, just received) hidden for another
        visibility timeout."""
        with self._visibility_lock:
            with self._lock:
                records = self._held.values() if jobs is None else self._records_of(jobs)
                held = [h.job for h in records if not h.deleting]
                receipts = {j.message_id: j.receipt for j in held}
            if not held:
                return
            asked_at = wall_clock()  # before the call, so a little early: the safe side
            lapsed = sum(1 for j in held if j.hidden_until <= asked_at)
            if lapsed:
                # Their lease ran out before this extension: another worker may have them.
                log.warning("%d request(s) held here were visible again before they were extended "
                            "(this worker or SQS stalled): they may be classified twice", lapsed)
            failures = self._change_visibility([(j, self.settings.visibility_timeout_s) for j in held],
                                               warn=False)  # below, but for the deleted
            failed = {f.receipt_handle for f in failures}
            # Deleted (answered), or received since by another receive: see is_stale_receipt.
            gone = {f.receipt_handle for f in failures if f.stale}
            with self._lock:
                # Being deleted meanwhile (answered here), or forgotten since: their receipts
                # gone stale say nothing of another worker.
                answered = {j.receipt for j in held if j.receipt in gone
                            and ((h := self._holding(j)) is None or h.deleting)}
                taken = []
                for job in held:
                    if job.receipt != receipts[job.message_id]:
                        continue  # received again meanwhile: its new receipt is the one that counts
                    if job.receipt in answered:
                        continue
                    if job.receipt in gone and self._holding(job):
                        # Its record dropped too: received here again later, it would be taken
                        # for one being answered, and not handed back at a stop.
                        del self._held[job.message_id]
                        taken.append(job)
                    elif job.receipt not in failed:
                        # Only what was extended: a message whose extension failed may be visible,
                        # or another worker's, by the time a successor reads the journal.
                        job.hidden_until = asked_at + self.settings.visibility_timeout_s
                self._record()
            _warn_of(f for f in failures if f.receipt_handle not in answered)
            if taken:
                # Answered by another worker, or received by one: handed back, each would be
                # classified once more. Still answered here if finished.
                log.warning("%d request(s) held here are no longer this worker's (their receipt is no "
                            "longer valid: another worker answered or received them, or a stall here "
                            "made them visible again): not handed back", len(taken))

    def hand_back(self, jobs: list[Job]) -> None:
        """Give messages we will not process back to the queue without using up an attempt.

        A worker that is stopping never tried these, so they are sent again as
        new messages (receive count 0) and the originals deleted; a worker
        scaled in three times must not push an innocent image into the
        dead-letter queue. The receives earlier copies used go with each
        (PRIOR_RECEIVES_ATTRIBUTE): one that crashed a worker is still
        classified alone, and its retry delay still grows. Should the delete
        fail after the send, the request is answered twice, which the web tier
        ignores by id.

        Hand-backs run one at a time, and each sends only jobs still held, so the
        grace timer and the main loop, which may both get here, never send one
        message twice. The jobs stay held (the heartbeat keeps them hidden) until
        each is deleted or made visible again.
        """
        with self._handing_back:
            with self._lock:
                mine = [h.job for h in self._records_of(jobs) if not h.answering]
            self._send_back(mine)

    def hand_back_all(self) -> None:
        """Hand back everything held (see hand_back: what another hand-back sends first
        is no longer held when this one's turn comes)."""
        self.hand_back(self.jobs())

    def make_visible_as_tried(self, tried: list[Job]) -> None:
        """Make `tried` visible at once, each as a used attempt, after any hand-back
        under way (of what it left held)."""
        with self._handing_back:
            with self._lock:
                tried = [h.job for h in self._records_of(tried)]
            self.hide([(j, 0) for j in tried])

    def _send_back(self, jobs: list[Job]) -> None:
        """Send each job's request again as a new message that carries the receives its
        earlier copies used, then delete its old copy; one that cannot be sent is made
        visible instead (a used attempt)."""
        if not jobs:
            return
        log.info("%s: handing back %d messages", self.who, len(jobs))
        for chunk in sqs_batches(jobs):
            try:
                reply = self.aws.sqs.send_message_batch(
                    QueueUrl=self.aws.request_queue_url,
                    # The request as this worker writes it, not the body received, which a
                    # sender may have padded to the queue's limit: SQS counts the attribute
                    # towards it too. (Only requests are held: each job has one.)
                    Entries=[_hand_back_entry(i, j) for i, j in enumerate(chunk)])
            except AWS_ERRORS as exc:
                log.warning("could not hand back %d messages (%s); making them visible", len(chunk), exc)
                self.hide([(j, 0) for j in chunk])
                continue
            sent = [chunk[int(ok["Id"])] for ok in reply.get("Successful", [])]
            self.hide([(j, 0) for j in chunk if j not in sent])
            try:
                # Sent back, its old copy still queued: two of the same, answered twice.
                self.delete(sent, why="handed-back request(s), now queued twice")
            except AWS_ERRORS as exc:
                # Not made visible as well: that would queue each twice at once. Back after
                # their timeout.
                log.warning("handed back %d messages, but could not delete their old copies (%s): "
                            "each is queued twice, and will be answered twice", len(sent), exc)
                self.forget(sent)

    def _change_visibility(self, hidden_for: list[tuple[Job, int]],
                           warn: bool = True) -> list[VisibilityFailure]:
        """Hide each job's message for its number of seconds from now (0: visible); the
        changes that failed (logged, with `warn`)."""
        failures = change_visibility(self.aws.sqs, self.aws.request_queue_url,
                                     [(j.receipt, seconds) for j, seconds in hidden_for])
        if warn:
            _warn_of(failures)
        return failures


def _warn_of(failures: Iterable[VisibilityFailure]) -> None:
    for reason, count in Counter(f.reason for f in failures).items():
        log.warning("could not change visibility of %d message(s): %s", count, reason)


def show_held(journal: HeldJournal, aws: Aws, who: str, whose: str) -> None:
    """Make visible at once the messages `journal` names as still hidden, then remove it;
    logged as `who` making visible what `whose` held. The next worker on the instance
    does it, and the local runner for a worker whose instance has ended (none will
    follow it).

    Those at risk when the worker ended (being loaded or in a model call) are made visible,
    each as a used attempt: one of them may have killed it. The others are handed back
    untried (as HeldMessages.hand_back does), so that a request that kills workers
    reaches the dead-letter queue alone, not with every batch-mate held beside it."""
    left = journal.read(now=wall_clock())
    shown, failures = 0, []
    for chunk in sqs_batches([e for e in left if not e.untried]):
        # Looked at again before each call: botocore's retries of the one before may
        # have taken long enough for a message to be visible, or another worker's, by now.
        now = wall_clock()
        receipts = [e.receipt for e in chunk if still_hidden(e.hidden_until, now)]
        failures += change_visibility(aws.sqs, aws.request_queue_url, [(r, 0) for r in receipts])
        shown += len(receipts)
    shown -= len(failures)
    handed_back, not_handed_back = _hand_back_untried([e for e in left if e.untried], aws, who)
    failures += not_handed_back
    # Only now: a worker stopped before this point leaves them to its successor.
    journal.remove()
    if not left:
        return
    log.info("%s: made %d request(s) visible again that %s held when it ended: %d being loaded or in a "
             "model call, as used attempts, %d handed back untried", who, shown + handed_back, whose,
             shown, handed_back)
    for reason, count in Counter(f.reason for f in failures).items():
        # Answered and deleted since, or received again by another worker: nothing to do.
        log.info("%s: %d of them could not be: %s", who, count, reason)


# How long a message a dead worker held stays hidden while it is handed back: should the
# one handing it back be killed meanwhile, or fail to delete it once its copy is sent, the
# message comes back after this (or the queue's visibility timeout, if shorter).
HANDING_BACK_S = 30


def _hand_back_untried(entries: list[HeldEntry], aws: Aws, who: str) -> tuple[int, list[VisibilityFailure]]:
    """Hand back these requests a dead worker held, untried: how many were, and those
    left alone.

    Each is hidden a little longer first, which tells that it is still the dead
    worker's to give: one answered and deleted (the kill came between the delete and
    the journal's write), or handed back already, would otherwise be queued again and
    classified again. One that cannot be is left alone, as one made visible is."""
    sender = HeldMessages(aws, aws.settings, who, who=who)
    # Never longer than any message a worker holds is hidden: a queue set to a short
    # timeout expects what goes astray back as soon.
    hide_s = min(HANDING_BACK_S, aws.settings.visibility_timeout_s)
    handed_back, failures = 0, []
    for chunk in sqs_batches(entries):
        now = wall_clock()  # as in show_held
        chunk = [e for e in chunk if still_hidden(e.hidden_until, now)]
        failed = change_visibility(aws.sqs, aws.request_queue_url,
                                   [(e.receipt, hide_s) for e in chunk])
        failures += failed
        gone = {f.receipt_handle for f in failed}
        # An id matters only to what a HeldMessages holds, and this one holds nothing.
        jobs = [Job(e.receipt, e.receipt, ClassifyRequest.from_json(e.request), receive_count=e.receive_count)
                for e in chunk if e.receipt not in gone]
        sender._send_back(jobs)
        handed_back += len(jobs)
    return handed_back, failures


def _hand_back_entry(n: int, job: Job) -> dict[str, Any]:
    """`job`'s request as entry `n` of a hand-back's SendMessageBatch."""
    entry: dict[str, Any] = {"Id": str(n), "MessageBody": job.request_body}
    # This receive was not an attempt: only the earlier ones count. None is left out, not
    # sent empty: SQS refused an empty map in its Query protocol ("must contain non-empty
    # message attribute name"), its JSON one does not document taking one, and the web
    # tier's sender leaves it out too.
    if attributes := prior_receives_attribute(job.receive_count - 1):
        entry["MessageAttributes"] = attributes
    return entry
