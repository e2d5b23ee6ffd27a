"""The model step: classify a batch's pixels and make each job's response
(`BatchClassifier.responses_for`).

Fresh requests are classified as one batch, each suspect alone
(app_tier/risk_gate.py). An image the model fails on is answered with the failure,
unless the model fails on a plain input too: then the fault is the worker's
(`ModelFault`), and the batch goes back to be tried again.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from app_tier.fetch import Batch
from app_tier.job import Job
from app_tier.model import Classification, Classifier
from app_tier.risk_gate import AtRisk, suspect
from app_tier.stall_watch import MAIN_LOOP, StallWatch
from common.messages import ClassifyResponse

log = logging.getLogger(__name__)


class ModelFault(RuntimeError):
    """The model failed on an image and on a plain input made to check it: the worker's
    fault, not the image's. Its batch is released, to be tried again."""


class ModelOutOfMemory(ModelFault):
    """A model call ran short of memory: the machine's fault, never the image's (every
    input has the same shape). Its batch is released, its images to be tried again one
    at a time, which takes less memory."""


class BatchClassifier:
    """Runs one worker's model over its batches, on the serving thread."""

    def __init__(self, classifier: Classifier, instance_id: str, *, stall_watch: StallWatch,
                 at_risk: AtRisk) -> None:
        self.classifier = classifier
        self.instance_id = instance_id  # each response names the worker that made it
        self._stall_watch = stall_watch
        self._at_risk = at_risk
        # Whether the model answered an input of the last batch: one it was never given
        # (its images unreadable, or answered before) says nothing of the model.
        self.model_answered = False

    def responses_for(self, batch: Batch) -> list[tuple[Job, ClassifyResponse]]:
        """Every job's response: its classification, or why it has none."""
        by_id = self._classify(batch.decoded)
        responses = []
        for job in batch.jobs:
            req = job.request
            # What every response for this request says, classified or not.
            fields = {"id": req.id, "filename": req.filename, "key": req.key,
                      "worker": self.instance_id, "untrained": self.classifier.untrained}
            result = by_id.get(job.message_id)
            if job.stored_answer is not None:
                responses.append((job, job.stored_answer))
            elif result is not None:
                responses.append((job, ClassifyResponse(label=result.label, score=result.score,
                                                         top5=result.top5, **fields)))
            else:
                responses.append((job, ClassifyResponse(error=job.error or "not classified", **fields)))
        return responses

    def _classify(self, jobs: list[Job]) -> dict[str, Classification]:
        """Results by message id. A message seen before may have crashed a worker:
        it is classified alone, so that it cannot take its batch-mates down again
        (and with them into the dead-letter queue)."""
        fresh = [j for j in jobs if not suspect(j)]
        groups_to_try = deque([fresh] if fresh else [])
        groups_to_try.extend([j] for j in jobs if suspect(j))
        results: dict[str, Classification] = {}
        self.model_answered = False
        while groups_to_try:
            group = groups_to_try.popleft()
            try:
                with self._at_risk(group), self._stall_watch.must_end("model call", group, MAIN_LOOP):
                    out = self.classifier.classify(np.stack([j.pixels for j in group]))
            except Exception as exc:  # a model error on this input, not a worker fault...
                if _out_of_memory(exc):
                    # ...unless the machine ran short: the batch goes back, to be tried again.
                    raise ModelOutOfMemory(f"the model ran out of memory on {len(group)} "
                                           f"image(s): {exc}") from exc
                if len(group) > 1:
                    groups_to_try.extend([j] for j in group)  # one at a time, to find the image at fault
                    continue
                # ...nor one that fails whatever its input (a runtime fault): every image
                # of the batch would be answered "classification failed", for good. Looked
                # at for each image that fails alone: the model's answer to another a moment
                # before says nothing of it now (a suspect may have left the runtime broken,
                # a passing fault come back).
                if not self._model_answers_a_plain_input(group):
                    raise ModelFault(f"the model failed on {group[0].request.key} and on a plain "
                                     "input") from exc
                self.model_answered = True
                log.error("classification of %s failed: %s", group[0].request.key, exc)
                group[0].error = f"classification failed: {exc}"
                continue
            self.model_answered = True
            results.update({j.message_id: r for j, r in zip(group, out, strict=True)})
        return results

    def _model_answers_a_plain_input(self, failed: list[Job]) -> bool:
        """Whether the model classifies a plain grey input, after it failed on `failed`'s
        image: if it does, that image is at fault. A hang or crash here, just after that
        image made the model fail, is most likely its doing too (a runtime it left broken),
        and costs it an attempt: charged to no image, it had every worker hand the image
        back untried and hang on it again, for good, never reaching the dead-letter queue."""
        try:
            with self._at_risk(failed), self._stall_watch.must_end("model call", failed, MAIN_LOOP):
                self.classifier.classify(np.zeros((1, *failed[0].pixels.shape), np.float32))
        except Exception as exc:
            if _out_of_memory(exc):  # the machine's fault, as for any call (ModelOutOfMemory)
                raise ModelOutOfMemory(f"the model ran out of memory on a plain input: {exc}") from exc
            log.exception("the model fails on a plain input too")
            return False
        return True


def _out_of_memory(exc: BaseException) -> bool:
    """Whether a model call failed for want of memory, as each runtime says it:
    Python's MemoryError, OpenVINO's std::bad_alloc (a RuntimeError), TensorFlow's
    ResourceExhaustedError. Another process's peak may pass; the input is not at fault."""
    return (isinstance(exc, MemoryError) or "bad_alloc" in str(exc)
            or type(exc).__name__ == "ResourceExhaustedError")
