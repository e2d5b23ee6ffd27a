"""The fetch step: receive up to RECEIVE_BATCH requests, then download and decode
their images, so that the model gets a batch of pixels (`Fetcher.fetch`).

What cannot be read for a reason that may pass (S3 failing) is released for another
attempt; what can never be read (missing, too large, not an image, another bucket's)
is settled with the reason, to be answered with it. A request whose copies used up
their attempts is not read again: it is answered with what an earlier attempt stored,
or failed as a dead letter. Loads run on the io threads, fresh requests together and
each suspect alone (app_tier/risk_gate.py).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from app_tier.held import HeldMessages, prior_receives
from app_tier.images import BadImage, prepare
from app_tier.job import Job
from app_tier.risk_gate import AtRisk, suspect
from app_tier.stall_watch import FETCH_LOOP, StallWatch
from app_tier.stored_answer import stored_answer
from common.aws import Aws
from common.aws_errors import AWS_ERRORS, is_not_found
from common.config import Settings
from common.failure_tags import DEAD_LETTER_ERROR
from common.image_limits import too_large
from common.messages import PRIOR_RECEIVES_ATTRIBUTE, ClassifyRequest, MessageError
from common.names import original_filename
from common.sqs import FIRST_RECEIVED_ATTRIBUTE, first_received_s

log = logging.getLogger(__name__)

# How long a receive hides what it takes. The worker extends what it received to
# VISIBILITY_TIMEOUT at once, beside the downloads, and its heartbeat, every third of
# this, extends all it holds. A worker killed with a long poll open never sees what
# that poll takes (SQS, and moto, go on serving it): up to RECEIVE_BATCH requests sent
# after its death wait this long, not the whole VISIBILITY_TIMEOUT (60 s).
# The costs: an extension call per receive, and a stall of SQS longer than this between
# a receive and its extension hands those requests to another worker too.
RECEIVE_LEASE_S = 30


def receive_lease_s(settings: Settings) -> int:
    """How long a receive hides what it takes: RECEIVE_LEASE_S, or the visibility
    timeout if that is shorter."""
    return min(settings.visibility_timeout_s, RECEIVE_LEASE_S)


def names_another_bucket(request: ClassifyRequest, settings: Settings) -> bool:
    """Whether `request` names an object outside the input bucket: the web tier's
    requests name its uploads, so such a request is not its, and is never read."""
    return request.bucket != settings.input_bucket


@dataclass
class Batch:
    """Requests received together, and what became of each (Job)."""

    jobs: list[Job] = field(default_factory=list)

    @property
    def decoded(self) -> list[Job]:
        """The jobs whose image was read and decoded: those to classify."""
        return [j for j in self.jobs if j.pixels is not None]


class Fetcher:
    """Receives requests and prepares their pixels, for one worker: what it receives
    it holds (`held`), and what it cannot serve it releases or hands back."""

    def __init__(self, settings: Settings, aws: Aws, held: HeldMessages, *, untrained: bool,
                 stopping: threading.Event, received: threading.Event, stall_watch: StallWatch,
                 at_risk: AtRisk, io: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.aws = aws
        self.held = held
        # Whose answers stored_answer may take: an untrained model's are not a trained one's.
        self._untrained = untrained
        # The worker's: once set, nothing more is read, and what was received is handed back.
        self._stopping = stopping
        # The worker's: set at the first receive that succeeds (Worker.received).
        self._received = received
        self._stall_watch = stall_watch
        self._at_risk = at_risk
        self._io = io
        self.lease_s = receive_lease_s(settings)
        # The io threads download and decode in parallel, but large images one at a time.
        self._large_decodes = threading.Semaphore(1)

    def fetch(self) -> Batch:
        """Receive up to `receive_batch` requests and prepare their pixels."""
        received, foreign = self._receive()
        jobs = self.held.hold(received, self.lease_s)
        # Deleted once the requests beside them are held: botocore retrying a delete of
        # SQS's for minutes would otherwise leave them unextended past their lease.
        self._drop(foreign)
        if self._stopping.is_set():
            # Received as the stop came (a long poll outlives it): another worker's to
            # serve, at once, not after this one has read and decoded them for nobody.
            self.held.hand_back(jobs)
            return Batch([])
        return self._prepare(jobs)

    def _receive(self) -> tuple[list[Job], list[str]]:
        """One long poll's requests, as jobs with their attempts counted, and the receipt
        handles of the messages in it that are not requests (to be dropped)."""
        reply = self.aws.sqs_receive.receive_message(
            QueueUrl=self.aws.request_queue_url,
            MaxNumberOfMessages=self.settings.receive_batch,
            WaitTimeSeconds=self.settings.receive_wait_s,
            VisibilityTimeout=self.lease_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount", FIRST_RECEIVED_ATTRIBUTE],
            MessageAttributeNames=[PRIOR_RECEIVES_ATTRIBUTE],
        )
        # Ready (its instance tagged so): as soon as it can receive, not once what it
        # received is downloaded and decoded. Untagged meanwhile, its instance would be taken
        # for one holding no work, and scaled in before idle ones.
        self._received.set()
        jobs, foreign = [], []
        for msg in reply.get("Messages", []):
            try:
                request = ClassifyRequest.from_json(msg["Body"])
            except MessageError as exc:
                log.error("dropping a message that is not a request: %s", exc)
                foreign.append(msg["ReceiptHandle"])
                continue
            prior = prior_receives(msg)
            count = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", 1)) + prior
            job = Job(msg["MessageId"], msg["ReceiptHandle"], request, receive_count=count,
                      first_received=first_received_s(msg))
            if prior and count > self.settings.max_receive_count:
                # SQS counts a resent copy afresh: without this, every hand-back would
                # give a request that crashes workers max_receive_count more tries.
                log.warning("request %s has used its %d attempts; answering it with what an earlier "
                            "one stored, else failing it (released if S3 cannot say)", request.id,
                            self.settings.max_receive_count)
                job.attempts_used_up = True
            jobs.append(job)
        return jobs, foreign

    def _drop(self, receipts: list[str]) -> None:
        for receipt in receipts:
            try:
                self.aws.sqs.delete_message(QueueUrl=self.aws.request_queue_url, ReceiptHandle=receipt)
            except AWS_ERRORS as exc:  # it comes back, and is dropped again
                log.warning("could not delete a message that is not a request: %s", exc)

    def _prepare(self, jobs: list[Job]) -> Batch:
        """The jobs held, their images downloaded and decoded; those that could not be
        read are released for another attempt (or handed back, if the stop came)."""
        # Hidden for the receive's lease only: extended now, beside their downloads, so
        # that a stall of this worker or of SQS before the next heartbeat does not hand
        # them to another worker too (a 16 s pause would classify a quarter of a batch twice).
        extending = self._io.submit(self.held.extend, jobs) if jobs else None
        try:
            self._load(jobs)
        except BaseException:
            self.held.release(jobs)  # held, the heartbeat would hide them forever
            raise
        finally:
            if extending is not None:
                try:
                    extending.result()
                except Exception:  # a bug, not SQS (whose failures extend() logs): the heartbeat extends
                    log.exception("could not extend the requests just received")
        unreadable = [j for j in jobs if not j.settled]
        if self._stopping.is_set() and unreadable:
            self.held.hand_back(unreadable)  # not read: the stop came first (see _load)
        elif unreadable:
            # Not read, for a reason that may pass (S3 failed after botocore's retries):
            # another attempt, a little later; after max_receive_count, the dead-letter queue.
            self.held.release(unreadable)
        return Batch([j for j in jobs if j not in unreadable])

    def _load(self, jobs: list[Job]) -> None:
        """Download and decode the jobs' images: the fresh ones together, each on an io
        thread (at risk together: one journal write before, one after, see
        Worker._at_risk), then each suspect alone. Downloads are at risk too: a request
        may name an object too large to hold, and a kill then must cost it an attempt,
        or it came back for ever."""
        fresh = [job for job in jobs if not suspect(job)]
        if fresh:
            with self._at_risk(fresh):
                list(self._io.map(self._load_one, fresh))
        for job in jobs:
            if suspect(job):
                with self._at_risk([job]):
                    self._load_one(job)

    def _load_one(self, job: Job) -> None:
        data = self._download(job)
        if data is not None:
            self._decode(job, data)

    def _download(self, job: Job) -> bytes | None:
        """The job's image; None if there is none to decode (the job may be settled)."""
        if self._stopping.is_set():
            return None  # handed back unread by fetch
        if names_another_bucket(job.request, self.settings):
            # Reading it could serve whatever the role may read (the results).
            job.error = (f"the request names bucket {job.request.bucket!r}, not this service's "
                         f"input bucket ({self.settings.input_bucket})")
            return None
        if job.attempts_used_up:
            self._answer_from_storage(job)
            return None
        try:
            obj = self.aws.s3.get_object(Bucket=job.request.bucket, Key=job.request.key)
            size = obj.get("ContentLength", 0)
            if size > self.settings.max_upload_bytes:
                # Not the web tier's upload (it stores none so large): read whole, an object
                # of gigabytes would cost the worker its memory, and the request an attempt
                # per out-of-memory kill, until it is dead-lettered without a word.
                obj["Body"].close()
                job.error = too_large(self.settings.max_upload_bytes)
                return None
            data = obj["Body"].read()
            job.filename = original_filename(obj.get("Metadata", {}))
        except ClientError as exc:
            if is_not_found(exc):
                job.error = "the uploaded image is missing from the input bucket"
            else:
                log.warning("cannot read %s: %s", job.request.key, exc)
            return None
        except BotoCoreError as exc:
            log.warning("cannot read %s: %s", job.request.key, exc)
            return None
        except Exception:  # whatever it is, this job's alone: not its batch-mates' (fetch)
            log.exception("cannot read %s", job.request.key)
            return None
        return data

    def _decode(self, job: Job, data: bytes) -> None:
        if self._stopping.is_set():
            return  # handed back undecoded by fetch (a suspect may have waited its turn)
        try:
            # Watched while decoding, not while waiting its turn for a large decode.
            job.pixels = prepare(data, self.settings.max_image_pixels, self._large_decodes,
                                 watch=lambda: self._stall_watch.must_end("decode", [job], FETCH_LOOP))
        except BadImage as exc:
            job.error = str(exc)
        except Exception:  # e.g. MemoryError: maybe not the image's fault, so not its answer
            log.exception("could not prepare %s", job.request.key)

    def _answer_from_storage(self, job: Job) -> None:
        """A request whose attempts are used up is not read again. An earlier attempt
        may have stored its outcome and died before replying: that answer stands. With
        nothing stored, it fails as a dead letter."""
        # Where the lookup fails, the job is left unsettled, so released (fetch), not failed
        # on a guess, which would contradict (and overwrite) an outcome stored. Another
        # attempt looks again; once this copy's own receives reach max_receive_count, SQS
        # moves it to the dead-letter queue, whose reader (web_tier/listeners.py) looks too.
        try:
            job.stored_answer = stored_answer(self.aws, job.request, self._untrained)
        except AWS_ERRORS as exc:  # S3 failing, or a right missing
            log.warning("request %s: could not look for an outcome an earlier attempt stored (%s); "
                        "releasing it", job.request.id, exc)
            return
        except Exception:  # not S3's doing: a bug, or a stored outcome this code cannot read
            log.exception("request %s: could not read the outcome an earlier attempt stored; "
                          "releasing it", job.request.id)
            return
        if job.stored_answer is None:
            job.error = DEAD_LETTER_ERROR
