"""ResNet-50 (ImageNet): the Keras network, run by TensorFlow or OpenVINO.

`MODEL_WEIGHTS` chooses the weights:
  imagenet          the Keras cache (~/.keras/models), downloaded once where the
                    internet is reachable;
  /path/to/file.h5  a local weights file;
  s3://bucket/key   a weights file in S3, copied to the Keras cache and fetched
                    again when S3 holds another upload at that key;
  random            untrained weights from a fixed seed, for tests and offline
                    demos. Every answer is then flagged `untrained`.

`MODEL_RUNTIME` chooses what runs it:
  openvino (default) the same Keras network converted once to OpenVINO's IR
                    and cached on disk (see app_tier/openvino_runtime.py):
                    it starts several times faster than TensorFlow, in about
                    half the memory (README, Speed, has the figures);
  tensorflow        the Keras network through one traced tf.function.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app_tier.labels import imagenet_labels
from common.aws import NOT_FOUND_CODES
from common.config import MODEL_RUNTIMES, RANDOM_WEIGHTS, weights_on_this_host
from common.messages import Prediction

if TYPE_CHECKING:  # each imported only where it is used: TensorFlow takes seconds
    import keras
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
# Fixed so that every worker (and a test) builds the very same untrained network.
RANDOM_WEIGHTS_SEED = 546


class WeightsUnavailable(RuntimeError):
    """The requested weights cannot be loaded; the message says what to set."""


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    top5: tuple[Prediction, ...]


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _missing_weights_message(detail: str) -> str:
    return (
        f"ResNet-50 ImageNet weights are not available: {detail}\n"
        f"Do one of these:\n"
        f"  - put {WEIGHTS_FILE} in {keras_cache_dir()}/ (Keras downloads it there "
        f"once when the internet is reachable), or\n"
        f"  - set MODEL_WEIGHTS=/path/to/{WEIGHTS_FILE}, or\n"
        f"  - set MODEL_WEIGHTS=s3://<bucket>/<key> of that file, or\n"
        f"  - set MODEL_WEIGHTS=random for an UNTRAINED network (tests and offline demos "
        f"only: its labels are meaningless)."
    )


# S3's answers that no later start of the worker can change: the operator must act
# (WeightsUnavailable, exit 78, not restarted). Anything else (S3 failing, no route
# yet, credentials not yet there at first boot) raises as it is: systemd restarts.
WEIGHTS_NOT_THERE = NOT_FOUND_CODES | {"403", "AccessDenied", "AllAccessDisabled"}


def _s3_identity(head: dict) -> dict:
    """What tells one upload of an object from another, as recorded beside its copy."""
    return {"etag": head["ETag"], "size": head["ContentLength"],
            "last_modified": head["LastModified"].isoformat()}


def _recorded_identity(sidecar: Path) -> dict | None:
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None  # none yet (a copy by an older worker), or unreadable: fetch again


def weights_s3_client() -> BaseClient:
    """The S3 client weights are fetched with: the service's own session and retries
    (common.aws), endpoint and credentials from boto3's defaults, as for every client."""
    from common.aws import client_config, new_session

    return new_session().client("s3", config=client_config())


def _fetch_s3_weights(uri: str) -> Path:
    """The local copy of an S3 weights file, fetched again when S3 holds another upload.

    Each start asks S3 (HEAD) for the object's ETag, size and time of upload and
    compares them with those recorded beside the copy when it was fetched: new
    weights uploaded at the same key reach every worker at its next start, and
    the 100 MB file is neither downloaded nor hashed while it is unchanged.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from common.aws import error_code

    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise WeightsUnavailable(_missing_weights_message(f"{uri!r} is not s3://bucket/key"))
    target = keras_cache_dir() / f"s3-{bucket}-{key.replace('/', '_')}"
    sidecar = target.with_name(f"{target.name}.s3.json")
    s3 = weights_s3_client()
    try:
        current = _s3_identity(s3.head_object(Bucket=bucket, Key=key))
    except (BotoCoreError, ClientError) as exc:
        if target.exists():
            # A worker that cannot ask S3 (no route, no credentials yet, access taken
            # away) still serves the weights it fetched before, rather than none.
            log.warning("using %s, the copy of %s fetched earlier, without knowing whether S3 "
                        "now holds other weights there: S3 could not be asked (%s)", target, uri, exc)
            return target
        if isinstance(exc, ClientError) and error_code(exc) in WEIGHTS_NOT_THERE:
            raise WeightsUnavailable(_missing_weights_message(f"cannot download {uri}: {exc}")) from exc
        raise  # S3 failing (throttled, 5xx, unreachable): another start may well succeed
    if target.exists() and _recorded_identity(sidecar) == current:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Workers starting together on one machine (the local stack) download it once.
    with open(target.parent / ".s3-fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and _recorded_identity(sidecar) == current:
            return target
        partial = target.with_suffix(".part")
        try:
            s3.download_file(bucket, key, str(partial))
        except ClientError as exc:
            if error_code(exc) not in WEIGHTS_NOT_THERE:
                raise  # S3 failing (throttled, 5xx): another start may well succeed
            raise WeightsUnavailable(_missing_weights_message(f"cannot download {uri}: {exc}")) from exc
        # No record while the copy is replaced: a copy without one is fetched again.
        # Should the object change between the HEAD and the download, the record
        # names the older upload, and the next start fetches it once more.
        sidecar.unlink(missing_ok=True)
        partial.rename(target)
        record = sidecar.with_suffix(".part")
        record.write_text(json.dumps(current))
        record.rename(sidecar)
    log.info("fetched %s to %s", uri, target)
    return target


def weights_file(weights: str) -> Path | None:
    """The file these weights load from: for s3://, the local copy, brought up to date
    first; None for imagenet and random (Keras's own cache, and a seed)."""
    if weights.startswith("s3://"):
        return _fetch_s3_weights(weights)
    return Path(weights) if weights_on_this_host(weights) else None


def build_network(weights: str, file: Path | None = None) -> keras.Model:
    """The Keras ResNet-50 with the requested weights loaded (imports TensorFlow).

    `file`: `weights_file(weights)` when the caller has it already, so that an
    s3:// object is not checked (and perhaps fetched) a second time.
    """
    import keras

    if weights == RANDOM_WEIGHTS:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        return keras.applications.ResNet50(weights=None)
    if weights == "imagenet":
        cached = keras_cache_dir() / WEIGHTS_FILE
        if not cached.exists():
            log.info("ImageNet weights not cached; asking Keras to download them")
        try:
            return keras.applications.ResNet50(weights="imagenet")
        except Exception as exc:  # Keras raises several kinds when offline
            detail = (f"{cached} could not be read ({exc}): delete it, and Keras downloads it again"
                      if cached.exists() else f"download failed ({exc})")
            raise WeightsUnavailable(_missing_weights_message(detail)) from exc
    path = file or weights_file(weights)
    if not path.is_file():
        raise WeightsUnavailable(_missing_weights_message(f"no file at {path}"))
    model = keras.applications.ResNet50(weights=None)
    try:
        model.load_weights(str(path))
    except Exception as exc:  # h5py's OSError, Keras's ValueError for another network's...
        # Loading it again would fail the same way: this is no crash to restart after.
        copy = f" (a copy of {weights}: delete it to fetch it again)" if weights.startswith("s3://") else ""
        raise WeightsUnavailable(_missing_weights_message(
            f"{path}{copy} is not a ResNet-50 weights file Keras can read ({exc})")) from exc
    return model


class Classifier:
    """Top-5 over ImageNet classes for a batch; subclasses supply `probabilities`."""

    untrained: bool
    weights: str
    load_seconds: float = 0.0

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def classify(self, batch: np.ndarray) -> list[Classification]:
        """Top-1 label, its score and the top 5, for each image in an (N,224,224,3) batch."""
        if len(batch) == 0:
            return []
        labels = imagenet_labels()
        out = []
        for probs in self.probabilities(batch):
            best = np.argsort(probs)[::-1][:5]
            top5 = tuple(Prediction(labels[i], float(probs[i])) for i in best)
            out.append(Classification(label=top5[0].label, score=top5[0].score, top5=top5))
        return out


class TensorFlowResNet50(Classifier):
    """Batch classification with one traced graph, reused for every call.

    Calling the model through `tf.function` avoids `model.predict`'s per-call
    set-up (measured here at about 60 ms a call).
    """

    def __init__(self, weights: str = "imagenet", threads: int = 0) -> None:
        import tensorflow as tf

        if threads > 0:
            # Must happen before TensorFlow runs its first op.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        started = time.perf_counter()
        self.weights = weights
        self.untrained = weights == RANDOM_WEIGHTS
        network = build_network(weights)
        self._forward = tf.function(
            lambda x: network(x, training=False),
            input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)],
            # Nothing to convert in a plain forward pass, and autograph would
            # leave generated source files behind in /tmp.
            autograph=False,
        )
        self._tf = tf
        self.classify(np.zeros((1, 224, 224, 3), dtype=np.float32))  # trace once, now
        self.load_seconds = time.perf_counter() - started
        log.info("ResNet-50 (%s weights) ready in %.1f s", weights, self.load_seconds)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(self._tf.constant(batch, dtype=self._tf.float32)).numpy()


def load_classifier(weights: str, runtime: str = "openvino", threads: int = 0) -> Classifier:
    """The classifier a worker (or a test, or the benchmark) should use."""
    if runtime == "tensorflow":
        return TensorFlowResNet50(weights, threads=threads)
    if runtime == "openvino":
        from app_tier.openvino_runtime import OpenVinoResNet50

        return OpenVinoResNet50(weights, threads=threads)
    raise ValueError(f"MODEL_RUNTIME must be one of {MODEL_RUNTIMES}, got {runtime!r}")
