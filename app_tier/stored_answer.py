"""The answer an earlier attempt stored for a request answered again.

A worker stores each outcome (the result in the output bucket, or a failure tagged
on the input object) before it replies. One that died in between left an outcome
that stands: a worker sends that instead of failing a request whose copies used up
MAX_RECEIVE_COUNT attempts, or a request another copy of which stored a result
(app_tier/finish.py: a second result is not stored either), as the web tier does for a dead
letter (web_tier/listeners.py) and a batch rebuilt from S3 shows it; both read it
through common/stored_outcome.py.
"""

from __future__ import annotations

import dataclasses
import logging

from common.aws import Aws
from common.messages import ClassifyRequest, ClassifyResponse, Prediction, clip_for_json
from common.stored_outcome import stored_outcome

log = logging.getLogger(__name__)

# Room for a label in a reply beside the longest id, key and file name a request holds.
_LABEL_BYTES = 200
_WORKER_BYTES = 64


def stored_answer(aws: Aws, request: ClassifyRequest, untrained: bool,
                  result_only: bool = False) -> ClassifyResponse | None:
    """The reply the attempt that stored `request`'s outcome would have sent; None when
    nothing is stored. S3's errors raise. `untrained`: this worker's model, taken for a
    failure, and for a result that does not say which model made it. `result_only`:
    a failure marked is not looked for (one call fewer; None then)."""
    outcome = stored_outcome(aws, request.bucket, request.key, untrained, failure_looked_for=not result_only)
    if outcome is None:
        return None
    common = {"id": request.id, "filename": request.filename, "key": request.key, "worker": outcome.worker}
    if outcome.result is None:
        log.info("request %s: found the failure an earlier attempt stored", request.id)
        return sendable(ClassifyResponse(error=outcome.error, untrained=untrained, **common))
    result = outcome.result
    log.info("request %s: found the result an earlier attempt stored", request.id)
    return sendable(ClassifyResponse(label=result["label"], score=result["score"],
                                      top5=tuple(Prediction(p["label"], p["score"]) for p in result["top5"]),
                                      untrained=result["untrained"], **common))


def sendable(answer: ClassifyResponse) -> ClassifyResponse:
    """`answer`, or, too long for a message, with its label and worker cut and no top 5:
    an outcome not written by this service's workers (whose own reply held the same)
    can hold more than a reply takes (S3 metadata 2 KB, a tag 256 characters, a
    message 1 KB), and so can one of this worker's with a long host name for its
    worker. The output object, or the failure mark, has it all."""
    try:
        answer.to_json()
    except ValueError:
        return dataclasses.replace(answer, label=answer.label and clip_for_json(answer.label, _LABEL_BYTES),
                                   worker=clip_for_json(answer.worker, _WORKER_BYTES), top5=())
    return answer
