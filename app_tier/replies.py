"""The worker's answers, sent on the response queue.

Sent after the results are stored and before the requests are deleted (see
`Finisher.finish`). What could not be sent is the caller's to release, so that
another attempt answers it: nothing here deletes or releases a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from app_tier.job import Job
from app_tier.stored_answer import sendable
from common.aws import Aws
from common.aws_errors import AWS_ERRORS
from common.messages import ClassifyResponse
from common.sqs import sqs_batches

log = logging.getLogger(__name__)

# Pauses before sending again the answers SQS reported failed on its side (a
# SendMessageBatch entry can fail alone, which botocore does not retry): one a try.
REPLY_RETRY_PAUSES_S = (0.1, 0.5)


class Replies:
    def __init__(self, aws: Aws) -> None:
        self.aws = aws

    def send(self, responses: Sequence[tuple[Job, ClassifyResponse]]) -> list[Job]:
        """Send the answers; the jobs whose answers could not be sent. Each call's failure
        is its own: the chunks after a chunk that could not be sent still are."""
        unsent: list[Job] = []
        for chunk in sqs_batches(responses):
            unsent.extend(self._send_chunk(chunk))
        return unsent

    def _send_chunk(self, chunk: Sequence[tuple[Job, ClassifyResponse]]) -> list[Job]:
        """One SendMessageBatch of answers, the entries SQS failed on its side sent again
        (REPLY_RETRY_PAUSES_S); the jobs whose answers were not sent. An entry refused as
        the sender's fault is not sent again: it would be refused again."""
        pending, refused = {}, []
        for i, (job, response) in enumerate(chunk):
            # Each encoded alone: one answer too long for a message (to_json's ValueError)
            # had every answer of its batch released, and its next batch-mates' too.
            try:
                pending[str(i)] = (job, sendable(response).to_json())
            except ValueError as exc:
                log.error("request %s: its answer cannot be sent: %s", job.request.id, exc)
                refused.append(job)
        for pause_s in (None, *REPLY_RETRY_PAUSES_S):
            if not pending:
                break
            if pause_s is not None:
                time.sleep(pause_s)
            try:
                reply = self.aws.sqs.send_message_batch(
                    QueueUrl=self.aws.response_queue_url,
                    Entries=[{"Id": i, "MessageBody": body} for i, (_, body) in pending.items()])
            except Exception as exc:  # the network, or SQS after botocore's retries
                if isinstance(exc, AWS_ERRORS):
                    log.warning("could not send %d answer(s): %s", len(pending), exc)
                else:
                    log.exception("could not send %d answer(s)", len(pending))
                break  # what an earlier call of this loop sent stays sent
            for ok in reply.get("Successful", []):
                pending.pop(ok["Id"], None)
            failures = reply.get("Failed", [])
            if failures:
                codes = ", ".join(sorted({f.get("Code", "?") for f in failures}))
                log.warning("SQS did not take %d answer(s): %s", len(failures), codes)
            for failed in failures:
                if failed.get("SenderFault") and failed["Id"] in pending:
                    refused.append(pending.pop(failed["Id"])[0])
        # Left pending: failed every time, in neither list (unknown, so not deleted), or
        # its call raised.
        return refused + [job for job, _ in pending.values()]
