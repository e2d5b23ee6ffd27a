"""The finish step: store each outcome, then reply, then delete the requests
(`Finisher.finish`).

A result is stored in the output bucket, a failure tagged on the input object, before
any answer goes out: whoever gets the answer can read it from S3, and a batch rebuilt
from S3 shows it. A request whose outcome could not be stored, or whose answer could
not be sent, is released for another attempt, alone.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from botocore.exceptions import ClientError

from app_tier.fetch import names_another_bucket
from app_tier.held import HeldMessages
from app_tier.job import Job
from app_tier.replies import Replies
from app_tier.stored_answer import stored_answer
from common.aws import Aws
from common.aws_errors import AWS_ERRORS, error_code, is_callers_fault
from common.config import MARK_DENIED_RETRY_DELAY_S, Settings
from common.failure_tags import MarkDenied, give_up_denied_mark, mark_failed
from common.messages import ClassifyResponse
from common.names import stored_name
from common.output_object import pair_text, result_metadata

log = logging.getLogger(__name__)


class StoreRefused(Exception):
    """S3 refused a result's write for a fault of the caller's (is_callers_fault): the
    role lacks s3:PutObject on the output bucket, or the bucket is not there. No retry
    mends that, unlike S3 failing or throttling."""

    def __init__(self, bucket: str, key: str, exc: ClientError) -> None:
        lacking = (f"the output bucket {bucket} does not exist" if error_code(exc) == "NoSuchBucket"
                   else f"this role needs s3:PutObject on arn:aws:s3:::{bucket}/*")
        super().__init__(f"S3 refused writing {key}: {lacking} ({exc})")


@dataclass(frozen=True)
class Stores:
    """What a batch's result writes showed of the worker's own rights."""

    wrote: bool = False  # S3 took a result's write (or said one was stored: it checks rights first)
    # Why every result write of the batch was refused, if every one was (StoreRefused).
    refused: StoreRefused | None = None


class Finisher:
    """Finishes one worker's batches, on its finishing thread; the stores run on its
    io threads."""

    def __init__(self, settings: Settings, aws: Aws, held: HeldMessages, replies: Replies, *,
                 instance_id: str, untrained: bool, io: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.aws = aws
        self.held = held
        self.replies = replies
        self.instance_id = instance_id  # on the failure tag
        # Whose answers stored_answer may take: an untrained model's are not a trained one's.
        self._untrained = untrained
        self._io = io
        self.processed = 0  # images classified here and answered

    def finish(self, responses: list[tuple[Job, ClassifyResponse]]) -> Stores:
        """Write each result, then reply, then delete the requests; what the writes
        showed of this worker's rights (the worker gives up on refusals that last).

        A reply means the result is in the output bucket: whoever gets the
        answer can read the pair at once. A request whose result could not be
        written, or whose answer could not be sent, is released for another
        attempt, alone: its batch-mates are answered and deleted as usual. One whose
        result S3 refused is handed back untried, unless S3 took a batch-mate's: the
        fault is then this worker's, not the request's, and another may store it.
        """
        stores = [(job, response, self._io.submit(self._store, job, response)) for job, response in responses]
        unstored, denied, refused, stored = [], [], [], {}
        last_refusal: StoreRefused | None = None
        wrote = False
        for job, _, store in stores:
            try:
                stored[job.message_id], wrote_one = store.result()
                wrote = wrote or wrote_one
            except StoreRefused as exc:
                log.error("could not write the result of %s: %s", job.request.key, exc)
                refused.append(job)
                last_refusal = exc
            except MarkDenied as exc:  # not given up yet (_store): tried again, later than most
                log.warning("could not mark %s failed; tried again in %d s or more: %s", job.request.key,
                            MARK_DENIED_RETRY_DELAY_S, exc)
                denied.append(job)
            except Exception as exc:  # S3, after botocore's retries: tried again later
                log.warning("could not write the result of %s: %s", job.request.key, exc)
                unstored.append(job)
        if wrote:
            # This worker may write: what S3 refused is the key's doing (a policy
            # that denies part of the bucket), and spends an attempt like a failure.
            unstored += refused
        elif refused:
            # Released, each would spend an attempt at every worker lacking the right,
            # and reach the dead-letter queue with nothing wrong in it.
            self.held.hand_back(refused)
        if unstored or denied:
            # Only these: releasing the whole batch would spend an attempt of each request
            # towards the dead-letter queue for one S3 failure.
            self.held.release(unstored)
            self.held.release(denied, at_least_s=MARK_DENIED_RETRY_DELAY_S)
        responses = [(job, stored[job.message_id]) for job, _ in responses if job.message_id in stored]
        # Committed: these are answered now, so a shutdown must not hand them back too.
        self.held.mark_answering([job for job, _ in responses])
        unsent = self.replies.send(responses)
        unsent_ids = {job.message_id for job in unsent}
        sent = [(job, r) for job, r in responses if job.message_id not in unsent_ids]
        answered = [job for job, _ in sent]
        # Classified here: not the answers an earlier attempt stored.
        self.processed += sum(1 for job, r in sent if r.ok and job.stored_answer is None)
        if unsent:
            log.warning("could not send the answers to %d of %d request(s); releasing those",
                        len(unsent), len(responses))
            self.held.release(unsent)
        try:
            self.held.delete(answered)
        except AWS_ERRORS as exc:
            # Answered: released, each would be answered again at every retry until the
            # dead-letter queue. Back after their visibility timeout, once.
            self.held.forget(answered)
            log.warning("answered %d request(s) but could not delete them (%s): they will be "
                        "answered again", len(answered), exc)
        return Stores(wrote=wrote, refused=None if wrote else last_refusal)

    def _store(self, job: Job, response: ClassifyResponse) -> tuple[ClassifyResponse, bool]:
        """Store the outcome of `job`; the answer to send (`response`, or the result
        another copy of the request stored first), and whether S3 took a result's write
        (or said one was stored: it checks rights first), which says this worker may
        write results."""
        req = job.request
        if job.stored_answer is not None:
            return response, False  # stored by the attempt that made it
        if names_another_bucket(req, self.settings):
            return response, False  # failed unread (Fetcher._download): its key is no upload of ours
        if response.ok:
            return self._store_result(job, response), True
        return self._store_failure(job, response), False

    def _store_result(self, job: Job, response: ClassifyResponse) -> ClassifyResponse:
        """Write the `image,label` pair to the output bucket, unless a result is there."""
        req = job.request
        try:
            self.aws.s3.put_object(
                Bucket=self.settings.output_bucket,
                Key=req.key,
                Body=pair_text(job.filename or req.filename or stored_name(req.key), response.label).encode(),
                # Names are UTF-8: without a charset, a browser or the S3 console may
                # show "猫" as three Latin-1 characters.
                ContentType="text/plain; charset=utf-8",
                Metadata=result_metadata(response),
                # Only the first result is stored, as the web tier keeps only the first
                # answer: a second copy overwriting it, classified by another model
                # (a rollout, the other runtime), left S3 and the answer given differing.
                IfNoneMatch="*",
            )
        except ClientError as exc:
            # 412: a result is stored (another copy's, or this put's own, tried again
            # after a timeout). 409: another put of it is under way (real S3).
            if error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                if is_callers_fault(exc):
                    raise StoreRefused(self.settings.output_bucket, req.key, exc) from exc
                raise
            stored = stored_answer(self.aws, req, self._untrained, result_only=True)
            if stored is None:
                # Not there (yet, or any more): no answer without a stored result. Raised,
                # the request is released and tried again.
                raise RuntimeError(f"a result for {req.key} was being stored, and none is") from exc
            log.info("request %s: a result was stored first; answering with it", req.id)
            return stored
        return response

    def _store_failure(self, job: Job, response: ClassifyResponse) -> ClassifyResponse:
        """Mark the input object failed, with the reason, unless a result is stored."""
        req = job.request
        # A copy whose worker stored a result and died before replying: its result
        # stands, not this attempt's failure (the model ran short of something, the
        # upload deleted since), as it would against a result of this attempt's.
        stored = stored_answer(self.aws, req, self._untrained, result_only=True)
        if stored is not None:
            log.info("request %s: failed here, answered with the result stored first", req.id)
            return stored
        # The failure is kept on the input object so the web tier can rebuild it. If
        # S3 is failing or throttling, this raises: as for a result not written,
        # nothing is sent and the request is tried again. Answered untagged, a batch
        # rebuilt after a restart would show it queued for ever.
        try:
            why_not = mark_failed(self.aws.s3, req.bucket, req.key, response.error or "", self.instance_id)
        except MarkDenied as exc:
            # Denied: tried again as S3 failing is (a role just given the right may
            # not have it everywhere yet), until the request's last attempt, whose
            # release would send it to the dead-letter queue, and the reason with it.
            if not give_up_denied_mark(req.id, exc, job.first_received, time.time(),  # SQS's clock
                                       attempt=job.receive_count,
                                       last_attempt=job.receive_count >= self.settings.max_receive_count):
                raise
            return response
        if why_not:
            log.warning("could not tag failed input %s: %s", req.key, why_not)
        return response
