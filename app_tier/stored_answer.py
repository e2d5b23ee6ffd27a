"""The answer an earlier attempt stored for a request whose attempts are used up.

A worker stores each outcome (the result in the output bucket, or a failure tagged
on the input object) before it replies. One that died in between left an outcome
that stands: a worker failing a request whose copies used up MAX_RECEIVE_COUNT
attempts (app_tier/worker.py) sends that instead, as the web tier does for a dead
letter (web_tier/listeners.py) and a batch rebuilt from S3 shows it; both read it
through common/stored_outcome.py.
"""

from __future__ import annotations

import logging

from common.aws import Aws
from common.messages import ClassifyRequest, ClassifyResponse, Prediction
from common.stored_outcome import stored_outcome

log = logging.getLogger(__name__)


def stored_answer(aws: Aws, request: ClassifyRequest, untrained: bool) -> ClassifyResponse | None:
    """The reply the attempt that stored `request`'s outcome would have sent; None when
    nothing is stored, or when S3 cannot say (logged): the request is then failed as a
    dead letter, not held until S3 answers. `untrained`: this worker's model, taken for
    a failure, and for a result that does not say which model made it."""
    try:
        outcome = stored_outcome(aws, request.bucket, request.key, untrained)
    except Exception as exc:  # S3 failing, a right missing, anything: today's answer, said why
        log.warning("request %s: could not look for an outcome an earlier attempt stored (%s); "
                    "failing it as a dead letter", request.id, exc)
        return None
    if outcome is None:
        return None
    common = {"id": request.id, "filename": request.filename, "key": request.key, "worker": outcome.worker}
    if outcome.result is not None:
        result = outcome.result
        log.info("request %s: its attempts used up, answered with the result an earlier one stored",
                 request.id)
        return ClassifyResponse(label=result["label"], score=result["score"],
                                top5=tuple(Prediction(p["label"], p["score"]) for p in result["top5"]),
                                untrained=result["untrained"], **common)
    log.info("request %s: its attempts used up, answered with the failure an earlier one stored",
             request.id)
    return ClassifyResponse(error=outcome.error, untrained=untrained, **common)
